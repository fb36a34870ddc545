"""The uploader's decisions, backoff and wake-up logic, in virtual time.

These run under Trio's MockClock (autojump) with `httpx.MockTransport` and an
in-memory spool over real files, so every delay is asserted exactly. The same
uploader against the real backend and the real spool is in
test_uploader_backend.py.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from edge_agent.blocking import InlineRunner
from edge_agent.clock import ManualClock
from edge_agent.config import ConfigError, UploadConfig, validate
from edge_agent.uploader import Uploader
from edge_agent.wire import (
    Verdict,
    check_url_template,
    content_digest,
    judge_response,
    parse_digest_header,
    parse_retry_after,
    stored_sha256,
)

URL = "http://backend.test/v1/devices/{device}/segments/{segment}"
DEVICE = "dev-1"


@dataclass(frozen=True)
class Meta:
    id: str
    start_utc: str
    end_utc: str
    frames: int
    rate: int
    content_type: str
    bytes: int
    sha256: str


class FakeSpool:
    """Sealed segment files plus their state, with `spool.Spool`'s interface."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.metas: dict[str, Meta] = {}
        self.state: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.pending_calls = 0
        self.fail_mark_synced = 0
        self._wake = trio.Event()

    def add(self, seg_id: str, body: bytes, seconds: float = 5.0) -> Meta:
        self.audio_path(seg_id).write_bytes(body)
        meta = Meta(seg_id, f"{seg_id}-start", f"{seg_id}-end", int(seconds * 16000), 16000,
                    "audio/ogg", len(body), hashlib.sha256(body).hexdigest())
        self.metas[seg_id] = meta
        self.state[seg_id] = "sealed"
        self._wake.set()
        return meta

    def evict(self, seg_id: str) -> None:
        self.audio_path(seg_id).unlink()
        del self.metas[seg_id], self.state[seg_id]

    def pending(self) -> list[Meta]:
        self.pending_calls += 1
        return [m for i, m in sorted(self.metas.items()) if self.state[i] == "sealed"]

    def audio_path(self, segment_id: str) -> Path:
        return self.root / f"{segment_id}.opus"

    def verify(self, segment_id: str) -> bool:
        try:
            data = self.audio_path(segment_id).read_bytes()
        except FileNotFoundError:
            return False
        return hashlib.sha256(data).hexdigest() == self.metas[segment_id].sha256

    def mark_synced(self, segment_id: str) -> None:
        if self.fail_mark_synced:
            self.fail_mark_synced -= 1
            raise OSError(errno.EIO, "state write failed (injected)")
        self.state[segment_id] = "synced"

    def quarantine(self, segment_id: str, reason: str) -> None:
        self.state[segment_id] = "quarantined"
        self.reasons[segment_id] = reason

    async def wait_pending(self) -> None:
        while not any(s == "sealed" for s in self.state.values()):
            await self._wake.wait()
            self._wake = trio.Event()


@dataclass
class Seen:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes


Action = int | httpx.Response | Exception | Callable[[httpx.Request], Awaitable[httpx.Response]]


@dataclass
class FakeBackend:
    """A backend with the reference store's semantics, plus scripted answers."""

    objects: dict[str, bytes] = field(default_factory=dict)
    script: list[Action] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = request.content
        self.seen.append(Seen(trio.current_time(), request.url.path, dict(request.headers),
                              body))
        if self.script:
            action = self.script.pop(0)
            if isinstance(action, Exception):
                raise action
            if isinstance(action, int):
                return httpx.Response(action, text=f"scripted {action}")
            if isinstance(action, httpx.Response):
                return action
            return await action(request)
        return self.store(request.url.path.rsplit("/", 1)[1], body)

    def store(self, seg_id: str, body: bytes) -> httpx.Response:
        digest = hashlib.sha256(body).hexdigest()
        headers = {"Repr-Digest": content_digest(digest)}
        if seg_id in self.objects:
            same = hashlib.sha256(self.objects[seg_id]).hexdigest() == digest
            held = {"Repr-Digest": content_digest(hashlib.sha256(self.objects[seg_id])
                                                  .hexdigest())}
            return httpx.Response(412 if same else 409, headers=held)
        self.objects[seg_id] = body
        return httpx.Response(201, headers=headers)

    def times(self) -> list[float]:
        return [s.at for s in self.seen]


