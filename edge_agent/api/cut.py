"""Cutting a stretch of audio: the one implementation behind ``/v1/audio``, the
fleet mailbox's answers and the operator's ``fleet get``.

A cut is planned (`plan_held` on a device: ring and spool; `plan.plan_audio`
with ``ring=None`` for the operator, who has only segments fetched from the
bucket), given a `Renderer` (`open_renderer`: format, rate, channels, the exact
frame count) and produced by `produce` into a sink: a streamed response's
`render.Sink` or a `FileSink`. Segment audio is read through a `SegmentReader`:
`spool_reader` on the device, `file_reader` for downloaded segment files.
Either way at most one decoded window of a segment is in memory, and blocking
work (decode, encode, file writes) runs on the runners passed in.

Imports only the bottom layer (ring, clock, blocking, audio, wire) and the
API's own plan/decode/render/seams; never agent, another stage, metrics or
systemd.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Final, Protocol

import numpy as np
from numpy.typing import NDArray

from ..blocking import ThreadRunner
from ..clock import iso_utc
from ..ring import AudioRing, EvictedError
from ..wire import SegmentMeta, SegmentState
from .decode import (
    SegmentUnreadable,
    UnsafePath,
    decode_segment,
    open_segment,
    resample_exact,
    windows,
)
from .plan import AudioPlan, RingPiece, SegmentPiece, Silence, plan_audio
from .render import Abort, Renderer
from .seams import SpoolView

__all__ = [
    "AUDIO_FORMATS",
    "EXTENSIONS",
    "MAX_CHANNELS",
    "MAX_RATE",
    "MIN_RATE",
    "OPUS_BITRATE",
    "ByteSink",
    "FileSink",
    "RangeTooLong",
    "SegmentReader",
    "file_reader",
    "oldest_held",
    "open_renderer",
    "plan_held",
    "produce",
    "spool_reader",
]

#: Output formats and their content types. pcm is raw s16le, interleaved.
AUDIO_FORMATS: Final = {
    "opus": "audio/ogg; codecs=opus",
    "wav": "audio/wav",
    "flac": "audio/ogg; codecs=flac",
    "pcm": "application/octet-stream",
}
#: File name extensions by format (of responses, answers and segment downloads).
EXTENSIONS: Final = {"opus": "opus", "wav": "wav", "flac": "oga", "pcm": "raw"}
#: Opus bit rate of a cut unless asked otherwise (bit/s).
OPUS_BITRATE: Final = 64000
#: Output sample rates a cut may be asked for (Hz), and channels at most.
MIN_RATE: Final = 8000
MAX_RATE: Final = 192000
MAX_CHANNELS: Final = 8

_BLOCK_SECONDS = 1.0  # audio converted per trip to a worker thread
_WAV_LIMIT = 0xFFFFFFFF  # a RIFF file's sizes are 32-bit
_OLDEST_SCANNED = 50  # spooled segments looked at for the oldest audio held

#: The planned frames of one segment piece, at the plan's rate (a worker thread
#: calls it); raises `Abort` when the segment cannot be read.
SegmentReader = Callable[[SegmentPiece], NDArray[Any]]


class ByteSink(Protocol):
    """Where `produce` puts encoded bytes (`render.Sink`, `FileSink`)."""

    async def send(self, data: bytes) -> None: ...


class RangeTooLong(ValueError):
    """The cut does not fit the format asked for (a WAV file over 4 GiB)."""


# ----------------------------------------------------------------------------
# Planning on a device


def plan_held(ring: AudioRing, spool: SpoolView | None, start: float, end: float, *,
              fill: bool = False) -> AudioPlan:
    """Plan ``[start, end)`` from what the device holds: the ring, and the spool's
    segments that are not quarantined. The ring serves from a guard after its
    oldest frame (a quarter of it, at most 30 s), so what a slow cut reaches last
    is not overwritten first."""
    segments: list[SegmentMeta] = []
    if spool is not None:
        segments = [m for m, s in spool.list(since=start, until=end, newest_first=False)
                    if s is not SegmentState.QUARANTINED]
    guard = min(30.0, ring.capacity / ring.rate / 4)
    return plan_audio(ring, segments, start, end, fill=fill, guard=guard)


def oldest_held(ring: AudioRing, spool: SpoolView | None) -> float | None:
    """UTC of the oldest audio the device holds (ring or spool), None when nothing."""
    times = [ring.index_to_utc(ring.tail)] if ring.head > ring.tail else []
    if spool is not None:
        rows = spool.list(newest_first=False, limit=_OLDEST_SCANNED)
        times += [m.start_ts for m, s in rows if s is not SegmentState.QUARANTINED]
    return min(times) if times else None


# ----------------------------------------------------------------------------
# Rendering


def open_renderer(plan: AudioPlan, fmt: str, *, rate: int, channels: int, device_id: str,
                  bitrate: int = OPUS_BITRATE) -> Renderer:
    """The renderer of `plan` in `fmt` at `rate` and `channels`: exactly the plan's
    frames (converted to `rate`), tagged with the device and the cut's first time.

    Raises:
        RangeTooLong: a WAV file of this length would pass 4 GiB.
    """
    frames_out = plan.frames_at(rate)
    if fmt == "wav" and 44 + frames_out * channels * 2 > _WAV_LIMIT:
        raise RangeTooLong("this range is too long for a WAV file (4 GiB); ask for flac or pcm")
    comments = {"ENCODER": "edge-agent", "DEVICE": device_id,
                "DATE": iso_utc(plan.first_utc or plan.start)}
    return Renderer(fmt, plan.rate, rate, channels, bitrate, frames_out, comments)


# ----------------------------------------------------------------------------
# Producing


async def produce(plan: AudioPlan, renderer: Renderer, sink: ByteSink, *,
                  ring: AudioRing | None, read_segment: SegmentReader,
                  encode_runner: ThreadRunner, io_runner: ThreadRunner) -> None:
    """Render `plan` into `sink`, block by block in worker threads (at most one
    decoded segment window in memory). `renderer` is closed on return.

    Raises:
        Abort: audio planned from the ring left it before it was read, or a
            segment cannot be read (`read_segment`): the output is incomplete.
    """
    rate = plan.rate
    block = max(1, round(_BLOCK_SECONDS * rate))
    # Holes are zeros; mono stands for any layout (the renderer spreads it).
    silence_channels, silence_dtype = ((ring.channels, ring.dtype) if ring is not None
                                       else (1, np.dtype(np.float32)))

    async def render(pcm: NDArray[Any]) -> None:
        await sink.send(await encode_runner.run(renderer.feed, pcm))

    try:
        await sink.send(renderer.start())
        for item in plan.items:
            if isinstance(item, Silence):
                for n in _blocks(item.frames, block):
                    await render(np.zeros((n, silence_channels), dtype=silence_dtype))
            elif isinstance(item, RingPiece):
                if ring is None:
                    raise Abort("a ring piece was planned without a ring")
                for a in range(item.start, item.stop, block):
                    try:
                        pcm = ring.read(a, min(item.stop, a + block))
                    except EvictedError as exc:
                        raise Abort(f"audio from {iso_utc(item.utc)} left the ring before "
                                    f"it was sent: {exc}") from None
                    await render(pcm)
            else:
                for window in windows(item, rate):
                    pcm = await io_runner.run(read_segment, window)
                    for a in range(0, len(pcm), block):
                        await render(pcm[a : a + block])
                    del pcm
        await sink.send(await encode_runner.run(renderer.finish))
    finally:
        renderer.close()


def _blocks(total: int, size: int) -> Iterator[int]:
    while total > 0:
        n = min(size, total)
        yield n
        total -= n


# ----------------------------------------------------------------------------
# Reading segments


def _piece_pcm(fd: int, piece: SegmentPiece, rate: int) -> NDArray[Any]:
    """The piece's frames from the open file `fd`, at `rate`; closes `fd`."""
    meta = piece.meta
    try:
        part = decode_segment(fd, meta, piece.first, piece.last)
    except SegmentUnreadable as exc:
        raise Abort(f"segment {meta.id} cannot be decoded: {exc}") from None
    finally:
        os.close(fd)
    if meta.rate != rate:
        part = resample_exact(part, meta.rate, rate, piece.frames)
    return part


