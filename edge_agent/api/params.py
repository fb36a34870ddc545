"""Request parameters and error answers of the device API.

Owns `ApiError` (a request that cannot be served, answered as a JSON body
``{"error": ..., "status": ..., "parameter": ...}``), the JSON response helper,
and the parsing of query parameters: each at most once and all of them known
(a typo must not silently change a request), ISO 8601 times (`parse_utc`),
bounded whole numbers, choices and segment ids.

Synchronous. Imports only the bottom layer (wire); never agent, another stage,
metrics or systemd.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Final

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ..http import error_body
from ..wire import is_segment_id

__all__ = [
    "MEDIA_PATHS",
    "ApiError",
    "choice",
    "int_param",
    "json_response",
    "parse_utc",
    "query_params",
    "segment_id_param",
    "show",
    "time_param",
]

#: Routes that also take a signed URL (``expires``, ``sig``) or ``?access_token=``:
#: an ``<audio>`` element or an ``EventSource`` cannot send headers.
MEDIA_PATHS: Final = frozenset({"/v1/audio", "/v1/live", "/v1/levels"})
#: What a media URL may carry besides the route's own parameters.
_CREDENTIALS: Final = frozenset({"access_token", "expires", "sig"})
_MAX_PARAM_SHOWN = 60


class ApiError(Exception):
    """A request that cannot be served: becomes a JSON error response."""

    def __init__(self, status: int, message: str, parameter: str | None = None, *,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.parameter = parameter
        self.headers = headers or {}
        self.extra = extra

    def response(self) -> Response:
        body = error_body(self.status, self.message, self.parameter, **self.extra)
        return json_response(body, self.status, self.headers)


def json_response(obj: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    """``obj`` as a JSON response."""
    # msgspec: dataclasses as they are, and NaN/inf as null instead of an exception.
    return Response(msgspec.json.encode(obj), status_code=status, headers=headers,
                    media_type="application/json")


def show(text: str) -> str:
    """``text`` quoted for an error message, cut after `_MAX_PARAM_SHOWN` characters."""
    shown = text if len(text) <= _MAX_PARAM_SHOWN else text[:_MAX_PARAM_SHOWN] + "..."
    return repr(shown)


def query_params(request: Request, allowed: Iterable[str]) -> dict[str, str]:
    """The query parameters, each at most once and all of them known."""
    known = set(allowed)
    if request.url.path in MEDIA_PATHS:
        known |= _CREDENTIALS
    out: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key not in known:
            raise ApiError(400, f"{show(key)}: unknown parameter; expected "
                                f"{', '.join(sorted(known - _CREDENTIALS)) or 'none'}",
                           key[:60])
        if key in out:
            raise ApiError(400, f"{key}: given more than once", key)
        out[key] = value
    for key in _CREDENTIALS:
        out.pop(key, None)
    return out


# Times the device can hold audio for; any of them prints as ISO 8601 UTC.
_LAST_UTC = 253370764800.0  # 9999-01-01T00:00:00Z
_TZ_SPACE = re.compile(r" (\d\d(:?\d\d)?)$")


def parse_utc(name: str, text: str) -> float:
    """An ISO 8601 time with a timezone, as seconds since the epoch.

    A ``+`` before the offset arrives as a space when the client did not
    percent-encode it; that space is read as ``+``.

    Raises:
        ApiError: 400 naming ``name``.
    """
    example = "such as 2026-11-24T05:30:00Z"
    s = text.strip()
    if len(s) > 40:
        raise ApiError(400, f"{name}: expected an ISO 8601 time, {example}, got {show(text)}",
                       name)
    s = _TZ_SPACE.sub(r"+\1", s) if "T" in s else s
    try:
        when = datetime.fromisoformat(s)
    except ValueError:
        raise ApiError(400, f"{name}: expected an ISO 8601 time with a timezone, {example}, "
                            f"got {show(text)}", name) from None
    if when.tzinfo is None:
        raise ApiError(400, f"{name}: expected a timezone (Z or +HH:MM) in {show(text)}; a "
                            "time without one is ambiguous", name)
    try:
        utc = when.timestamp()
    except (OverflowError, OSError, ValueError):
        utc = -1.0
    if not 0.0 <= utc < _LAST_UTC:
        raise ApiError(400, f"{name}: expected a time from 1970 to 9998, got {show(text)}",
                       name)
    return utc


def time_param(params: dict[str, str], name: str, *, required: bool) -> float | None:
    """The time parameter ``name``, or None when it is absent and not ``required``."""
    text = params.get(name)
    if text is None:
        if required:
            raise ApiError(400, f"{name}: required, an ISO 8601 time such as "
                                "2026-11-24T05:30:00Z", name)
        return None
    return parse_utc(name, text)


def int_param(params: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    """The whole number ``name`` within ``[lo, hi]``, or ``default`` when absent."""
    text = params.get(name)
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", text) or not lo <= int(text) <= hi:
        raise ApiError(400, f"{name}: expected a whole number from {lo} to {hi}, "
                            f"got {show(text)}", name)
    return int(text)


def choice(params: dict[str, str], name: str, default: str, choices: Iterable[str]) -> str:
    """The parameter ``name``, one of ``choices``, or ``default`` when absent."""
    options = list(choices)
    value = params.get(name, default)
    if value not in options:
        raise ApiError(400, f"{name}: expected one of {', '.join(options)}, got {show(value)}",
                       name)
    return value


def segment_id_param(request: Request) -> str:
    """The ``{segment_id}`` of the path, checked against the segment id pattern."""
    seg_id = str(request.path_params.get("segment_id", ""))
    if not is_segment_id(seg_id):
        raise ApiError(400, f"id: expected a segment id such as 20261124T053000.000Z-3f9a1c2b, "
                            f"got {show(seg_id)}", "id")
    return seg_id
