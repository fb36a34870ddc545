"""The objects device and operator exchange through the bucket, and their keys.

Per device, next to its segments in the bucket of ``[upload.s3]``:

* ``requests/{device}.json``: the mailbox, a `Mailbox` of pending retrieval
  requests. The operator appends with ``If-Match`` on its ETag (so two operators
  never lose each other's requests); the device only reads it, with
  ``If-None-Match`` on the last ETag it saw, so an unchanged mailbox costs one
  304. The operator drops answered or expired requests when it next writes.
* ``retrievals/{device}/{id}.{ext}``: the audio of one answered request.
* ``retrievals/{device}/{id}.json``: its `Result` (ok, partial with its gaps,
  or refused with the reason), written after the audio; its presence marks the
  request done, so a request is never answered twice.
* ``status/{device}.json``: the device's `Heartbeat`, overwritten in place.

Times are ISO 8601 UTC strings (``2026-11-24T05:30:00.000000Z``), as in
segment metadata. Imports only the bottom layer and the API's cut (its formats).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import msgspec

from ..api.cut import EXTENSIONS
from ..clock import parse_iso_utc as parse_utc

__all__ = [
    "FORMAT_EXTENSIONS",
    "MAILBOX_LIMIT",
    "REQUEST_ID_PATTERN",
    "STATUS_PREFIX",
    "Heartbeat",
    "Mailbox",
    "Request",
    "Result",
    "ResultGap",
    "audio_key",
    "decode",
    "device_of_status_key",
    "encode",
    "mailbox_key",
    "new_request_id",
    "parse_utc",
    "result_key",
    "status_key",
]

#: Request ids: what the operator names a request by, and part of its keys.
REQUEST_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
#: The most requests one mailbox holds (the operator refuses to add more).
MAILBOX_LIMIT: Final = 100
#: The formats a request may ask for, and the extension of the audio's key
#: (``/v1/audio``'s own).
FORMAT_EXTENSIONS: Final = EXTENSIONS
STATUS_PREFIX: Final = "status/"
_RECORD_VERSION: Final = 1

RequestId = Annotated[str, msgspec.Meta(pattern=REQUEST_ID_PATTERN)]
Utc = Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")]


def mailbox_key(device: str) -> str:
    return f"requests/{device}.json"


def status_key(device: str) -> str:
    return f"{STATUS_PREFIX}{device}.json"


def device_of_status_key(key: str) -> str | None:
    """The device a ``status/{device}.json`` key belongs to (None for another key)."""
    m = re.fullmatch(r"status/([^/]+)\.json", key)
    return m.group(1) if m else None


def result_key(device: str, request_id: str) -> str:
    return f"retrievals/{device}/{request_id}.json"


def audio_key(device: str, request_id: str, fmt: str) -> str:
    return f"retrievals/{device}/{request_id}.{FORMAT_EXTENSIONS[fmt]}"


def new_request_id(now_utc: float, token: str) -> str:
    """A request id that sorts by creation: ``20261124T053000Z-<token>``."""
    stamp = datetime.fromtimestamp(now_utc, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{token}"


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """One retrieval: the audio of ``[start, end)`` in ``format``; ``rate`` and
    ``channels`` default to what was captured (as ``/v1/audio``)."""

    id: RequestId
    start: Utc
    end: Utc
    format: Literal["opus", "wav", "flac", "pcm"] = "opus"
    rate: int | None = None
    channels: int | None = None
    created: Utc
    by: str = ""  # who placed it (free text, e.g. user@host)

    @property
    def start_ts(self) -> float:
        return parse_utc(self.start)

    @property
    def end_ts(self) -> float:
        return parse_utc(self.end)


class Mailbox(msgspec.Struct, kw_only=True):
    """``requests/{device}.json``: the requests placed for one device."""

    device: str
    requests: list[Request] = []
    version: int = _RECORD_VERSION


class ResultGap(msgspec.Struct, frozen=True, kw_only=True):
    """A hole in an answer: ``seconds`` of audio from ``utc`` are not in it, at
    ``offset`` seconds into the audio returned. ``reason``: "not_held" (older than
    anything the device still has), "capture" (never captured), or "damage"."""

    utc: Utc
    seconds: float
    offset: float
    reason: str = "capture"


class Result(msgspec.Struct, frozen=True, kw_only=True):
    """``retrievals/{device}/{id}.json``: how a request was answered.

    ``state``: "ok" (the whole range), "partial" (audio with ``gaps``), or
    "refused" (no audio; ``reason`` says why: too long, too large for the
    device's disk, before the oldest audio held, nothing held in the range, a bad
    request).
    """

    id: RequestId
    device: str
    state: Literal["ok", "partial", "refused"]
    reason: str = ""
    start: Utc
    end: Utc
    format: str
    key: str = ""  # the audio's key ("" when refused)
    rate: int = 0
    channels: int = 0
    samples: int = 0  # frames per channel in the audio
    bytes: int = 0
    sha256: str = ""
    first_utc: str = ""  # where the audio returned starts and ends
    last_utc: str = ""
    gaps: list[ResultGap] = []
    finished: Utc
    version: int = _RECORD_VERSION


class Heartbeat(msgspec.Struct, kw_only=True):
    """``status/{device}.json``: what the operator's fleet table shows of a device.

    ``sent`` is the device's clock when written; the store's Last-Modified is what
    marks a device stale (a device's clock may be wrong). ``capture``, ``spool``,
    ``stt`` and ``clock`` are small tables of figures (see the agent's status).
    """

    device: str
    sent: Utc
    version: str
    uptime_seconds: float
    heartbeat_seconds: float  # the interval the device sends at (staleness is judged by it)
    poll_seconds: float  # how often it reads its mailbox when idle
    health: str  # "ok", "degraded" or "failing"
    reasons: list[str] = []
    capture: dict[str, Any] = {}
    clock: dict[str, Any] = {}  # synced (bool), offset_seconds (float or None)
    spool: dict[str, Any] = {}  # segments, seconds, mb (the backlog not yet synced)
    oldest_audio: str = ""  # UTC of the oldest audio the device holds
    last_synced_segment: str = ""
    stt: dict[str, Any] = {}
    disk_free_mb: float | None = None
    record_version: int = _RECORD_VERSION


def encode(record: msgspec.Struct) -> bytes:
    return msgspec.json.encode(record)


def decode(data: bytes, cls: type[Any]) -> Any:
    """`cls` from JSON; ValueError (one line) for a body that is not one."""
    try:
        return msgspec.json.decode(data, type=cls)
    except msgspec.ValidationError as exc:
        raise ValueError(f"not a {cls.__name__} record: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
