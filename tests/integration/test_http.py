"""Serving ASGI apps with Hypercorn inside a Trio nursery (edge_agent.http)."""

from __future__ import annotations

import os
import socket
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
import trio.testing

from edge_agent.http import serve


class EndlessStream:
    """An ASGI app that streams 64 KiB chunks until the client is gone, and
    records that it noticed."""

    def __init__(self) -> None:
        self.gone = trio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")]})
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.gone.set()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            while True:
                await send({"type": "http.response.body", "body": b"x" * 65536,
                            "more_body": True})


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="a Linux socket option")
async def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout() -> None:
    """Without the write timeout the server would write to this client forever."""
    app = EndlessStream()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve, app, "127.0.0.1:0", write_timeout=0.5))
        host, port = urlsplit(url).hostname, urlsplit(url).port
        with trio.socket.socket() as client:
            await client.connect((host, port))
            await client.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            # The client never reads: the socket buffers fill, then the window is zero.
            with trio.move_on_after(20):
                await app.gone.wait()
        # (Closing the client also unblocks the server if it did not drop it.)
        assert app.gone.is_set(), "the server still writes to a client that reads nothing"
        nursery.cancel_scope.cancel()


class StuckStartup:
    """An ASGI app whose lifespan startup never completes (it waits on a dead
    resource, say)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await trio.sleep_forever()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds through /proc")
async def test_serving_cancelled_during_startup_leaves_no_socket_open() -> None:
    """The supervisor restarts a stuck API; each attempt must not leak its port."""
    before = _open_fds()
    for _ in range(3):
        with trio.move_on_after(5) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(serve, StuckStartup(), "127.0.0.1:0",
                                           write_timeout=1.0))
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        assert not scope.cancelled_caught
    assert _open_fds() == before
