"""The capture interface: what a source is and what it yields.

A `Source` is opened as an async context manager that yields an async iterator
of `Block`s in the capture format (rate, channels, sample format from the
config); the capture task (`task.run_capture`) writes them to the ring. Owns
`Block`, `SourceStats`, `CaptureError` and the `Source` protocol.

Part of the `capture` stage. Imports only the bottom layer (`audio`, `errors`);
never agent, another stage, metrics or api.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from numpy.typing import NDArray

from ..audio.pcm import SampleFormat
from ..errors import CaptureError

__all__ = ["Block", "BlockStream", "CaptureError", "Source", "SourceStats"]

@dataclass(frozen=True, slots=True)
class Block:
    """Frames shaped (n, channels) in the capture format; times are of frame 0."""

    frames: NDArray[Any]
    utc: float
    mono: float


#: What `Source.open` returns: entered, it gives the blocks as they are captured.
BlockStream = AbstractAsyncContextManager[AsyncIterator[Block]]


@dataclass
class SourceStats:
    """Counters a source keeps for health and metrics."""

    blocks: int = 0
    frames: int = 0
    input_overflows: int = 0
    # Blocks the callback had to drop because Trio did not drain the queue in time.
    queue_drops: int = 0
    opens: int = 0
    # Times the capture timeline jumped to the device's clock (after an overflow).
    timeline_resyncs: int = 0
    # Times the capture thread woke Trio (a reader of the ring had a batch to take).
    wakeups: int = 0


class Source(Protocol):
    """Where captured audio comes from, in the capture format."""

    rate: int
    channels: int
    format: SampleFormat
    stats: SourceStats

    def open(self) -> BlockStream:
        """An async context manager yielding an `AsyncIterator[Block]`."""
        ...
