"""Live transcription against the real reference backend on loopback: the three
wire protocols field by field, what the server refuses, and faults (down, slow,
503 storms, garbage, lost responses) while a real-time source keeps capturing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio

from edge_agent.agent import Agent
from edge_agent.clock import ManualClock, iso_utc
from edge_agent.config import validate
from edge_agent.reference import Backend, SttReceiver
from edge_agent.ring import AudioRing
from edge_agent.stt import SttStats, SttStreamer

from support.faults import Faults, run_backend
from support.signals import encode_ogg_opus

RATE = 16000
PATHS = {"openai": "/v1/audio/transcriptions", "deepgram": "/v1/listen", "raw": "/v1/stt/raw"}


def stt_section(**over: Any) -> dict[str, Any]:
    return {"enabled": True, "protocol": "raw", "url": "http://127.0.0.1:9/x",
            "chunking": "fixed", "chunk_seconds": 1.0, **over}


def tone(seconds: float) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (3000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16).reshape(-1, 1)


async def test_three_protocols_field_by_field(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok-123\n")
    backend = Backend(tmp_path / "backend", faults=Faults())
    backend.stt = SttReceiver(recognise=False, token="tok-123")
    async with trio.open_nursery() as nursery:
        base = await nursery.start(run_backend, backend)
        streams = {}
        for protocol, path in PATHS.items():
            query = "?model=nova-2" if protocol == "deepgram" else ""
            cfg = validate({"stt": stt_section(
                protocol=protocol, url=base + path + query, token_file=str(tmp_path / "token"),
                model="whisper-1" if protocol == "openai" else "", language="en",
                prompt="kitchen radio")}).stt
            ring = AudioRing(rate=RATE, channels=1, dtype="int16", seconds=10)
            s = SttStreamer(cfg, ring, device_id="dev-7", data_dir=tmp_path / protocol,
                            clock=ManualClock())
            ring.write(tone(2.0), utc=1_800_000_000.0, mono=100.0, synced=True)
            await nursery.start(s.run)
            streams[protocol] = s
        with trio.fail_after(20):
            for s in streams.values():
                await s.wait_idle()
        nursery.cancel_scope.cancel()

    records = {p: [r for r in backend.stt.records if r.protocol == p] for p in PATHS}
    assert [len(v) for v in records.values()] == [2, 2, 2]
    for protocol, s in streams.items():
        st = s.statistics()
        assert (st.chunks_cut, st.chunks_sent, st.retries, st.dropped) == (2, 2, 0, 0)
        assert [t.text for t in s.recent] == ["[1.00 s of audio]"] * 2
        assert [r.seconds for r in records[protocol]] == pytest.approx([1.0, 1.0], abs=0.01)

    openai = records["openai"][0]
    assert openai.fields == {"model": "whisper-1", "language": "en", "prompt": "kitchen radio",
                             "response_format": "json"}
    assert (openai.filename, openai.content_type) == ("chunk.ogg", "audio/ogg")
    assert openai.headers["authorization"] == "Bearer tok-123"
    assert openai.headers["content-type"].startswith("multipart/form-data")

    deepgram = records["deepgram"][0]
    assert deepgram.fields == {"model": "nova-2", "language": "en"}
    assert deepgram.content_type == "audio/ogg"
    assert deepgram.headers["authorization"] == "Token tok-123"

    raw = records["raw"]
    assert [r.content_type for r in raw] == ["audio/ogg; codecs=opus"] * 2
    assert [r.headers["x-sequence"] for r in raw] == ["0", "1"]
    assert {r.headers["x-stream-id"] for r in raw} == {streams["raw"].stream_id}
    assert [r.headers["x-device-id"] for r in raw] == ["dev-7", "dev-7"]
    assert [r.headers["x-chunk-start"] for r in raw] == [iso_utc(1_800_000_000.0),
                                                         iso_utc(1_800_000_001.0)]
    assert [r.headers["x-chunk-duration"] for r in raw] == ["1.000000", "1.000000"]
    assert [r.headers["x-clock-synced"] for r in raw] == ["true", "true"]
    assert [t.start_utc for t in streams["raw"].recent] == [iso_utc(1_800_000_000.0),
                                                            iso_utc(1_800_000_001.0)]


async def test_the_reference_server_refuses_what_real_services_refuse(tmp_path: Path) -> None:
    backend = Backend(tmp_path / "backend", faults=Faults())
    backend.stt = SttReceiver(recognise=False, token="t")
    ogg = encode_ogg_opus(tone(0.5), RATE, bitrate=24000, application="voip")
    good = {"X-Device-Id": "d", "X-Stream-Id": "s", "X-Sequence": "0",
            "X-Chunk-Start": "2027-01-15T08:00:00.000000Z", "X-Chunk-Duration": "0.5",
            "Content-Type": "audio/ogg; codecs=opus", "Authorization": "Bearer t"}
    async with trio.open_nursery() as nursery:
        base = await nursery.start(run_backend, backend)
        async with httpx.AsyncClient(base_url=base) as client:
            r = await client.post("/v1/audio/transcriptions", headers={"Authorization": "Bearer t"},
                                  files={"file": ("chunk.opus", ogg, "audio/ogg")})
            assert r.status_code == 400 and "expected .ogg" in r.json()["error"]["message"]
            r = await client.post("/v1/stt/raw", content=ogg, headers={**good, "X-Sequence": ""})
            assert (r.status_code, r.json()) == (400, {"error": "missing header X-Sequence"})
            r = await client.post("/v1/stt/raw", content=ogg,
                                  headers={**good, "X-Chunk-Start": "yesterday"})
            assert r.status_code == 400 and "ISO 8601" in r.json()["error"]
            r = await client.post("/v1/stt/raw", content=ogg, headers={**good, "Authorization": ""})
            assert r.status_code == 401
            r = await client.post("/v1/stt/raw", content=b"not ogg at all", headers=good)
            assert r.status_code == 400 and "not an Ogg Opus file" in r.json()["error"]
            r = await client.post("/v1/stt/raw", content=ogg, headers=good)
            assert r.status_code == 200 and r.json()["text"] == "[0.50 s of audio]"
        nursery.cancel_scope.cancel()
    assert (backend.stt.received, backend.stt.rejected) == (1, 5)


# ----------------------------------------------------------------------------
# Faults while a real-time source captures


class Run:
    """An agent capturing a real-time tone and streaming it to the backend."""

    def __init__(self, tmp_path: Path, backend: Backend, base: str, seconds: float,
                 **stt: Any) -> None:
        self.config = validate({
            "device": {"id": "dev-f", "data_dir": str(tmp_path / "data")},
            "capture": {"source": "tone", "rate": RATE, "realtime": True, "block_ms": 20,
                        "tone_seconds": seconds},
            "ring": {"seconds": 30},
            "segments": {"enabled": False},
            "stt": stt_section(
                url=base + "/v1/stt/raw", chunk_seconds=0.25, timeout_seconds=0.4,
                backoff_initial_seconds=0.05, backoff_max_seconds=0.2, max_age_seconds=1.5,
                backlog_seconds=1.0, backlog_bytes=16000, **stt),
        })
        self.agent = Agent(self.config)
        self.backend = backend
        assert self.agent.stt is not None
        self.stt = self.agent.stt
        self.max_lag = 0.0

    async def for_seconds(self, seconds: float) -> None:
        """Let it run; track how far capture lags behind real time."""
        end = trio.current_time() + seconds
        while trio.current_time() < end:
            await trio.sleep(0.05)
            produced = (time.monotonic() - self.t0) * RATE
            self.max_lag = max(self.max_lag, (produced - self.agent.ring.head) / RATE)
            st = self.stt.statistics()
            # Memory stays bounded whatever the endpoint does.
            assert st.backlog_seconds <= 1.0 and st.backlog_bytes <= 16000

    async def start(self, nursery: trio.Nursery) -> None:
        self.t0 = time.monotonic()
        await nursery.start(self.agent.run)

    async def finish(self) -> SttStats:
        """Wait for the source's end and until everything was sent or given up."""
        with trio.fail_after(20):
            await self.agent.capture_finished.wait()
            await self.stt.wait_idle()
        self.agent.stop()
        st = self.stt.statistics()
        print(f"capture lag max {self.max_lag * 1000:.0f} ms; {st}")
        # Capture kept its pace: nothing dropped, and the ring (fed once a reader has a
        # batch to take, or at least every second) never far behind real time.
        assert self.agent.source.stats.queue_drops == 0
        assert self.max_lag < 1.5
        assert st.backlog_peak_seconds <= 1.0 and st.backlog_peak_bytes <= 16000
        # Every chunk cut is accounted for exactly once.
        assert st.chunks_cut == st.chunks_sent + st.dropped + st.backlog_chunks
        assert st.backlog_chunks == 0
        return st


