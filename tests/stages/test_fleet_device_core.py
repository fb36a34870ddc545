"""The fleet device's decisions without a store: when it polls, which requests it
refuses and why, what holes an answer names, and how many ids it remembers; and
the shared cut planned without a ring (the operator's `fleet get`) matching the
device's own plan of the same segments."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pytest

from edge_agent.api.plan import AudioGap, AudioPlan, plan_audio
from edge_agent.clock import iso_utc
from edge_agent.config import FleetConfig
from edge_agent.fleet.device_core import (
    AnsweredIds,
    answer_gaps,
    expired,
    invalid,
    next_poll,
    not_held,
    not_yet,
    too_large,
)
from edge_agent.fleet.records import Request, ResultGap
from edge_agent.ring import AudioRing
from edge_agent.wire import SegmentMeta

from support.spool_rig import open_spool, seal

T0 = 1_800_000_000.0
CFG = FleetConfig(enabled=True, poll_seconds=60.0, busy_poll_seconds=5.0,
                  max_request_seconds=600.0, keep_results_hours=2.0)


def req(start: float, end: float, **extra: object) -> Request:
    return msgspec.convert({"id": "r1", "start": iso_utc(T0 + start), "end": iso_utc(T0 + end),
                            "created": iso_utc(T0), **extra}, Request)


def test_polls_spread_ten_percent_around_the_interval_and_come_sooner_when_busy() -> None:
    rng = random.Random(3)
    idle = [next_poll(CFG, False, rng) for _ in range(2000)]
    busy = [next_poll(CFG, True, rng) for _ in range(2000)]
    assert 54.0 <= min(idle) < 55.0 and 65.0 < max(idle) <= 66.0
    assert min(busy) >= 4.5 and max(busy) <= 5.5


@pytest.mark.parametrize(("request_", "oldest", "word"), [
    (req(10, 5), T0, "inverted: "),
    (req(0, 601), T0, "too_long: "),
    (req(0, 10, rate=1000), T0, "bad_request: rate 1000"),
    (req(0, 10, channels=3), T0, "bad_request: channels 3: expected at most 2"),
    (msgspec.convert({"id": "r1", "start": "2026-13-01T00:00:00Z", "end": iso_utc(T0),
                      "created": iso_utc(T0)}, Request), T0, "bad_request: "),
    (req(0, 10), None, "nothing_held: "),
    (req(-20, -10), T0, "before_oldest: "),
])
def test_a_request_is_refused_with_a_reason_scripts_can_match(
    request_: Request, oldest: float | None, word: str,
) -> None:
    why = invalid(request_, CFG, channels=2) or not_held(request_, oldest)
    assert why is not None and why.startswith(word)
    assert "\n" not in why


def test_a_request_reaching_before_the_oldest_audio_is_taken_up_not_refused() -> None:
    request_ = req(-20, 10)
    assert invalid(request_, CFG, channels=1) is None and not_held(request_, T0) is None


def test_a_range_far_in_the_future_is_refused_at_once_not_kept_waiting() -> None:
    absurd = msgspec.convert({"id": "r1", "start": iso_utc(T0), "end": "9999-12-31T23:59:59Z",
                              "created": iso_utc(T0)}, Request)
    assert not_yet(absurd, T0)
    why = invalid(absurd, CFG, channels=1)
    assert why is not None and why.startswith("too_long: ")


def test_old_requests_expire_and_ranges_not_captured_yet_wait() -> None:
    assert not expired(req(0, 10), T0 + 2 * 3600, CFG)
    assert expired(req(0, 10), T0 + 2 * 3600 + 1, CFG)
    assert not_yet(req(0, 10), T0 + 11)  # capture may not have delivered 10 s yet
    assert not not_yet(req(0, 10), T0 + 12)


def test_holes_before_the_oldest_audio_are_not_held_others_are_capture() -> None:
    plan = AudioPlan(T0 - 10, T0 + 30, 16000,
                     gaps=[AudioGap(T0 - 10, 10.0, 0.0), AudioGap(T0 + 12, 3.0, 12.0)])
    assert answer_gaps(plan, T0, 0.25) == [
        ResultGap(utc=iso_utc(T0 - 10), seconds=10.0, offset=0.0, reason="not_held"),
        ResultGap(utc=iso_utc(T0 + 12), seconds=3.0, offset=12.0, reason="capture"),
    ]


def test_answered_ids_are_bounded_and_keep_the_newest() -> None:
    ids = AnsweredIds(capacity=3)
    for i in range(5):
        ids.add(f"r{i}")
    assert [i for i in ("r0", "r1", "r2", "r3", "r4") if i in ids] == ["r2", "r3", "r4"]
    ids.add("r2")  # seen again: the newest now, so r3 goes first
    ids.add("r5")
    assert [i for i in ("r2", "r3", "r4", "r5") if i in ids] == ["r2", "r4", "r5"]


def test_a_plan_without_a_ring_equals_the_device_plan_of_the_same_segments(
    tmp_path: Path,
) -> None:
    spool = open_spool(tmp_path / "spool")
    metas: list[SegmentMeta] = [seal(spool) for _ in range(3)]
    start, end = metas[0].start_ts + 1.5, metas[-1].end_ts - 0.5
    empty = AudioRing(rate=metas[0].rate, channels=1, dtype="int16", seconds=1.0)
    with_ring = plan_audio(empty, metas, start, end)
    without = plan_audio(None, metas, start, end, rate=empty.rate,
                         gap_tolerance=empty.gap_tolerance)
    assert without == with_ring and without.audio_frames > 0
    with pytest.raises(ValueError, match="needs rate and gap_tolerance"):
        plan_audio(None, metas, start, end)


def test_an_answer_that_could_fill_the_disk_is_refused() -> None:
    hour = 3600 * 192000  # frames of an hour at 192 kHz
    why = too_large("pcm", hour, 192000, 8, free_bytes=16 * 2**30)  # 11 GB of 16 GB free
    assert why is not None and why.startswith("too_large: the answer may need 10547 MB")
    assert too_large("opus", hour, 192000, 8, free_bytes=16 * 2**30) is None  # ~34 MB
    assert too_large("pcm", 3600 * 16000, 16000, 1, free_bytes=16 * 2**30) is None
