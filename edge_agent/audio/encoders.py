"""The one encoder factory: PCM blocks in, the bytes of one audio file out.

Every part of the agent that writes audio (the segmenter's spool files, named
recordings, ``/v1/audio`` and ``/v1/live``) asks `make_encoder` for a
`StreamEncoder` and appends what it returns, in order. The interface is the
strictest any user needs, so one encoder serves a file on disk that must survive
a power cut as well as an HTTP body:

* ``start()`` the header bytes, ``write(pcm)`` what a block produced, ``flush()``
  what the codec holds (an Ogg page cut short, for a live listener or an fsync);
* ``finish()`` the last bytes and ``(offset, bytes)`` patches to apply to what was
  written (WAV sizes), ``after_sync(n)`` patches that record that the first ``n``
  bytes are durable (WAV written with ``sizes="durable"``);
* ``close()`` frees the codec, also after a failure.

Synchronous and thread-confined: one thread feeds one encoder. No Trio; imports
only the rest of ``audio/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from .flac import OggFlacEncoder
from .opus import OggOpusEncoder
from .pcm import (
    WAV_HEADER_BYTES,
    SampleFormat,
    from_float32,
    to_bytes_le,
    to_float32,
    wav_header,
    wav_size_patches,
)

__all__ = [
    "ENCODER_FORMATS",
    "MP3_RATES",
    "PcmLayout",
    "StreamEncoder",
    "encode_whole",
    "make_encoder",
    "mp3_default_kbps",
    "pack_int24",
]

#: Formats `make_encoder` writes.
ENCODER_FORMATS: Final = ("opus", "flac", "wav", "mp3", "pcm")
#: Sample rates an MP3 file can hold.
MP3_RATES: Final = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)

Patches = list[tuple[int, bytes]]


class StreamEncoder(Protocol):
    """Turns PCM blocks into the bytes of one file, appended in order."""

    def start(self) -> bytes: ...
    def write(self, pcm: NDArray[Any]) -> bytes: ...
    def flush(self) -> bytes: ...
    def finish(self) -> tuple[bytes, Patches]:
        """The last bytes to append, and (offset, bytes) patches to apply after."""
        ...
    def after_sync(self, durable_bytes: int) -> Patches:
        """Patches recording that the file's first ``durable_bytes`` are on disk."""
        ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class PcmLayout:
    """How samples are written: a sample format, and whether 32-bit samples are
    packed into 3 bytes (``int24``: captured as left-justified int32)."""

    sample_format: SampleFormat
    packed24: bool = False

    @property
    def name(self) -> str:
        return "int24" if self.packed24 else self.sample_format.value

    @property
    def width(self) -> int:
        """Bytes per sample of PCM output."""
        return 3 if self.packed24 else self.sample_format.numpy_dtype.itemsize


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


class _PcmEncoder:
    """Raw little-endian PCM, no header."""

    def __init__(self, layout: PcmLayout) -> None:
        self.layout = layout
        self.data_bytes = 0

    def start(self) -> bytes:
        return b""

    def write(self, pcm: NDArray[Any]) -> bytes:
        if self.layout.packed24:
            data = pack_int24(pcm)
        else:
            data = to_bytes_le(_as_format(pcm, self.layout.sample_format))
        self.data_bytes += len(data)
        return data

    def flush(self) -> bytes:
        return b""

    def finish(self) -> tuple[bytes, Patches]:
        return b"", []

    def after_sync(self, durable_bytes: int) -> Patches:
        return []

    def close(self) -> None:
        pass


class _WavEncoder(_PcmEncoder):
    """PCM WAV with a 44-byte header. Float audio is stored as 32-bit integer PCM.

    The header's sizes are known up front (``data_bytes``, a streamed HTTP body),
    patched by `finish` (``sizes="finish"``, a file written whole), or patched after
    every fsync with the length that fsync made durable (``sizes="durable"``, a spool
    file): WAV has no checksums, so after a power cut a torn tail could not be told
    from audio, and recovery keeps only what the header counts.
    """

    def __init__(self, layout: PcmLayout, rate: int, channels: int, *,
                 data_bytes: int | None, sizes: Literal["finish", "durable"]) -> None:
        if layout.sample_format is SampleFormat.FLOAT32:
            layout = PcmLayout(SampleFormat.INT32)
        super().__init__(layout)
        self._rate, self._channels = rate, channels
        self._declared = data_bytes
        self._sizes = sizes

    def start(self) -> bytes:
        return wav_header(self._rate, self._channels, self.layout.width, self._declared or 0)

    def finish(self) -> tuple[bytes, Patches]:
        # Durable sizes come from after_sync once the data is on disk: patched
        # before that fsync they could reach the disk ahead of the data they count.
        if self._declared is not None or self._sizes == "durable":
            return b"", []
        return b"", wav_size_patches(self.data_bytes)

    def after_sync(self, durable_bytes: int) -> Patches:
        if self._sizes != "durable":
            return []
        return wav_size_patches(max(0, durable_bytes - WAV_HEADER_BYTES))


