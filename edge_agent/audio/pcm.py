"""PCM sample formats, conversions, channel mixing, levels and WAV I/O.

Everything here is plain synchronous numpy: no I/O except the WAV helpers, no
per-sample Python loops. Blocks are ``(frames,)`` or ``(frames, channels)``
arrays of int16, int32 or float32. Float audio is full scale at +-1.0; int32
audio is left-justified, so 24-bit samples (as ALSA/PortAudio deliver S24 in
32-bit words) and true 32-bit samples share one scale.

Part of ``audio/``: no Trio; imports nothing else of the project.
"""

from __future__ import annotations

import enum
import io
import logging
import math
import os
import struct
import wave
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "CLIP_THRESHOLD",
    "DB_FLOOR",
    "WAV_HEADER_BYTES",
    "Levels",
    "SampleFormat",
    "from_float32",
    "levels",
    "mix_down",
    "numpy_dtype",
    "pcm_from_bytes",
    "read_wav",
    "to_bytes_le",
    "to_float32",
    "unpack_int24",
    "wav_bytes",
    "wav_header",
    "wav_size_patches",
    "write_wav",
]

logger = logging.getLogger(__name__)

#: Level reported for silence instead of -inf, so that levels serialise to JSON.
DB_FLOOR = -120.0
#: A sample at or above this fraction of full scale counts as clipped.
CLIP_THRESHOLD = 0.999

_INT16_SCALE = 32768.0
_INT32_SCALE = 2147483648.0


class SampleFormat(enum.StrEnum):
    """Sample formats the agent handles end to end."""

    INT16 = "int16"
    INT32 = "int32"
    FLOAT32 = "float32"

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """The native-endian numpy dtype for this format."""
        return numpy_dtype(self)


_DTYPES: dict[SampleFormat, np.dtype[Any]] = {
    SampleFormat.INT16: np.dtype(np.int16),
    SampleFormat.INT32: np.dtype(np.int32),
    SampleFormat.FLOAT32: np.dtype(np.float32),
}


def numpy_dtype(fmt: SampleFormat | str) -> np.dtype[Any]:
    """Return the native-endian numpy dtype of ``fmt``.

    Raises:
        ValueError: ``fmt`` is not one of :class:`SampleFormat`.
    """
    try:
        return _DTYPES[SampleFormat(fmt)]
    except ValueError:
        raise ValueError(
            f"unknown sample format {fmt!r}; expected one of {[f.value for f in SampleFormat]}"
        ) from None


def to_float32(block: NDArray[Any]) -> NDArray[np.float32]:
    """Convert a PCM block to float32 at +-1.0 full scale, keeping its shape.

    float32 input is returned as is (no copy), so the result may share memory
    with ``block``.

    Raises:
        ValueError: the dtype is not int16, int32, float32 or float64.
    """
    dt = block.dtype
    if dt == np.float32:
        return block
    out: NDArray[np.float32]
    if dt == np.int16:
        out = np.multiply(block, np.float32(1.0 / _INT16_SCALE), dtype=np.float32)
        return out
    if dt == np.int32:
        out = np.multiply(block, np.float32(1.0 / _INT32_SCALE), dtype=np.float32)
        return out
    if dt == np.float64:
        return block.astype(np.float32)
    raise ValueError(f"unsupported sample dtype {dt}; expected int16, int32, float32 or float64")


def from_float32(x: NDArray[np.float32], fmt: SampleFormat | str) -> NDArray[Any]:
    """Convert float audio to ``fmt``, clipping to [-1, 1) and rounding to nearest.

    Returns ``x`` itself (as float32) when ``fmt`` is float32.
    """
    fmt = SampleFormat(fmt)
    if fmt is SampleFormat.FLOAT32:
        return x.astype(np.float32, copy=False)
    if fmt is SampleFormat.INT16:
        # float32 holds every int16 step exactly, so this path round-trips.
        top16 = np.float32((_INT16_SCALE - 1) / _INT16_SCALE)
        scaled: NDArray[np.float32] = np.clip(x, np.float32(-1.0), top16) * np.float32(_INT16_SCALE)
        return np.rint(scaled).astype(np.int16)
    # int32: 1 - 2**-31 is not representable in float32, so scale in float64.
    top32 = (_INT32_SCALE - 1) / _INT32_SCALE
    scaled64: NDArray[np.float64] = np.clip(x.astype(np.float64), -1.0, top32) * _INT32_SCALE
    return np.rint(scaled64).astype(np.int32)


