"""Where the segmenter cuts the ring into segments, and how much it writes at once.

Owns `SegmentCutter`, the synchronous core of the segmenter: from values the
segmenter reads off the ring (ring indices, the wall-clock and monotonic time of a
segment's first frame, where its wall-clock end and the next clock step fall) it
decides where the open segment ends and which frames to write next:

* a segment ends on the next multiple of ``segments.seconds`` on the wall clock (the
  first one is partial; a start within half a frame of a boundary counts as on it);
* a wall-clock *step* ends it earlier, so each segment has one time mapping;
* at most ``max_write_frames`` go to the encoder in one call.

No Trio, no ring, no disk: values in, values out.

Imports nothing of the project; never agent or another stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["NextWrite", "SegmentCutter"]


@dataclass(frozen=True)
class NextWrite:
    """Write ring frames ``[start, stop)`` to the open segment; then seal it if
    ``seal`` (``stop`` is where it ends)."""

    start: int
    stop: int
    cut: int | None  # ring index where the open segment ends, None while not known

    @property
    def frames(self) -> int:
        return self.stop - self.start

    @property
    def seal(self) -> bool:
        return self.cut is not None and self.stop == self.cut


@dataclass(frozen=True)
class SegmentCutter:
    """Cuts for segments of ``seconds`` of audio at ``rate`` frames per second."""

    seconds: float
    rate: int
    max_write_frames: int

    def boundary(self, start_ts: float) -> float:
        """Wall-clock end of a segment whose first frame was captured at ``start_ts``:
        the next multiple of ``seconds`` (a start within half a frame of a boundary
        counts as on it, so that segment is a whole one)."""
        return (math.floor((start_ts + 0.5 / self.rate) / self.seconds) + 1) * self.seconds

    def end_mono(self, start_ts: float, mono_start: float) -> float:
        """`boundary` on the monotonic clock, for a first frame at ``mono_start``."""
        return mono_start + (self.boundary(start_ts) - start_ts)

    def cut(self, *, start: int, cursor: int, head: int, boundary: int | None,
            step: int | None) -> int | None:
        """Ring index where the open segment ends, or None while it is not known.

        Args:
            start: Ring index of the segment's first frame.
            cursor: First frame not yet written to it.
            head: One past the newest frame in the ring.
            boundary: Ring index of the segment's wall-clock end (the first frame
                captured at or after it), or None.
            step: Ring index of the first wall-clock step after ``start``, or None.
        """
        cut = boundary
        if cut is not None and not start < cut < head:
            cut = None  # the boundary has not been captured yet
        if step is not None and (cut is None or step < cut):
            cut = step  # a wall-clock step starts a new segment
        if cut is not None:
            cut = max(cut, cursor)
        return cut

    def next_write(self, *, start: int, cursor: int, head: int, boundary: int | None,
                   step: int | None) -> NextWrite:
        """What to write next to the open segment (``cursor < head``); see `cut`."""
        cut = self.cut(start=start, cursor=cursor, head=head, boundary=boundary, step=step)
        stop = min(head if cut is None else cut, cursor + self.max_write_frames)
        return NextWrite(cursor, max(stop, cursor), cut)
