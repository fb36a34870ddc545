"""Ogg Opus encoding (libopusenc pull API) and decoding (libopusfile), via pyogg.

The encoder hands back complete Ogg pages as they are produced, so callers can
append them to a file or a request body as they go. Three libopusenc defaults
are changed on purpose:

* decision delay 0 (default 2 s): libopusenc otherwise keeps two seconds of
  audio unencoded, which :meth:`OggOpusEncoder.flush` cannot force out;
* comment padding 0 (default 512 bytes): nobody edits tags in place, and the
  padding would cost ~15% of a one-second STT chunk;
* an explicit random serial number: libopusenc 0.2.1 uses ``rand()`` unseeded,
  so every process would start with the same serial.

What a flush cannot force out: the last partial Opus frame plus the encoder
look-ahead (~30 ms at 20 ms frames) stay inside libopusenc until more audio or
:meth:`OggOpusEncoder.finish` arrives.

Decoded audio is always 48 kHz float32 (what libopusfile delivers); the
OpusHead "input sample rate" only records what the encoder was fed, and the
pre-skip (encoder look-ahead, 312 samples at 48 kHz) is removed by the decoder.

All calls into the C libraries go through ctypes, which releases the GIL, so
encoding and decoding in a worker thread (``blocking.ThreadRunner``) runs in
parallel with the event loop. An encoder instance is not thread-safe: use it from one thread at
a time.

Part of ``audio/``: no Trio; imports only ``errors`` and ``audio.pcm``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, Self

import numpy as np
from numpy.typing import NDArray
from pyogg import opus as _lib

from ..errors import EdgeAgentError
from .pcm import to_float32

__all__ = [
    "APPLICATIONS",
    "COMPLEXITIES",
    "DECODE_RATE",
    "FRAME_MS",
    "DecodedOpus",
    "OggOpusEncoder",
    "OpusError",
    "decode_ogg_opus",
    "decode_ogg_opus_file",
    "opus_packet_samples",
]

logger = logging.getLogger(__name__)

#: Opus application modes by name (values from opus_defines.h).
APPLICATIONS: Final = {"voip": 2048, "audio": 2049, "lowdelay": 2051}
#: Opus frame durations in milliseconds that libopusenc accepts here.
FRAME_MS: Final = (2.5, 5, 10, 20, 40, 60)
#: The rate libopusfile always decodes to.
DECODE_RATE: Final = 48000
#: Encoder complexities libopus takes: 0 costs least CPU, 10 (its default) keeps most.
COMPLEXITIES: Final = range(11)

# OPUS_FRAMESIZE_2_5_MS .. OPUS_FRAMESIZE_60_MS
_FRAME_REQUESTS: Final = dict(zip(FRAME_MS, range(5001, 5007), strict=True))
_OPUS_SET_APPLICATION: Final = 4000
_OPUS_SET_BITRATE: Final = 4002
_OPUS_SET_COMPLEXITY: Final = 4010
_OPUS_SET_EXPERT_FRAME_DURATION: Final = 4040
_OPE_SET_DECISION_DELAY: Final = 14000
_OPE_SET_MUXING_DELAY: Final = 14002
_OPE_SET_COMMENT_PADDING: Final = 14004
_OPE_SET_SERIALNO: Final = 14006
_OP_HOLE: Final = -3
_OP_ERRORS: Final = {
    -1: "OP_FALSE: request failed",
    -2: "OP_EOF: end of file",
    -3: "OP_HOLE: gap in the page sequence",
    -128: "OP_EREAD: read error",
    -129: "OP_EFAULT: internal memory or library error",
    -130: "OP_EIMPL: unsupported feature",
    -131: "OP_EINVAL: invalid argument",
    -132: "OP_ENOTFORMAT: not an Ogg Opus stream",
    -133: "OP_EBADHEADER: bad or missing Opus header",
    -134: "OP_EVERSION: unsupported Opus header version",
    -135: "OP_ENOTAUDIO: not audio",
    -136: "OP_EBADPACKET: bad audio packet",
    -137: "OP_EBADLINK: bad link in the stream",
    -138: "OP_ENOSEEK: stream not seekable",
    -139: "OP_EBADTIMESTAMP: bad granule positions",
}
# libopusfile's recommended read size: 120 ms at 48 kHz per channel.
_READ_FRAMES: Final = 5760
_MAX_CHANNELS: Final = 8

_c_ubyte_p = ctypes.POINTER(ctypes.c_ubyte)
_c_int16_p = ctypes.POINTER(ctypes.c_int16)
_c_float_p = ctypes.POINTER(ctypes.c_float)


class OpusError(EdgeAgentError, RuntimeError):
    """A libopusenc/libopusfile call failed, or the encoder was misused."""


def _ope_error(what: str, code: int) -> OpusError:
    text = _lib.ope_strerror(code)
    reason = text.decode("utf-8", "replace") if text else "unknown error"
    return OpusError(f"{what}: {reason} ({code})")


def _op_error(what: str, code: int, reads: _FileReads | None = None) -> OpusError:
    if reads is not None and reads.error is not None:
        return OpusError(f"reading the file failed: {reads.error}")
    return OpusError(f"{what}: {_OP_ERRORS.get(code, 'unknown libopusfile error')} ({code})")


def _require(available: bool, name: str) -> None:
    if not available:
        raise OpusError(f"{name} is not available (install the {name}0 system package)")


class OggOpusEncoder:
    """Incremental Ogg Opus encoder that returns complete pages as they form.

    Each instance writes one logical Ogg Opus stream. Feed PCM with
    :meth:`write`, make what was written durable-and-decodable with
    :meth:`flush`, end the stream with :meth:`finish`. The C encoder is freed by
    :meth:`close` (also on ``with`` exit and, as a safety net, on garbage
    collection).

    Args:
        rate: input sample rate in Hz; libopusenc resamples to 48 kHz
            internally and records ``rate`` in the OpusHead.
        channels: 1 to 8. 3+ use Vorbis surround mapping (family 1), the only
            multichannel mapping libopusfile decodes; it may couple pairs.
        bitrate: target bits per second for the whole stream.
        application: a key of :data:`APPLICATIONS`.
        frame_ms: one of :data:`FRAME_MS`.
        comments: Vorbis-comment tags, e.g. ``{"TITLE": "..."}``.
        serial: Ogg stream serial number; random when None.
        max_page_delay_ms: longest audio span held in one unfinished page
            before it is emitted.
        complexity: a value of :data:`COMPLEXITIES`: the CPU libopus may spend
            per frame to get more quality out of the bit rate.

    Raises:
        ValueError: an argument is out of range (the message names it).
        OpusError: libopusenc is missing or refused the configuration.
    """

    def __init__(
        self,
        rate: int,
        channels: int,
        *,
        bitrate: int = 24000,
        application: str = "voip",
        frame_ms: float = 20,
        comments: dict[str, str] | None = None,
        serial: int | None = None,
        max_page_delay_ms: int = 1000,
        complexity: int = 10,
    ) -> None:
        self._enc: Any = None
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if not 1 <= channels <= _MAX_CHANNELS:
            raise ValueError(f"channels must be 1..{_MAX_CHANNELS}, got {channels}")
        if not 500 <= bitrate <= 512000 * channels:
            raise ValueError(f"bitrate must be 500..{512000 * channels} bit/s, got {bitrate}")
        if application not in APPLICATIONS:
            raise ValueError(
                f"application must be one of {sorted(APPLICATIONS)}, got {application!r}"
            )
        if frame_ms not in _FRAME_REQUESTS:
            raise ValueError(f"frame_ms must be one of {FRAME_MS}, got {frame_ms}")
        if serial is not None and not 0 <= serial < 2**32:
            raise ValueError(f"serial must be 0..2**32-1, got {serial}")
        if max_page_delay_ms < 0:
            raise ValueError(f"max_page_delay_ms must be >= 0, got {max_page_delay_ms}")
        if complexity not in COMPLEXITIES:
            raise ValueError(f"complexity must be 0..10, got {complexity}")
        for tag in comments or {}:
            if not tag or "=" in tag or not tag.isascii():
                raise ValueError(f"comments: invalid tag name {tag!r}")
        _require(_lib.PYOGG_OPUS_ENC_AVAIL, "libopusenc")

        self.rate: Final = rate
        self.channels: Final = channels
        self._samples_written = 0
        self._bytes_out = 0
        self._started = False
        self._finished = False
        self._page = _c_ubyte_p()
        self._page_len = ctypes.c_int32(0)
        self._empty16 = np.zeros(channels, dtype=np.int16)

        c_comments = _lib.ope_comments_create()
        if not c_comments:
            raise OpusError("ope_comments_create failed")
        try:
            for tag, value in (comments or {}).items():
                ret = _lib.ope_comments_add(c_comments, tag.encode(), value.encode("utf-8"))
                if ret != 0:
                    raise _ope_error(f"comments: cannot add {tag!r}", ret)
            err = ctypes.c_int(0)
            family = 0 if channels <= 2 else 1
            enc = _lib.ope_encoder_create_pull(
                c_comments, rate, channels, family, ctypes.byref(err)
            )
        finally:
            # The encoder keeps its own copy of the comments.
            _lib.ope_comments_destroy(c_comments)
        if not enc or err.value != 0:
            if enc:
                _lib.ope_encoder_destroy(enc)
            raise _ope_error("ope_encoder_create_pull", err.value)
        self._enc = enc

        if serial is None:
            serial = random.getrandbits(32)
        self._ctl("application", _OPUS_SET_APPLICATION, APPLICATIONS[application])
        self._ctl("bitrate", _OPUS_SET_BITRATE, bitrate)
        self._ctl("complexity", _OPUS_SET_COMPLEXITY, complexity)
        self._ctl("frame_ms", _OPUS_SET_EXPERT_FRAME_DURATION, _FRAME_REQUESTS[frame_ms])
        self._ctl("max_page_delay_ms", _OPE_SET_MUXING_DELAY, max_page_delay_ms * 48)
        self._ctl("decision delay", _OPE_SET_DECISION_DELAY, 0)
        self._ctl("comment padding", _OPE_SET_COMMENT_PADDING, 0)
        self._ctl("serial", _OPE_SET_SERIALNO, serial)

    def _ctl(self, what: str, request: int, value: int) -> None:
        ret = _lib.ope_encoder_ctl(self._enc, request, ctypes.c_int32(value))
        if ret != 0:
            self.close()
            raise _ope_error(f"cannot set {what} to {value}", ret)

    @property
    def samples_written(self) -> int:
        """Frames (samples per channel) written so far, at the input rate."""
        return self._samples_written

    @property
    def bytes_out(self) -> int:
        """Bytes of Ogg pages returned so far."""
        return self._bytes_out

    def _check_open(self) -> None:
        if self._enc is None:
            raise OpusError("encoder is closed")
        if self._finished:
            raise OpusError("encoder is finished; start a new one for a new stream")

    def _pages(self, flush: bool) -> bytes:
        """Collect every page libopusenc has ready (forcing a partial one if ``flush``)."""
        out: list[bytes] = []
        while True:
            ret = _lib.ope_encoder_get_page(
                self._enc, ctypes.byref(self._page), ctypes.byref(self._page_len), int(flush)
            )
            if ret < 0:
                raise _ope_error("ope_encoder_get_page", ret)
            if ret == 0:
                break
            # The page buffer belongs to libopusenc and is reused: copy it now.
            out.append(ctypes.string_at(self._page, self._page_len.value))
        data = b"".join(out)
        self._bytes_out += len(data)
        return data

    def _start(self) -> None:
        """Start the stream (header pages) if no audio has been written yet.

        A zero-length write, not ope_encoder_flush_header: libopusenc 0.2.1
        only sets the stream's end position in write, and draining a stream
        that never saw a write reads it uninitialised (and may abort).
        """
        if self._started:
            return
        ret = _lib.ope_encoder_write(self._enc, self._empty16.ctypes.data_as(_c_int16_p), 0)
        if ret != 0:
            raise _ope_error("ope_encoder_write", ret)
        self._started = True

    def write(self, pcm: NDArray[Any]) -> bytes:
        """Encode a block and return the Ogg pages completed so far (may be ``b""``).

        Args:
            pcm: ``(frames, channels)`` (or ``(frames,)`` when mono) int16 or
                float32; other dtypes are converted with ``pcm.to_float32``.

        Raises:
            ValueError: the block's shape does not match ``channels``.
            OpusError: the encoder is closed/finished or libopusenc failed.
        """
        self._check_open()
        if pcm.ndim == 1 and self.channels == 1:
            pcm = pcm.reshape(-1, 1)
        if pcm.ndim != 2 or pcm.shape[1] != self.channels:
            raise ValueError(f"pcm: expected (frames, {self.channels}), got shape {pcm.shape}")
        frames = int(pcm.shape[0])
        if frames == 0:
            return b""
        if pcm.dtype == np.int16:
            block16 = np.ascontiguousarray(pcm)
            ptr16 = block16.ctypes.data_as(_c_int16_p)
            ret = _lib.ope_encoder_write(self._enc, ptr16, frames)
        else:
            blockf = np.ascontiguousarray(to_float32(pcm))
            ptrf = blockf.ctypes.data_as(_c_float_p)
            ret = _lib.ope_encoder_write_float(self._enc, ptrf, frames)
        if ret != 0:
            raise _ope_error("ope_encoder_write", ret)
        self._started = True
        self._samples_written += frames
        return self._pages(flush=False)

    def flush(self) -> bytes:
        """Force everything encoded so far out as complete pages; the stream stays open.

        Bytes returned so far then form a decodable (if unterminated) file up
        to roughly the last written sample (less the final partial frame and
        look-ahead). Each flush ends a page early, so flushing very often
        costs ~30 bytes of page overhead per flush.
        """
        self._check_open()
        self._start()
        return self._pages(flush=True)

    def finish(self) -> bytes:
        """End the stream (pad, drain, end-of-stream page) and return the last pages.

        Later :meth:`write`/:meth:`flush` calls raise :class:`OpusError`; a
        second ``finish`` returns ``b""``.
        """
        if self._finished:
            return b""
        self._check_open()
        self._start()
        ret = _lib.ope_encoder_drain(self._enc)
        if ret != 0:
            raise _ope_error("ope_encoder_drain", ret)
        self._finished = True
        return self._pages(flush=False)

    def close(self) -> None:
        """Free the C encoder; safe to call more than once."""
        enc, self._enc = self._enc, None
        if enc is not None:
            _lib.ope_encoder_destroy(enc)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Safety net only; errors at interpreter shutdown are not actionable.
        with contextlib.suppress(Exception):
            self.close()


@dataclass(kw_only=True)
class DecodedOpus:
    """Decoded Ogg Opus audio."""

    pcm: NDArray[np.float32]
    """Samples shaped ``(frames, channels)`` at :attr:`rate`."""
    rate: int = DECODE_RATE
    channels: int
    input_rate: int
    """The sample rate the encoder was fed (OpusHead), for information only."""

    @property
    def seconds(self) -> float:
        """Duration of the decoded audio."""
        return float(self.pcm.shape[0]) / self.rate


class _FileReads:
    """libopusfile's read, seek and tell callbacks served from an open file, so
    a storage error ends the decode as OP_EREAD (kept in `error`) where reading
    through a memory map would kill the process with SIGBUS."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None
        # Kept on self: libopusfile calls them until op_free.
        self.callbacks = _lib.OpusFileCallbacks(
            _lib.op_read_func(self._read), _lib.op_seek_func(self._seek),
            _lib.op_tell_func(self._tell), _lib.op_close_func(),
        )

    def _read(self, _stream: Any, ptr: Any, nbytes: int) -> int:
        try:
            data = self.file.read(nbytes)
        except OSError as exc:
            self.error = exc
            return -1
        ctypes.memmove(ptr, data, len(data))
        return len(data)

    def _seek(self, _stream: Any, offset: int, whence: int) -> int:
        try:
            self.file.seek(offset, whence)
        except OSError as exc:
            self.error = exc
            return -1
        return 0

    def _tell(self, _stream: Any) -> int:
        return self.file.tell()


