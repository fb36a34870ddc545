"""``/v1/levels``: the input's level as Server-Sent Events, for the device page's meter.

Ten times a second (`INTERVAL`) one event with the RMS and peak (dBFS) of the
newest audio in the ring, whether it clipped, and the capture's input overflows
(a count, and whether it grew since the last event), so an installer can set the
gain while watching a phone. Listeners are bounded (``api.max_live_listeners``
also bounds these streams: each is a live view of the input); a stream ends after
``api.live_max_seconds`` and the page reconnects.

Imports only the bottom layer and the API's own modules; never agent, another
stage, metrics or systemd.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Final

import trio
from starlette.requests import Request

from ..audio.pcm import levels
from ..clock import Clock, iso_utc
from ..config import ApiConfig
from ..ring import AudioRing
from .counters import ApiStats
from .params import ApiError, query_params
from .render import Sink, StreamResponse

__all__ = ["INTERVAL", "LevelStream"]

#: Seconds between events, and the audio each one measures.
INTERVAL: Final = 0.1
#: Input overflows are read this often (they come from the agent's status).
_OVERFLOW_EVERY: Final = 10


class LevelStream:
    """Serves ``/v1/levels``.

    Args:
        config: the ``[api]`` section (listener bound, stream length, timeouts).
        ring, clock: the audio held, and the device's time.
        stats: the API's counters (listeners, sessions, refusals).
        overflows: the capture's input overflows so far.
    """

    def __init__(self, config: ApiConfig, *, ring: AudioRing, clock: Clock, stats: ApiStats,
                 overflows: Callable[[], int]) -> None:
        self.config = config
        self.ring = ring
        self.clock = clock
        self.stats = stats
        self.overflows = overflows

    async def levels(self, request: Request) -> StreamResponse:
        query_params(request, ())
        cfg, st = self.config, self.stats
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                   "X-Accel-Buffering": "no"}
        if request.method == "HEAD":
            return StreamResponse(200, headers, None, stall=1.0, what="levels")
        if st.level_listeners >= cfg.max_live_listeners:
            st.level_rejected += 1
            raise ApiError(503, f"busy: {st.level_listeners} level listeners "
                                "(api.max_live_listeners)", headers={"Retry-After": "5"})
        st.level_listeners += 1
        st.level_sessions += 1

        def release() -> None:  # StreamResponse runs it exactly once
            st.level_listeners -= 1

        return StreamResponse(200, headers, partial(self._produce, cfg.live_max_seconds),
                              stall=cfg.request_timeout_seconds, what="levels",
                              release=release)

    def event(self, overflows: int, previous: int) -> bytes:
        """One event: the level of the newest `INTERVAL` of audio."""
        ring = self.ring
        window = max(1, round(INTERVAL * ring.rate))
        frames = ring.read(max(ring.tail, ring.head - window), ring.head)
        lv = levels(frames)
        body = {
            "utc": iso_utc(self.clock.utc()),
            "seconds": round(len(frames) / ring.rate, 3),
            "rms_dbfs": round(lv.rms_dbfs, 2),
            "peak_dbfs": round(lv.peak_dbfs, 2),
            "clipped": bool(lv.clipped),
            "overflows": overflows,
            "overflow": overflows > previous,
        }
        return f"data: {json.dumps(body)}\n\n".encode()

    async def _produce(self, seconds: float, sink: Sink) -> None:
        # The browser waits this long before reconnecting after the stream ends.
        await sink.send(b"retry: 1000\n\n")
        end = trio.current_time() + seconds
        overflows = previous = self.overflows()
        tick = 0
        while trio.current_time() < end:
            if tick % _OVERFLOW_EVERY == 0:
                previous, overflows = overflows, self.overflows()
            await sink.send(self.event(overflows, previous))
            previous = overflows
            tick += 1
            await trio.sleep(INTERVAL)
