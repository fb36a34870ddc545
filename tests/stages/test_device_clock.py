"""Clock on a Pi without RTC: the first NTP sync steps the wall clock during capture.

Monotonic spans are the truth; UTC is corrected for everything held, the step is
recorded, and every anchor says whether the clock was synchronised then.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from edge_agent.agent import Agent
from edge_agent.capture import CaptureTimeline
from edge_agent.clock import ManualClock
from edge_agent.config import validate

RATE = 8000


async def test_an_ntp_step_during_capture_keeps_the_timeline_consistent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    clock = ManualClock(utc_now=1_700_000_000.0, is_synced=False)  # booted with a stale clock
    agent = Agent(validate({
        "device": {"data_dir": str(tmp_path / "data")},
        "capture": {"source": "tone", "rate": RATE, "block_ms": 100},
        "ring": {"seconds": 60}, "segments": {"enabled": False},
    }), clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await trio.sleep(2.05)
        clock.utc_now += 3600.0  # the first NTP sync
        clock.is_synced = True
        await trio.sleep(2.0)
        agent.stop()
    ring = agent.ring
    steps = ring.clock_steps(0, ring.head)
    assert len(steps) == 1
    assert steps[0].seconds == pytest.approx(3600.0)
    assert steps[0].synced
    step_at = steps[0].index
    assert step_at == pytest.approx(2.1 * RATE, abs=RATE // 10)  # the next block after 2.05 s
    # UTC of every held frame is corrected: no hour-long jump inside the timeline,
    # and spans equal sample counts.
    utc = np.array([ring.index_to_utc(i) for i in range(0, ring.head + 1, RATE // 10)])
    assert np.all(np.diff(utc) > 0)
    assert np.diff(utc) == pytest.approx(0.1, abs=1e-6)
    assert ring.index_to_utc(0) == pytest.approx(1_700_000_000.0 + 3600.0)
    # Each anchor records whether the clock was synchronised when it was taken.
    assert ring.anchor_at(step_at - 1).synced is False
    assert ring.anchor_at(step_at).synced is True
    assert ring.utc_to_index(ring.index_to_utc(step_at)) == step_at


def test_capture_timeline_follows_the_sample_count_not_the_jitter() -> None:
    tl = CaptureTimeline(48000)
    rng = np.random.default_rng(7)
    starts = []
    for k in range(500):  # 10 s of 20 ms blocks, estimates jittering by +-20 ms
        true_start = 100.0 + k * 0.02
        starts.append(tl.stamp(960, true_start + rng.uniform(-0.02, 0.02)))
    steps = np.diff(starts)
    # Contiguous: every block starts within 2 ms of where the last one ended.
    assert np.all(np.abs(steps - 0.02) <= 0.002 + 1e-12)
    assert abs(starts[-1] - (100.0 + 499 * 0.02)) < 0.01
    assert tl.resyncs == 0


def test_capture_timeline_absorbs_a_bad_latency_report_and_resyncs_on_overflow() -> None:
    tl = CaptureTimeline(48000)
    # PulseAudio reports 0.5 s too much latency for the first second.
    first = [tl.stamp(960, 10.0 + k * 0.02 - 0.5) for k in range(50)]
    later = [tl.stamp(960, 10.0 + k * 0.02) for k in range(50, 500)]
    starts = np.array(first + later)
    assert np.all(np.diff(starts) > 0.0179)  # never a backwards or overlapping block...
    assert np.all(np.diff(starts) < 0.0221)  # ...and never a spurious gap
    assert abs(starts[-1] - (10.0 + 499 * 0.02)) < 0.01  # converged on the truth
    # An overflow lost 0.3 s of audio: the next block jumps to the device's estimate.
    t = tl.stamp(960, 10.0 + 500 * 0.02 + 0.3, overflow=True)
    assert t == pytest.approx(10.0 + 500 * 0.02 + 0.3)
    assert tl.resyncs == 1


def test_a_reopened_stream_never_starts_before_the_last_one_ended() -> None:
    # A device that ran ahead of the system clock (or a clock estimate that jumped
    # back) must not make the ring go backwards after a re-open.
    old = CaptureTimeline(48000)
    for k in range(100):
        old.stamp(960, 50.0 + k * 0.01)  # delivered at twice real time
    assert old.end is not None and old.end > 50.0 + 100 * 0.01
    new = CaptureTimeline(48000, not_before=old.end)
    assert new.stamp(960, 51.0) == old.end
    later = CaptureTimeline(48000, not_before=old.end)
    assert later.stamp(960, old.end + 5.0) == old.end + 5.0  # a real gap stays a gap


def test_only_believable_latency_reports_are_subtracted() -> None:
    tl = CaptureTimeline(48000)
    tl.max_latency = 0.06  # the stream's buffer plus one block
    assert tl.latency(0.03) == 0.03
    assert tl.latency(0.59) == 0.0  # PulseAudio monitor at start-up: not a real delay
    assert tl.latency(1.7e9) == 0.0  # a host that reports no ADC time (0)
    assert tl.latency(-0.01) == 0.0
    assert tl.latency(float("nan")) == 0.0