def spool_reader(spool: SpoolView | None, rate: int) -> SegmentReader:
    """Reads pieces from the spool's own files (opened safely below its root).
    Without a spool (segments disabled) no segment is ever planned."""

    def read(piece: SegmentPiece) -> NDArray[Any]:
        if spool is None:
            raise Abort(f"segment {piece.meta.id}: segments are disabled")
        try:
            fd, _size = open_segment(spool, piece.meta.id)
        except (FileNotFoundError, UnsafePath) as exc:
            raise Abort(f"segment {piece.meta.id} is no longer readable: {exc}") from None
        return _piece_pcm(fd, piece, rate)

    return read


def file_reader(path_of: Callable[[SegmentMeta], str | os.PathLike[str]],
                rate: int) -> SegmentReader:
    """Reads pieces from segment files elsewhere (downloaded from the bucket):
    `path_of` names the file of a segment."""

    def read(piece: SegmentPiece) -> NDArray[Any]:
        path = path_of(piece.meta)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise Abort(f"segment {piece.meta.id}: cannot open {path}: "
                        f"{exc.strerror or exc}") from None
        return _piece_pcm(fd, piece, rate)

    return read


# ----------------------------------------------------------------------------
# Writing to a file


class FileSink:
    """Writes what `produce` makes to an open binary file (in `runner`'s worker
    threads), counting the bytes and their SHA-256 on the way, so the file need
    not be read again to be described or uploaded with its checksum."""

    def __init__(self, file: BinaryIO, runner: ThreadRunner) -> None:
        self._file = file
        self._runner = runner
        self._digest = hashlib.sha256()
        self.bytes = 0

    async def send(self, data: bytes) -> None:
        if data:
            await self._runner.run(self._file.write, data)
            self._digest.update(data)
            self.bytes += len(data)

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of everything written so far."""
        return self._digest.hexdigest()
