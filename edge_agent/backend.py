"""The reference backend: a real HTTP server that receives what agents send.

It accepts live STT chunks (the `openai`, `deepgram` and `raw` protocols) and
durable segment uploads (idempotent `PUT`), and can inject faults so tests and
benchmarks exercise the agent against outages, slowness and garbage. Run it
with `edge-agent backend`; `edge-agent demo` starts one on loopback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .http import serve
from .supervisor import TaskStatus

__all__ = ["Backend", "Faults", "build_app", "run_backend"]

log = logging.getLogger(__name__)


@dataclass
class Faults:
    """Faults to inject, changeable while the server runs (tests flip them).

    Counters ("next N requests") decrease as requests consume them.
    """

    delay_seconds: float = 0.0
    unavailable: int = 0  # answer the next N requests with 503
    retry_after: int | None = 1  # Retry-After seconds sent with those 503s
    # Connection faults, made for real by the TCP front of `run_backend`:
    down: bool = False  # refuse connections (listener closed) while True
    reset_mid_body: int = 0  # reset the next N requests after part of their body
    drop_response: int = 0  # the next N requests are handled, then the connection is
    # reset before the response reaches the client (a lost acknowledgement)
    wrong_status: int = 0  # answer the next N segment PUTs with `wrong_status_code`
    wrong_status_code: int = 500
    extra: dict[str, Any] = field(default_factory=dict)  # per-route faults (see sections)

    def take(self, name: str) -> bool:
        """Consume one unit of a counter fault; True if it applies to this request."""
        value = getattr(self, name, None)
        if value is None:
            value = self.extra.get(name, 0)
        if isinstance(value, int) and value > 0:
            if hasattr(self, name):
                setattr(self, name, value - 1)
            else:
                self.extra[name] = value - 1
            return True
        return False


@dataclass
class Backend:
    """State shared by the routes: where uploads are kept, what was received."""

    data_dir: Path
    faults: Faults = field(default_factory=Faults)


async def _apply_common_faults(backend: Backend) -> Response | None:
    if backend.faults.delay_seconds:
        await trio.sleep(backend.faults.delay_seconds)
    if backend.faults.take("unavailable"):
        headers = {}
        if backend.faults.retry_after is not None:
            headers["Retry-After"] = str(backend.faults.retry_after)
        return Response("unavailable (injected)", status_code=503, headers=headers)
    return None


# ----------------------------------------------------------------------------
# Live STT (openai / deepgram / raw protocols)


def stt_routes(backend: Backend) -> list[Route]:
    async def not_yet(request: Request) -> Response:
        return Response("not implemented", status_code=501)

    return [Route("/v1/audio/transcriptions", not_yet, methods=["POST"])]


# ----------------------------------------------------------------------------
# Durable segment uploads (idempotent PUT)


def segment_routes(backend: Backend) -> list[Route]:
    async def not_yet(request: Request) -> Response:
        return Response("not implemented", status_code=501)

    return [Route("/v1/devices/{device}/segments/{segment_id}", not_yet, methods=["PUT"])]


# ----------------------------------------------------------------------------


def build_app(backend: Backend) -> Starlette:
    async def health(request: Request) -> Response:
        return Response("ok\n")

    routes = [Route("/healthz", health), *stt_routes(backend), *segment_routes(backend)]
    return Starlette(routes=routes)


async def run_backend(
    backend: Backend, bind: str = "127.0.0.1:0", *,
    task_status: TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the reference backend until cancelled; reports its base URL."""
    backend.data_dir.mkdir(parents=True, exist_ok=True)
    await serve(build_app(backend), bind, task_status=task_status)
