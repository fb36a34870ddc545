"""``edge-agent fleet`` against a real SeaweedFS S3 gateway on loopback.

The operator holds the store's admin keys (in a credentials file named by a
``fleet.toml``); each device writes with its own per-device policy: its
segments through the real uploader and spool, its heartbeat, its answers. What
is checked is what an operator sees: the tables and the JSON, the audio file
`fleet get` writes (sample for sample against what the device recorded), the
holes it names, the mailbox after several operators wrote to it at once, and
one line on stderr with exit status 2 for every kind of bad input.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest
import trio

from bench.seaweed import ADMIN, DeviceIdentity, LocalSeaweed
from edge_agent.api.cut import FileSink, open_renderer, produce, spool_reader
from edge_agent.api.plan import plan_audio
from edge_agent.audio.pcm import read_wav
from edge_agent.blocking import ThreadRunner
from edge_agent.cli import main
from edge_agent.clock import SystemClock, iso_utc
from edge_agent.config import S3Config, UploadConfig
from edge_agent.fleet import records
from edge_agent.fleet.fleetconfig import load_operator_config
from edge_agent.fleet.operator import Fleet
from edge_agent.fleet.records import Heartbeat, Mailbox, Request, Result
from edge_agent.s3 import Credentials, ObjectClient, SigV4
from edge_agent.spool import Spool
from edge_agent.uploader import Uploader
from edge_agent.wire import SegmentMeta

from support.fleet import credentials_file, seaweed_store, write_fleet_toml
from support.spool_rig import DEVICE, RATE, open_spool, seal
from support.waiting import until

BUCKET = "fleet-cli"
ROOT = Path(__file__).resolve().parents[2]
NAMES = (DEVICE, "beat-ok", "beat-old", "box-1", "box-2")
IDENTITIES = {n: DeviceIdentity(n, Credentials(f"{n.upper().replace('-', '')}KEY",
                                               f"{n}-secret-key"), (BUCKET,)) for n in NAMES}
# Segments of DEVICE: three of 2 s from 3 s before a UTC midnight (so the range
# spans two days' prefixes); a fourth, held only by the device, follows them.
MIDNIGHT = 1_900_022_400.0
T0 = MIDNIGHT - 3.0


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSeaweed]:
    with seaweed_store(tmp_path_factory.mktemp("seaweed"), list(IDENTITIES.values()),
                       BUCKET) as store:
        yield store


@pytest.fixture
def toml(tmp_path: Path, seaweed: LocalSeaweed) -> Path:
    return write_fleet_toml(tmp_path, seaweed.endpoint, BUCKET)


def fleet(capsys: pytest.CaptureFixture[str], toml: Path, action: str,
          *args: str) -> tuple[int, str, str]:
    code = main(["fleet", action, *args, "-c", str(toml)])
    out, err = capsys.readouterr()
    return code, out, err


@asynccontextmanager
async def store_as(seaweed: LocalSeaweed, creds: Credentials) -> AsyncIterator[ObjectClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield ObjectClient(S3Config(endpoint=seaweed.endpoint, bucket=BUCKET),
                           SigV4(creds, "us-east-1", SystemClock()), client)


def heartbeat(device: str, every: float) -> Heartbeat:
    return Heartbeat(device=device, sent=iso_utc(time.time()), version="1.2.3",
                     uptime_seconds=100.0, heartbeat_seconds=every, poll_seconds=60.0,
                     health="ok", clock={"synced": True, "offset_seconds": 0.0},
                     spool={"segments": 2, "seconds": 120.0, "mb": 0.5},
                     oldest_audio=iso_utc(T0))


def put_heartbeat(seaweed: LocalSeaweed, device: str, every: float) -> None:
    async def put() -> None:
        async with store_as(seaweed, IDENTITIES[device].credentials) as store:
            key = records.status_key(device)
            assert await store.put(key, records.encode(heartbeat(device, every)),
                                   "application/json") is not None

    trio.run(put)


# ----------------------------------------------------------------------------
# The recorded device: segments uploaded by the real uploader


class Recorded:
    """DEVICE's three uploaded segments and the fourth only its spool holds."""

    def __init__(self, uploaded: list[SegmentMeta], uploaded_spool: Spool,
                 held: SegmentMeta, held_spool: Spool) -> None:
        self.uploaded = uploaded
        self.held = held
        self.held_spool = held_spool
        files = [uploaded_spool.audio_path(m.id) for m in uploaded]
        self.pcm = np.concatenate([read_wav(f)[0] for f in
                                   [*files, held_spool.audio_path(held.id)]])

    def samples(self, start: float, end: float) -> np.ndarray:
        """What the device recorded from `start` to `end` (all four segments)."""
        return self.pcm[round((start - T0) * RATE): round((end - T0) * RATE)]