def make(spool: FakeSpool, backend: FakeBackend, *, seed: int = 7,
         clock: ManualClock | None = None, **cfg: Any) -> Uploader:
    config = UploadConfig(enabled=True, url=URL, **{
        "backoff_initial_seconds": 1.0, "backoff_max_seconds": 60.0, "timeout_seconds": 30.0,
        **cfg})
    return Uploader(config, DEVICE, spool, clock=clock or ManualClock(),
                    rng=random.Random(seed), transport=httpx.MockTransport(backend),
                    runner=InlineRunner())


def expected_delays(seed: int, n: int, initial: float = 1.0, cap: float = 60.0) -> list[float]:
    """Full jitter: uniform in (0, min(cap, initial * 2**k)]."""
    rng = random.Random(seed)
    return [min(cap, initial * 2.0**k) * (1.0 - rng.random()) for k in range(n)]


async def until(predicate: Callable[[], bool], limit: float = 10_000) -> None:
    """Wait (in virtual time, checking every 0.25 s) until `predicate()` holds."""
    with trio.fail_after(limit):
        while True:
            if predicate():
                return
            await trio.sleep(0.25)


def body(n: int, fill: int = 1) -> bytes:
    return b"OggS" + bytes([fill]) * n


# ----------------------------------------------------------------------------
# The happy path and the request


