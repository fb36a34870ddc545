"""5: latency. The whole agent on a real-time source with two STT streamers on
one ring (fixed 2 s chunks and VAD chunks); an httpx transport notes when each
request leaves and its answer is back, and every 20 ms block is timed from its
capture to the request holding it and to the transcript.

Imports `edge_agent` as an installed library only.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.common import BLOCK_MS, DEVICE_ID, spread
from bench.workload import agent_config, capped_source
from edge_agent.agent import Agent
from edge_agent.config import SttConfig
from edge_agent.stt import SttStreamer
from edge_agent.wire import RAW_HEADERS

__all__ = ["latency_result", "latency_run"]

class _RecordingTransport(httpx.AsyncBaseTransport):
    """An httpx transport that notes when each STT request left and when its
    whole answer was back, with the chunk's place on the timeline."""

    def __init__(self, clock: Any) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.clock = clock
        self.records: list[tuple[float, float, float, float]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent = self.clock.utc()
        resp = await self.inner.handle_async_request(request)
        body = await resp.aread()
        await resp.aclose()
        answered = self.clock.utc()
        start = datetime.fromisoformat(request.headers[RAW_HEADERS["start"]]).timestamp()
        duration = float(request.headers[RAW_HEADERS["duration"]])
        self.records.append((start, duration, sent, answered))
        return httpx.Response(resp.status_code, headers=resp.headers, content=body,
                              extensions=resp.extensions)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _block_latencies(records: list[tuple[float, float, float, float]]
                     ) -> tuple[list[float], list[float]]:
    """Per 20 ms block of every chunk: seconds from the block being captured (its
    end) to the request holding it, and to the transcript."""
    to_request: list[float] = []
    to_text: list[float] = []
    block = BLOCK_MS / 1000
    for start, duration, sent, answered in records:
        for k in range(1, math.ceil(duration / block - 1e-9) + 1):
            captured = start + min(k * block, duration)
            to_request.append(sent - captured)
            to_text.append(answered - captured)
    return to_request, to_text


async def latency_run(p: dict[str, Any]) -> dict[str, Any]:
    """Child process: the whole agent on a real-time file source, with two STT
    streamers on the same ring: fixed 2 s chunks and VAD chunks."""
    data_dir = Path(p["data_dir"])
    config = agent_config(data_dir, Path(p["wav"]), p["backend_url"], realtime=True, stt=None)
    source = capped_source(config, p["seconds"])
    agent = Agent(config, source=source)
    modes: dict[str, dict[str, Any]] = {"fixed": {"chunking": "fixed", "chunk_seconds": 2.0},
                                        "vad": {"chunking": "vad"}}
    streamers: dict[str, tuple[SttStreamer, _RecordingTransport]] = {}
    for name, extra in modes.items():
        stt_cfg: SttConfig = agent_config(data_dir, Path(p["wav"]), p["backend_url"],
                                          realtime=True, stt=extra).stt
        transport = _RecordingTransport(agent.clock)
        streamer = SttStreamer(stt_cfg, agent.ring, device_id=DEVICE_ID,
                               data_dir=data_dir / f"stt-{name}", clock=agent.clock,
                               transport=transport)
        streamers[name] = (streamer, transport)
        agent.add_task(f"stt-{name}", streamer.run)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await agent.capture_finished.wait()
        with trio.move_on_after(30):
            for streamer, _ in streamers.values():
                await streamer.wait_idle()
        agent.stop()
    out: dict[str, Any] = {"seconds": agent.ring.head / agent.ring.rate,
                           "capture_late_ms_max": max(source.late, default=0.0) * 1e3}
    # The chunk holding the end of the capture is only cut by the idle flush
    # (`idle_flush_seconds` without audio): an artefact of the source ending, left out.
    capture_end = agent.ring.index_to_utc(agent.ring.head)
    for name, (streamer, transport) in streamers.items():
        records = [r for r in transport.records if r[0] + r[1] < capture_end - 0.1]
        to_request, to_text = _block_latencies(records)
        out[name] = {"chunks": len(records),
                     "last_block_to_request_s": spread([r[2] - r[0] - r[1] for r in records]),
                     "to_request_s": spread(to_request), "to_transcript_s": spread(to_text),
                     "chunk_seconds": spread([r[1] for r in records]),
                     "dropped": streamer.stats.dropped,
                     "samples_to_request": [round(v, 4) for v in to_request[::5]],
                     "samples_to_transcript": [round(v, 4) for v in to_text[::5]]}
    return out


def latency_result(lat: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": "real-time FileSource; per 20 ms block, from its capture (end) to the "
                  "request holding it and to the transcript",
        "backend": "The loopback reference backend decodes each chunk with libopusfile and "
                   "answers with its duration (no speech recognition), so the transcript "
                   "figures are the agent's and the network's share; a real STT service "
                   "adds its own processing time.",
        "seconds": round(lat["seconds"], 2),
        "fixed": {k: v for k, v in lat["fixed"].items() if not k.startswith("samples")},
        "vad": {k: v for k, v in lat["vad"].items() if not k.startswith("samples")},
        "capture_late_ms_max": round(lat["capture_late_ms_max"], 2),
    }
