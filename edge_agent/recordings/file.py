"""One recording: ring frames ``[start, stop)`` encoded incrementally into a file.

Owns `FileRecording` (the ring reader, the encoder fed in a worker thread, the
file finished with its patches and an fsync) and `Wakeable` (a wait on the ring
that a stop or the end of capture ends early). Used by the agent's recordings on
demand and by the `recorder` facade alike.

Imports only the bottom layer; never agent, recorder or another stage.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
from pathlib import Path
from typing import IO, Any

import trio
from numpy.typing import NDArray

from ..audio.encoders import StreamEncoder
from ..blocking import ThreadRunner
from ..clock import iso_utc
from ..fs import sync_file
from ..ring import AudioRing, ReadResult, RingReader
from ..supervisor import TaskStatus
from ..wire import GapNote

__all__ = ["FileRecording", "Wakeable", "next_block"]

log = logging.getLogger(__name__)


class Wakeable:
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


class FileRecording:
    """Frames ``[start, stop)`` of the ring encoded into `path` as they arrive.

    A ring reader takes the frames, a worker thread (``runner``) encodes and
    appends them, so memory does not depend on the recording's length.
    `request_stop` fixes the end; `run` then writes the rest, finishes the file
    (patches, fsync) and returns. If the writer falls more than the ring behind,
    the frames it lost are counted.
    """

    def __init__(self, ring: AudioRing, start: int, path: Path, encoder: StreamEncoder, *,
                 name: str, runner: ThreadRunner, max_frames: int | None = None,
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
        self._runner = runner
        self._max_frames = max_frames
        self._batch = max(1, round(batch_seconds * ring.rate))
        self._max_batch = max(self._batch, round(max_batch_seconds * ring.rate))
        self._wake = Wakeable()
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

    async def run(self, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        ring = self.ring
        reader = ring.open_reader(self.name, start=self.start)
        started = False
        try:
            await self._runner.run(self._open)
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
            await self._runner.run(self._finish)
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
        await self._runner.run(self._write, result.frames)

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
        # Finishing the streamed file in place: the spool's publish_file (or the
        # recorder's upload) moves it afterwards, so no temp-and-rename here.
        f = self._file
        assert f is not None
        tail, patches = self._enc.finish()
        self._append(tail)
        for offset, data in patches:
            f.seek(offset)
            f.write(data)
        sync_file(f)
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


async def next_block(reader: RingReader, n: int, rec: FileRecording,
                     wake: Wakeable) -> ReadResult | None:
    """The next `n` frames of `rec`'s ring for a listener reading alongside the
    recording (fewer at its end), None when the recording is over. ``wake`` ends
    the wait early (stop, end of capture)."""
    ring = rec.ring
    while True:
        stop = rec.stop_index
        end = ring.head if stop is None else stop
        available = end - max(reader.cursor, ring.tail)
        over = stop is not None or rec.capture_over
        if available >= n or (over and available > 0):
            return reader.read(min(n, available))
        if over:
            return None
        await wake.wait_for(ring, reader.cursor + n)
