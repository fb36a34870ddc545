"""`AudioRing`, the preallocated buffer with its time mapping, and `RingReader`, one
consumer's cursor into it (see the package docstring).

Imports only ``clock``, ``errors`` and the ring's ``types``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import weakref
from collections import deque
from types import TracebackType
from typing import Any, Literal

import numpy as np
import trio
from numpy.typing import DTypeLike, NDArray

from .types import (
    MIN_BLOCK_SECONDS,
    SAMPLE_DTYPES,
    TIME_EPSILON,
    Anchor,
    ClockStep,
    EvictedError,
    Gap,
    ReadResult,
    RingStats,
)


class AudioRing:
    """Fixed-size ring of PCM frames with absolute indices and a time mapping.

    Args:
        rate: Frames per second.
        channels: Samples per frame.
        dtype: Sample format of the capture (stored as is, never converted).
        seconds: How much audio to hold; capacity is ``round(seconds * rate)`` frames.
        max_anchors: Size of the anchor store (one anchor per block). The default fits
            blocks of 5 ms or more across the whole capacity.
        max_events: How many gaps, and separately clock steps, are kept for lookup.
        gap_tolerance: A block starting more than this many seconds after the previous
            block's expected end marks a capture gap; less is jitter, absorbed by
            the per-block anchors.
        step_tolerance: A change of ``utc - mono`` by more than this many seconds
            between blocks is recorded as a wall-clock step.

    Raises:
        ValueError: An argument is out of range.
    """

    def __init__(
        self,
        *,
        rate: int,
        channels: int,
        dtype: DTypeLike,
        seconds: float,
        max_anchors: int | None = None,
        max_events: int = 1024,
        gap_tolerance: float = 0.25,
        step_tolerance: float = 0.5,
    ) -> None:
        if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
            raise ValueError(f"rate must be a positive integer, got {rate!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        try:
            sample_dtype = np.dtype(dtype)
        except TypeError as exc:
            raise ValueError(f"dtype {dtype!r} is not a numpy dtype") from exc
        if sample_dtype not in SAMPLE_DTYPES:
            names = ", ".join(sorted(str(d) for d in SAMPLE_DTYPES))
            raise ValueError(f"dtype must be one of {names}, got {sample_dtype}")
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"seconds must be a positive number, got {seconds!r}")
        capacity = round(seconds * rate)
        if capacity < 1:
            raise ValueError(f"seconds={seconds!r} at rate={rate} holds no frame")
        if max_anchors is None:
            max_anchors = math.ceil(capacity / (rate * MIN_BLOCK_SECONDS)) + 2
        elif max_anchors < 1:
            raise ValueError(f"max_anchors must be at least 1, got {max_anchors!r}")
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events!r}")
        if not math.isfinite(gap_tolerance) or gap_tolerance <= 0:
            raise ValueError(f"gap_tolerance must be a positive number, got {gap_tolerance!r}")
        if not math.isfinite(step_tolerance) or step_tolerance <= 0:
            raise ValueError(f"step_tolerance must be a positive number, got {step_tolerance!r}")

        self.rate = rate
        self.channels = channels
        self.dtype = sample_dtype
        self.capacity = capacity
        self.max_anchors = max_anchors
        self.max_events = max_events
        self.gap_tolerance = float(gap_tolerance)
        self.step_tolerance = float(step_tolerance)

        # np.empty + fill touches every page now, so the resident size is what it
        # will be in a month and an oversized ring fails at start, not at 3 a.m.
        self._buf: NDArray[Any] = np.empty((capacity, channels), dtype=sample_dtype)
        self._buf.fill(0)
        self.nbytes = int(self._buf.nbytes)
        self._head = 0

        # Anchors live in parallel arrays used as a circular store, oldest at
        # _a_start. Indices and (clamped) monos are non-decreasing in store order,
        # so both can be binary-searched.
        self._a_index: NDArray[np.int64] = np.zeros(max_anchors, dtype=np.int64)
        self._a_mono: NDArray[np.float64] = np.zeros(max_anchors, dtype=np.float64)
        self._a_utc: NDArray[np.float64] = np.zeros(max_anchors, dtype=np.float64)
        self._a_synced: NDArray[np.bool_] = np.zeros(max_anchors, dtype=np.bool_)
        for arr in (self._a_index, self._a_mono, self._a_utc, self._a_synced):
            arr.fill(0)
        self._a_start = 0
        self._a_count = 0
        self._anchors_dropped = 0
        self._wall_offset = 0.0

        self._gaps: deque[Gap] = deque(maxlen=max_events)
        self._steps: deque[ClockStep] = deque(maxlen=max_events)
        self._gap_count = 0
        self._step_count = 0

        # Tasks waiting for the head to reach an index: (index, order, event), the
        # lowest index first. A write wakes exactly those it satisfied.
        self._waiters: list[tuple[int, int, trio.Event]] = []
        self._waiter_order = itertools.count()
        # True while a capture task writes here (it may still hold queued blocks,
        # which it writes when it stops): a reader's last read waits for that.
        self.capturing = False
        self._readers: weakref.WeakValueDictionary[int, RingReader] = weakref.WeakValueDictionary()
        self._next_reader_id = 0

    def __repr__(self) -> str:
        return (
            f"<AudioRing {self.rate} Hz x{self.channels} {self.dtype} "
            f"capacity={self.capacity} head={self._head}>"
        )

    @property
    def head(self) -> int:
        """Total frames ever written; the index the next frame will get."""
        return self._head

    @property
    def tail(self) -> int:
        """Index of the oldest frame still held."""
        return max(0, self._head - self.capacity)

    # -- writing -----------------------------------------------------------------

    def write(self, frames: NDArray[Any], *, utc: float, mono: float, synced: bool = False) -> int:
        """Append one captured block and return the index of its first frame.

        ``frames`` is shaped ``(n, channels)`` (or ``(n,)`` for mono) and cast to the
        ring's dtype if needed. ``utc`` and ``mono`` are the capture time of its first
        frame; ``synced`` says whether the wall clock was NTP-synchronised. A block
        longer than the capacity keeps only its newest frames; the rest count as
        evicted. An empty block changes nothing.

        Raises:
            ValueError: Wrong shape or channel count, a non-finite time, or ``mono``
                earlier than the previous block's by more than ``gap_tolerance``
                (the caller mixed clocks). Smaller steps back are jitter and are
                clamped so the time mapping stays monotonic.
        """
        data = np.asarray(frames)
        if data.ndim == 1 and self.channels == 1:
            data = data.reshape(-1, 1)
        if data.ndim != 2 or data.shape[1] != self.channels:
            raise ValueError(f"expected frames shaped (n, {self.channels}), got shape {data.shape}")
        if not (math.isfinite(utc) and math.isfinite(mono)):
            raise ValueError(f"capture times must be finite, got utc={utc!r} mono={mono!r}")
        n = int(data.shape[0])
        start = self._head
        if n == 0:
            return start

        mono = float(mono)
        utc = float(utc)
        if self._a_count:
            last = self._phys(self._a_count - 1)
            last_mono = float(self._a_mono[last])
            if mono < last_mono - self.gap_tolerance:
                raise ValueError(
                    f"mono went backwards by {last_mono - mono:.6f} s; "
                    "capture times must come from one monotonic clock"
                )
            mono = max(mono, last_mono)
            expected = last_mono + (start - int(self._a_index[last])) / self.rate
            if mono - expected > self.gap_tolerance:
                self._gaps.append(Gap(start, expected, mono - expected))
                self._gap_count += 1
            step = (utc - mono) - self._wall_offset
            if abs(step) > self.step_tolerance:
                self._steps.append(ClockStep(start, mono, step, synced))
                self._step_count += 1

        # Only the newest `capacity` frames of an oversized block can be held.
        keep = min(n, self.capacity)
        self._head = start + n
        self._store(self._head - keep, data[n - keep :])
        self._push_anchor(start, utc, mono, synced)
        self._wall_offset = utc - mono
        waiters = self._waiters
        while waiters and waiters[0][0] <= self._head:
            heapq.heappop(waiters)[2].set()
        return start

    def _store(self, first: int, data: NDArray[Any]) -> None:
        """Copy frames for indices ``first...`` into the buffer (at most two slices)."""
        pos = first % self.capacity
        count = int(data.shape[0])
        split = min(count, self.capacity - pos)
        self._buf[pos : pos + split] = data[:split]
        if split < count:
            self._buf[: count - split] = data[split:]

    def _push_anchor(self, index: int, utc: float, mono: float, synced: bool) -> None:
        """Add the newest anchor, overwriting the oldest when the store is full."""
        if self._a_count == self.max_anchors:
            # The anchor about to go governed [its index, next anchor's index).
            following = int(self._a_index[self._phys(1)]) if self.max_anchors > 1 else index
            if following > self.tail:
                self._anchors_dropped += 1
            slot = self._a_start
            self._a_start = (self._a_start + 1) % self.max_anchors
        else:
            slot = self._phys(self._a_count)
            self._a_count += 1
        self._a_index[slot] = index
        self._a_mono[slot] = mono
        self._a_utc[slot] = utc
        self._a_synced[slot] = synced

    # -- reading -----------------------------------------------------------------

    def read(self, start: int, stop: int) -> NDArray[Any]:
        """Return a copy of frames ``[start, stop)`` shaped ``(stop - start, channels)``.

        Raises:
            ValueError: ``start`` is negative, ``stop < start`` or ``stop > head``.
            EvictedError: ``start < tail``: some of the frames are gone.
        """
        if start < 0 or stop < start:
            raise ValueError(f"bad frame range [{start}, {stop})")
        if stop > self._head:
            raise ValueError(f"frame range [{start}, {stop}) reaches past head {self._head}")
        tail = self.tail
        if start < tail:
            raise EvictedError(start, tail, self.index_to_utc(tail))
        count = stop - start
        pos = start % self.capacity
        if pos + count <= self.capacity:
            return self._buf[pos : pos + count].copy()
        out: NDArray[Any] = np.empty((count, self.channels), dtype=self.dtype)
        split = self.capacity - pos
        out[:split] = self._buf[pos:]
        out[split:] = self._buf[: count - split]
        return out

    def open_reader(self, name: str, *, start: int | None = None) -> RingReader:
        """Open an independent cursor, live (at ``head``) unless ``start`` is given.

        A ``start`` below ``tail`` is allowed; the first read then reports the loss.
        The reader can be used as a context manager that closes it.
        """
        reader = RingReader(self, name, self._head if start is None else start)
        self._readers[self._next_reader_id] = reader
        reader._key = self._next_reader_id
        self._next_reader_id += 1
        return reader

    def readers(self) -> list[RingReader]:
        """Open readers still referenced somewhere, oldest first (for metrics)."""
        return list(self._readers.values())

    @property
    def wake_at(self) -> int | None:
        """The lowest index a task waits for the head to reach (None: no one waits).

        A capture thread wakes Trio only once its queued frames would bring the
        head there, so Trio runs once per reader batch, not once per block.
        """
        waiters = self._waiters
        return waiters[0][0] if waiters else None

    async def wait_for(self, index: int) -> None:
        """Wait until ``head >= index``, i.e. frames before ``index`` can be read."""
        if self._head >= index:
            await trio.lowlevel.checkpoint()
            return
        event = trio.Event()
        entry = (index, next(self._waiter_order), event)
        heapq.heappush(self._waiters, entry)
        try:
            await event.wait()
        finally:
            if not event.is_set():  # cancelled: no longer counts as demand
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)

    # -- time mapping ------------------------------------------------------------

    def _phys(self, k: int) -> int:
        """Slot of the k-th oldest anchor."""
        return (self._a_start + k) % self.max_anchors

    def _count_anchors(self, values: NDArray[Any], x: float, side: Literal["left", "right"]) -> int:
        """How many anchors have ``values < x`` (left) or ``<= x`` (right).

        The store is circular, but both halves are sorted and every value in the
        older half is <= every value in the newer one, so the counts just add up.
        """
        end = self._a_start + self._a_count
        if end <= self.max_anchors:
            return int(np.searchsorted(values[self._a_start : end], x, side=side))
        older = np.searchsorted(values[self._a_start :], x, side=side)
        newer = np.searchsorted(values[: end - self.max_anchors], x, side=side)
        return int(older + newer)

    def _require_anchor(self) -> None:
        if not self._a_count:
            raise LookupError("the ring holds no audio yet, so there is no time mapping")

    def _governing(self, index: int) -> int:
        """Position (oldest = 0) of the anchor governing frame ``index``."""
        return max(0, self._count_anchors(self._a_index, index, "right") - 1)

    def anchor_at(self, index: int) -> Anchor:
        """The anchor governing frame ``index``: the newest one at or before it.

        Frames older than every kept anchor are governed by the oldest kept anchor.

        Raises:
            LookupError: Nothing has been written yet.
        """
        self._require_anchor()
        p = self._phys(self._governing(index))
        return Anchor(
            index=int(self._a_index[p]),
            utc=float(self._a_utc[p]),
            mono=float(self._a_mono[p]),
            synced=bool(self._a_synced[p]),
        )

    def index_to_mono(self, index: int) -> float:
        """Monotonic capture time of frame ``index``.

        Extrapolated at the nominal rate from the governing anchor, and never past
        the next block's start, so the mapping is non-decreasing even when a block
        arrives a little early.

        Raises:
            LookupError: Nothing has been written yet.
        """
        self._require_anchor()
        k = self._governing(index)
        p = self._phys(k)
        mono = float(self._a_mono[p]) + (index - int(self._a_index[p])) / self.rate
        if k + 1 < self._a_count:
            mono = min(mono, float(self._a_mono[self._phys(k + 1)]))
        return mono

    def index_to_utc(self, index: int) -> float:
        """Wall-clock time of frame ``index``: its monotonic time plus the newest offset.

        Raises:
            LookupError: Nothing has been written yet.
        """
        return self.index_to_mono(index) + self._wall_offset

    def mono_to_index(self, mono: float) -> int:
        """Index of the first frame captured at or after ``mono``.

        A time inside a gap maps to the first frame after it; a time after the
        newest frame maps to ``head``; the result may be below ``tail``. With nothing
        written yet every time maps to 0.
        """
        if not self._a_count:
            return self._head
        eps = min(TIME_EPSILON, 0.25 / self.rate)
        j = self._count_anchors(self._a_mono, mono - eps, "left")
        if j == 0:
            # Before every kept anchor: extrapolate back from the oldest one.
            p = self._phys(0)
            offset = (mono - float(self._a_mono[p])) * self.rate - eps * self.rate
            return max(0, int(self._a_index[p]) + math.ceil(offset))
        p = self._phys(j - 1)
        first = int(self._a_index[p])
        offset = (mono - float(self._a_mono[p])) * self.rate - eps * self.rate
        index = max(first, first + math.ceil(offset))
        limit = int(self._a_index[self._phys(j)]) if j < self._a_count else self._head
        return min(index, limit)

    def utc_to_index(self, utc: float) -> int:
        """Index of the first frame captured at or after wall-clock time ``utc``."""
        return self.mono_to_index(utc - self._wall_offset)

    # -- events and statistics -------------------------------------------------------

    def gaps(self, start: int, stop: int) -> list[Gap]:
        """Recorded gaps whose ``index`` lies in ``(start, stop]``, oldest first."""
        return [g for g in self._gaps if start < g.index <= stop]

    def clock_steps(self, start: int, stop: int) -> list[ClockStep]:
        """Recorded wall-clock steps whose ``index`` lies in ``(start, stop]``, oldest first."""
        return [s for s in self._steps if start < s.index <= stop]

    def statistics(self) -> RingStats:
        """A snapshot of sizes, counters and the held time range."""
        tail = self.tail
        held = self._head - tail
        return RingStats(
            capacity_frames=self.capacity,
            held_frames=held,
            head=self._head,
            tail=tail,
            nbytes=self.nbytes,
            evicted_frames=tail,
            gaps=self._gap_count,
            clock_steps=self._step_count,
            oldest_utc=self.index_to_utc(tail) if held else None,
            newest_utc=self.index_to_utc(self._head) if held else None,
            anchors=self._a_count,
            anchors_dropped=self._anchors_dropped,
        )


class RingReader:
    """One consumer's cursor into an :class:`AudioRing`.

    A reader that falls more than the capacity behind is not blocked or failed: its
    next read skips to the oldest held frame and reports exactly how many frames it
    lost. Open readers with :meth:`AudioRing.open_reader`.
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_key",
        "_ring",
        "cursor",
        "lost_frames",
        "name",
        "overruns",
    )

    def __init__(self, ring: AudioRing, name: str, start: int) -> None:
        if start < 0:
            raise ValueError(f"reader start must not be negative, got {start}")
        self._ring = ring
        self._key = -1
        self._closed = False
        self.name = name
        self.cursor = start
        self.lost_frames = 0
        self.overruns = 0

    def __repr__(self) -> str:
        return f"<RingReader {self.name!r} cursor={self.cursor} lag={self.lag}>"

    def __enter__(self) -> RingReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def lag(self) -> int:
        """Frames written that this reader has not read yet (may exceed the capacity)."""
        return self._ring.head - self.cursor

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError(f"reader {self.name!r} is closed")

    def _skip_evicted(self) -> int:
        """Move a cursor that fell behind the tail up to it; return the frames lost."""
        lost = self._ring.tail - self.cursor
        if lost <= 0:
            return 0
        self.cursor += lost
        self.lost_frames += lost
        self.overruns += 1
        return lost

    def _take(self, count: int, lost: int) -> ReadResult:
        start = self.cursor
        if count:
            frames = self._ring.read(start, start + count)
        else:  # the cursor may sit past head after a seek
            frames = np.empty((0, self._ring.channels), dtype=self._ring.dtype)
        self.cursor = start + count
        return ReadResult(start, frames, lost)

    def read(self, max_frames: int | None = None) -> ReadResult:
        """Read everything new (at most ``max_frames``) and advance the cursor.

        Returns empty frames (shape ``(0, channels)``) when nothing is new.

        Raises:
            ValueError: ``max_frames`` is negative.
            trio.ClosedResourceError: The reader was closed.
        """
        self._check_open()
        if max_frames is not None and max_frames < 0:
            raise ValueError(f"max_frames must not be negative, got {max_frames}")
        lost = self._skip_evicted()
        count = max(0, self.lag)
        if max_frames is not None:
            count = min(count, max_frames)
        return self._take(count, lost)

    def read_exact(self, n: int) -> ReadResult | None:
        """Read exactly ``n`` frames if that many are available, else return None.

        Availability is counted after skipping evicted frames; when None is returned
        the cursor does not move (any loss is reported by the next successful read).

        Raises:
            ValueError: ``n`` is negative or larger than the capacity (never available).
            trio.ClosedResourceError: The reader was closed.
        """
        self._check_open()
        if n < 0 or n > self._ring.capacity:
            raise ValueError(f"n must be between 0 and the capacity {self._ring.capacity}")
        if self._ring.head - max(self.cursor, self._ring.tail) < n:
            return None
        lost = self._skip_evicted()
        return self._take(n, lost)

    def seek(self, index: int) -> None:
        """Move the cursor to ``index`` (below ``tail`` or past ``head`` allowed).

        Raises:
            ValueError: ``index`` is negative.
        """
        if index < 0:
            raise ValueError(f"cannot seek to a negative index {index}")
        self.cursor = index

    async def wait(self, min_frames: int = 1) -> None:
        """Wait until at least ``min_frames`` unread frames exist (at once if they do)."""
        self._check_open()
        if self.lag >= min_frames:
            await trio.lowlevel.checkpoint()
            return
        while self.lag < min_frames:  # a seek may move the cursor meanwhile
            await self._ring.wait_for(self.cursor + min_frames)

    def close(self) -> None:
        """Stop listing this reader in :meth:`AudioRing.readers`; further reads fail."""
        if self._closed:
            return
        self._closed = True
        self._ring._readers.pop(self._key, None)
