"""Faults for the reference backend, made for real: the knobs tests flip
(`Faults`) and a TCP front (`FaultFront`) that refuses connections, resets them
mid-body and loses responses, which an ASGI app cannot do itself.

`run_backend` here serves `edge_agent.reference` on a private loopback port and
puts the front on the public one; the routes read the same `Faults` (delays,
503 storms, wrong statuses, garbage STT answers) through `Backend.faults`, which
the test sets: ``Backend(path, faults=Faults())``. Test-only: not in the wheel.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import trio

from edge_agent import reference
from edge_agent.supervisor import TaskStatus

__all__ = ["RESET_AFTER_BODY_BYTES", "FaultFront", "Faults", "run_backend"]

log = logging.getLogger(__name__)


@dataclass
class Faults:
    """Faults to inject, changeable while the server runs (tests flip them).

    Counters ("next N requests") decrease as requests consume them.
    """

    delay_seconds: float = 0.0
    unavailable: int = 0  # answer the next N requests with 503
    retry_after: int | None = 1  # Retry-After seconds sent with those 503s
    # Connection faults, made for real by the TCP front of `run_backend` below:
    down: bool = False  # refuse connections (listener closed) while True
    reset_mid_body: int = 0  # reset the next N requests after part of their body
    drop_response: int = 0  # the next N requests are handled, then the connection is
    # reset before the response reaches the client (a lost acknowledgement)
    wrong_status: int = 0  # answer the next N segment PUTs with `wrong_status_code`
    wrong_status_code: int = 500
    extra: dict[str, Any] = field(default_factory=dict)  # per-route faults ("stt_garbage")
    listening: bool = False  # the front's public port accepts connections (see `down`)

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


# How often the front looks at `Faults.down`; it only matters in tests that flip it.
_DOWN_POLL_SECONDS = 0.01
RESET_AFTER_BODY_BYTES = 4096


class _Conn:
    def __init__(self, client: trio.SocketStream, upstream: trio.SocketStream) -> None:
        self.client = client
        self.upstream = upstream
        self.new_request = True
        self.responded = False
        self.reset_at: int | None = None  # request bytes to forward before a reset
        self.head = b""
        self.forwarded = 0
        self.reset = False


async def _close(stream: trio.SocketStream, *, reset: bool) -> None:
    if reset:  # SO_LINGER 0: close() sends RST instead of FIN
        with contextlib.suppress(OSError):
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


class FaultFront:
    """Forwards bytes between clients and the app; breaks them as `faults` says."""

    def __init__(self, faults: Faults, upstream_port: int) -> None:
        self.faults = faults
        self.upstream_port = upstream_port

    async def run(self, host: str, port: int,
                  task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        reported = False
        while True:
            # Faults.down is a plain attribute tests flip, so it is polled.
            while self.faults.down:  # noqa: ASYNC110
                await trio.sleep(_DOWN_POLL_SECONDS)
            listeners = await trio.open_tcp_listeners(port, host=host)
            port = listeners[0].socket.getsockname()[1]
            self.faults.listening = True
            if not reported:
                task_status.started(f"http://[{host}]:{port}" if ":" in host
                                    else f"http://{host}:{port}")
                reported = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, self._handle, listeners)
                while not self.faults.down:  # noqa: ASYNC110
                    await trio.sleep(_DOWN_POLL_SECONDS)
                log.info("backend down (injected) port=%d", port)
                nursery.cancel_scope.cancel()
            self.faults.listening = False

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            await _close(client, reset=True)
            return
        conn = _Conn(client, upstream)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._requests, conn, nursery.cancel_scope)
                nursery.start_soon(self._responses, conn, nursery.cancel_scope)
        finally:
            reset = conn.reset or self.faults.down
            await _close(client, reset=reset)
            await _close(upstream, reset=reset)

    async def _requests(self, conn: _Conn, scope: trio.CancelScope) -> None:
        while True:
            try:
                data = await conn.client.receive_some(65536)
            except trio.BrokenResourceError:
                conn.reset = True
                data = b""
            if not data:
                scope.cancel()
                return
            if conn.new_request:
                conn.new_request, conn.responded = False, False
                conn.head, conn.forwarded, conn.reset_at = b"", 0, None
                if self.faults.take("reset_mid_body"):
                    conn.reset_at = -1  # decided once the head is complete
            if conn.reset_at is not None:
                if conn.reset_at < 0 and len(conn.head) < 65536:
                    conn.head += data
                    end = conn.head.find(b"\r\n\r\n")
                    if end >= 0:
                        m = re.search(rb"(?im)^content-length:\s*(\d+)", conn.head[:end])
                        body = int(m.group(1)) if m else 2 * RESET_AFTER_BODY_BYTES
                        conn.reset_at = end + 4 + min(RESET_AFTER_BODY_BYTES, body // 2)
                if conn.reset_at >= 0 and conn.forwarded + len(data) > conn.reset_at:
                    await conn.upstream.send_all(data[: conn.reset_at - conn.forwarded])
                    log.info("connection reset mid-body (injected)")
                    conn.reset = True
                    scope.cancel()
                    return
            conn.forwarded += len(data)
            try:
                await conn.upstream.send_all(data)
            except trio.BrokenResourceError:
                scope.cancel()
                return

    async def _responses(self, conn: _Conn, scope: trio.CancelScope) -> None:
        while True:
            try:
                data = await conn.upstream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                scope.cancel()
                return
            if not conn.responded:
                conn.responded = True
                if self.faults.take("drop_response"):
                    log.info("response dropped, connection reset (injected)")
                    conn.reset = True
                    scope.cancel()
                    return
            conn.new_request = True
            try:
                await conn.client.send_all(data)
            except trio.BrokenResourceError:
                conn.reset = True
                scope.cancel()
                return


async def run_backend(
    backend: reference.Backend, bind: str = "127.0.0.1:0", *,
    task_status: TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """The reference backend behind a `FaultFront` on `bind`, until cancelled;
    reports the front's base URL. `backend.faults` must be a `Faults`."""
    faults = backend.faults
    if not isinstance(faults, Faults):
        raise TypeError("faults.run_backend needs Backend(..., faults=Faults())")
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"listen address {bind!r}: expected HOST:PORT")
    async with trio.open_nursery() as nursery:
        inner: str = await nursery.start(reference.run_backend, backend, "127.0.0.1:0")
        front = FaultFront(faults, int(inner.rpartition(":")[2]))
        url: str = await nursery.start(front.run, host.strip("[]"), int(port))
        log.info("fault front serving url=%s backend=%s", url, inner)
        task_status.started(url)