def unpack_int24(raw: bytes | bytearray | memoryview, channels: int) -> NDArray[np.int32]:
    """Unpack packed little-endian 24-bit PCM into left-justified int32.

    Each 3-byte sample becomes ``sample << 8``, the layout ALSA uses for S24 in
    32-bit words, so the result shares the int32 full scale.

    Returns:
        Array of shape ``(frames, channels)``.

    Raises:
        ValueError: ``channels`` < 1 or the length is not a whole number of frames.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    packed = np.frombuffer(raw, dtype=np.uint8)
    frame_bytes = 3 * channels
    if packed.size % frame_bytes:
        raise ValueError(
            f"{packed.size} bytes is not a whole number of 24-bit frames "
            f"of {channels} channel(s) ({frame_bytes} bytes each)"
        )
    words = np.zeros((packed.size // 3, 4), dtype=np.uint8)
    # Little-endian int32 bytes [0, lo, mid, hi] == 24-bit sample shifted left by 8.
    words[:, 1:] = packed.reshape(-1, 3)
    samples = words.view(np.dtype("<i4")).astype(np.int32, copy=False)
    return samples.reshape(-1, channels)


def mix_down(x: NDArray[Any], channels: int) -> NDArray[np.float32]:
    """Map a ``(frames, in_channels)`` block to float32 ``(frames, channels)``.

    N -> 1 averages the channels, 1 -> N duplicates, equal counts only convert,
    and N -> M with M < N keeps the first M channels (mic arrays put the useful
    capsules first). 1-D input is treated as mono.

    Raises:
        ValueError: ``channels`` < 1, or M > N with N > 1 (no sensible upmix).
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    f = to_float32(x)
    if f.ndim == 1:
        f = f.reshape(-1, 1)
    elif f.ndim != 2:
        raise ValueError(f"expected a (frames, channels) block, got shape {x.shape}")
    in_ch = f.shape[1]
    if in_ch == channels:
        return f
    if channels == 1:
        mono: NDArray[np.float32] = f.mean(axis=1, dtype=np.float32, keepdims=True)
        return mono
    if in_ch == 1:
        return np.repeat(f, channels, axis=1)
    if channels < in_ch:
        return f[:, :channels]
    raise ValueError(f"cannot map {in_ch} channels to {channels}")


@dataclass(frozen=True)
class Levels:
    """Signal levels of a block, in dB relative to full scale (floored at DB_FLOOR)."""

    rms_dbfs: float
    peak_dbfs: float
    clipped: bool


def _dbfs(value: float) -> float:
    if value <= 0.0:
        return DB_FLOOR
    return max(DB_FLOOR, 20.0 * math.log10(value))


def levels(x: NDArray[Any]) -> Levels:
    """Measure RMS and peak over all samples of a block.

    A full-scale sine reads -3.01 dBFS RMS and 0 dBFS peak; silence (or an
    empty block) reads :data:`DB_FLOOR` rather than -inf.
    """
    f = to_float32(x)
    if f.size == 0:
        return Levels(DB_FLOOR, DB_FLOOR, False)
    rms = float(np.sqrt(np.mean(np.square(f, dtype=np.float64))))
    peak = float(np.max(np.abs(f)))
    return Levels(_dbfs(rms), _dbfs(peak), peak >= CLIP_THRESHOLD)


def to_bytes_le(x: NDArray[Any]) -> bytes:
    """Serialise a block as little-endian interleaved PCM in its own sample format."""
    return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()


def pcm_from_bytes(
    raw: bytes | bytearray | memoryview, fmt: SampleFormat | str, channels: int
) -> NDArray[Any]:
    """Parse little-endian interleaved PCM into a new ``(frames, channels)`` array.

    Raises:
        ValueError: bad ``channels`` or a length that is not a whole number of frames.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    native = numpy_dtype(fmt)
    frame_bytes = native.itemsize * channels
    nbytes = memoryview(raw).nbytes
    if nbytes % frame_bytes:
        raise ValueError(
            f"{nbytes} bytes is not a whole number of {fmt} frames "
            f"of {channels} channel(s) ({frame_bytes} bytes each)"
        )
    samples = np.frombuffer(raw, dtype=native.newbyteorder("<")).astype(native)
    return samples.reshape(-1, channels)


def _wav_ready(x: NDArray[Any]) -> NDArray[Any]:
    """Return a 2-D int16/int32 block that the ``wave`` module can store as PCM."""
    block = x.reshape(-1, 1) if x.ndim == 1 else x
    if block.ndim != 2:
        raise ValueError(f"expected a (frames, channels) block, got shape {x.shape}")
    if block.dtype in (np.int16, np.int32):
        return block
    # Float audio is stored as 16-bit: what every WAV reader accepts.
    return from_float32(to_float32(block), SampleFormat.INT16)


def _open_target(path_or_file: str | os.PathLike[str] | BinaryIO) -> str | BinaryIO:
    """What ``wave.open`` accepts: a str path (it ignores PathLike) or a file object."""
    if isinstance(path_or_file, str | os.PathLike):
        return os.fspath(path_or_file)
    return path_or_file


def write_wav(path_or_file: str | os.PathLike[str] | BinaryIO, x: NDArray[Any], rate: int) -> None:
    """Write a block as a PCM WAV file.

    int16 is stored as 16-bit, int32 as 32-bit, float as 16-bit. ``path_or_file``
    may be a path or a binary file object opened for writing.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    block = _wav_ready(x)
    target = _open_target(path_or_file)
    with wave.open(target, "wb") as w:
        w.setnchannels(block.shape[1])
        w.setsampwidth(block.dtype.itemsize)
        w.setframerate(rate)
        w.writeframes(to_bytes_le(block))


