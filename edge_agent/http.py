"""Serving an ASGI app with Hypercorn's Trio worker inside the agent's nursery.

Shared by the device API and the reference backend. Binding port 0 picks a free
port; the URL actually bound is what `serve` reports as started, so tests run
real servers on loopback without port races.

Hypercorn writes to a socket without a timeout, so a client that stops reading
would hold its connection (and the task writing to it) for good. Where the OS
has it, TCP_USER_TIMEOUT on the listening socket (inherited by every accepted
one) has the kernel drop a connection whose data stays unacknowledged, a full
receive window included, for that long.

The accept loop is ours, each connection served by Hypercorn's own connection
handler: one connection that fails inside Hypercorn (a malformed request it
cannot parse) is logged and closed, never the server and its other connections;
and ``max_connections`` bounds the descriptors a client can make the process
hold. A few connections beyond the cap are still accepted to answer health
checks (``reserve_paths``; everything else on them gets 503) and closed after
two seconds; past that, new connections are closed at once. Both are counted in `ConnectionStats`.

Only HTTP/1.1 is spoken. Hypercorn would switch a connection to HTTP/2 on an
``Upgrade: h2c`` request or the HTTP/2 preface, and has no setting against it; its
HTTP/2 side let bad requests fail the server and bodies past the size limit in.
Here an upgrade request is served over HTTP/1.1 (RFC 9110 lets a server ignore
``Upgrade``), and the preface reaches the app as an ``HTTP/2.0`` request, for the
app to refuse (the API answers 505).

A server that cannot listen (the port is in use, the address is not this
host's) raises `StartupError` naming the setting the address came from.

Imports only ``supervisor`` and ``errors``; the ``api`` stage and the reference
backend use it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import trio
from hypercorn.config import Config
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from .errors import StartupError
from .supervisor import TaskStatus

__all__ = ["ConnectionStats", "error_body", "hypercorn_config", "serve"]

log = logging.getLogger(__name__)

# accept() failures that mean "out of descriptors or memory for now": wait, go on.
_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_PAUSE: Final = 0.1
# How long a connection over the cap may stay open (it serves health checks only).
_RESERVE_SECONDS: Final = 2.0


def hypercorn_config(bind: str, **options: Any) -> Config:
    """A quiet Hypercorn config for `bind` ("host:port"); options set attributes."""
    cfg = Config()
    cfg.bind = [bind]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    for key, value in options.items():
        setattr(cfg, key, value)
    return cfg


def error_body(status: int, message: str, parameter: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """The one shape of an error answer: what is wrong, the status and, when one is
    to blame, which parameter (plus anything a route adds, such as ``oldest``)."""
    body: dict[str, Any] = {"error": message, "status": status}
    if parameter is not None:
        body["parameter"] = parameter
    body.update(extra)
    return body


@dataclass
class ConnectionStats:
    """Connections of one server, for metrics."""

    open: int = 0
    accepted: int = 0
    refused: int = 0  # closed at accept: over the cap and its reserve
    reserved: int = 0  # accepted over the cap, for health checks only
    failed: int = 0  # ended by an error inside the HTTP handling (logged)


class _Connection(trio.abc.HalfCloseableStream):
    """One client connection: the stream Hypercorn reads and writes, and the app it
    calls for it.

    Hypercorn keeps a connection's task (and its socket) until its idle timer runs
    out, even after the client has closed its side. A connection here ends as soon
    as the client has closed its side and no request on it is in progress, or its
    socket was closed, so the count of open connections is the descriptors held.
    """

    def __init__(self, stream: trio.SocketStream, app: Any, stats: ConnectionStats,
                 lifetime: float) -> None:
        self._stream, self._app, self._stats = stream, app, stats
        self.socket = stream.socket
        self.scope = trio.CancelScope(deadline=trio.current_time() + lifetime)
        self._active = 0
        self._client_done = False
        self._closed = False

    async def asgi(self, scope: Any, receive: Any, send: Any) -> None:
        self._active += 1
        try:
            await self._app(scope, receive, send)
        finally:
            self._active -= 1
            if self._client_done and not self._active:
                self.scope.cancel()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._stream.receive_some(max_bytes)
        if not data:  # the client closed its side
            self._client_done = True
            if not self._active:
                self.scope.cancel()
        return data

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if not self._closed:
                self._closed = True
                self._stats.open -= 1
                self.scope.cancel()


class _Http11Only(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol without its switch to HTTP/2."""

    async def _check_protocol(self, event: Any) -> None:
        return  # no upgrade to h2c and no prior-knowledge HTTP/2: see the module doc


