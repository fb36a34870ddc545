"""The reference backend as one server: `Backend` (the state its routes share),
`build_app` (the Starlette app: health, STT, segments, objects) and
`run_backend` (serve it with Hypercorn until cancelled). `edge-agent backend`
and `edge-agent demo` run it; tests put a fault hook on `Backend.faults` and a
fault-injecting proxy of their own in front of it.

Imports only the bottom layer (`http`, `store`, `supervisor`); never agent or a stage.
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

from ..http import serve
from ..store import LocalStore
from ..supervisor import TaskStatus
from .hooks import FaultHook
from .objects import store_routes
from .segments import SegmentStoreStats, segment_routes
from .stt import SttReceiver, stt_routes

__all__ = ["Backend", "build_app", "run_backend"]

log = logging.getLogger(__name__)


@dataclass
class Backend:
    """State shared by the routes: where uploads are kept, what was received, and
    the faults to inject (None: none; see `reference.hooks`)."""

    data_dir: Path
    faults: FaultHook | None = None
    segment_stats: SegmentStoreStats = field(default_factory=SegmentStoreStats)
    stt: SttReceiver = field(default_factory=SttReceiver)


def build_app(backend: Backend) -> Starlette:
    async def health(request: Request) -> Response:
        return Response("ok\n")

    def faults() -> FaultHook | None:
        return backend.faults

    routes = [Route("/healthz", health), *stt_routes(backend.stt, faults),
              *segment_routes(backend.data_dir, backend.segment_stats, faults),
              # Recordings uploaded by recorder.AudioRecorder through store.HttpStore.
              *store_routes(LocalStore(backend.data_dir / "objects"), prefix="/v1/objects")]
    return Starlette(routes=routes)


class _LogStarted:
    """Passes the URL on to the caller's task status, logging it first."""

    def __init__(self, inner: TaskStatus, data_dir: Path) -> None:
        self.inner, self.data_dir = inner, data_dir

    def started(self, value: Any = None) -> None:
        log.info("backend serving url=%s data_dir=%s", value, self.data_dir)
        self.inner.started(value)


async def run_backend(
    backend: Backend, bind: str = "127.0.0.1:0", *,
    task_status: TaskStatus = trio.TASK_STATUS_IGNORED, setting: str = "listen",
) -> None:
    """Serve the reference backend on `bind` ("HOST:PORT") until cancelled;
    reports its base URL. `StartupError` naming `setting` (where `bind` came
    from) when it cannot listen there."""
    backend.data_dir.mkdir(parents=True, exist_ok=True)
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"listen address {bind!r}: expected HOST:PORT")
    # Hypercorn's own "Running on" lines are left out: only its warnings.
    quiet = logging.getLogger("edge_agent.reference.app.hypercorn")
    quiet.setLevel(logging.WARNING)
    await serve(build_app(backend), bind, errorlog=quiet, setting=setting,
                task_status=_LogStarted(task_status, backend.data_dir))
