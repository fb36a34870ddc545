"""The uploader with the real spool against the real reference backend on loopback.

Real files, real fsync, real HTTP through Hypercorn, real connection faults (the
backend's TCP front refuses, resets mid-body, drops responses after storing).
What is checked is what a fleet operator cares about: every sealed segment ends
up on the backend exactly once with its digest, whatever the network did.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from edge_agent.agent import Agent
from edge_agent.clock import ManualClock
from edge_agent.config import SegmentsConfig, UploadConfig, validate
from edge_agent.demo import run_demo
from edge_agent.fs import FileOps
from edge_agent.reference import Backend, list_stored_segments
from edge_agent.spool import Spool
from edge_agent.uploader import Uploader
from edge_agent.wire import SegmentMeta, content_digest

from support.faults import Faults, run_backend
from support.spool_rig import DEVICE, open_spool, seal
from support.waiting import until

RATE = 16000


# ----------------------------------------------------------------------------
# Helpers








def upload_config(base: str, **kw: Any) -> UploadConfig:
    return UploadConfig(enabled=True, url=f"{base}/v1/devices/{{device}}/segments/{{segment}}",
                        **{"backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.1,
                           "timeout_seconds": 5.0, **kw})


def assert_on_backend_exactly_once(backend: Backend, metas: list[SegmentMeta]) -> None:
    """Every segment stored once, digest and bytes equal to the spool's, nothing else."""
    held = {s.id: s for s in list_stored_segments(backend.data_dir, DEVICE)}
    assert sorted(held) == sorted(m.id for m in metas)
    for m in metas:
        stored = held[m.id]
        assert stored.sha256 == m.sha256
        assert hashlib.sha256(stored.path.read_bytes()).hexdigest() == m.sha256
        assert backend.segment_stats.created[(DEVICE, m.id)] == 1
    assert backend.segment_stats.digest_mismatches == 0
    assert list((backend.data_dir / "segments").rglob(".*")) == []  # no temp files



async def drain(uploader: Uploader, spool: Spool, limit: float = 20.0) -> None:
    """Run the uploader until the spool has nothing pending."""
    with trio.fail_after(limit):
        async with trio.open_nursery() as nursery:
            await nursery.start(uploader.run)
            await until(lambda: not spool.pending())
            nursery.cancel_scope.cancel()



# ----------------------------------------------------------------------------
# Lost acknowledgement, repeats, conflicts


async def test_lost_acknowledgement_gives_no_duplicate_and_no_mismatch(
    tmp_path: Path, served: tuple[Backend, str],
) -> None:
    backend, base = served
    spool = open_spool(tmp_path / "spool")
    metas = [seal(spool) for _ in range(3)]
    # The first store is not acknowledged, nor is the answer to its repeat (412).
    backend.faults.drop_response = 2
    up = Uploader(upload_config(base), DEVICE, spool)
    await drain(up, spool)
    assert_on_backend_exactly_once(backend, metas)
    assert backend.segment_stats.already_present == 2
    assert (up.stats.failures, up.stats.already_present, up.stats.successes) == (2, 1, 2)
    assert spool.stats.synced_segments == 3


async def test_same_segment_three_times_concurrently_and_in_a_row_is_one_object(
    tmp_path: Path, served: tuple[Backend, str],
) -> None:
    backend, base = served
    first = open_spool(tmp_path / "s0")
    meta = seal(first)
    roots = [tmp_path / f"s{i}" for i in range(1, 7)]
    for root in roots:  # the same sealed segment in six independent spools
        shutil.copytree(tmp_path / "s0", root)
    spools = [open_spool(root) for root in roots]
    assert all(s.pending() == [meta] for s in spools)

    async with trio.open_nursery() as nursery:
        for spool in spools[:3]:
            nursery.start_soon(drain, Uploader(upload_config(base), DEVICE, spool), spool)
    for spool in spools[3:]:
        await drain(Uploader(upload_config(base), DEVICE, spool), spool)

    assert all(s.pending() == [] and s.stats.synced_segments == 1 for s in spools)
    assert_on_backend_exactly_once(backend, [meta])
    assert backend.segment_stats.stored == 1
    assert backend.segment_stats.already_present == 5


