"""Serving an ASGI app with Hypercorn's Trio worker inside the agent's nursery.

Shared by the device API and the reference backend. Binding port 0 picks a free
port; the URL actually bound is what `serve` reports as started, so tests run
real servers on loopback without port races.

Hypercorn writes to a socket without a timeout, so a client that stops reading
would hold its connection (and the task writing to it) for good. Where the OS
has it, TCP_USER_TIMEOUT on the listening socket (inherited by every accepted
one) has the kernel drop a connection whose data stays unacknowledged, a full
receive window included, for that long.

Imports only ``supervisor``; the ``api`` stage and the reference backend use it.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

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
    app: Any, bind: str, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED,
    write_timeout: float | None = None, **options: Any
) -> None:
    """Serve `app` until cancelled; reports the base URL (e.g. "http://127.0.0.1:40123").

    `write_timeout` (seconds): drop a connection whose client takes no data for
    that long (Linux; elsewhere it is ignored).
    """
    cfg = hypercorn_config(bind, **options)
    # Bound here, not by Hypercorn, to set the option before any connection is
    # accepted, and closed here whenever serving ends (even during startup).
    sockets = cfg.create_sockets()
    try:
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        for sock in sockets.insecure_sockets:
            if write_timeout is not None and option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, max(1, round(write_timeout * 1000)))
            sock.listen(cfg.backlog)
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                lambda task_status: worker_serve(
                    wrap_app(app, cfg.wsgi_max_body_size, "asgi"), cfg, sockets=sockets,
                    task_status=task_status,
                )
            )
            url = binds[0]
            log.info("http serving url=%s", url)
            task_status.started(url)
    finally:
        for sock in sockets.insecure_sockets:
            sock.close()
