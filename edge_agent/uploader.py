"""The uploader: sealed segments go from the spool to the backend, each exactly once.

One supervised Trio task drains the spool oldest first, one segment at a time,
with an idempotent `PUT`: the segment id is the idempotency key, the SHA-256
travels with the body (`Content-Digest`, RFC 9530) and `If-None-Match: *` asks
the backend not to overwrite. A repeat of an upload the backend already holds
(412/409 with the same digest) is success, so a lost acknowledgement or a crash
between "backend stored it" and "we wrote that down" costs one extra request,
never a second object. State lives in the spool's files only: a restart resumes
exactly where the last run stopped.

Outcomes, decided by `judge_response` without I/O:

* 200/201/204, or 409/412 with the backend's digest equal to ours: synced.
* Network errors, timeouts, 5xx, 408, 429: retried forever with capped
  full-jitter exponential backoff, honouring `Retry-After` (capped too, so a
  broken backend cannot park a device for a week).
* 409/412 with another digest, or without one: quarantined, never overwritten.
* Any other status: quarantined with the status and an excerpt of the body.

Retries are a small loop rather than `stamina`: stamina adds its jitter on top
of the exponential delay (not full jitter), draws it from the global `random`
module (no injectable RNG for exact MockClock tests) and a `Retry-After` can
only replace its delay, not bound it from below. The loop reuses the
supervisor's `Backoff`, whose `jitter=1.0` is exactly full jitter.
"""

from __future__ import annotations

import base64
import enum
import logging
import os
import random
import re
import string
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar
from urllib.parse import quote

import httpx
import trio

from .clock import Clock, SystemClock
from .config import UploadConfig
from .supervisor import Backoff, TaskStatus

