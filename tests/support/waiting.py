"""Waiting for a condition that nothing signals, in real or virtual time."""

from __future__ import annotations

import math
from collections.abc import Callable

import trio


async def until(predicate: Callable[[], bool], *, poll: float = 0.005,
                limit: float = math.inf) -> None:
    """Return once ``predicate()`` holds, checking every ``poll`` seconds; fail with
    `trio.TooSlowError` after ``limit`` seconds (Trio's clock, real or MockClock)."""
    with trio.fail_after(limit):
        while True:
            if predicate():
                return
            await trio.sleep(poll)
