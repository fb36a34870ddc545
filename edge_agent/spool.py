"""The durable spool: wall-clock aligned segments on local disk until the backend has them.

This is the part of the agent that must never lose audio, so every step is ordered
for crashes and power cuts:

* The **segmenter** (a supervised Trio task) reads the ring from its own cursor and
  encodes segments of ``segments.seconds`` aligned to multiples of that length on the
  wall clock (the first one is partial). Pages are appended to ``tmp/<id>/audio.*``
  as the encoder produces them and fsynced every ``segments.fsync_seconds``.
* **Sealing** publishes audio and metadata together with one rename::

      tmp/<id>/{open.json, audio.*}       while recording (open.json: what recovery needs)
      tmp/<id>/{meta.json, audio.*}       audio fsynced, meta written and fsynced
      sealed/<id>/                        rename, then fsync of both parent directories

  A segment is listed (and uploaded) only once it sits in ``sealed/``. State changes
  are renames too: ``sealed/<id>`` -> ``synced/<id>`` (the uploader's acknowledgement)
  or -> ``quarantine/<id>`` with a ``reason.txt`` (never uploaded). Deletion renames
  into ``trash/`` first, so a crash never leaves half a segment in a listed state.
* **Recovery** (once at start) seals whatever a crash left in ``tmp/``: complete seals
  are finished; otherwise the audio is salvaged up to its last complete, CRC-valid
  Ogg page (Opus, Ogg FLAC) or last whole frame (WAV) and sealed with
  ``recovered=True``; nothing salvageable is removed; anything unreadable goes to
  quarantine with a reason.
* **Quota**: ``max_spool_mb`` and ``min_free_mb`` bound the spool. Synced segments go
  first (expired ones after ``retain_synced_hours`` regardless), then quarantined ones,
  and unsynced audio only when it alone exceeds the quota, oldest first, each such
  eviction logged and counted as loss.

Decisions worth knowing:

* A capture gap inside a segment does not cut it: the audio continues after the gap
  and the gap is listed in ``meta.gaps`` (so ``end_ts - start_ts`` may exceed
  ``frames / rate``). A wall-clock *step* does cut it, so each segment has one
  consistent time mapping and its id matches its start time; the step is noted in the
  ``clock_steps`` of the segment it starts.
* FLAC is written as Ogg FLAC (``audio/ogg; codecs=flac``, ``.oga``) with libFLAC's
  own encoder (bound by pyogg, no extra dependency): in an Ogg container a file cut by
  a crash is salvaged exactly like Opus, page by page with CRCs. WAV has no checksums,
  so after each fsync its header is patched with the length that fsync made durable,
  and recovery keeps only that much: a torn tail is never sealed as audio.
* What a crash costs: Opus, the page the encoder was filling (<= 1 s), plus after a
  power cut what came since the last fsync; Ogg FLAC, one ~4 KB page (seconds of
  near-silence compress into one page) plus the 4096-sample frame being filled; WAV,
  up to one fsync interval, two after a power cut. Gaps inside a segment salvaged by
  recovery are not known (its end time is computed from the frames it holds).
* Out of space (ENOSPC, EDQUOT) while a segment is open: the segment is set aside as
  it is, the quota is enforced (synced audio goes first), and once there is room it is
  salvaged like a crashed one and recording goes on from its first missing frame, which
  the ring still holds. Any other error (EIO, EROFS, a failed fsync, which is never
  retried on the same descriptor) abandons the file and writes the segment again from
  the ring after a backoff. Either way, audio the ring no longer holds by then is
  counted as lost, and the spool reports itself degraded meanwhile. At shutdown a
  segment that cannot be sealed is left in ``tmp/`` for the next start's recovery.
* ``bytes_used`` counts the audio bytes of sealed, synced and quarantined segments;
  metadata files (~1 KB each) and the one open segment are not counted.

Everything that touches the disk goes through :class:`FileOps`, so tests can make any
single call fail or "kill the process" at that point. The synchronous core
(:class:`Spool`, :class:`SegmentWriter`) needs no Trio; :class:`Segmenter` moves data
from the ring to it in worker threads.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import logging
import math
import os
import re
import secrets
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import msgspec
import numpy as np
import trio
from numpy.typing import NDArray

from .audio.flac import FlacError, OggFlacEncoder
from .audio.opus import OggOpusEncoder, OpusError, decode_ogg_opus, last_complete_page_end
from .audio.pcm import (
    WAV_HEADER_BYTES,
    SampleFormat,
    from_float32,
    to_float32,
    wav_header,
    wav_size_patches,
)
from .clock import Clock, iso_utc
from .config import SegmentsConfig
from .errors import EdgeAgentError
from .fs import FileOps
from .ring import AudioRing, RingReader
from .supervisor import Backoff, TaskStatus
from .wire import ClockStepNote, GapNote, SegmentMeta, SegmentState, is_segment_id, new_segment_id

__all__ = [
    "ClockStepNote",
    "GapNote",
    "RecoveryReport",
    "SegmentMeta",
    "SegmentState",
    "SegmentWriter",
    "Segmenter",
    "SegmenterStats",
    "Spool",
    "SpoolStats",
    "is_segment_id",
    "new_segment_id",
]

log = logging.getLogger(__name__)

_FORMATS: Final = {
    # format: (audio file name, Content-Type)
    "opus": ("audio.opus", "audio/ogg; codecs=opus"),
    "flac": ("audio.oga", "audio/ogg; codecs=flac"),
    "wav": ("audio.wav", "audio/wav"),
    # Only recordings cut by recorder.AgentRecordings (published with publish_file).
    "mp3": ("audio.mp3", "audio/mpeg"),
    "pcm": ("audio.pcm", "application/octet-stream"),
}
_OPEN_JSON: Final = "open.json"
_META_JSON: Final = "meta.json"
_REASON_TXT: Final = "reason.txt"
_TMP, _SEALED, _SYNCED, _QUARANTINE, _TRASH = "tmp", "sealed", "synced", "quarantine", "trash"
_MB: Final = 1024 * 1024
_HASH_CHUNK: Final = 1 << 20
_META_VERSION: Final = 1


def _check_id(segment_id: str) -> None:
    if not is_segment_id(segment_id):
        raise ValueError(
            f"bad segment id {segment_id!r}; expected e.g. 20261124T053000.000Z-3f9a1c2b"
        )


# ----------------------------------------------------------------------------
# Metadata


class SegmentHeader(msgspec.Struct, frozen=True, kw_only=True):
    """``tmp/<id>/open.json``: what recovery needs to seal a segment cut short."""

    id: str
    device: str
    start_ts: float
    mono_start: float
    rate: int
    channels: int
    format: str
    content_type: str
    sample_format: str
    clock_synced: bool
    created_at: str
    bitrate: int | None = None
    gaps: list[GapNote] = []
    clock_steps: list[ClockStepNote] = []
    recording: str = ""
    version: int = _META_VERSION


_STATE_DIRS: Final = {
    SegmentState.SEALED: _SEALED,
    SegmentState.SYNCED: _SYNCED,
    SegmentState.QUARANTINED: _QUARANTINE,
}


@dataclass
class SpoolStats:
    """Counters for metrics (since this process started) and current sizes."""

    segments_sealed: int = 0  # including those sealed by salvaging (segments_recovered)
    segments_recovered: int = 0
    segments_synced: int = 0
    segments_quarantined: int = 0
    # Temp segments with nothing salvageable (crash right after opening one).
    segments_discarded: int = 0
    evicted_synced: int = 0
    evicted_expired: int = 0
    evicted_quarantined: int = 0
    evicted_unsynced: int = 0
    evicted_unsynced_seconds: float = 0.0
    evicted_unsynced_bytes: int = 0
    # Sealed files whose bytes no longer match their digest (bit rot, truncation).
    integrity_failures: int = 0
    disk_errors: int = 0
    fsync_failures: int = 0
    # Current sizes.
    bytes_used: int = 0
    pending_segments: int = 0
    pending_bytes: int = 0
    synced_segments: int = 0
    quarantined_segments: int = 0


@dataclass
class RecoveryReport:
    """What :meth:`Spool.recover` found and did."""

    sealed: int = 0
    synced: int = 0
    quarantined: int = 0
    completed: list[str] = field(default_factory=list)  # seals a crash interrupted
    recovered: list[str] = field(default_factory=list)  # salvaged, recovered=True
    recovered_seconds: float = 0.0
    discarded: list[str] = field(default_factory=list)  # nothing salvageable
    newly_quarantined: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    trash_removed: int = 0
    left_in_tmp: list[str] = field(default_factory=list)  # disk errors; retried next start


class SpoolError(EdgeAgentError):
    """A segment cannot be written or sealed (not a disk error: misuse or bad audio)."""


# ----------------------------------------------------------------------------
# Encoders: each turns PCM blocks into bytes to append, and salvages a cut file.


class _Encoder(Protocol):
    def start(self) -> bytes: ...
    def write(self, pcm: NDArray[Any]) -> bytes: ...
    def flush(self) -> bytes: ...
    def finish(self) -> tuple[bytes, list[tuple[int, bytes]]]:
        """The last bytes to append, and (offset, bytes) patches to apply after."""
        ...
    def after_sync(self, durable_bytes: int) -> list[tuple[int, bytes]]:
        """Patches recording that the file's first ``durable_bytes`` are on disk."""
        ...
    def close(self) -> None: ...


