"""The agent as a whole: capture into the ring under supervision, demo, run and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from edge_agent.agent import Agent
from edge_agent.audio.opus import decode_ogg_opus_file
from edge_agent.capture import Block, CaptureError, SourceStats
from edge_agent.clock import ManualClock
from edge_agent.config import validate
from edge_agent.demo import run_demo
from edge_agent.supervisor import Backoff


def tone_config(tmp_path: Path, **capture: object) -> dict[str, object]:
    return {
        "device": {"data_dir": str(tmp_path / "data")},
        "capture": {"source": "tone", "rate": 16000, "realtime": False, "tone_seconds": 5.0,
                    **capture},
        "ring": {"seconds": 10},
    }


async def test_capture_fills_the_ring(tmp_path: Path) -> None:
    agent = Agent(validate(tone_config(tmp_path)), clock=ManualClock())
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await agent.capture_finished.wait()
        agent.stop()
    assert agent.ring.head == 5 * 16000
    assert agent.tasks["capture"].state == "finished"
    assert agent.degraded() == {}
    assert agent.ring.index_to_utc(16000) == pytest.approx(ManualClock().utc_now + 1.0)


class LosesDevice:
    """A source whose device vanishes after each block, as a pulled USB plug does."""

    rate, channels, format = 8000, 1, "int16"

    def __init__(self, clock: ManualClock) -> None:
        self.stats = SourceStats()
        self.clock = clock

    def open(self) -> object:
        source = self

        class Ctx:
            async def __aenter__(self) -> object:
                source.stats.opens += 1
                if source.stats.opens == 2:
                    raise CaptureError("no input device matches 'USB'; available: ...")
                return self.blocks()

            async def __aexit__(self, *exc: object) -> None:
                return None

            async def blocks(self) -> object:
                source.clock.advance(1.0)
                yield Block(np.ones((800, 1), np.int16), source.clock.utc(), source.clock.mono())
                raise CaptureError("input device 'USB' stopped delivering audio (unplugged?)")

        return Ctx()


async def test_a_lost_device_is_reopened_with_backoff_and_the_gap_recorded(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    clock = ManualClock()
    source = LosesDevice(clock)
    # No spool here: its worker threads would let the autojump clock race ahead.
    cfg = tone_config(tmp_path, rate=8000) | {"segments": {"enabled": False}}
    agent = Agent(validate(cfg), clock=clock, source=source,
                  backoff=Backoff(initial=1.0, maximum=4.0, jitter=0.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await trio.sleep(0.5)
        assert "capture" in agent.degraded()
        await trio.sleep(10)
        agent.stop()
    # Opens at t=0 (one block, then lost), 1 (device missing), 3 and 7 (one block each,
    # then lost), delays 1, 2, 4, 4 (capped): the next would be at 11 s.
    assert source.stats.opens == 4
    assert agent.tasks["capture"].failures == 4
    assert agent.ring.head == 3 * 800
    # Each block is 0.1 s; the source's clock moved 1 s per open: two holes of 0.9 s.
    gaps = agent.ring.gaps(0, agent.ring.head)
    assert [g.index for g in gaps] == [800, 1600]
    assert [g.seconds for g in gaps] == pytest.approx([0.9, 0.9])


async def test_demo_encodes_the_sample_to_a_decodable_opus_file(tmp_path: Path) -> None:
    report = await run_demo(tmp_path, realtime=False)
    assert report.seconds_captured == pytest.approx(10.63, abs=0.01)
    assert report.input_overflows == 0
    # Sealed 5 s segments tile the sample: a partial first one, cut at wall-clock
    # multiples of 5 s, every frame in exactly one, each file decodable.
    metas = [meta for meta, _ in report.segments]
    assert 3 <= len(metas) <= 4
    assert sum(m.frames for m in metas) == round(report.seconds_captured * 48000)
    for i in range(1, len(metas)):
        before, after = metas[i - 1], metas[i]
        assert after.start_ts == pytest.approx(before.end_ts, abs=1e-4)
        assert after.start_ts / 5 == pytest.approx(round(after.start_ts / 5), abs=1e-4)
    decoded = [decode_ogg_opus_file(f) for f in report.files]
    assert sum(len(d.pcm) for d in decoded) / 48000 == pytest.approx(report.seconds_captured,
                                                                       abs=0.001)
    assert report.bytes_written == sum(f.stat().st_size for f in report.files) > 10_000


def edge_agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_agent", *args]


def test_run_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[device]\ndata_dir = "{tmp_path}/data"\n[capture]\nsource = "tone"\nrate = 16000\n'
    )
    proc = subprocess.Popen(edge_agent_cmd("run", "--config", str(cfg)),
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        assert proc.stderr is not None
        for line in proc.stderr:
            if "agent ready" in line or time.monotonic() > deadline:
                break
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=10)
        stopped_in = time.monotonic() - started
    finally:
        proc.kill()
    assert code == 0
    print(f"stopped {stopped_in:.2f} s after SIGTERM")


def test_run_with_a_bad_config_exits_2_with_the_reason(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[capture]\nsource = "file"\nfile = "/nonexistent/x.wav"\n')
    proc = subprocess.run(edge_agent_cmd("run", "-c", str(cfg)), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: /nonexistent/x.wav: no such file"