async def test_a_different_body_under_the_same_id_is_quarantined_never_overwritten(
    tmp_path: Path, served: tuple[Backend, str],
) -> None:
    backend, base = served
    spool = open_spool(tmp_path / "spool")
    clash, fine = seal(spool), seal(spool)
    squatter = b"OggS not the same audio" * 50
    async with httpx.AsyncClient() as client:
        r = await client.put(f"{base}/v1/devices/{DEVICE}/segments/{clash.id}",
                             content=squatter, headers={
                                 "Content-Digest": content_digest(
                                     hashlib.sha256(squatter).hexdigest())})
        assert r.status_code == 201
    up = Uploader(upload_config(base), DEVICE, spool)
    await drain(up, spool)
    got = spool.get(clash.id)
    assert got is not None and got[1] == "quarantined"
    reason = (spool.audio_path(clash.id).parent / "reason.txt").read_text()
    assert "different body" in reason and clash.sha256 in reason
    held = {s.id: s for s in list_stored_segments(backend.data_dir, DEVICE)}
    assert held[clash.id].path.read_bytes() == squatter
    assert held[fine.id].sha256 == fine.sha256
    assert up.stats.quarantined == 1 and backend.segment_stats.conflicts == 1


async def test_a_rotten_segment_is_quarantined_and_never_sent(
    tmp_path: Path, served: tuple[Backend, str],
) -> None:
    backend, base = served
    spool = open_spool(tmp_path / "spool")
    rotten, fine = seal(spool), seal(spool)
    path = spool.audio_path(rotten.id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    up = Uploader(upload_config(base), DEVICE, spool)
    await drain(up, spool)
    assert [s.id for s in list_stored_segments(backend.data_dir, DEVICE)] == [fine.id]
    assert backend.segment_stats.puts == 1
    assert up.stats.corrupt == 1 and spool.stats.integrity_failures == 1
    got = spool.get(rotten.id)
    assert got is not None and got[1] == "quarantined"


# ----------------------------------------------------------------------------
# A backend that flaps for the whole run


@pytest.mark.slow
async def test_flapping_backend_everything_sealed_is_synced_once(
    tmp_path: Path, served: tuple[Backend, str],
) -> None:
    backend, base = served
    spool = open_spool(tmp_path / "spool")
    up = Uploader(upload_config(base, timeout_seconds=1.0), DEVICE, spool,
                  rng=random.Random(5))
    faults = backend.faults
    rng = random.Random(1234)
    metas: list[SegmentMeta] = []
    kinds: dict[str, int] = {}

    async def chaos(done: trio.Event) -> None:
        while not done.is_set():
            kind = rng.choice(["down", "503", "reset", "drop", "slow", "calm"])
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind == "down":
                faults.down = True
                await trio.sleep(rng.uniform(0.05, 0.2))
                faults.down = False
            elif kind == "503":
                faults.retry_after = 0
                faults.unavailable = rng.randint(2, 6)
            elif kind == "reset":
                faults.reset_mid_body = rng.randint(1, 3)
            elif kind == "drop":
                faults.drop_response = rng.randint(1, 3)
            elif kind == "slow":
                faults.delay_seconds = rng.uniform(0.05, 0.2)
            await trio.sleep(rng.uniform(0.05, 0.15))
            faults.delay_seconds = 0.0

    async def record(done: trio.Event) -> None:
        for _ in range(30):
            metas.append(await trio.to_thread.run_sync(seal, spool, 4.0))
            await trio.sleep(0.03)
        done.set()

    done = trio.Event()
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(chaos, done)
            await nursery.start(up.run)
            await record(done)
            faults.down = False
            await until(lambda: not spool.pending())
            nursery.cancel_scope.cancel()
    faults.down = False

    st = backend.segment_stats
    print(f"\nflapping run: faults {kinds}; uploader attempts={up.stats.attempts} "
          f"failures={up.stats.failures} already_present={up.stats.already_present}; "
          f"backend incomplete={st.incomplete} already_present={st.already_present}")
    assert_on_backend_exactly_once(backend, metas)
    assert up.stats.quarantined == 0 and spool.stats.synced_segments == 30
    assert up.stats.failures > 0  # the faults did bite


# ----------------------------------------------------------------------------
# Crash-point sweep over the upload path


class Killed(BaseException):
    """Stands for the process dying at this point: no handler in the agent runs."""


class Steps:
    """Counts the I/O steps of the upload path; the N-th one fails or "kills"."""

    def __init__(self, fault_at: int, mode: str) -> None:
        self.fault_at = fault_at
        self.mode = mode
        self.armed = False
        self.count = 0
        self.names: list[str] = []
        self.fired: str | None = None

    def step(self, name: str, fail: Callable[[], Exception]) -> None:
        if not self.armed:
            return
        self.count += 1
        self.names.append(name)
        if self.count == self.fault_at:
            self.fired = name
            if self.mode == "kill":
                raise Killed(name)
            raise fail()


class SteppedFileOps(FileOps):
    def __init__(self, steps: Steps) -> None:
        self.steps = steps

    def before(self, op: str, path: str) -> None:
        self.steps.step(f"disk:{op}", lambda: OSError(errno.EIO, f"injected at {op}", path))


class SteppedSpool(Spool):
    steps: Steps

    def verify(self, segment_id: str) -> bool:
        self.steps.step("verify", lambda: OSError(errno.EIO, "injected at verify"))
        return super().verify(segment_id)


class SteppedTransport(httpx.AsyncBaseTransport):
    """The real HTTP transport, with a step before the request and one at the
    acknowledgement (after the backend answered: it has stored the body)."""

    def __init__(self, steps: Steps) -> None:
        self.steps = steps
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.steps.step("http:request", lambda: httpx.ConnectError("injected", request=request))
        response = await self.inner.handle_async_request(request)
        await response.aread()
        try:
            self.steps.step("http:ack",
                            lambda: httpx.ReadError("injected: ack lost", request=request))
        except BaseException:
            await response.aclose()
            raise
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.slow
async def test_crash_point_sweep_over_the_upload_path(tmp_path: Path) -> None:
    """For N = 1, 2, ...: the N-th I/O step of uploading two segments fails (then
    the uploader carries on) or kills the process (then it restarts from disk),
    until a run completes without reaching step N. After each: every segment on
    the backend exactly once with its digest, nothing left pending, no temp file."""
    template = tmp_path / "template"
    sealer = open_spool(template)
    metas = [seal(sealer, 1.0) for _ in range(2)]
    report: dict[str, int] = {}
    for mode in ("fail", "kill"):
        for n in itertools.count(1):
            case = tmp_path / f"{mode}-{n}"
            backend = Backend(case / "backend", faults=Faults())
            steps = Steps(n, mode)
            async with trio.open_nursery() as nursery:
                base = await nursery.start(run_backend, backend)
                shutil.copytree(template, case / "spool")
                spool = SteppedSpool(case / "spool", device_id=DEVICE,
                                     config=SegmentsConfig(seconds=5, min_free_mb=0),
                                     clock=ManualClock(), fs=SteppedFileOps(steps))
                spool.steps = steps
                spool.recover()
                assert spool.pending() == metas
                steps.armed = True
                up = Uploader(upload_config(base), DEVICE, spool,
                              transport=SteppedTransport(steps))
                try:
                    await drain(up, spool)
                except* Killed:
                    pass
                steps.armed = False
                if steps.fired is None:
                    nursery.cancel_scope.cancel()
                    break
                if mode == "kill":  # restart: a new process reads the spool from disk
                    spool = open_spool(case / "spool")
                    await drain(Uploader(upload_config(base), DEVICE, spool), spool)
                assert spool.pending() == []
                assert all(spool.get(m.id) == (m, "synced") for m in metas)
                assert list((case / "spool" / "tmp").iterdir()) == []
                assert_on_backend_exactly_once(backend, metas)
                nursery.cancel_scope.cancel()
        report[mode] = n - 1
    print(f"\ncrash-point sweep: {report} fault points; steps of a clean run: {steps.names}")
    assert report["fail"] == report["kill"] >= 2 * 4


# ----------------------------------------------------------------------------
# The whole agent: a small quota while the backend is down, then recovery


@pytest.mark.slow
async def test_small_quota_with_the_backend_down_then_the_uploader_drains(
    tmp_path: Path, served: tuple[Backend, str],
) -> None:
    backend, base = served
    backend.faults.down = True
    config = validate({
        "device": {"id": DEVICE, "data_dir": str(tmp_path / "agent")},
        "capture": {"source": "tone", "rate": 16000, "realtime": False, "tone_seconds": 60},
        "ring": {"seconds": 120},
        # WAV: 5 s are 160 044 bytes, so 1 MB holds six whole segments.
        "segments": {"seconds": 5, "format": "wav", "max_spool_mb": 1, "min_free_mb": 0},
        "upload": {"enabled": True, "url": f"{base}/v1/devices/{{device}}/segments/{{segment}}",
                   "backoff_initial_seconds": 0.02, "backoff_max_seconds": 0.1,
                   # The segment sealed at the stop stays pending: what is asserted
                   # is what the uploader drained while the agent ran.
                   "shutdown_seconds": 0},
    })
    agent = Agent(config)
    spool, segmenter, uploader = agent.spool, agent.segmenter, agent.uploader
    assert spool is not None and segmenter is not None and uploader is not None
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await agent.capture_finished.wait()
            await until(lambda: segmenter.stats.frames_written == 60 * 16000)
            await until(lambda: uploader.stats.failures >= 3)
            degraded = agent.degraded()
            sealed = list(segmenter.sealed)
            held = spool.pending()
            backend.faults.down = False
            await until(lambda: not spool.pending())
            agent.stop()
    print(f"\nquota run: sealed {len(sealed)}, evicted unsynced {spool.stats.evicted_unsynced}"
          f" ({spool.stats.evicted_unsynced_seconds:.2f} s), degraded={degraded}")
    limit = 1024 * 1024
    evicted = sealed[: len(sealed) - len(held)]
    # Oldest first, and only as many as needed to fit: one more would have fitted.
    assert [m.id for m in held] == [m.id for m in sealed[len(evicted):]]
    assert sum(m.bytes for m in held) <= limit
    assert sum(m.bytes for m in held) + evicted[-1].bytes > limit
    assert spool.stats.evicted_unsynced == len(evicted) >= 1
    assert spool.stats.evicted_unsynced_bytes == sum(m.bytes for m in evicted)
    assert spool.stats.evicted_unsynced_seconds == pytest.approx(sum(m.seconds for m in evicted))
    assert "unsynced audio evicted" in degraded["spool"]
    assert "failed upload attempts" in degraded["uploader"]
    assert_on_backend_exactly_once(backend, held)
    assert agent.degraded().get("uploader") is None


async def test_demo_syncs_every_sealed_segment_to_its_backend(tmp_path: Path) -> None:
    report = await run_demo(tmp_path, realtime=False)
    assert report.segments and all(state == "synced" for _, state in report.segments)
    assert [(s.id, s.sha256) for s in report.synced] == [
        (m.id, m.sha256) for m, _ in report.segments]
    assert report.backend_url.startswith("http://127.0.0.1:")