class _OpusEncoder:
    def __init__(self, rate: int, channels: int, bitrate: int, tags: dict[str, str]) -> None:
        self._enc = OggOpusEncoder(rate, channels, bitrate=bitrate, application="audio",
                                   comments=tags)

    def start(self) -> bytes:
        return self._enc.flush()

    def write(self, pcm: NDArray[Any]) -> bytes:
        if pcm.dtype not in (np.int16, np.float32):
            pcm = to_float32(pcm)
        return self._enc.write(pcm)

    def flush(self) -> bytes:
        return self._enc.flush()

    def finish(self) -> tuple[bytes, list[tuple[int, bytes]]]:
        return self._enc.finish(), []

    def after_sync(self, durable_bytes: int) -> list[tuple[int, bytes]]:
        return []  # Ogg pages carry CRCs: recovery finds the intact ones itself

    def close(self) -> None:
        self._enc.close()


def _wav_layout(sample_format: SampleFormat) -> tuple[int, np.dtype[Any]]:
    """Sample width in bytes and little-endian dtype WAV segments use."""
    if sample_format is SampleFormat.INT16:
        return 2, np.dtype("<i2")
    return 4, np.dtype("<i4")  # int32 as is; float as 32-bit integer PCM


class _WavEncoder:
    """Plain PCM WAV whose header sizes say how much of the data is durable.

    WAV has no checksums, so after a power cut a torn tail (zeros, stale blocks)
    cannot be told from audio. After each fsync the header is patched with the
    length that fsync made durable (the next fsync makes the patch durable), and
    recovery keeps only that much: a crash costs at most one more fsync interval,
    and no torn tail is ever sealed. At seal the sizes are final.
    """

    def __init__(self, rate: int, channels: int, sample_format: SampleFormat) -> None:
        self._rate, self._channels, self._format = rate, channels, sample_format
        self._width, self._dtype = _wav_layout(sample_format)

    def start(self) -> bytes:
        return wav_header(self._rate, self._channels, self._width, 0)

    def write(self, pcm: NDArray[Any]) -> bytes:
        if self._format is SampleFormat.FLOAT32:
            pcm = from_float32(to_float32(pcm), SampleFormat.INT32)
        return np.ascontiguousarray(pcm, dtype=self._dtype).tobytes()

    def flush(self) -> bytes:
        return b""

    def finish(self) -> tuple[bytes, list[tuple[int, bytes]]]:
        # The final sizes come from after_sync, once the data is durable: written
        # before that fsync they could reach the disk ahead of the data they count.
        return b"", []

    def after_sync(self, durable_bytes: int) -> list[tuple[int, bytes]]:
        data = max(0, durable_bytes - WAV_HEADER_BYTES)
        return wav_size_patches(data)

    def close(self) -> None:
        pass


def _make_encoder(fmt: str, rate: int, channels: int, sample_format: SampleFormat,
                  bitrate: int, tags: dict[str, str]) -> _Encoder:
    if fmt == "opus":
        return _OpusEncoder(rate, channels, bitrate, tags)
    if fmt == "flac":
        return OggFlacEncoder(rate, channels, sample_format)
    if fmt == "wav":
        return _WavEncoder(rate, channels, sample_format)
    raise SpoolError(f"unknown segment format {fmt!r}; expected one of {sorted(_FORMATS)}")


@dataclass(frozen=True)
class _Salvage:
    keep_bytes: int  # cut the file here
    frames: int  # frames at the segment's rate held in what is kept
    patches: list[tuple[int, bytes]]  # (offset, bytes) to write after cutting


class _Unsalvageable(Exception):
    """The file is not what its header says (goes to quarantine with this reason)."""


def _ogg_granules(data: memoryview, end: int) -> Iterator[int]:
    """Granule positions of the pages in ``data[:end]`` (pages already CRC-checked)."""
    pos = 0
    while pos < end:
        granule = int.from_bytes(data[pos + 6 : pos + 14], "little", signed=True)
        nsegs = data[pos + 26]
        body = sum(data[pos + 27 : pos + 27 + nsegs])
        pos += 27 + nsegs + body
        yield granule


