"""The operator's side of the bucket: heartbeats read into a fleet table, a
device's stored segments found from the key template, and retrieval requests
placed in and read back from a device's mailbox.

What a device last did is judged by the store's ``Last-Modified``, never by the
device's own clock (a Pi without a real-time clock may be hours off), and a
device is stale once that is older than `OperatorConfig.stale_after` of the
heartbeat interval the device itself announces.

Segments are found by listing the day prefixes of ``key_template`` that can
hold the range (a segment is keyed by its start, at most an hour before the
range), then reading each sidecar ``<key>.json``, which holds the whole segment
metadata: the audio itself is only read by `fleet get`.

A request is appended to ``requests/{device}.json`` with ``If-Match`` on the
ETag just read (``If-None-Match: *`` when there is none): a 412 means another
operator wrote in between, so it is read again and the append retried, and no
request is ever lost. Each write also drops requests already answered or older
than `STALE_REQUEST_SECONDS`, and a mailbox at `records.MAILBOX_LIMIT` takes no
more.

Imports the bottom layer (s3, wire, clock, errors) and `records`; never cli.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, TypeVar, cast

import msgspec
import trio

from ..clock import Clock
from ..errors import EdgeAgentError
from ..s3 import Listed, ObjectClient
from ..wire import DEVICE_ID_PATTERN, SegmentMeta
from .fleetconfig import OperatorConfig
from .records import (
    MAILBOX_LIMIT,
    STATUS_PREFIX,
    Heartbeat,
    Mailbox,
    Request,
    Result,
    decode,
    device_of_status_key,
    encode,
    mailbox_key,
    parse_utc,
    result_key,
)

__all__ = [
    "STALE_REQUEST_SECONDS",
    "DeviceRow",
    "Fleet",
    "FleetError",
    "RequestRow",
    "StoredSegment",
    "check_device",
    "listing_prefixes",
    "segment_start",
]

#: A request no answer came for in this long is dropped from the mailbox.
STALE_REQUEST_SECONDS: Final = 7 * 86400.0
#: How long before a range a segment that reaches into it may start (the longest
#: segment: ``segments.seconds`` is at most an hour).
SEGMENT_LOOKBACK: Final = 3600.0
#: Appends tried before giving up on a mailbox that keeps changing under us.
MAILBOX_TRIES: Final = 30

T = TypeVar("T")


class FleetError(EdgeAgentError):
    """Something the operator asked for that cannot be done; one line saying why."""


def check_device(device: str) -> str:
    """`device` when it is a device id (so it is safe inside a key), else FleetError."""
    if not re.fullmatch(DEVICE_ID_PATTERN, device):
        raise FleetError(f"device {device!r}: expected a device id (letters, digits, '.', "
                         "'_' or '-', at most 64)")
    return device


@dataclass(frozen=True)
class DeviceRow:
    """One line of the fleet table: a heartbeat and when the store received it."""

    device: str
    last_seen: float  # the store's Last-Modified of the heartbeat
    age: float  # seconds from `last_seen` to now (by the store's clock)
    stale: bool
    heartbeat: Heartbeat | None
    problem: str = ""  # why the heartbeat could not be read


@dataclass(frozen=True)
class StoredSegment:
    """A segment in the bucket: its audio's key, its metadata (from the sidecar)."""

    key: str
    meta: SegmentMeta


@dataclass(frozen=True)
class RequestRow:
    """A request and, once the device answered, its result."""

    id: str
    request: Request | None  # None: no longer in the mailbox
    result: Result | None

    @property
    def state(self) -> str:
        return self.result.state if self.result is not None else "pending"


class _Sidecar(msgspec.Struct, kw_only=True):
    """What the uploader writes next to a segment (`uploader.sidecar`)."""

    key: str
    device: str
    segment: SegmentMeta
    clock_offset_seconds: float | None = None


_SEGMENT_GROUP: Final = r"(?P<segment>[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[0-9a-f]{8})"
_FIELD_PATTERNS: Final = {"yyyy": r"[0-9]{4}", "mm": r"[0-9]{2}", "dd": r"[0-9]{2}",
                          "hh": r"[0-9]{2}", "ext": r"[A-Za-z0-9]+"}