async def drain(uploader: Uploader, spool: Spool) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(uploader.run)
            await until(lambda: not spool.pending())
            nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def recorded(seaweed: LocalSeaweed, tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    root = tmp_path_factory.mktemp("device")
    spool = open_spool(root / "spool", format="wav")
    metas = [seal(spool, 2.0, T0 + 2 * i) for i in range(3)]
    held_spool = open_spool(root / "held", format="wav")
    held = seal(held_spool, 2.0, T0 + 6)
    creds = credentials_file(root / "device-keys", IDENTITIES[DEVICE].credentials)
    config = UploadConfig(enabled=True, target="s3", timeout_seconds=10.0,
                          backoff_initial_seconds=0.02, backoff_max_seconds=0.2,
                          s3=S3Config(endpoint=seaweed.endpoint, bucket=BUCKET,
                                      credentials_file=str(creds)))
    trio.run(drain, Uploader(config, DEVICE, spool), spool)
    return Recorded(metas, spool, held, held_spool)


# ----------------------------------------------------------------------------
# Segments and get


def test_segments_lists_what_the_bucket_holds_and_the_missing_part(
    capsys: pytest.CaptureFixture[str], toml: Path, recorded: Recorded,
) -> None:
    code, out, err = fleet(capsys, toml, "segments", DEVICE, "--from", iso_utc(T0 + 1),
                           "--to", iso_utc(T0 + 8), "--json")
    assert (code, err) == (0, "")
    got = json.loads(out)
    assert [s["id"] for s in got["segments"]] == [m.id for m in recorded.uploaded]
    assert got["stored_seconds"] == pytest.approx(5.0)
    assert got["holes"] == [{"utc": iso_utc(T0 + 6), "seconds": pytest.approx(2.0),
                             "reason": "missing"}]
    code, out, _ = fleet(capsys, toml, "segments", DEVICE, "--from", iso_utc(T0 + 1),
                         "--to", iso_utc(T0 + 8))
    assert code == 0
    assert all(m.id in out for m in recorded.uploaded)
    assert f"hole {iso_utc(T0 + 6)[:19]}Z +2.000 s: not in the bucket" in out


def test_get_stitches_a_range_across_segments_sample_for_sample_and_names_the_missing_part(
    capsys: pytest.CaptureFixture[str], toml: Path, tmp_path: Path, recorded: Recorded,
) -> None:
    out_file = tmp_path / "cut.wav"
    # From inside the first segment, across midnight, to past what was uploaded.
    code, out, err = fleet(capsys, toml, "get", DEVICE, iso_utc(T0 + 0.5), iso_utc(T0 + 8),
                           "-o", str(out_file), "--format", "wav")
    assert code == 1  # written, but part of the range is not in the bucket
    pcm, rate = read_wav(out_file)
    assert rate == RATE
    assert np.array_equal(pcm, recorded.samples(T0 + 0.5, T0 + 6))
    assert f"wrote {out_file}: 5.500 s of {DEVICE}" in out
    assert err.splitlines() == [f"hole {iso_utc(T0 + 6)[:19]}Z +2.000 s: not in the bucket "
                                "(--request asks the device)"]

    # Inside what is stored: complete, exit 0; and at another rate, exactly as long.
    code, out, err = fleet(capsys, toml, "get", DEVICE, iso_utc(T0 + 1.25), iso_utc(T0 + 4.75),
                           "-o", str(out_file), "--format", "pcm", "--rate", "8000", "--json")
    assert (code, err) == (0, "")
    got = json.loads(out)
    assert (got["complete"], got["holes"], got["frames"], got["rate"]) == (True, [], 28000, 8000)
    assert out_file.stat().st_size == 28000 * 2


def mailbox_ids(seaweed: LocalSeaweed, device: str) -> set[str]:
    async def read() -> set[str]:
        async with store_as(seaweed, ADMIN) as store:
            got = await store.get(records.mailbox_key(device))
            return ({r.id for r in records.decode(got.body, Mailbox).requests}
                    if got.status == 200 else set())

    return trio.run(read)


def answer_as_the_device(seaweed: LocalSeaweed, recorded: Recorded, seen: set[str]) -> Request:
    """Wait for a new request (not in `seen`) in DEVICE's mailbox and answer it from
    the spool the bucket never saw, cut by the agent's own cut (`api.cut`)."""

    async def answer() -> Request:
        async with store_as(seaweed, IDENTITIES[DEVICE].credentials) as store:
            with trio.fail_after(60):
                while True:
                    got = await store.get(records.mailbox_key(DEVICE))
                    new = [r for r in (records.decode(got.body, Mailbox).requests
                                       if got.status == 200 else []) if r.id not in seen]
                    if new:
                        break
                    await trio.sleep(0.05)
            request = new[0]
            spool = recorded.held_spool
            plan = plan_audio(None, [recorded.held], request.start_ts, request.end_ts,
                              rate=RATE, gap_tolerance=0.25)
            renderer = open_renderer(plan, request.format, rate=RATE, channels=1,
                                     device_id=DEVICE)
            path = spool.root / "answer"
            runner = ThreadRunner(1)
            with path.open("wb") as f:
                sink = FileSink(f, runner)
                await produce(plan, renderer, sink, ring=None,
                              read_segment=spool_reader(spool, RATE),
                              encode_runner=runner, io_runner=runner)
            key = records.audio_key(DEVICE, request.id, request.format)
            assert await store.put(key, path.read_bytes(), "audio/wav") is not None
            result = Result(id=request.id, device=DEVICE, state="ok", start=request.start,
                            end=request.end, format=request.format, key=key, rate=RATE,
                            channels=1, samples=renderer.frames_out, bytes=sink.bytes,
                            sha256=sink.sha256, first_utc=iso_utc(plan.first_utc or 0),
                            last_utc=iso_utc(plan.last_utc or 0), finished=iso_utc(time.time()))
            assert await store.put(records.result_key(DEVICE, request.id),
                                   records.encode(result), "application/json") is not None
            return request

    return trio.run(answer)


def test_get_with_request_asks_the_device_for_the_missing_part_and_splices_its_answer(
    toml: Path, tmp_path: Path, seaweed: LocalSeaweed, recorded: Recorded,
) -> None:
    out_file = tmp_path / "whole.wav"
    seen = mailbox_ids(seaweed, DEVICE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "fleet", "get", DEVICE, iso_utc(T0 + 1),
         iso_utc(T0 + 8), "-o", str(out_file), "--format", "wav", "--request",
         "--timeout", "60", "--json", "-c", str(toml)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        request = answer_as_the_device(seaweed, recorded, seen)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert (request.start_ts, request.end_ts) == (pytest.approx(T0 + 6), pytest.approx(T0 + 8))
    got = json.loads(out)
    assert (got["complete"], got["holes"], got["pending"]) == (True, [], [])
    assert [a["id"] for a in got["answers"]] == [request.id]
    pcm, _rate = read_wav(out_file)
    assert np.array_equal(pcm, recorded.samples(T0 + 1, T0 + 8))
    assert f"asked {DEVICE} for 1 stretch(es) not in the bucket: {request.id}" in err


def test_get_with_request_says_what_is_still_pending_when_the_device_does_not_answer(
    capsys: pytest.CaptureFixture[str], toml: Path, tmp_path: Path, seaweed: LocalSeaweed,
    recorded: Recorded,
) -> None:
    seen = mailbox_ids(seaweed, DEVICE)
    code, out, err = fleet(capsys, toml, "get", DEVICE, iso_utc(T0 + 5), iso_utc(T0 + 7),
                           "-o", str(tmp_path / "part.opus"), "--request", "--timeout", "0.3",
                           "--json")
    assert code == 1
    got = json.loads(out)
    (placed,) = mailbox_ids(seaweed, DEVICE) - seen
    assert got["pending"] == [placed] and got["complete"] is False
    assert got["holes"] == [{"utc": iso_utc(T0 + 6), "seconds": pytest.approx(1.0),
                             "reason": "pending"}]
    assert got["frames"] == RATE  # the stored second is written all the same
    assert f"request {placed}: no answer yet" in err


# ----------------------------------------------------------------------------
# Devices


def test_devices_marks_a_device_whose_heartbeat_is_overdue_stale(
    capsys: pytest.CaptureFixture[str], toml: Path, seaweed: LocalSeaweed,
) -> None:
    put_heartbeat(seaweed, "beat-old", every=0.4)  # stale 1 s after it was written
    written = time.time()
    put_heartbeat(seaweed, "beat-ok", every=300)
    time.sleep(max(0.0, written + 2.5 - time.time()))
    code, out, err = fleet(capsys, toml, "devices", "--json")
    assert (code, err) == (0, "")
    rows = {r["device"]: r for r in json.loads(out)}
    assert (rows["beat-old"]["stale"], rows["beat-ok"]["stale"]) == (True, False)
    assert rows["beat-ok"]["heartbeat"]["spool"]["segments"] == 2
    code, out, err = fleet(capsys, toml, "devices")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "STALE" in lines["beat-old"] and "STALE" not in lines["beat-ok"]
    assert "synced +0.0 s" in lines["beat-ok"] and "1.2.3" in lines["beat-ok"]
    assert "stale: no heartbeat for longer than 2.5 x their heartbeat interval" in err


# ----------------------------------------------------------------------------
# Requests


def test_concurrent_requests_all_land_in_the_mailbox(
    capsys: pytest.CaptureFixture[str], toml: Path, seaweed: LocalSeaweed,
) -> None:
    put_heartbeat(seaweed, "box-1", every=300)
    # Two operators' commands at once...
    procs = [subprocess.Popen([sys.executable, "-m", "edge_agent", "fleet", "request", "box-1",
                               "now-10m", f"now-{m}m", "--json", "-c", str(toml)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for m in (5, 6)]
    placed = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        placed.append(json.loads(out)["id"])

    # ...and eight more from one process, all reading the same ETag first.
    config = load_operator_config(toml)

    async def place_many() -> tuple[list[str], int]:
        async with store_as(seaweed, ADMIN) as store:
            ops = Fleet(config, store, SystemClock())
            now = time.time()
            ids = [records.new_request_id(now, f"op{i}") for i in range(8)]

            async def place(request_id: str) -> None:
                await ops.place("box-1", Request(id=request_id, start=iso_utc(now - 60),
                                                 end=iso_utc(now - 30), created=iso_utc(now)))

            async with trio.open_nursery() as nursery:
                for request_id in ids:
                    nursery.start_soon(place, request_id)
            return ids, store.requests

    ids, sent = trio.run(place_many)
    # Eight appends without a collision would take 8 GETs, 7 listings and 8 PUTs.
    assert sent > 23
    code, out, _ = fleet(capsys, toml, "requests", "box-1", "--json")
    assert code == 0
    rows = json.loads(out)
    assert sorted(r["id"] for r in rows) == sorted(placed + ids)
    assert {r["state"] for r in rows} == {"pending"}


def test_requests_shows_answers_and_answered_requests_leave_the_mailbox(
    capsys: pytest.CaptureFixture[str], toml: Path, seaweed: LocalSeaweed,
) -> None:
    put_heartbeat(seaweed, "box-2", every=300)
    code, out, _ = fleet(capsys, toml, "request", "box-2", "now-2h", "now-1h", "--json")
    assert code == 0
    first = json.loads(out)["id"]

    async def refuse() -> None:
        async with store_as(seaweed, IDENTITIES["box-2"].credentials) as store:
            now = iso_utc(time.time())
            result = Result(id=first, device="box-2", state="refused",
                            reason="before the oldest audio held", start=now, end=now,
                            format="opus", finished=now)
            await store.put(records.result_key("box-2", first), records.encode(result),
                            "application/json")

    trio.run(refuse)
    code, out, _ = fleet(capsys, toml, "request", "box-2", "now-30m", "now-20m")
    assert code == 0 and "placed request" in out
    code, out, _ = fleet(capsys, toml, "requests", "box-2", "--json")
    rows = {r["id"]: r for r in json.loads(out)}
    assert rows[first]["state"] == "refused"
    assert rows[first]["in_mailbox"] is False  # dropped by the second request's write
    assert [r["state"] for r in rows.values() if r["id"] != first] == ["pending"]
    code, out, _ = fleet(capsys, toml, "requests", "box-2")
    assert "before the oldest audio held" in out and "1 waiting in the mailbox" in out


def test_a_full_mailbox_takes_no_more(
    capsys: pytest.CaptureFixture[str], toml: Path, seaweed: LocalSeaweed,
) -> None:
    put_heartbeat(seaweed, "box-2", every=300)
    now = time.time()
    full = Mailbox(device="box-2", requests=[
        Request(id=records.new_request_id(now, f"full{i}"), start=iso_utc(now - 60),
                end=iso_utc(now - 30), created=iso_utc(now)) for i in range(records.MAILBOX_LIMIT)])

    async def fill() -> None:
        async with store_as(seaweed, ADMIN) as store:
            await store.put(records.mailbox_key("box-2"), records.encode(full),
                            "application/json")

    trio.run(fill)
    code, out, err = fleet(capsys, toml, "request", "box-2", "now-5m", "now-4m")
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"error: requests/box-2.json: {records.MAILBOX_LIMIT} requests "
                                "are waiting for box-2, the most a mailbox holds "
                                f"({records.MAILBOX_LIMIT}); wait for the device to answer some"]


# ----------------------------------------------------------------------------
# Bad input: one line, exit 2


@pytest.mark.parametrize(("args", "expected"), [
    (("segments", "nobody", "--from", "now-1h", "--to", "now"),
     "device nobody: unknown; the bucket holds no heartbeat (status/nobody.json) and no "
     "segments of it"),
    (("get", DEVICE, "now", "now-1h", "-o", "x.wav"), "the range ends"),
    (("request", DEVICE, "yesterday", "now"), "START 'yesterday': expected an ISO 8601 time"),
    (("requests", "../etc"), "device '../etc': expected a device id"),
    (("get", DEVICE, "now-1h", "now", "-o", "x", "--rate", "7"), "--rate 7: expected"),
    (("get", DEVICE, "now-1h", "now", "-o", "no-such-dir/x.wav"), "no directory no-such-dir"),
])
def test_bad_arguments_get_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], toml: Path, recorded: Recorded,
    args: tuple[str, ...], expected: str,
) -> None:
    code, out, err = fleet(capsys, toml, *args)
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and expected in err, err


@pytest.mark.parametrize(("setting", "expected"), [
    ({"bucket": '"no-such-bucket"'}, "the store has no bucket no-such-bucket; check bucket ("),
    ({"endpoint": '"http://127.0.0.1:9"'}, "cannot reach the store at http://127.0.0.1:9"),
    ({"credentials_file": '"wrong-keys"'}, "SignatureDoesNotMatch"),
    ({"credentials_file": '"absent"'}, "credentials_file: "),
    ({"stale_after": '"long"'}, "stale_after: expected a number"),
    ({"bucket_name": '"x"'}, "bucket_name: unknown key (did you mean 'bucket'?)"),
])
def test_bad_settings_get_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, seaweed: LocalSeaweed,
    setting: dict[str, str], expected: str,
) -> None:
    credentials_file(tmp_path / "wrong-keys", Credentials(ADMIN.access_key_id, "not-the-secret"))
    toml = write_fleet_toml(tmp_path, seaweed.endpoint, BUCKET, **setting)
    code, out, err = fleet(capsys, toml, "devices")
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and expected in err, err
    assert err.startswith("error: ")