def _salvage(data: memoryview, header: SegmentHeader) -> _Salvage:
    """Work out how much of a cut segment file is intact audio."""
    if header.format in ("opus", "flac"):
        end = last_complete_page_end(data)
        if end == 0:
            if len(data) == 0 or not any(data[:4096]):
                return _Salvage(0, 0, [])
            raise _Unsalvageable("not an Ogg stream (no valid first page)")
        audio_granules = [g for g in _ogg_granules(data, end) if g > 0]
        if not audio_granules:
            return _Salvage(0, 0, [])
        if header.format == "flac":
            # Ogg FLAC granules count samples at the stream rate.
            return _Salvage(end, max(audio_granules), [])
        try:
            decoded = decode_ogg_opus(data[:end])
        except OpusError as exc:
            raise _Unsalvageable(f"Opus pages do not decode: {exc}") from exc
        frames = round(decoded.pcm.shape[0] * header.rate / decoded.rate)
        return _Salvage(end, frames, [])
    if header.format == "wav":
        if len(data) < WAV_HEADER_BYTES:
            return _Salvage(0, 0, [])
        tags = (bytes(data[:4]), bytes(data[8:12]), bytes(data[36:40]))
        if tags != (b"RIFF", b"WAVE", b"data"):
            raise _Unsalvageable("not the WAV header this spool writes")
        channels, rate = struct.unpack("<HI", data[22:28])
        (bits,) = struct.unpack("<H", data[34:36])
        if channels != header.channels or rate != header.rate:
            raise _Unsalvageable(f"WAV header says {channels} ch at {rate} Hz, "
                                 f"open.json {header.channels} ch at {header.rate} Hz")
        block = channels * (bits // 8)
        (durable,) = struct.unpack("<I", data[40:44])  # see _WavEncoder
        frames = min(len(data) - WAV_HEADER_BYTES, durable) // block
        if frames == 0:
            return _Salvage(0, 0, [])
        keep = WAV_HEADER_BYTES + frames * block
        return _Salvage(keep, frames, wav_size_patches(keep - WAV_HEADER_BYTES))
    raise _Unsalvageable(f"unknown format {header.format!r}")


# ----------------------------------------------------------------------------
# The synchronous core


def _encode_json(obj: msgspec.Struct) -> bytes:
    return msgspec.json.format(msgspec.json.encode(obj), indent=2) + b"\n"


class SegmentWriter:
    """One segment being recorded into ``tmp/<id>/``; made by :meth:`Spool.open_segment`.

    Not thread-safe: one thread at a time (the segmenter's worker).
    """

    def __init__(self, spool: Spool, header: SegmentHeader, encoder: _Encoder,
                 fsync_seconds: float) -> None:
        self.spool = spool
        self.header = header
        self.id = header.id
        self.dir = spool.root / _TMP / header.id
        self.audio = self.dir / _FORMATS[header.format][0]
        self.frames = 0
        self.bytes = 0
        self.unsynced = False
        self._enc = encoder
        self._fd: int | None = None
        self._fsync_failed = False
        self._fsync_seconds = fsync_seconds
        self._last_sync: float | None = None
        self._durable_marks: list[tuple[int, bytes]] = []
        self.published = False  # renamed into sealed/ (maybe not yet durable)
        self.closed = False

    def _append(self, data: bytes) -> None:
        if not data:
            return
        if self._fd is None:
            raise SpoolError(f"segment {self.id} is not open")
        self.spool.fs.write(self._fd, data, str(self.audio))
        self.bytes += len(data)
        self.unsynced = True

    def _open(self, now: float) -> None:
        fs = self.spool.fs
        self._fd = fs.create(self.audio)
        self._append(self._enc.start())
        self.sync(now)

    def write(self, pcm: NDArray[Any], now: float) -> None:
        """Encode ``pcm`` and append the bytes produced; fsync when one is due.

        ``now`` is a monotonic time in seconds (Trio's clock in the agent).
        """
        if len(pcm):
            self._append(self._enc.write(pcm))
            self.frames += int(pcm.shape[0])
        if self._last_sync is None or now - self._last_sync >= self._fsync_seconds:
            self.sync(now)

    def sync(self, now: float, *, flush_encoder: bool = False) -> None:
        """Make everything appended so far durable.

        An fsync that failed is never retried on the same descriptor: the kernel may
        already have dropped the pages it could not write, so a second fsync would
        report success for data that is gone. The segment must be abandoned.
        """
        if flush_encoder:
            self._append(self._enc.flush())
        if self._fsync_failed:
            raise OSError(errno.EIO, f"an earlier fsync of segment {self.id} failed")
        if self._fd is None:
            raise SpoolError(f"segment {self.id} is not open")
        if self.unsynced or self._last_sync is None:
            try:
                self.spool.fs.fsync(self._fd, str(self.audio))
            except OSError:
                self._fsync_failed = True
                self.spool._count_fsync_failure()
                raise
            self.unsynced = False
            patches = self._enc.after_sync(self.bytes)
            if patches and patches != self._durable_marks:
                for offset, data in patches:
                    self.spool.fs.pwrite(self._fd, data, offset, str(self.audio))
                self._durable_marks = patches
                self.unsynced = True  # the marks themselves become durable next time
        self._last_sync = now

    def _finish_audio(self) -> None:
        fs = self.spool.fs
        if self._fd is None or self.closed:
            raise SpoolError(f"segment {self.id} is not open (an earlier seal failed)")
        tail, patches = self._enc.finish()
        self._append(tail)
        assert self._fd is not None
        for offset, data in patches:
            fs.pwrite(self._fd, data, offset, str(self.audio))
            self.unsynced = True
        self.sync(self._last_sync or 0.0)
        if self.unsynced:  # marks of what the sync made durable (WAV sizes)
            self.sync(self._last_sync or 0.0)
        fd, self._fd = self._fd, None
        fs.close(fd, str(self.audio))

    def close(self) -> None:
        """Release the descriptor and encoder without syncing (after a failure)."""
        self.closed = True
        self._enc.close()
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class _Entry:
    __slots__ = ("bytes", "meta", "state")

    def __init__(self, meta: SegmentMeta | None, state: SegmentState, nbytes: int) -> None:
        self.meta = meta
        self.state = state
        self.bytes = nbytes


class Spool:
    """Sealed segments on disk, their states, recovery and quota.

    The methods are synchronous and thread-safe (one lock orders state changes);
    the agent calls the ones that touch the disk through ``trio.to_thread``.
    :meth:`wait_pending` is the one async method.

    Args:
        root: The spool directory (``<data_dir>/spool``).
        device_id: Recorded in every segment.
        config: The ``[segments]`` section.
        clock: Wall clock for ``created_at``/``sealed_at`` and retention.
        fs: The file-operations layer (a faulty one in tests).
    """

    def __init__(self, root: Path, *, device_id: str, config: SegmentsConfig, clock: Clock,
                 fs: FileOps | None = None) -> None:
        self.root = Path(root)
        self.device_id = device_id
        self.config = config
        self.clock = clock
        self.fs = fs or FileOps()
        self.stats = SpoolStats()
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self._lot = trio.lowlevel.ParkingLot()
        self._token: trio.lowlevel.TrioToken | None = None
        self._disk_error: str | None = None
        self._loss_note: str | None = None
        self.recovered = False

    # -- health --------------------------------------------------------------

    @property
    def degraded_reason(self) -> str | None:
        """Why the spool is not healthy now, or None: a disk error not yet overcome,
        or unsynced audio evicted by the last quota check."""
        return self._disk_error or self._loss_note

    @property
    def healthy(self) -> bool:
        return self.degraded_reason is None

    def note_disk_error(self, exc: BaseException, doing: str) -> None:
        """Record a failed disk operation (health turns degraded until `clear_disk_error`)."""
        with self._lock:
            self.stats.disk_errors += 1
            if isinstance(exc, OSError):
                name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                prefix = {"ENOSPC": "disk full", "EDQUOT": "disk quota exceeded",
                          "EROFS": "file system read-only"}.get(name, "disk error")
                self._disk_error = f"{prefix}: {name} {doing}: {exc.strerror or exc}"
            else:
                self._disk_error = f"cannot write segments: {doing}: {exc}"

    def clear_disk_error(self) -> None:
        with self._lock:
            if self._disk_error is not None:
                log.info("spool disk ok again after=%r", self._disk_error)
            self._disk_error = None

    def _count_fsync_failure(self) -> None:
        with self._lock:
            self.stats.fsync_failures += 1

    # -- paths -----------------------------------------------------------------

    def _dir(self, state: SegmentState, name: str) -> Path:
        return self.root / _STATE_DIRS[state] / name

    def audio_path(self, segment_id: str) -> Path:
        """Where the segment's audio is now (it moves when its state changes).

        Raises:
            ValueError: Malformed id.
            KeyError: No such segment.
        """
        _check_id(segment_id)
        with self._lock:
            entry = self._entries.get(segment_id)
            if entry is None or entry.meta is None:
                raise KeyError(segment_id)
            return self._dir(entry.state, segment_id) / _FORMATS[entry.meta.format][0]

    # -- recording -------------------------------------------------------------

    def open_segment(self, *, start_ts: float, mono_start: float, rate: int, channels: int,
                     sample_format: SampleFormat | str, clock_synced: bool,
                     gaps: Sequence[GapNote] = (), clock_steps: Sequence[ClockStepNote] = (),
                     segment_id: str | None = None, now: float = 0.0) -> SegmentWriter:
        """Start a segment in ``tmp/``: ``open.json`` and the audio file's first bytes,
        both durable before this returns.

        ``segment_id`` reuses an id (rewriting a segment whose first attempt failed),
        so a leftover of that attempt can never surface as a second segment.
        """
        fmt = self.config.format
        sfmt = SampleFormat(sample_format)
        seg_id = segment_id or new_segment_id(start_ts)
        _check_id(seg_id)
        header = SegmentHeader(
            id=seg_id, device=self.device_id, start_ts=start_ts, mono_start=mono_start,
            rate=rate, channels=channels, format=fmt, content_type=_FORMATS[fmt][1],
            sample_format=sfmt.value, clock_synced=clock_synced,
            created_at=iso_utc(self.clock.utc()),
            bitrate=self.config.bitrate if fmt == "opus" else None,
            gaps=list(gaps), clock_steps=list(clock_steps),
        )
        tags = {"ENCODER": "edge-agent", "DEVICE": self.device_id, "SEGMENT": seg_id,
                "DATE": iso_utc(start_ts)}
        encoder = _make_encoder(fmt, rate, channels, sfmt, self.config.bitrate, tags)
        writer = SegmentWriter(self, header, encoder, self.config.fsync_seconds)
        fs = self.fs
        tmp = self.root / _TMP
        try:
            if fs.exists(writer.dir):
                self._discard(writer.dir)
            fs.makedirs(writer.dir)
            self._write_file(writer.dir / _OPEN_JSON, _encode_json(header))
            writer._open(now)
            fs.fsync_dir(writer.dir)
            fs.fsync_dir(tmp)
        except Exception:
            self.abort(writer)
            raise
        except BaseException:
            writer.close()
            raise
        log.debug("segment opened id=%s format=%s", seg_id, fmt)
        return writer

    def _write_file(self, path: Path, data: bytes) -> None:
        """Create ``path`` with ``data``, durable (fsync) before returning."""
        fs = self.fs
        fd = fs.create(path)
        try:
            fs.write(fd, data, str(path))
            fs.fsync(fd, str(path))
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        fs.close(fd, str(path))

    def seal(self, seg: SegmentWriter, *, mono_end: float | None = None,
             gaps: Sequence[GapNote] = (),
             clock_steps: Sequence[ClockStepNote] = ()) -> SegmentMeta:
        """Finish the audio and publish audio and metadata together.

        ``mono_end`` is the monotonic time just after the last frame (by default the
        start plus the frames written plus the gaps). On any error the segment is
        not sealed: call :meth:`abort` and write it again.

        Raises:
            SpoolError: The segment holds no audio (abort it instead).
            OSError: A disk operation failed.
        """
        if seg.frames == 0:
            raise SpoolError(f"segment {seg.id} holds no audio; abort it instead")
        h = seg.header
        all_gaps = [*h.gaps, *gaps]
        if mono_end is None:
            holes = sum(g.seconds for g in all_gaps if g.frame > 0)
            mono_end = h.mono_start + seg.frames / h.rate + holes
        seg._finish_audio()
        return self._publish(seg.dir, h, frames=seg.frames, mono_end=mono_end, gaps=all_gaps,
                             clock_steps=[*h.clock_steps, *clock_steps], recovered=False,
                             writer=seg)

    def _publish(self, src: Path, h: SegmentHeader, *, frames: int, mono_end: float,
                 gaps: list[GapNote], clock_steps: list[ClockStepNote], recovered: bool,
                 writer: SegmentWriter | None = None) -> SegmentMeta:
        fs = self.fs
        audio_name, content_type = _FORMATS[h.format]
        size, digest = fs.sha256(src / audio_name)
        end_ts = h.start_ts + (mono_end - h.mono_start)
        meta = SegmentMeta(
            id=h.id, device=h.device, start_utc=iso_utc(h.start_ts), end_utc=iso_utc(end_ts),
            start_ts=h.start_ts, end_ts=end_ts, mono_start=h.mono_start, mono_end=mono_end,
            frames=frames, rate=h.rate, channels=h.channels, format=h.format,
            content_type=content_type, bytes=size, sha256=digest, clock_synced=h.clock_synced,
            gaps=gaps, clock_steps=clock_steps, recovered=recovered, created_at=h.created_at,
            sealed_at=iso_utc(self.clock.utc()), bitrate=h.bitrate,
            sample_format=h.sample_format, recording=h.recording,
        )
        self._write_file(src / _META_JSON, _encode_json(meta))
        fs.unlink(src / _OPEN_JSON)
        fs.fsync_dir(src)
        dst = self._dir(SegmentState.SEALED, h.id)
        with self._lock:
            fs.rename(src, dst)
            if writer is not None:
                writer.published = True
            fs.fsync_dir(dst.parent)
            fs.fsync_dir(src.parent)
            self._entries[h.id] = _Entry(meta, SegmentState.SEALED, size)
            self.stats.segments_sealed += 1
            if recovered:
                self.stats.segments_recovered += 1
            self._update_sizes()
        log.info("segment sealed id=%s seconds=%.3f bytes=%d recovered=%s", h.id,
                 meta.seconds, size, recovered)
        self._wake()
        return meta

    def publish_file(self, audio: Path, *, fmt: str, start_ts: float, mono_start: float,
                     mono_end: float, frames: int, rate: int, channels: int,
                     sample_format: SampleFormat | str, clock_synced: bool,
                     segment_id: str | None = None, recording: str = "",
                     bitrate: int | None = None, gaps: Sequence[GapNote] = ()) -> SegmentMeta:
        """Seal an audio file encoded outside the segmenter (a recording cut from the
        ring), moving it in: ``tmp/<id>/`` gets the file (fsynced), then it is sealed
        like any segment and queued for upload. ``audio`` must be on the spool's file
        system. A crash before the seal leaves ``tmp/<id>/`` without ``open.json``,
        which recovery quarantines (the audio is kept, never uploaded half-known).

        Raises:
            SpoolError: Unknown format or no audio.
            OSError: A disk operation failed (the file stays where it was if the move
                did not happen).
        """
        if fmt not in _FORMATS:
            raise SpoolError(f"unknown format {fmt!r}; expected one of {sorted(_FORMATS)}")
        if frames <= 0:
            raise SpoolError(f"recording {audio.name} holds no audio")
        seg_id = segment_id or new_segment_id(start_ts)
        _check_id(seg_id)
        header = SegmentHeader(
            id=seg_id, device=self.device_id, start_ts=start_ts, mono_start=mono_start,
            rate=rate, channels=channels, format=fmt, content_type=_FORMATS[fmt][1],
            sample_format=SampleFormat(sample_format).value, clock_synced=clock_synced,
            created_at=iso_utc(self.clock.utc()), bitrate=bitrate, recording=recording,
        )
        fs = self.fs
        src = self.root / _TMP / seg_id
        fs.makedirs(src)
        fd = fs.open_rw(audio)
        try:
            fs.fsync(fd, str(audio))
        finally:
            fs.close(fd, str(audio))
        fs.rename(audio, src / _FORMATS[fmt][0])
        fs.fsync_dir(src)
        fs.fsync_dir(src.parent)
        return self._publish(src, header, frames=frames, mono_end=mono_end, gaps=list(gaps),
                             clock_steps=[], recovered=False)

    def abort(self, seg: SegmentWriter) -> None:
        """Drop a segment that could not be written or sealed (best effort, never raises
        an OSError: whatever stays behind is cleaned up by the next recovery)."""
        seg.close()
        paths = [seg.dir]
        if seg.published:
            # Renamed into sealed/ but not durably: not listed, so drop it too.
            paths.append(self._dir(SegmentState.SEALED, seg.id))
        for path in paths:
            try:
                if self.fs.exists(path):
                    self._discard(path)
            except OSError as exc:
                log.warning("cannot remove abandoned segment path=%s error=%r", path, exc)

    def _discard(self, path: Path) -> None:
        """Remove a segment directory: rename into trash/ (atomic), then delete."""
        trash = self.root / _TRASH / f"{path.name}.{secrets.token_hex(4)}"
        self.fs.rename(path, trash)
        self.fs.rmtree(trash)

    # -- states ------------------------------------------------------------------

    def _move(self, segment_id: str, entry: _Entry, to: SegmentState) -> None:
        src = self._dir(entry.state, segment_id)
        dst = self._dir(to, segment_id)
        self.fs.rename(src, dst)
        entry.state = to  # the directory moved: the index must say so even if fsync fails
        self.fs.fsync_dir(dst.parent)
        self.fs.fsync_dir(src.parent)

    def mark_synced(self, segment_id: str) -> None:
        """Record that the backend holds the segment; durable before it returns.

        Idempotent. A segment evicted meanwhile is ignored (logged).

        Raises:
            ValueError: Malformed id.
            SpoolError: The segment is quarantined.
            OSError: The state change could not be made durable; calling again is safe.
        """
        _check_id(segment_id)
        with self._lock:
            entry = self._entries.get(segment_id)
            if entry is None:
                log.warning("mark_synced of a segment no longer held id=%s", segment_id)
                return
            if entry.state is SegmentState.QUARANTINED:
                raise SpoolError(f"segment {segment_id} is quarantined")
            if entry.state is SegmentState.SYNCED:
                # Maybe a retry after a failed directory fsync: make it durable again.
                self.fs.fsync_dir(self.root / _SYNCED)
                self.fs.fsync_dir(self.root / _SEALED)
                return
            self._move(segment_id, entry, SegmentState.SYNCED)
            self.stats.segments_synced += 1
            self._update_sizes()
        log.info("segment synced id=%s", segment_id)

    def quarantine(self, segment_id: str, reason: str) -> None:
        """Take a segment out of pending for good; ``reason`` is kept in ``reason.txt``.

        A segment evicted meanwhile is ignored (logged).

        Raises:
            ValueError: Malformed id.
            OSError: The change could not be made durable; calling again is safe.
        """
        _check_id(segment_id)
        with self._lock:
            entry = self._entries.get(segment_id)
            if entry is None:
                log.warning("quarantine of a segment no longer held id=%s", segment_id)
                return
            if entry.state is SegmentState.QUARANTINED:
                return
            reason_file = self._dir(entry.state, segment_id) / _REASON_TXT
            try:
                self._write_file(reason_file, reason.encode("utf-8", "replace") + b"\n")
            except OSError:
                # A reason file left behind would finish this quarantine at the next
                # recovery although the caller was told it failed.
                with contextlib.suppress(OSError):
                    self.fs.unlink(reason_file)
                raise
            self._move(segment_id, entry, SegmentState.QUARANTINED)
            self.stats.segments_quarantined += 1
            self._update_sizes()
        log.warning("segment quarantined id=%s reason=%r", segment_id, reason)

    def verify(self, segment_id: str) -> bool:
        """Re-hash the audio file against its metadata (bit rot, truncation).

        A mismatch or a missing file returns False and is counted; the caller
        quarantines the segment.

        Raises:
            ValueError: Malformed id.
            KeyError: No such segment.
        """
        path = self.audio_path(segment_id)
        with self._lock:
            meta = self._entries[segment_id].meta
        assert meta is not None
        try:
            size, digest = self.fs.sha256(path)
        except FileNotFoundError:
            size, digest = -1, ""
        ok = size == meta.bytes and digest == meta.sha256
        if not ok:
            with self._lock:
                self.stats.integrity_failures += 1
            log.warning("segment fails its digest id=%s bytes=%d expected_bytes=%d",
                        segment_id, size, meta.bytes)
        return ok

    # -- queries -------------------------------------------------------------------

    def get(self, segment_id: str) -> tuple[SegmentMeta, SegmentState] | None:
        """The segment's metadata and state, or None.

        Raises:
            ValueError: Malformed id.
        """
        _check_id(segment_id)
        with self._lock:
            entry = self._entries.get(segment_id)
            if entry is None or entry.meta is None:
                return None
            return entry.meta, entry.state

    def pending(self) -> builtins.list[SegmentMeta]:
        """Sealed segments not yet synced, oldest first."""
        with self._lock:
            metas = [e.meta for e in self._entries.values()
                     if e.state is SegmentState.SEALED and e.meta is not None]
        return sorted(metas, key=lambda m: m.id)

    async def wait_pending(self) -> None:
        """Return once at least one segment is pending (at once if one is).

        Each seal wakes the waiters immediately, so an uploader never polls.
        """
        self._token = trio.lowlevel.current_trio_token()
        await trio.lowlevel.checkpoint()
        while not self._has_pending():
            await self._lot.park()

    def _has_pending(self) -> bool:
        with self._lock:
            return any(e.state is SegmentState.SEALED for e in self._entries.values())

    def _wake(self) -> None:
        """Wake `wait_pending` from any thread."""
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            token = self._token
            if token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(self._lot.unpark_all)
        else:
            self._lot.unpark_all()

    def _update_sizes(self) -> None:
        used = pending = pending_bytes = synced = quarantined = 0
        for e in self._entries.values():
            used += e.bytes
            if e.state is SegmentState.SEALED:
                pending += 1
                pending_bytes += e.bytes
            elif e.state is SegmentState.SYNCED:
                synced += 1
            else:
                quarantined += 1
        s = self.stats
        s.bytes_used, s.pending_segments, s.pending_bytes = used, pending, pending_bytes
        s.synced_segments, s.quarantined_segments = synced, quarantined

    # -- quota -----------------------------------------------------------------------

    def enforce_quota(self) -> None:
        """Evict until the spool fits ``max_spool_mb`` and leaves ``min_free_mb`` free.

        Order: synced segments past ``retain_synced_hours`` (always), then synced ones
        oldest first, then quarantined ones, then, only when unsynced audio alone is
        over the limit, unsynced ones oldest first: each logged and counted as loss.

        Raises:
            OSError: The disk could not be queried or a segment not removed.
        """
        cfg = self.config
        with self._lock:
            now = self.clock.utc()
            retain = cfg.retain_synced_hours * 3600.0
            for seg_id, e in sorted(self._entries.items()):
                if (e.state is SegmentState.SYNCED and e.meta is not None
                        and now - e.meta.end_ts >= retain):
                    self._evict(seg_id, e)
                    self.stats.evicted_expired += 1
            free = self.fs.disk_free(self.root)
            used = sum(e.bytes for e in self._entries.values())
            limit = min(cfg.max_spool_mb * _MB, used + free - cfg.min_free_mb * _MB)
            evicted_unsynced = 0
            for state in (SegmentState.SYNCED, SegmentState.QUARANTINED, SegmentState.SEALED):
                if used <= limit:
                    break
                for seg_id, e in sorted(self._entries.items()):
                    if used <= limit:
                        break
                    if e.state is not state:
                        continue
                    used -= e.bytes
                    self._evict(seg_id, e)
                    if state is SegmentState.SYNCED:
                        self.stats.evicted_synced += 1
                    elif state is SegmentState.QUARANTINED:
                        self.stats.evicted_quarantined += 1
                    else:
                        evicted_unsynced += 1
                        seconds = e.meta.seconds if e.meta else 0.0
                        self.stats.evicted_unsynced += 1
                        self.stats.evicted_unsynced_seconds += seconds
                        self.stats.evicted_unsynced_bytes += e.bytes
                        log.error("unsynced audio evicted id=%s seconds=%.3f bytes=%d "
                                  "limit_bytes=%d", seg_id, seconds, e.bytes, limit)
            self._loss_note = (
                f"unsynced audio evicted: {evicted_unsynced} segment(s) to stay within "
                f"{limit / _MB:.1f} MB" if evicted_unsynced else None
            )
            self._update_sizes()

    def _evict(self, segment_id: str, entry: _Entry) -> None:
        self._discard(self._dir(entry.state, segment_id))
        del self._entries[segment_id]

    # -- recovery ----------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Bring the spool directory to a clean state and load the index; run once at start.

        Every temp segment is finished, salvaged (``recovered=True``), removed when
        nothing in it is audio, or quarantined when it cannot be read. Sealed and
        synced segments whose metadata cannot be read are quarantined.

        Raises:
            OSError: The spool directory itself cannot be used.
        """
        fs = self.fs
        report = RecoveryReport()
        for name in (_TMP, _SEALED, _SYNCED, _QUARANTINE, _TRASH):
            fs.makedirs(self.root / name)
        with self._lock:
            self._entries.clear()
            for name in fs.listdir(self.root / _TRASH):
                fs.rmtree(self.root / _TRASH / name)
                report.trash_removed += 1
            for state in (SegmentState.SEALED, SegmentState.SYNCED, SegmentState.QUARANTINED):
                for name in fs.listdir(self.root / _STATE_DIRS[state]):
                    self._load(name, state, report)
            for name in fs.listdir(self.root / _TMP):
                try:
                    self._recover_tmp(name, report)
                except OSError as exc:
                    # A full disk must not keep the agent from recording: leave it for
                    # the next start and go on.
                    self.note_disk_error(exc, f"recovering tmp/{name}")
                    report.left_in_tmp.append(name)
                    log.error("cannot recover temp segment name=%s error=%r", name, exc)
            self._update_sizes()
            report.sealed = self.stats.pending_segments
            report.synced = self.stats.synced_segments
            report.quarantined = self.stats.quarantined_segments
            self.recovered = True
        log.info("spool recovered root=%s pending=%d synced=%d quarantined=%d completed=%d "
                 "salvaged=%d salvaged_seconds=%.3f discarded=%d newly_quarantined=%d",
                 self.root, report.sealed, report.synced, report.quarantined,
                 len(report.completed), len(report.recovered), report.recovered_seconds,
                 len(report.discarded), len(report.newly_quarantined))
        if report.sealed:
            self._wake()
        return report

    def _read_meta(self, path: Path) -> SegmentMeta:
        return msgspec.json.decode(self.fs.read_bytes(path), type=SegmentMeta)

    def _load(self, name: str, state: SegmentState, report: RecoveryReport) -> None:
        seg_dir = self._dir(state, name)
        if state is SegmentState.QUARANTINED:
            try:
                meta: SegmentMeta | None = self._read_meta(seg_dir / _META_JSON)
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                meta = None
            keep = meta if meta is not None and meta.id == name else None
            self._entries[name] = _Entry(keep, state, _dir_audio_bytes(seg_dir))
            return
        reason = None
        meta = None
        if not is_segment_id(name):
            reason = "directory name is not a segment id"
        else:
            try:
                meta = self._read_meta(seg_dir / _META_JSON)
            except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                reason = f"unreadable meta.json: {exc}"
        if meta is not None:
            audio = seg_dir / _FORMATS.get(meta.format, ("?",))[0]
            if meta.id != name:
                reason = f"meta.json is for segment {meta.id}"
            elif not self.fs.exists(audio):
                reason = "audio file missing"
            elif (size := self.fs.size(audio)) != meta.bytes:
                reason = f"audio file holds {size} bytes, meta.json says {meta.bytes}"
        if reason is None and self.fs.exists(seg_dir / _REASON_TXT):
            # A quarantine a crash interrupted: finish it.
            reason = self.fs.read_bytes(seg_dir / _REASON_TXT).decode("utf-8", "replace").strip()
            self._to_quarantine(seg_dir, name, reason, report, write_reason=False, meta=meta)
            return
        if reason is not None:
            self._to_quarantine(seg_dir, name, reason, report, meta=meta)
            return
        assert meta is not None
        self._entries[name] = _Entry(meta, state, meta.bytes)

    def _to_quarantine(self, src: Path, name: str, reason: str, report: RecoveryReport, *,
                       write_reason: bool = True, meta: SegmentMeta | None = None) -> None:
        fs = self.fs
        safe = name if re.fullmatch(r"[A-Za-z0-9._-]{1,100}", name) else secrets.token_hex(8)
        dst = self.root / _QUARANTINE / safe
        if fs.exists(dst):
            dst = dst.with_name(f"{safe}.{secrets.token_hex(4)}")
        if write_reason:
            self._write_file(src / _REASON_TXT, reason.encode("utf-8", "replace") + b"\n")
        fs.rename(src, dst)
        fs.fsync_dir(dst.parent)
        fs.fsync_dir(src.parent)
        keep = meta if meta is not None and meta.id == dst.name else None
        self._entries[dst.name] = _Entry(keep, SegmentState.QUARANTINED, _dir_audio_bytes(dst))
        self.stats.segments_quarantined += 1
        report.newly_quarantined.append((name, reason))
        log.warning("quarantined in recovery name=%s reason=%r", name, reason)

    def salvage(self, segment_id: str) -> SegmentMeta | None:
        """Seal what is intact of a segment left in ``tmp/`` (as recovery does at start).

        The segmenter uses it for a segment it had to set aside for lack of space.
        Returns the sealed metadata (``recovered=True``), or None when nothing was
        salvageable (removed) or the file was unreadable (quarantined).

        Raises:
            OSError: Still no room (the temp segment stays as it is; call again later).
        """
        _check_id(segment_id)
        with self._lock:
            self._recover_tmp(segment_id, RecoveryReport())
            self._update_sizes()
            entry = self._entries.get(segment_id)
            if entry is None or entry.state is not SegmentState.SEALED:
                return None
            return entry.meta

    def _recover_tmp(self, name: str, report: RecoveryReport) -> None:
        fs = self.fs
        src = self.root / _TMP / name
        if name in self._entries:
            # A rewrite of this id was sealed: this is the abandoned first attempt.
            self._discard(src)
            report.discarded.append(name)
            return
        header = None
        with contextlib.suppress(OSError, msgspec.DecodeError, msgspec.ValidationError):
            header = msgspec.json.decode(fs.read_bytes(src / _OPEN_JSON), type=SegmentHeader)
        complete = None
        with contextlib.suppress(OSError, msgspec.DecodeError, msgspec.ValidationError):
            meta = self._read_meta(src / _META_JSON)
            audio = src / _FORMATS[meta.format][0]
            if meta.id == name and fs.sha256(audio) == (meta.bytes, meta.sha256):
                complete = meta
        if complete is not None:
            # A crash between writing meta.json and the rename: finish the seal.
            fs.unlink(src / _OPEN_JSON)
            fs.fsync_dir(src)
            dst = self._dir(SegmentState.SEALED, name)
            fs.rename(src, dst)
            fs.fsync_dir(dst.parent)
            fs.fsync_dir(src.parent)
            self._entries[name] = _Entry(complete, SegmentState.SEALED, complete.bytes)
            self.stats.segments_sealed += 1
            report.completed.append(name)
            return
        if header is None or header.id != name or header.format not in _FORMATS:
            if _dir_audio_bytes(src) == 0:
                self._discard(src)
                self.stats.segments_discarded += 1
                report.discarded.append(name)
            else:
                self._to_quarantine(src, name, "no readable open.json for the audio", report)
            return
        audio = src / _FORMATS[header.format][0]
        try:
            if fs.exists(audio):
                with fs.map_file(audio) as view:
                    salvage = _salvage(view, header)
            else:
                salvage = _Salvage(0, 0, [])
        except _Unsalvageable as exc:
            self._to_quarantine(src, name, f"cannot salvage: {exc}", report)
            return
        if salvage.frames == 0:
            self._discard(src)
            self.stats.segments_discarded += 1
            report.discarded.append(name)
            log.info("discarded empty temp segment id=%s", name)
            return
        fd = fs.open_rw(audio)
        try:
            fs.truncate(fd, salvage.keep_bytes, str(audio))
            for offset, data in salvage.patches:
                fs.pwrite(fd, data, offset, str(audio))
            fs.fsync(fd, str(audio))
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        fs.close(fd, str(audio))
        seconds = salvage.frames / header.rate
        self._publish(src, header, frames=salvage.frames, mono_end=header.mono_start + seconds,
                      gaps=list(header.gaps), clock_steps=list(header.clock_steps),
                      recovered=True)
        report.recovered.append(name)
        report.recovered_seconds += seconds

    # -- listing (last: its name shadows the builtin in the class body) --------------

    def list(self, *, since: float | None = None, until: float | None = None,
             state: SegmentState | None = None, limit: int | None = None,
             newest_first: bool = True) -> builtins.list[tuple[SegmentMeta, SegmentState]]:
        """Segments overlapping ``[since, until)`` (epoch seconds), optionally in one state."""
        with self._lock:
            rows = [(e.meta, e.state) for e in self._entries.values() if e.meta is not None]
        out = [
            (m, s) for m, s in rows
            if (state is None or s is state)
            and (since is None or m.end_ts > since)
            and (until is None or m.start_ts < until)
        ]
        out.sort(key=lambda row: row[0].id, reverse=newest_first)
        return out[:limit] if limit is not None else out


def _dir_audio_bytes(path: Path) -> int:
    total = 0
    for name, _ in _FORMATS.values():
        with contextlib.suppress(OSError):
            total += (path / name).stat().st_size
    return total


# ----------------------------------------------------------------------------
# The segmenter task


RunSync = Callable[..., Awaitable[Any]]

# At shutdown a failed seal is retried (from the ring, in a new file) this many times
# in all, within the grace period, without backoff.
_FINAL_ATTEMPTS: Final = 3


@dataclass
class SegmenterStats:
    """Counters of the segmenter task."""

    frames_written: int = 0
    segments_opened: int = 0
    segments_sealed: int = 0
    # Segments abandoned after a disk error and written again from the ring.
    rewrites: int = 0
    failures: int = 0
    # Frames the segmenter never wrote: evicted from the ring before it got them
    # (slow disk, long outage) or lost in a failed segment the ring no longer held.
    lost_frames: int = 0
    last_error: str | None = None


@dataclass
class _Open:
    writer: SegmentWriter
    start: int  # ring index of the first frame
    end_mono: float  # the wall-clock boundary, on the monotonic clock
    gaps: list[GapNote] = field(default_factory=list)  # overruns inside the segment


class Segmenter:
    """Cuts the ring into wall-clock aligned segments and seals them into the spool.

    Ring access stays on the Trio thread; encoding and disk I/O run in a worker
    thread (``run_sync``; tests pass an inline runner to stay deterministic under
    ``MockClock``). Its cursor survives restarts of :meth:`run`, so the supervisor
    restarting it never skips or repeats audio.

    Args:
        ring: The capture ring.
        spool: Where segments go; :meth:`Spool.recover` is run before the first start.
        config: The ``[segments]`` section.
        backoff: Delays between attempts after a disk error.
        run_sync: ``await run_sync(fn, *args)`` runs blocking work (default: a worker
            thread, one at a time).
        batch_seconds: How long to gather audio before one trip to the worker thread.
        seal_grace: Bound on sealing the open segment when the task is cancelled.
        max_write_seconds: Most audio handed to the encoder in one call.
    """

    def __init__(self, ring: AudioRing, spool: Spool, config: SegmentsConfig, *,
                 backoff: Backoff | None = None, run_sync: RunSync | None = None,
                 batch_seconds: float = 0.25, seal_grace: float = 3.5,
                 max_write_seconds: float = 10.0) -> None:
        self.ring = ring
        self.spool = spool
        self.config = config
        self.backoff = backoff or Backoff(initial=1.0, maximum=30.0)
        self._limiter = trio.CapacityLimiter(1)
        self._run_sync: RunSync = run_sync or self._in_thread
        self.batch_seconds = batch_seconds
        self.seal_grace = seal_grace
        self.max_write_frames = max(1, round(max_write_seconds * ring.rate))
        self.stats = SegmenterStats()
        self.sealed: builtins.list[SegmentMeta] = []  # this run's seals (last 1000)
        self._reader: RingReader | None = None
        self._open: _Open | None = None
        self._retry_id: str | None = None  # id to reuse when rewriting a failed segment
        self._parked: tuple[str, int] | None = None  # (id, start) set aside for lack of space
        self._overrun: GapNote | None = None  # hole to note at the next segment's start
        self._lost_upto = 0  # ring index up to which lost frames were counted
        self._attempt = 0

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def run(self, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """The supervised task: recover the spool once, then segment until cancelled.

        On cancellation the open segment is sealed (shielded, within ``seal_grace``).
        """
        if not self.spool.recovered:
            await self._run_sync(self.spool.recover)
            try:
                await self._run_sync(self.spool.enforce_quota)
            except OSError as exc:
                self.spool.note_disk_error(exc, "enforcing the quota")
        if self._reader is None:
            self._reader = self.ring.open_reader("segmenter", start=self.ring.tail)
        reader = self._reader
        batch = max(1, round(self.batch_seconds * self.ring.rate))
        task_status.started()
        try:
            while True:
                with trio.move_on_after(self.config.fsync_seconds) as idle:
                    await reader.wait(1)
                if idle.cancelled_caught:
                    await self._idle_sync()
                    continue
                with trio.move_on_after(self.batch_seconds):
                    await reader.wait(batch)
                await self._pump(final=False)
        finally:
            with trio.move_on_after(self.seal_grace, shield=True) as scope:
                await self._pump(final=True)
            if scope.cancelled_caught:
                log.error("segment not sealed within %.1f s; it is recovered on the next start",
                          self.seal_grace)

    async def _idle_sync(self) -> None:
        """No audio for a while (mic gone): make what was written durable anyway."""
        seg = self._open
        if seg is None or seg.writer.frames == 0:
            return
        try:
            await self._run_sync(_sync_flushed, seg.writer, trio.current_time())
        except (OSError, SpoolError, OpusError, FlacError) as exc:
            await self._fail(exc, "syncing an idle segment", sleep=True)

    async def _pump(self, *, final: bool) -> None:
        """Write what the ring holds past the cursor, sealing at boundaries; when
        ``final``, also seal the open segment at the end and never back off."""
        attempts = 0
        while True:
            try:
                if not await self._step(final=final):
                    return
            except (OSError, SpoolError, OpusError, FlacError) as exc:
                attempts += 1
                # At shutdown there is no later attempt: without space (or after the
                # last try) keep what is durable in tmp/ for the next start's recovery.
                give_up = final and (attempts >= _FINAL_ATTEMPTS or _no_space(exc))
                await self._fail(exc, "sealing at shutdown" if final else "writing a segment",
                                 sleep=not final, keep=give_up)
                if give_up:
                    return

    async def _step(self, *, final: bool) -> bool:
        """One step: note an overrun, open, write one chunk, or seal.

        Returns False when there is nothing left to do.
        """
        ring, reader = self.ring, self._reader
        if reader is None:
            return False
        if self._parked is not None:
            await self._unpark()
            return True
        head, tail = ring.head, ring.tail
        if reader.cursor < tail:
            self._note_overrun(reader.cursor, tail)
            reader.seek(tail)
        seg = self._open
        if reader.cursor >= head:
            if final and seg is not None:
                await self._seal(reader.cursor)
            return False
        if seg is None:
            await self._open_at(reader.cursor)
            return True
        cut: int | None = ring.mono_to_index(seg.end_mono)
        if cut is not None and not seg.start < cut < head:
            cut = None  # the boundary has not been captured yet
        steps = ring.clock_steps(seg.start, head)
        if steps and (cut is None or steps[0].index < cut):
            cut = steps[0].index  # a wall-clock step starts a new segment
        if cut is not None:
            cut = max(cut, reader.cursor)
        stop = min(head if cut is None else cut, reader.cursor + self.max_write_frames)
        if stop > reader.cursor:
            # Peek, and move the cursor only once the frames are written: a stop that
            # lands before the worker thread starts must not skip them.
            frames = ring.read(reader.cursor, stop)
            await self._run_sync(seg.writer.write, frames, trio.current_time())
            reader.seek(stop)
            self.stats.frames_written += len(frames)
            self.spool.clear_disk_error()
        if cut is not None and reader.cursor == cut:
            await self._seal(cut)
        return True

    async def _unpark(self) -> None:
        """Seal what is durable of the segment set aside for lack of space, and go on
        from the first frame it does not hold (still in the ring, or counted lost)."""
        assert self._parked is not None and self._reader is not None
        seg_id, start = self._parked
        meta: SegmentMeta | None = await self._run_sync(self.spool.salvage, seg_id)
        self._parked = None
        self._reader.seek(start + (meta.frames if meta is not None else 0))
        self.spool.clear_disk_error()
        if meta is not None:
            log.info("segment set aside for lack of space sealed id=%s seconds=%.3f",
                     seg_id, meta.seconds)
            self.stats.segments_sealed += 1
            self.sealed.append(meta)
            del self.sealed[:-1000]
            await self._quota()

    async def _quota(self) -> None:
        try:
            await self._run_sync(self.spool.enforce_quota)
        except OSError as exc:
            self.spool.note_disk_error(exc, "enforcing the quota")
            log.warning("quota check failed error=%r", exc)

    def _note_overrun(self, cursor: int, tail: int) -> None:
        """Frames ``[cursor, tail)`` left the ring before the segmenter wrote them."""
        new = tail - max(cursor, self._lost_upto)
        if new > 0:
            self.stats.lost_frames += new
            self._lost_upto = tail
            log.warning("segmenter lost audio evicted from the ring frames=%d seconds=%.3f",
                        new, new / self.ring.rate)
        seconds = (tail - cursor) / self.ring.rate
        anchor = self.ring.anchor_at(tail)
        hole_utc = anchor.utc + (self.ring.index_to_mono(tail) - anchor.mono) - seconds
        seg = self._open
        if seg is not None:
            seg.gaps.append(GapNote(frame=seg.writer.frames, seconds=seconds,
                                    utc=iso_utc(hole_utc), reason="overrun"))
        elif self._overrun is not None:
            # Adjacent to the hole noted before (no segment could be opened since).
            self._overrun = msgspec.structs.replace(
                self._overrun, seconds=self._overrun.seconds + seconds)
        else:
            self._overrun = GapNote(frame=0, seconds=seconds, utc=iso_utc(hole_utc),
                                    reason="overrun")

    async def _open_at(self, index: int) -> None:
        ring = self.ring
        anchor = ring.anchor_at(index)
        mono_start = ring.index_to_mono(index)
        start_ts = anchor.utc + (mono_start - anchor.mono)
        seconds = self.config.seconds
        # A start within half a frame of a boundary counts as on it.
        boundary = (math.floor((start_ts + 0.5 / ring.rate) / seconds) + 1) * seconds
        gaps = [self._gap_note(g.index, index, g.seconds, g.mono)
                for g in ring.gaps(index - 1, index)]
        if self._overrun is not None:
            gaps.append(self._overrun)
        steps = [ClockStepNote(frame=0, seconds=s.seconds, synced=s.synced)
                 for s in ring.clock_steps(index - 1, index)]
        writer = await self._run_sync(
            self._open_writer, start_ts, mono_start, anchor.synced, gaps, steps,
            trio.current_time(),
        )
        self._overrun = None
        self._open = _Open(writer, index, mono_start + (boundary - start_ts))
        self.stats.segments_opened += 1
        self.spool.clear_disk_error()

    def _open_writer(self, start_ts: float, mono_start: float, synced: bool,
                     gaps: builtins.list[GapNote], steps: builtins.list[ClockStepNote],
                     now: float) -> SegmentWriter:
        return self.spool.open_segment(
            start_ts=start_ts, mono_start=mono_start, rate=self.ring.rate,
            channels=self.ring.channels, sample_format=str(self.ring.dtype),
            clock_synced=synced, gaps=gaps, clock_steps=steps, segment_id=self._retry_id,
            now=now,
        )

    def _gap_note(self, gap_index: int, start: int, seconds: float, mono: float) -> GapNote:
        anchor = self.ring.anchor_at(gap_index)
        utc = anchor.utc + (mono - anchor.mono)
        return GapNote(frame=gap_index - start, seconds=seconds, utc=iso_utc(utc))

    async def _seal(self, end: int) -> None:
        """Seal the open segment, whose frames end before ring index ``end``."""
        seg = self._open
        assert seg is not None
        if seg.writer.frames == 0:
            self._open = None
            await self._run_sync(self.spool.abort, seg.writer)
            return
        ring = self.ring
        mono_end = ring.index_to_mono(end - 1) + 1.0 / ring.rate
        gaps = [self._gap_note(g.index, seg.start, g.seconds, g.mono)
                for g in ring.gaps(seg.start, end - 1)]
        gaps = sorted([*gaps, *seg.gaps], key=lambda g: g.frame)
        meta = await self._run_sync(self._seal_writer, seg.writer, mono_end, gaps)
        self._open = None
        self._retry_id = None
        self._attempt = 0
        self.stats.segments_sealed += 1
        self.sealed.append(meta)
        del self.sealed[:-1000]
        self.spool.clear_disk_error()
        await self._quota()

    def _seal_writer(self, writer: SegmentWriter, mono_end: float,
                     gaps: builtins.list[GapNote]) -> SegmentMeta:
        return self.spool.seal(writer, mono_end=mono_end, gaps=gaps)

    async def _fail(self, exc: Exception, doing: str, *, sleep: bool, keep: bool = False) -> None:
        """Deal with a failed write, sync or seal of the open segment.

        Out of space (or ``keep``): the segment is set aside as it is (what its
        fsyncs made durable stays valid) and salvaged once there is room, or by
        the next start's recovery. Any other error (EIO, a failed fsync): its file
        cannot be trusted, so it is dropped and written again from the ring.
        """
        self.stats.failures += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        self.spool.note_disk_error(exc, doing)
        seg, self._open = self._open, None
        if seg is not None and (keep or _no_space(exc)):
            seg.writer.close()
            self._parked = (seg.writer.id, seg.start)
            log.error("segment set aside id=%s: salvaged when there is room, or at the "
                      "next start", seg.writer.id)
        elif seg is not None:
            # Rewind before the (cancellable) trip to the worker: the rewrite reuses the
            # id, so even an abort that never ran cannot leave a second copy.
            self._retry_id = seg.writer.id
            if self._reader is not None:
                self._reader.seek(seg.start)
            self.stats.rewrites += 1
            await self._run_sync(self.spool.abort, seg.writer)
        if _no_space(exc) and not keep:
            await self._quota()  # room may be had by evicting (synced audio first)
        delay = self.backoff.delay(self._attempt) if sleep else 0.0
        self._attempt += 1
        log.warning("segment write failed doing=%s error=%r retry_in=%.2fs", doing,
                    self.stats.last_error, delay)
        if sleep:
            await trio.sleep(delay)


def _no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _sync_flushed(writer: SegmentWriter, now: float) -> None:
    writer.sync(now, flush_encoder=True)
