"""AudioRecorder on real PortAudio: device listing and choosing a device by name.

The device is ALSA's `file` plugin reading a raw file of noise (no audio hardware
needed, no mocks): PortAudio lists it like any input, the recorder opens it by a
name substring and what it records is the file's samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import trio

from edge_agent import AudioConfig, AudioRecorder, CaptureError, LocalStore
from edge_agent.capture import list_input_devices

RATE = 16000
DEVICE = "edge_recorder_mic"


@pytest.fixture
def file_mic(tmp_path: Path) -> Iterator[np.ndarray]:
    """An ALSA input named DEVICE that plays 20 s of noise; yields the samples."""
    try:
        list_input_devices()
    except Exception as exc:
        pytest.skip(f"PortAudio unusable: {exc}")
    rng = np.random.default_rng(3)
    audio = np.clip(rng.normal(0, 4000, (20 * RATE, 1)), -32768, 32767).astype(np.int16)
    raw = tmp_path / "noise.raw"
    raw.write_bytes(audio.astype("<i2").tobytes())
    (tmp_path / ".asoundrc").write_text(
        f'pcm.{DEVICE} {{\n  type file\n  slave.pcm "null"\n  file "/dev/null"\n'
        f'  infile "{raw}"\n  format "raw"\n}}\n'
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path))
        try:
            yield audio
        finally:
            mp.undo()
            list_input_devices(refresh=True)  # forget the test PCM


async def test_list_input_devices_shows_the_device(file_mic: np.ndarray, tmp_path: Path) -> None:
    rec = AudioRecorder(LocalStore(tmp_path / "store"))
    devices = rec.list_input_devices()  # needs no init
    names = [d["name"] for d in devices]
    assert DEVICE in names
    mic = devices[names.index(DEVICE)]
    assert set(mic) == {"index", "name", "channels", "sample_rate", "hostapi", "is_default"}
    assert mic["channels"] >= 1
    assert isinstance(mic["index"], int)


async def test_the_input_device_is_chosen_by_name_substring(
    file_mic: np.ndarray, tmp_path: Path
) -> None:
    config = AudioConfig(format=8, channels=1, rate=RATE, chunk=320,
                         input_device_index="recorder_mic")
    async with AudioRecorder(LocalStore(tmp_path / "store"), config) as rec:
        with trio.fail_after(10):
            while rec.ring.head < RATE // 2:  # noqa: ASYNC110 (the ring has no event)
                await trio.sleep(0.01)
        ring = rec.ring
        first = datetime.fromtimestamp(ring.index_to_utc(0), tz=UTC)
        end = datetime.fromtimestamp(ring.index_to_utc(RATE // 4), tz=UTC)
        pcm = await rec.segment(first, end)
    # The unpaced file plugin may drop blocks later on; the first quarter second is
    # the file's start, sample for sample.
    got = np.frombuffer(pcm, "<i2").reshape(-1, 1)
    assert np.array_equal(got, file_mic[: len(got)])
    assert len(got) == RATE // 4


async def test_an_unknown_device_fails_init_naming_what_exists(
    file_mic: np.ndarray, tmp_path: Path
) -> None:
    config = AudioConfig(rate=RATE, input_device_index="no-such-mic")
    rec = AudioRecorder(LocalStore(tmp_path / "store"), config)
    with pytest.raises(CaptureError, match=f"no input device matches 'no-such-mic'.*{DEVICE}"):
        await rec.init()
    assert not rec.is_recording
    with pytest.raises(RuntimeError, match="not initialised"):
        await rec.start()
