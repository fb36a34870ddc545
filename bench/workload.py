"""What the agent is fed in every agent measurement: the benchmark audio (the
bundled speech sample at varying levels over a noise floor, 48 kHz stereo), the
agent configuration the issue describes, and a capped file source that applies
backpressure in fast runs and records how late each block was in real time.

Measures nothing by itself. Imports `edge_agent` as an installed library only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from bench.common import BENCH_CHANNELS, BENCH_RATE, BLOCK_MS, DEVICE_ID
from edge_agent.audio.pcm import SampleFormat, from_float32, mix_down, read_wav, write_wav
from edge_agent.audio.resample import resample
from edge_agent.capture import Block, FileSource, SourceStats
from edge_agent.clock import SystemClock
from edge_agent.config import AgentConfig, validate
from edge_agent.demo import sample_path

__all__ = ["CappedSource", "agent_config", "capped_source", "make_bench_audio"]

def make_bench_audio(path: Path, seconds: float, *, seed: int = 7) -> Path:
    """Write `seconds` of 48 kHz stereo int16 speech to `path` and return it.

    The bundled speech sample recurs at levels from -8 to 0 dB with pauses of
    0.5 to 3 s, over a -55 dBFS noise floor (a real microphone never delivers
    digital silence, and Opus encodes silence much more cheaply); the right
    channel is a quieter copy delayed by 0.5 ms with its own noise.
    """
    rng = np.random.default_rng(seed)
    pcm, rate = read_wav(sample_path())
    speech = resample(mix_down(pcm, 1)[:, 0], rate, BENCH_RATE)
    n = round(seconds * BENCH_RATE)
    mono = np.zeros(n, dtype=np.float32)
    pos = int(rng.uniform(0.1, 0.5) * BENCH_RATE)
    while pos < n:
        gain = 10 ** (rng.uniform(-8.0, 0.0) / 20)
        take = min(len(speech), n - pos)
        mono[pos:pos + take] += gain * speech[:take]
        pos += take + int(rng.uniform(0.5, 3.0) * BENCH_RATE)
    floor = 10 ** (-55 / 20)
    delay = BENCH_RATE // 2000
    right = np.concatenate([np.zeros(delay, np.float32), mono[:-delay]]) * 0.8
    stereo = np.stack([mono, right], axis=1)
    stereo += rng.normal(0.0, floor, stereo.shape).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, from_float32(np.clip(stereo, -1, 1).astype(np.float32),
                                 SampleFormat.INT16), BENCH_RATE)
    return path


@dataclass
class CappedSource:
    """Blocks of `inner` until `frames` frames were delivered.

    In a fast run, `hold()` returning True pauses capture until the agent's
    readers catch up: "as fast as possible" must not mean "faster than the
    pipeline", or the ring would evict audio the encoders never saw and the CPU
    per audio hour would look better than it is. In real time, the delay of each
    block behind its due time is recorded (capture must stay on time).
    """

    inner: FileSource
    frames: int
    hold: Callable[[], bool] | None = None
    deadline: float | None = None  # Trio time after which capture ends early
    late: list[float] = field(default_factory=list)
    held_seconds: float = 0.0  # capture paused for the pipeline to catch up
    rate: int = field(init=False)
    channels: int = field(init=False)
    format: SampleFormat = field(init=False)
    stats: SourceStats = field(init=False)

    def __post_init__(self) -> None:
        self.rate, self.channels = self.inner.rate, self.inner.channels
        self.format, self.stats = self.inner.format, self.inner.stats

    @asynccontextmanager
    async def open(self) -> AsyncIterator[AsyncIterator[Block]]:
        async with self.inner.open() as blocks:
            yield self._blocks(blocks)

    async def _blocks(self, blocks: AsyncIterator[Block]) -> AsyncIterator[Block]:
        delivered = 0
        start = trio.current_time()
        since_check = 0
        async for block in blocks:
            n = min(len(block.frames), self.frames - delivered)
            if n <= 0:
                break
            if self.inner.realtime:
                due = start + (delivered + n) / self.rate
                self.late.append(max(0.0, trio.current_time() - due))
            delivered += n
            since_check += n
            if since_check >= self.rate:
                since_check = 0
                while self.hold is not None and self.hold():
                    self.held_seconds += 0.005
                    await trio.sleep(0.005)
                if self.deadline is not None and trio.current_time() > self.deadline:
                    delivered = self.frames
            yield block if n == len(block.frames) else Block(block.frames[:n], block.utc,
                                                              block.mono)
            if delivered >= self.frames:
                break


def agent_config(data_dir: Path, wav: Path, backend_url: str, *, realtime: bool,
                 stt: dict[str, Any] | None, block_ms: int = BLOCK_MS) -> AgentConfig:
    """The agent the issue describes: a 48 kHz stereo file source, STT chunks at
    16 kHz mono 24 kbit/s Opus, 60 s segments at 32 kbit/s Opus, uploads."""
    raw: dict[str, Any] = {
        "device": {"id": DEVICE_ID, "data_dir": str(data_dir)},
        "capture": {"source": "file", "file": str(wav), "realtime": realtime, "loop": True,
                    "rate": BENCH_RATE, "channels": BENCH_CHANNELS, "format": "int16",
                    "block_ms": block_ms},
        "ring": {"seconds": 300},
        "segments": {"enabled": True, "seconds": 60, "format": "opus", "bitrate": 32000},
        "upload": {"enabled": True,
                   "url": backend_url + "/v1/devices/{device}/segments/{segment}",
                   "backoff_initial_seconds": 0.2, "backoff_max_seconds": 2.0},
    }
    if stt is not None:
        raw["stt"] = {"enabled": True, "protocol": "raw", "url": backend_url + "/v1/stt/raw",
                      "rate": 16000, "bitrate": 24000, **stt}
    return validate(raw)


def capped_source(config: AgentConfig, seconds: float) -> CappedSource:
    cap = config.capture
    inner = FileSource(Path(cap.file), cap.rate, cap.channels, SampleFormat(cap.format),
                       SystemClock(), block_ms=cap.block_ms, realtime=cap.realtime,
                       loop=True)
    return CappedSource(inner, round(seconds * cap.rate))
