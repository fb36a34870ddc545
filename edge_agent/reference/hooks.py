"""The fault hook of the reference backend's routes.

The routes can be told to misbehave: wait before answering, answer 503 with a
Retry-After, answer a segment upload with a wrong status, answer an STT chunk
with malformed JSON. What decides is a `FaultHook` that the caller puts on
`Backend.faults` (tests do, with their own knobs and a TCP proxy for connection
faults); without one (the default, and what `edge-agent backend` runs) the
routes behave. Counter faults are consumed through `take(name)`: the names the
routes ask for are ``unavailable``, ``wrong_status`` and ``stt_garbage``.

Imports only starlette and Trio; nothing of the project.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio
from starlette.responses import Response

__all__ = ["FaultHook", "FaultSource", "common_faults"]


class FaultHook(Protocol):
    """What the routes read of the faults to inject (changeable while serving)."""

    delay_seconds: float  # wait this long before answering any STT or segment request
    retry_after: int | None  # Retry-After seconds sent with injected 503s
    wrong_status_code: int  # the status of an injected wrong answer to a segment PUT

    def take(self, name: str) -> bool:
        """Consume one unit of the counter fault `name`; True if it applies now."""
        ...


#: How a route finds the current hook (read per request, so it can be swapped).
FaultSource = Callable[[], "FaultHook | None"]


async def common_faults(faults: FaultHook | None) -> Response | None:
    """The faults every STT and segment route shares: a delay, then maybe a 503.
    A response ends the request."""
    if faults is None:
        return None
    if faults.delay_seconds:
        await trio.sleep(faults.delay_seconds)
    if faults.take("unavailable"):
        headers = {}
        if faults.retry_after is not None:
            headers["Retry-After"] = str(faults.retry_after)
        return Response("unavailable (injected)", status_code=503, headers=headers)
    return None
