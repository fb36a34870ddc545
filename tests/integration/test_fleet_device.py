"""A device that accepts no connection answers retrieval requests through a real
SeaweedFS bucket, and leaves its heartbeat there.

The agent runs in process with its API disabled (no listening port), a
scripted capture of known samples (`support.api_agent`: a chirp with two
capture holes, 5 s FLAC segments, a 15 s ring) and ``[fleet]`` on. The test is
the operator: it writes the mailbox as the store's admin and reads what the
device left. What is checked is what an operator sees: the audio of each
answer sample for sample against the captured signal, the gaps an answer
names, the reason of a refusal, one result per request across a restart, and
what an idle device costs the store (304s, counted at the device's own HTTP
transport, i.e. every request the store received from it).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
import trio

from bench.seaweed import ADMIN, DeviceIdentity, LocalSeaweed
from edge_agent.agent import Agent
from edge_agent.audio.pcm import SampleFormat, read_wav
from edge_agent.capture import Block, SourceStats
from edge_agent.clock import ManualClock, SystemClock, iso_utc
from edge_agent.config import ConfigError, S3Config, validate
from edge_agent.fleet.device import MAX_READ_BYTES, FleetDevice
from edge_agent.fleet.records import (
    MAILBOX_LIMIT,
    Heartbeat,
    Mailbox,
    Request,
    Result,
    ResultGap,
    audio_key,
    decode,
    encode,
    mailbox_key,
    result_key,
    status_key,
)
from edge_agent.ring import AudioRing
from edge_agent.s3 import Credentials, ObjectClient, SigV4
from edge_agent.supervisor import TaskStatus

from support.api_agent import RATE, SIGNAL, T0, ScriptedSource, all_sealed, at
from support.fleet import device_config, seaweed_store
from support.waiting import until

BUCKET = "fleet-dev"
DEVICE = "dev-fleet"
RESTART = "dev-restart"
BAD = "dev-bad-mail"
BAD_KEYS = Credentials("BADMAILKEY", "bad-mail-secret")
KEYS = Credentials("FLEETDEVKEY", "fleet-dev-secret")
RESTART_KEYS = Credentials("RESTARTDEVKEY", "restart-dev-secret")
# The first run of the restart test: may store the audio of an answer, not its result.
AUDIO_ONLY_KEYS = Credentials("AUDIOONLYKEY", "audio-only-secret")


@dataclass(frozen=True)
class AudioOnly(DeviceIdentity):
    """Another identity of device `of` whose policy lets it write the audio of an
    answer (``.wav``) but not the result record: a device stopped between the two."""

    of: str = ""

    def policy(self) -> dict[str, Any]:
        d, b = self.of, BUCKET
        return {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:PutObject", "s3:GetObject"],
             "Resource": [f"arn:aws:s3:::{b}/{d}/*", f"arn:aws:s3:::{b}/status/{d}.json",
                          f"arn:aws:s3:::{b}/retrievals/{d}/*.wav"]},
            {"Effect": "Allow", "Action": ["s3:GetObject"],
             "Resource": [f"arn:aws:s3:::{b}/retrievals/{d}/*",
                          f"arn:aws:s3:::{b}/requests/{d}.json"]},
        ]}


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSeaweed]:
    with seaweed_store(tmp_path_factory.mktemp("seaweed"), [
        DeviceIdentity(DEVICE, KEYS, (BUCKET,)),
        DeviceIdentity(RESTART, RESTART_KEYS, (BUCKET,)),
        DeviceIdentity(BAD, BAD_KEYS, (BUCKET,)),
        AudioOnly("audio-only", AUDIO_ONLY_KEYS, (BUCKET,), of=RESTART),
    ], BUCKET) as store:
        yield store


class Counting(httpx.AsyncHTTPTransport):
    """The device's transport, noting every request it sends and the answer."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, int]] = []  # method, path?query, status

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        target = request.url.path + (f"?{request.url.query.decode()}"
                                     if request.url.query else "")
        self.seen.append((request.method, target, response.status_code))
        return response


@asynccontextmanager
async def admin(seaweed: LocalSeaweed) -> AsyncIterator[ObjectClient]:
    """The operator's side: an object client with the store's admin keys."""
    section = S3Config(endpoint=seaweed.endpoint, bucket=BUCKET)
    async with httpx.AsyncClient(timeout=30) as client:
        yield ObjectClient(section, SigV4(ADMIN, "us-east-1", SystemClock()), client)


