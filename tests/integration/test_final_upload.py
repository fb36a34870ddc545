"""A stop (SIGTERM) seals the open segment, then the agent goes on uploading what is
pending while the backend answers, for at most ``upload.shutdown_seconds``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio

from edge_agent.agent import Agent
from edge_agent.config import validate
from edge_agent.reference import Backend, list_stored_segments


def config(tmp_path: Path, base: str, **upload: Any) -> Any:
    return validate({
        "device": {"id": "dev-final", "data_dir": str(tmp_path / "agent")},
        "capture": {"source": "tone", "rate": 16000, "realtime": True, "tone_seconds": 600},
        "segments": {"seconds": 60, "format": "opus", "min_free_mb": 0},
        "upload": {"enabled": True, "url": f"{base}/v1/devices/{{device}}/segments/{{segment}}",
                   **upload},
    })


async def run_briefly(agent: Agent) -> None:
    # Segments end on wall-clock minutes: a run across hh:mm:00 would seal one early.
    into_minute = time.time() % 60
    if into_minute > 55:
        await trio.sleep(61 - into_minute)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await trio.sleep(1.5)  # less than a segment: nothing sealed before the stop
            assert agent.spool is not None and not agent.spool.pending()
            agent.stop()


async def test_the_segment_sealed_at_a_stop_is_uploaded_before_the_agent_exits(
        tmp_path: Path, served: tuple[Backend, str]) -> None:
    backend, base = served
    agent = Agent(config(tmp_path, base))
    await run_briefly(agent)
    assert agent.spool is not None and agent.spool.pending() == []
    [synced] = [m for m, _ in agent.spool.list()]
    [stored] = list_stored_segments(backend.data_dir, "dev-final")
    assert stored.id == synced.id and stored.sha256 == synced.sha256


async def test_with_the_backend_down_the_stop_is_not_held_up(
        tmp_path: Path, served: tuple[Backend, str]) -> None:
    backend, base = served
    backend.faults.down = True
    agent = Agent(config(tmp_path, base))
    began = trio.current_time()
    await run_briefly(agent)
    assert trio.current_time() - began < 1.5 + 4.0 + 3.5  # run, upload bound, seal grace
    assert agent.spool is not None and len(agent.spool.pending()) == 1  # kept for later


async def test_no_final_upload_when_it_is_turned_off(
        tmp_path: Path, served: tuple[Backend, str]) -> None:
    backend, base = served
    agent = Agent(config(tmp_path, base, shutdown_seconds=0))
    await run_briefly(agent)
    assert agent.spool is not None and len(agent.spool.pending()) == 1
    assert list_stored_segments(backend.data_dir, "dev-final") == []
