"""PCM conversions, channel mixing, levels and WAV I/O."""

from __future__ import annotations

import io
import json
import wave
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from edge_agent.audio.pcm import (
    DB_FLOOR,
    SampleFormat,
    from_float32,
    levels,
    mix_down,
    numpy_dtype,
    pcm_from_bytes,
    read_wav,
    to_bytes_le,
    to_float32,
    unpack_int24,
    wav_bytes,
    write_wav,
)

from support.signals import sine


def test_numpy_dtype_matches_format() -> None:
    assert numpy_dtype(SampleFormat.INT16) == np.int16
    assert SampleFormat.INT32.numpy_dtype == np.int32
    assert numpy_dtype("float32") == np.float32
    with pytest.raises(ValueError, match="int24"):
        numpy_dtype("int24")


def test_every_int16_value_round_trips_exactly() -> None:
    everything = np.arange(-32768, 32768, dtype=np.int16).reshape(-1, 2)
    f = to_float32(everything)
    assert f.dtype == np.float32
    assert f.shape == everything.shape
    assert f.min() == -1.0
    assert f.max() < 1.0
    np.testing.assert_array_equal(from_float32(f, SampleFormat.INT16), everything)


def test_int32_full_scale_and_left_justified_24_bit() -> None:
    x = np.array([-(2**31), 2**31 - 256, 0x7FFFFF << 8, 1 << 8], dtype=np.int32)
    f = to_float32(x)
    assert f[0] == -1.0
    assert f[1] == pytest.approx(1.0, abs=1e-6)
    # The largest 24-bit sample, left-justified, is full scale too.
    assert f[2] == pytest.approx(1.0, abs=1e-6)
    assert f[3] == pytest.approx(2.0**-23)


def test_float_inputs() -> None:
    f32 = np.zeros((4, 2), np.float32)
    assert to_float32(f32) is f32  # no copy on the hot path
    f64 = np.full(3, 0.25)
    assert to_float32(f64).dtype == np.float32
    with pytest.raises(ValueError, match="uint8"):
        to_float32(np.zeros(3, np.uint8))


def test_from_float32_clips_and_rounds() -> None:
    x = np.array([1.5, 1.0, -1.0, -3.0, 1.4 / 32768, 1.6 / 32768], dtype=np.float32)
    np.testing.assert_array_equal(
        from_float32(x, SampleFormat.INT16), [32767, 32767, -32768, -32768, 1, 2]
    )
    np.testing.assert_array_equal(
        from_float32(x[:4], SampleFormat.INT32),
        [2**31 - 1, 2**31 - 1, -(2**31), -(2**31)],
    )
    assert from_float32(x, "float32") is x


def test_unpack_int24_known_bytes() -> None:
    raw = bytes.fromhex("010000 ffff7f 000080 ffffff")
    out = unpack_int24(raw, channels=2)
    assert out.dtype == np.int32
    assert out.shape == (2, 2)
    np.testing.assert_array_equal(out, [[256, 0x7FFFFF << 8], [-(2**31), -256]])
    with pytest.raises(ValueError, match="whole number"):
        unpack_int24(raw[:-1], channels=2)


def test_mix_down_values() -> None:
    stereo = np.array([[16384, -16384], [8192, 0]], dtype=np.int16)
    np.testing.assert_allclose(mix_down(stereo, 1), [[0.0], [0.125]])
    mono = np.array([[0.5], [-0.25]], dtype=np.float32)
    np.testing.assert_array_equal(mix_down(mono, 2), [[0.5, 0.5], [-0.25, -0.25]])
    quad = np.arange(8, dtype=np.float32).reshape(2, 4) / 10
    np.testing.assert_allclose(mix_down(quad, 2), [[0.0, 0.1], [0.4, 0.5]])
    assert mix_down(stereo, 2).dtype == np.float32
    with pytest.raises(ValueError, match="2 channels to 3"):
        mix_down(stereo, 3)


def test_levels_of_full_scale_sine() -> None:
    lv = levels(sine(48000, 1.0, 1000.0))
    assert lv.rms_dbfs == pytest.approx(-3.01, abs=0.05)
    assert lv.peak_dbfs == pytest.approx(0.0, abs=0.05)
    assert lv.clipped


