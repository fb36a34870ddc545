"""The device's side of the fleet: it answers the retrieval requests left in its
mailbox in the bucket, and leaves its heartbeat there, without accepting any
connection (a device behind NAT reaches the store; nothing reaches the device).

`FleetDevice.run` is a supervised stage of the agent with two loops:

* **Mailbox.** ``requests/{device}.json`` is read with ``If-None-Match`` on the
  last ETag, so an unchanged mailbox costs one 304 (404: empty; never a LIST),
  every ``fleet.poll_seconds`` give or take 10%, every ``busy_poll_seconds``
  while requests wait their turn. Each request not known to be answered (a
  result in the store marks it done; after a restart a GET of its result key
  tells) is refused with a `Result` saying why, or cut from the ring and spool
  by `api.cut` (the planner and encoders of ``/v1/audio``) into a file under the
  data dir, PUT once with its checksum (`s3.Bucket.put_once`), then its result
  (``If-None-Match: *``: a request never gets two results). At most
  ``max_requests_per_poll`` per poll.
* **Heartbeat.** ``status/{device}.json`` every ``heartbeat_seconds`` and at
  once when health changes (checked every second), with the figures the agent
  hands in through a callable (this module never reads the agent or metrics).

Restarts: a cut answer is kept on disk (the audio, then its result record,
both durable) until its result is in the store. A device killed between the
two PUTs finds both files at its next start and sends the same audio again
(the store says it is there already) and then the result. Errors are logged
once per change, in one line, and counted (`FleetStats`).

Imports the API's cut, ``s3``, ``config`` and the bottom layer; never agent,
metrics or cli.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from collections.abc import AsyncIterator, Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import httpx
import trio
from prometheus_client.core import CounterMetricFamily, Metric

from ..api.cut import (
    AUDIO_FORMATS,
    FileSink,
    RangeTooLong,
    oldest_held,
    open_renderer,
    plan_held,
    produce,
    spool_reader,
)
from ..api.plan import AudioPlan
from ..api.render import Abort
from ..api.seams import SpoolView
from ..blocking import ThreadRunner
from ..clock import Clock, iso_utc
from ..config import FleetConfig, UploadConfig
from ..errors import describe
from ..fs import fsync_dir, sync_file, write_atomic
from ..ring import AudioRing
from ..s3 import Bucket, ObjectClient, S3Error, SigV4, read_credentials
from ..supervisor import TaskStatus
from ..wire import Verdict
from .device_core import (
    AnsweredIds,
    FleetStats,
    answer_gaps,
    expired,
    invalid,
    next_poll,
    not_held,
    not_yet,
    too_large,
)
from .records import (
    MAILBOX_LIMIT,
    Heartbeat,
    Mailbox,
    Request,
    Result,
    audio_key,
    decode,
    encode,
    mailbox_key,
    result_key,
    status_key,
)

__all__ = ["FleetCollector", "FleetDevice", "FleetFigures"]

log = logging.getLogger(__name__)

#: How often health is looked at for a change that sends a heartbeat at once (seconds).
HEALTH_CHECK_SECONDS: Final = 1.0
#: Attempts at cutting one request before it is refused as failed.
MAX_ATTEMPTS: Final = 3
#: The largest object the device reads (its mailbox, a result record): a larger
#: mailbox is an error in one line, not megabytes in a Pi's memory (bytes).
MAX_READ_BYTES: Final = 1 << 20
_CHUNK = 1 << 20  # bytes of an answer's file read per trip to a worker thread
_JSON = "application/json"

#: The agent's figures for a heartbeat: ``health`` ("ok"/"degraded"), ``reasons``
#: ("component: detail"), ``uptime_seconds``, ``capture``, ``clock``, ``spool``,
#: ``last_synced_segment``, ``stt``, ``disk_free_mb`` (the fields of `Heartbeat`).
FleetFigures = Callable[[], Mapping[str, Any]]
#: The agent's health in brief (cheap: looked at every second), compared with the
#: last one sent: a change sends a heartbeat at once.
HealthState = Callable[[], Hashable]


class _Retry(Exception):
    """The store did not take an answer now; the request is tried again at a later poll."""


class _Failed(Exception):
    """The answer cannot be made this time (audio left the ring, a segment cannot be
    read, another object under the audio's key); after `MAX_ATTEMPTS`, refused."""


@dataclass(frozen=True)
class _Kept:
    """An answer cut and kept on disk until its result is in the store."""

    result: Result
    audio: Path
    record: Path


class FleetDevice:
    """Answers the mailbox and sends heartbeats through the bucket of ``[upload.s3]``.

    Args:
        config: the ``[fleet]`` section.
        upload: the ``[upload]`` section (its ``s3`` names the bucket and the keys).
        device_id: this device (its mailbox, answers and heartbeat keys).
        ring, spool: the audio held (the spool None when segments are disabled).
        clock: the device's wall clock.
        work_dir: where answers are cut and kept until stored (created at start).
        figures: the agent's figures for a heartbeat (see `FleetFigures`).
        health: the agent's health in brief (see `HealthState`).
        version: the agent's version, named in heartbeats.
        transport: an httpx transport (tests); rng: the poll jitter's randomness.
    """

    def __init__(self, config: FleetConfig, upload: UploadConfig, *, device_id: str,
                 ring: AudioRing, spool: SpoolView | None, clock: Clock, work_dir: Path,
                 figures: FleetFigures, health: HealthState, version: str,
                 transport: httpx.AsyncBaseTransport | None = None,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.upload = upload
        self.device_id = device_id
        self.ring = ring
        self.spool = spool
        self.clock = clock
        self.work_dir = work_dir
        self.figures = figures
        self.health = health
        self.version = version
        self.stats = FleetStats()
        self.objects: ObjectClient | None = None  # while running
        self.transport = transport  # tests may replace it before `run`
        self._rng = rng or random.Random()
        self._io = ThreadRunner(1)
        self._encode = ThreadRunner(1)
        self._bucket: Bucket | None = None
        self._client: httpx.AsyncClient | None = None
        self._etag: str | None = None
        self._requests: list[Request] = []  # of the last mailbox read
        self._readable = True  # whether the last mailbox read was a Mailbox
        self._answered = AnsweredIds()
        self._kept: dict[str, _Kept] = {}
        self._attempts: dict[str, tuple[int, str]] = {}  # failed cuts, the last reason
        self._errors: dict[str, str] = {}  # the last error logged, per activity

    # -- the stage -----------------------------------------------------------------

    async def run(self, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        s3 = self.upload.s3
        creds = await self._io.run(read_credentials, s3.credentials_file, s3.profile)
        auth = SigV4(creds, s3.region, self.clock)
        await self._io.run(self._recover)
        async with httpx.AsyncClient(transport=self.transport,
                                     headers={"User-Agent": "edge-agent"},
                                     timeout=httpx.Timeout(self.upload.timeout_seconds),
                                     follow_redirects=False) as client:
            self._client = client
            self._bucket = Bucket(s3, auth, self.clock)
            self.objects = ObjectClient(s3, auth, client, max_bytes=MAX_READ_BYTES)
            log.info("fleet ready device=%s bucket=%s mailbox=%s kept=%d", self.device_id,
                     s3.bucket, mailbox_key(self.device_id), len(self._kept))
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats)
                while True:
                    busy = await self.poll()
                    await trio.sleep(next_poll(self.config, busy, self._rng))

    def _recover(self) -> None:
        """Take up the answers kept by an earlier run; drop what was half made."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.work_dir.iterdir()):
            if path.suffix != ".json":
                continue
            try:
                result = decode(path.read_bytes(), Result)
            except (OSError, ValueError) as exc:
                log.warning("fleet dropped an unreadable kept answer path=%s error=%s",
                            path, exc)
                path.unlink(missing_ok=True)
                continue
            audio = self.work_dir / Path(result.key).name
            if audio.is_file() and audio.stat().st_size == result.bytes:
                self._kept[result.id] = _Kept(result, audio, path)
            else:
                path.unlink(missing_ok=True)
        keep = {k.audio for k in self._kept.values()} | {k.record for k in self._kept.values()}
        for path in self.work_dir.iterdir():
            if path not in keep:
                path.unlink(missing_ok=True)

    # -- errors, once per change ---------------------------------------------------

    def _failed(self, what: str, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else describe(exc)
        self.stats.errors += 1
        self.stats.last_error = f"{what}: {text}"
        if self._errors.get(what) != text:
            self._errors[what] = text
            log.warning("fleet %s failed error=%s", what, text)

    def _ok(self, what: str) -> None:
        if self._errors.pop(what, None) is not None:
            log.info("fleet %s works again", what)

    # -- the mailbox ---------------------------------------------------------------

    async def poll(self) -> bool:
        """Read the mailbox and answer what is due; True while requests wait their
        turn (the next poll comes sooner)."""
        objects = self.objects
        assert objects is not None
        st = self.stats
        st.polls += 1
        st.last_poll_utc = iso_utc(self.clock.utc())
        try:
            fetched = await objects.get(mailbox_key(self.device_id), etag=self._etag)
        except (S3Error, httpx.HTTPError) as exc:
            self._failed("mailbox", exc)
            return False
        if fetched.status == 304:
            st.not_modified += 1
            if self._readable:
                self._ok("mailbox")
        elif fetched.status == 404:
            st.mailbox_empty += 1
            self._etag, self._requests, self._readable = None, [], True
            self._ok("mailbox")
            await self._io.run(self._forget_all_but, set())
        else:
            st.mailbox_changes += 1
            # Remembered even when unreadable: it is not read again until it changes.
            self._etag = fetched.etag
            try:
                requests = decode(fetched.body, Mailbox).requests
            except ValueError as exc:
                self._requests, self._readable = [], False
                self._failed("mailbox", f"{mailbox_key(self.device_id)}: {exc}")
            else:
                self._readable = True
                self._ok("mailbox")
                if len(requests) > MAILBOX_LIMIT:  # the operator never writes more
                    st.requests_over_limit += len(requests) - MAILBOX_LIMIT
                    self._failed("mailbox size", f"{mailbox_key(self.device_id)}: "
                                 f"{len(requests)} requests; only the first {MAILBOX_LIMIT} "
                                 "are read")
                else:
                    self._ok("mailbox size")
                self._requests = requests[:MAILBOX_LIMIT]
                await self._io.run(self._forget_all_but, {r.id for r in self._requests})
        return await self._work()

    async def _work(self) -> bool:
        """Take up to ``max_requests_per_poll`` requests of the last mailbox read (a
        look for an earlier run's result counts as one); True when more are due."""
        cfg, st = self.config, self.stats
        now = self.clock.utc()
        taken = 0
        for request in self._requests:
            if request.id in self._answered:
                continue
            if expired(request, now, cfg):
                st.requests_expired += 1
                await self._done(request.id)
                continue
            why = invalid(request, cfg, self.ring.channels)
            if why is None and not_yet(request, now):
                st.requests_waiting += 1
                continue
            if taken >= cfg.max_requests_per_poll:
                return True
            taken += 1
            tries, last = self._attempts.get(request.id, (0, ""))
            if why is None and tries >= MAX_ATTEMPTS:
                why = f"failed: {tries} attempts; the last: {last}"
            try:
                if why is not None:
                    await self._refuse(request, why)
                elif request.id in self._kept or not await self._result_exists(request):
                    await self._answer(request)
            except (_Retry, S3Error, httpx.HTTPError, OSError) as exc:
                st.requests_failed += 1
                self._failed("answer", exc)
                return False  # the store or the disk: the next poll tries again
            except _Failed as exc:
                st.requests_failed += 1
                self._failed("answer", f"request {request.id}: {exc}")
                # Tried again at the next poll; refused after MAX_ATTEMPTS.
                self._attempts[request.id] = (tries + 1, str(exc))
                kept = self._kept.pop(request.id, None)
                if kept is not None:  # the kept audio cannot be stored: cut again
                    await self._io.run(_unlink, kept.record, kept.audio)
            else:
                self._ok("answer")
        return False

    async def _result_exists(self, request: Request) -> bool:
        """Whether the store holds a result for `request` (answered by an earlier run)."""
        assert self.objects is not None
        got = await self.objects.get(result_key(self.device_id, request.id))
        if got.status != 200:
            return False
        self.stats.results_found += 1
        await self._done(request.id)
        return True

    async def _done(self, request_id: str) -> None:
        self._answered.add(request_id)
        self._attempts.pop(request_id, None)
        kept = self._kept.pop(request_id, None)
        if kept is not None:
            await self._io.run(_unlink, kept.record, kept.audio)

    def _forget_all_but(self, ids: set[str]) -> None:
        """Drop the kept answers and failure counts of requests that left the
        mailbox (answered, or withdrawn by the operator)."""
        for request_id in [i for i in self._attempts if i not in ids]:
            del self._attempts[request_id]
        for request_id in [i for i in self._kept if i not in ids]:
            kept = self._kept.pop(request_id)
            _unlink(kept.record, kept.audio)

    async def _answer(self, request: Request) -> None:
        """Cut a valid `request` (unless kept from before), store the audio, then the
        result; or refuse it when the device holds none of its range."""
        kept = self._kept.get(request.id)
        if kept is None:
            ring = self.ring
            rate = request.rate or ring.rate
            channels = request.channels or ring.channels
            oldest = oldest_held(ring, self.spool)
            why = not_held(request, oldest)
            if why is not None or oldest is None:
                await self._refuse(request, why or "nothing_held")
                return
            plan = plan_held(ring, self.spool, request.start_ts, request.end_ts)
            if plan.audio_frames == 0:
                await self._refuse(request, f"nothing_held: no audio held between "
                                            f"{request.start} and {request.end}")
                return
            free = (await self._io.run(shutil.disk_usage, self.work_dir)).free
            why = too_large(request.format, plan.frames_at(rate), rate, channels, free)
            if why is not None:
                await self._refuse(request, why)
                return
            try:
                kept = await self._cut(request, plan, rate, channels, oldest)
            except RangeTooLong as exc:
                await self._refuse(request, f"too_long: {exc}")
                return
            self._kept[request.id] = kept
        await self._store_audio(kept)
        if await self._put_result(kept.result):
            self.stats.requests_answered += 1
            self.stats.requests_partial += kept.result.state == "partial"
            log.info("fleet request answered id=%s state=%s key=%s bytes=%d", request.id,
                     kept.result.state, kept.result.key, kept.result.bytes)
        await self._done(request.id)

    async def _refuse(self, request: Request, reason: str) -> None:
        result = Result(id=request.id, device=self.device_id, state="refused", reason=reason,
                        start=request.start, end=request.end, format=request.format,
                        finished=iso_utc(self.clock.utc()))
        if await self._put_result(result):
            self.stats.requests_refused += 1
            log.info("fleet request refused id=%s reason=%r", request.id, reason)
        await self._done(request.id)

    async def _put_result(self, result: Result) -> bool:
        """Write `result` unless one is there already; whether this one was written."""
        assert self.objects is not None
        etag = await self.objects.put(result_key(self.device_id, result.id), encode(result),
                                      _JSON, if_none_match=True)
        if etag is None:
            self.stats.results_found += 1
            return False
        return True

    # -- cutting and storing an answer -------------------------------------------

    async def _cut(self, request: Request, plan: AudioPlan, rate: int, channels: int,
                   oldest: float) -> _Kept:
        """The audio of `plan` in a durable file under `work_dir`, and its result record
        next to it (written last: a record means the audio is complete)."""
        ring = self.ring
        renderer = open_renderer(plan, request.format, rate=rate, channels=channels,
                                 device_id=self.device_id)
        key = audio_key(self.device_id, request.id, request.format)
        audio = self.work_dir / Path(key).name
        part = audio.with_name(audio.name + ".part")
        f = await self._io.run(_open_write, part)
        try:
            sink = FileSink(f, self._io)
            try:
                await produce(plan, renderer, sink, ring=ring,
                              read_segment=spool_reader(self.spool, ring.rate),
                              encode_runner=self._encode, io_runner=self._io)
            except Abort as exc:
                raise _Failed(str(exc)) from None
            await self._io.run(sync_file, f)
        finally:
            await self._io.run(f.close)
        await self._io.run(os.replace, part, audio)
        await self._io.run(fsync_dir, self.work_dir)
        gaps = answer_gaps(plan, oldest, ring.gap_tolerance)
        result = Result(
            id=request.id, device=self.device_id, state="partial" if gaps else "ok",
            reason=(f"{len(plan.gaps)} gaps, the first {len(gaps)} listed"
                    if len(plan.gaps) > len(gaps) else ""),
            start=request.start, end=request.end, format=request.format, key=key, rate=rate,
            channels=channels, samples=renderer.frames_out, bytes=sink.bytes,
            sha256=sink.sha256, first_utc=iso_utc(plan.first_utc or plan.start),
            last_utc=iso_utc(plan.last_utc or plan.start), gaps=gaps,
            finished=iso_utc(self.clock.utc()))
        record = self.work_dir / f"{request.id}.json"
        await self._io.run(write_atomic, record, encode(result))
        return _Kept(result, audio, record)

    async def _store_audio(self, kept: _Kept) -> None:
        """PUT the kept audio once; "already there" (a run killed after this step) is
        success, another object under the key is a failure."""
        assert self._bucket is not None and self._client is not None
        result = kept.result
        decision = await self._bucket.put_once(
            self._client, result.key, lambda: self._body(kept.audio, result.bytes),
            result.bytes, result.sha256, AUDIO_FORMATS[result.format],
            {"device": self.device_id, "request": result.id})
        if decision.verdict is Verdict.ALREADY:
            self.stats.audio_already += 1
        elif decision.verdict is Verdict.QUARANTINE:
            raise _Failed(decision.reason)
        elif decision.verdict is not Verdict.SYNCED:
            raise _Retry(decision.reason)

    async def _body(self, path: Path, size: int) -> AsyncIterator[bytes]:
        f = await self._io.run(_open_read, path)
        try:
            sent = 0
            while sent < size:
                data: bytes = await self._io.run(f.read, min(_CHUNK, size - sent))
                if not data:
                    raise OSError(f"{path} shrank while it was sent, at byte {sent}")
                sent += len(data)
                yield data
        finally:
            await self._io.run(f.close)

    # -- heartbeats ----------------------------------------------------------------

    async def _heartbeats(self) -> None:
        """A heartbeat every ``heartbeat_seconds``, and at once on a health change; a
        failed one is tried again after ``poll_seconds`` at the latest."""
        cfg = self.config
        sent_state: Hashable = None
        due = trio.current_time()
        while True:
            state = self.health()
            now = trio.current_time()
            if state != sent_state or now >= due:
                try:
                    await self.send_heartbeat(self.figures())
                except (S3Error, httpx.HTTPError, TypeError) as exc:
                    self._failed("heartbeat", exc)
                    due = now + min(cfg.heartbeat_seconds, cfg.poll_seconds)
                else:
                    self._ok("heartbeat")
                    due = now + cfg.heartbeat_seconds
                sent_state = state  # a failed one is not retried every second
            await trio.sleep(min(HEALTH_CHECK_SECONDS, cfg.heartbeat_seconds))

    async def send_heartbeat(self, figures: Mapping[str, Any]) -> None:
        """PUT ``status/{device}.json`` (overwritten in place)."""
        assert self.objects is not None
        oldest = oldest_held(self.ring, self.spool)
        beat = Heartbeat(device=self.device_id, sent=iso_utc(self.clock.utc()),
                         version=self.version, heartbeat_seconds=self.config.heartbeat_seconds,
                         poll_seconds=self.config.poll_seconds,
                         oldest_audio=iso_utc(oldest) if oldest is not None else "",
                         **figures)
        await self.objects.put(status_key(self.device_id), encode(beat), _JSON)
        self.stats.heartbeats += 1
        self.stats.last_heartbeat_utc = beat.sent


def _open_write(path: Path) -> BinaryIO:
    return path.open("wb")


def _open_read(path: Path) -> BinaryIO:
    return path.open("rb")


def _unlink(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class FleetCollector:
    """The fleet device's counters, for the agent's metrics registry."""

    def __init__(self, stats: FleetStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        for name, doc, value in (
            ("polls", "Mailbox reads.", s.polls),
            ("polls_not_modified", "Mailbox reads answered 304 (unchanged).", s.not_modified),
            ("requests_answered", "Retrieval requests answered with audio.",
             s.requests_answered),
            ("requests_partial", "Of those, answers with gaps.", s.requests_partial),
            ("requests_refused", "Retrieval requests refused.", s.requests_refused),
            ("requests_failed", "Attempts at answering that failed (tried again).",
             s.requests_failed),
            ("requests_expired", "Requests older than fleet.keep_results_hours, skipped.",
             s.requests_expired),
            ("heartbeats", "Heartbeats written.", s.heartbeats),
            ("errors", "Failed mailbox reads, answers and heartbeats.", s.errors),
        ):
            yield CounterMetricFamily(f"edge_agent_fleet_{name}", doc, value=value)

