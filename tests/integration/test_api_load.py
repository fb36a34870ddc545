"""Load: 50 concurrent clients on /v1/audio and segment downloads while the agent
captures in real time.

The agent (real-time `FileSource` looping the bundled speech sample, Opus
segments, live STT to the reference backend, the API) runs in this process; the
clients run in a separate process (this file run as a script), as the backend
would be, so their own work does not slow the agent's event loop; a third process
times `/healthz` throughout, as a monitoring system would.

What is asserted are counts: capture kept real-time pace, no reader overran the
ring, the segmenter and STT lost nothing, no request failed with a 5xx other than
the documented 503 (busy), every body arrived whole; and the p95 latency of
`/healthz` stayed under 100 ms. Latencies are printed.

The issue asks for a minute; CI runs 15 s with 50 clients. The full minute, or
another number of clients:

    EDGE_AGENT_LOAD_SECONDS=60 EDGE_AGENT_LOAD_CLIENTS=200 \
        .venv/bin/python -m pytest tests/integration/test_api_load.py -s
"""

from __future__ import annotations

import http.client
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

LOAD_SECONDS = float(os.environ.get("EDGE_AGENT_LOAD_SECONDS", "15"))
CLIENTS = int(os.environ.get("EDGE_AGENT_LOAD_CLIENTS", "50"))
TOKEN = "load-test-token-0123456789"
# The event loop may lag behind real time by this much at worst and still be "on
# pace" (a block is 20 ms).
PACE_SLACK_SECONDS = 1.0


# ----------------------------------------------------------------------------
# The client process


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


async def _client_main(url: str, token: str, seconds: float, clients: int) -> dict[str, Any]:
    stats: dict[str, Any] = {"status": {}, "bytes": 0, "incomplete": 0, "errors": [],
                             "latency": {"audio": [], "download": []}}
    segment_ids: list[str] = []
    deadline = trio.current_time() + seconds
    first = time.time()  # the agent started capturing just before
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)

    def count(kind: str, status: int) -> None:
        key = f"{kind} {status}"
        stats["status"][key] = stats["status"].get(key, 0) + 1

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60,
                                 headers={"Authorization": f"Bearer {token}"}) as client:

        async def fetch(kind: str, path: str, **kw: Any) -> httpx.Response | None:
            began = time.monotonic()
            try:
                r = await client.get(path, **kw)
            except httpx.HTTPError as exc:  # a body cut off, a reset connection
                stats["errors"].append(f"{kind}: {type(exc).__name__}: {exc}"[:200])
                count(kind, 0)
                return None
            count(kind, r.status_code)
            if r.status_code in (200, 206):
                stats["latency"][kind].append(time.monotonic() - began)
                stats["bytes"] += len(r.content)
                length = r.headers.get("content-length")
                if length is not None and int(length) != len(r.content):
                    stats["incomplete"] += 1
            return r

        async def worker(n: int) -> None:
            rng = random.Random(n)
            while trio.current_time() < deadline:
                if segment_ids and rng.random() < 0.4:
                    seg = rng.choice(segment_ids)
                    headers = {"Range": f"bytes={rng.randrange(0, 2000)}-"} if rng.random() < 0.5 \
                        else {}
                    r = await fetch("download", f"/v1/segments/{seg}", headers=headers)
                else:
                    now = time.time()
                    start = now - rng.uniform(1.5, max(1.6, min(25.0, now - first)))
                    end = min(now - 0.2, start + rng.uniform(1, 12))
                    fmt = rng.choice(["pcm", "wav", "opus", "flac"])
                    params = {"start": iso(start), "end": iso(end), "format": fmt}
                    if rng.random() < 0.5:
                        params["rate"] = str(rng.choice([8000, 16000, 48000]))
                    r = await fetch("audio", "/v1/audio", params=params)
                if r is not None and r.status_code == 503:
                    await trio.sleep(rng.uniform(0.05, 0.5))

        async def lister() -> None:
            while trio.current_time() < deadline:
                r = await client.get("/v1/segments", params={"limit": "50"})
                if r.status_code == 200:
                    segment_ids[:] = [row["id"] for row in r.json()["segments"]]
                await trio.sleep(1.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lister)
            for n in range(clients):
                nursery.start_soon(worker, n)
    stats["errors"] = stats["errors"][:20]
    return stats


