"""The segment cutter: wall-clock aligned ends, clock-step cuts, write sizes (no ring, no disk)."""

from __future__ import annotations

from edge_agent.spool import NextWrite, SegmentCutter

RATE = 8000
CUTTER = SegmentCutter(seconds=5, rate=RATE, max_write_frames=10 * RATE)


def test_a_segment_ends_on_the_next_multiple_of_its_length() -> None:
    # 3 s past a multiple of 5 s: a partial first segment of 2 s.
    assert CUTTER.boundary(1_800_000_003.0) == 1_800_000_005.0
    assert CUTTER.end_mono(1_800_000_003.0, 1000.0) == 1002.0
    # On a boundary: a whole segment.
    assert CUTTER.boundary(1_800_000_005.0) == 1_800_000_010.0
    assert CUTTER.end_mono(1_800_000_005.0, 1000.0) == 1005.0
    # Within half a frame (62.5 us at 8 kHz) before a boundary counts as on it ...
    assert CUTTER.boundary(1_800_000_004.99995) == 1_800_000_010.0
    # ... a whole frame before it does not.
    assert CUTTER.boundary(1_800_000_004.999875) == 1_800_000_005.0
    assert SegmentCutter(seconds=60, rate=RATE, max_write_frames=1).boundary(
        1_800_000_003.0) == 1_800_000_060.0


def test_the_boundary_cuts_once_it_is_captured() -> None:
    # The boundary's frame is in the ring: write up to it, then seal.
    todo = CUTTER.next_write(start=0, cursor=8000, head=40_000, boundary=16_000, step=None)
    assert todo == NextWrite(start=8000, stop=16_000, cut=16_000)
    assert (todo.frames, todo.seal) == (8000, True)
    # Not captured yet (it maps to head, or beyond): write what there is, no seal.
    for boundary in (40_000, 50_000):
        todo = CUTTER.next_write(start=0, cursor=8000, head=40_000, boundary=boundary,
                                 step=None)
        assert todo == NextWrite(start=8000, stop=40_000, cut=None)
        assert (todo.frames, todo.seal) == (32_000, False)
    # A boundary at the segment's own start is no cut.
    todo = CUTTER.next_write(start=100, cursor=100, head=900, boundary=100, step=None)
    assert todo == NextWrite(start=100, stop=900, cut=None)


def test_a_clock_step_cuts_before_the_boundary() -> None:
    todo = CUTTER.next_write(start=0, cursor=8000, head=40_000, boundary=16_000, step=12_000)
    assert todo == NextWrite(start=8000, stop=12_000, cut=12_000)
    assert todo.seal
    # A step after the boundary waits for the next segment.
    todo = CUTTER.next_write(start=0, cursor=8000, head=40_000, boundary=16_000, step=20_000)
    assert todo == NextWrite(start=8000, stop=16_000, cut=16_000)
    # A step while the boundary is not captured yet cuts by itself.
    todo = CUTTER.next_write(start=0, cursor=8000, head=40_000, boundary=None, step=30_000)
    assert todo == NextWrite(start=8000, stop=30_000, cut=30_000)
    # A cut at or before the cursor seals at once, writing nothing.
    todo = CUTTER.next_write(start=0, cursor=8000, head=40_000, boundary=16_000, step=6000)
    assert todo == NextWrite(start=8000, stop=8000, cut=8000)
    assert (todo.frames, todo.seal) == (0, True)


def test_at_most_max_write_frames_go_to_the_encoder_at_once() -> None:
    cutter = SegmentCutter(seconds=60, rate=RATE, max_write_frames=1000)
    todo = cutter.next_write(start=0, cursor=500, head=100_000, boundary=None, step=None)
    assert todo == NextWrite(start=500, stop=1500, cut=None)
    # The cut is further than one write: no seal yet.
    todo = cutter.next_write(start=0, cursor=500, head=100_000, boundary=4000, step=None)
    assert todo == NextWrite(start=500, stop=1500, cut=4000)
    assert (todo.frames, todo.seal) == (1000, False)
    # The last write before the cut ends on it.
    todo = cutter.next_write(start=0, cursor=3500, head=100_000, boundary=4000, step=None)
    assert todo == NextWrite(start=3500, stop=4000, cut=4000)
    assert (todo.frames, todo.seal) == (500, True)