async def test_uploads_oldest_first_with_digest_and_metadata(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    spool, backend = FakeSpool(tmp_path), FakeBackend()
    metas = [spool.add(f"2030010100{i}000Z", body(70_000 + i, i)) for i in (2, 0, 1)]
    up = make(spool, backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    assert [s.path.rsplit("/", 1)[1] for s in backend.seen] == sorted(m.id for m in metas)
    first = backend.seen[0]
    meta = spool.metas[first.path.rsplit("/", 1)[1]]
    assert first.path == f"/v1/devices/{DEVICE}/segments/{meta.id}"
    assert first.body == spool.audio_path(meta.id).read_bytes()
    assert parse_digest_header(first.headers["content-digest"])["sha-256"].hex() == meta.sha256
    assert first.headers["if-none-match"] == "*"
    assert first.headers["content-type"] == "audio/ogg"
    assert first.headers["content-length"] == str(meta.bytes)
    assert first.headers["edge-device-id"] == DEVICE
    assert first.headers["edge-segment-start"] == meta.start_utc
    assert first.headers["edge-segment-end"] == meta.end_utc
    assert set(spool.state.values()) == {"synced"}
    assert (up.stats.successes, up.stats.attempts, up.stats.failures) == (3, 3, 0)
    assert up.stats.bytes_sent == sum(m.bytes for m in metas)
    assert up.stats.backlog_segments == 0 and up.degraded() is None


async def test_a_bearer_token_is_sent_when_configured(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    spool, backend = FakeSpool(tmp_path / "spool"), FakeBackend()
    spool.add("20300101T000000Z", body(10))
    up = make(spool, backend, token_file=str(tmp_path / "token"))
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    assert backend.seen[0].headers["authorization"] == "Bearer s3cret"


# ----------------------------------------------------------------------------
# Wake-up: idle costs nothing, a new segment goes out at once


async def test_a_new_segment_wakes_the_idle_uploader_at_once(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    spool, backend = FakeSpool(tmp_path), FakeBackend()
    up = make(spool, backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        start = trio.current_time()
        await trio.sleep(3600)
        # One look at the spool, then asleep until a seal: no polling for an hour.
        assert spool.pending_calls == 1
        assert backend.seen == []
        added = [trio.current_time()]
        spool.add("20300101T000000Z", body(100))
        await until(lambda: not spool.pending())
        await trio.sleep(3600)
        added.append(trio.current_time())
        spool.add("20300101T000100Z", body(100))
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    assert added[0] - start == 3600.0
    assert backend.times() == added


async def test_a_seal_in_the_real_spool_wakes_the_uploader_at_once(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    from support.spool_rig import open_spool, seal

    spool, backend = open_spool(tmp_path / "spool"), FakeBackend()
    up = Uploader(UploadConfig(enabled=True, url=URL), DEVICE, spool,
                  transport=httpx.MockTransport(backend), runner=InlineRunner())
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await trio.sleep(600)
        sealed_at = trio.current_time()
        meta = seal(spool)
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    assert backend.times() == [sealed_at]
    assert backend.objects == {meta.id: spool.audio_path(meta.id).read_bytes()}
    assert spool.get(meta.id) == (meta, "synced")


# ----------------------------------------------------------------------------
# Backoff


async def test_backoff_is_capped_full_jitter_and_resets_after_a_success(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    spool, backend = FakeSpool(tmp_path), FakeBackend()
    spool.add("20300101T000000Z", body(100))
    spool.add("20300101T000100Z", body(100, 2))
    # Eight failures (503, network errors, 408, 500) then success for the first
    # segment; one failure then success for the second.
    backend.script = [503, httpx.ConnectError("refused"), 408, 502, httpx.ReadError("reset"),
                      503, 500, 504, 201, 503]
    up = make(spool, backend, seed=11, backoff_initial_seconds=0.5, backoff_max_seconds=20)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    times = backend.times()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    delays = expected_delays(11, 9, initial=0.5, cap=20)
    # Gaps 1-8: growing; after the success (request 9) the next segment is sent at
    # once; its failure (request 10) backs off from the start again (rng continues).
    assert gaps[:8] == pytest.approx(delays[:8])
    assert gaps[8] == 0.0
    rng = random.Random(11)
    for _ in range(8):
        rng.random()
    assert gaps[9] == pytest.approx(0.5 * (1 - rng.random()))
    assert max(gaps) <= 20
    assert up.stats.failures == 9 and up.stats.successes == 2
    assert up.stats.consecutive_failures == 0


async def test_retry_after_is_honoured_in_seconds_and_as_a_date_and_capped(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    clock = ManualClock()
    when = format_datetime(datetime.fromtimestamp(clock.utc_now + 45, UTC), usegmt=True)
    spool, backend = FakeSpool(tmp_path), FakeBackend()
    spool.add("20300101T000000Z", body(100))
    backend.script = [
        httpx.Response(429, headers={"Retry-After": "30"}),
        httpx.Response(503, headers={"Retry-After": when}),
        httpx.Response(503, headers={"Retry-After": "86400"}),
    ]
    up = make(spool, backend, clock=clock, backoff_max_seconds=120)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    times = backend.times()
    assert [b - a for a, b in itertools.pairwise(times)] == [30.0, 45.0, 120.0]


async def test_each_upload_is_bounded_by_the_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    spool, backend = FakeSpool(tmp_path), FakeBackend()
    spool.add("20300101T000000Z", body(100))
    backend.script = [hang]
    up = make(spool, backend, seed=3, timeout_seconds=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    times = backend.times()
    assert times[1] - times[0] == pytest.approx(30 + expected_delays(3, 1)[0])
    assert "no answer within 30 s" in (up.stats.last_error or "")


async def test_bandwidth_cap_paces_the_body(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    spool, backend = FakeSpool(tmp_path), FakeBackend()
    spool.add("20300101T000000Z", body(99_996))  # 100 000 bytes
    up = make(spool, backend, max_bytes_per_second=10_000, timeout_seconds=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        start = trio.current_time()
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    # MockTransport sees the request once the whole body was read; the 10 s are
    # not cut short by the 5 s timeout, which counts from the end of the pacing.
    assert backend.seen[0].at - start == pytest.approx(10.0)
    assert len(backend.seen) == 1 and len(backend.seen[0].body) == 100_000


async def test_reconfigure_applies_url_and_token_before_the_next_upload(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    (tmp_path / "token").write_text("new-token\n")
    spool, backend = FakeSpool(tmp_path / "spool"), FakeBackend()
    up = make(spool, backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        spool.add("20300101T000000Z", body(10))
        await until(lambda: not spool.pending())
        up.reconfigure(UploadConfig(enabled=True, url="http://other.test/s/{segment}",
                                    token_file=str(tmp_path / "token")))
        spool.add("20300101T000100Z", body(10))
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    assert [s.path for s in backend.seen] == [
        f"/v1/devices/{DEVICE}/segments/20300101T000000Z", "/s/20300101T000100Z"]
    assert "authorization" not in backend.seen[0].headers
    assert backend.seen[1].headers["authorization"] == "Bearer new-token"
    with pytest.raises(ValueError, match="placeholder"):
        up.reconfigure(UploadConfig(enabled=True, url="http://other.test/s/"))


# ----------------------------------------------------------------------------
# Outcomes


async def test_already_present_with_our_digest_is_success(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    spool, backend = FakeSpool(tmp_path), FakeBackend()
    meta = spool.add("20300101T000000Z", body(100))
    backend.objects[meta.id] = spool.audio_path(meta.id).read_bytes()
    up = make(spool, backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    assert spool.state[meta.id] == "synced"
    assert (up.stats.already_present, up.stats.successes) == (1, 0)


async def test_lost_acknowledgement_is_one_object(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    spool, backend = FakeSpool(tmp_path), FakeBackend()
    meta = spool.add("20300101T000000Z", body(5000))

    async def store_then_drop(request: httpx.Request) -> httpx.Response:
        backend.store(meta.id, request.content)
        raise httpx.RemoteProtocolError("connection closed before the response")

    backend.script = [store_then_drop]
    up = make(spool, backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    assert list(backend.objects) == [meta.id]
    assert spool.state[meta.id] == "synced"
    assert (up.stats.failures, up.stats.already_present, up.stats.quarantined) == (1, 1, 0)


async def test_a_failed_local_state_write_is_retried_not_duplicated(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    spool, backend = FakeSpool(tmp_path), FakeBackend()
    meta = spool.add("20300101T000000Z", body(5000))
    spool.fail_mark_synced = 2
    up = make(spool, backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    assert len(backend.seen) == 3 and list(backend.objects) == [meta.id]
    assert spool.state[meta.id] == "synced"
    assert "state write failed" in (up.stats.last_error or "")
    # Stored by the first PUT; recorded only after the third (412, same digest).
    assert (up.stats.successes, up.stats.already_present, up.stats.failures) == (0, 1, 2)


async def test_a_different_body_under_the_same_id_is_quarantined(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    spool, backend = FakeSpool(tmp_path), FakeBackend()
    meta = spool.add("20300101T000000Z", body(100))
    other = spool.add("20300101T000100Z", body(100, 5))
    backend.objects[meta.id] = b"somebody else's audio"
    up = make(spool, backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    assert spool.state == {meta.id: "quarantined", other.id: "synced"}
    assert "different body" in spool.reasons[meta.id]
    assert backend.objects[meta.id] == b"somebody else's audio"
    assert up.stats.quarantined == 1


@pytest.mark.parametrize(("status", "text"), [(400, "bad segment id"), (404, "no such device"),
                                              (413, "too large"), (418, "teapot")])
async def test_other_4xx_quarantine_with_status_and_body(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, status: int, text: str,
) -> None:
    spool, backend = FakeSpool(tmp_path), FakeBackend()
    meta = spool.add("20300101T000000Z", body(100))
    nxt = spool.add("20300101T000100Z", body(100, 2))
    backend.script = [httpx.Response(status, text=text * 100)]
    up = make(spool, backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    assert spool.state == {meta.id: "quarantined", nxt.id: "synced"}
    reason = spool.reasons[meta.id]
    assert f"status={status}" in reason and text in reason and len(reason) < 400
    assert backend.times()[1] == backend.times()[0]  # no backoff after a quarantine


async def test_a_corrupt_segment_is_quarantined_and_never_sent(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    spool, backend = FakeSpool(tmp_path), FakeBackend()
    bad = spool.add("20300101T000000Z", body(1000))
    truncated = spool.add("20300101T000100Z", body(1000, 2))
    good = spool.add("20300101T000200Z", body(1000, 3))
    data = bytearray(spool.audio_path(bad.id).read_bytes())
    data[500] ^= 0x10  # one flipped bit
    spool.audio_path(bad.id).write_bytes(bytes(data))
    with spool.audio_path(truncated.id).open("r+b") as f:
        f.truncate(600)
    up = make(spool, backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    assert [s.path.rsplit("/", 1)[1] for s in backend.seen] == [good.id]
    assert spool.state == {bad.id: "quarantined", truncated.id: "quarantined",
                           good.id: "synced"}
    assert "digest" in spool.reasons[bad.id]
    assert (up.stats.corrupt, up.stats.quarantined) == (2, 2)


async def test_a_segment_evicted_while_backing_off_is_skipped(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    spool, backend = FakeSpool(tmp_path), FakeBackend()
    old = spool.add("20300101T000000Z", body(100))
    new = spool.add("20300101T000100Z", body(100, 2))
    backend.script = [503]
    up = make(spool, backend, seed=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await until(lambda: len(backend.seen) == 1)
        spool.evict(old.id)  # the quota took it while the uploader waited
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    assert [s.path.rsplit("/", 1)[1] for s in backend.seen] == [old.id, new.id]
    assert spool.state == {new.id: "synced"}
    assert up.stats.quarantined == 0


async def test_backlog_and_degraded_while_the_backend_is_down(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    spool, backend = FakeSpool(tmp_path), FakeBackend()
    for i in range(4):
        spool.add(f"2030010100{i}000Z", body(1000), seconds=5.0)
    backend.script = [httpx.ConnectError("refused")] * 3
    up = make(spool, backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        await until(lambda: len(backend.seen) == 2)
        assert up.degraded() is None  # a failure or two is routine
        await until(lambda: len(backend.seen) == 3)
        assert up.stats.backlog_segments == 4
        assert up.stats.backlog_bytes == 4 * 1004
        assert up.stats.backlog_seconds == pytest.approx(20.0)
        assert "3 failed upload attempts in a row" in (up.degraded() or "")
        assert up.stats.next_attempt_at is not None
        await until(lambda: not spool.pending())
        nursery.cancel_scope.cancel()
    assert up.degraded() is None
    assert up.stats.backlog_segments == 0


# ----------------------------------------------------------------------------
# The protocol without I/O


def test_content_digest_matches_rfc_9530_example() -> None:
    # RFC 9530, section 2: the digest of the content {"hello": "world"}.
    sha = hashlib.sha256(b'{"hello": "world"}').hexdigest()
    assert content_digest(sha) == "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
    parsed = parse_digest_header(
        "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwE"
        "mTHWXvJwew==:, sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:")
    assert parsed["sha-256"].hex() == sha
    assert parse_digest_header("sha-256=nonsense") == {}
    assert stored_sha256({"etag": f'"{sha}"'}) == sha


def test_judge_response() -> None:
    sha = "ab" * 32
    mine = {"repr-digest": content_digest(sha)}
    theirs = {"repr-digest": content_digest("cd" * 32)}
    assert judge_response(201, {}, "", sha, 0).verdict is Verdict.SYNCED
    assert judge_response(204, {}, "", sha, 0).verdict is Verdict.SYNCED
    assert judge_response(412, mine, "", sha, 0).verdict is Verdict.ALREADY
    assert judge_response(409, mine, "", sha, 0).verdict is Verdict.ALREADY
    assert judge_response(412, theirs, "", sha, 0).verdict is Verdict.QUARANTINE
    assert judge_response(412, {}, "", sha, 0).verdict is Verdict.QUARANTINE
    for status in (401, 403, 408, 429, 500, 503, 599):
        assert judge_response(status, {}, "", sha, 0).verdict is Verdict.RETRY
    assert judge_response(503, {"retry-after": "12"}, "", sha, 0).retry_after == 12.0
    for status in (301, 400, 404, 410, 422):
        decision = judge_response(status, {}, "nope", sha, 0)
        assert decision.verdict is Verdict.QUARANTINE
        assert f"status={status}" in decision.reason and "nope" in decision.reason


def test_parse_retry_after() -> None:
    assert parse_retry_after("120", 0) == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412490.0) == 0.0
    assert parse_retry_after("soon", 0) is None
    assert parse_retry_after(None, 0) is None


def test_url_template_is_checked() -> None:
    assert check_url_template("https://b.example/v1/{device}/{segment}") is None
    assert "placeholder" in (check_url_template("https://b.example/v1/{device}") or "")
    assert "{dev}" in (check_url_template("https://b.example/{dev}/{segment}") or "")
    assert "braces" in (check_url_template("https://b.example/{segment") or "")
    assert "http" in (check_url_template("ftp://b.example/{segment}") or "")
    with pytest.raises(ValueError, match=r"upload\.url"):
        Uploader(UploadConfig(url="http://x/{seg}"), DEVICE, FakeSpool.__new__(FakeSpool))


def test_config_check_names_a_bad_upload_url() -> None:
    with pytest.raises(ConfigError) as info:
        validate({"upload": {"enabled": True, "url": "http://b.example/v1/{device}"}})
    assert any(p.startswith("upload.url: ") and "{segment}" in p for p in info.value.problems)
    validate({"upload": {"enabled": True, "url": "http://b.example/{device}/{segment}"}})


def test_config_check_wants_segments_for_uploads() -> None:
    with pytest.raises(ConfigError) as info:
        validate({"segments": {"enabled": False},
                  "upload": {"enabled": True, "url": "http://b.example/{device}/{segment}"}})
    assert info.value.problems == [
        "upload.enabled: expected segments.enabled = true (the uploader sends the spooled "
        "segments)"]