def wav_bytes(x: NDArray[Any], rate: int) -> bytes:
    """Return a block encoded as a complete PCM WAV file in memory."""
    buf = io.BytesIO()
    write_wav(buf, x, rate)
    return buf.getvalue()


def read_wav(path: str | os.PathLike[str] | BinaryIO, *, start: int = 0,
             frames: int | None = None) -> tuple[NDArray[Any], int]:
    """Read a PCM WAV file, or `frames` frames of it from frame `start` on.

    Returns:
        ``(samples, rate)`` with samples shaped ``(frames, channels)``: int16 for
        8- and 16-bit files, left-justified int32 for 24- and 32-bit files. A
        file cut short (e.g. by a power cut) yields the whole frames it holds.

    Raises:
        ValueError: ``"<path>: not a PCM WAV file (<reason>)"`` for anything
            that is not plain integer PCM WAV (including float and, on Python
            3.11, WAVE_FORMAT_EXTENSIBLE files).
    """
    target = _open_target(path)
    name = target if isinstance(target, str) else getattr(target, "name", None)
    if not isinstance(name, str):  # a stream, or a file opened from a descriptor
        name = "<stream>"
    try:
        with wave.open(target, "rb") as w:
            channels = w.getnchannels()
            width = w.getsampwidth()
            rate = w.getframerate()
            first = min(start, w.getnframes())
            w.setpos(first)
            nframes = w.getnframes() - first
            if frames is not None:
                nframes = min(nframes, frames)
            raw = w.readframes(nframes)
    except wave.Error as exc:
        reason = str(exc)
        if reason == "unknown format: 65534":
            reason += " (WAVE_FORMAT_EXTENSIBLE; rewrite as plain PCM, e.g. ffmpeg -c:a pcm_s16le)"
        elif reason == "unknown format: 3":
            reason += " (IEEE float; rewrite as integer PCM)"
        raise ValueError(f"{name}: not a PCM WAV file ({reason})") from exc
    except EOFError as exc:
        raise ValueError(f"{name}: not a PCM WAV file (file ends inside the header)") from exc
    if channels < 1 or rate <= 0:
        raise ValueError(f"{name}: not a PCM WAV file ({channels} channels at {rate} Hz)")
    frame_bytes = width * channels
    whole = len(raw) // frame_bytes
    if whole != nframes:
        logger.warning("%s: header says %d frames, file holds %d", name, nframes, whole)
    raw = raw[: whole * frame_bytes]
    if width == 1:
        u8 = np.frombuffer(raw, dtype=np.uint8).astype(np.int16)
        samples: NDArray[Any] = ((u8 - 128) << 8).reshape(-1, channels)
    elif width == 2:
        samples = pcm_from_bytes(raw, SampleFormat.INT16, channels)
    elif width == 3:
        samples = unpack_int24(raw, channels)
    elif width == 4:
        samples = pcm_from_bytes(raw, SampleFormat.INT32, channels)
    else:
        raise ValueError(f"{name}: not a PCM WAV file ({8 * width}-bit samples)")
    return samples, rate


# Incremental WAV writing: the header first, sizes patched in as data becomes durable.


def wav_header(rate: int, channels: int, width: int, data_bytes: int) -> bytes:
    """A 44-byte PCM WAV header; sizes saturate at 4 GiB (the streaming convention)."""
    block = channels * width
    riff = min(36 + data_bytes, 0xFFFFFFFF)
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI", b"RIFF", riff, b"WAVE", b"fmt ", 16, 1, channels, rate,
        rate * block, block, width * 8, b"data", min(data_bytes, 0xFFFFFFFF),
    )


WAV_HEADER_BYTES = 44


def wav_size_patches(data_bytes: int) -> list[tuple[int, bytes]]:
    """Patches setting the RIFF and data chunk sizes of a 44-byte header."""
    riff = min(36 + data_bytes, 0xFFFFFFFF)
    return [(4, struct.pack("<I", riff)), (40, struct.pack("<I", min(data_bytes, 0xFFFFFFFF)))]