def _probe(url: str, seconds: float) -> dict[str, Any]:
    """Time `/healthz` as a monitoring system would: a plain blocking client on a
    keep-alive connection, in a process of its own so nothing else delays it."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        began = time.monotonic()
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        latencies.append(time.monotonic() - began)
        key = f"healthz {response.status}"
        statuses[key] = statuses.get(key, 0) + 1
        time.sleep(0.05)
    conn.close()
    return {"latency": latencies, "status": statuses}


def _run_probe(argv: list[str]) -> None:
    print(json.dumps(_probe(argv[0], float(argv[1]))))


def _run_client(argv: list[str]) -> None:
    url, token, seconds, clients = argv[0], argv[1], float(argv[2]), int(argv[3])
    result = trio.run(_client_main, url, token, seconds, clients)
    print(json.dumps(result))


# ----------------------------------------------------------------------------
# The test


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@pytest.mark.slow
async def test_load(tmp_path: Path) -> None:
    from edge_agent.agent import Agent
    from edge_agent.config import validate
    from edge_agent.demo import sample_path
    from edge_agent.reference import Backend, SttReceiver, run_backend

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    backend = Backend(tmp_path / "backend", stt=SttReceiver(recognise=False))
    async with trio.open_nursery() as services:
        backend_url = await services.start(run_backend, backend, "127.0.0.1:0")
        config = validate({
            "device": {"id": "load-1", "data_dir": str(tmp_path / "data")},
            "capture": {"source": "file", "file": str(sample_path()), "realtime": True,
                        "loop": True, "rate": 48000, "channels": 1, "format": "int16"},
            "ring": {"seconds": 60},
            "segments": {"seconds": 5, "format": "opus", "min_free_mb": 0},
            "stt": {"enabled": True, "protocol": "raw", "url": backend_url + "/v1/stt/raw"},
            "api": {"enabled": True, "listen": "127.0.0.1:0", "token_file": str(token_file),
                    # Every client gets a connection: the load, not the cap, is measured.
                    "max_connections": max(64, CLIENTS + 16)},
        })
        agent = Agent(config)
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            began = trio.current_time()
            assert agent.api is not None and agent.api.url is not None
            runs: dict[str, Any] = {}

            async def run(role: str, *args: str) -> None:
                runs[role] = await trio.run_process(
                    [sys.executable, __file__, role, *args], capture_stdout=True, check=True)

            async with trio.open_nursery() as clients:
                clients.start_soon(run, "--client", agent.api.url, TOKEN, str(LOAD_SECONDS),
                                   str(CLIENTS))
                clients.start_soon(run, "--probe", agent.api.url, str(LOAD_SECONDS))
            elapsed = trio.current_time() - began
            captured = agent.ring.head / agent.ring.rate
            readers = {r.name: (r.overruns, r.lag / agent.ring.rate)
                       for r in agent.ring.readers()}
            stt, segmenter, api = agent.stt, agent.segmenter, agent.api
            assert stt is not None and segmenter is not None
            stt_stats, seg_stats = stt.statistics(), segmenter.stats
            async with httpx.AsyncClient(base_url=agent.api.url) as client:
                metrics = (await client.get("/metrics", headers={
                    "Authorization": f"Bearer {TOKEN}"})).text
            agent.stop()
        services.cancel_scope.cancel()

    result = json.loads(runs["--client"].stdout)
    probe = json.loads(runs["--probe"].stdout)
    lat = {**result["latency"], "healthz": probe["latency"]}
    status: dict[str, int] = {**result["status"], **probe["status"]}
    print(f"\nload: {CLIENTS} clients for {LOAD_SECONDS:g} s, agent ran {elapsed:.1f} s and "
          f"captured {captured:.1f} s")
    print(f"responses: {json.dumps(dict(sorted(status.items())))}")
    print(f"body bytes: {result['bytes']}, incomplete bodies: {result['incomplete']}, "
          f"errors: {result['errors']}")
    for kind in ("healthz", "audio", "download"):
        values = lat[kind]
        print(f"{kind} latency over {len(values)} ok responses: p50 "
              f"{_percentile(values, 50) * 1000:.0f} ms, p95 {_percentile(values, 95) * 1000:.0f} "
              f"ms, max {max(values, default=float('nan')) * 1000:.0f} ms")
    print(f"readers (overruns, lag s): {readers}")
    print(f"stt: {stt_stats.chunks_sent} chunks sent, {stt_stats.dropped} dropped, backlog "
          f"{stt_stats.backlog_seconds:.1f} s; segmenter: {seg_stats.segments_sealed} sealed, "
          f"{seg_stats.lost_frames} frames lost; api: {api.stats.audio_busy} busy, "
          f"{api.stats.audio_aborted} aborted")

    # Capture kept real-time pace, and nothing reading the ring fell behind.
    assert captured >= elapsed - PACE_SLACK_SECONDS
    assert all(overruns == 0 for overruns, _lag in readers.values()), readers
    assert seg_stats.lost_frames == 0 and seg_stats.failures == 0
    # ... and it is still keeping up at the end: behind by at most its batch (it
    # takes the ring's audio a batch at a time) and a moment.
    assert readers["segmenter"][1] < segmenter.batch_seconds + 1.0
    assert stt_stats.overruns == 0 and stt_stats.dropped == 0 and stt_stats.chunks_sent > 0
    # The clients got audio and files, whole; the only 5xx is the documented busy 503.
    assert status.get("audio 200", 0) >= 10 and status.get("download 200", 0) > 0
    assert not [k for k in status if k.split()[1].startswith("5") and k.split()[1] != "503"]
    assert result["incomplete"] == 0 and result["errors"] == []
    assert api.stats.audio_aborted == 0
    assert status.get("healthz 200", 0) == len(lat["healthz"]) > 0
    # Every transcribed chunk's round trip is in the STT latency histogram.
    samples = {sm.name: sm.value for fam in text_string_to_metric_families(metrics)
               for sm in fam.samples if not sm.labels}
    assert samples["edge_agent_stt_latency_seconds_count"] == stt_stats.chunks_sent
    assert samples["edge_agent_stt_chunks_sent_total"] == stt_stats.chunks_sent
    # /healthz stays responsive under the load (measured 10-20 ms p95 on 2 cores,
    # also with both cores busy with other work).
    assert _percentile(lat["healthz"], 95) < 0.1


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--client":
    _run_client(sys.argv[2:])
if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--probe":
    _run_probe(sys.argv[2:])