class _OpusEncoder:
    """Ogg Opus through libopusenc; int16 and float32 blocks go in as they are."""

    def __init__(self, rate: int, channels: int, bitrate: int, application: str,
                 comments: dict[str, str], max_page_delay_ms: int, complexity: int) -> None:
        self._enc = OggOpusEncoder(rate, channels, bitrate=bitrate, application=application,
                                   comments=comments, max_page_delay_ms=max_page_delay_ms,
                                   complexity=complexity)

    def start(self) -> bytes:
        return self._enc.flush()

    def write(self, pcm: NDArray[Any]) -> bytes:
        if pcm.dtype not in (np.int16, np.float32):
            pcm = to_float32(pcm)
        return self._enc.write(pcm)

    def flush(self) -> bytes:
        return self._enc.flush()

    def finish(self) -> tuple[bytes, Patches]:
        return self._enc.finish(), []

    def after_sync(self, durable_bytes: int) -> Patches:
        return []  # Ogg pages carry CRCs: recovery finds the intact ones itself

    def close(self) -> None:
        self._enc.close()


class _FlacEncoder:
    """Ogg FLAC through libFLAC: 16-bit for int16 audio, else 24-bit."""

    def __init__(self, rate: int, channels: int, sample_format: SampleFormat) -> None:
        self._format = sample_format
        self._enc = OggFlacEncoder(rate, channels, sample_format)

    def start(self) -> bytes:
        return self._enc.start()

    def write(self, pcm: NDArray[Any]) -> bytes:
        return self._enc.write(_as_format(pcm, self._format))

    def flush(self) -> bytes:
        return self._enc.flush()

    def finish(self) -> tuple[bytes, Patches]:
        return self._enc.finish()

    def after_sync(self, durable_bytes: int) -> Patches:
        return self._enc.after_sync(durable_bytes)

    def close(self) -> None:
        self._enc.close()


def mp3_default_kbps(rate: int, channels: int) -> int:
    """A bitrate that sounds fine for speech at each MPEG rate family."""
    per_channel = 64 if rate >= 32000 else 32 if rate >= 16000 else 16
    return per_channel * channels


class _Mp3Encoder:
    """MP3 through lameenc (LAME, the ``mp3`` extra); takes 16-bit PCM."""

    def __init__(self, rate: int, channels: int, kbps: int | None) -> None:
        if rate not in MP3_RATES:
            raise ValueError(f"MP3 cannot hold {rate} Hz; use one of {MP3_RATES} (rate=...)")
        if channels not in (1, 2):
            raise ValueError(f"MP3 holds 1 or 2 channels, not {channels} (channels=...)")
        try:
            import lameenc
        except ImportError:
            raise ValueError("MP3 needs the lameenc package: install edge-agent[mp3]") from None
        enc = lameenc.Encoder()
        enc.set_in_sample_rate(rate)
        enc.set_channels(channels)
        enc.set_bit_rate(kbps or mp3_default_kbps(rate, channels))
        enc.set_quality(5)
        self._enc = enc

    def start(self) -> bytes:
        return b""

    def write(self, pcm: NDArray[Any]) -> bytes:
        return bytes(self._enc.encode(to_bytes_le(_as_format(pcm, SampleFormat.INT16))))

    def flush(self) -> bytes:
        return b""

    def finish(self) -> tuple[bytes, Patches]:
        return bytes(self._enc.flush()), []

    def after_sync(self, durable_bytes: int) -> Patches:
        return []

    def close(self) -> None:
        pass


def make_encoder(fmt: str, rate: int, channels: int, layout: PcmLayout | SampleFormat, *,
                 bitrate: int = 32000, application: str = "audio",
                 comments: dict[str, str] | None = None, max_page_delay_ms: int = 1000,
                 complexity: int = 10, mp3_kbps: int | None = None,
                 wav_data_bytes: int | None = None,
                 wav_sizes: Literal["finish", "durable"] = "finish") -> StreamEncoder:
    """A streaming encoder of ``fmt`` (one of `ENCODER_FORMATS`).

    Args:
        fmt: ``opus``, ``flac`` (Ogg FLAC), ``wav``, ``mp3`` or ``pcm`` (raw).
        rate, channels: of the blocks written (no resampling or mixing here).
        layout: the sample format written by ``pcm``/``wav``/``flac`` (a bare
            `SampleFormat` means unpacked); blocks of other dtypes are converted.
        bitrate, application, comments, max_page_delay_ms, complexity: Opus settings
            (libopusenc; a live stream wants pages out sooner than a file does;
            complexity 0..10 trades CPU for quality at the bit rate).
        mp3_kbps: MP3 bitrate; None picks `mp3_default_kbps`.
        wav_data_bytes, wav_sizes: how a WAV header gets its sizes (see `_WavEncoder`).

    Raises:
        ValueError: an unknown format, or one that cannot hold ``rate``/``channels``.
    """
    if isinstance(layout, SampleFormat):
        layout = PcmLayout(layout)
    if fmt == "opus":
        return _OpusEncoder(rate, channels, bitrate, application,
                            comments if comments is not None else {"ENCODER": "edge-agent"},
                            max_page_delay_ms, complexity)
    if fmt == "flac":
        return _FlacEncoder(rate, channels, layout.sample_format)
    if fmt == "wav":
        return _WavEncoder(layout, rate, channels, data_bytes=wav_data_bytes, sizes=wav_sizes)
    if fmt == "pcm":
        return _PcmEncoder(layout)
    if fmt == "mp3":
        return _Mp3Encoder(rate, channels, mp3_kbps)
    raise ValueError(f"format {fmt!r}: expected one of {', '.join(ENCODER_FORMATS)}")


def encode_whole(enc: StreamEncoder, pcm: NDArray[Any]) -> bytes:
    """One complete file of ``pcm`` from a fresh encoder (closed afterwards)."""
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
