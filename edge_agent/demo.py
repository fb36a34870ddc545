"""`edge-agent demo`: the whole agent on any machine, with no mic and no network.

A bundled speech sample is played through `FileSource` at real time into the
ring and encoded to Ogg Opus files in a data directory. Each later stage (STT,
spool, upload, API) adds itself here so the demo always shows the real agent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import trio

from .agent import Agent
from .audio.opus import OggOpusEncoder
from .config import AgentConfig, validate
from .supervisor import TaskStatus

__all__ = ["DemoReport", "demo_config", "run_demo", "sample_path"]

log = logging.getLogger(__name__)


def sample_path() -> Path:
    """The bundled speech sample (espeak-ng, 16 kHz mono, two sentences)."""
    return Path(str(resources.files("edge_agent") / "data" / "speech.wav"))


def demo_config(data_dir: Path, *, realtime: bool = True) -> AgentConfig:
    return validate({
        "device": {"id": "demo-0001", "data_dir": str(data_dir)},
        "capture": {
            "source": "file", "file": str(sample_path()), "realtime": realtime,
            "rate": 48000, "channels": 1, "format": "int16", "block_ms": 20,
        },
        "ring": {"seconds": 60},
    })


@dataclass
class DemoReport:
    data_dir: Path
    seconds_captured: float = 0.0
    blocks: int = 0
    input_overflows: int = 0
    files: list[Path] = field(default_factory=list)
    bytes_written: int = 0


async def run_demo(data_dir: Path, *, realtime: bool = True) -> DemoReport:
    """Run the agent on the bundled sample until it has been fully processed."""
    config = demo_config(data_dir, realtime=realtime)
    agent = Agent(config)
    report = DemoReport(data_dir)
    out = data_dir / "recording.opus"
    writer_done = trio.Event()

    async def write_opus(task_status: TaskStatus) -> None:
        # Reads the ring from the first frame and encodes it as it arrives.
        reader = agent.ring.open_reader("demo-writer", start=0)
        encoder = OggOpusEncoder(config.capture.rate, config.capture.channels,
                                 bitrate=32000, application="audio")
        with out.open("wb") as f:
            task_status.started()
            while not (agent.capture_finished.is_set() and reader.lag == 0):
                with trio.move_on_after(0.2):
                    await reader.wait()
                chunk = reader.read()
                if len(chunk.frames):
                    f.write(await trio.to_thread.run_sync(encoder.write, chunk.frames))
            f.write(encoder.finish())
        encoder.close()
        writer_done.set()

    agent.add_task("demo-writer", write_opus)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await writer_done.wait()
        agent.stop()

    stats = agent.source.stats
    report.seconds_captured = agent.ring.head / config.capture.rate
    report.blocks = stats.blocks
    report.input_overflows = stats.input_overflows
    report.files = [out]
    report.bytes_written = out.stat().st_size
    return report