def sidecar_pattern(template: str, device: str) -> re.Pattern[str]:
    """Matches the sidecar keys ``key_template`` makes for `device`."""
    out = []
    seen = False
    for text, name, _spec, _conv in string.Formatter().parse(template):
        out.append(re.escape(text))
        if name == "device":
            out.append(re.escape(device))
        elif name == "segment":
            out.append("(?P=segment)" if seen else _SEGMENT_GROUP)
            seen = True
        elif name is not None:
            out.append(_FIELD_PATTERNS[name])
    return re.compile("".join(out) + r"\.json")


def listing_prefixes(template: str, device: str, start: float, end: float) -> list[str]:
    """The key prefixes to list for the segments of `device` that may hold
    ``[start, end)``: the template up to its first placeholder that is neither
    the device nor a part of the date, once per UTC day."""
    day = datetime.fromtimestamp(start - SEGMENT_LOOKBACK, tz=UTC).date()
    last = datetime.fromtimestamp(end, tz=UTC).date()
    out: list[str] = []
    while day <= last:
        values = {"device": device, "yyyy": f"{day.year:04d}", "mm": f"{day.month:02d}",
                  "dd": f"{day.day:02d}"}
        prefix = ""
        for text, name, _spec, _conv in string.Formatter().parse(template):
            prefix += text
            if name is None:
                continue
            if name not in values:
                break
            prefix += values[name]
        if prefix not in out:
            out.append(prefix)
        day += timedelta(days=1)
    return out


def _stops_at_segment(template: str) -> bool:
    """Whether the segment id comes right after what `listing_prefixes` lists."""
    for _text, name, _spec, _conv in string.Formatter().parse(template):
        if name is not None and name not in ("device", "yyyy", "mm", "dd"):
            return name == "segment"
    return False


