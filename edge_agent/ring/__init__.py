"""The bounded, time-indexed audio ring at the centre of the agent.

Capture writes PCM blocks with their capture time; the STT streamer, the segmenter,
the device API and live listeners read the same ring independently, each with its
own cursor. Memory is fixed at construction: one sample buffer, one anchor store and
two bounded event stores. Nothing grows with uptime, and no read costs more than two
slice copies.

Every frame has an absolute index (``head`` = frames ever written). Time maps to
index through one anchor per block. Monotonic time is the truth; UTC is derived as
``mono + wall_offset`` with the offset of the newest anchor, so a wall-clock step
(first NTP sync on a Pi without RTC) corrects the whole held timeline at once and
keeps it monotonic. Capture gaps and clock steps are recorded, never hidden.

The ring is used from the Trio thread only, so it takes no locks; readers copy data
out before handing it to worker threads.

Bottom layer: imports only ``clock`` and ``errors``.
"""

from .core import AudioRing, RingReader
from .types import (
    Anchor,
    ClockStep,
    EvictedError,
    Gap,
    ReadResult,
    RingStats,
)

__all__ = [
    "Anchor",
    "AudioRing",
    "ClockStep",
    "EvictedError",
    "Gap",
    "ReadResult",
    "RingReader",
    "RingStats",
]
