"""Capture sources: what reaches the ring, and when."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from edge_agent.audio.pcm import SampleFormat, levels, write_wav
from edge_agent.capture import (
    Block,
    CaptureError,
    DeviceInfo,
    FileSource,
    ToneSource,
    resolve_device,
)
from edge_agent.clock import ManualClock
from edge_agent.demo import sample_path


async def collect(source: FileSource | ToneSource) -> list[Block]:
    async with source.open() as blocks:
        return [b async for b in blocks]


def assert_contiguous(blocks: list[Block], rate: int, clock: ManualClock) -> None:
    """Each block's time is exactly where the previous one ended."""
    position = 0
    for b in blocks:
        assert b.utc == pytest.approx(clock.utc_now + position / rate, abs=1e-9)
        assert b.mono == pytest.approx(clock.mono_now + position / rate, abs=1e-9)
        position += len(b.frames)


async def test_tone_source_level_length_and_times() -> None:
    clock = ManualClock()
    src = ToneSource(16000, 2, SampleFormat.INT16, clock, block_ms=20, tone_hz=1000, dbfs=-20,
                     seconds=2.0, realtime=False)
    blocks = await collect(src)
    audio = np.concatenate([b.frames for b in blocks])
    assert audio.shape == (32000, 2)
    assert audio.dtype == np.int16
    lv = levels(audio)
    assert lv.peak_dbfs == pytest.approx(-20.0, abs=0.05)
    assert lv.rms_dbfs == pytest.approx(-23.01, abs=0.05)
    assert_contiguous(blocks, 16000, clock)
    assert src.stats.frames == 32000
    assert src.stats.blocks == len(blocks) == 100


async def test_realtime_pacing_follows_the_audio_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    src = ToneSource(8000, 1, SampleFormat.INT16, ManualClock(), block_ms=100, seconds=3.0)
    arrivals = []
    async with src.open() as blocks:
        async for b in blocks:
            arrivals.append((trio.current_time(), len(b.frames)))
    # Each block is delivered once it has been "captured": at the end of its span.
    assert [t for t, _ in arrivals] == pytest.approx([0.1 * (i + 1) for i in range(30)])


async def test_file_source_resamples_and_mixes_to_the_capture_format() -> None:
    clock = ManualClock()
    src = FileSource(sample_path(), 48000, 2, SampleFormat.FLOAT32, clock, realtime=False)
    blocks = await collect(src)
    audio = np.concatenate([b.frames for b in blocks])
    with wave.open(str(sample_path())) as w:
        file_frames = w.getnframes()
    assert audio.dtype == np.float32
    assert audio.shape[1] == 2
    assert abs(len(audio) - 3 * file_frames) <= 3  # 16 kHz -> 48 kHz
    assert np.array_equal(audio[:, 0], audio[:, 1])
    assert levels(audio).peak_dbfs > -12  # the speech is there, not silence
    assert_contiguous(blocks, 48000, clock)


async def test_file_source_same_rate_is_sample_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    stereo = rng.integers(-20000, 20000, size=(4800, 2), dtype=np.int16)
    path = tmp_path / "noise.wav"
    write_wav(path, stereo, 48000)
    src = FileSource(path, 48000, 2, SampleFormat.INT16, ManualClock(), realtime=False)
    audio = np.concatenate([b.frames for b in await collect(src)])
    assert np.array_equal(audio, stereo)


async def test_file_source_loops(tmp_path: Path) -> None:
    path = tmp_path / "short.wav"
    write_wav(path, np.arange(1600, dtype=np.int16).reshape(-1, 1), 16000)
    src = FileSource(path, 16000, 1, SampleFormat.INT16, ManualClock(), realtime=False,
                     loop=True)
    got = []
    async with src.open() as blocks:
        async for b in blocks:
            got.append(b.frames[:, 0])
            if sum(map(len, got)) >= 4000:
                break
    audio = np.concatenate(got)
    assert np.array_equal(audio[:4000], np.tile(np.arange(1600, dtype=np.int16), 3)[:4000])


def test_file_source_errors_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=r"^.*missing\.wav: no such file$"):
        FileSource(tmp_path / "missing.wav", 16000, 1, SampleFormat.INT16, ManualClock())
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio")
    with pytest.raises(CaptureError, match=r"junk\.wav: not a PCM WAV file \(file does not "
                                           r"start with RIFF id\)"):
        FileSource(junk, 16000, 1, SampleFormat.INT16, ManualClock())


DEVICES = [
    DeviceInfo(0, "HDA Intel PCH: ALC3246 Analog (hw:0,0)", 2, 44100.0, "ALSA", False),
    DeviceInfo(3, "USB PnP Sound Device: Audio (hw:1,0)", 1, 48000.0, "ALSA", False),
    DeviceInfo(7, "default", 32, 44100.0, "ALSA", True),
]


@pytest.mark.parametrize(
    ("spec", "index"), [("usb pnp", 3), (3, 3), ("default", 7), ("hw:0,0", 0)]
)
def test_device_chosen_by_name_substring_index_or_default(spec: str | int, index: int) -> None:
    assert resolve_device(spec, DEVICES).index == index


def test_missing_device_lists_the_available_ones() -> None:
    with pytest.raises(CaptureError) as info:
        resolve_device("ReSpeaker", DEVICES)
    assert str(info.value) == (
        "no input device matches 'ReSpeaker'; available: "
        "0: 'HDA Intel PCH: ALC3246 Analog (hw:0,0)' (2 ch, 44100 Hz); "
        "3: 'USB PnP Sound Device: Audio (hw:1,0)' (1 ch, 48000 Hz); "
        "7: 'default' (32 ch, 44100 Hz)"
    )
    with pytest.raises(CaptureError, match=r"^no input device matches 9; available: no input "
                                           r"devices at all$"):
        resolve_device(9, [])
