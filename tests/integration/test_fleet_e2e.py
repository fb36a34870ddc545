"""The fleet end to end: a device that accepts no connection and the operator's
``edge-agent fleet`` command, both real, meeting only in a real SeaweedFS bucket.

The device is the agent in process with its API off and ``[fleet]`` on. It
captures a known chirp (`FastSource`) stamped from a minute before now (the
operator's command reads the real clock, and a device takes only requests
placed recently), and its real uploader puts the 5 s FLAC segments it seals
into the bucket. Capture pauses 2.5 s into the third segment, so that stretch
is held only by the device (its ring and open segment) and never uploaded. The
operator is ``python -m edge_agent fleet ...`` in a subprocess with the store's
admin keys in its ``fleet.toml``. What is checked is what an operator sees:
exit status, the command's JSON, the audio in the bucket and the file ``fleet
get`` wrote, sample for sample against what was captured.

What an idle device costs the store (each poll one conditional GET, answered
304) is counted in test_fleet_device.py.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import trio

from bench.seaweed import DeviceIdentity, LocalSeaweed
from edge_agent.agent import Agent
from edge_agent.audio.pcm import read_wav
from edge_agent.clock import ManualClock, iso_utc
from edge_agent.fleet.records import audio_key, parse_utc
from edge_agent.s3 import Credentials

from support.api_agent import RATE, make_signal
from support.fleet import device_config, seaweed_store, write_fleet_toml
from support.sources import FastSource
from support.waiting import until

BUCKET = "fleet-e2e"
ROOT = Path(__file__).resolve().parents[2]
ASKED = "dev-asked"  # answers `fleet request`
SPLICED = "dev-spliced"  # answers `fleet get --request`
IDENTITIES = {d: DeviceIdentity(d, Credentials(f"{d.upper().replace('-', '')}KEY",
                                               f"{d}-secret-key"), (BUCKET,))
              for d in (ASKED, SPLICED)}
SEGMENT = 5.0  # segments.seconds of `device_config`
CAPTURED = 12.5  # seconds: two segments sealed and uploaded, 2.5 s held by the device only
SIGNAL = make_signal(15.0)


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSeaweed]:
    with seaweed_store(tmp_path_factory.mktemp("seaweed"), list(IDENTITIES.values()),
                       BUCKET) as store:
        yield store


@dataclass(frozen=True)
class Device:
    agent: Agent
    start: float  # the capture time of the first sample (UTC)

    def at(self, seconds: float) -> str:
        """The time `seconds` into the capture, as the command line takes it."""
        return iso_utc(self.start + seconds)


@asynccontextmanager
async def recording(tmp_path: Path, seaweed: LocalSeaweed, device: str) -> AsyncIterator[Device]:
    """`device` running with no listening port, once it captured `CAPTURED` seconds
    of SIGNAL and the bucket holds the two segments it sealed."""
    now = time.time()
    start = SEGMENT * math.floor((now - 60.0) / SEGMENT)  # segments start on it
    config = device_config(tmp_path, device, IDENTITIES[device].credentials, seaweed.endpoint,
                           BUCKET)
    frames = round(CAPTURED * RATE)
    source = FastSource(SIGNAL[:, None], RATE, block=320, limit=frames, start_utc=start)
    # The device's clock stays at `now`: every range asked for ended a minute ago.
    agent = Agent(config, clock=ManualClock(utc_now=now, mono_now=1000.0), source=source)
    source.ring_of = lambda: agent.ring
    assert agent.api is None  # nothing listens
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        try:
            await source.run_to(frames)
            spool, segmenter = agent.spool, agent.segmenter
            assert spool is not None and segmenter is not None
            with trio.fail_after(30):
                await until(lambda: len(segmenter.sealed) == 2 and not spool.pending())
            assert segmenter.sealed[-1].end_ts == start + 2 * SEGMENT
            yield Device(agent, start)
        finally:
            agent.stop()


async def fleet(toml: Path, *args: str) -> tuple[int, str, str]:
    """``edge-agent fleet ARGS -c TOML`` in a subprocess: (exit status, stdout, stderr)."""
    with trio.fail_after(120):
        done = await trio.run_process(
            [sys.executable, "-m", "edge_agent", "fleet", *args, "-c", str(toml)], cwd=ROOT,
            capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


# ----------------------------------------------------------------------------


async def test_a_device_without_a_port_answers_a_request_placed_by_fleet_request(
    tmp_path: Path, seaweed: LocalSeaweed,
) -> None:
    toml = write_fleet_toml(tmp_path, seaweed.endpoint, BUCKET)
    async with recording(tmp_path, seaweed, ASKED) as device:
        fleet_device = device.agent.fleet
        assert fleet_device is not None
        # From the second segment (in the spool, uploaded) into what only the ring holds.
        code, out, err = await fleet(toml, "request", ASKED, device.at(7.0), device.at(12.0),
                                     "--format", "wav", "--json")
        assert (code, err) == (0, ""), err
        request_id = json.loads(out)["id"]
        with trio.fail_after(30):
            await until(lambda: fleet_device.stats.requests_answered == 1)
        code, out, err = await fleet(toml, "requests", ASKED, "--json")
    assert (code, err) == (0, ""), err
    (row,) = json.loads(out)
    assert (row["id"], row["state"]) == (request_id, "ok")
    result = row["result"]
    assert result["key"] == audio_key(ASKED, request_id, "wav")
    assert (result["first_utc"], result["last_utc"]) == (device.at(7.0), device.at(12.0))
    assert (result["samples"], result["rate"], result["gaps"]) == (5 * RATE, RATE, [])
    stored = seaweed.get(BUCKET, result["key"])
    assert stored.status_code == 200
    pcm, rate = read_wav(io.BytesIO(stored.content))
    assert rate == RATE and np.array_equal(pcm[:, 0], SIGNAL[7 * RATE : 12 * RATE])


async def test_fleet_get_splices_the_bucket_and_what_only_the_device_holds_sample_exact(
    tmp_path: Path, seaweed: LocalSeaweed,
) -> None:
    toml = write_fleet_toml(tmp_path, seaweed.endpoint, BUCKET)
    output = tmp_path / "range.wav"
    async with recording(tmp_path, seaweed, SPLICED) as device:
        # 1..10 s is in the bucket; 10..12 s only on the device.
        code, out, err = await fleet(toml, "get", SPLICED, device.at(1.0), device.at(12.0),
                                     "-o", str(output), "--format", "wav", "--request",
                                     "--timeout", "60", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["complete"], report["holes"], report["pending"]) == (True, [], [])
    assert len(report["segments"]) == 2
    (answer,) = report["answers"]
    assert answer["state"] == "ok" and answer["gaps"] == []
    # The request asked for what the bucket lacked: from the end of its second segment.
    assert parse_utc(answer["start"]) == pytest.approx(device.start + 10.0)
    assert parse_utc(answer["end"]) == pytest.approx(device.start + 12.0)
    assert f"asked {SPLICED} for 1 stretch(es) not in the bucket: {answer['id']}" in err
    pcm, rate = read_wav(output)
    assert rate == RATE and report["frames"] == 11 * RATE
    assert np.array_equal(pcm[:, 0], SIGNAL[1 * RATE : 12 * RATE])
