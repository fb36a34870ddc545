"""`edge-agent levels`: the numbers an installer sets the gain by."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from edge_agent.audio.pcm import SampleFormat, levels, read_wav
from edge_agent.capture import FileSource, ToneSource
from edge_agent.capture.levels import LevelMeter, LevelReading, render, run_levels
from edge_agent.cli import main
from edge_agent.clock import ManualClock
from edge_agent.demo import sample_path


def tone_file(tmp_path: Path, dbfs: float) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[capture]\nsource = "tone"\ntone_dbfs = {dbfs}\nrealtime = false\n')
    return cfg


def test_tone_at_minus_20_dbfs_reads_minus_20_peak(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["levels", "--config", str(tone_file(tmp_path, -20.0)), "--seconds", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    readings = [line for line in out if "dBFS  peak" in line]
    assert len(readings) == 3  # one line a second when not on a terminal
    for line in readings:
        assert "rms  -23.0 dBFS  peak  -20.0 dBFS  overflows 0" in line
        assert "CLIPPING" not in line
    assert out[-2] == "summary: 3.0 s, peak -20.0 dBFS, rms -23.0 dBFS, overflows 0"
    assert out[-1] == "level ok"


def test_full_scale_tone_warns_of_clipping(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["levels", "-c", str(tone_file(tmp_path, 0.0)), "--seconds", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    # Every clipped window is shown, not only one a second.
    clipped = [line for line in out if line.endswith("CLIPPING: lower the gain")]
    assert len(clipped) == 10
    assert out[-1] == "clipping in 10 of 10 readings: lower the capture gain"


def test_quiet_input_asks_for_more_gain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["levels", "-c", str(tone_file(tmp_path, -45.0)), "--seconds", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "quiet: peak -45.0 dBFS is below -30; raise the capture gain or move the mic closer")


def test_missing_device_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["levels", "--device", "no-such-mic-anywhere", "--seconds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no input device matches 'no-such-mic-anywhere'; available:")


def test_bad_seconds_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["levels", "-c", str(tone_file(tmp_path, -20)), "--seconds", "-1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --seconds -1: expected a number of seconds, 0 or more")


async def test_summary_averages_energy_over_tone_and_silence() -> None:
    meter = LevelMeter(48000, window_seconds=0.1)
    tone = ToneSource(48000, 1, SampleFormat.INT16, ManualClock(), dbfs=-20.0, seconds=1.0,
                      realtime=False)
    async with tone.open() as blocks:
        async for b in blocks:
            meter.add(b.frames)
    meter.add(np.zeros((48000, 1), np.int16))
    s = meter.summary
    # Half the time at -23.01 dBFS RMS, half silent: 3.01 dB less energy overall.
    assert s.rms_dbfs == pytest.approx(-26.02, abs=0.02)
    assert s.peak_dbfs == pytest.approx(-20.0, abs=0.01)
    assert (s.windows, s.seconds) == (20, 2.0)


async def test_speech_file_peak_matches_the_file() -> None:
    audio, rate = read_wav(sample_path())
    src = FileSource(sample_path(), rate, 1, SampleFormat.INT16, ManualClock(), realtime=False)
    out = io.StringIO()
    summary = await run_levels(src, out, live=True)
    assert summary.peak_dbfs == pytest.approx(levels(audio).peak_dbfs, abs=0.01)
    assert summary.seconds == pytest.approx(len(audio) / rate, abs=0.1)
    # A live meter rewrites one terminal line.
    text = out.getvalue()
    assert text.count("\r") == summary.windows
    assert text.count("\n") == 1


def test_bar_fills_with_rms_and_marks_the_peak() -> None:
    line = render(LevelReading(1, 0.1, rms_dbfs=-30.0, peak_dbfs=-12.0, clipped=False,
                               overflows=2), width=40)
    bar = line[line.index("[") + 1: line.index("]")]
    assert bar == "#" * 20 + "." * 11 + "|" + "." * 8
    assert line.endswith("rms  -30.0 dBFS  peak  -12.0 dBFS  overflows 2")
