"""Tests for the time-indexed audio ring.

The stateful test drives an AudioRing and a plain reference model (every frame ever
written, every block's capture time) with the same random writes, reads and
readers, and checks the ring answers exactly what the model does. Times in it are
dyadic fractions at a rate of 1024 Hz so float arithmetic is exact and any
disagreement is a real bug, not rounding.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import math
import tracemalloc
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from edge_agent.clock import iso_utc
from edge_agent.ring import Anchor, AudioRing, ClockStep, EvictedError, Gap, RingReader, RingStats

RATE = 1024
GAP_TOLERANCE = 0.25
STEP_TOLERANCE = 0.5
EPSILON = 1e-6  # "at or after" slack the ring allows for float rounding
START_MONO = 1000.0
BOOT_UTC = 1_700_000_000.0


def pattern(start: int, n: int, channels: int) -> np.ndarray[Any, Any]:
    """Frames whose values identify their index, so misplaced data cannot pass."""
    values = np.arange(start * channels, (start + n) * channels, dtype=np.int64)
    return ((values % 60001) - 30000).astype(np.int16).reshape(n, channels)


@dataclass
class ModelReader:
    reader: RingReader
    cursor: int
    lost_frames: int = 0
    overruns: int = 0


class RingMachine(RuleBasedStateMachine):
    """AudioRing against a model that forgets nothing."""

    @initialize(
        capacity=st.integers(7, 64),
        channels=st.integers(1, 2),
        max_anchors=st.one_of(st.none(), st.integers(1, 6)),
    )
    def setup(self, capacity: int, channels: int, max_anchors: int | None) -> None:
        self.ring = AudioRing(
            rate=RATE,
            channels=channels,
            dtype="int16",
            seconds=capacity / RATE,
            max_anchors=max_anchors,
            gap_tolerance=GAP_TOLERANCE,
            step_tolerance=STEP_TOLERANCE,
        )
        assert self.ring.capacity == capacity
        self.capacity = capacity
        self.channels = channels
        self.anchor_limit = self.ring.max_anchors
        self.nbytes = capacity * channels * 2
        self.data = np.zeros((0, channels), dtype=np.int16)
        self.blocks: list[Anchor] = []  # every block's anchor, as the ring must store it
        self.block_frames: list[int] = []
        self.gaps: list[Gap] = []
        self.steps: list[ClockStep] = []
        self.anchors_dropped = 0
        self.offset = BOOT_UTC - START_MONO  # the (simulated) wall clock's utc - mono
        self.readers: dict[str, ModelReader] = {}
        self.reader_serial = 0

    # -- the model -------------------------------------------------------------

    @property
    def head(self) -> int:
        return len(self.data)

    @property
    def tail(self) -> int:
        return max(0, self.head - self.capacity)

    def kept(self) -> list[Anchor]:
        return self.blocks[-self.anchor_limit :]

    def model_anchor(self, index: int) -> tuple[list[Anchor], int]:
        kept = self.kept()
        k = bisect.bisect_right([a.index for a in kept], index) - 1
        return kept, max(0, k)

    def model_mono(self, index: int) -> float:
        """Time of a frame: its block's start plus frames at the nominal rate, never
        later than the next kept block's start; before every kept anchor,
        extrapolated back from the oldest."""
        kept, k = self.model_anchor(index)
        mono = kept[k].mono + (index - kept[k].index) / RATE
        if k + 1 < len(kept):
            mono = min(mono, kept[k + 1].mono)
        return mono

    def wall_offset(self) -> float:
        newest = self.blocks[-1]
        return newest.utc - newest.mono

    def model_utc(self, index: int) -> float:
        return self.model_mono(index) + self.wall_offset()

    def model_mono_to_index(self, mono: float) -> int:
        """First index in [0, head] whose frame time is at or after ``mono``."""
        lo, hi = 0, self.head
        while lo < hi:
            mid = (lo + hi) // 2
            if self.model_mono(mid) >= mono - EPSILON:
                hi = mid
            else:
                lo = mid + 1
        return lo

    # -- writing -----------------------------------------------------------------

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(1, 3 * self.capacity), label="frames")
        start = self.head
        if self.blocks:
            prev = self.blocks[-1]
            expected = prev.mono + self.block_frames[-1] / RATE
        else:
            expected = START_MONO
        timing = data.draw(st.sampled_from(["on time", "jitter", "gap"]), label="timing")
        if timing == "jitter":  # early or late by less than the tolerance
            expected += data.draw(st.integers(-1000, 1000), label="jitter") / 4096
        elif timing == "gap":  # 0.25 s exactly is still jitter: gaps are "more than"
            expected += data.draw(st.integers(256, 5120), label="gap") / 1024
        mono = expected
        clock = data.draw(st.sampled_from(["steady", "drift", "step"]), label="clock")
        if clock == "drift":  # below the step tolerance
            self.offset += data.draw(st.integers(-2000, 2000), label="drift") / 4096
        elif clock == "step":
            sign = data.draw(st.sampled_from([-1, 1]), label="sign")
            self.offset += sign * data.draw(st.integers(2048, 3600 * 4096), label="step") / 4096
        utc = mono + self.offset
        synced = data.draw(st.booleans(), label="synced")

        # What the ring must record: monos never go backwards, gaps, steps, anchors.
        if self.blocks:
            prev = self.blocks[-1]
            mono = max(mono, prev.mono)
            expected_end = prev.mono + self.block_frames[-1] / RATE
            if mono - expected_end > GAP_TOLERANCE:
                self.gaps.append(Gap(start, expected_end, mono - expected_end))
            jump = (utc - mono) - (prev.utc - prev.mono)
            if abs(jump) > STEP_TOLERANCE:
                self.steps.append(ClockStep(start, mono, jump, synced))
            if len(self.blocks) >= self.anchor_limit:
                kept = self.kept()
                following = kept[1].index if len(kept) > 1 else start
                if following > max(0, start + n - self.capacity):
                    self.anchors_dropped += 1

        block = pattern(start, n, self.channels)
        sent: np.ndarray[Any, Any] = block
        form = data.draw(st.sampled_from(["int16", "int64", "flat"]), label="form")
        if form == "int64":  # the ring casts to its own dtype
            sent = block.astype(np.int64)
        elif form == "flat" and self.channels == 1:
            sent = block.reshape(-1)

        assert self.ring.write(sent, utc=utc, mono=expected, synced=synced) == start
        self.data = np.concatenate([self.data, block])
        self.blocks.append(Anchor(start, utc, mono, synced))
        self.block_frames.append(n)

    # -- random access -------------------------------------------------------------

    @rule(data=st.data())
    def read_range(self, data: st.DataObject) -> None:
        start = data.draw(st.integers(-3, self.head + 3), label="start")
        stop = data.draw(st.integers(start - 3, self.head + 3), label="stop")
        if start < 0 or stop < start or stop > self.head:
            with pytest.raises(ValueError):
                self.ring.read(start, stop)
        elif start < self.tail:
            with pytest.raises(EvictedError) as info:
                self.ring.read(start, stop)
            assert info.value.oldest_index == self.tail
            assert info.value.oldest_utc == self.model_utc(self.tail)
            assert iso_utc(self.model_utc(self.tail)) in str(info.value)
        else:
            got = self.ring.read(start, stop)
            assert got.shape == (stop - start, self.channels)
            assert got.dtype == np.int16
            np.testing.assert_array_equal(got, self.data[start:stop])
            if got.size:  # a copy: the caller may keep or modify it
                got[...] = 0
                np.testing.assert_array_equal(self.ring.read(start, stop), self.data[start:stop])

    @precondition(lambda self: self.blocks)
    @rule(data=st.data())
    def time_mapping(self, data: st.DataObject) -> None:
        ring = self.ring
        index = data.draw(st.integers(0, self.head + 2), label="index")
        assert ring.index_to_mono(index) == self.model_mono(index)
        assert ring.index_to_utc(index) == self.model_utc(index)
        kept, k = self.model_anchor(index)
        assert ring.anchor_at(index) == kept[k]
        later = data.draw(st.integers(index, self.head + 2), label="later")
        assert ring.index_to_utc(index) <= ring.index_to_utc(later)

        # A frame's own time maps back to it (or to an earlier frame with the same time).
        frame_time = self.model_mono(index)
        assert ring.mono_to_index(frame_time) == self.model_mono_to_index(frame_time)
        if index < self.head:
            assert ring.mono_to_index(frame_time) <= index

        # Any time, from before the oldest anchor to after the newest frame.
        first = self.kept()[0].mono - 2
        span = int((self.model_mono(self.head) + 2 - first) * 4096)
        when = first + data.draw(st.integers(0, span), label="time") / 4096
        assert ring.mono_to_index(when) == self.model_mono_to_index(when)
        wall = when + self.wall_offset()
        assert ring.utc_to_index(wall) == self.model_mono_to_index(wall - self.wall_offset())

        # A time inside a capture hole maps to the first frame after it.
        if self.gaps:
            gap = data.draw(st.sampled_from(self.gaps), label="hole")
            inside = gap.mono + gap.seconds * data.draw(st.integers(1, 15), label="at") / 16
            if gap.index > self.kept()[0].index:
                assert ring.mono_to_index(inside) == gap.index

    @rule(data=st.data())
    def events(self, data: st.DataObject) -> None:
        start = data.draw(st.integers(-1, self.head + 1), label="start")
        stop = data.draw(st.integers(-1, self.head + 1), label="stop")
        assert self.ring.gaps(start, stop) == [g for g in self.gaps if start < g.index <= stop]
        assert self.ring.clock_steps(start, stop) == [
            s for s in self.steps if start < s.index <= stop
        ]

    # -- readers -----------------------------------------------------------------

    @precondition(lambda self: len(self.readers) < 4)
    @rule(data=st.data())
    def open_reader(self, data: st.DataObject) -> None:
        start = data.draw(st.one_of(st.none(), st.integers(0, self.head + 5)), label="start")
        name = f"reader-{self.reader_serial}"
        self.reader_serial += 1
        reader = self.ring.open_reader(name, start=start)
        assert reader.name == name
        self.readers[name] = ModelReader(reader, self.head if start is None else start)

    def _model_take(self, model: ModelReader, count: int | None) -> tuple[int, int, int]:
        """Skip what was evicted, then take up to ``count`` frames: (start, n, lost)."""
        lost = max(0, self.tail - model.cursor)
        if lost:
            model.cursor += lost
            model.lost_frames += lost
            model.overruns += 1
        n = max(0, self.head - model.cursor)
        if count is not None:
            n = min(n, count)
        start = model.cursor
        model.cursor += n
        return start, n, lost

    @precondition(lambda self: self.readers)
    @rule(data=st.data())
    def reader_read(self, data: st.DataObject) -> None:
        model = self.readers[data.draw(st.sampled_from(sorted(self.readers)), label="reader")]
        max_frames = data.draw(st.one_of(st.none(), st.integers(0, 3 * self.capacity)))
        result = model.reader.read(max_frames)
        start, n, lost = self._model_take(model, max_frames)
        assert (result.start, result.lost) == (start, lost)
        assert result.frames.shape == (n, self.channels)
        np.testing.assert_array_equal(result.frames, self.data[start : start + n])

    @precondition(lambda self: self.readers)
    @rule(data=st.data())
    def reader_read_exact(self, data: st.DataObject) -> None:
        model = self.readers[data.draw(st.sampled_from(sorted(self.readers)), label="reader")]
        n = data.draw(st.integers(0, self.capacity), label="n")
        result = model.reader.read_exact(n)
        if self.head - max(model.cursor, self.tail) < n:
            assert result is None
            return
        assert result is not None
        start, taken, lost = self._model_take(model, n)
        assert taken == n
        assert (result.start, result.lost) == (start, lost)
        np.testing.assert_array_equal(result.frames, self.data[start : start + n])

    @precondition(lambda self: self.readers)
    @rule(data=st.data())
    def reader_seek(self, data: st.DataObject) -> None:
        model = self.readers[data.draw(st.sampled_from(sorted(self.readers)), label="reader")]
        index = data.draw(st.integers(0, self.head + 5), label="index")
        model.reader.seek(index)
        model.cursor = index

    @precondition(lambda self: self.readers)
    @rule(data=st.data())
    def reader_close(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.readers)), label="reader")
        model = self.readers.pop(name)
        model.reader.close()
        assert model.reader not in self.ring.readers()
        with pytest.raises(trio.ClosedResourceError):
            model.reader.read()

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def sizes_and_statistics(self) -> None:
        ring = self.ring
        assert ring.head == self.head
        assert ring.tail == self.tail
        assert ring.nbytes == self.nbytes
        stats = ring.statistics()
        held = min(self.head, self.capacity)
        assert stats == RingStats(
            capacity_frames=self.capacity,
            held_frames=held,
            head=self.head,
            tail=self.tail,
            nbytes=self.nbytes,
            evicted_frames=self.tail,
            gaps=len(self.gaps),
            clock_steps=len(self.steps),
            oldest_utc=self.model_utc(self.tail) if held else None,
            newest_utc=self.model_utc(self.head) if held else None,
            anchors=min(len(self.blocks), self.anchor_limit),
            anchors_dropped=self.anchors_dropped,
        )

    @invariant()
    def readers_match(self) -> None:
        assert self.ring.readers() == [m.reader for m in self.readers.values()]
        for model in self.readers.values():
            reader = model.reader
            assert (reader.cursor, reader.lost_frames, reader.overruns) == (
                model.cursor,
                model.lost_frames,
                model.overruns,
            )
            assert reader.lag == self.head - model.cursor


RingMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestRingAgainstModel = RingMachine.TestCase


# -- plain tests -------------------------------------------------------------------


def make_ring(seconds: float = 10.0, rate: int = 16000, **kwargs: Any) -> AudioRing:
    return AudioRing(rate=rate, channels=1, dtype="int16", seconds=seconds, **kwargs)


def silence(n: int, channels: int = 1) -> np.ndarray[Any, Any]:
    return np.zeros((n, channels), dtype=np.int16)


def test_capture_gap_is_reported_with_its_length_and_index() -> None:
    ring = make_ring()
    boot = 1_800_000_000.0
    for k in range(3):  # 0.1 s blocks, on time
        ring.write(silence(1600), utc=boot + 0.1 * k, mono=50.0 + 0.1 * k, synced=True)
    # The USB mic was unplugged for 3 s.
    restart = ring.write(silence(1600), utc=boot + 3.3, mono=53.3, synced=True)

    assert restart == 4800
    [gap] = ring.gaps(0, ring.head)
    assert gap.index == 4800
    assert gap.mono == pytest.approx(50.3)
    assert gap.seconds == pytest.approx(3.0)
    assert ring.gaps(4800, ring.head) == []  # the hole lies before frame 4800
    assert ring.statistics().gaps == 1
    # The timeline shows the hole: the frame after it is 3 s later than its neighbour.
    assert ring.index_to_utc(4800) - ring.index_to_utc(4799) == pytest.approx(3.0 + 1 / 16000)
    # A time inside the hole maps to the first frame after it.
    assert ring.utc_to_index(boot + 1.5) == 4800
    assert ring.mono_to_index(51.0) == 4800


def test_small_jitter_is_not_a_gap() -> None:
    ring = make_ring()
    ring.write(silence(1600), utc=1e9, mono=10.0)
    ring.write(silence(1600), utc=1e9 + 0.2, mono=10.2)  # 0.1 s late: jitter
    assert ring.gaps(0, ring.head) == []
    assert ring.index_to_mono(1600) == 10.2  # the anchor absorbs it


def test_clock_step_keeps_utc_monotonic_and_is_recorded() -> None:
    ring = make_ring(seconds=5.0)
    wrong = 1_000_000.0  # a Pi without RTC boots with a stale wall clock
    for k in range(20):
        ring.write(silence(1600), utc=wrong + 0.1 * k, mono=7.0 + 0.1 * k)
    # NTP syncs: the wall clock jumps forward an hour.
    for k in range(20, 40):
        ring.write(silence(1600), utc=wrong + 3600 + 0.1 * k, mono=7.0 + 0.1 * k, synced=True)

    [step] = ring.clock_steps(0, ring.head)
    assert step.index == 20 * 1600
    assert step.seconds == pytest.approx(3600.0)
    assert step.synced
    assert ring.statistics().clock_steps == 1
    # Audio captured before the sync now carries corrected UTC, and time never runs back.
    assert ring.index_to_utc(0) == pytest.approx(wrong + 3600)
    times = [ring.index_to_utc(i) for i in range(ring.tail, ring.head + 1, 97)]
    assert all(a < b for a, b in itertools.pairwise(times))
    assert ring.statistics().newest_utc == pytest.approx(wrong + 3600 + 4.0)
    # Segment metadata can tell which audio was captured with an unsynced clock.
    assert not ring.anchor_at(ring.tail).synced
    assert ring.anchor_at(ring.head - 1).synced


def test_utc_to_index_round_trips_index_to_utc() -> None:
    rate = 48000
    ring = AudioRing(rate=rate, channels=2, dtype="float32", seconds=2.0)
    utc, mono = 1_795_000_000.123, 3_600_000.5  # a device up for ~six weeks
    rng = np.random.default_rng(7)
    for _ in range(400):  # 10 ms blocks with a little capture jitter
        ring.write(np.zeros((480, 2), np.float32), utc=utc, mono=mono, synced=True)
        jitter = float(rng.uniform(-2e-4, 2e-4))
        utc += 0.01 + jitter
        mono += 0.01 + jitter

    exact = 0
    for index in range(ring.tail, ring.head, 7):
        when = ring.index_to_utc(index)
        found = ring.utc_to_index(when)
        alone = ring.index_to_utc(index - 1) < when - 2e-6
        if alone:
            assert found == index
            assert ring.mono_to_index(ring.index_to_mono(index)) == index
            exact += 1
            # ... and through the ISO 8601 text the device API prints and parses.
            text = iso_utc(when)
            assert ring.utc_to_index(datetime.fromisoformat(text).timestamp()) == index
        else:
            # A block stamped a little early starts at (or within a microsecond of)
            # the time of the previous block's last frames; time never runs back,
            # and such a time maps to the first frame that has it.
            assert found < index
            assert ring.index_to_utc(found) >= when - 2e-6
    assert exact > 0.95 * len(range(ring.tail, ring.head, 7))
    assert ring.utc_to_index(ring.index_to_utc(ring.head) + 60) == ring.head


def test_iso_utc_format() -> None:
    t = datetime(2026, 11, 24, 5, 25, 8, 123456, tzinfo=UTC).timestamp()
    assert iso_utc(t) == "2026-11-24T05:25:08.123456Z"


def test_evicted_error_names_oldest_available_time() -> None:
    ring = make_ring(seconds=1.0, rate=1000)
    base = datetime(2026, 11, 24, 5, 25, 8, tzinfo=UTC).timestamp()
    for k in range(30):  # 3 s into a 1 s ring
        ring.write(silence(100), utc=base + 0.1 * k, mono=100.0 + 0.1 * k)

    with pytest.raises(EvictedError, match=r"2026-11-24T05:25:10\.000000Z") as info:
        ring.read(0, 10)
    assert info.value.oldest_index == 2000
    assert info.value.oldest_utc == pytest.approx(base + 2.0)
    assert isinstance(info.value, LookupError)


def test_oversized_block_keeps_its_newest_frames() -> None:
    ring = make_ring(seconds=0.01, rate=1000)  # 10 frames
    block = np.arange(25, dtype=np.int16)
    assert ring.write(block, utc=500.0, mono=5.0) == 0
    assert (ring.head, ring.tail) == (25, 15)
    np.testing.assert_array_equal(ring.read(15, 25)[:, 0], block[15:])
    assert ring.index_to_mono(15) == pytest.approx(5.015)
    assert ring.statistics().evicted_frames == 15


def test_memory_is_flat_over_many_blocks() -> None:
    ring = make_ring(seconds=1.0, rate=1600, max_events=32)
    stores = (ring.nbytes, ring.max_anchors, ring.max_events)
    block = silence(16)
    mono = utc = 0.0

    def write_blocks(count: int) -> None:
        nonlocal mono, utc
        for k in range(count):
            # Every block arrives after a hole and with a stepped clock: worst case.
            mono += 0.01 + 0.3
            utc += 0.01 + 0.3 + (1.0 if k % 2 else -1.0)
            ring.write(block, utc=utc, mono=mono)

    write_blocks(1000)  # fill the ring and every store once
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        write_blocks(10_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert grown < 16 * 1024
    assert (ring.nbytes, ring.max_anchors, ring.max_events) == stores
    stats = ring.statistics()
    assert stats.anchors <= ring.max_anchors
    assert stats.gaps == stats.clock_steps == 10_999
    assert len(ring.gaps(-1, ring.head)) == 32
    assert len(ring.clock_steps(-1, ring.head)) == 32


def test_default_anchor_store_fits_five_millisecond_blocks() -> None:
    ring = make_ring(seconds=1.0, rate=16000)
    for k in range(1000):  # 5 s of 5 ms blocks through a 1 s ring
        ring.write(silence(80), utc=1e9 + k * 0.005, mono=k * 0.005)
    assert ring.statistics().anchors_dropped == 0
    assert ring.anchor_at(ring.tail).index == ring.tail

    small = make_ring(seconds=1.0, rate=16000)
    for k in range(1000):  # 2.5 ms blocks outrun it: counted, not silent
        small.write(silence(40), utc=1e9 + k * 0.0025, mono=k * 0.0025)
    assert small.statistics().anchors_dropped > 0


def test_write_rejects_wrong_shapes_and_mixed_clocks() -> None:
    ring = AudioRing(rate=16000, channels=2, dtype="int16", seconds=1.0)
    with pytest.raises(ValueError, match="shaped"):
        ring.write(silence(10, channels=1), utc=1.0, mono=1.0)
    with pytest.raises(ValueError, match="shaped"):
        ring.write(np.zeros(10, np.int16), utc=1.0, mono=1.0)
    with pytest.raises(ValueError, match="finite"):
        ring.write(silence(10, 2), utc=math.nan, mono=1.0)
    ring.write(silence(10, 2), utc=100.0, mono=10.0)
    with pytest.raises(ValueError, match="backwards"):
        ring.write(silence(10, 2), utc=100.0, mono=5.0)
    assert ring.head == 10
    assert ring.write(silence(0, 2), utc=100.0, mono=10.0) == 10  # empty block: no-op


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0}, "rate"),
        ({"channels": 0}, "channels"),
        ({"dtype": "float64"}, "dtype"),
        ({"dtype": "nonsense"}, "dtype"),
        ({"seconds": 0.0}, "seconds"),
        ({"seconds": math.inf}, "seconds"),
        ({"seconds": 1e-9}, "holds no frame"),
        ({"max_anchors": 0}, "max_anchors"),
        ({"max_events": 0}, "max_events"),
        ({"gap_tolerance": -1.0}, "gap_tolerance"),
        ({"step_tolerance": 0.0}, "step_tolerance"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"rate": 16000, "channels": 1, "dtype": "int16", "seconds": 1.0}
    with pytest.raises(ValueError, match=message):
        AudioRing(**(args | kwargs))


def test_time_mapping_needs_audio() -> None:
    ring = make_ring()
    with pytest.raises(LookupError):
        ring.index_to_utc(0)
    assert ring.mono_to_index(123.0) == 0
    assert ring.statistics().oldest_utc is None


def test_readers_are_listed_until_closed_or_dropped() -> None:
    ring = make_ring()
    with ring.open_reader("stt") as stt:
        segmenter = ring.open_reader("segmenter")
        assert ring.readers() == [stt, segmenter]
    assert ring.readers() == [segmenter]
    del segmenter
    gc.collect()
    assert ring.readers() == []


def test_slow_reader_is_told_exactly_what_it_lost() -> None:
    ring = make_ring(seconds=1.0, rate=100)
    reader = ring.open_reader("api", start=0)
    for k in range(25):  # 2.5 s into a 1 s ring
        ring.write(pattern(10 * k, 10, 1), utc=1e9 + 0.1 * k, mono=0.1 * k)
    result = reader.read(max_frames=30)
    assert (result.start, result.lost, len(result.frames)) == (150, 150, 30)
    np.testing.assert_array_equal(result.frames, pattern(150, 30, 1))
    assert (reader.lost_frames, reader.overruns, reader.lag) == (150, 1, 70)
    assert reader.read_exact(71) is None
    assert reader.cursor == 180
    exact = reader.read_exact(70)
    assert exact is not None
    assert (exact.start, exact.lost, reader.lag) == (180, 0, 0)
    assert reader.read().frames.shape == (0, 1)


async def test_reader_wait_wakes_on_write(autojump_clock: trio.testing.MockClock) -> None:
    ring = make_ring(seconds=1.0, rate=1000)
    reader = ring.open_reader("live")
    t0 = trio.current_time()
    woke: list[float] = []

    async def listen() -> None:
        await reader.wait(150)
        woke.append(trio.current_time() - t0)
        await ring.wait_for(450)
        woke.append(trio.current_time() - t0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen)
        for k in range(1, 6):  # a 100-frame block every second
            await trio.sleep(1)
            ring.write(silence(100), utc=1e9 + k, mono=float(k))

    assert woke == [2.0, 5.0]
    # Already satisfied: returns without waiting.
    await reader.wait(1)
    await ring.wait_for(ring.head)
    assert trio.current_time() - t0 == 5.0
    assert len(reader.read().frames) == 500
