"""The uploader: sealed segments go from the spool to the backend, each exactly once.

One supervised Trio task drains the spool oldest first, one segment at a time,
with an idempotent `PUT`: the segment id is the idempotency key, the SHA-256
travels with the body (`Content-Digest`, RFC 9530) and `If-None-Match: *` asks
the backend not to overwrite. With ``upload.target = "s3"`` the same loop writes
into S3-compatible object storage instead (`s3.Bucket`): the audio under a key
made from ``upload.s3.key_template``, its metadata as ``x-amz-meta-*``, then a
sidecar ``<key>.json`` holding the whole segment metadata, both written once.

A repeat of an upload the backend already holds (412/409 with the same digest)
is success, so a lost acknowledgement or a crash between "backend stored it" and
"we wrote that down" costs one extra request, never a second object. State lives
in the spool's files only: a restart resumes exactly where the last run stopped.

Outcomes of an HTTP upload, decided by `judge_response` without I/O:

* 200/201/204, or 409/412 with the backend's digest equal to ours: synced.
* Network errors, timeouts, 5xx, 408, 429: retried forever with capped
  full-jitter exponential backoff, honouring `Retry-After` (capped too, so a
  broken backend cannot park a device for a week).
* 409/412 with another digest, or without one: quarantined, never overwritten.
* Any other status: quarantined with the status and an excerpt of the body.
* S3 (`s3.Bucket`): only a different object under the key is quarantined; every
  other failure is retried, and one a person must fix (a refused key, a denied
  prefix, a missing bucket) names the setting to check in the log and in health.

Retries are a small loop rather than `stamina`: stamina adds its jitter on top
of the exponential delay (not full jitter), draws it from the global `random`
module (no injectable RNG for exact MockClock tests) and a `Retry-After` can
only replace its delay, not bound it from below. The loop reuses the
supervisor's `Backoff`, whose `jitter=1.0` is exactly full jitter.

Owns `Uploader`, `UploaderStats` and the Protocols of what it reads of the
spool (`SegmentInfo`, `SegmentSource`): the agent passes the real spool in. A
stage: imports only the layers below (`s3`, `wire`, `config`, `blocking`, ...);
never agent, another stage (not even spool), metrics or api.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol
from urllib.parse import quote

import httpx
import msgspec
import trio

from .blocking import ThreadRunner
from .clock import Clock, SystemClock
from .config import UploadConfig, read_secret
from .supervisor import Backoff, TaskStatus
from .wire import (
    SUCCESS_STATUS,
    Decision,
    GapNote,
    Verdict,
    check_url_template,
    idempotent_put_headers,
    judge_response,
    segment_key,
)

if TYPE_CHECKING:
    from .s3 import Bucket, SigV4

__all__ = [
    "Decision",
    "SegmentInfo",
    "SegmentSource",
    "Uploader",
    "UploaderStats",
    "Verdict",
    "check_url_template",
    "idempotent_put_headers",
    "judge_response",
]

log = logging.getLogger(__name__)

# Bytes read from the segment file per chunk of the request body.
CHUNK_BYTES = 64 * 1024
# How much of an error response body is kept for the quarantine reason.
EXCERPT_BYTES = 300
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
    # Read by the "s3" target only, for the object's metadata:
    @property
    def channels(self) -> int: ...
    @property
    def format(self) -> str: ...
    @property
    def clock_synced(self) -> bool: ...
    @property
    def gaps(self) -> Sequence[GapNote]: ...


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
    # Why uploads cannot go on until a person fixes a setting (it names the key).
    blocked: str | None = None
    # "s3": seconds added to the device's clock to sign, learnt from the store.
    clock_offset_seconds: float = 0.0


class _Gone(Exception):
    """The segment left the spool while we worked on it (evicted, quarantined)."""


class Uploader:
    """Drains sealed segments from `spool` to the backend at `config.url`, or
    into the bucket of ``config.s3`` with ``config.target = "s3"``.

    Args:
        config: the `[upload]` section.
        device: the device id, for the URL and headers.
        spool: where sealed segments come from (`spool.Spool`).
        clock: wall-clock UTC, for `Retry-After` dates.
        rng: randomness for the backoff jitter (inject for exact tests).
        transport: an httpx transport (tests pass `httpx.MockTransport`).
        runner: how disk work runs off the event loop; the default is one
            worker thread at a time. MockClock tests pass `InlineRunner()`.
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
        runner: ThreadRunner | None = None,
    ) -> None:
        _check(config)
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
        self._runner = runner or ThreadRunner(1)
        self._auth: SigV4 | None = None  # "s3": kept across clients, with its clock offset
        self._bucket: Bucket | None = None

    def segment_url(self, segment_id: str) -> str:
        return self.config.url.format(device=quote(self.device, safe=""),
                                      segment=quote(segment_id, safe=""))

    def degraded(self) -> str | None:
        """Why uploads are not going through right now, or None (one failed
        attempt is routine; several in a row are an outage; a setting to fix, at once)."""
        if self.stats.blocked:
            return self.stats.blocked
        if self.stats.consecutive_failures >= DEGRADED_AFTER_FAILURES:
            return (f"{self.stats.consecutive_failures} failed upload attempts in a row: "
                    f"{self.stats.last_error}")
        return None

    # -- the loop -------------------------------------------------------------

    def reconfigure(self, config: UploadConfig) -> None:
        """Apply a changed `[upload]` section (SIGHUP): it takes effect before the
        next attempt; the token or credentials file is read again then."""
        _check(config)
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
                if self.config.target == "s3":
                    s3 = self.config.s3
                    log.info("uploader ready target=s3 endpoint=%s bucket=%s",
                             s3.endpoint or f"aws:{s3.region}", s3.bucket)
                else:
                    log.info("uploader ready url=%s", self.config.url)
                while not self._reopen:
                    meta = self._next()
                    if meta is None:
                        await self.spool.wait_pending()
                        continue
                    decision = await self.sync_one(client, meta)
                    if decision.verdict is Verdict.RETRY:
                        await self._back_off(decision)

    async def drain(self, *, give_up_on_retry: bool = False) -> None:
        """Upload until nothing is pending, then return (bound it with a timeout):
        the last step of a run that stops, such as the demo. ``give_up_on_retry``:
        return at the first failure instead of backing off (at shutdown)."""
        async with await self._open_client() as client:
            while (meta := self._next()) is not None:
                decision = await self.sync_one(client, meta)
                if decision.verdict is Verdict.RETRY:
                    if give_up_on_retry:
                        return
                    await self._back_off(decision)

    async def _open_client(self) -> httpx.AsyncClient:
        """One long-lived client (connection reuse) with the token, if any; for
        "s3", the credentials read and the bucket set up."""
        headers = {"User-Agent": "edge-agent"}
        if self.config.target == "s3":
            # Imported here: the signer (awscrt, ~5 MB resident) only where it is used.
            from .s3 import Bucket, SigV4, read_credentials

            s3 = self.config.s3
            creds = await self._runner.run(read_credentials, s3.credentials_file, s3.profile)
            if self._auth is None:
                self._auth = SigV4(creds, s3.region, self.clock)
            self._auth.credentials, self._auth.region = creds, s3.region
            self._bucket = Bucket(s3, self._auth, self.clock)
        elif self.config.token_file:
            token = await self._runner.run(read_secret, self.config.token_file,
                                             "upload.token_file")
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
                intact = await self._runner.run(self.spool.verify, meta.id)
            except KeyError:  # no longer held
                raise _Gone(meta.id) from None
            if not intact:
                self._check_still_pending(meta.id)
                st.corrupt += 1
                return await self._quarantine(meta, "digest re-check before upload failed "
                                                    "(bit rot or truncation)")
            decision = await self._put(client, meta)
            if decision.verdict in (Verdict.SYNCED, Verdict.ALREADY):
                await self._runner.run(self.spool.mark_synced, meta.id)
                st.consecutive_failures = 0
                st.blocked = None
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
            return self._failed(meta, decision.reason, decision.retry_after, decision.setting)
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

    def _failed(self, meta: SegmentInfo, reason: str, retry_after: float | None = None,
                setting: str | None = None) -> Decision:
        """Count a failed attempt. One that names a `setting` a person must fix is
        logged as an error the first time (one line: the cause and the key), shown
        in health at once, and makes the next attempt read the credentials again."""
        st = self.stats
        st.failures += 1
        st.consecutive_failures += 1
        st.last_error = reason
        if setting is not None and st.blocked != reason:
            log.error("upload blocked id=%s setting=%s reason=%s", meta.id, setting, reason)
        else:
            log.warning("upload failed id=%s reason=%r failures=%d", meta.id, reason,
                        st.consecutive_failures)
        st.blocked = reason if setting is not None else None
        self._reopen = self._reopen or setting is not None
        return Decision(Verdict.RETRY, reason, retry_after, setting)

    async def _quarantine(self, meta: SegmentInfo, reason: str) -> Decision:
        await self._runner.run(self.spool.quarantine, meta.id, reason)
        self.stats.quarantined += 1
        log.error("segment quarantined id=%s reason=%r", meta.id, reason)
        return Decision(Verdict.QUARANTINE, reason)

    async def _put(self, client: httpx.AsyncClient, meta: SegmentInfo) -> Decision:
        """Upload the segment file once, to the target; transport trouble becomes a
        RETRY decision."""
        try:
            path = self.spool.audio_path(meta.id)
            f: IO[bytes] = await self._runner.run(_open_rb, path)
        except (KeyError, FileNotFoundError):  # evicted or moved meanwhile
            raise _Gone(meta.id) from None
        try:
            size = os.fstat(f.fileno()).st_size
            self.stats.attempts += 1
            # The bandwidth cap stretches an upload on purpose: allow for it.
            rate = self.config.max_bytes_per_second
            limit = self.config.timeout_seconds + (size / rate if rate else 0.0)
            try:
                with trio.fail_after(limit):
                    if self.config.target == "s3":
                        return await self._put_s3(client, meta, f, size, path.suffix[1:])
                    return await self._put_http(client, meta, f, size)
            except trio.TooSlowError:
                return Decision(Verdict.RETRY, f"no answer within {limit:g} s")
            except httpx.TransportError as exc:
                return Decision(Verdict.RETRY, f"{type(exc).__name__}: {exc}".rstrip(": "))
        finally:
            f.close()

    async def _put_http(self, client: httpx.AsyncClient, meta: SegmentInfo, f: IO[bytes],
                        size: int) -> Decision:
        headers = idempotent_put_headers(meta.content_type, size, meta.sha256, {
            "Edge-Device-Id": self.device,
            "Edge-Segment-Start": meta.start_utc,
            "Edge-Segment-End": meta.end_utc,
        })
        async with client.stream("PUT", self.segment_url(meta.id), content=self._body(f, size),
                                 headers=headers) as response:
            excerpt = b""
            if response.status_code not in SUCCESS_STATUS:
                async for part in response.aiter_bytes():
                    excerpt += part
                    if len(excerpt) >= EXCERPT_BYTES:
                        break
        self.stats.last_status = response.status_code
        text = excerpt[:EXCERPT_BYTES].decode("utf-8", "replace").strip()
        return judge_response(response.status_code, response.headers, text, meta.sha256,
                              self.clock.utc())

    async def _put_s3(self, client: httpx.AsyncClient, meta: SegmentInfo, f: IO[bytes],
                      size: int, ext: str) -> Decision:
        """The audio, then its sidecar ``<key>.json``, each written once; the segment
        is synced when both are stored."""
        assert self._bucket is not None and self._auth is not None
        key = segment_key(self.config.s3.key_template, self.device, meta.id, ext)
        auth = self._auth

        def offset() -> float | None:
            # Times cut with an unsynchronised clock are off by about what the store says.
            return None if meta.clock_synced else auth.offset

        audio = await self._bucket.put_once(
            client, key, lambda: self._body(f, size), size, meta.sha256, meta.content_type,
            lambda: object_metadata(meta, self.device, offset()))
        self.stats.clock_offset_seconds = auth.offset
        self.stats.last_status = self._bucket.last_status
        if audio.verdict not in (Verdict.SYNCED, Verdict.ALREADY):
            return audio
        record = sidecar(meta, self.device, key, offset())
        side = await self._bucket.put_once(
            client, f"{key}.json", record, len(record), hashlib.sha256(record).hexdigest(),
            "application/json", {"segment": meta.id}, identity=meta.sha256)
        self.stats.last_status = self._bucket.last_status
        return audio if side.verdict in (Verdict.SYNCED, Verdict.ALREADY) else side

    async def _body(self, f: IO[bytes], size: int) -> AsyncIterator[bytes]:
        """The file's bytes, read off the event loop, paced to the bandwidth cap."""
        rate = self.config.max_bytes_per_second
        chunk = min(CHUNK_BYTES, max(1024, rate // 4)) if rate else CHUNK_BYTES
        start = trio.current_time()
        sent = 0
        await self._runner.run(f.seek, 0)  # an upload sent again starts over
        while sent < size:
            data: bytes = await self._runner.run(f.read, min(chunk, size - sent))
            if not data:
                raise OSError(f"segment file shrank during upload at byte {sent} of {size}")
            sent += len(data)
            self.stats.bytes_sent += len(data)
            yield data
            if rate:
                await trio.sleep_until(start + sent / rate)


def _open_rb(path: Path) -> IO[bytes]:
    return path.open("rb")


def _check(config: UploadConfig) -> None:
    if config.target == "http" and (problem := check_url_template(config.url)) is not None:
        raise ValueError(f"upload.url: {problem}, got {config.url!r}")


def object_metadata(meta: SegmentInfo, device: str, clock_offset: float | None
                    ) -> dict[str, str]:
    """What travels with a segment's object as ``x-amz-meta-*`` (ASCII, so any store
    keeps it); the sidecar holds the rest."""
    out = {
        "device": device, "segment": meta.id, "start": meta.start_utc, "end": meta.end_utc,
        "samples": str(meta.frames), "rate": str(meta.rate), "channels": str(meta.channels),
        "format": meta.format, "clock-synced": "true" if meta.clock_synced else "false",
        "gaps": str(len(meta.gaps)),
        "gap-seconds": f"{sum(g.seconds for g in meta.gaps):.3f}",
    }
    if clock_offset is not None:
        out["clock-offset-seconds"] = f"{clock_offset:.0f}"
    return out


def sidecar(meta: SegmentInfo, device: str, key: str, clock_offset: float | None) -> bytes:
    """The sidecar ``<key>.json``: the segment's whole metadata, the key of its audio
    and, for a clock that was not synchronised, the offset the store measured."""
    record = {"key": key, "device": device, "segment": msgspec.to_builtins(meta)}
    if clock_offset is not None:
        record["clock_offset_seconds"] = clock_offset
    return msgspec.json.encode(record)