def decode_ogg_opus(source: bytes | bytearray | memoryview | BinaryIO, *, start: int = 0,
                    frames: int | None = None) -> DecodedOpus:
    """Decode a whole Ogg Opus file, or `frames` frames (at 48 kHz) from frame
    `start` on: libopusfile seeks sample-exactly, so only that part is decoded
    and held. `source` is the file's bytes or the open file itself (read as
    libopusfile asks, never whole).

    A file cut at a page boundary (as :func:`last_complete_page_end` leaves
    it) decodes fine; gaps inside the stream are skipped with a warning.

    Raises:
        OpusError: the bytes are not a decodable Ogg Opus stream, or reading
            the file failed.
    """
    _require(_lib.PYOGG_OPUS_FILE_AVAIL, "libopusfile")
    err = ctypes.c_int(0)
    reads: _FileReads | None = None
    view: NDArray[np.uint8] | None = None
    if isinstance(source, (bytes, bytearray, memoryview)):
        # libopusfile reads straight from the caller's buffer: no copy; ``view``
        # keeps it alive until op_free below.
        view = np.frombuffer(source, dtype=np.uint8)
        ptr = ctypes.cast(view.ctypes.data, _c_ubyte_p)
        of = _lib.op_open_memory(ptr, len(view), ctypes.byref(err))
    else:
        reads = _FileReads(source)
        of = _lib.op_open_callbacks(None, ctypes.byref(reads.callbacks), None, 0,
                                    ctypes.byref(err))
    if not of:
        del view  # a memoryview can only be released once no view of it is left
        raise _op_error("op_open", err.value, reads)
    try:
        channels = int(_lib.op_channel_count(of, -1))
        input_rate = int(_lib.op_head(of, -1).contents.input_sample_rate)
        total = max(int(_lib.op_pcm_total(of, -1)), 0)
        skip = 0
        if start > 0 and _lib.op_pcm_seek(of, ctypes.c_int64(start)) != 0:
            skip = start  # not seekable (damaged, or past the end): decode and drop
        limit = frames
        capacity = (max(total - start, 0) if limit is None else limit) + _READ_FRAMES
        out = np.empty((capacity, channels), dtype=np.float32)
        pos = 0
        link = ctypes.c_int(0)
        while limit is None or pos < limit:
            if capacity - pos < _READ_FRAMES:
                capacity *= 2
                out = np.resize(out, (capacity, channels))
            dst = ctypes.cast(out.ctypes.data + out.itemsize * channels * pos, _c_float_p)
            n = int(_lib.op_read_float(of, dst, (capacity - pos) * channels, ctypes.byref(link)))
            if n == _OP_HOLE:
                logger.warning("Ogg Opus stream has a gap; decoding continues after it")
                continue
            if n < 0:
                raise _op_error("op_read_float", n, reads)
            if n == 0:
                break
            if int(_lib.op_channel_count(of, link.value)) != channels:
                raise OpusError("chained streams with different channel counts are not supported")
            if skip:  # the stream could not seek: decode up to `start` and drop it
                dropped = min(skip, n)
                out[pos : pos + n - dropped] = out[pos + dropped : pos + n]
                skip -= dropped
                n -= dropped
            pos += n
    finally:
        _lib.op_free(of)
        del view
    if reads is not None and reads.error is not None:
        raise _op_error("op_read_float", 0, reads)
    if limit is not None:
        pos = min(pos, limit)
    return DecodedOpus(pcm=out[:pos], channels=channels, input_rate=input_rate)


def decode_ogg_opus_file(path: str | os.PathLike[str]) -> DecodedOpus:
    """Decode an Ogg Opus file from disk (see :func:`decode_ogg_opus`)."""
    with open(path, "rb") as f:
        try:
            return decode_ogg_opus(f)
        except OpusError as exc:
            raise OpusError(f"{os.fspath(path)}: {exc}") from exc


# --- Opus packets ------------------------------------------------------------



def opus_packet_samples(packet: bytes) -> int:
    """Samples at 48 kHz one Opus packet holds (libopus reads its TOC); 0 if invalid."""
    if not packet:
        return 0
    # pyogg declares the packet as a zero-length ubyte array: point one at the bytes.
    data = bytearray(packet)
    buf = (ctypes.c_ubyte * 0).from_buffer(data)
    n = int(_lib.opus_packet_get_nb_samples(buf, len(data), DECODE_RATE))
    return max(n, 0)