async def place(objects: ObjectClient, device: str, *requests: Request) -> None:
    """Write the device's mailbox (as the operator's command will, with If-Match)."""
    key = mailbox_key(device)
    got = await objects.get(key)
    mailbox = decode(got.body, Mailbox) if got.status == 200 else Mailbox(device=device)
    mailbox.requests = [*mailbox.requests, *requests]
    assert await objects.put(key, encode(mailbox), "application/json",
                             if_match=got.etag if got.status == 200 else None,
                             if_none_match=got.status != 200) is not None


def request(rid: str, start: float, end: float, fmt: str = "wav") -> Request:
    """A request for capture times ``[start, end)`` seconds after T0."""
    return msgspec.convert({"id": rid, "start": at(start), "end": at(end), "format": fmt,
                            "created": at(50.0), "by": "test"}, Request)


async def result_of(objects: ObjectClient, device: str, rid: str) -> Result:
    got = await objects.get(result_key(device, rid))
    assert got.status == 200, rid
    result: Result = decode(got.body, Result)
    return result


async def audio_of(objects: ObjectClient, result: Result) -> np.ndarray:
    got = await objects.get(result.key)
    assert got.status == 200
    pcm, rate = read_wav(io.BytesIO(got.body))
    assert rate == RATE and len(pcm) == result.samples
    return pcm[:, 0]


