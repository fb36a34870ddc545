"""The device API app: `DeviceApi`, its routes, and the Trio task that serves it.

An ASGI app (Starlette routes inside a small ASGI wrapper that refuses request
bodies, checks the bearer token and bounds the time to start a response),
served by Hypercorn's Trio worker (`edge_agent.http.serve`). It owns the health,
metrics, status, segment and transcript routes; the media routes are in
`media`, the recordings routes come in from the agent (``routes=``).

Everything it reads comes in through the constructor: its config section, the
ring, the clock, a `SpoolView`, a `TranscriptReader`, health and status
callables and the metrics registry. Imports only the bottom layer and the
API's own modules; never agent, another stage, metrics or systemd.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Message, Receive, Scope, Send

from ..audio.pcm import levels
from ..blocking import ThreadRunner
from ..clock import Clock, iso_utc
from ..config import ApiConfig, ConfigError
from ..http import serve
from ..ring import AudioRing
from ..supervisor import TaskStatus
from ..wire import SegmentMeta, SegmentState, agent_version, is_segment_id
from .auth import check_bearer, load_token
from .conditional import decide_range
from .counters import ApiCollector, ApiStats
from .decode import UnsafePath, open_segment
from .levels import LevelStream
from .media import EXTENSIONS, MediaRoutes
from .page import PAGE_FILES, DevicePage
from .params import (
    ApiError,
    choice,
    int_param,
    json_response,
    query_params,
    segment_id_param,
    show,
    time_param,
)
from .render import Abort, Sink, StreamResponse
from .seams import ComponentState, HealthFn, SpoolView, StatusFn, TranscriptReader
from .signing import MediaSigner

__all__ = ["DeviceApi"]

log = logging.getLogger(__package__)  # one logger for the whole API

_FILE_CHUNK = 64 * 1024
#: The largest request head (request line and headers) the API reads.
MAX_HEAD_BYTES = 16 * 1024


def _overall(health: dict[str, ComponentState]) -> str:
    return "ok" if all(h.healthy for h in health.values()) else "degraded"


class DeviceApi:
    """The device API of one agent: an ASGI app plus its serving task.

    Register `run` as a supervised task; `url` is the bound base URL once it
    serves (``listen`` may ask for port 0).

    Args:
        config: the ``[api]`` section.
        device_id, data_dir: the device's id, and where a generated token is kept.
        ring, clock: the audio held, and the device's time.
        capture_finished: set once the source has ended.
        spool: the durable spool, or None when segments are disabled.
        transcripts: reads the transcript log (in a worker thread).
        health: every component's health now.
        status: the agent's own sections of ``/v1/status``.
        registry: the agent's metrics registry; the API adds its own counters.
        input_overflows: the capture's input overflows so far (for ``/v1/levels``).
        routes: more routes to serve (the recordings routes).
        encode_runner, io_runner: worker threads for encoding and for disk reads.

    Raises:
        ConfigError: the token file is unusable (at construction, not in the task).
    """

    def __init__(self, config: ApiConfig, *, device_id: str, data_dir: Path, ring: AudioRing,
                 clock: Clock, capture_finished: trio.Event, spool: SpoolView | None,
                 transcripts: TranscriptReader, health: HealthFn, status: StatusFn,
                 registry: CollectorRegistry, input_overflows: Callable[[], int],
                 routes: Sequence[BaseRoute] = (),
                 encode_runner: ThreadRunner | None = None,
                 io_runner: ThreadRunner | None = None) -> None:
        self.config = config
        self._requested = config  # the section as last given (listen may differ on reload)
        self.device_id = device_id
        self.data_dir = Path(data_dir)
        self.ring = ring
        self.clock = clock
        self.spool = spool
        self.stats = ApiStats()
        self.url: str | None = None
        self.serving = trio.Event()
        self._token = load_token(config, self.data_dir)
        self._transcripts = transcripts
        self._health = health
        self._agent_status = status
        self._io = io_runner or ThreadRunner(4)
        self.media = MediaRoutes(config, device_id=device_id, ring=ring, clock=clock,
                                 spool=spool, capture_finished=capture_finished,
                                 stats=self.stats, encode_runner=encode_runner,
                                 io_runner=self._io)
        self.levels = LevelStream(config, ring=ring, clock=clock, stats=self.stats,
                                  overflows=input_overflows)
        self.page = DevicePage(MediaSigner(self._token), self.stats)
        self._started_at: float | None = None
        self.registry = registry
        registry.register(ApiCollector(self.stats))
        self.app = Starlette(
            routes=[
                *(Route(path, self.page.file, methods=["GET"]) for path in PAGE_FILES),
                Route("/healthz", self._healthz, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
                Route("/v1/status", self._status, methods=["GET"]),
                Route("/v1/segments", self._segments, methods=["GET"]),
                Route("/v1/segments/{segment_id}", self._segment_file, methods=["GET"]),
                Route("/v1/segments/{segment_id}/meta", self._segment_meta, methods=["GET"]),
                Route("/v1/audio", self.media.audio, methods=["GET"]),
                Route("/v1/transcripts", self._transcripts_route, methods=["GET"]),
                Route("/v1/live", self.media.live, methods=["GET"]),
                Route("/v1/levels", self.levels.levels, methods=["GET"]),
                Route("/v1/media-url", self.page.media_url, methods=["GET"]),
                *routes,
            ],
            exception_handlers={
                ApiError: self._api_error,
                HTTPException: self._http_error,
                Exception: self._internal_error,
            },
        )
        # No redirect to add a trailing slash: it would be built from the request's
        # own Host header (an open redirect); such a path is a plain 404.
        self.app.router.redirect_slashes = False

    # -- serving -------------------------------------------------------------

    async def run(self, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports the bound base URL. `StartupError` when
        ``api.listen`` cannot be listened on."""
        self._started_at = trio.current_time()
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(partial(
                serve, self, self.config.listen, setting="api.listen",
                h11_max_incomplete_size=MAX_HEAD_BYTES,
                max_connections=self.config.max_connections, stats=self.stats.connections,
                keep_alive_timeout=self.config.request_timeout_seconds,
                write_timeout=self.config.request_timeout_seconds))
            self.url = url
            self.serving.set()
            log.info("device api serving url=%s auth=bearer", url)
            task_status.started(url)

    def reconfigure(self, new: ApiConfig) -> None:
        """Apply a reloaded ``[api]`` section: token and limits. The socket stays
        bound where it is (a new ``listen`` or ``enabled`` needs a restart)."""
        old, self._requested = self._requested, new
        if old == new:
            return
        if old.listen != new.listen or old.enabled != new.enabled:
            log.warning("config reload api.listen/api.enabled changed: restart the agent "
                        "to apply it")
        try:
            token = load_token(new, self.data_dir)
        except ConfigError as exc:
            log.error("config reload api token kept problem=%r", exc.problems[0])
        else:
            if token != self._token:  # URLs signed with the old token stop working
                self.page.signer = MediaSigner(token)
            self._token = token
        # The socket stays bound where it is: report the listen address in use.
        self.config = msgspec.structs.replace(new, listen=old.listen)
        self.media.reconfigure(self.config)
        self.levels.config = self.config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry: refuse bodies, check the token, bound the time to respond."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan; websockets are refused
            return
        st = self.stats
        st.requests += 1
        started = False
        deadline = trio.CancelScope()

        async def counted_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                code = int(message["status"])
                st.responses[code] = st.responses.get(code, 0) + 1
                deadline.deadline = math.inf  # a body may take as long as it needs
            elif message["type"] == "http.response.body":
                st.bytes_sent += len(message.get("body", b""))
            await send(message)

        refusal = self._refuse(scope)
        if refusal is not None:
            await refusal(scope, receive, counted_send)
            return
        timeout = self.config.request_timeout_seconds
        deadline.deadline = trio.current_time() + timeout
        with deadline:
            try:
                await self.app(scope, receive, counted_send)
            except Exception:  # the app's handler already answered 500 if it could
                if not started:
                    error = ApiError(500, "internal error (logged on the device)")
                    await error.response()(scope, receive, counted_send)
        if deadline.cancelled_caught and not started:
            st.timeouts += 1
            log.warning("api request timed out path=%s timeout=%gs", scope.get("path"),
                        timeout)
            await ApiError(503, f"the request took longer than {timeout:g} s "
                                "(api.request_timeout_seconds)",
                           headers={"Retry-After": "5"}).response()(scope, receive,
                                                                     counted_send)

    def _refuse(self, scope: Scope) -> Response | None:
        if scope.get("http_version") not in ("1.0", "1.1"):
            # HTTP/2 (prior knowledge or an h2c upgrade) has not earned its place on a
            # device: every request on it is refused, whatever it holds.
            return ApiError(505, f"HTTP/{scope.get('http_version')} is not served; use "
                                 "HTTP/1.1").response()
        # However the head arrived (Hypercorn bounds only a head still incomplete),
        # a request whose head is larger than the limit is refused unread.
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(name) + len(value) + 4 for name, value in scope.get("headers", ()))
        if head > MAX_HEAD_BYTES:
            self.stats.heads_refused += 1
            return ApiError(431, f"request head of {head} bytes; expected at most "
                                 f"{MAX_HEAD_BYTES}", "headers").response()
        headers = Headers(scope=scope)
        if headers.get("transfer-encoding") or headers.get("content-length", "0") != "0":
            self.stats.bodies_refused += 1
            return ApiError(413, "request bodies are not accepted", "body").response()
        refusal = check_bearer(scope, self._token, self.page.signer)
        if refusal is None:
            return None
        self.stats.unauthorized += 1
        return refusal.response()

    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        allowed = dict(exc.headers or {}).get("Allow", "GET, HEAD")
        message = {404: f"no route {show(request.url.path)}",
                   405: f"method {request.method} not allowed here; use {allowed}"}.get(
                       exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, message, "path" if exc.status_code == 404 else "method",
                        headers=dict(exc.headers or {})).response()

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        self.stats.errors += 1
        log.error("api request failed path=%s", request.url.path, exc_info=exc)
        return ApiError(500, "internal error (logged on the device)").response()

    # -- health, metrics, status -------------------------------------------------

    async def _healthz(self, request: Request) -> Response:
        query_params(request, ())
        health = dict(self._health())
        return json_response({
            "status": _overall(health),
            "components": {name: {"status": h.status, "detail": h.detail}
                           for name, h in health.items()},
        })

    async def _metrics(self, request: Request) -> Response:
        query_params(request, ())
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def _status(self, request: Request) -> Response:
        query_params(request, ())
        ring = self.ring
        health = dict(self._health())
        agent = self._agent_status()
        rs = ring.statistics()
        rate = ring.rate
        last = ring.read(max(ring.tail, ring.head - rate), ring.head)
        lv = levels(last)
        uptime = trio.current_time() - self._started_at if self._started_at is not None else 0.0
        cfg = self.config
        body: dict[str, Any] = {
            "device": self.device_id,
            "version": agent_version(),
            "time": iso_utc(self.clock.utc()),
            "clock_synced": self.clock.synced(),
            "uptime_seconds": round(uptime, 3),
            "status": _overall(health),
            "components": {n: {"status": h.status, "detail": h.detail}
                           for n, h in health.items()},
            "config": {**agent["config"],
                       "api": {"listen": cfg.listen,
                               "max_range_seconds": cfg.max_range_seconds,
                               "max_audio_encodes": cfg.max_audio_encodes,
                               "max_live_listeners": cfg.max_live_listeners}},
            "input": {"seconds": len(last) / rate, "rms_dbfs": round(lv.rms_dbfs, 2),
                      "peak_dbfs": round(lv.peak_dbfs, 2), "clipped": lv.clipped},
            "ring": {
                "oldest_utc": iso_utc(rs.oldest_utc) if rs.oldest_utc is not None else None,
                "newest_utc": iso_utc(rs.newest_utc) if rs.newest_utc is not None else None,
                "held_seconds": rs.held_frames / rate,
                "capacity_seconds": rs.capacity_frames / rate,
                "fill": rs.held_frames / rs.capacity_frames,
                "evicted_seconds": rs.evicted_frames / rate,
                "gaps": rs.gaps, "clock_steps": rs.clock_steps,
                "readers": [{"name": r.name, "lag_seconds": r.lag / rate,
                             "overruns": r.overruns, "lost_seconds": r.lost_frames / rate}
                            for r in ring.readers()],
            },
            **{key: agent[key] for key in ("capture", "tasks", "stt", "spool", "segmenter",
                                           "upload", "disk", "discovery")},
            "api": self.stats,
        }
        return json_response(body)

    # -- segments --------------------------------------------------------------

    def _spool(self) -> SpoolView:
        if self.spool is None:
            raise ApiError(404, "segments are disabled on this device (segments.enabled = "
                                "false)", "id")
        return self.spool

    @staticmethod
    def _segment_json(meta: SegmentMeta, state: SegmentState) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(meta)
        out["state"] = state.value
        out["url"] = f"/v1/segments/{meta.id}"
        return out

    async def _segments(self, request: Request) -> Response:
        p = query_params(request, ("since", "until", "state", "limit", "before"))
        since = time_param(p, "since", required=False)
        until = time_param(p, "until", required=False)
        if since is not None and until is not None and until <= since:
            raise ApiError(400, "until: expected a time after since", "until")
        state_name = p.get("state")
        state = (SegmentState(choice(p, "state", "", [s.value for s in SegmentState]))
                 if state_name is not None else None)
        limit = int_param(p, "limit", 100, 1, 1000)
        before = p.get("before")
        if before is not None and not is_segment_id(before):
            raise ApiError(400, f"before: expected a segment id, got {show(before)}", "before")
        if self.spool is None:
            return json_response({"segments": [], "next_before": None, "enabled": False})
        rows = self.spool.list(since=since, until=until, state=state, newest_first=True)
        if before is not None:
            rows = [r for r in rows if r[0].id < before]
        page = rows[:limit]
        more = len(rows) > limit
        return json_response({
            "segments": [self._segment_json(m, s) for m, s in page],
            "next_before": page[-1][0].id if more else None,
            "enabled": True,
        })

    def _lookup(self, request: Request) -> tuple[str, SegmentMeta, SegmentState]:
        seg_id = segment_id_param(request)
        found = self._spool().get(seg_id)
        if found is None:
            raise ApiError(404, f"no segment {seg_id} on this device (never recorded, or "
                                "evicted)", "id")
        return seg_id, found[0], found[1]

    async def _segment_meta(self, request: Request) -> Response:
        query_params(request, ())
        _seg_id, meta, state = self._lookup(request)
        return json_response(self._segment_json(meta, state))

    async def _segment_file(self, request: Request) -> Response | StreamResponse:
        query_params(request, ())
        seg_id, meta, state = self._lookup(request)
        spool = self._spool()
        st = self.stats
        if st.downloads_active >= self.config.max_downloads:
            st.downloads_busy += 1
            raise ApiError(503, f"busy: {st.downloads_active} downloads in progress "
                                "(api.max_downloads)", headers={"Retry-After": "2"})
        try:
            fd, size = await self._io.run(open_segment, spool, seg_id)
        except FileNotFoundError:
            raise ApiError(404, f"segment {seg_id} was evicted meanwhile", "id") from None
        except UnsafePath as exc:
            log.warning("api refused a segment file id=%s reason=%r", seg_id, str(exc))
            raise ApiError(403, f"segment {seg_id}: its file is not a regular file inside "
                                "the spool", "id") from None
        headers = {"Accept-Ranges": "bytes",
                   "Content-Type": meta.content_type, "Cache-Control": "private, no-transform",
                   "Content-Disposition": f'attachment; filename="{seg_id}.'
                                          f'{EXTENSIONS.get(meta.format, "bin")}"'}
        # A quarantined file may not hold the bytes its metadata's digest names (that
        # is often why it is quarantined): it is served without an entity tag.
        etag = "" if state is SegmentState.QUARANTINED else f'"{meta.sha256}"'
        if etag:
            headers["ETag"] = etag
        try:
            decision = decide_range(etag, size,
                                    if_none_match=request.headers.get("if-none-match"),
                                    range_header=request.headers.get("range"),
                                    if_range=request.headers.get("if-range"))
        except BaseException:
            os.close(fd)
            raise
        status, first, length = decision.status, decision.first, decision.length
        if decision.content_range is not None:
            headers["Content-Range"] = decision.content_range
        if status != 304:
            headers["Content-Length"] = str(length)
        if status in (304, 416) or length == 0 or request.method == "HEAD":
            os.close(fd)
            return StreamResponse(status, headers, None, stall=1.0, what=seg_id)
        st.downloads += 1
        st.downloads_active += 1

        def release() -> None:  # StreamResponse runs it exactly once
            os.close(fd)
            st.downloads_active -= 1

        async def produce(sink: Sink) -> None:
            pos, left = first, length
            while left > 0:
                chunk = await self._io.run(os.pread, fd, min(_FILE_CHUNK, left), pos)
                if not chunk:
                    raise Abort(f"{seg_id}: file shorter than {size} bytes")
                await sink.send(chunk)
                pos += len(chunk)
                left -= len(chunk)

        return StreamResponse(status, headers, produce, stall=self.config.request_timeout_seconds,
                              what=f"segment {seg_id}", release=release)

    # -- transcripts -------------------------------------------------------------

    async def _transcripts_route(self, request: Request) -> Response:
        p = query_params(request, ("since", "until", "limit"))
        since = time_param(p, "since", required=False)
        until = time_param(p, "until", required=False)
        if since is not None and until is not None and until <= since:
            raise ApiError(400, "until: expected a time after since", "until")
        limit = int_param(p, "limit", 1000, 1, 10000)
        rows = await self._io.run(self._transcripts, since, until, limit)
        return json_response({"transcripts": rows, "count": len(rows),
                              "truncated": len(rows) >= limit})
