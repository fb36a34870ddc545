"""The one way edge-agent runs blocking work (disk, codecs) off the Trio thread.

A `ThreadRunner` runs calls in Trio's worker threads, at most ``limit`` at once,
so each kind of work (a segment's encode, spool file I/O, a request's decode)
has its own bound. Stages take a runner instead of calling ``trio.to_thread``
themselves: `InlineRunner` runs the same calls on the Trio thread, which keeps
stage tests deterministic under Trio's MockClock (autojump cannot see a thread).

Imports nothing of the project.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

__all__ = ["InlineRunner", "ThreadRunner"]

T = TypeVar("T")


class ThreadRunner:
    """Runs blocking calls in worker threads, at most ``limit`` at a time."""

    def __init__(self, limit: int = 1) -> None:
        self.limiter = trio.CapacityLimiter(limit)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread; cancelling waits for it to return."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def run_abandonable(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread that a cancel leaves behind (a driver
        call that may hang must not hold up shutdown); its result is then lost."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter,
                                             abandon_on_cancel=True)


class InlineRunner(ThreadRunner):
    """Runs the calls on the Trio thread itself (tests under MockClock)."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    async def run_abandonable(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.run(fn, *args)
