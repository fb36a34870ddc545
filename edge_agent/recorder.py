"""The `AudioRecorder` library API, Trio-native, on the agent's own pieces.

edge-agent grew from a recorder library whose API people already use
(``AudioRecorder(store, config)`` with ``init``/``start``/``stream``/``segment``/
``stop``/``close``). This module keeps that API, built on what the agent runs:

* capture is an `Agent` configured for capture only (its supervised capture task,
  `make_source` sources, `AudioRing`), running in a nursery the recorder owns;
* a recording is a ring reader whose frames are encoded incrementally into a file
  (memory never grows with its length), uploaded to a `store.Store` at `stop`;
* `stream` is another reader per call: constant work per chunk, however long the
  recording; `segment` cuts any range the ring still holds;
* resampling is libsamplerate (`StreamResampler`), encoders are the agent's: Ogg
  Opus (libopusenc), Ogg FLAC and WAV as the spool writes them, MP3 through
  `lameenc` (the ``mp3`` extra).

It also holds the agent's *recordings on demand*: `AgentRecordings` brackets a
stretch of the continuous capture as a named recording, sealed into the spool and
uploaded like any segment, and `recording_routes` exposes it in the device API.
"""

from __future__ import annotations

import builtins
import contextlib
import enum
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, NamedTuple, Protocol

import numpy as np
import trio
from numpy.typing import NDArray
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# The spool's own encoders (Ogg FLAC through libFLAC, the WAV header it patches), so
# recordings are written exactly as segments are.
from .audio.flac import OggFlacEncoder
from .audio.opus import OggOpusEncoder
from .audio.pcm import (
    SampleFormat,
    from_float32,
    mix_down,
    to_bytes_le,
    to_float32,
    wav_header,
    wav_size_patches,
)
from .audio.resample import StreamResampler
from .capture import CaptureError, Source, list_input_devices, resolve_device
from .clock import Clock, SystemClock, iso_utc
from .config import ConfigError, validate
from .errors import EdgeAgentError
from .ring import AudioRing, RingReader
from .spool import Spool
from .store import KeyBuilder, Store, check_key
from .supervisor import Backoff, TaskStatus
from .wire import GapNote, SegmentMeta, SegmentState, is_segment_id, new_segment_id

if TYPE_CHECKING:
    from .agent import Agent
    from .config import RecordingsConfig

