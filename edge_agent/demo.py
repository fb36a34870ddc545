"""`edge-agent demo`: the whole agent on any machine, with no mic and no network.

A bundled speech sample is played through `FileSource` at real time into the
ring and spooled as sealed 5-second Ogg Opus segments under the data directory.
Each later stage (STT, upload, API) adds itself here so the demo always shows the
real agent.

The top layer: builds an agent and the reference backend; only ``cli`` imports it.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import trio

from .agent import Agent
from .api import TOKEN_FILE_NAME
from .clock import iso_utc
from .config import AgentConfig, read_secret, validate
from .reference import Backend, StoredSegment, list_stored_segments, run_backend
from .stt import SttStats, Transcript
from .wire import SegmentMeta, SegmentState

__all__ = ["DemoReport", "curl_commands", "demo_config", "run_demo", "sample_path"]

log = logging.getLogger(__name__)


def sample_path() -> Path:
    """The bundled speech sample (synthetic speech, 16 kHz mono, two sentences
    with a 1.5 s pause; the words are in `speech.txt` beside it)."""
    return Path(str(resources.files("edge_agent") / "data" / "speech.wav"))


def demo_config(data_dir: Path, *, realtime: bool = True, upload_url: str = "",
                stt_url: str = "", api: bool = False) -> AgentConfig:
    return validate({
        "device": {"id": "demo-0001", "data_dir": str(data_dir)},
        "capture": {
            "source": "file", "file": str(sample_path()), "realtime": realtime,
            "rate": 48000, "channels": 1, "format": "int16", "block_ms": 20,
            "loop": api and realtime,
        },
        "ring": {"seconds": 60},
        # Short segments so the 10.6 s sample makes a few (the first one is partial).
        "segments": {"enabled": True, "seconds": 5},
        # Sealed segments go to the reference backend the demo runs on loopback.
        "upload": {"enabled": bool(upload_url), "url": upload_url,
                   "backoff_initial_seconds": 0.2, "backoff_max_seconds": 2.0},
        # Live transcription: speech chunks (cut at pauses) to the same backend.
        "stt": {"enabled": bool(stt_url), "protocol": "raw", "url": stt_url, "chunking": "vad"},
        # The device API on loopback (any free port) with a generated token; while it
        # serves, the sample plays in a loop so there is always live audio.
        "api": {"enabled": api, "listen": "127.0.0.1:0"},
    })


def curl_commands(url: str, token: str, first_utc: float) -> list[str]:
    """Commands to try the device API of a running demo (`first_utc`: capture start)."""
    auth = f"-H 'Authorization: Bearer {token}'"
    audio = f"start={iso_utc(first_utc)}&end={iso_utc(first_utc + 5)}&format=wav"
    return [
        f"curl -s {url}/healthz",
        f"curl -s {auth} {url}/v1/status",
        f"curl -s {auth} '{url}/v1/segments?limit=3'",
        f"curl -s {auth} '{url}/v1/audio?{audio}' -o first-5s.wav",
        f"curl -s {auth} {url}/metrics",
        f"curl -s {auth} '{url}/v1/live?seconds=3' -o live.opus",
    ]


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


ApiCallback = Callable[[list[str]], Awaitable[None] | None]


async def run_demo(data_dir: Path, *, realtime: bool = True, serve: float | None = None,
                   on_api: ApiCallback | None = None) -> DemoReport:
    """Run the agent on the bundled sample until it has been fully processed.

    With `serve`, the agent keeps running with its HTTP API on loopback: once the
    first 5 s are captured, `on_api` gets curl commands that work against it, and
    the agent stops `serve` seconds after `on_api` returned (`math.inf`: on
    SIGINT/SIGTERM).
    """
    report = DemoReport(data_dir)
    backend = Backend(data_dir / "backend")
    async with trio.open_nursery() as services:
        report.backend_url = await services.start(run_backend, backend, "127.0.0.1:0")
        report.backend_dir = backend.data_dir
        config = demo_config(data_dir, realtime=realtime, upload_url=(
            report.backend_url + "/v1/devices/{device}/segments/{segment}"),
            stt_url=report.backend_url + "/v1/stt/raw", api=serve is not None)
        agent = Agent(config)
        async with trio.open_nursery() as nursery:
            if serve is not None:
                await _serve(nursery, agent, serve, on_api)
            else:
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


async def _serve(nursery: trio.Nursery, agent: Agent, seconds: float,
                 on_api: ApiCallback | None) -> None:
    """Run `agent` with its API until `seconds` after `on_api` (or a signal)."""
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await agent.run(handle_signals=math.isinf(seconds), task_status=task_status)
        finally:
            stopped.set()

    await nursery.start(run)
    api, ring = agent.api, agent.ring
    assert api is not None and api.url is not None
    # The printed audio command asks for the first 5 s: they must be captured.
    with trio.move_on_after(30):
        await ring.wait_for(5 * ring.rate + 1)
    token = read_secret(agent.data_dir / TOKEN_FILE_NAME, "")
    commands = curl_commands(api.url, token, ring.index_to_utc(0))
    if on_api is not None:
        result = on_api(commands)
        if inspect.isawaitable(result):
            await result
    with trio.move_on_after(seconds):
        await stopped.wait()
