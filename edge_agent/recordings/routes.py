"""The device API routes of recordings on demand (``/v1/recordings``).

Owns `recording_routes`: the HTTP shell over `AgentRecordings` (parameters
checked, errors mapped to status codes), mounted by the device API.

Imports only the bottom layer (and Starlette); never agent, api, recorder or
another stage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..http import error_body
from .formats import AudioFormat
from .stage import AgentRecordings, RecordingConflict, RecordingLimit

__all__ = ["recording_routes"]


def _error(status: int, message: str, parameter: str | None = None, *,
           headers: Mapping[str, str] | None = None) -> Response:
    """The device API's error answer (`http.error_body`)."""
    return JSONResponse(error_body(status, message, parameter), status_code=status,
                        headers=dict(headers or {}))


def recording_routes(recordings: Callable[[], AgentRecordings | None]) -> list[Route]:
    """Device API routes for recordings on demand (mounted by the device API).

    ``POST /v1/recordings?prefix=a&prefix=b&format=opus`` (both optional; the
    device API takes no request bodies) starts one: 201 and its description
    (``key``, ``id``, ...); 429 when `max_active` are running.
    ``POST /v1/recordings/{key}/stop`` ends it: 200 and the sealed description;
    400 for a malformed key, 404 for an unknown one, 409 when already stopped.
    ``GET /v1/recordings`` lists running and sealed recordings. 503 when the
    agent runs without recordings (no spool).
    """

    def component() -> AgentRecordings | Response:
        rec = recordings()
        if rec is None:
            return _error(503, "recordings are not enabled (they need segments.enabled)")
        return rec

    async def start(request: Request) -> Response:
        rec = component()
        if isinstance(rec, Response):
            return rec
        params = request.query_params
        unknown = sorted(set(params) - {"prefix", "format"})
        if unknown:
            return _error(400, f"unknown parameter {unknown[0]!r}; expected prefix (repeatable) "
                               "and format", unknown[0])
        formats = params.getlist("format")
        if len(formats) > 1:
            return _error(400, "format: expected once", "format")
        fmt = formats[0] if formats else None
        if fmt is not None and fmt not in {f.value for f in AudioFormat}:
            return _error(400, f"format {fmt!r}: expected one of "
                               f"{', '.join(f.value for f in AudioFormat)}", "format")
        try:
            info = await rec.start(params.getlist("prefix"), fmt)
        except ValueError as exc:
            return _error(400, str(exc), "prefix")
        except RecordingLimit as exc:
            return _error(429, str(exc), headers={"Retry-After": "10"})
        except RuntimeError as exc:
            return _error(503, str(exc), headers={"Retry-After": "5"})
        return JSONResponse(info, status_code=201)

    async def stop(request: Request) -> Response:
        rec = component()
        if isinstance(rec, Response):
            return rec
        key = str(request.path_params["key"])
        try:
            info = await rec.stop(key)
        except ValueError as exc:
            return _error(400, str(exc), "key")
        except KeyError:
            return _error(404, f"no recording {key!r}", "key")
        except RecordingConflict as exc:
            return _error(409, str(exc))
        except RuntimeError as exc:
            return _error(500, str(exc))
        return JSONResponse(info)

    async def listing(request: Request) -> Response:
        rec = component()
        if isinstance(rec, Response):
            return rec
        return JSONResponse(rec.list())

    return [
        Route("/v1/recordings", listing, methods=["GET"]),
        Route("/v1/recordings", start, methods=["POST"]),
        Route("/v1/recordings/{key:path}/stop", stop, methods=["POST"]),
    ]

