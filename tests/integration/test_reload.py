"""Config hot reload (SIGHUP): live sections apply without dropping audio, a bad
file is rejected with its errors logged and the running config kept."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest
import trio
import trio.testing

from edge_agent.agent import Agent
from edge_agent.clock import ManualClock
from edge_agent.config import AgentConfig, load_config

BASE = """\
[device]
data_dir = "{data}"

[capture]
source = "tone"
rate = 8000
block_ms = 100

[ring]
seconds = 30

[segments]
enabled = false

[upload]
timeout_seconds = 60.0
"""


def write(path: Path, text: str, data: Path) -> None:
    path.write_text(text.format(data=data))


async def test_live_sections_apply_without_dropping_audio(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tmp_path / "agent.toml"
    write(cfg, BASE, tmp_path / "data")
    agent = Agent(load_config(cfg), clock=ManualClock(), config_path=cfg)
    seen: list[tuple[AgentConfig, AgentConfig]] = []
    agent.on_reload(lambda old, new: seen.append((old, new)))

    async def async_subscriber(old: AgentConfig, new: AgentConfig) -> None:
        await trio.sleep(0.01)  # a subscriber that awaits, e.g. to restart a client
        seen.append((old, new))

    agent.on_reload(async_subscriber)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        began = trio.current_time()
        await trio.sleep(2.0)
        write(cfg, BASE.replace("timeout_seconds = 60.0", "timeout_seconds = 5.0")
              .replace("rate = 8000", "rate = 16000")
              + '\n[stt]\nenabled = true\nurl = "http://127.0.0.1:9/stt"\n', tmp_path / "data")
        with caplog.at_level(logging.INFO, logger="edge_agent.agent"):
            assert await agent.reload() is True
        await trio.sleep(2.0)
        ran = trio.current_time() - began
        agent.stop()
    old, new = seen[0]
    assert seen[1] == seen[0]
    assert (old.upload.timeout_seconds, new.upload.timeout_seconds) == (60.0, 5.0)
    assert new.stt.enabled and new.stt.url == "http://127.0.0.1:9/stt"
    # Capture settings need a restart: the running values stay, and the log says so.
    assert agent.config.capture.rate == 8000
    assert agent.config.upload.timeout_seconds == 5.0
    messages = [r.getMessage() for r in caplog.records]
    assert ("config reload section=capture changed: restart the agent to apply it "
            "(the running values are kept)") in messages
    assert any(m.endswith("applied=stt,upload") for m in messages)
    # Capture never stopped: one start, no gap, audio for all the time it ran (the
    # mock clock also moved while the file was read in a worker thread).
    assert agent.tasks["capture"].starts == 1
    assert agent.ring.gaps(0, agent.ring.head) == []
    assert agent.ring.head == pytest.approx(ran * 8000, abs=800)


async def test_invalid_file_is_rejected_and_the_old_config_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tmp_path / "agent.toml"
    write(cfg, BASE, tmp_path / "data")
    agent = Agent(load_config(cfg), clock=ManualClock(), config_path=cfg)
    before = agent.config
    calls: list[object] = []
    agent.on_reload(lambda old, new: calls.append(new))
    write(cfg, BASE.replace("timeout_seconds = 60.0", 'timeout_seconds = "soon"')
          + "\n[stt]\nchunk_secs = 5\n", tmp_path / "data")
    with caplog.at_level(logging.ERROR, logger="edge_agent.agent"):
        assert await agent.reload() is False
    assert agent.config is before
    assert calls == []
    assert agent.reloads_rejected == 1
    problems = [r.getMessage() for r in caplog.records]
    assert any('upload.timeout_seconds: expected a number, got "soon"' in m for m in problems)
    assert any("stt.chunk_secs: unknown key" in m for m in problems)
    # Not TOML at all: one line saying so.
    cfg.write_text("[capture\n")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="edge_agent.agent"):
        assert await agent.reload() is False
    assert "not valid TOML" in caplog.records[0].getMessage()
    assert agent.config is before


def read_until(stream: IO[str], needle: str, lines: list[str], timeout: float = 20) -> str:
    """Read stderr lines (kept in `lines`) until one contains `needle`."""
    found: list[str] = []

    def reader() -> None:
        for line in stream:
            lines.append(line)
            if needle in line:
                found.append(line)
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    if not found:
        pytest.fail(f"no {needle!r} in:\n{''.join(lines)}")
    return found[0]


def test_sighup_reloads_a_running_agent(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    write(cfg, BASE, tmp_path / "data")
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        read_until(proc.stderr, "agent ready", lines)
        write(cfg, BASE.replace("timeout_seconds = 60.0", "timeout_seconds = 7.5"),
              tmp_path / "data")
        os.kill(proc.pid, signal.SIGHUP)
        read_until(proc.stderr, "config reloaded", lines)
        cfg.write_text("[upload]\ntimeout_seconds = -1\n")
        os.kill(proc.pid, signal.SIGHUP)
        rejected = read_until(proc.stderr, "config reload rejected path=", lines)
        time.sleep(0.2)
        assert proc.poll() is None  # still running on the old config
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    text = "".join(lines)
    assert "applied=upload" in text
    assert "upload.timeout_seconds: expected a number > 0.0, got -1" in text
    assert "kept=running config" in rejected
