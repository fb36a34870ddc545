"""Capture sources for tests: `FastSource` delivers a file as fast as it is taken."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import numpy as np
import trio
import trio.testing

from edge_agent.audio.pcm import SampleFormat
from edge_agent.capture import Block, SourceStats
from edge_agent.ring import AudioRing


class FastSource:
    """`audio` (looped) in blocks as fast as the ring's readers take them.

    Before each block it waits while any reader lags more than half the ring, so
    nothing is evicted unread however slow a worker thread is: a fast, lossless
    stand-in for hours of capture. It pauses once `limit` frames are out (raise it
    to go on), so a test can stop at an exact frame. Times follow the sample count.
    """

    channels = 1
    format = SampleFormat.INT16

    def __init__(self, audio: np.ndarray, rate: int, block: int, limit: int,
                 start_utc: float = 1_800_000_000.0) -> None:
        assert len(audio) % block == 0
        self.audio, self.rate, self.block, self.limit = audio, rate, block, limit
        self.start_utc = start_utc
        # The ring to keep pace with (RuntimeError or None: not there yet / any more).
        self.ring_of: Callable[[], AudioRing | None] = lambda: None
        self.stats = SourceStats()

    async def run_to(self, limit: int) -> None:
        """Let the source go on until `limit` frames are out (and in the ring)."""
        self.limit = limit
        while self.stats.frames < limit:  # noqa: ASYNC110 (a test helper polling)
            await trio.sleep(0.001)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[AsyncIterator[Block]]:
        yield self._blocks()

    async def _blocks(self) -> AsyncIterator[Block]:
        pos = 0
        while True:
            try:
                ring = self.ring_of()
            except RuntimeError:
                ring = None
            while pos >= self.limit or (ring is not None and any(  # noqa: ASYNC110
                    ring.head - r.cursor > ring.capacity // 2 for r in ring.readers())):
                await trio.sleep(0.001)
            i = pos % len(self.audio)
            t = pos / self.rate
            yield Block(self.audio[i:i + self.block], self.start_utc + t, 1000.0 + t)
            pos += self.block
            self.stats.frames = pos
            await trio.lowlevel.checkpoint()
