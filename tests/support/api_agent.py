"""An agent served on loopback with a scripted capture (`serve_agent`): known audio
with two capture holes, a token, and helpers to read it back through the API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio
from numpy.typing import NDArray

from edge_agent.agent import Agent
from edge_agent.audio.pcm import SampleFormat
from edge_agent.capture import Block, SourceStats
from edge_agent.clock import ManualClock, iso_utc
from edge_agent.config import validate
from edge_agent.ring import AudioRing

from support.waiting import until

RATE = 16000


T0 = 1_800_000_000.0  # a multiple of the segment length: segments start on it


BLOCK = 320  # 20 ms


TOKEN = "test-token-0123456789abcdef"


# The capture timeline: (first audio second, last audio second, capture time of the
# first) for each stretch; holes at 21..23 s (spool only) and 37..38 s (in the ring).
RUNS = [(0.0, 21.0, 0.0), (21.0, 35.0, 23.0), (35.0, 40.0, 38.0)]


AUDIO_SECONDS = 40.0


RING_SECONDS = 15.0  # holds capture times 27..43 at the end: the second hole is in it


def make_signal(seconds: float = AUDIO_SECONDS, rate: int = RATE) -> NDArray[np.int16]:
    """A chirp (150 Hz -> 3 kHz) plus a little noise: no two stretches look alike."""
    t = np.arange(int(seconds * rate)) / rate
    f0, f1 = 150.0, 3000.0
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * seconds))
    noise = np.random.default_rng(7).standard_normal(len(t)) * 0.02
    return ((0.4 * np.sin(phase) + noise) * 32767).astype(np.int16)


SIGNAL = make_signal()



def at(seconds: float) -> str:
    return iso_utc(T0 + seconds)


class ScriptedSource:
    """Delivers SIGNAL in 20 ms blocks stamped per RUNS, as fast as the readers
    keep up (every reader stays within half the ring), after the agent is ready."""

    def __init__(self, agent_ready: Callable[[], trio.Event], ring: Callable[[], AudioRing]):
        self.rate, self.channels, self.format = RATE, 1, SampleFormat.INT16
        self.stats = SourceStats()
        self._ready = agent_ready
        self._ring = ring

    @asynccontextmanager
    async def open(self) -> AsyncIterator[AsyncIterator[Block]]:
        yield self._blocks()

    async def _blocks(self) -> AsyncIterator[Block]:
        await self._ready().wait()
        ring = self._ring()
        for a0, a1, t in RUNS:
            for i in range(round(a0 * RATE), round(a1 * RATE), BLOCK):
                await until(lambda: all(r.lag <= ring.capacity // 2 for r in ring.readers()))
                offset = t + (i / RATE - a0)
                self.stats.blocks += 1
                self.stats.frames += BLOCK
                yield Block(SIGNAL[i : i + BLOCK, None], T0 + offset, 1000.0 + offset)
                await trio.lowlevel.checkpoint()


async def all_sealed(agent: Agent) -> None:
    """Wait until the segmenter has sealed every closed 5 s segment of the scripted
    timeline (call once capture has finished, under a timeout)."""
    segmenter = agent.segmenter
    assert segmenter is not None
    await until(lambda: bool(segmenter.sealed)
                and segmenter.sealed[-1].end_ts >= T0 + AUDIO_SECONDS - 1e-6)


@dataclass
class Served:
    agent: Agent
    client: httpx.AsyncClient
    url: str
    clock: ManualClock
    data_dir: Path


def agent_config(data_dir: Path, token_file: Path, **api: Any) -> Any:
    return validate({
        "device": {"id": "dev-api", "data_dir": str(data_dir)},
        "capture": {"source": "tone", "rate": RATE, "channels": 1, "format": "int16"},
        "ring": {"seconds": RING_SECONDS},
        "segments": {"seconds": 5, "format": api.pop("segment_format", "wav"),
                     "bitrate": api.pop("segment_bitrate", 32000), "min_free_mb": 0},
        "api": {"enabled": True, "listen": "127.0.0.1:0", "token_file": str(token_file),
                **api},
    })


@asynccontextmanager
async def serve_agent(tmp_path: Path, **api: Any) -> AsyncIterator[Served]:
    """An agent that captured the scripted timeline, its API on loopback, and a client."""
    data_dir = tmp_path / "data"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = agent_config(data_dir, token_file, **api)
    clock = ManualClock(utc_now=T0, mono_now=1000.0)
    holder: dict[str, Agent] = {}
    source = ScriptedSource(lambda: holder["agent"].ready, lambda: holder["agent"].ring)
    agent = Agent(config, clock=clock, source=source)
    holder["agent"] = agent
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await agent.capture_finished.wait()
        with trio.fail_after(10):
            await all_sealed(agent)
        clock.advance(60.0)  # "now" is after the capture
        assert agent.api is not None and agent.api.url is not None
        async with httpx.AsyncClient(base_url=agent.api.url, timeout=20,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            yield Served(agent, client, agent.api.url, clock, data_dir)
        agent.stop()
