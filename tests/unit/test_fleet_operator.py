"""The operator's decisions that need no store: fleet.toml, the times a person
types, which keys hold a device's segments, and what a hole in a cut is."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import ConfigError
from edge_agent.fleet.fleetconfig import load_operator_config
from edge_agent.fleet.operator import FleetError, listing_prefixes, sidecar_pattern
from edge_agent.fleet.operator_cli import parse_time
from edge_agent.fleet.operator_get import holes, plan_stored
from edge_agent.fleet.records import Request, Result, parse_utc
from edge_agent.wire import DEFAULT_KEY_TEMPLATE, GapNote, SegmentMeta, new_segment_id

NOW = parse_utc("2026-11-24T05:30:00Z")


def test_times_are_iso_or_now_minus_a_span() -> None:
    assert parse_time("2026-11-24T05:00:00Z", NOW, "START") == NOW - 1800
    assert parse_time("2026-11-24T06:00:00+01:00", NOW, "START") == NOW - 1800
    assert parse_time("2026-11-24T05:00:00", NOW, "START") == NOW - 1800  # UTC by default
    assert parse_time("now", NOW, "END") == NOW
    assert parse_time("now-15m", NOW, "END") == NOW - 900
    assert parse_time("-1.5h", NOW, "END") == NOW - 5400
    assert parse_time("now-2d", NOW, "END") == NOW - 2 * 86400
    for bad in ("yesterday", "", "now-5x", "2026-13-01T00:00:00Z", "nan"):
        with pytest.raises(FleetError, match="expected an ISO 8601 time"):
            parse_time(bad, NOW, "START")


def test_segments_are_listed_by_day_from_an_hour_before_the_range() -> None:
    start = parse_utc("2026-11-24T00:30:00Z")
    assert listing_prefixes(DEFAULT_KEY_TEMPLATE, "dev-1", start, start + 2 * 86400) == [
        "dev-1/2026/11/23/", "dev-1/2026/11/24/", "dev-1/2026/11/25/", "dev-1/2026/11/26/"]
    # A template without days: the device's one prefix; with the hour: up to the day.
    assert listing_prefixes("audio/{device}/{segment}.{ext}", "d", start, start + 86400) == [
        "audio/d/"]
    assert listing_prefixes("{yyyy}-{mm}/{device}/{hh}/{segment}.{ext}", "d", start,
                            start + 60) == ["2026-11/d/"]


def test_only_the_devices_own_sidecars_match() -> None:
    pattern = sidecar_pattern(DEFAULT_KEY_TEMPLATE, "dev-1")
    seg = "20261124T053000.000Z-3f9a1c2b"
    assert pattern.fullmatch(f"dev-1/2026/11/24/{seg}.opus.json")
    assert pattern.fullmatch(f"dev-1/2026/11/24/{seg}.opus.json").group("segment") == seg
    assert not pattern.fullmatch(f"dev-1/2026/11/24/{seg}.opus")  # the audio
    assert not pattern.fullmatch(f"dev-10/2026/11/24/{seg}.opus.json")
    assert not pattern.fullmatch(f"dev-1/2026/11/24/{seg}-x.opus.json")


def meta(start: float, seconds: float, gaps: list[GapNote] | None = None) -> SegmentMeta:
    rate = 16000
    held = seconds - sum(g.seconds for g in gaps or [])
    return SegmentMeta(id=new_segment_id(start), device="d", start_utc="", end_utc="",
                       start_ts=start, end_ts=start + seconds, mono_start=0, mono_end=0,
                       frames=round(held * rate), rate=rate, channels=1, format="opus",
                       content_type="", bytes=0, sha256="", clock_synced=True, gaps=gaps or [])


def test_a_hole_inside_a_segment_was_never_captured_and_one_between_is_missing() -> None:
    a = meta(NOW, 60, [GapNote(frame=16000 * 10, seconds=5.0, utc="")])  # 10 s, hole, 45 s
    b = meta(NOW + 90, 60)  # 30 s after a's end
    plan = plan_stored([a, b], NOW, NOW + 200)
    got = [(h.utc - NOW, h.seconds, h.reason) for h in holes(plan, [a, b])]
    assert got == [(10, pytest.approx(5), "capture"), (60, pytest.approx(30), "missing"),
                   (150, pytest.approx(50), "missing")]
    assert plan.audio_frames == (55 + 60) * 16000

    # Asked of the device: refused, answered without it, or still waiting.
    def result(state: str, reason: str = "") -> Result:
        return Result(id="r1", device="d", state=state, reason=reason,  # type: ignore[arg-type]
                      start="2026-11-24T05:31:00Z", end="2026-11-24T05:31:30Z", format="opus",
                      finished="2026-11-24T05:40:00Z")

    refused = holes(plan, [a, b], [result("refused", "too long")])
    assert refused[1].reason == "refused by the device: too long"
    assert holes(plan, [a, b], [result("partial")])[1].reason == "not_held"
    waiting = Request(id="r2", start="2026-11-24T05:32:30Z", end="2026-11-24T05:33:20Z",
                      created="2026-11-24T05:40:00Z")
    assert [h.reason for h in holes(plan, [a, b], pending=[waiting])][1:] == [
        "missing", "pending"]


def test_nothing_stored_is_one_missing_hole() -> None:
    plan = plan_stored([], NOW, NOW + 60)
    assert [(h.utc, h.seconds, h.reason) for h in holes(plan, [])] == [(NOW, 60, "missing")]


def test_fleet_toml_takes_credentials_next_to_it(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('bucket = "audio"\ncredentials_file = "keys"\n')
    assert load_operator_config(path).credentials_file == str(tmp_path / "keys")
    (tmp_path / "keys").write_text("[default]\naws_access_key_id = A\n")
    with pytest.raises(ConfigError) as caught:
        load_operator_config(path).credentials()
    assert caught.value.problems == [f"credentials_file: {tmp_path / 'keys'}: expected "
                                     "aws_secret_access_key = ... under [default]"]


def test_fleet_toml_names_every_bad_key_once(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('bucket = "audio"\ncredentials_file = "k"\nstale_after = 0.5\n'
                    'addressing = "dns"\nregion = "US East"\nmax_devices = 0\n')
    with pytest.raises(ConfigError) as caught:
        load_operator_config(path)
    keys = [line.split(": ")[1] for line in caught.value.problems]
    assert sorted(keys) == ["addressing", "max_devices", "region", "stale_after"]
    assert all(line.startswith(f"{path}: ") for line in caught.value.problems)
