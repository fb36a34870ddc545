"""`edge-agent demo`: the whole agent on any machine, with no mic and no network.

A bundled speech sample is played through `FileSource` at real time into the
ring and spooled as sealed 5-second Ogg Opus segments under the data directory.
Each later stage (STT, upload, API) adds itself here so the demo always shows the
real agent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import trio

from .agent import Agent
from .backend import Backend, StoredSegment, list_stored_segments, run_backend
from .config import AgentConfig, validate
from .spool import SegmentMeta, SegmentState
from .stt import SttStats, Transcript

__all__ = ["DemoReport", "demo_config", "run_demo", "sample_path"]

log = logging.getLogger(__name__)


def sample_path() -> Path:
    """The bundled speech sample (synthetic speech, 16 kHz mono, two sentences
    with a 1.5 s pause; the words are in `speech.txt` beside it)."""
    return Path(str(resources.files("edge_agent") / "data" / "speech.wav"))


def demo_config(data_dir: Path, *, realtime: bool = True, upload_url: str = "",
                stt_url: str = "") -> AgentConfig:
    return validate({
        "device": {"id": "demo-0001", "data_dir": str(data_dir)},
        "capture": {
            "source": "file", "file": str(sample_path()), "realtime": realtime,
            "rate": 48000, "channels": 1, "format": "int16", "block_ms": 20,
        },
        "ring": {"seconds": 60},
        # Short segments so the 10.6 s sample makes a few (the first one is partial).
        "segments": {"enabled": True, "seconds": 5},
        # Sealed segments go to the reference backend the demo runs on loopback.
        "upload": {"enabled": bool(upload_url), "url": upload_url,
                   "backoff_initial_seconds": 0.2, "backoff_max_seconds": 2.0},
        # Live transcription: speech chunks (cut at pauses) to the same backend.
        "stt": {"enabled": bool(stt_url), "protocol": "raw", "url": stt_url, "chunking": "vad"},
    })


@dataclass
class DemoReport:
    data_dir: Path
    seconds_captured: float = 0.0
    blocks: int = 0
    input_overflows: int = 0
    files: list[Path] = field(default_factory=list)
    bytes_written: int = 0
    # Sealed segments, oldest first, with their state at the end of the run.
    segments: list[tuple[SegmentMeta, SegmentState]] = field(default_factory=list)
    # The reference backend the segments were uploaded to, and what it holds.
    backend_url: str = ""
    backend_dir: Path | None = None
    synced: list[StoredSegment] = field(default_factory=list)
    # What live transcription heard in this run, and its counters.
    transcripts: list[Transcript] = field(default_factory=list)
    stt: SttStats | None = None


async def run_demo(data_dir: Path, *, realtime: bool = True) -> DemoReport:
    """Run the agent on the bundled sample until it has been fully processed."""
    report = DemoReport(data_dir)
    backend = Backend(data_dir / "backend")
    async with trio.open_nursery() as services:
        report.backend_url = await services.start(run_backend, backend, "127.0.0.1:0")
        report.backend_dir = backend.data_dir
        config = demo_config(data_dir, realtime=realtime, upload_url=(
            report.backend_url + "/v1/devices/{device}/segments/{segment}"),
            stt_url=report.backend_url + "/v1/stt/raw")
        agent = Agent(config)
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await agent.capture_finished.wait()
            if agent.stt is not None:  # the last chunk is cut, sent and answered
                with trio.move_on_after(30):
                    await agent.stt.wait_idle()
            # Stopping seals the open segment after the segmenter drained the ring.
            agent.stop()
        # The segment sealed at stop is still pending: sync what is left.
        assert agent.uploader is not None
        with trio.move_on_after(30):
            await agent.uploader.drain()
        services.cancel_scope.cancel()
    report.synced = list_stored_segments(backend.data_dir, config.device.id)

    stats = agent.source.stats
    report.seconds_captured = agent.ring.head / config.capture.rate
    report.blocks = stats.blocks
    report.input_overflows = stats.input_overflows
    spool, segmenter = agent.spool, agent.segmenter
    assert spool is not None and segmenter is not None
    # This run's seals (a reused data dir may hold older ones), with their state now.
    report.segments = [got for meta in segmenter.sealed if (got := spool.get(meta.id))]
    report.files = [spool.audio_path(meta.id) for meta, _ in report.segments]
    report.bytes_written = sum(meta.bytes for meta, _ in report.segments)
    if agent.stt is not None:
        report.transcripts = list(agent.stt.recent)
        report.stt = agent.stt.statistics()
    return report