def segment_start(segment_id: str) -> float:
    """The start (UTC seconds) a segment id names, to the millisecond."""
    stamp = datetime.strptime(segment_id[:15], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    return stamp.timestamp() + int(segment_id[16:19]) / 1000


class Fleet:
    """The operator's reads and writes in the fleet's bucket.

    Args:
        config: ``fleet.toml``.
        objects: the store, as the operator (who may list and read everything).
        clock: the operator's wall clock; the store's correction (learnt by the
            signer from its ``Date`` headers) is added to it.
    """

    def __init__(self, config: OperatorConfig, objects: ObjectClient, clock: Clock) -> None:
        self.config = config
        self.objects = objects
        self.clock = clock
        self._limit = trio.CapacityLimiter(config.concurrency)

    def now(self) -> float:
        """The store's time, as well as we know it."""
        return self.clock.utc() + self.objects.auth.offset

    async def each(self, items: Sequence[T], work: Callable[[T], Awaitable[object]]) -> None:
        """Run `work` on every item, `config.concurrency` at a time."""
        async def one(item: T) -> None:
            async with self._limit:
                await work(item)

        async with trio.open_nursery() as nursery:
            for item in items:
                nursery.start_soon(one, item)

    # -- heartbeats ----------------------------------------------------------------

    async def devices(self) -> list[DeviceRow]:
        """Every device with a heartbeat, by id (at most `config.max_devices`)."""
        listed = [item async for item in self.objects.list(STATUS_PREFIX,
                                                           limit=self.config.max_devices)]
        rows: dict[str, DeviceRow] = {}

        async def read(item: Listed) -> None:
            device = device_of_status_key(item.key)
            if device is not None:
                rows[device] = await self._row(device, item.last_modified)

        await self.each(listed, read)
        return [rows[d] for d in sorted(rows)]

    async def _row(self, device: str, listed_at: float) -> DeviceRow:
        got = await self.objects.get(f"{STATUS_PREFIX}{device}.json")
        if got.status != 200:  # deleted since the listing
            return self._judge(device, listed_at, None, "heartbeat gone since listed")
        seen = got.last_modified if got.last_modified is not None else listed_at
        try:
            return self._judge(device, seen, decode(got.body, Heartbeat))
        except ValueError as exc:
            return self._judge(device, seen, None, f"unreadable heartbeat: {exc}")

    def _judge(self, device: str, seen: float, beat: Heartbeat | None,
               problem: str = "") -> DeviceRow:
        age = max(0.0, self.now() - seen)
        cfg = self.config
        if cfg.stale_after_seconds > 0:
            limit = cfg.stale_after_seconds
        elif beat is not None and beat.heartbeat_seconds > 0:
            limit = cfg.stale_after * beat.heartbeat_seconds
        else:
            limit = 0.0  # no interval to judge by: stale
        return DeviceRow(device, seen, age, age > limit, beat, problem)

    async def heartbeat(self, device: str) -> DeviceRow | None:
        """The device's row, or None when it has no heartbeat."""
        got = await self.objects.get(f"{STATUS_PREFIX}{device}.json")
        if got.status != 200:
            return None
        seen = got.last_modified if got.last_modified is not None else self.now()
        try:
            return self._judge(device, seen, decode(got.body, Heartbeat))
        except ValueError as exc:
            return self._judge(device, seen, None, f"unreadable heartbeat: {exc}")

    async def known(self, device: str) -> bool:
        """Whether the bucket holds anything of `device`: a heartbeat or a segment."""
        if await self.heartbeat(device) is not None:
            return True
        # The template's text before the date and the segment: the device's own prefix.
        template = self.config.key_template
        cut = min((template.find(f"{{{f}}}") for f in ("yyyy", "mm", "dd", "hh", "segment")
                   if f"{{{f}}}" in template), default=len(template))
        prefix = template[:cut].replace("{device}", device)
        pattern = sidecar_pattern(template, device)
        async for item in self.objects.list(prefix, limit=1000):
            if pattern.fullmatch(item.key):
                return True
        return False

    # -- segments ------------------------------------------------------------------

    async def segments(self, device: str, start: float, end: float) -> list[StoredSegment]:
        """The device's segments in the bucket that overlap ``[start, end)``, by
        start (named recordings, which overlap the segments, are left out)."""
        cfg = self.config
        pattern = sidecar_pattern(cfg.key_template, device)
        found: dict[str, str] = {}  # segment id -> sidecar key
        budget = cfg.max_segments * 2 + 1000  # audio and sidecar per segment, and a margin
        # Where the segment id follows the prefix, keys list in time order: the
        # listing starts at the lookback and stops at the end of the range.
        ordered = _stops_at_segment(cfg.key_template)
        first = datetime.fromtimestamp(start - SEGMENT_LOOKBACK, tz=UTC).strftime("%Y%m%dT%H%M%S")
        for prefix in listing_prefixes(cfg.key_template, device, start, end):
            seen = 0
            # (`list` is an async generator: closed at once when the loop stops early)
            listing = cast(AsyncGenerator[Listed, None], self.objects.list(
                prefix, start_after=prefix + first if ordered else "", limit=budget))
            async with aclosing(listing):
                async for item in listing:
                    seen += 1
                    m = pattern.fullmatch(item.key)
                    if m is None:
                        continue
                    t = segment_start(m.group("segment"))
                    if ordered and t >= end:
                        break
                    if start - SEGMENT_LOOKBACK <= t < end:
                        found[m.group("segment")] = item.key
            if seen >= budget:
                raise FleetError(f"more than {budget} keys under {prefix} (max_segments "
                                 f"{cfg.max_segments}); ask for a shorter range")
        ids = sorted(found)
        inside = [i for i in ids if segment_start(i) >= start]
        before = [i for i in ids if segment_start(i) < start]
        if len(inside) > cfg.max_segments:
            raise FleetError(f"{len(inside)} segments of {device} in the range, more than "
                             f"max_segments ({cfg.max_segments}); ask for a shorter range")
        metas: dict[str, StoredSegment] = {}

        async def read(segment_id: str) -> None:
            stored = await self._sidecar(found[segment_id], segment_id)
            if stored is not None and not stored.meta.recording:
                metas[segment_id] = stored

        await self.each(inside, read)
        # Of those that start before the range, only the last few can reach into it.
        for segment_id in reversed(before):
            stored = await self._sidecar(found[segment_id], segment_id)
            if stored is None or stored.meta.recording:
                continue
            if stored.meta.end_ts <= start:
                break
            metas[segment_id] = stored
        return sorted((s for s in metas.values() if s.meta.end_ts > start),
                      key=lambda s: (s.meta.start_ts, s.meta.id))

    async def _sidecar(self, key: str, segment_id: str) -> StoredSegment | None:
        """The segment of the sidecar at `key`, whose name says it is `segment_id`.
        The audio is the key without ``.json`` (not what the sidecar says: a device
        writes it, and must not point the operator at another device's objects)."""
        got = await self.objects.get(key)
        if got.status != 200:
            return None
        try:
            side = msgspec.json.decode(got.body, type=_Sidecar)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise FleetError(f"{key}: not a segment's sidecar ({exc})") from None
        if side.segment.id != segment_id:
            raise FleetError(f"{key}: the sidecar describes segment {side.segment.id!r}, "
                             f"not {segment_id}")
        return StoredSegment(key.removesuffix(".json"), side.segment)

    # -- requests ------------------------------------------------------------------

    async def result(self, device: str, request_id: str) -> Result | None:
        """The device's answer to a request, or None while there is none."""
        key = result_key(device, request_id)
        got = await self.objects.get(key)
        if got.status != 200:
            return None
        try:
            answer: Result = decode(got.body, Result)
            for text in (answer.start, answer.end, answer.first_utc or answer.start,
                         answer.last_utc or answer.end, *(g.utc for g in answer.gaps)):
                parse_utc(text)  # a date the pattern lets through (month 13) fails here
        except ValueError as exc:
            raise FleetError(f"{key}: {exc}") from None
        return answer

    async def _answered(self, device: str, since_id: str) -> set[str]:
        """Ids of the requests of `device` that have a result, from `since_id` on
        (ids sort by creation, so one listing from there finds them)."""
        prefix = result_key(device, "x")[:-len("x.json")]
        out = set()
        async for item in self.objects.list(prefix, start_after=prefix + since_id):
            if item.key.endswith(".json"):
                out.add(item.key[len(prefix):-len(".json")])
        return out

    async def _mailbox(self, device: str) -> tuple[Mailbox, str | None]:
        key = mailbox_key(device)
        got = await self.objects.get(key)
        if got.status != 200:
            return Mailbox(device=device), None
        try:
            box: Mailbox = decode(got.body, Mailbox)
        except ValueError as exc:
            raise FleetError(f"{key}: {exc}; the device cannot read it either: replace it "
                             "or delete it") from None
        return box, got.etag

    async def place(self, device: str, request: Request) -> Request:
        """Append `request` to the device's mailbox; it is there when this returns.

        Raises:
            FleetError: the mailbox is full, or kept changing for `MAILBOX_TRIES` reads.
        """
        key = mailbox_key(device)
        for attempt in range(MAILBOX_TRIES):
            box, etag = await self._mailbox(device)
            keep = box.requests
            if keep:
                answered = await self._answered(device, min(r.id for r in keep))
                week_ago = self.now() - STALE_REQUEST_SECONDS
                keep = [r for r in keep
                        if r.id not in answered and _created(r) >= week_ago and r.id != request.id]
            if len(keep) >= MAILBOX_LIMIT:
                raise FleetError(f"{key}: {len(keep)} requests are waiting for {device}, the "
                                 f"most a mailbox holds ({MAILBOX_LIMIT}); wait for the device "
                                 "to answer some")
            body = encode(Mailbox(device=device, requests=[*keep, request]))
            stored = await self.objects.put(key, body, "application/json", if_match=etag,
                                            if_none_match=etag is None)
            if stored is not None:
                return request
            # Another operator wrote in between: read theirs and add ours to it.
            await trio.sleep(random.uniform(0, min(1.0, 0.02 * 2 ** attempt)))
        raise FleetError(f"{key}: changed under every one of {MAILBOX_TRIES} attempts to add "
                         "the request; try again")

    async def requests(self, device: str) -> list[RequestRow]:
        """The device's requests of the last week, waiting or answered, oldest first."""
        box, _etag = await self._mailbox(device)
        prefix = result_key(device, "x")[:-len("x.json")]
        week_ago = datetime.fromtimestamp(self.now() - STALE_REQUEST_SECONDS, tz=UTC)
        since = prefix + week_ago.strftime("%Y%m%dT%H%M%SZ")
        ids = {r.id for r in box.requests}
        async for item in self.objects.list(prefix, start_after=since, limit=1000):
            if item.key.endswith(".json"):
                ids.add(item.key[len(prefix):-len(".json")])
        results: dict[str, Result | None] = {}

        async def read(request_id: str) -> None:
            results[request_id] = await self.result(device, request_id)

        await self.each(sorted(ids), read)
        placed = {r.id: r for r in box.requests}
        return [RequestRow(i, placed.get(i), results.get(i)) for i in sorted(ids)]


def _created(request: Request) -> float:
    try:
        return parse_utc(request.created)
    except ValueError:
        return 0.0
