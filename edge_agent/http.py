"""Serving an ASGI app with Hypercorn's Trio worker inside the agent's nursery.

Shared by the device API and the reference backend. Binding port 0 picks a free
port; the URL actually bound is what `serve` reports as started, so tests run
real servers on loopback without port races.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from .supervisor import TaskStatus

__all__ = ["hypercorn_config", "serve"]

log = logging.getLogger(__name__)


def hypercorn_config(bind: str, **options: Any) -> Config:
    """A quiet Hypercorn config for `bind` ("host:port"); options set attributes."""
    cfg = Config()
    cfg.bind = [bind]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.graceful_timeout = 2.0
    for key, value in options.items():
        setattr(cfg, key, value)
    return cfg


async def serve(
    app: Any, bind: str, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED, **options: Any
) -> None:
    """Serve `app` until cancelled; reports the base URL (e.g. "http://127.0.0.1:40123")."""
    cfg = hypercorn_config(bind, **options)

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            lambda task_status: hypercorn_serve(app, cfg, task_status=task_status)
        )
        url = binds[0]
        log.info("http serving url=%s", url)
        task_status.started(url)