def test_levels_of_int16_half_scale_sine() -> None:
    x = from_float32(sine(16000, 1.0, 440.0, amp=0.5), SampleFormat.INT16)
    lv = levels(x.reshape(-1, 1))
    assert lv.rms_dbfs == pytest.approx(-9.03, abs=0.05)
    assert lv.peak_dbfs == pytest.approx(-6.02, abs=0.05)
    assert not lv.clipped


def test_levels_of_silence_are_floored_and_serialise() -> None:
    lv = levels(np.zeros((1600, 2), np.int16))
    assert (lv.rms_dbfs, lv.peak_dbfs, lv.clipped) == (DB_FLOOR, DB_FLOOR, False)
    assert DB_FLOOR == -120.0
    # -inf would not survive strict JSON; the floor does.
    assert json.loads(json.dumps(asdict(lv), allow_nan=False))["rms_dbfs"] == -120.0


@pytest.mark.parametrize("fmt", list(SampleFormat))
def test_bytes_round_trip(fmt: SampleFormat) -> None:
    x = from_float32(sine(8000, 0.01, 300.0, 0.7).reshape(-1, 2), fmt)
    raw = to_bytes_le(x)
    assert len(raw) == x.size * x.dtype.itemsize
    back = pcm_from_bytes(raw, fmt, channels=2)
    assert back.dtype == x.dtype
    np.testing.assert_array_equal(back, x)


def test_bytes_are_little_endian_interleaved() -> None:
    x = np.array([[1, -2]], dtype=np.int16)
    assert to_bytes_le(x) == b"\x01\x00\xfe\xff"
    assert to_bytes_le(x.astype(">i2")) == b"\x01\x00\xfe\xff"
    with pytest.raises(ValueError, match="whole number"):
        pcm_from_bytes(b"\x01\x00\xfe", SampleFormat.INT16, channels=1)


@pytest.mark.parametrize("dtype", [np.int16, np.int32])
def test_wav_round_trip(tmp_path: Path, dtype: type) -> None:
    x = from_float32(sine(16000, 0.25, 440.0, 0.8).reshape(-1, 2), SampleFormat(dtype.__name__))
    path = tmp_path / "tone.wav"
    write_wav(path, x, 16000)
    back, rate = read_wav(path)
    assert rate == 16000
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, x)
    # A part of it, read from its offset; past the end there is nothing.
    np.testing.assert_array_equal(read_wav(path, start=7, frames=100)[0], x[7:107])
    assert read_wav(path, start=len(x) + 5)[0].shape == (0, 2)


def test_float_audio_is_written_as_16_bit(tmp_path: Path) -> None:
    x = sine(8000, 0.1, 440.0, 0.5)
    data = wav_bytes(x, 8000)
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getsampwidth(), w.getnchannels(), w.getframerate()) == (2, 1, 8000)
    back, _ = read_wav(io.BytesIO(data))
    np.testing.assert_allclose(to_float32(back)[:, 0], x, atol=1 / 32768)


def test_read_24_bit_wav_gives_left_justified_int32(tmp_path: Path) -> None:
    path = tmp_path / "studio.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(3)
        w.setframerate(48000)
        w.writeframes(bytes.fromhex("010000 ffff7f 000080"))
    x, rate = read_wav(path)
    assert rate == 48000
    np.testing.assert_array_equal(x, [[256], [0x7FFFFF << 8], [-(2**31)]])


def test_truncated_wav_yields_the_whole_frames_it_holds(tmp_path: Path) -> None:
    x = np.arange(1000, dtype=np.int16).reshape(-1, 2)
    data = wav_bytes(x, 16000)
    path = tmp_path / "cut.wav"
    path.write_bytes(data[: 44 + 4 * 100 + 3])  # power cut mid-frame
    back, _ = read_wav(path)
    np.testing.assert_array_equal(back, x[:100])


def test_read_wav_rejects_non_wav_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("not audio at all\n")
    with pytest.raises(ValueError, match=r"notes\.wav: not a PCM WAV file \(.+\)"):
        read_wav(path)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.wav: not a PCM WAV file"):
        read_wav(empty)
