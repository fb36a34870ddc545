"""Sample-rate conversion: alias rejection, fidelity, streaming equivalence."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.audio.pcm import SampleFormat, from_float32, to_float32
from edge_agent.audio.resample import (
    CONVERTERS,
    DEFAULT_CONVERTER,
    StreamResampler,
    alias_rejection_db,
    linear_interpolation,
    resample,
)

from support.signals import sine


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


def middle(x: np.ndarray) -> np.ndarray:
    return x[x.shape[0] // 4 : 3 * x.shape[0] // 4]


def test_default_converter_rejects_a_10khz_tone_by_90db() -> None:
    assert DEFAULT_CONVERTER in CONVERTERS
    assert alias_rejection_db(DEFAULT_CONVERTER) >= 90.0


def test_linear_interpolation_lets_the_alias_through() -> None:
    # The reason the pipeline never interpolates linearly: 10 kHz folds to 6 kHz.
    assert alias_rejection_db("linear") < 10.0
    folded = linear_interpolation(sine(48000, 1.0, 10000.0), 48000, 16000)
    assert peak_hz(middle(folded), 16000) == pytest.approx(6000, abs=4)


@pytest.mark.parametrize("converter", CONVERTERS)
def test_every_offered_converter_clears_90db(converter: str) -> None:
    assert alias_rejection_db(converter, seconds=0.5) >= 90.0


def test_1khz_tone_keeps_frequency_and_amplitude() -> None:
    x = sine(48000, 1.0, 1000.0, amp=0.5)
    y = resample(x, 48000, 16000)
    assert y.shape == (16000,)
    mid = middle(y)
    rms_db = 20 * np.log10(np.sqrt(np.mean(mid.astype(np.float64) ** 2)))
    assert rms_db == pytest.approx(20 * np.log10(0.5 / np.sqrt(2)), abs=0.1)
    assert peak_hz(mid, 16000) == pytest.approx(1000.0, abs=2.0)


@pytest.mark.parametrize(("in_rate", "out_rate"), [(48000, 16000), (44100, 16000), (16000, 48000)])
def test_streaming_in_random_blocks_equals_one_shot(in_rate: int, out_rate: int) -> None:
    rng = np.random.default_rng(in_rate + out_rate)
    x = from_float32(
        (rng.standard_normal((in_rate, 1)) * 0.2).astype(np.float32), SampleFormat.INT16
    )
    one_shot = resample(x, in_rate, out_rate)

    rs = StreamResampler(in_rate, out_rate, channels=1)
    parts = []
    pos = 0
    while pos < x.shape[0]:
        n = int(rng.integers(1, 2000))
        parts.append(rs.process(x[pos : pos + n]))
        pos += n
    parts.append(rs.flush())
    streamed = np.concatenate(parts)

    assert streamed.dtype == np.float32
    assert streamed.shape[0] == x.shape[0] * out_rate // in_rate
    assert streamed.shape == one_shot.shape
    np.testing.assert_allclose(streamed, one_shot, atol=1e-4)


@pytest.mark.parametrize("frames", [1, 2, 5, 479, 1001, 44099, 44101])
@pytest.mark.parametrize(
    ("in_rate", "out_rate"), [(48000, 16000), (44100, 16000), (22050, 8000), (8000, 22050)]
)
def test_a_stream_ends_at_the_floor_of_the_exact_frame_count(
    frames: int, in_rate: int, out_rate: int
) -> None:
    # soxr itself rounds to the nearest frame; callers size files and headers
    # by the floor.
    rs = StreamResampler(in_rate, out_rate, channels=1)
    head = rs.process(np.zeros(frames, np.float32))
    assert head.shape[0] + rs.flush().shape[0] == frames * out_rate // in_rate


def test_output_lags_then_flush_returns_the_tail() -> None:
    rs = StreamResampler(48000, 16000, channels=1)
    head = rs.process(sine(48000, 0.1, 440.0))
    assert 0 < head.shape[0] < 1600  # filter delay held back
    tail = rs.flush()
    assert head.shape[0] + tail.shape[0] == 1600
    # flush resets: the next stream starts clean.
    again = rs.process(np.zeros(4800, np.float32))
    assert again.shape[0] == head.shape[0]
    assert np.all(again == 0)


@pytest.mark.parametrize(
    ("in_rate", "out_rate"), [(48000, 16000), (44100, 16000), (16000, 8000), (16000, 48000)]
)
def test_each_block_gives_its_length_at_the_new_rate(in_rate: int, out_rate: int) -> None:
    # soxr alone returns nothing or a whole filter block per call; a stream cut
    # into 20 ms blocks must still come out in 20 ms blocks.
    block = in_rate // 50
    rs = StreamResampler(in_rate, out_rate, channels=1)
    sizes = [rs.process(np.zeros(block, np.float32)).shape[0] for _ in range(200)]
    assert set(sizes[100:]) == {block * out_rate // in_rate}


def test_stereo_channels_stay_separate() -> None:
    x = np.stack([sine(48000, 0.5, 1000.0, 0.5), sine(48000, 0.5, 3000.0, 0.5)], axis=1)
    rs = StreamResampler(48000, 16000, channels=2)
    y = np.concatenate([rs.process(x[:7000]), rs.process(x[7000:]), rs.flush()])
    assert y.shape == (8000, 2)
    assert peak_hz(middle(y[:, 0]), 16000) == pytest.approx(1000.0, abs=4)
    assert peak_hz(middle(y[:, 1]), 16000) == pytest.approx(3000.0, abs=4)
    np.testing.assert_allclose(y, resample(x, 48000, 16000), atol=1e-4)


def test_equal_rates_pass_through() -> None:
    x = from_float32(sine(16000, 0.1, 440.0, 0.3), SampleFormat.INT16).reshape(-1, 1)
    rs = StreamResampler(16000, 16000, channels=1)
    y = rs.process(x)
    np.testing.assert_array_equal(y, to_float32(x))
    assert rs.flush().shape == (0, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"converter": "linear"}, "linear"),
        ({"converter": "LQ"}, "LQ"),
        ({"in_rate": 0}, "in_rate"),
        ({"out_rate": -16000}, "out_rate"),
        ({"channels": 0}, "channels"),
        ({"in_rate": 1000, "out_rate": 384000}, "256"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"in_rate": 48000, "out_rate": 16000, "channels": 1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        StreamResampler(**args)  # type: ignore[arg-type]


def test_block_with_wrong_channel_count_is_rejected() -> None:
    rs = StreamResampler(48000, 16000, channels=2)
    with pytest.raises(ValueError, match=r"\(frames, 2\)"):
        rs.process(np.zeros((100, 3), np.float32))
    with pytest.raises(ValueError, match="1-D"):
        rs.process(np.zeros(100, np.float32))
