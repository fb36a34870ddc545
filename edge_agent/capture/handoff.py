"""`BlockHandoff`: captured blocks from a capture thread to the Trio capture task,
waking Trio only when a reader has work.

A capture thread (PortAudio's callback, or the thread that paces a synthetic
source at real time) hands over every block with `put`: a copy into a
preallocated slot and a counter update, no allocation, no lock, never a wait; a
full queue drops the block and counts it. Trio is woken (`run_sync_soon`) only
when there is work:

- the queued frames would bring the ring's head to the lowest index a reader
  waits for (`Demand.wake_at`: the segmenter's encode batch, the STT streamer's
  VAD batch, a live listener's page), so Trio runs once per reader batch, not
  once per 20 ms block;
- `max_hold_frames` are queued, so the ring never lags the microphone by more;
- the queue is half full, or the stream ended.

One producer thread and the Trio thread as the one consumer: the producer only
advances `_put`, the consumer only `_taken`, and a slot is published (``_put``
advanced) only once it is filled. CPython makes each of these stores atomic.

Part of the `capture` stage. Imports only the bottom layer (`audio`) and its
sibling `source`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import trio
from numpy.typing import DTypeLike, NDArray

from .source import Block, CaptureError, SourceStats

__all__ = ["BlockHandoff", "Demand", "QueuedBlocks"]


class Demand(Protocol):
    """What a capture thread reads of the ring (`AudioRing` fits): where its head
    is, and the lowest index a reader waits for it to reach."""

    @property
    def head(self) -> int: ...

    @property
    def wake_at(self) -> int | None: ...


class BlockHandoff:
    """The bounded queue from one capture thread to the Trio capture task.

    Args:
        slots: Blocks it holds (``capture.queue_blocks``).
        block_frames: The most frames one block may have.
        channels, dtype: The capture format.
        stats: The source's counters (``queue_drops``).
        demand: The ring the blocks go to; None wakes Trio for every block.
        max_hold_frames: The most frames held back from Trio when no reader waits.
    """

    def __init__(self, *, slots: int, block_frames: int, channels: int, dtype: DTypeLike,
                 stats: SourceStats, demand: Demand | None, max_hold_frames: int) -> None:
        self._slots = np.empty((slots, block_frames, channels), dtype=dtype)
        self._frames = [0] * slots
        self._times = [(0.0, 0.0)] * slots
        self._capacity = slots
        self._put = 0  # blocks put (producer only)
        self._taken = 0  # blocks taken (consumer only)
        self._put_frames = 0  # frames put (producer only)
        self._taken_frames = 0  # frames taken (consumer only)
        self.stats = stats
        self.demand = demand
        self.max_hold_frames = max_hold_frames
        self.finished = False
        self.received = 0  # blocks the capture thread delivered (dropped ones too)
        self._token = trio.lowlevel.current_trio_token()
        self._event = trio.Event()

    # -- the capture thread ------------------------------------------------------

    def put(self, frames: NDArray[Any], utc: float, mono: float) -> None:
        """Queue one block (copied); wake Trio if a reader now has work.

        Raises:
            trio.RunFinishedError: Trio has exited (the caller stops capturing).
        """
        self.received += 1
        if self._put - self._taken >= self._capacity:
            self.stats.queue_drops += 1
        else:
            slot = self._put % self._capacity
            n = len(frames)
            self._slots[slot, :n] = frames
            self._frames[slot] = n
            self._times[slot] = (utc, mono)
            self._put_frames += n
            self._put += 1  # published: the consumer may take it now
        if self._needs_trio():
            self.notify()

    def finish(self) -> None:
        """The stream ended (device lost or stopped): wake Trio to find out."""
        self.finished = True
        self.notify()

    def _needs_trio(self) -> bool:
        queued = self._put_frames - self._taken_frames
        if queued >= self.max_hold_frames or 2 * (self._put - self._taken) >= self._capacity:
            return True
        demand = self.demand
        if demand is None:
            return True
        wake_at = demand.wake_at
        return wake_at is not None and demand.head + queued >= wake_at

    @property
    def wakes(self) -> int:
        """Times Trio was asked to run (``SourceStats.wakeups``)."""
        return self.stats.wakeups

    def notify(self) -> None:
        self.stats.wakeups += 1
        self._token.run_sync_soon(self._wake, idempotent=True)

    def _wake(self) -> None:  # on the Trio thread; must never raise
        self._event.set()

    # -- the Trio capture task ---------------------------------------------------

    def take(self) -> Block | None:
        """The oldest queued block, or None.

        Its frames are a view of its slot, valid until the producer comes round to
        that slot again (``slots`` blocks later): the capture task writes it to the
        ring at once.
        """
        if self._taken >= self._put:
            return None
        slot = self._taken % self._capacity
        n = self._frames[slot]
        utc, mono = self._times[slot]
        self._taken_frames += n
        self._taken += 1
        self.stats.blocks += 1
        self.stats.frames += n
        return Block(self._slots[slot, :n], utc, mono)

    @property
    def queued(self) -> int:
        """Blocks waiting for the Trio side."""
        return self._put - self._taken

    async def wait(self) -> None:
        """Wait until the capture thread says a reader has work (or it ended)."""
        if self._taken < self._put and self._needs_trio():
            await trio.lowlevel.checkpoint()
            return
        await self._event.wait()
        self._event = trio.Event()



class QueuedBlocks:
    """The blocks of a `BlockHandoff`, as the async iterator a source yields.

    Blocks already queued come without a checkpoint between them: draining a
    batch is one run of the capture task. `flush` gives the blocks still queued
    when the capture task stops, so audio captured before a stop reaches the ring.

    Args:
        handoff: The queue.
        check: Called whenever the queue is empty: raises when the stream is lost
            (`CaptureError`) or returns False when it ended.
        stall_seconds: The longest wait for audio before `CaptureError` (None: no limit).
        stalled: The message of that error.
    """

    def __init__(self, handoff: BlockHandoff, check: Callable[[], bool],
                 stall_seconds: float | None = None, stalled: str = "") -> None:
        self.handoff = handoff
        self.check = check
        self.stall_seconds = math.inf if stall_seconds is None else stall_seconds
        self.stalled = stalled

    def __aiter__(self) -> QueuedBlocks:
        return self

    async def __anext__(self) -> Block:
        while True:
            block = self.handoff.take()
            if block is not None:
                return block
            if not self.check():
                raise StopAsyncIteration
            received = self.handoff.received
            with trio.move_on_after(self.stall_seconds) as scope:
                await self.handoff.wait()
            # Audio that no reader needed yet does not wake Trio: a stall is when the
            # capture thread delivered nothing at all.
            if scope.cancelled_caught and self.handoff.received == received:
                raise CaptureError(self.stalled)

    def flush(self) -> Iterator[Block]:
        """The blocks still queued (synchronous: for the capture task's last act)."""
        while (block := self.handoff.take()) is not None:
            yield block
