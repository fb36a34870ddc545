"""The ring's value types: time anchors, gaps, clock steps, read results, statistics
and the error of a read past what the ring still holds.

Imports only ``clock`` and ``errors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..clock import iso_utc
from ..errors import EdgeAgentError

# Capture formats PortAudio delivers that numpy can hold without conversion.
SAMPLE_DTYPES = frozenset(np.dtype(t) for t in ("int8", "uint8", "int16", "int32", "float32"))

# Default anchor store: one anchor per block of at least this many seconds over the
# whole capacity. Smaller blocks make the oldest anchors fall out early (counted).
MIN_BLOCK_SECONDS = 0.005

# A time this close before a frame's time still counts as "at" that frame. Timestamps
# are printed with microsecond resolution and UTC floats carry ~0.25 us of rounding,
# so without it a round trip through ISO 8601 could land one frame late.
TIME_EPSILON = 1e-6


@dataclass(frozen=True, slots=True)
class Anchor:
    """Capture time of the first frame of one written block."""

    index: int
    utc: float
    mono: float
    synced: bool


@dataclass(frozen=True, slots=True)
class Gap:
    """Frames from ``index`` on start after a capture hole of ``seconds``.

    ``mono`` is when the hole started (where the previous block was expected to end).
    """

    index: int
    mono: float
    seconds: float


@dataclass(frozen=True, slots=True)
class ClockStep:
    """The wall clock jumped by ``seconds`` (signed) at the block starting at ``index``."""

    index: int
    mono: float
    seconds: float
    synced: bool


@dataclass(frozen=True, slots=True)
class ReadResult:
    """Frames read from ``start`` on; ``lost`` frames were evicted before the reader got them."""

    start: int
    frames: NDArray[Any]
    lost: int


@dataclass(frozen=True, slots=True)
class RingStats:
    """A snapshot for metrics and ``/v1/status``.

    ``oldest_utc`` is the start of the oldest held frame, ``newest_utc`` the end of the
    newest one (the time of ``head``), so their difference is the held duration.
    ``anchors`` is how many anchors are kept; ``anchors_dropped`` counts anchors
    overwritten while they still governed held frames (blocks smaller than the anchor
    store was sized for), after which the oldest frames' times are extrapolated.
    """

    capacity_frames: int
    held_frames: int
    head: int
    tail: int
    nbytes: int
    evicted_frames: int
    gaps: int
    clock_steps: int
    oldest_utc: float | None
    newest_utc: float | None
    anchors: int = 0
    anchors_dropped: int = 0


class EvictedError(EdgeAgentError, LookupError):
    """Frames were asked for that the ring no longer holds.

    The message names the oldest audio still available so an operator (or an HTTP
    client) can see how far back the device can reach.
    """

    def __init__(self, requested: int, oldest_index: int, oldest_utc: float | None) -> None:
        self.requested = requested
        self.oldest_index = oldest_index
        self.oldest_utc = oldest_utc
        held = (
            f"the oldest audio held starts at index {oldest_index} ({iso_utc(oldest_utc)})"
            if oldest_utc is not None
            else "no audio is held"
        )
        super().__init__(f"frames from index {requested} are no longer held; {held}")