@pytest.mark.slow
async def test_stt_down_then_back(tmp_path: Path) -> None:
    backend = Backend(tmp_path / "backend", faults=Faults())
    backend.stt = SttReceiver(recognise=False)
    async with trio.open_nursery() as nursery:
        base = await nursery.start(run_backend, backend)
        backend.faults.down = True  # nothing listening: connections are refused
        run = Run(tmp_path, backend, base, seconds=4.0)
        await run.start(nursery)
        await run.for_seconds(2.5)
        down = run.stt.statistics()
        assert down.chunks_sent == 0 and down.requests > 2 and down.dropped > 0
        assert "ConnectError" in (down.last_error or "")
        assert "ConnectError" in run.agent.degraded()["stt"]
        backend.faults.down = False
        await run.for_seconds(1.5)
        st = await run.finish()
        nursery.cancel_scope.cancel()
    assert st.chunks_sent > 3  # it recovered by itself
    assert backend.stt.received == st.chunks_sent
    assert st.dropped_overflow + st.dropped_stale == st.dropped > 0


@pytest.mark.slow
async def test_a_503_storm_with_retry_after(tmp_path: Path) -> None:
    backend = Backend(tmp_path / "backend", faults=Faults())
    backend.stt = SttReceiver(recognise=False)
    backend.faults.retry_after = 1
    async with trio.open_nursery() as nursery:
        base = await nursery.start(run_backend, backend)
        backend.faults.unavailable = 4
        run = Run(tmp_path, backend, base, seconds=3.5)
        await run.start(nursery)
        await run.for_seconds(3.5)
        st = await run.finish()
        nursery.cancel_scope.cancel()
    assert backend.faults.unavailable == 0  # the storm hit the streamer
    # Chunks reach the streamer a batch at a time, so a chunk is older when it is
    # first sent: a 1 s Retry-After leaves room for fewer retries within max_age.
    assert st.retries >= 1 and st.requests >= st.chunks_sent + 4 and st.chunks_sent > 3
    assert backend.stt.received == st.chunks_sent
    # A Retry-After of 1 s is longer than the 0.2 s backoff cap: the retries waited
    # for it, so chunks aged out while the storm lasted.
    assert st.dropped > 0