def test_every_bad_key_of_fleet_toml_is_named_at_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    toml = tmp_path / "fleet.toml"
    toml.write_text('bucket = "A"\nregion = 5\nkey_template = "{segment}{nope}"\n')
    code, _, err = fleet(capsys, toml, "devices")
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 4, err  # region, bucket, key_template, credentials_file
    assert all(line.startswith(f"error: {toml}: ") for line in lines)


def test_a_sidecar_naming_another_segment_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], toml: Path, tmp_path: Path, seaweed: LocalSeaweed,
) -> None:
    # A device writes its own sidecars: one naming a path outside the operator's
    # work directory must not become a file name, nor the audio of another key.
    device = "beat-ok"
    start = MIDNIGHT + 86400.0
    meta = seal(open_spool(tmp_path / "spool", format="wav"), 2.0, start)
    key = f"{device}/{iso_utc(start)[:10].replace('-', '/')}/{meta.id}.wav"
    forged = msgspec.structs.replace(meta, id="../../outside")
    body = msgspec.json.encode({"key": f"{DEVICE}/elsewhere.wav", "device": device,
                                "segment": forged})

    async def put() -> None:
        async with store_as(seaweed, IDENTITIES[device].credentials) as store:
            assert await store.put(f"{key}.json", body, "application/json") is not None

    trio.run(put)
    code, out, err = fleet(capsys, toml, "get", device, iso_utc(start), iso_utc(start + 2),
                           "-o", str(tmp_path / "out.wav"), "--format", "wav")
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert f"{key}.json: the sidecar describes segment '../../outside'" in err, err