class _Http11Server(TCPServer):
    """Hypercorn's connection handler, held to HTTP/1.1.

    It builds its protocol itself; the protocol is swapped for `_Http11Only` when
    it is set, before the first byte is read.
    """

    @property
    def protocol(self) -> ProtocolWrapper:
        return self._wrapper

    @protocol.setter
    def protocol(self, wrapper: ProtocolWrapper) -> None:
        if type(wrapper.protocol) is H11Protocol:
            wrapper.protocol.__class__ = _Http11Only
        self._wrapper = wrapper


class _HealthOnly:
    """The app, for a connection over the cap: health checks pass, the rest is 503."""

    def __init__(self, app: Any, paths: frozenset[str]) -> None:
        self.app, self.paths = app, paths

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("path") in self.paths:
            async def closing(message: Any) -> None:
                if message["type"] == "http.response.start":  # not to be reused
                    message = {**message, "headers": [*message.get("headers", ()),
                                                      (b"connection", b"close")]}
                await send(message)

            await self.app(scope, receive, closing)
            return
        body = json.dumps(error_body(503, "too many connections; try again")).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"retry-after", b"2"),
            (b"connection", b"close"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def serve(
    app: Any, bind: str, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED,
    write_timeout: float | None = None, max_connections: int | None = None,
    reserve: int = 8, reserve_paths: Iterable[str] = ("/healthz", "/metrics"),
    stats: ConnectionStats | None = None, setting: str = "listen", **options: Any
) -> None:
    """Serve `app` until cancelled; reports the base URL (e.g. "http://127.0.0.1:40123").

    `write_timeout` (seconds): drop a connection whose client takes no data for
    that long (Linux; elsewhere it is ignored). `max_connections`: connections
    served at once (None: no cap), plus `reserve` more for `reserve_paths` only.

    Raises:
        StartupError: `bind` cannot be listened on; it names `setting` (the
            config key or flag `bind` came from, e.g. ``api.listen``).
    """
    cfg = hypercorn_config(bind, **options)
    stats = stats if stats is not None else ConnectionStats()
    full, limited = app, _HealthOnly(app, frozenset(reserve_paths))
    context = WorkerContext(None)
    cap = math.inf if max_connections is None else max_connections
    # Bound here, not by Hypercorn, to set the option before any connection is
    # accepted, and closed here whenever serving ends (even during startup).
    try:
        sockets = cfg.create_sockets()
    except OSError as exc:
        raise StartupError.from_os_error(setting, bind, exc) from exc
    try:
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        for sock in sockets.insecure_sockets:
            if write_timeout is not None and option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, max(1, round(write_timeout * 1000)))
            try:
                sock.listen(cfg.backlog)
            except OSError as exc:
                raise StartupError.from_os_error(setting, bind, exc) from exc

        async def connection(socket_stream: trio.SocketStream, asgi_app: Any,
                             lifetime: float) -> None:
            stream = _Connection(socket_stream, asgi_app, stats, lifetime)
            wrapped = wrap_app(stream.asgi, cfg.wsgi_max_body_size, "asgi")
            try:
                with stream.scope:
                    # Hypercorn types the stream as TLS; it serves plain TCP the same.
                    await _Http11Server(wrapped, cfg, context, ConnectionState({}),
                                        stream)  # type: ignore[arg-type]
            except Exception as exc:  # this connection only; the server goes on
                stats.failed += 1
                log.warning("http connection failed error=%r", exc)
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()

        async def accept(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _OUT_OF_RESOURCES:
                        raise
                    log.error("http accept failed error=%s; retrying in %gs",
                              errno.errorcode.get(exc.errno or 0, exc.errno), _ACCEPT_PAUSE)
                    await trio.sleep(_ACCEPT_PAUSE)
                    continue
                if stats.open >= cap + reserve:
                    stats.refused += 1
                    await stream.aclose()
                    continue
                wrapped, lifetime = full, math.inf
                if stats.open >= cap:
                    # A health check is one quick request: a reserved connection that
                    # idles is closed soon, so a flood cannot hold the reserve for long.
                    stats.reserved += 1
                    wrapped, lifetime = limited, _RESERVE_SECONDS
                stats.open += 1
                stats.accepted += 1
                nursery.start_soon(connection, stream, wrapped, lifetime)

        async with trio.open_nursery() as nursery:
            urls = []
            for sock in sockets.insecure_sockets:
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                nursery.start_soon(accept, listener, nursery)
                urls.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            log.info("http serving url=%s", urls[0])
            task_status.started(urls[0])
    finally:
        for sock in sockets.insecure_sockets:
            sock.close()