@pytest.mark.slow
async def test_a_slow_endpoint_times_out_then_recovers(tmp_path: Path) -> None:
    backend = Backend(tmp_path / "backend", faults=Faults())
    backend.stt = SttReceiver(recognise=False)
    async with trio.open_nursery() as nursery:
        base = await nursery.start(run_backend, backend)
        backend.faults.delay_seconds = 1.0  # more than stt.timeout_seconds
        run = Run(tmp_path, backend, base, seconds=3.5)
        await run.start(nursery)
        await run.for_seconds(2.0)
        slow = run.stt.statistics()
        assert slow.chunks_sent == 0 and slow.retries > 0
        assert "no answer within 0.4 s" in (slow.last_error or "")
        backend.faults.delay_seconds = 0.0
        await run.for_seconds(1.5)
        st = await run.finish()
        nursery.cancel_scope.cancel()
    assert st.chunks_sent > 3


@pytest.mark.slow
async def test_garbage_and_lost_responses_are_counted_exactly(tmp_path: Path) -> None:
    backend = Backend(tmp_path / "backend", faults=Faults())
    backend.stt = SttReceiver(recognise=False)
    async with trio.open_nursery() as nursery:
        base = await nursery.start(run_backend, backend)
        backend.faults.extra["stt_garbage"] = 2
        run = Run(tmp_path, backend, base, seconds=2.5)
        await run.start(nursery)
        await run.for_seconds(1.0)
        assert run.stt.statistics().bad_responses == 2
        backend.faults.drop_response = 1
        await run.for_seconds(1.5)
        st = await run.finish()
        nursery.cancel_scope.cancel()
    assert st.bad_responses == 2  # malformed answers: counted, not sent again
    assert backend.faults.drop_response == 0 and st.retries >= 1  # the lost one was retried
    # The server decoded every chunk once, plus the one whose answer was lost.
    assert backend.stt.received == st.chunks_sent + st.bad_responses + 1
    assert st.dropped == 2 and st.chunks_sent > 3