__all__ = [
    "PYAUDIO_FORMATS",
    "AgentRecordings",
    "AudioConfig",
    "AudioFormat",
    "AudioFrame",
    "AudioRecorder",
    "AudioSegment",
    "PcmLayout",
    "RecorderStats",
    "RecordingConflict",
    "RecordingLimit",
    "RecordingsStats",
    "encode_audio",
    "pcm_layout",
    "recording_routes",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# The reference types


class AudioFormat(enum.StrEnum):
    """Output formats of `stream`, `segment` and uploaded recordings."""

    PCM = "pcm"  # raw little-endian interleaved samples in the config's sample format
    WAV = "wav"
    MP3 = "mp3"
    OPUS = "opus"  # Ogg Opus
    FLAC = "flac"  # Ogg FLAC (as the spool writes it)


#: File extension and Content-Type of each format.
FORMAT_INFO: Final[Mapping[AudioFormat, tuple[str, str]]] = {
    AudioFormat.PCM: ("pcm", "application/octet-stream"),
    AudioFormat.WAV: ("wav", "audio/wav"),
    AudioFormat.MP3: ("mp3", "audio/mpeg"),
    AudioFormat.OPUS: ("opus", "audio/ogg; codecs=opus"),
    AudioFormat.FLAC: ("oga", "audio/ogg; codecs=flac"),
}

#: PyAudio's sample-format constants, accepted in `AudioConfig.format` so ported
#: code keeps working: paFloat32, paInt32, paInt24, paInt16.
PYAUDIO_FORMATS: Final[Mapping[int, str]] = {1: "float32", 2: "int32", 4: "int24", 8: "int16"}

_MP3_RATES: Final = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


class AudioConfig(NamedTuple):
    """Audio recording configuration (the reference's fields and defaults).

    Attributes:
        format: Sample format: ``"int16"``, ``"int24"``, ``"int32"``, ``"float32"``
            (or a `SampleFormat`), or a PyAudio constant (paInt16=8, paInt24=4,
            paInt32=2, paFloat32=1).
        channels: Channels captured (1 = mono, 2 = stereo).
        rate: Sample rate in Hz (8000 to 384000).
        chunk: Frames per buffer: PortAudio delivers blocks of about this many
            frames (rounded to whole milliseconds), and it is the default
            `stream` chunk size.
        input_device_index: Input device: an index, a name substring (USB mics
            change index on re-plug), or None for the default device.
    """

    format: int | str = 8
    channels: int = 1
    rate: int = 16000
    chunk: int = 1024
    input_device_index: int | str | None = None


class AudioFrame:
    """One captured block with its capture time (slots keep it small)."""

    __slots__ = ("data", "timestamp")

    def __init__(self, timestamp: datetime, data: bytes) -> None:
        self.timestamp = timestamp
        self.data = data

    def __repr__(self) -> str:
        return f"AudioFrame(timestamp={self.timestamp!r}, data=<{len(self.data)} bytes>)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AudioFrame):
            return NotImplemented
        return self.timestamp == other.timestamp and self.data == other.data

    __hash__ = None  # type: ignore[assignment]


class AudioSegment(NamedTuple):
    """A finished recording, as `AudioRecorder.stop` returns it.

    Attributes:
        key: Storage key the audio was uploaded under.
        duration_ms: Audio held, in milliseconds (frames / rate; capture gaps
            are not counted).
        started_at: Capture time (UTC) of the first frame.
        ended_at: Capture time (UTC) just after the last frame.
        frames: The raw PCM of the whole recording when the ring still held it
            at `stop`, else ``b""`` (the full audio is in the store).
    """

    key: str
    duration_ms: int
    started_at: datetime
    ended_at: datetime
    frames: bytes


# ----------------------------------------------------------------------------
# PCM layout and encoders (synchronous, no I/O)


@dataclass(frozen=True)
class PcmLayout:
    """How samples are held and written: the ring's sample format, and whether PCM
    output packs them into 3 bytes (``int24``: captured as left-justified int32)."""

    sample_format: SampleFormat
    packed24: bool = False

    @property
    def name(self) -> str:
        return "int24" if self.packed24 else self.sample_format.value

    @property
    def width(self) -> int:
        """Bytes per sample of PCM output."""
        return 3 if self.packed24 else self.sample_format.numpy_dtype.itemsize


def pcm_layout(fmt: int | str) -> PcmLayout:
    """The layout of an `AudioConfig.format` value; ValueError names what is accepted."""
    if isinstance(fmt, bool):
        fmt = repr(fmt)
    if isinstance(fmt, int):
        if fmt not in PYAUDIO_FORMATS:
            raise ValueError(
                f"AudioConfig.format {fmt!r}: expected a PyAudio constant "
                "(paInt16=8, paInt24=4, paInt32=2, paFloat32=1) or a name "
                "(int16, int24, int32, float32)"
            )
        fmt = PYAUDIO_FORMATS[fmt]
    name = str(fmt).lower()
    if name == "int24":
        return PcmLayout(SampleFormat.INT32, packed24=True)
    try:
        return PcmLayout(SampleFormat(name))
    except ValueError:
        raise ValueError(
            f"AudioConfig.format {fmt!r}: expected int16, int24, int32 or float32 "
            "(or a PyAudio constant: paInt16=8, paInt24=4, paInt32=2, paFloat32=1)"
        ) from None


def _as_format(x: NDArray[Any], fmt: SampleFormat) -> NDArray[Any]:
    """`x` in sample format `fmt` (no copy when it already is)."""
    if x.dtype == fmt.numpy_dtype:
        return x
    return from_float32(to_float32(x), fmt)


def pack_int24(x: NDArray[Any]) -> bytes:
    """Left-justified int32 (or float) samples as packed little-endian 24-bit PCM.

    Vectorised: round to 24 bits, then keep the upper three bytes of each
    little-endian 32-bit word.
    """
    words = _as_format(x, SampleFormat.INT32).astype(np.int64)
    rounded: NDArray[Any] = np.clip((words + 128) >> 8, -(1 << 23), (1 << 23) - 1)
    packed: bytes = rounded.astype("<i4").reshape(-1).view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    return packed


def _pcm_bytes(x: NDArray[Any], layout: PcmLayout) -> bytes:
    if layout.packed24:
        return pack_int24(x)
    return to_bytes_le(_as_format(x, layout.sample_format))


class _Encoder(Protocol):
    """Turns PCM blocks into the bytes of one file, appended in order."""

    def start(self) -> bytes: ...
    def write(self, pcm: NDArray[Any]) -> bytes: ...
    def finish(self) -> tuple[bytes, list[tuple[int, bytes]]]:
        """The last bytes, and (offset, bytes) patches to apply to what was written."""
        ...
    def close(self) -> None: ...


class _PcmEncoder:
    def __init__(self, layout: PcmLayout) -> None:
        self.layout = layout
        self.data_bytes = 0

    def start(self) -> bytes:
        return b""

    def write(self, pcm: NDArray[Any]) -> bytes:
        data = _pcm_bytes(pcm, self.layout)
        self.data_bytes += len(data)
        return data

    def finish(self) -> tuple[bytes, list[tuple[int, bytes]]]:
        return b"", []

    def close(self) -> None:
        pass


class _WavEncoder(_PcmEncoder):
    """PCM WAV with the spool's 44-byte header, sizes patched at the end. Float audio
    is stored as 32-bit integer PCM (as the spool does), 24-bit as 24-bit."""

    def __init__(self, layout: PcmLayout, rate: int, channels: int) -> None:
        if layout.sample_format is SampleFormat.FLOAT32:
            layout = PcmLayout(SampleFormat.INT32)
        super().__init__(layout)
        self.rate, self.channels = rate, channels

    def start(self) -> bytes:
        return wav_header(self.rate, self.channels, self.layout.width, 0)

    def finish(self) -> tuple[bytes, list[tuple[int, bytes]]]:
        return b"", wav_size_patches(self.data_bytes)


class _OpusEncoder:
    def __init__(self, rate: int, channels: int, bitrate: int) -> None:
        self._enc = OggOpusEncoder(rate, channels, bitrate=bitrate, application="audio",
                                   comments={"ENCODER": "edge-agent"})

    def start(self) -> bytes:
        return b""

    def write(self, pcm: NDArray[Any]) -> bytes:
        return self._enc.write(pcm if pcm.dtype in (np.int16, np.float32) else to_float32(pcm))

    def finish(self) -> tuple[bytes, list[tuple[int, bytes]]]:
        return self._enc.finish(), []

    def close(self) -> None:
        self._enc.close()


class _FlacEncoder:
    """The spool's Ogg FLAC encoder (libFLAC): 16-bit for int16 audio, else 24-bit."""

    def __init__(self, rate: int, channels: int, layout: PcmLayout) -> None:
        self._format = layout.sample_format
        self._enc = OggFlacEncoder(rate, channels, self._format)

    def start(self) -> bytes:
        return self._enc.start()

    def write(self, pcm: NDArray[Any]) -> bytes:
        if pcm.dtype == np.float32 and self._format is not SampleFormat.FLOAT32:
            pcm = _as_format(pcm, self._format)
        return self._enc.write(pcm)

    def finish(self) -> tuple[bytes, list[tuple[int, bytes]]]:
        return self._enc.finish()

    def close(self) -> None:
        self._enc.close()


def _lameenc() -> Any:
    try:
        import lameenc
    except ImportError:
        raise ValueError("MP3 needs the lameenc package: install edge-agent[mp3]") from None
    return lameenc


def mp3_default_kbps(rate: int, channels: int) -> int:
    """A bitrate that sounds fine for speech at each MPEG rate family."""
    per_channel = 64 if rate >= 32000 else 32 if rate >= 16000 else 16
    return per_channel * channels


class _Mp3Encoder:
    """MP3 through lameenc (LAME); takes 16-bit PCM."""

    def __init__(self, rate: int, channels: int, kbps: int | None) -> None:
        if rate not in _MP3_RATES:
            raise ValueError(f"MP3 cannot hold {rate} Hz; use one of {_MP3_RATES} (rate=...)")
        if channels not in (1, 2):
            raise ValueError(f"MP3 holds 1 or 2 channels, not {channels} (channels=...)")
        enc = _lameenc().Encoder()
        enc.set_in_sample_rate(rate)
        enc.set_channels(channels)
        enc.set_bit_rate(kbps or mp3_default_kbps(rate, channels))
        enc.set_quality(5)
        self._enc = enc

    def start(self) -> bytes:
        return b""

    def write(self, pcm: NDArray[Any]) -> bytes:
        return bytes(self._enc.encode(to_bytes_le(_as_format(pcm, SampleFormat.INT16))))

    def finish(self) -> tuple[bytes, list[tuple[int, bytes]]]:
        return bytes(self._enc.flush()), []

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class EncodeOptions:
    """Bitrates of the lossy formats."""

    opus_bitrate: int = 32000
    mp3_kbps: int | None = None  # None: `mp3_default_kbps`


def _make_encoder(fmt: AudioFormat, rate: int, channels: int, layout: PcmLayout,
                  options: EncodeOptions) -> _Encoder:
    if fmt is AudioFormat.PCM:
        return _PcmEncoder(layout)
    if fmt is AudioFormat.WAV:
        return _WavEncoder(layout, rate, channels)
    if fmt is AudioFormat.OPUS:
        return _OpusEncoder(rate, channels, options.opus_bitrate)
    if fmt is AudioFormat.FLAC:
        return _FlacEncoder(rate, channels, layout)
    return _Mp3Encoder(rate, channels, options.mp3_kbps)


def _audio_format(fmt: AudioFormat | str) -> AudioFormat:
    try:
        return AudioFormat(fmt)
    except ValueError:
        raise ValueError(
            f"format {fmt!r}: expected one of {', '.join(f.value for f in AudioFormat)}"
        ) from None


def _encode_whole(enc: _Encoder, pcm: NDArray[Any]) -> bytes:
    try:
        out = bytearray(enc.start())
        out += enc.write(pcm)
        tail, patches = enc.finish()
        out += tail
        for offset, data in patches:
            out[offset : offset + len(data)] = data
        return bytes(out)
    finally:
        enc.close()


def encode_audio(pcm: NDArray[Any], fmt: AudioFormat | str, rate: int, layout: PcmLayout,
                 options: EncodeOptions | None = None) -> bytes:
    """Encode a whole ``(frames, channels)`` block as one complete file of `fmt`."""
    channels = 1 if pcm.ndim == 1 else int(pcm.shape[1])
    enc = _make_encoder(_audio_format(fmt), rate, channels, layout, options or EncodeOptions())
    return _encode_whole(enc, pcm)


class _Converter:
    """Capture frames to the requested channels and rate, keeping resampler state
    across blocks. Frames pass through untouched when nothing changes."""

    def __init__(self, in_rate: int, in_channels: int, out_rate: int, out_channels: int) -> None:
        if out_channels < 1:
            raise ValueError(f"channels must be >= 1, got {out_channels}")
        if out_channels > in_channels > 1:
            raise ValueError(f"cannot make {out_channels} channels from {in_channels}")
        if out_rate <= 0:
            raise ValueError(f"rate must be > 0, got {out_rate}")
        self.out_channels = out_channels
        self.in_channels = in_channels
        self._rs = (StreamResampler(in_rate, out_rate, out_channels)
                    if in_rate != out_rate else None)

    @property
    def identity(self) -> bool:
        return self._rs is None and self.out_channels == self.in_channels

    def process(self, x: NDArray[Any]) -> NDArray[Any]:
        if self.identity:
            return x
        mixed = mix_down(x, self.out_channels)
        return mixed if self._rs is None else self._rs.process(mixed)

    def flush(self) -> NDArray[Any]:
        if self._rs is None:
            return np.zeros((0, self.out_channels), np.float32)
        return self._rs.flush()


# ----------------------------------------------------------------------------
# Waiting on the ring, wakeable


class _Wakeable:
    """Waits on the ring that `wake_all` can end early (stop, end of capture)."""

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()

    async def wait_for(self, ring: AudioRing, index: int | None) -> None:
        """Until ``ring.head >= index`` (forever when None) or `wake_all`."""
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                if index is None:
                    await trio.sleep_forever()
                else:
                    await ring.wait_for(index)
            finally:
                self._scopes.discard(scope)

    def wake_all(self) -> None:
        for scope in builtins.list(self._scopes):
            scope.cancel()


# ----------------------------------------------------------------------------
# One recording: ring frames encoded incrementally into a file


class _FileRecording:
    """Frames ``[start, stop)`` of the ring encoded into `path` as they arrive.

    A ring reader takes the frames, a worker thread encodes and appends them, so
    memory does not depend on the recording's length. `request_stop` fixes the end;
    `run` then writes the rest, finishes the file (patches, fsync) and returns. If
    the writer falls more than the ring behind, the frames it lost are counted.
    """

    def __init__(self, ring: AudioRing, start: int, path: Path, encoder: _Encoder, *,
                 name: str, limiter: trio.CapacityLimiter, max_frames: int | None = None,
                 batch_seconds: float = 0.25, max_batch_seconds: float = 10.0) -> None:
        self.ring = ring
        self.start = start
        self.path = path
        self.name = name
        self.stop_index: int | None = None
        self.auto_stopped = False
        self.capture_over = False
        self.frames = 0
        self.lost_frames = 0
        self.bytes = 0
        self.first_index: int | None = None
        self.first_mono: float | None = None
        self.done = trio.Event()
        self.error: Exception | None = None
        self._enc = encoder
        self._limiter = limiter
        self._max_frames = max_frames
        self._batch = max(1, round(batch_seconds * ring.rate))
        self._max_batch = max(self._batch, round(max_batch_seconds * ring.rate))
        self._wake = _Wakeable()
        self._file: IO[bytes] | None = None

    def request_stop(self, index: int) -> None:
        """End the recording at ring index `index` (the first call wins)."""
        if self.stop_index is None:
            self.stop_index = max(index, self.start)
        self._wake.wake_all()

    def note_capture_over(self) -> None:
        """The source ended: no more frames will come."""
        self.capture_over = True
        self._wake.wake_all()

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def run(self, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        ring = self.ring
        reader = ring.open_reader(self.name, start=self.start)
        started = False
        try:
            await self._thread(self._open)
            task_status.started()
            started = True
            while True:
                if (self._max_frames is not None and self.stop_index is None
                        and ring.head >= self.start + self._max_frames):
                    self.stop_index = self.start + self._max_frames
                    self.auto_stopped = True
                    log.warning("recording reached its limit name=%s frames=%d", self.name,
                                self._max_frames)
                end = ring.head if self.stop_index is None else self.stop_index
                available = end - max(reader.cursor, ring.tail)
                final = self.stop_index is not None or self.capture_over
                if available >= self._batch or (final and available > 0):
                    await self._take(reader, min(available, self._max_batch))
                elif self.stop_index is not None:
                    break
                else:
                    target = None if self.capture_over else reader.cursor + self._batch
                    await self._wake.wait_for(ring, target)
            await self._thread(self._finish)
        except Exception as exc:
            if not started:  # the file cannot be created: the caller's start() fails
                raise
            self.error = exc
            log.error("recording failed name=%s path=%s error=%r", self.name, self.path, exc)
        finally:
            reader.close()
            if self._file is not None and not self._file.closed:
                self._abandon()  # failed or cancelled: release the file and encoder
            self.done.set()

    async def _take(self, reader: RingReader, count: int) -> None:
        result = reader.read(count)
        if result.lost:
            self.lost_frames += result.lost
            log.warning("recording fell behind the ring name=%s lost_frames=%d", self.name,
                        result.lost)
        if self.first_index is None and len(result.frames):
            self.first_index = result.start
            self.first_mono = self.ring.index_to_mono(result.start)
        await self._thread(self._write, result.frames)

    def _open(self) -> None:
        self._file = self.path.open("wb")
        self._append(self._enc.start())

    def _append(self, data: bytes) -> None:
        if data:
            assert self._file is not None
            self._file.write(data)
            self.bytes += len(data)

    def _write(self, frames: NDArray[Any]) -> None:
        self._append(self._enc.write(frames))
        self.frames += int(frames.shape[0])

    def _finish(self) -> None:
        f = self._file
        assert f is not None
        tail, patches = self._enc.finish()
        self._append(tail)
        for offset, data in patches:
            f.seek(offset)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._enc.close()

    def _abandon(self) -> None:
        with contextlib.suppress(Exception):
            self._enc.close()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()

    def times(self) -> tuple[float, float, float, float]:
        """(start utc, start mono, end utc, end mono) of the recorded frames.

        The start is that of the first frame read; the end is the time of the stop
        index (just after the last frame). Both map to UTC with the ring's newest
        wall-clock offset, as every ring time does, so their difference is exactly
        the monotonic span even if the wall clock was stepped or slewed meanwhile.
        """
        ring = self.ring
        stop = self.stop_index if self.stop_index is not None else ring.head
        if ring.head == 0:
            return 0.0, 0.0, 0.0, 0.0
        end_mono = ring.index_to_mono(stop)
        offset = ring.index_to_utc(stop) - end_mono
        start_mono = self.first_mono if self.first_mono is not None else end_mono
        return start_mono + offset, start_mono, end_mono + offset, end_mono

    def gap_notes(self) -> list[GapNote]:
        """Capture gaps inside the recording (as far as the ring still lists them)."""
        start = self.first_index if self.first_index is not None else self.start
        stop = self.stop_index if self.stop_index is not None else self.ring.head
        return [GapNote(frame=g.index - start, seconds=g.seconds,
                        utc=iso_utc(self.ring.index_to_utc(g.index)))
                for g in self.ring.gaps(start, stop)]


# ----------------------------------------------------------------------------
# AudioRecorder


@dataclass
class RecorderStats:
    """Counters of one `AudioRecorder`."""

    recordings: int = 0
    failures: int = 0  # encoding or disk errors while recording
    uploads: int = 0
    upload_failures: int = 0
    bytes_uploaded: int = 0
    recorded_frames: int = 0
    # Frames a recording lost because its writer fell more than the ring behind.
    lost_frames: int = 0
    streams: int = 0
    stream_chunks: int = 0
    # Frames a stream skipped because its consumer fell more than the ring behind.
    stream_lost_frames: int = 0
    segments: int = 0


@dataclass
class _Session:
    key: str
    id: str
    recording: _FileRecording
    format: AudioFormat


def _utc_datetime(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=UTC)


def _timestamp(value: datetime, name: str) -> float:
    if not isinstance(value, datetime):
        raise ValueError(f"{name} must be a datetime, got {type(value).__name__}")
    return value.timestamp()  # naive datetimes are local time, as Python defines it


class AudioRecorder:
    """Records the microphone into a bounded ring, uploads recordings to `store`.

    The reference API (see the README section "Coming from AudioRecorder"):
    `init`, `start`, `stream`, `segment`, `stop`, `close`, `clear_frames`,
    `list_input_devices`, `is_recording`, `current_segment_key`. Use it as
    ``async with AudioRecorder(store, config) as rec:``; ``await init()`` ...
    ``await close()`` works too when both are called from the same task (the
    recorder's nursery lives between them).

    Args:
        store: Where `stop` uploads recordings (`LocalStore`, `HttpStore`, ...).
        config: Capture settings; None means `AudioConfig()`.
        source: A capture source to use instead of the input device (a
            `FileSource` or `ToneSource`, for tests and headless use).
        clock: Wall-clock and monotonic time for capture timestamps.
        ring_seconds: Audio held in memory; `segment` reaches back this far and
            memory is this plus a fixed overhead, however long a recording runs.
        upload_format: Format of the uploaded recordings.
        work_dir: Where recordings are encoded before upload; a private temp
            directory (removed by `close`) when None.
        opus_bitrate: Bits per second of Opus output.
        mp3_kbps: Kilobits per second of MP3 output (None: by rate and channels).
        open_timeout: How long `init` waits for the input to open.
    """

    def __init__(self, store: Store, config: AudioConfig | None = None, *,
                 source: Source | None = None, clock: Clock | None = None,
                 ring_seconds: float = 300.0,
                 upload_format: AudioFormat | str = AudioFormat.WAV,
                 work_dir: str | os.PathLike[str] | None = None, opus_bitrate: int = 32000,
                 mp3_kbps: int | None = None, open_timeout: float = 10.0) -> None:
        self.store = store
        self.config = config if config is not None else AudioConfig()
        self.upload_format = _audio_format(upload_format)
        self.ring_seconds = ring_seconds
        self.options = EncodeOptions(opus_bitrate=opus_bitrate, mp3_kbps=mp3_kbps)
        self.open_timeout = open_timeout
        self.stats = RecorderStats()
        self._source = source
        self._clock: Clock = clock or SystemClock()
        self._work_dir_arg = Path(work_dir) if work_dir is not None else None
        self._work_dir: Path | None = None
        self._own_work_dir = False
        self._layout = PcmLayout(SampleFormat.INT16)
        self._agent: Agent | None = None
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        self._session: _Session | None = None
        self._cleared_before = 0
        self._wake = _Wakeable()
        self._encode_limiter = trio.CapacityLimiter(2)
        self._io_limiter = trio.CapacityLimiter(1)

    def __repr__(self) -> str:
        state = ("recording" if self._session else "idle") if self._agent else "closed"
        return f"<AudioRecorder {state} store={self.store!r}>"

    async def __aenter__(self) -> AudioRecorder:
        await self.init()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- properties ----------------------------------------------------------------

    @property
    def is_recording(self) -> bool:
        """Whether a recording is in progress."""
        return self._session is not None

    @property
    def current_segment_key(self) -> str | None:
        """The storage key of the recording in progress, or None."""
        return self._session.key if self._session is not None else None

    @property
    def ring(self) -> AudioRing:
        """The capture ring (RuntimeError before `init`)."""
        return self._require_agent().ring

    @property
    def layout(self) -> PcmLayout:
        """How PCM output is laid out for this config."""
        return self._layout

    def _require_agent(self) -> Agent:
        if self._agent is None:
            raise RuntimeError("audio system not initialised: call init() first")
        return self._agent

    # -- life cycle ----------------------------------------------------------------

    def _agent_config(self, layout: PcmLayout, work_dir: Path) -> Any:
        cfg = self.config
        for name in ("channels", "rate", "chunk"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AudioConfig.{name}: expected a positive integer, "
                                 f"got {value!r}")
        device = cfg.input_device_index
        if device is None:
            device = "default"
        elif isinstance(device, bool) or not isinstance(device, int | str):
            raise ValueError(f"AudioConfig.input_device_index: expected an index, a name "
                             f"substring or None, got {device!r}")
        if not (isinstance(self.ring_seconds, int | float) and self.ring_seconds > 0):
            raise ValueError(f"ring_seconds: expected a positive number, got "
                             f"{self.ring_seconds!r}")
        block_ms = min(1000, max(5, round(cfg.chunk * 1000 / cfg.rate)))
        raw = {
            "device": {"id": "recorder", "data_dir": str(work_dir)},
            "capture": {"source": "sounddevice", "device": device, "rate": cfg.rate,
                        "channels": cfg.channels, "format": layout.sample_format.value,
                        "block_ms": block_ms},
            "ring": {"seconds": max(1.0, float(self.ring_seconds))},
            "segments": {"enabled": False},
        }
        try:
            return validate(raw)
        except ConfigError as exc:
            problems = "; ".join(p.replace("capture.", "AudioConfig.", 1)
                                 for p in exc.problems)
            raise ValueError(problems) from None

    async def init(self) -> None:
        """Open the audio system: validate the config, open the input, start capture.

        Calling it again while initialised does nothing.

        Raises:
            ValueError: A config value is out of range (the message names it).
            CaptureError: The input device is missing or refuses the settings.
        """
        if self._agent is not None:
            return
        from .agent import Agent  # here: agent.py imports this module

        layout = pcm_layout(self.config.format)
        if self._work_dir_arg is None:
            work_dir = Path(tempfile.mkdtemp(prefix="edge-agent-recorder-"))
            own = True
        else:
            work_dir = self._work_dir_arg
            await trio.to_thread.run_sync(lambda: work_dir.mkdir(parents=True, exist_ok=True))
            own = False
        try:
            cfg = self._agent_config(layout, work_dir)
            if self._source is not None:
                src = self._source
                got = (src.rate, src.channels, SampleFormat(src.format))
                want = (cfg.capture.rate, cfg.capture.channels, layout.sample_format)
                if got != want:
                    raise ValueError(
                        f"source delivers {got[0]} Hz x{got[1]} {got[2]}; AudioConfig asks "
                        f"for {want[0]} Hz x{want[1]} {want[2]} (int24 is captured as int32)")
            else:
                # Fail now, with the device list, rather than retrying in the background.
                devices = await trio.to_thread.run_sync(
                    lambda: list_input_devices(refresh=True))
                resolve_device(cfg.capture.device, devices)
            agent = Agent(cfg, clock=self._clock, source=self._source,
                          backoff=Backoff(initial=0.5, maximum=5.0))
        except BaseException:
            if own:
                shutil.rmtree(work_dir, ignore_errors=True)
            raise
        stack = AsyncExitStack()
        nursery = await stack.enter_async_context(trio.open_nursery())
        try:
            with trio.move_on_after(self.open_timeout) as scope:
                await nursery.start(self._run_agent, agent)
            health = agent.tasks.get("capture")
            if scope.cancelled_caught:
                raise CaptureError(f"the audio input did not open within {self.open_timeout:g} s")
            if health is not None and health.state == "backoff":
                raise CaptureError(f"cannot open the audio input: {health.last_error}")
        except BaseException:
            agent.stop()
            nursery.cancel_scope.cancel()
            await stack.aclose()
            if own:
                shutil.rmtree(work_dir, ignore_errors=True)
            raise
        nursery.start_soon(self._watch_capture, agent)
        self._agent, self._stack, self._nursery = agent, stack, nursery
        self._work_dir, self._own_work_dir, self._layout = work_dir, own, layout
        self._cleared_before = 0
        log.info("recorder ready rate=%d channels=%d format=%s ring_seconds=%g",
                 self.config.rate, self.config.channels, layout.name, self.ring_seconds)

    async def _run_agent(self, agent: Agent, task_status: TaskStatus) -> None:
        await agent.run(systemd=False, task_status=task_status)

    async def _watch_capture(self, agent: Agent) -> None:
        await agent.capture_finished.wait()
        log.info("recorder capture ended frames=%d", agent.ring.head)
        if self._session is not None:
            self._session.recording.note_capture_over()
        self._wake.wake_all()

    async def close(self) -> None:
        """Stop any recording (uploading it), stop capture and release everything.

        Raises:
            Exception: What `stop` raised for the recording in progress, after
                everything was released.
        """
        if self._agent is None:
            return
        error: Exception | None = None
        try:
            if self._session is not None:
                await self.stop()
        except Exception as exc:
            error = exc
        finally:
            agent, stack, nursery = self._agent, self._stack, self._nursery
            self._agent = self._stack = self._nursery = None
            self._session = None
            agent.stop()
            self._wake.wake_all()
            if nursery is not None:
                nursery.cancel_scope.cancel()
            if stack is not None:
                await stack.aclose()
            if self._own_work_dir and self._work_dir is not None:
                work_dir = self._work_dir
                await trio.to_thread.run_sync(
                    lambda: shutil.rmtree(work_dir, ignore_errors=True))
            self._work_dir = None
            log.info("recorder closed")
        if error is not None:
            raise error

    # -- recording -------------------------------------------------------------------

    async def start(self, *prefixes: str) -> str:
        """Begin a recording; returns its storage key.

        The key is ``store.key_builder.build(*prefixes, id)`` with a unique,
        time-sortable id. The recording begins with the first frame captured after
        this call.

        Raises:
            RuntimeError: Not initialised, or already recording.
            ValueError: A prefix cannot be part of a key.
        """
        agent = self._require_agent()
        if self._session is not None:
            raise RuntimeError(f"already recording (key {self._session.key!r}); stop() first")
        assert self._nursery is not None and self._work_dir is not None
        ring = agent.ring
        now = ring.index_to_utc(ring.head) if ring.head else self._clock.utc()
        rec_id = new_segment_id(now)
        key = self.store.key_builder.build(*prefixes, rec_id)
        fmt = self.upload_format
        encoder = _make_encoder(fmt, ring.rate, ring.channels, self._layout, self.options)
        path = self._work_dir / f"{rec_id}.{FORMAT_INFO[fmt][0]}"
        recording = _FileRecording(ring, ring.head, path, encoder, name=f"recording:{rec_id}",
                                   limiter=self._io_limiter)
        if agent.capture_finished.is_set():
            recording.note_capture_over()
        await self._nursery.start(recording.run)
        self._session = _Session(key, rec_id, recording, fmt)
        self.stats.recordings += 1
        log.info("recording started key=%s format=%s", key, fmt)
        return key

    async def stop(self) -> AudioSegment:
        """End the recording and upload it to the store.

        The upload carries metadata: content_type, format, duration_ms, rate,
        channels, sample_format, started_at, ended_at, frames, lost_frames, gaps.

        Raises:
            RuntimeError: Not initialised, or not recording.
            Exception: What encoding or the store raised; the recorder is then no
                longer recording and the encoded file is kept (its path is logged).
        """
        agent = self._require_agent()
        session = self._session
        if session is None:
            raise RuntimeError("not recording: call start() first")
        ring = agent.ring
        rec = session.recording
        rec.request_stop(ring.head)
        self._session = None
        self._wake.wake_all()
        await rec.done.wait()
        if rec.error is not None:
            self.stats.failures += 1
            raise rec.error
        assert rec.stop_index is not None
        start_utc, _, end_utc, _ = rec.times()
        if ring.head == 0:
            start_utc = end_utc = self._clock.utc()
        self.stats.recorded_frames += rec.frames
        self.stats.lost_frames += rec.lost_frames
        first = rec.first_index if rec.first_index is not None else rec.stop_index
        frames = b""
        if first >= ring.tail:
            frames = _pcm_bytes(ring.read(first, rec.stop_index), self._layout)
        else:
            log.info("recording longer than the ring key=%s: AudioSegment.frames is empty, "
                     "the audio is in the store", session.key)
        duration_ms = round(rec.frames * 1000 / ring.rate)
        metadata = {
            "content_type": FORMAT_INFO[session.format][1],
            "format": session.format.value,
            "duration_ms": duration_ms,
            "rate": ring.rate,
            "channels": ring.channels,
            "sample_format": self._layout.name,
            "started_at": iso_utc(start_utc),
            "ended_at": iso_utc(end_utc),
            "frames": rec.frames,
            "lost_frames": rec.lost_frames,
            "gaps": len(rec.gap_notes()),
        }
        try:
            f = await trio.to_thread.run_sync(rec.path.open, "rb")
            try:
                await self.store.upload(f, session.key, metadata)
            finally:
                f.close()
        except Exception:
            self.stats.upload_failures += 1
            log.error("recording upload failed key=%s kept=%s", session.key, rec.path)
            raise
        self.stats.uploads += 1
        self.stats.bytes_uploaded += rec.bytes
        await trio.to_thread.run_sync(lambda: rec.path.unlink(missing_ok=True))
        log.info("recording stopped key=%s seconds=%.3f bytes=%d lost_frames=%d", session.key,
                 rec.frames / ring.rate, rec.bytes, rec.lost_frames)
        return AudioSegment(session.key, duration_ms, _utc_datetime(start_utc),
                            _utc_datetime(end_utc), frames)

    # -- streaming and cutting ---------------------------------------------------------

    def _target(self, channels: int | None, rate: int | None) -> tuple[int, int]:
        ring = self._require_agent().ring
        out_channels = ring.channels if channels is None else channels
        out_rate = ring.rate if rate is None else rate
        for name, value in (("channels", out_channels), ("rate", out_rate)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        return out_channels, out_rate

    async def stream(self, chunk_size: int | None = None,
                     format: AudioFormat | str = AudioFormat.PCM,
                     channels: int | None = None, rate: int | None = None
                     ) -> AsyncGenerator[bytes, None]:
        """Yield the audio of the recording in progress as chunks of `format`.

        Independent of the recording: each call reads the ring with its own
        cursor from the moment it starts, and several streams may run at once.
        Every chunk is a complete file of its format (PCM: raw samples) holding
        `chunk_size` frames counted at the capture rate (``config.chunk`` when
        None), converted to `channels` and `rate`. The stream ends when the
        recording stops, after a last, possibly shorter, chunk. A consumer that
        falls more than the ring behind skips ahead (counted in
        `stats.stream_lost_frames`).

        Raises:
            RuntimeError: Not initialised, or not recording.
            ValueError: Bad chunk size, channels, rate or format.
        """
        agent = self._require_agent()
        session = self._session
        if session is None:
            raise RuntimeError("not recording: call start() before stream()")
        ring = agent.ring
        n = self.config.chunk if chunk_size is None else chunk_size
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= ring.capacity:
            raise ValueError(f"chunk_size must be 1..{ring.capacity} frames, got {chunk_size!r}")
        fmt = _audio_format(format)
        out_channels, out_rate = self._target(channels, rate)
        converter = _Converter(ring.rate, ring.channels, out_rate, out_channels)
        _make_encoder(fmt, out_rate, out_channels, self._layout, self.options).close()
        rec = session.recording
        self.stats.streams += 1
        reader = ring.open_reader(f"stream:{session.id}", start=ring.head)
        try:
            while True:
                block = await self._next_block(ring, reader, n, rec)
                if block is None:
                    break
                end = rec.stop_index if rec.stop_index is not None else (
                    ring.head if rec.capture_over else None)
                last = end is not None and reader.cursor >= end
                chunk = await trio.to_thread.run_sync(
                    self._encode_chunk, converter, block, fmt, out_rate, out_channels, last,
                    limiter=self._encode_limiter)
                self.stats.stream_chunks += 1
                yield chunk
                if last:
                    break
        finally:
            reader.close()

    async def _next_block(self, ring: AudioRing, reader: RingReader, n: int,
                          rec: _FileRecording) -> NDArray[Any] | None:
        """The next `n` frames for a stream (fewer at the end), None when it is over."""
        while True:
            stop = rec.stop_index
            end = ring.head if stop is None else stop
            available = end - max(reader.cursor, ring.tail)
            over = stop is not None or rec.capture_over
            if available >= n or (over and available > 0):
                result = reader.read(min(n, available))
                if result.lost:
                    self.stats.stream_lost_frames += result.lost
                    log.warning("stream fell behind the ring lost_frames=%d", result.lost)
                return result.frames
            if over:
                return None
            await self._wake.wait_for(ring, reader.cursor + n)

    def _encode_chunk(self, converter: _Converter, block: NDArray[Any], fmt: AudioFormat,
                      rate: int, channels: int, last: bool) -> bytes:
        pcm = converter.process(block)
        if last:
            tail = converter.flush()
            if len(tail):
                pcm = np.concatenate([to_float32(pcm), tail])
        enc = _make_encoder(fmt, rate, channels, self._layout, self.options)
        return _encode_whole(enc, pcm)

    async def segment(self, started_at: datetime, ended_at: datetime, *,
                      channels: int | None = None, rate: int | None = None,
                      format: AudioFormat | str = AudioFormat.PCM,
                      ) -> bytes:
        """The audio captured between two times, as one file of `format`.

        Any range the ring still holds can be cut, recording or not; a range
        reaching past the newest frame ends there.

        Raises:
            RuntimeError: Not initialised.
            ValueError: An inverted or empty range, audio no longer held (the
                message names the oldest time still available), or bad options.
        """
        ring = self._require_agent().ring
        t0 = _timestamp(started_at, "started_at")
        t1 = _timestamp(ended_at, "ended_at")
        if t1 <= t0:
            raise ValueError(f"invalid time range: ended_at {iso_utc(t1)} is not after "
                             f"started_at {iso_utc(t0)}")
        fmt = _audio_format(format)
        out_channels, out_rate = self._target(channels, rate)
        if ring.head == 0:
            raise ValueError("no frames: nothing has been captured yet")
        start, stop = ring.utc_to_index(t0), min(ring.utc_to_index(t1), ring.head)
        tail = ring.tail
        if start < tail:
            raise ValueError(
                f"audio from {iso_utc(t0)} is no longer held; the oldest audio still "
                f"available starts at {iso_utc(ring.index_to_utc(tail))}")
        if start < self._cleared_before:
            raise ValueError(
                f"audio from {iso_utc(t0)} was cleared by clear_frames(); the oldest audio "
                f"still available starts at {iso_utc(ring.index_to_utc(self._cleared_before))}")
        if stop <= start:
            raise ValueError(
                f"no frames between {iso_utc(t0)} and {iso_utc(t1)}; the audio held ends at "
                f"{iso_utc(ring.index_to_utc(ring.head))}")
        pcm = ring.read(start, stop)
        converter = _Converter(ring.rate, ring.channels, out_rate, out_channels)
        self.stats.segments += 1
        data: bytes = await trio.to_thread.run_sync(
            self._encode_chunk, converter, pcm, fmt, out_rate, out_channels, True,
            limiter=self._encode_limiter)
        return data

    def clear_frames(self) -> None:
        """Forget the audio held so far: `segment` no longer reaches before now.

        The ring is preallocated, so no memory is freed (there is none to free);
        a recording in progress keeps its audio (it is already being encoded).

        Raises:
            RuntimeError: Not initialised.
        """
        self._cleared_before = self._require_agent().ring.head

    def list_input_devices(self) -> builtins.list[dict[str, Any]]:
        """Input devices PortAudio sees now: index, name, channels, sample_rate,
        hostapi, is_default. Blocking (PortAudio probes the devices); needs no init.

        Raises:
            CaptureError: PortAudio is not available.
        """
        return [
            {"index": d.index, "name": d.name, "channels": d.channels,
             "sample_rate": int(d.default_rate), "hostapi": d.hostapi,
             "is_default": d.is_default}
            for d in list_input_devices(refresh=True)
        ]


# ----------------------------------------------------------------------------
# Recordings on demand in the agent


class RecordingConflict(EdgeAgentError, RuntimeError):
    """The recording is not in a state that allows this (e.g. stopped twice)."""


class RecordingLimit(EdgeAgentError, RuntimeError):
    """Too many recordings at once."""


@dataclass
class RecordingsStats:
    """Counters of `AgentRecordings`."""

    started: int = 0
    sealed: int = 0
    auto_stopped: int = 0  # reached `max_seconds`
    failed: int = 0
    refused: int = 0  # over `max_active`
    lost_frames: int = 0
    active: int = 0


@dataclass
class _Active:
    key: str
    id: str
    format: AudioFormat
    recording: _FileRecording
    started_utc: str
    finished: trio.Event = field(default_factory=trio.Event)
    meta: SegmentMeta | None = None
    error: str | None = None
    # Shields the recording from the agent's shutdown until it is sealed (or the
    # grace time is over and run() cancels it).
    scope: trio.CancelScope = field(default_factory=lambda: trio.CancelScope(shield=True))




class AgentRecordings:
    """Named recordings bracketed from the agent's continuous capture.

    `start` opens a ring reader at the live head and encodes from it into
    ``work_dir`` (audio is never captured twice); `stop` fixes the end, finishes
    the file and publishes it into the spool (`Spool.publish_file`), where the
    uploader picks it up like any segment. The key is ``<prefixes>/<id>``, the id
    being the spool segment id. Bounded: `max_active` recordings at once, each at
    most `max_seconds` (then it stops and is sealed by itself). At shutdown the
    open recordings are sealed within the grace time.
    """

    def __init__(self, ring: AudioRing, spool: Spool, config: RecordingsConfig, *,
                 work_dir: Path, clock: Clock, seal_grace: float = 3.0) -> None:
        self.ring = ring
        self.spool = spool
        self.config = config
        self.work_dir = Path(work_dir)
        self.clock = clock
        self.seal_grace = seal_grace
        self.stats = RecordingsStats()
        self.key_builder = KeyBuilder()
        self.layout = PcmLayout(SampleFormat(str(ring.dtype)))
        self.options = EncodeOptions(opus_bitrate=config.bitrate,
                                     mp3_kbps=config.bitrate // 1000)
        self._active: dict[str, _Active] = {}
        # Keys stopped by this run whose seal failed (published ones are in the spool).
        self._failed: dict[str, str] = {}
        self._nursery: trio.Nursery | None = None
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """The supervised task: clear leftovers, then serve start/stop until cancelled."""
        leftovers = await trio.to_thread.run_sync(self._clear_work_dir)
        if leftovers:
            log.warning("recordings interrupted by a restart were lost files=%d", leftovers)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                # Shutdown: seal what is recording, within the grace time.
                self._nursery = None
                with trio.move_on_after(self.seal_grace, shield=True):
                    for active in builtins.list(self._active.values()):
                        active.recording.request_stop(self.ring.head)
                    for active in builtins.list(self._active.values()):
                        await active.finished.wait()
                for active in builtins.list(self._active.values()):
                    log.error("recording not sealed before shutdown key=%s", active.key)
                    active.scope.cancel()

    def _clear_work_dir(self) -> int:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        count = 0
        for path in self.work_dir.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
                count += 1
        return count

    async def start(self, prefixes: Sequence[str] = (), format: str | None = None
                    ) -> dict[str, Any]:
        """Begin a named recording at the live head; returns its description.

        Raises:
            ValueError: Bad prefixes or format.
            RecordingLimit: `max_active` recordings are running.
            RuntimeError: The recordings task is not running.
        """
        if self._nursery is None:
            raise RuntimeError("recordings are not running")
        fmt = _audio_format(format or self.config.format)
        if len(self._active) >= self.config.max_active:
            self.stats.refused += 1
            raise RecordingLimit(f"{len(self._active)} recordings are running; at most "
                                 f"{self.config.max_active} at once (recordings.max_active)")
        ring = self.ring
        now = ring.index_to_utc(ring.head) if ring.head else self.clock.utc()
        rec_id = new_segment_id(now)
        key = self.key_builder.build(*prefixes, rec_id) if prefixes else rec_id
        encoder = _make_encoder(fmt, ring.rate, ring.channels, self.layout, self.options)
        path = self.work_dir / f"{rec_id}.{FORMAT_INFO[fmt][0]}"
        recording = _FileRecording(ring, ring.head, path, encoder, name=f"recording:{rec_id}",
                                   limiter=self._limiter,
                                   max_frames=round(self.config.max_seconds * ring.rate))
        active = _Active(key, rec_id, fmt, recording, iso_utc(now))
        self._active[key] = active
        self.stats.started += 1
        self.stats.active = len(self._active)
        try:
            await self._nursery.start(self._record, active)
        except BaseException:
            self._active.pop(key, None)
            self.stats.active = len(self._active)
            raise
        log.info("recording started key=%s format=%s", key, fmt)
        return self._describe_active(active)

    async def _record(self, active: _Active, task_status: TaskStatus) -> None:
        """Record, then seal, shielded from the agent's shutdown (see `run`)."""
        with active.scope:
            await active.recording.run(task_status=task_status)
            await self._seal(active)
        if active.scope.cancelled_caught:
            self._forget(active)

    async def _seal(self, active: _Active) -> None:
        rec = active.recording
        try:
            if rec.auto_stopped:
                self.stats.auto_stopped += 1
            self.stats.lost_frames += rec.lost_frames
            if rec.error is not None:
                raise rec.error
            assert rec.stop_index is not None
            if rec.frames == 0:
                raise RuntimeError("the recording holds no audio (stopped before any frame "
                                   "was captured)")
            start_utc, start_mono, _, end_mono = rec.times()
            fmt = active.format
            bitrate = (self.options.opus_bitrate if fmt is AudioFormat.OPUS else
                       (self.options.mp3_kbps or 0) * 1000 if fmt is AudioFormat.MP3 else None)
            active.meta = await trio.to_thread.run_sync(
                lambda: self.spool.publish_file(
                    rec.path, fmt=fmt.value, start_ts=start_utc, mono_start=start_mono,
                    mono_end=end_mono, frames=rec.frames, rate=self.ring.rate,
                    channels=self.ring.channels, sample_format=self.layout.sample_format,
                    clock_synced=self.ring.anchor_at(rec.start).synced,
                    segment_id=active.id, recording=active.key, bitrate=bitrate,
                    gaps=rec.gap_notes()),
                limiter=self._limiter)
            self.stats.sealed += 1
            log.info("recording sealed key=%s id=%s seconds=%.3f", active.key, active.id,
                     rec.frames / self.ring.rate)
        except Exception as exc:
            self.stats.failed += 1
            active.error = f"{type(exc).__name__}: {exc}"
            self._failed[active.key] = active.error
            while len(self._failed) > 1000:
                self._failed.pop(next(iter(self._failed)))
            log.error("recording not sealed key=%s error=%r", active.key, active.error)
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(lambda: rec.path.unlink(missing_ok=True))
        finally:
            self._forget(active)

    def _forget(self, active: _Active) -> None:
        self._active.pop(active.key, None)
        self.stats.active = len(self._active)
        active.finished.set()

    def _check(self, key: str) -> None:
        check_key(key)
        if not is_segment_id(key.rsplit("/", 1)[-1]):
            raise ValueError(f"recording key {key!r}: expected <prefixes>/<id>, the id like "
                             "20261124T053000.000Z-3f9a1c2b")

    def _find_sealed(self, key: str) -> tuple[SegmentMeta, SegmentState] | None:
        found = self.spool.get(key.rsplit("/", 1)[-1])
        if found is None or found[0].recording != key:
            return None
        return found

    async def stop(self, key: str) -> dict[str, Any]:
        """End recording `key`, seal it into the spool; returns its description.

        Raises:
            ValueError: A malformed key.
            KeyError: No such recording.
            RecordingConflict: It was stopped already (or stopped by itself).
            RuntimeError: Sealing it failed (the message says why).
        """
        self._check(key)
        active = self._active.get(key)
        if active is None:
            if self._find_sealed(key) is not None or key in self._failed:
                raise RecordingConflict(f"recording {key!r} is already stopped")
            raise KeyError(key)
        if active.recording.stop_index is not None:
            raise RecordingConflict(f"recording {key!r} is already stopping")
        active.recording.request_stop(self.ring.head)
        await active.finished.wait()
        if active.meta is None:
            raise RuntimeError(f"recording {key!r} could not be sealed: {active.error}")
        return self._describe_sealed(active.meta, SegmentState.SEALED)

    def list(self) -> builtins.list[dict[str, Any]]:
        """Running recordings first, then sealed ones (newest first)."""
        out = [self._describe_active(a) for a in self._active.values()]
        out.extend(self._describe_sealed(meta, state) for meta, state in self.spool.list()
                   if meta.recording)
        return out

    def _describe_active(self, active: _Active) -> dict[str, Any]:
        rec = active.recording
        return {"key": active.key, "id": active.id, "state": "recording",
                "format": active.format.value, "start_utc": active.started_utc,
                "seconds": round(rec.frames / self.ring.rate, 3)}

    def _describe_sealed(self, meta: SegmentMeta, state: SegmentState) -> dict[str, Any]:
        return {"key": meta.recording, "id": meta.id, "state": state.value,
                "format": meta.format,
                "start_utc": meta.start_utc, "end_utc": meta.end_utc,
                "seconds": round(meta.seconds, 3), "bytes": meta.bytes, "sha256": meta.sha256,
                "content_type": meta.content_type}


def _error(status: int, message: str, parameter: str | None = None, *,
           headers: Mapping[str, str] | None = None) -> Response:
    """The device API's error body: what is wrong and, if one, which parameter."""
    body: dict[str, str] = {"error": message}
    if parameter is not None:
        body["parameter"] = parameter
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def recording_routes(recordings: Callable[[], AgentRecordings | None]) -> builtins.list[Route]:
    """Device API routes for recordings on demand (mounted by `api.py`).

    ``POST /v1/recordings?prefix=a&prefix=b&format=opus`` (both optional; the
    device API takes no request bodies) starts one: 201 and its description
    (``key``, ``id``, ...); 429 when `max_active` are running.
    ``POST /v1/recordings/{key}/stop`` ends it: 200 and the sealed description;
    400 for a malformed key, 404 for an unknown one, 409 when already stopped.
    ``GET /v1/recordings`` lists running and sealed recordings. 503 when the
    agent runs without recordings (no spool).
    """

    def component() -> AgentRecordings | Response:
        rec = recordings()
        if rec is None:
            return _error(503, "recordings are not enabled (they need segments.enabled)")
        return rec

    async def start(request: Request) -> Response:
        rec = component()
        if isinstance(rec, Response):
            return rec
        params = request.query_params
        unknown = sorted(set(params) - {"prefix", "format"})
        if unknown:
            return _error(400, f"unknown parameter {unknown[0]!r}; expected prefix (repeatable) "
                               "and format", unknown[0])
        formats = params.getlist("format")
        if len(formats) > 1:
            return _error(400, "format: expected once", "format")
        fmt = formats[0] if formats else None
        if fmt is not None and fmt not in {f.value for f in AudioFormat}:
            return _error(400, f"format {fmt!r}: expected one of "
                               f"{', '.join(f.value for f in AudioFormat)}", "format")
        try:
            info = await rec.start(params.getlist("prefix"), fmt)
        except ValueError as exc:
            return _error(400, str(exc), "prefix")
        except RecordingLimit as exc:
            return _error(429, str(exc), headers={"Retry-After": "10"})
        except RuntimeError as exc:
            return _error(503, str(exc), headers={"Retry-After": "5"})
        return JSONResponse(info, status_code=201)

    async def stop(request: Request) -> Response:
        rec = component()
        if isinstance(rec, Response):
            return rec
        key = str(request.path_params["key"])
        try:
            info = await rec.stop(key)
        except ValueError as exc:
            return _error(400, str(exc), "key")
        except KeyError:
            return _error(404, f"no recording {key!r}", "key")
        except RecordingConflict as exc:
            return _error(409, str(exc))
        except RuntimeError as exc:
            return _error(500, str(exc))
        return JSONResponse(info)

    async def listing(request: Request) -> Response:
        rec = component()
        if isinstance(rec, Response):
            return rec
        return JSONResponse(rec.list())

    return [
        Route("/v1/recordings", listing, methods=["GET"]),
        Route("/v1/recordings", start, methods=["POST"]),
        Route("/v1/recordings/{key:path}/stop", stop, methods=["POST"]),
    ]