__all__ = [
    "Decision",
    "SegmentInfo",
    "SegmentSource",
    "Uploader",
    "UploaderStats",
    "Verdict",
    "check_url_template",
    "content_digest",
    "idempotent_put_headers",
    "judge_response",
    "parse_digest_header",
    "parse_retry_after",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bytes read from the segment file per chunk of the request body.
CHUNK_BYTES = 64 * 1024
# How much of an error response body is kept for the quarantine reason.
EXCERPT_BYTES = 300
# 401/403 say nothing about the segment: an expired or revoked token would
# otherwise quarantine every new segment. Retry (health shows the error) until
# the operator fixes the token; the audio waits on disk.
RETRYABLE_STATUS = frozenset({401, 403, 408, 429})
SUCCESS_STATUS = frozenset({200, 201, 204})
ALREADY_STATUS = frozenset({409, 412})
URL_FIELDS = frozenset({"device", "segment"})
DEGRADED_AFTER_FAILURES = 3


class SegmentInfo(Protocol):
    """What the uploader reads of a sealed segment's metadata (`spool.SegmentMeta`)."""

    @property
    def id(self) -> str: ...
    @property
    def start_utc(self) -> str: ...
    @property
    def end_utc(self) -> str: ...
    @property
    def frames(self) -> int: ...
    @property
    def rate(self) -> int: ...
    @property
    def content_type(self) -> str: ...
    @property
    def bytes(self) -> int: ...
    @property
    def sha256(self) -> str: ...


class SegmentSource(Protocol):
    """The part of `spool.Spool` the uploader uses. Methods that touch the disk
    are called from a worker thread; `audio_path` and `verify` raise KeyError for
    a segment no longer held."""

    def pending(self) -> Sequence[SegmentInfo]: ...
    def audio_path(self, segment_id: str) -> Path: ...
    def verify(self, segment_id: str) -> bool: ...
    def mark_synced(self, segment_id: str) -> None: ...
    def quarantine(self, segment_id: str, reason: str) -> None: ...
    async def wait_pending(self) -> None: ...


# ----------------------------------------------------------------------------
# The protocol, without I/O


def content_digest(sha256_hex: str) -> str:
    """The RFC 9530 header value for a SHA-256 given in hex: `sha-256=:<base64>:`."""
    return f"sha-256=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode('ascii')}:"


_DIGEST_MEMBER = re.compile(r"^\s*([a-z0-9_*.-]+)\s*=\s*:([A-Za-z0-9+/=]*):\s*$")


def parse_digest_header(value: str | None) -> dict[str, bytes]:
    """Algorithm -> digest from a `Content-Digest`/`Repr-Digest` value (an RFC 8941
    dictionary of byte sequences); members that do not parse are skipped."""
    out: dict[str, bytes] = {}
    if not value:
        return out
    for member in value.split(","):
        m = _DIGEST_MEMBER.match(member.split(";", 1)[0])
        if m is None:
            continue
        try:
            out[m.group(1)] = base64.b64decode(m.group(2), validate=True)
        except ValueError:
            continue
    return out


def stored_sha256(headers: Mapping[str, str]) -> str | None:
    """The digest (hex) of the object the backend holds, from `Repr-Digest`,
    `Content-Digest` or a strong `ETag` carrying the hex SHA-256."""
    for name in ("repr-digest", "content-digest"):
        digest = parse_digest_header(headers.get(name)).get("sha-256")
        if digest is not None and len(digest) == 32:
            return digest.hex()
    etag = headers.get("etag", "")
    m = re.fullmatch(r'"([0-9a-fA-F]{64})"', etag.strip())
    return m.group(1).lower() if m else None


def parse_retry_after(value: str | None, now_utc: float) -> float | None:
    """Seconds to wait from a `Retry-After` value (delta seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_utc)


class Verdict(enum.Enum):
    SYNCED = "synced"  # stored now
    ALREADY = "already"  # the backend already held this very object
    RETRY = "retry"  # transient: try again later
    QUARANTINE = "quarantine"  # permanent: keep locally, never send again
    GONE = "gone"  # the segment left the spool meanwhile (evicted): nothing to do


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str = ""
    retry_after: float | None = None


def idempotent_put_headers(content_type: str, size: int, sha256_hex: str,
                           extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Headers of an idempotent `PUT` of a body of `size` bytes with digest `sha256_hex`:
    the digest travels with it and `If-None-Match: *` asks the server not to overwrite.
    Shared with `store.HttpStore`, so segments and recordings use one protocol."""
    return {
        "Content-Type": content_type,
        "Content-Length": str(size),
        "Content-Digest": content_digest(sha256_hex),
        "If-None-Match": "*",
        **(extra or {}),
    }


def judge_response(
    status: int, headers: Mapping[str, str], excerpt: str, sha256_hex: str, now_utc: float
) -> Decision:
    """What a response to a segment PUT means for that segment."""
    if status in SUCCESS_STATUS:
        return Decision(Verdict.SYNCED)
    if status in ALREADY_STATUS:
        theirs = stored_sha256(headers)
        if theirs == sha256_hex.lower():
            return Decision(Verdict.ALREADY)
        if theirs is None:
            return Decision(Verdict.QUARANTINE,
                            f"status={status} backend holds this id and did not say its digest")
        return Decision(Verdict.QUARANTINE,
                        f"status={status} backend holds a different body under this id "
                        f"(its sha256={theirs}, ours={sha256_hex})")
    if status >= 500 or status in RETRYABLE_STATUS:
        return Decision(Verdict.RETRY, f"status={status} {excerpt}".strip(),
                        parse_retry_after(headers.get("retry-after"), now_utc))
    return Decision(Verdict.QUARANTINE, f"status={status} body={excerpt!r}")


def check_url_template(template: str) -> str | None:
    """None if `template` is a usable upload URL template, else what is wrong."""
    if not re.match(r"^https?://[^/\s{}]+", template):
        return "expected an http:// or https:// URL"
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        return f"unbalanced braces ({exc})"
    unknown = fields - URL_FIELDS
    if unknown:
        return (f"unknown placeholder {{{sorted(unknown)[0]}}}; "
                "expected only {device} and {segment}")
    if "segment" not in fields:
        return "expected a {segment} placeholder (each segment has its own URL)"
    return None


# ----------------------------------------------------------------------------
# The task


@dataclass
class UploaderStats:
    """Counters for metrics and health; times are Trio times."""

    attempts: int = 0
    successes: int = 0  # stored by this request (200/201/204)
    already_present: int = 0  # 409/412 with our digest: an earlier attempt had stored it
    failures: int = 0  # transient failures, each followed by a retry
    consecutive_failures: int = 0
    quarantined: int = 0  # every segment this uploader quarantined
    corrupt: int = 0  # of those, failing the digest re-check before upload
    bytes_sent: int = 0
    backlog_segments: int = 0
    backlog_bytes: int = 0
    backlog_seconds: float = 0.0
    last_status: int | None = None
    last_error: str | None = None
    last_success_at: float | None = None
    next_attempt_at: float | None = None


class _Gone(Exception):
    """The segment left the spool while we worked on it (evicted, quarantined)."""


BlockingRunner = Callable[..., Awaitable[Any]]


class Uploader:
    """Drains sealed segments from `spool` to the backend at `config.url`.

    Args:
        config: the `[upload]` section.
        device: the device id, for the URL and headers.
        spool: where sealed segments come from (`spool.Spool`).
        clock: wall-clock UTC, for `Retry-After` dates.
        rng: randomness for the backoff jitter (inject for exact tests).
        transport: an httpx transport (tests pass `httpx.MockTransport`).
        run_blocking: how disk work runs off the event loop; the default is a
            worker thread under a one-slot `CapacityLimiter`.
    """

    def __init__(
        self,
        config: UploadConfig,
        device: str,
        spool: SegmentSource,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        run_blocking: BlockingRunner | None = None,
    ) -> None:
        problem = check_url_template(config.url)
        if problem is not None:
            raise ValueError(f"upload.url: {problem}, got {config.url!r}")
        self.config = config
        self.device = device
        self.spool = spool
        self.clock: Clock = clock or SystemClock()
        self.backoff = Backoff(initial=config.backoff_initial_seconds,
                               maximum=config.backoff_max_seconds, jitter=1.0,
                               rng=rng or random.Random())
        self.stats = UploaderStats()
        self._transport = transport
        self._reopen = False
        self._limiter = trio.CapacityLimiter(1)
        self._run_blocking = run_blocking or self._in_thread

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def segment_url(self, segment_id: str) -> str:
        return self.config.url.format(device=quote(self.device, safe=""),
                                      segment=quote(segment_id, safe=""))

    def degraded(self) -> str | None:
        """Why uploads are not going through right now, or None (one failed
        attempt is routine; several in a row are an outage)."""
        if self.stats.consecutive_failures >= DEGRADED_AFTER_FAILURES:
            return (f"{self.stats.consecutive_failures} failed upload attempts in a row: "
                    f"{self.stats.last_error}")
        return None

    # -- the loop -------------------------------------------------------------

    def reconfigure(self, config: UploadConfig) -> None:
        """Apply a changed `[upload]` section (SIGHUP): it takes effect before the
        next attempt; the token file is read again then."""
        problem = check_url_template(config.url)
        if problem is not None:
            raise ValueError(f"upload.url: {problem}, got {config.url!r}")
        self.config = config
        self.backoff.initial = config.backoff_initial_seconds
        self.backoff.maximum = config.backoff_max_seconds
        self._reopen = True

    async def run(self, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Upload until cancelled; ready once the HTTP client is open."""
        while True:
            self._reopen = False
            async with await self._open_client() as client:
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                log.info("uploader ready url=%s", self.config.url)
                while not self._reopen:
                    meta = self._next()
                    if meta is None:
                        await self.spool.wait_pending()
                        continue
                    decision = await self.sync_one(client, meta)
                    if decision.verdict is Verdict.RETRY:
                        await self._back_off(decision)

    async def drain(self) -> None:
        """Upload until nothing is pending, then return (bound it with a timeout):
        the last step of a run that stops, such as the demo."""
        async with await self._open_client() as client:
            while (meta := self._next()) is not None:
                decision = await self.sync_one(client, meta)
                if decision.verdict is Verdict.RETRY:
                    await self._back_off(decision)

    async def _open_client(self) -> httpx.AsyncClient:
        """One long-lived client (connection reuse) with the token, if any."""
        headers = {"User-Agent": "edge-agent"}
        if self.config.token_file:
            token = await self._run_blocking(_read_token, self.config.token_file)
            headers["Authorization"] = f"Bearer {token}"
        return httpx.AsyncClient(transport=self._transport, headers=headers,
                                 timeout=httpx.Timeout(self.config.timeout_seconds),
                                 follow_redirects=False)

    def _next(self) -> SegmentInfo | None:
        pending = self.spool.pending()
        st = self.stats
        st.backlog_segments = len(pending)
        st.backlog_bytes = sum(m.bytes for m in pending)
        st.backlog_seconds = sum(m.frames / m.rate for m in pending if m.rate)
        return pending[0] if pending else None

    async def _back_off(self, decision: Decision) -> None:
        st = self.stats
        delay = self.backoff.delay(st.consecutive_failures - 1)
        if decision.retry_after is not None:
            delay = max(delay, min(decision.retry_after, self.config.backoff_max_seconds))
        st.next_attempt_at = trio.current_time() + delay
        log.info("upload retry_in=%.2fs failures=%d", delay, st.consecutive_failures)
        await trio.sleep(delay)
        st.next_attempt_at = None

    async def sync_one(self, client: httpx.AsyncClient, meta: SegmentInfo) -> Decision:
        """Verify, upload and record one segment; returns what happened."""
        st = self.stats
        try:
            try:
                intact = await self._run_blocking(self.spool.verify, meta.id)
            except KeyError:  # no longer held
                raise _Gone(meta.id) from None
            if not intact:
                self._check_still_pending(meta.id)
                st.corrupt += 1
                return await self._quarantine(meta, "digest re-check before upload failed "
                                                    "(bit rot or truncation)")
            decision = await self._put(client, meta)
            if decision.verdict in (Verdict.SYNCED, Verdict.ALREADY):
                await self._run_blocking(self.spool.mark_synced, meta.id)
                st.consecutive_failures = 0
                st.last_success_at = trio.current_time()
                if decision.verdict is Verdict.SYNCED:
                    st.successes += 1
                else:
                    st.already_present += 1
                log.info("segment synced id=%s bytes=%d already_present=%s", meta.id,
                         meta.bytes, decision.verdict is Verdict.ALREADY)
                return decision
            if decision.verdict is Verdict.QUARANTINE:
                self._check_still_pending(meta.id)
                return await self._quarantine(meta, decision.reason)
            return self._failed(meta, decision.reason, decision.retry_after)
        except _Gone:
            log.info("segment left the spool during upload id=%s", meta.id)
            return Decision(Verdict.GONE)
        except OSError as exc:
            # Local disk trouble (a failed state write, EIO reading): the segment
            # stays pending; a repeat upload is recognised as already present.
            return self._failed(meta, f"local {type(exc).__name__}: {exc}")

    def _check_still_pending(self, segment_id: str) -> None:
        if all(m.id != segment_id for m in self.spool.pending()):
            raise _Gone(segment_id)

    def _failed(self, meta: SegmentInfo, reason: str, retry_after: float | None = None
                ) -> Decision:
        st = self.stats
        st.failures += 1
        st.consecutive_failures += 1
        st.last_error = reason
        log.warning("upload failed id=%s reason=%r failures=%d", meta.id, reason,
                    st.consecutive_failures)
        return Decision(Verdict.RETRY, reason, retry_after)

    async def _quarantine(self, meta: SegmentInfo, reason: str) -> Decision:
        await self._run_blocking(self.spool.quarantine, meta.id, reason)
        self.stats.quarantined += 1
        log.error("segment quarantined id=%s reason=%r", meta.id, reason)
        return Decision(Verdict.QUARANTINE, reason)

    async def _put(self, client: httpx.AsyncClient, meta: SegmentInfo) -> Decision:
        """One PUT of the segment file; transport trouble becomes a RETRY decision."""
        try:
            f: IO[bytes] = await self._run_blocking(_open_rb, self.spool.audio_path(meta.id))
        except (KeyError, FileNotFoundError):  # evicted or moved meanwhile
            raise _Gone(meta.id) from None
        try:
            size = os.fstat(f.fileno()).st_size
            headers = idempotent_put_headers(meta.content_type, size, meta.sha256, {
                "Edge-Device-Id": self.device,
                "Edge-Segment-Start": meta.start_utc,
                "Edge-Segment-End": meta.end_utc,
            })
            self.stats.attempts += 1
            # The bandwidth cap stretches an upload on purpose: allow for it.
            rate = self.config.max_bytes_per_second
            limit = self.config.timeout_seconds + (size / rate if rate else 0.0)
            try:
                with trio.fail_after(limit):
                    async with client.stream("PUT", self.segment_url(meta.id),
                                             content=self._body(f, size),
                                             headers=headers) as response:
                        excerpt = b""
                        if response.status_code not in SUCCESS_STATUS:
                            async for part in response.aiter_bytes():
                                excerpt += part
                                if len(excerpt) >= EXCERPT_BYTES:
                                    break
            except trio.TooSlowError:
                return Decision(Verdict.RETRY, f"no answer within {limit:g} s")
            except httpx.TransportError as exc:
                return Decision(Verdict.RETRY, f"{type(exc).__name__}: {exc}".rstrip(": "))
        finally:
            f.close()
        self.stats.last_status = response.status_code
        text = excerpt[:EXCERPT_BYTES].decode("utf-8", "replace").strip()
        return judge_response(response.status_code, response.headers, text, meta.sha256,
                              self.clock.utc())

    async def _body(self, f: IO[bytes], size: int) -> AsyncIterator[bytes]:
        """The file's bytes, read off the event loop, paced to the bandwidth cap."""
        rate = self.config.max_bytes_per_second
        chunk = min(CHUNK_BYTES, max(1024, rate // 4)) if rate else CHUNK_BYTES
        start = trio.current_time()
        sent = 0
        while sent < size:
            data: bytes = await self._run_blocking(f.read, min(chunk, size - sent))
            if not data:
                raise OSError(f"segment file shrank during upload at byte {sent} of {size}")
            sent += len(data)
            self.stats.bytes_sent += len(data)
            yield data
            if rate:
                await trio.sleep_until(start + sent / rate)


def _open_rb(path: Path) -> IO[bytes]:
    return path.open("rb")


def _read_token(path: str) -> str:
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"upload.token_file {path}: expected one token on one line")
    return token
