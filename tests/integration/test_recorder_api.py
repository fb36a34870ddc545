"""Recordings on demand through the device API, against a real agent on loopback.

The agent captures seeded noise from `FastSource`, which delivers exactly as many
frames as the test lets it: a recording started after frame A and stopped after
frame B must hold exactly frames A..B. Recordings are sealed into the real spool
and uploaded by the real uploader to the reference backend, like any segment.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio

from edge_agent.agent import Agent
from edge_agent.audio.opus import decode_ogg_opus_file
from edge_agent.audio.pcm import read_wav
from edge_agent.clock import ManualClock
from edge_agent.config import SegmentsConfig, validate
from edge_agent.fs import FileOps
from edge_agent.reference import Backend, list_stored_segments, run_backend
from edge_agent.spool import Spool

from support.sources import FastSource

RATE = 16000
TOKEN = "recordings-token-0123456789"
ID = r"[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[0-9a-f]{8}"
AUDIO = np.clip(np.random.default_rng(5).normal(0, 4000, (120 * RATE, 1)), -32768,
                32767).astype(np.int16)


@dataclass
class Served:
    agent: Agent
    client: httpx.AsyncClient
    source: FastSource
    backend: Backend


@asynccontextmanager
async def serve(tmp_path: Path, **recordings: Any) -> AsyncIterator[Served]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    backend = Backend(tmp_path / "backend")
    async with trio.open_nursery() as nursery:
        backend_url = await nursery.start(run_backend, backend, "127.0.0.1:0")
        config = validate({
            "device": {"id": "dev-rec", "data_dir": str(tmp_path / "data")},
            "capture": {"source": "tone", "rate": RATE, "channels": 1, "format": "int16"},
            "ring": {"seconds": 30},
            "segments": {"seconds": 3600, "min_free_mb": 0},
            "upload": {"enabled": True,
                       "url": f"{backend_url}/v1/devices/{{device}}/segments/{{segment}}",
                       "backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.1},
            "api": {"enabled": True, "listen": "127.0.0.1:0", "token_file": str(token_file)},
            "recordings": recordings,
        })
        source = FastSource(AUDIO, RATE, block=320, limit=2 * RATE)
        agent = Agent(config, source=source)
        source.ring_of = lambda: agent.ring
        await nursery.start(agent.run)
        await source.run_to(2 * RATE)
        assert agent.api is not None and agent.api.url is not None
        async with httpx.AsyncClient(base_url=agent.api.url, timeout=20,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            yield Served(agent, client, source, backend)
        agent.stop()
        nursery.cancel_scope.cancel()


async def test_start_stop_and_list_a_recording(tmp_path: Path) -> None:
    async with serve(tmp_path) as s:
        first = s.agent.ring.head
        r = await s.client.post("/v1/recordings",
                                params=[("prefix", "session-1"), ("prefix", "take"),
                                        ("format", "wav")])
        assert r.status_code == 201, r.text
        started = r.json()
        key = started["key"]
        assert re.fullmatch(rf"session-1/take/{ID}", key)
        assert started["state"] == "recording" and started["format"] == "wav"
        assert key.endswith("/" + started["id"])

        listed = (await s.client.get("/v1/recordings")).json()
        assert [(x["key"], x["state"]) for x in listed] == [(key, "recording")]

        await s.source.run_to(first + 3 * RATE)
        r = await s.client.post(f"/v1/recordings/{key}/stop")
        assert r.status_code == 200, r.text
        sealed = r.json()
        assert (sealed["key"], sealed["id"], sealed["state"]) == (key, started["id"], "sealed")
        assert sealed["seconds"] == 3.0
        assert sealed["content_type"] == "audio/wav"

        # Materialised in the spool: exactly the frames between start and stop.
        spool = s.agent.spool
        assert spool is not None
        path = spool.audio_path(started["id"])
        audio, rate = read_wav(path)
        assert rate == RATE
        assert np.array_equal(audio, AUDIO[first:first + 3 * RATE])
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sealed["sha256"]
        meta, _ = spool.get(started["id"]) or (None, None)
        assert meta is not None and meta.recording == key and meta.frames == 3 * RATE

        # Queued for upload like any segment: the backend gets it once, intact.
        with trio.fail_after(10):
            while not list_stored_segments(s.backend.data_dir, "dev-rec"):  # noqa: ASYNC110
                await trio.sleep(0.02)
        stored = list_stored_segments(s.backend.data_dir, "dev-rec")
        assert [(x.id, x.sha256) for x in stored] == [(started["id"], sealed["sha256"])]
        with trio.fail_after(10):
            while (await s.client.get("/v1/recordings")).json()[0]["state"] != "synced":  # noqa: ASYNC110
                await trio.sleep(0.02)

        # Stopping twice is a conflict; the recording stays as it was.
        r = await s.client.post(f"/v1/recordings/{key}/stop")
        assert r.status_code == 409
        assert "already stopped" in r.json()["error"]


async def test_default_format_is_opus_and_recordings_never_capture_twice(
    tmp_path: Path
) -> None:
    async with serve(tmp_path) as s:
        first = s.agent.ring.head
        keys = []
        for name in ("a", "b"):  # two at once, over the same capture
            r = await s.client.post("/v1/recordings", params={"prefix": name})
            assert r.status_code == 201
            keys.append(r.json()["key"])
        await s.source.run_to(first + 2 * RATE)
        results = [(await s.client.post(f"/v1/recordings/{k}/stop")).json() for k in keys]
        assert [x["content_type"] for x in results] == ["audio/ogg; codecs=opus"] * 2
        assert [x["seconds"] for x in results] == [2.0, 2.0]
        spool = s.agent.spool
        assert spool is not None
        for x in results:
            decoded = decode_ogg_opus_file(spool.audio_path(x["id"]))
            assert decoded.input_rate == RATE
            assert decoded.seconds == pytest.approx(2.0, abs=0.03)
        # One capture: the ring's frames were written once; the readers were extra.
        assert s.agent.ring.head == first + 2 * RATE


async def test_bad_requests(tmp_path: Path) -> None:
    async with serve(tmp_path, max_active=1) as s:
        c = s.client
        r = await c.post("/v1/recordings", params={"format": "aac"})
        assert (r.status_code, r.json()["parameter"]) == (400, "format")
        r = await c.post("/v1/recordings", params={"prefix": ".."})
        assert (r.status_code, r.json()["parameter"]) == (400, "prefix")
        r = await c.post("/v1/recordings", params={"label": "x"})
        assert (r.status_code, r.json()["parameter"]) == (400, "label")
        # Bad keys are 400, unknown well-formed ones 404.
        for bad in ("session-1/not-an-id", "a%20b/20261124T053000.000Z-3f9a1c2b",
                    "20261124T053000.000Z-3F9A1C2B"):
            r = await c.post(f"/v1/recordings/{bad}/stop")
            assert (r.status_code, r.json()["parameter"]) == (400, "key"), bad
        r = await c.post("/v1/recordings/session-1/20261124T053000.000Z-3f9a1c2b/stop")
        assert r.status_code == 404
        # Bounded: one at a time here.
        r = await c.post("/v1/recordings")
        assert r.status_code == 201
        key = r.json()["key"]
        assert re.fullmatch(ID, key)  # no prefixes: the key is the id
        r = await c.post("/v1/recordings")
        assert r.status_code == 429
        assert "recordings.max_active" in r.json()["error"]
        await s.source.run_to(s.agent.ring.head + RATE // 2)
        assert (await c.post(f"/v1/recordings/{key}/stop")).status_code == 200
        # The routes want the token like every other route.
        r = await c.get("/v1/recordings", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401


async def test_a_recording_stops_by_itself_at_max_seconds(tmp_path: Path) -> None:
    async with serve(tmp_path, max_seconds=1.0, format="flac") as s:
        first = s.agent.ring.head
        key = (await s.client.post("/v1/recordings", params={"prefix": "cap"})).json()["key"]
        await s.source.run_to(first + 3 * RATE)
        with trio.fail_after(10):
            while (await s.client.get("/v1/recordings")).json()[0]["state"] == "recording":  # noqa: ASYNC110
                await trio.sleep(0.02)
        listed = (await s.client.get("/v1/recordings")).json()
        assert listed[0]["key"] == key and listed[0]["seconds"] == 1.0
        assert listed[0]["content_type"] == "audio/ogg; codecs=flac"
        assert (await s.client.post(f"/v1/recordings/{key}/stop")).status_code == 409
        recordings = s.agent.recordings
        assert recordings is not None and recordings.stats.auto_stopped == 1



async def test_shutdown_seals_a_recording_in_progress(tmp_path: Path) -> None:
    async with serve(tmp_path) as s:
        first = s.agent.ring.head
        r = await s.client.post("/v1/recordings", params={"prefix": "late", "format": "wav"})
        key = r.json()["key"]
        await s.source.run_to(first + RATE)
        agent = s.agent
    # The agent stopped (SIGTERM would do the same) with the recording open: it was
    # sealed into the spool within the grace time, whole.
    assert agent.spool is not None
    sealed = [m for m, _ in agent.spool.list() if m.recording == key]
    assert len(sealed) == 1
    audio, _ = read_wav(agent.spool.audio_path(sealed[0].id))
    assert np.array_equal(audio, AUDIO[first:first + RATE])


class _Killed(BaseException):
    """The process died at this point."""


class _DieAtMeta(FileOps):
    def before(self, op: str, path: str) -> None:
        if op == "create" and path.endswith("meta.json"):
            raise _Killed()


@pytest.mark.parametrize("fmt", ["mp3", "wav"])
def test_a_crash_while_publishing_never_uploads_a_half_known_recording(
    tmp_path: Path, fmt: str
) -> None:
    config = SegmentsConfig(min_free_mb=0)
    spool = Spool(tmp_path / "spool", device_id="d", config=config, clock=ManualClock(),
                  fs=_DieAtMeta())
    spool.recover()
    audio = tmp_path / f"rec.{fmt}"
    audio.write_bytes(b"\x01" * 4000)
    with pytest.raises(_Killed):
        spool.publish_file(audio, fmt=fmt, start_ts=1_800_000_000.0, mono_start=1.0,
                           mono_end=2.0, frames=16000, rate=RATE, channels=1,
                           sample_format="int16", clock_synced=True, recording="a/b")
    again = Spool(tmp_path / "spool", device_id="d", config=config, clock=ManualClock())
    report = again.recover()
    assert again.pending() == []  # nothing half-written is ever uploaded
    assert len(report.newly_quarantined) == 1  # ... and the audio is kept, with a reason
    assert report.newly_quarantined[0][1] == "no readable open.json for the audio"