@dataclass
class Probe:
    """A stage the test fails on demand: a health change."""

    fail: trio.Event = field(default_factory=trio.Event)

    async def run(self, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self.fail.wait()
        raise OSError("probe failed on purpose")


# ----------------------------------------------------------------------------


async def test_a_device_without_a_port_answers_its_mailbox_sample_exact(
    tmp_path: Path, seaweed: LocalSeaweed,
) -> None:
    cfg = device_config(tmp_path, DEVICE, KEYS, seaweed.endpoint, BUCKET,
                        max_request_seconds=30.0, max_requests_per_poll=2)
    clock = ManualClock(utc_now=T0 - 5, mono_now=1000.0)
    holder: dict[str, Agent] = {}
    source = ScriptedSource(lambda: holder["agent"].ready, lambda: holder["agent"].ring)
    agent = holder["agent"] = Agent(cfg, clock=clock, source=source)
    assert agent.api is None  # nothing listens
    fleet = agent.fleet
    assert fleet is not None
    fleet.transport = transport = Counting()
    probe = Probe()
    agent.add_task("probe", probe.run)
    st = fleet.stats
    async with admin(seaweed) as objects:
        # Placed before the audio exists: each valid one waits until its range is
        # captured; the invalid ones are refused at once.
        await place(objects, DEVICE,
                    request("spool-and-ring", 24.0, 36.0),  # spool, then ring
                    request("capture-hole", 19.0, 25.0),  # 21..23 s never captured
                    request("before-held", -10.0, 5.0),  # starts before anything held
                    request("too-long", 0.0, 40.0),  # max_request_seconds = 30
                    request("inverted", 10.0, 5.0))
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await agent.capture_finished.wait()
            with trio.fail_after(20):
                await all_sealed(agent)
            with trio.fail_after(10):
                await until(lambda: st.requests_refused == 2)
            assert st.requests_answered == 0
            assert st.requests_waiting > 0
            # One more, added to the mailbox the device already read.
            await place(objects, DEVICE, request("long-gone", -100.0, -80.0))
            clock.advance(65.0)  # now every range is in the past
            with trio.fail_after(30):
                await until(lambda: st.requests_answered + st.requests_refused == 6)
            assert (st.requests_answered, st.requests_partial, st.requests_refused,
                    st.requests_failed) == (3, 2, 3, 0)

            # The audio is the captured signal, sample for sample.
            ok = await result_of(objects, DEVICE, "spool-and-ring")
            assert (ok.state, ok.gaps, ok.rate, ok.channels) == ("ok", [], RATE, 1)
            assert ok.key == audio_key(DEVICE, "spool-and-ring", "wav")
            assert (ok.first_utc, ok.last_utc) == (at(24.0), at(36.0))
            pcm = await audio_of(objects, ok)
            # Capture 24..36 s is signal 22..34 s (the hole at 21..23 s came before).
            assert np.array_equal(pcm, SIGNAL[22 * RATE : 34 * RATE])

            hole = await result_of(objects, DEVICE, "capture-hole")
            assert hole.state == "partial" and len(hole.gaps) == 1
            gap = hole.gaps[0]
            assert (gap.utc, gap.reason) == (at(21.0), "capture")
            assert gap.seconds == pytest.approx(2.0, abs=1e-3)
            assert gap.offset == pytest.approx(2.0, abs=1e-3)
            assert np.array_equal(await audio_of(objects, hole), SIGNAL[19 * RATE : 23 * RATE])

            early = await result_of(objects, DEVICE, "before-held")
            assert early.state == "partial"
            assert early.gaps == [ResultGap(utc=at(-10.0), seconds=10.0, offset=0.0,
                                            reason="not_held")]
            assert early.first_utc == at(0.0)
            assert np.array_equal(await audio_of(objects, early), SIGNAL[: 5 * RATE])

            for rid, why in (("too-long", "too_long: "), ("long-gone", "before_oldest: "),
                             ("inverted", "inverted: ")):
                refused = await result_of(objects, DEVICE, rid)
                assert refused.state == "refused" and refused.reason.startswith(why), rid
                assert (refused.key, refused.samples) == ("", 0)
                assert (await objects.get(audio_key(DEVICE, rid, "wav"))).status == 404

            # Idle: each poll is one conditional GET of the mailbox, answered 304.
            seen, unchanged = len(transport.seen), st.not_modified
            with trio.fail_after(10):
                await until(lambda: st.not_modified >= unchanged + 3)
            idle = [s for s in transport.seen[seen:] if s[0] != "PUT"
                    or not s[1].endswith(status_key(DEVICE))]
            assert idle and set(idle) == {("GET", f"/{BUCKET}/{mailbox_key(DEVICE)}", 304)}

            # The heartbeat is there, and written again when health changes.
            beat: Heartbeat = decode((await objects.get(status_key(DEVICE))).body, Heartbeat)
            assert (beat.device, beat.heartbeat_seconds, beat.poll_seconds) == (
                DEVICE, 3600.0, 1.0)
            assert beat.oldest_audio == iso_utc(T0)
            assert beat.capture["seconds"] == pytest.approx(40.0)
            assert set(beat.spool) == {"segments", "seconds", "mb"}
            assert not any(r.startswith("probe") for r in beat.reasons)
            beats = st.heartbeats
            probe.fail.set()

            async def says_probe_failed() -> bool:
                got = await objects.get(status_key(DEVICE))
                return any(r.startswith("probe") for r in decode(got.body, Heartbeat).reasons)

            with trio.fail_after(10):
                while not await says_probe_failed():  # noqa: ASYNC110 (the store's object)
                    await trio.sleep(0.05)
            assert st.heartbeats > beats

            # The counters are in the agent's status.
            status = msgspec.to_builtins(agent.parts.fleet_stats)
            assert status["requests_answered"] == 3 and status["not_modified"] >= 3
            agent.stop()


class Silent:
    """A capture that opens and never delivers (the second run hears nothing new)."""

    rate, channels, format = RATE, 1, SampleFormat.INT16

    def __init__(self) -> None:
        self.stats = SourceStats()

    @asynccontextmanager
    async def open(self) -> AsyncIterator[AsyncIterator[Block]]:
        yield self._blocks()

    async def _blocks(self) -> AsyncIterator[Block]:
        await trio.sleep_forever()
        yield Block(np.zeros((0, 1), np.int16), 0.0, 0.0)  # never reached


async def test_a_device_stopped_between_audio_and_result_finishes_the_request_once(
    tmp_path: Path, seaweed: LocalSeaweed,
) -> None:
    wanted = request("once", 26.0, 32.0)
    async with admin(seaweed) as objects:
        await place(objects, RESTART, wanted)

        # First run: the audio is stored, the result is refused by the store.
        cfg = device_config(tmp_path, RESTART, AUDIO_ONLY_KEYS, seaweed.endpoint, BUCKET)
        clock = ManualClock(utc_now=T0 - 5, mono_now=1000.0)  # the range: not yet captured
        holder: dict[str, Agent] = {}
        source = ScriptedSource(lambda: holder["agent"].ready, lambda: holder["agent"].ring)
        first = holder["agent"] = Agent(cfg, clock=clock, source=source)
        assert first.fleet is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            await first.capture_finished.wait()
            with trio.fail_after(20):
                await all_sealed(first)
            clock.advance(65.0)
            with trio.fail_after(30):
                await until(lambda: first.fleet is not None
                            and first.fleet.stats.requests_failed >= 1)
            first.stop()
        assert "AccessDenied" in (first.fleet.stats.last_error or "")
        stored = await objects.get(audio_key(RESTART, "once", "wav"))
        assert stored.status == 200
        assert (await objects.get(result_key(RESTART, "once"))).status == 404
        kept = sorted(p.name for p in (tmp_path / "data" / "fleet").iterdir())
        assert kept == ["once.json", "once.wav"]

        # Second run, allowed to write results: the same audio again ("already
        # there"), then the one result, describing the audio stored.
        second = await run_until(
            Agent(device_config(tmp_path, RESTART, RESTART_KEYS, seaweed.endpoint, BUCKET),
                  clock=clock, source=Silent()),
            lambda d: d.stats.requests_answered == 1)
        assert (second.stats.audio_already, second.stats.requests_failed) == (1, 0)
        result = await result_of(objects, RESTART, "once")
        assert result.state == "ok" and result.bytes == len(stored.body)
        again = await objects.get(audio_key(RESTART, "once", "wav"))
        assert again.body == stored.body
        assert result.sha256 == hashlib.sha256(stored.body).hexdigest()
        pcm, _ = read_wav(io.BytesIO(stored.body))
        assert np.array_equal(pcm[:, 0], SIGNAL[24 * RATE : 30 * RATE])
        assert list((tmp_path / "data" / "fleet").iterdir()) == []

        # Third run: the request is still in the mailbox; its result is found, not redone.
        third = await run_until(
            Agent(device_config(tmp_path, RESTART, RESTART_KEYS, seaweed.endpoint, BUCKET),
                  clock=clock, source=Silent()),
            lambda d: d.stats.results_found == 1)
        assert (third.stats.requests_answered, third.stats.requests_refused) == (0, 0)
        assert (await objects.get(result_key(RESTART, "once"))).body == encode(result)


async def run_until(agent: Agent, done: Any) -> FleetDevice:
    """Run `agent` until its fleet device satisfies `done`, then stop it."""
    device = agent.fleet
    assert device is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        with trio.fail_after(30):
            await until(lambda: done(device))
        agent.stop()
    return device


def test_fleet_needs_the_s3_target_in_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        validate({"fleet": {"enabled": True}})
    assert info.value.problems == [
        'fleet.enabled: expected upload.enabled = true and upload.target = "s3" '
        "(the fleet meets in the bucket of [upload.s3])"]
    with pytest.raises(ConfigError) as info:
        validate({"segments": {"enabled": True},
                  "upload": {"enabled": True, "target": "s3",
                             "s3": {"bucket": "audio", "credentials_file": "/etc/keys"}},
                  "fleet": {"enabled": True, "poll_seconds": 2, "busy_poll_seconds": 5}})
    assert info.value.problems == ["fleet.busy_poll_seconds: expected at most "
                                   "fleet.poll_seconds (2), got 5"]


async def test_a_bad_mailbox_is_one_line_and_the_device_keeps_answering(
    tmp_path: Path, seaweed: LocalSeaweed,
) -> None:
    cfg = device_config(tmp_path, BAD, BAD_KEYS, seaweed.endpoint, BUCKET, max_requests_per_poll=4)
    clock = ManualClock(utc_now=T0 + 60, mono_now=1000.0)
    device = FleetDevice(cfg.fleet, cfg.upload, device_id=BAD, clock=clock,
                         ring=AudioRing(rate=RATE, channels=1, dtype="int16", seconds=1.0),
                         spool=None, work_dir=tmp_path / "fleet",
                         figures=lambda: {"health": "ok", "uptime_seconds": 1.0},
                         health=lambda: "ok",
                         version="test")
    st = device.stats
    async with admin(seaweed) as objects, trio.open_nursery() as nursery:
        await nursery.start(device.run)

        async def write(body: bytes) -> None:
            assert await objects.put(mailbox_key(BAD), body, "application/json") is not None

        for body, error in ((b"{not json", "not JSON"),
                            (b" " * (MAX_READ_BYTES + 1), f"larger than {MAX_READ_BYTES}")):
            errors = st.errors
            await write(body)
            with trio.fail_after(10):
                await until(lambda e=errors: st.errors > e)
            assert error in (st.last_error or "") and "\n" not in (st.last_error or "")

        # Absurd times are refused at once; requests past the limit are not read.
        old = msgspec.convert({"id": "x", "start": at(0.0), "end": at(1.0),
                               "created": at(-9 * 86400.0)}, Request)
        box = Mailbox(device=BAD, requests=[
            msgspec.structs.replace(request("year-9999", 10.0, 20.0), end="9999-12-31T23:59:59Z"),
            msgspec.structs.replace(request("month-13", 10.0, 20.0), end="2027-13-01T00:00:00Z"),
            *[msgspec.structs.replace(old, id=f"expired-{i}") for i in range(MAILBOX_LIMIT - 2)],
            request("past-the-limit", 10.0, 5.0)])
        await write(encode(box))
        with trio.fail_after(10):
            await until(lambda: st.requests_refused == 2)
        assert (await result_of(objects, BAD, "year-9999")).reason.startswith("too_long: ")
        assert (await result_of(objects, BAD, "month-13")).reason.startswith("bad_request: ")
        assert (st.requests_expired, st.requests_over_limit) == (MAILBOX_LIMIT - 2, 1)
        assert (await objects.get(result_key(BAD, "past-the-limit"))).status == 404
        nursery.cancel_scope.cancel()
