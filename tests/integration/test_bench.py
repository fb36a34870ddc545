"""The benchmark script runs end to end in its tiny mode and writes what a later
run is compared against: every documented key of results.json, sane numbers, and
the Markdown report. Timing figures are printed by the script, never asserted."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import RESULT_KEYS, SCHEMA_VERSION, main
from bench.complexity import aligned, lsd_db, pick_complexity, snr_db
from edge_agent.config import SegmentsConfig, SttConfig

needs_tools = pytest.mark.skipif(
    shutil.which("opusenc") is None or shutil.which("sox") is None,
    reason="opus-tools and sox are the comparison point (scripts/bootstrap --dev installs them)",
)


def _numbers(node: Any) -> list[float]:
    if isinstance(node, bool):
        return []
    if isinstance(node, int | float):
        return [float(node)]
    if isinstance(node, dict):
        return [x for v in node.values() for x in _numbers(v)]
    if isinstance(node, list):
        return [x for v in node for x in _numbers(v)]
    return []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--profile",
         "--results", str(out / "results.json"), "--report", str(out / "docs" / "benchmarks.md")],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    return results, out, proc.stdout


@pytest.mark.slow
@needs_tools
def test_tiny_run_writes_every_documented_key(tiny_run: tuple[dict[str, Any], Path, str]) -> None:
    results, _, _ = tiny_run
    assert results["meta"]["schema"] == SCHEMA_VERSION
    assert results["meta"]["mode"] == "tiny"
    for section, keys in RESULT_KEYS.items():
        missing = [k for k in keys if k not in results[section]]
        assert not missing, f"{section}: {missing}"
    assert set(results["resample"]["converters"]) == {"VHQ", "HQ", "MQ", "linear"}
    assert set(results["pi"]["boards"]) == {"pi4", "pi_zero_2w"}


@pytest.mark.slow
@needs_tools
def test_tiny_run_numbers_are_sane(tiny_run: tuple[dict[str, Any], Path, str]) -> None:
    results, _, _ = tiny_run
    assert all(math.isfinite(x) for x in _numbers(results))
    cpu, mem, ring = results["cpu"], results["memory"], results["ring"]
    # The agent really did both encodes of all the audio, with nothing skipped.
    assert cpu["agent_cpu_s_per_audio_hour"] > 0 and cpu["opusenc_cpu_s_per_audio_hour"] > 0
    assert cpu["ratio_agent_to_opusenc"] > 0
    assert cpu["stt_chunks_sent"] >= 3 and cpu["stt_dropped"] == 0
    assert cpu["segments_synced"] >= 1 and cpu["lost_frames"] == 0
    assert mem["peak_rss_mb"] > mem["ring_bytes"] / 2**20 > 0
    for key in ("read_chunk_ratio", "cut_10s_ratio", "naive_ratio_10x"):
        assert ring[key] > 0
    # Quality is not timing: the default converter clears the bar, linear does not.
    conv = results["resample"]["converters"]
    default = results["resample"]["default"]
    assert results["resample"]["target_met"]
    assert conv["linear"]["alias_rejection_db"] < 20 < conv[default]["alias_rejection_db"]
    lat = results["latency"]
    assert lat["fixed"]["chunks"] >= 1 and lat["fixed"]["to_request_s"]["n"] > 0
    q = lat["fixed"]["to_request_s"]
    assert 0 < q["p50"] <= q["p95"] <= q["max"]
    drain = results["drain"]
    assert drain["all_synced"] and drain["segments_per_second"] > 0
    assert drain["ring_overruns"] == 0 and drain["lost_frames"] == 0
    board = results["pi"]["boards"]["pi_zero_2w"]
    assert board["agent_cpu_s_per_audio_hour"] > cpu["agent_cpu_s_per_audio_hour"]
    assert results["series"]["profile"], "--profile lists where the Trio thread's time goes"


@pytest.mark.slow
@needs_tools
def test_tiny_run_writes_report_and_table(tiny_run: tuple[dict[str, Any], Path, str]) -> None:
    results, out, stdout = tiny_run
    report = (out / "docs" / "benchmarks.md").read_text()
    ratio = f"{results['cpu']['ratio_agent_to_opusenc']:.2f}"
    assert f"**{ratio}**" in report
    for heading in ("## 1. CPU", "## 2. Memory", "## 3. Constant cost", "## 4. Resampling",
                    "## 5. Latency", "## 6. Backlog drain", "## 7. Raspberry Pi",
                    "## `bench/results.json`"):
        assert heading in report
    assert "`cpu.ratio_agent_to_opusenc`" in report  # the keys are documented
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped: matplotlib is not installed" in report
    else:
        for name in ("memory", "cpu", "latency", "resample", "drain"):
            assert (out / "docs" / f"bench-{name}.png").stat().st_size > 1000
            assert f"(bench-{name}.png)" in report
    assert "CPU: agent / opusenc" in stdout and ratio in stdout


def test_bad_arguments_get_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--only", "cpu,speed"]) == 2
    err = capsys.readouterr().err
    assert "--only: unknown measurement(s) speed; expected some of realtime, cpu, ring" in err
    assert main(["--hours", "0"]) == 2
    assert "--hours: expected a number of hours in (0, 48], got 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Section 8: Opus complexity


@pytest.mark.slow
@needs_tools
def test_tiny_run_measures_what_each_complexity_costs_and_keeps(
    tiny_run: tuple[dict[str, Any], Path, str],
) -> None:
    results, out, stdout = tiny_run
    x = results["complexity"]
    assert set(x["encoders"]) == {"stt", "segments"}
    for name, e in x["encoders"].items():
        rows = {row["complexity"]: row for row in e["rows"]}
        assert list(rows) == [10, 5, 0] and e["chosen"] in rows
        assert all(row["cpu_s_per_audio_hour"] > 0 and row["kbit_s"] > 0 for row in e["rows"])
        # Decoded speech resembles what went in (a misaligned or garbled decode
        # would be near 0 dB), and the setting reaches the encoder.
        assert all(row["snr_db"] > 5 for row in e["rows"]), name
        assert rows[0]["snr_db"] != rows[10]["snr_db"]
        if x["uncompressed_word_accuracy"] is not None:  # pocketsphinx is installed
            assert rows[10]["word_accuracy"] >= 0.5, "the encoded sample is recognised"
    defaults = {"stt": SttConfig().complexity, "segments": SegmentsConfig().complexity}
    assert {n: e["config_default"] for n, e in x["encoders"].items()} == defaults
    assert results["cpu"]["opus_complexity"] == defaults  # opusenc ran at the same
    report = (out / "docs" / "benchmarks.md").read_text()
    assert "## 8. Opus complexity" in report and "The rule for a default:" in report
    assert "`complexity.encoders.<stt,segments>.rows[]`" in report
    assert "Opus complexity: stt" in stdout


@pytest.mark.slow
def test_only_one_section_keeps_the_others_of_the_earlier_results(
    tiny_run: tuple[dict[str, Any], Path, str], tmp_path: Path,
) -> None:
    earlier, _, _ = tiny_run
    results = tmp_path / "results.json"
    results.write_text(json.dumps(earlier))
    report = tmp_path / "benchmarks.md"
    assert main(["--tiny", "--only", "complexity", "--results", str(results),
                 "--report", str(report)]) == 0
    merged = json.loads(results.read_text())
    for section in ("cpu", "memory", "ring", "resample", "latency", "drain", "pi", "series"):
        assert merged[section] == earlier[section], section
    assert merged["complexity"]["measured_utc"] != earlier["complexity"]["measured_utc"]
    assert merged["meta"]["started_utc"] == earlier["meta"]["started_utc"]
    assert set(merged["meta"]["remeasured"]) == {"complexity"}
    assert "## 1. CPU" in report.read_text() and "## 8. Opus complexity" in report.read_text()


def test_fidelity_is_measured_after_aligning_the_decoded_signal() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(0, 0.1, 16000).astype(np.float32)
    late = np.concatenate([np.zeros(7, np.float32), ref])  # a codec's delay
    r, d = aligned(ref, late, 16000)
    assert snr_db(r, d) > 100 and lsd_db(r, d, 16000) < 0.01
    noisy = late + rng.normal(0, 0.01, late.shape).astype(np.float32)  # 20 dB below
    assert snr_db(*aligned(ref, noisy, 16000)) == pytest.approx(20, abs=0.5)


def _row(c: int, words: float, snr: float, lsd: float) -> dict[str, Any]:
    return {"complexity": c, "word_accuracy": words, "snr_db": snr, "lsd_db": lsd}


def test_the_rule_picks_the_lowest_complexity_that_keeps_fidelity_and_words() -> None:
    # Fidelity holds down to 4 (3 loses 1.5 dB of SNR); 4 recognises fewer words than
    # 10, 5 as many: 5. A word lost at 7 does not stop the search, since single
    # figures of the recogniser swing; fidelity lost at 3 does, even if 2 were better.
    rows = [_row(10, 0.80, 20.0, 6.0), _row(9, 0.80, 20.0, 6.0), _row(8, 0.80, 19.8, 6.1),
            _row(7, 0.75, 19.5, 6.2), _row(6, 0.85, 19.4, 6.3), _row(5, 0.80, 19.2, 6.4),
            _row(4, 0.79, 19.1, 6.5), _row(3, 0.90, 18.5, 6.5), _row(2, 0.90, 20.0, 6.0)]
    assert pick_complexity(rows) == 5
    rows[6]["lsd_db"] = 6.6  # 4 now adds 0.6 dB of LSD: the search stops above it
    assert pick_complexity(rows) == 5
    rows[5]["lsd_db"] = 6.6
    assert pick_complexity(rows) == 6
    assert pick_complexity(rows[:1]) == 10
