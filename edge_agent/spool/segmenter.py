"""The segmenter: the supervised Trio task that moves audio from the ring into the spool.

Owns `Segmenter` (and `SegmenterStats`): it reads the ring from its own cursor, asks
the `SegmentCutter` where the open segment ends and what to write next, and hands
the work to the spool's `SegmentWriter` through a `ThreadRunner`; it notes overruns
and gaps, seals at each cut, and deals with disk errors (a full disk sets the
segment aside and salvages it once there is room; any other error rewrites it from
the ring after a backoff). Ring access stays on the Trio thread.

Imports only the bottom layer (``ring``, ``supervisor``, ``blocking``, ``clock``,
``config``, ``wire``, ``audio``) and this package; never agent or another stage.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
from dataclasses import dataclass, field
from typing import Final

import msgspec
import trio

from ..audio.flac import FlacError
from ..audio.opus import OpusError
from ..blocking import ThreadRunner
from ..clock import iso_utc
from ..config import SegmentsConfig
from ..ring import AudioRing, RingReader
from ..supervisor import Backoff, TaskStatus
from ..wire import ClockStepNote, GapNote, SegmentMeta
from .core import Spool
from .cutter import SegmentCutter
from .model import SpoolError
from .writer import SegmentWriter

__all__ = ["Segmenter", "SegmenterStats"]

log = logging.getLogger("edge_agent.spool")

# At shutdown a failed seal is retried (from the ring, in a new file) this many times
# in all, within the grace period, without backoff.
_FINAL_ATTEMPTS: Final = 3
#: Seals `Segmenter.sealed` keeps (1.3 kB of metadata each).
RECENT_SEALS: Final = 100
# At shutdown, the share of the seal grace spent encoding; if the encode is still
# behind then, the rest of the grace writes the backlog as WAV (a copy, no encoding).
_ENCODE_SHARE: Final = 0.5
_CAPTURE_STOP_WAIT: Final = 0.25
# Errors of writing a segment that the segmenter survives (anything else is a bug).
_WRITE_ERRORS: Final = (OSError, SpoolError, OpusError, FlacError)


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
    # Of those, frames captured but not yet written when the run ended.
    shutdown_lost_frames: int = 0
    last_error: str | None = None


@dataclass
class _Open:
    writer: SegmentWriter
    start: int  # ring index of the first frame
    end_mono: float  # the wall-clock boundary, on the monotonic clock
    gaps: list[GapNote] = field(default_factory=list)  # overruns inside the segment


class Segmenter:
    """Cuts the ring into wall-clock aligned segments and seals them into the spool.

    Ring access stays on the Trio thread; encoding and disk I/O run through
    ``runner`` (worker threads; tests pass an `InlineRunner` to stay deterministic
    under ``MockClock``). Its cursor survives restarts of :meth:`run`, so the
    supervisor restarting it never skips or repeats audio.

    Args:
        ring: The capture ring.
        spool: Where segments go; :meth:`Spool.recover` is run before the first start.
        config: The ``[segments]`` section.
        backoff: Delays between attempts after a disk error.
        runner: Runs the blocking work (default: a worker thread, one at a time).
        batch_seconds: Audio gathered for one trip to the worker thread (and one
            wake-up of this task). Default: ``fsync_seconds`` (at most
            ``max_write_seconds`` and a quarter of the ring), so each batch is
            written and made durable in one trip, and a crash of either kind (the
            process killed, the power cut) loses at most that much.
        seal_grace: Bound on sealing the open segment when the task is cancelled.
        max_write_seconds: Most audio handed to the encoder in one call.
    """

    def __init__(self, ring: AudioRing, spool: Spool, config: SegmentsConfig, *,
                 backoff: Backoff | None = None, runner: ThreadRunner | None = None,
                 batch_seconds: float | None = None, seal_grace: float = 3.5,
                 max_write_seconds: float = 10.0) -> None:
        self.ring = ring
        self.spool = spool
        self.config = config
        self.backoff = backoff or Backoff(initial=1.0, maximum=30.0)
        self.runner = runner or ThreadRunner(1)
        if batch_seconds is None:
            batch_seconds = min(config.fsync_seconds, max_write_seconds,
                                ring.capacity / ring.rate / 4)
        self.batch_seconds = batch_seconds
        self.seal_grace = seal_grace
        self.cutter = SegmentCutter(seconds=config.seconds, rate=ring.rate,
                                    max_write_frames=max(1, round(max_write_seconds * ring.rate)))
        self.stats = SegmenterStats()
        # This run's latest seals (the demo's report, tests); the spool has them all.
        self.sealed: collections.deque[SegmentMeta] = collections.deque(maxlen=RECENT_SEALS)
        self._reader: RingReader | None = None
        self._open: _Open | None = None
        self._retry_id: str | None = None  # id to reuse when rewriting a failed segment
        self._parked: tuple[str, int] | None = None  # (id, start) set aside for lack of space
        self._overrun: GapNote | None = None  # hole to note at the next segment's start
        self._lost_upto = 0  # ring index up to which lost frames were counted
        self._attempt = 0
        self._format: str | None = None  # of new segments; None: the configured one

    async def run(self, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """The supervised task: recover the spool once, then segment until cancelled.

        On cancellation the open segment is sealed (shielded, within ``seal_grace``;
        see `_finish`).
        """
        if not self.spool.recovered:
            await self.runner.run(self.spool.recover)
            try:
                await self.runner.run(self.spool.enforce_quota)
            except OSError as exc:
                self.spool.note_disk_error(exc, "enforcing the quota")
        if self._reader is None:
            self._reader = self.ring.open_reader("segmenter", start=self.ring.tail)
        reader = self._reader
        batch = max(1, round(self.batch_seconds * self.ring.rate))
        task_status.started()
        try:
            while True:
                # One wake-up per batch (the capture thread wakes Trio only when a
                # reader's wait is met); a mic gone quiet still gets its fsync. The
                # wait for a batch may run a little past its length: that is not
                # quiet yet.
                with trio.move_on_after(max(self.config.fsync_seconds,
                                            2 * self.batch_seconds)) as idle:
                    await reader.wait(self._wanted(batch))
                if idle.cancelled_caught and reader.lag <= 0:
                    await self._idle_sync()
                    continue
                await self._pump(final=False)
        finally:
            await self._finish()

    async def _finish(self) -> None:
        """At the end of a run, write everything captured, within ``seal_grace``.

        A source ahead of real time (or a slow CPU) can leave the encode far behind
        the ring. The first part of the grace encodes; whatever is still behind
        then is sealed as WAV segments, which costs a copy to disk and no encoding.
        What even that cannot write is counted as lost.
        """
        # When the agent stops, capture stops at the same moment and first writes
        # what its thread still held: give it that moment (it may also run on, when
        # only this task stops).
        with trio.move_on_after(_CAPTURE_STOP_WAIT, shield=True):
            while self.ring.capturing:  # noqa: ASYNC110 (set by another task, no event)
                await trio.sleep(_CAPTURE_STOP_WAIT / 50)
        with trio.move_on_after(self.seal_grace * _ENCODE_SHARE, shield=True) as scope:
            await self._pump(final=True)
        if scope.cancelled_caught:
            reader = self._reader
            behind = 0 if reader is None else self.ring.head - max(reader.cursor, self.ring.tail)
            log.warning("encode behind at shutdown seconds=%.3f; sealing the rest as WAV",
                        behind / self.ring.rate)
            self._format = "wav"
            try:
                with trio.move_on_after(self.seal_grace * (1 - _ENCODE_SHARE),
                                        shield=True) as scope:
                    await self._pump(final=True)
            finally:
                self._format = None
        if scope.cancelled_caught:
            log.error("segment not sealed within %.1f s; it is recovered on the next start",
                      self.seal_grace)
        self._count_unwritten()

    def _wanted(self, batch: int) -> int:
        """Frames to wait for: a batch, or fewer when the open segment's boundary
        comes sooner, so a segment is sealed as soon as its last frame is captured;
        with no segment open, the first frame (which opens one and sets the
        boundary)."""
        seg, reader = self._open, self._reader
        if reader is None:
            return batch
        if seg is None or self.ring.head == 0:
            return 1
        left = (seg.end_mono - self.ring.index_to_mono(reader.cursor)) * self.ring.rate
        return max(1, min(batch, math.ceil(left) + 1))

    def _count_unwritten(self) -> None:
        """At the end of a run: captured audio the segmenter never got to write (the
        grace ran out with the encode behind the ring) is gone with the process.
        Counted and logged as lost; nothing captured vanishes without a word."""
        reader = self._reader
        if reader is None:
            return
        unwritten = self.ring.head - max(reader.cursor, self.ring.tail)
        if unwritten > 0:
            self.stats.lost_frames += unwritten
            self.stats.shutdown_lost_frames += unwritten
            reader.seek(self.ring.head)
            log.error("captured audio not written at shutdown seconds=%.3f (lost; the seal "
                      "grace of %.1f s ran out)", unwritten / self.ring.rate, self.seal_grace)

    async def _idle_sync(self) -> None:
        """No audio for a while (mic gone): make what was written durable anyway."""
        seg = self._open
        if seg is None or seg.writer.frames == 0:
            return
        try:
            await self.runner.run(_sync_flushed, seg.writer, trio.current_time())
        except _WRITE_ERRORS as exc:
            await self._fail(exc, "syncing an idle segment", sleep=True)

    async def _pump(self, *, final: bool) -> None:
        """Write what the ring holds past the cursor, sealing at boundaries; when
        ``final``, also seal the open segment at the end and never back off."""
        attempts = 0
        while True:
            try:
                if not await self._step(final=final):
                    return
            except _WRITE_ERRORS as exc:
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
        if seg is not None and self._format and seg.writer.header.format != self._format:
            await self._seal(reader.cursor)  # what follows goes into a segment of its own
            return True
        if reader.cursor >= head:
            if final and seg is not None:
                await self._seal(reader.cursor)
            return False
        if seg is None:
            await self._open_at(reader.cursor)
            return True
        steps = ring.clock_steps(seg.start, head)
        todo = self.cutter.next_write(
            start=seg.start, cursor=reader.cursor, head=head,
            boundary=ring.mono_to_index(seg.end_mono),
            step=steps[0].index if steps else None,
        )
        if todo.frames > 0:
            # Peek, and move the cursor only once the frames are written: a stop that
            # lands before the worker thread starts must not skip them.
            frames = ring.read(todo.start, todo.stop)
            await self.runner.run(seg.writer.write, frames, trio.current_time())
            reader.seek(todo.stop)
            self.stats.frames_written += len(frames)
            self.spool.clear_disk_error()
        if todo.seal:
            await self._seal(todo.stop)
        return True

    async def _unpark(self) -> None:
        """Seal what is durable of the segment set aside for lack of space, and go on
        from the first frame it does not hold (still in the ring, or counted lost)."""
        assert self._parked is not None and self._reader is not None
        seg_id, start = self._parked
        meta = await self.runner.run(self.spool.salvage, seg_id)
        self._parked = None
        self._reader.seek(start + (meta.frames if meta is not None else 0))
        self.spool.clear_disk_error()
        if meta is not None:
            log.info("segment set aside for lack of space sealed id=%s seconds=%.3f",
                     seg_id, meta.seconds)
            self.stats.segments_sealed += 1
            self.sealed.append(meta)
            await self._quota()

    async def _quota(self) -> None:
        try:
            await self.runner.run(self.spool.enforce_quota)
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
        gaps = [self._gap_note(g.index, index, g.seconds, g.mono)
                for g in ring.gaps(index - 1, index)]
        if self._overrun is not None:
            gaps.append(self._overrun)
        steps = [ClockStepNote(frame=0, seconds=s.seconds, synced=s.synced)
                 for s in ring.clock_steps(index - 1, index)]
        writer = await self.runner.run(
            self._open_writer, start_ts, mono_start, anchor.synced, gaps, steps,
            trio.current_time(),
        )
        self._overrun = None
        self._open = _Open(writer, index, self.cutter.end_mono(start_ts, mono_start))
        self.stats.segments_opened += 1
        self.spool.clear_disk_error()

    def _open_writer(self, start_ts: float, mono_start: float, synced: bool,
                     gaps: list[GapNote], steps: list[ClockStepNote],
                     now: float) -> SegmentWriter:
        return self.spool.open_segment(
            start_ts=start_ts, mono_start=mono_start, rate=self.ring.rate,
            channels=self.ring.channels, sample_format=str(self.ring.dtype),
            clock_synced=synced, gaps=gaps, clock_steps=steps, segment_id=self._retry_id,
            now=now, fmt=self._format,
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
            await self.runner.run(self.spool.abort, seg.writer)
            return
        ring = self.ring
        mono_end = ring.index_to_mono(end - 1) + 1.0 / ring.rate
        gaps = [self._gap_note(g.index, seg.start, g.seconds, g.mono)
                for g in ring.gaps(seg.start, end - 1)]
        gaps = sorted([*gaps, *seg.gaps], key=lambda g: g.frame)
        meta = await self.runner.run(self._seal_writer, seg.writer, mono_end, gaps)
        self._open = None
        self._retry_id = None
        self._attempt = 0
        self.stats.segments_sealed += 1
        self.sealed.append(meta)
        self.spool.clear_disk_error()
        await self._quota()

    def _seal_writer(self, writer: SegmentWriter, mono_end: float,
                     gaps: list[GapNote]) -> SegmentMeta:
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
            await self.runner.run(self.spool.abort, seg.writer)
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
