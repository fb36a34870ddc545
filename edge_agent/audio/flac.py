"""Ogg FLAC through libFLAC (bound by pyogg): the lossless segment format.

The spool writes it, the device API and the AudioRecorder encode to it, and the
device API decodes spooled segments. Ogg framing gives every page a CRC, so a
file cut by a power cut is salvaged page by page, like Ogg Opus.

Part of ``audio/``: no Trio; imports only ``errors`` and ``audio.pcm``.
"""

from __future__ import annotations

import ctypes
import io
import secrets
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

from ..errors import EdgeAgentError
from .pcm import SampleFormat, from_float32, to_float32

__all__ = ["FlacError", "OggFlacEncoder", "decode_ogg_flac"]


class FlacError(EdgeAgentError, RuntimeError):
    """libFLAC is missing, refused the settings, or could not decode a stream."""


class OggFlacEncoder:
    """libFLAC's stream encoder writing Ogg FLAC through a write callback.

    Its methods follow the spool's encoder protocol: `finish` returns the last
    bytes and header patches (none for FLAC), `after_sync` the patches after an
    fsync (none: Ogg pages carry CRCs, so recovery finds the intact ones).
    """

    def __init__(self, rate: int, channels: int, sample_format: SampleFormat) -> None:
        from pyogg import flac as F  # optional at runtime: only FLAC segments need libFLAC

        if not F.PYOGG_FLAC_AVAIL:
            raise FlacError("libFLAC is not available (install the libflac12 system package)")
        self._F = F
        self._bits = 16 if sample_format is SampleFormat.INT16 else 24
        self._format = sample_format
        self._channels = channels
        self._out: list[bytes] = []
        self._enc: Any = F.libflac.FLAC__stream_encoder_new()
        if not self._enc:
            raise FlacError("FLAC__stream_encoder_new failed")
        lib = F.libflac
        ok = (
            lib.FLAC__stream_encoder_set_channels(self._enc, channels)
            and lib.FLAC__stream_encoder_set_bits_per_sample(self._enc, self._bits)
            and lib.FLAC__stream_encoder_set_sample_rate(self._enc, rate)
            and lib.FLAC__stream_encoder_set_compression_level(self._enc, 5)
            and lib.FLAC__stream_encoder_set_ogg_serial_number(
                self._enc, secrets.randbits(31)
            )
        )

        def on_write(_enc: Any, buf: Any, nbytes: int, _samples: int, _frame: int,
                     _data: Any) -> int:
            self._out.append(ctypes.string_at(buf, nbytes))
            return 0  # FLAC__STREAM_ENCODER_WRITE_STATUS_OK

        # Kept on self: libFLAC calls it until the encoder is deleted.
        self._callback = F.FLAC__StreamEncoderWriteCallback(on_write)
        status = -1
        if ok:
            status = lib.FLAC__stream_encoder_init_ogg_stream(
                self._enc, F.FLAC__StreamEncoderReadCallback(), self._callback,
                F.FLAC__StreamEncoderSeekCallback(), F.FLAC__StreamEncoderTellCallback(),
                F.FLAC__StreamEncoderMetadataCallback(), None,
            )
        if status != 0:
            self.close()
            raise FlacError(f"libFLAC refused {channels} ch at {rate} Hz (init status {status})")

    def _take(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        return data

    def start(self) -> bytes:
        return self._take()

    def write(self, pcm: NDArray[Any]) -> bytes:
        if self._format is SampleFormat.INT16:
            ints = pcm.astype(np.int32)
        elif self._format is SampleFormat.INT32:
            ints = pcm.astype(np.int32) >> 8
        else:
            ints = from_float32(to_float32(pcm), SampleFormat.INT32) >> 8
        block = np.ascontiguousarray(ints, dtype=np.int32)
        frames = int(block.shape[0])
        ptr = block.ctypes.data_as(ctypes.POINTER(self._F.FLAC__int32 * 0))
        if not self._F.libflac.FLAC__stream_encoder_process_interleaved(self._enc, ptr, frames):
            raise FlacError(f"FLAC encoder failed: {self._state()}")
        return self._take()

    def _state(self) -> str:
        text = self._F.libflac.FLAC__stream_encoder_get_resolved_state_string(self._enc)
        return text.decode("utf-8", "replace") if text else "unknown state"

    def flush(self) -> bytes:
        # libFLAC emits a frame per block (4096 samples) and cannot be flushed early.
        return self._take()

    def finish(self) -> tuple[bytes, list[tuple[int, bytes]]]:
        if not self._F.libflac.FLAC__stream_encoder_finish(self._enc):
            raise FlacError(f"FLAC encoder failed to finish: {self._state()}")
        return self._take(), []

    def after_sync(self, durable_bytes: int) -> list[tuple[int, bytes]]:
        return []

    def close(self) -> None:
        enc, self._enc = self._enc, None
        if enc:
            self._F.libflac.FLAC__stream_encoder_delete(enc)


_END_OF_STREAM = 4  # FLAC__STREAM_DECODER_END_OF_STREAM
_BY_SAMPLE_NUMBER = 1  # FLAC__FRAME_NUMBER_TYPE_SAMPLE_NUMBER


def decode_ogg_flac(source: bytes | BinaryIO, sample_format: str, *, first: int = 0,
                    last: int | None = None) -> NDArray[np.int32] | NDArray[np.int16]:
    """Decode an Ogg FLAC file (as the spool writes it) to int16 or left-justified int32.

    Only frames ``[first, last)`` are decoded: libFLAC seeks to `first` and
    decoding stops at `last`. `source` is the file's bytes or the open file
    itself, read as libFLAC asks, so a long file is never held in memory and a
    storage error is a FlacError, not a crash.
    """
    from pyogg import flac as F  # only FLAC segments need libFLAC

    if not F.PYOGG_FLAC_AVAIL:
        raise FlacError("libFLAC is not available (install the libflac12 package)")
    lib = F.libflac
    f = io.BytesIO(source) if isinstance(source, bytes) else source
    f.seek(0)
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    blocks: list[NDArray[np.int32]] = []
    errors: list[int] = []
    io_errors: list[OSError] = []
    decoded = 0  # frames decoded so far
    bits = 0

    # libFLAC ignores a Python exception in a callback, so a failed read or
    # seek is kept and reported through the callback's status.
    def on_read(_dec: Any, buffer: Any, nbytes: Any, _client: Any) -> int:
        try:
            chunk = f.read(int(nbytes[0]))
        except OSError as exc:
            io_errors.append(exc)
            return 2  # FLAC__STREAM_DECODER_READ_STATUS_ABORT
        nbytes[0] = len(chunk)
        if not chunk:
            return 1  # END_OF_STREAM
        ctypes.memmove(buffer, chunk, len(chunk))
        return 0  # CONTINUE

    def on_write(_dec: Any, frame: Any, buffer: Any, _client: Any) -> int:
        nonlocal bits, decoded
        header = frame.contents.header
        n, channels = int(header.blocksize), int(header.channels)
        bits = int(header.bits_per_sample)
        # Where the frame starts: libFLAC numbers frames by sample (and trims the
        # frame a seek lands in so that it starts at the target).
        at = (int(header.number.sample_number) if header.number_type == _BY_SAMPLE_NUMBER
              else decoded)
        lo = max(first - at, 0)
        hi = n if last is None else min(n, last - at)
        decoded = at + n
        if hi <= lo:
            return 0  # CONTINUE: outside [first, last)
        planes = ctypes.cast(buffer, ctypes.POINTER(ctypes.POINTER(ctypes.c_int32)))
        block = np.empty((hi - lo, channels), dtype=np.int32)
        for c in range(channels):
            block[:, c] = np.ctypeslib.as_array(planes[c], shape=(n,))[lo:hi]
        blocks.append(block)
        return 0  # CONTINUE

    def on_seek(_dec: Any, offset: int, _client: Any) -> int:
        try:
            f.seek(int(offset))
        except OSError as exc:
            io_errors.append(exc)
            return 1  # ERROR
        return 0  # OK

    def on_tell(_dec: Any, offset: Any, _client: Any) -> int:
        offset[0] = f.tell()
        return 0  # OK

    def on_length(_dec: Any, length: Any, _client: Any) -> int:
        length[0] = size
        return 0  # OK

    def on_eof(_dec: Any, _client: Any) -> bool:
        return f.tell() >= size

    def on_error(_dec: Any, status: int, _client: Any) -> None:
        errors.append(int(status))

    callbacks = (F.FLAC__StreamDecoderReadCallback(on_read),
                 F.FLAC__StreamDecoderSeekCallback(on_seek),
                 F.FLAC__StreamDecoderTellCallback(on_tell),
                 F.FLAC__StreamDecoderLengthCallback(on_length),
                 F.FLAC__StreamDecoderEofCallback(on_eof),
                 F.FLAC__StreamDecoderWriteCallback(on_write),
                 F.FLAC__StreamDecoderMetadataCallback(),
                 F.FLAC__StreamDecoderErrorCallback(on_error))
    dec = lib.FLAC__stream_decoder_new()
    if not dec:
        raise FlacError("FLAC__stream_decoder_new failed")
    try:
        status = lib.FLAC__stream_decoder_init_ogg_stream(dec, *callbacks, None)
        if status != 0:
            raise FlacError(f"libFLAC refused the stream (init status {status})")
        if first > 0 and not lib.FLAC__stream_decoder_seek_absolute(dec, first):
            # Not seekable (a salvaged file): decode from the start, keep from `first`.
            lib.FLAC__stream_decoder_reset(dec)
            blocks.clear()
            decoded = 0
        errors.clear()  # a seek's search may lose sync on the way; that is no error
        ok = True
        while ok and (last is None or decoded < last):
            ok = lib.FLAC__stream_decoder_process_single(dec)
            if lib.FLAC__stream_decoder_get_state(dec) == _END_OF_STREAM:
                break
        lib.FLAC__stream_decoder_finish(dec)
    finally:
        lib.FLAC__stream_decoder_delete(dec)
    if io_errors:
        raise FlacError(f"reading the file failed: {io_errors[0]}")
    if not ok or errors:
        raise FlacError(f"Ogg FLAC decoding failed (errors {errors})")
    if not blocks:
        return np.zeros((0, 1), dtype=np.int16)
    pcm = np.concatenate(blocks)
    if bits <= 16 and sample_format == SampleFormat.INT16.value:
        return pcm.astype(np.int16)
    return np.left_shift(pcm, 32 - bits).astype(np.int32)
