"""Ogg Opus encode/decode through libopusenc/libopusfile, and page salvage."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_agent.audio.ogg import last_complete_page_end, ogg_crc32
from edge_agent.audio.opus import (
    APPLICATIONS,
    COMPLEXITIES,
    FRAME_MS,
    OggOpusEncoder,
    OpusError,
    decode_ogg_opus,
    decode_ogg_opus_file,
)
from edge_agent.audio.pcm import SampleFormat, from_float32, read_wav
from edge_agent.audio.resample import resample
from edge_agent.demo import sample_path

from support.signals import encode_ogg_opus

FRAME_48K = 960  # one 20 ms Opus frame at the decoder's 48 kHz


def tone(rate: int, seconds: float, channels: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1)


def aligned_snr_db(ref: np.ndarray, dec: np.ndarray, rate: int, freq: float) -> float:
    """SNR of ``dec`` against ``ref`` after cross-correlation alignment.

    The lag search spans half a period either way, the only range in which a
    pure tone's correlation peak is unambiguous; gross misalignment (a missed
    pre-skip) is caught separately by the onset check.
    """
    n = min(ref.shape[0], dec.shape[0])
    edge = rate // 5  # skip codec start-up and end padding
    half_period = int(rate / freq / 2)
    r = ref[edge : n - edge].astype(np.float64)
    lags = range(-half_period, half_period + 1)
    corr = [float(np.dot(r, dec[edge + lag : n - edge + lag])) for lag in lags]
    lag = lags[int(np.argmax(corr))]
    d = dec[edge + lag : n - edge + lag].astype(np.float64)
    return float(10 * np.log10(np.sum(r**2) / np.sum((r - d) ** 2)))


def onset(x: np.ndarray) -> int:
    return int(np.argmax(np.abs(x) > 0.05))


def page_ends(data: bytes) -> list[int]:
    """Byte offsets where each Ogg page ends, from the page headers."""
    ends, pos = [], 0
    while pos < len(data):
        nsegs = data[pos + 26]
        pos += 27 + nsegs + sum(data[pos + 27 : pos + 27 + nsegs])
        ends.append(pos)
    return ends


@pytest.mark.parametrize(
    ("rate", "channels", "bitrate", "application", "min_snr_db"),
    [
        # Measured 28.9 dB and 35.5 dB with libopus 1.3.1; thresholds leave margin
        # for other libopus versions.
        (16000, 1, 24000, "voip", 20.0),
        (48000, 2, 32000, "audio", 20.0),
    ],
)
def test_tone_survives_encode_decode(
    rate: int, channels: int, bitrate: int, application: str, min_snr_db: float
) -> None:
    x = tone(rate, 2.0, channels)
    data = encode_ogg_opus(
        from_float32(x, SampleFormat.INT16), rate, bitrate=bitrate, application=application
    )
    dec = decode_ogg_opus(data)
    assert (dec.rate, dec.channels, dec.input_rate) == (48000, channels, rate)
    assert abs(dec.pcm.shape[0] - x.shape[0] * 48000 // rate) <= FRAME_48K
    # Audible size check: about bitrate * duration, not wildly more.
    assert len(data) < 1.3 * bitrate / 8 * 2.0

    back = dec.pcm if rate == 48000 else resample(dec.pcm, 48000, rate)
    for ch in range(channels):
        # Pre-skip is removed: the tone starts when it started (within 1 ms).
        assert abs(onset(back[:, ch]) - onset(x[:, ch])) <= rate // 1000
        assert aligned_snr_db(x[:, ch], back[:, ch], rate, 440.0) >= min_snr_db


def test_a_part_is_decoded_by_seeking() -> None:
    """decode_ogg_opus(start=, frames=) gives that part of the whole decode: after
    a 200 ms lead-in (dropped) the decoder has settled to the same samples."""
    x = from_float32(tone(16000, 6.0, 1), SampleFormat.INT16)
    data = encode_ogg_opus(x, 16000, bitrate=64000)
    whole = decode_ogg_opus(data).pcm
    lead, start, n = 9600, 100_001, 48_000
    part = decode_ogg_opus(data, start=start - lead, frames=n + lead).pcm[lead:]
    assert part.shape == (n, 1)
    err = part - whole[start : start + n]
    assert 10 * np.log10(np.sum(whole[start : start + n] ** 2) / np.sum(err**2)) > 60
    # Past the end there is nothing, not an error.
    assert decode_ogg_opus(data, start=len(whole) + 10, frames=5).pcm.shape == (0, 1)


def test_pages_come_out_while_writing() -> None:
    x = from_float32(tone(16000, 10.0, 1), SampleFormat.INT16)
    enc = OggOpusEncoder(16000, 1, max_page_delay_ms=1000)
    outputs = [enc.write(x[i : i + 1600]) for i in range(0, x.shape[0], 1600)]
    final = enc.finish()
    enc.close()
    written = b"".join(outputs)
    non_empty = [o for o in outputs if o]
    assert len(non_empty) >= 8  # roughly one page per second of audio
    assert len(written) > 0.8 * (len(written) + len(final))
    for chunk in non_empty:  # every return value is whole pages
        assert chunk.startswith(b"OggS")
        assert last_complete_page_end(chunk) == len(chunk)
    assert enc.samples_written == x.shape[0]
    assert enc.bytes_out == len(written) + len(final)
    assert decode_ogg_opus(written + final).seconds == pytest.approx(10.0, abs=0.02)


def test_file_cut_after_flush_decodes_up_to_the_flushed_audio(tmp_path: Path) -> None:
    x = tone(16000, 5.0, 1)
    path = tmp_path / "segment.opus"
    with OggOpusEncoder(16000, 1) as enc, path.open("wb") as f:
        f.write(enc.write(x[:48000]))
        f.write(enc.flush())
        flushed_bytes = f.tell()
        f.write(enc.write(x[48000:72000]))  # written, never flushed: lost in the "crash"
    on_disk = path.read_bytes()
    assert last_complete_page_end(on_disk) == len(on_disk)

    survived = decode_ogg_opus(on_disk[:flushed_bytes])
    # All but the last partial frame and look-ahead of the 3 s written before flush.
    assert 3.0 - 0.06 <= survived.seconds <= 3.0
    assert survived.input_rate == 16000


def test_flush_before_any_audio_and_finish_of_empty_stream() -> None:
    with OggOpusEncoder(16000, 1) as enc:
        head = enc.flush()
        assert head.startswith(b"OggS")
        rest = enc.finish()
    assert decode_ogg_opus(head + rest).pcm.shape == (0, 1)


def test_opusinfo_accepts_the_file(tmp_path: Path) -> None:
    opusinfo = shutil.which("opusinfo")
    if opusinfo is None:
        pytest.skip("opusinfo (opus-tools) is not installed")
    path = tmp_path / "chunk.opus"
    path.write_bytes(encode_ogg_opus(tone(16000, 3.0, 1), 16000, comments={"TITLE": "t"}))
    result = subprocess.run([opusinfo, str(path)], capture_output=True, text=True, check=False)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "WARNING" not in report and "ERROR" not in report, report
    assert "Original sample rate: 16000 Hz" in report
    m = re.search(r"Playback length: (\d+)m:([\d.]+)s", report)
    assert m is not None, report
    assert int(m[1]) * 60 + float(m[2]) == pytest.approx(3.0, abs=0.01)


def test_ffprobe_sees_opus_with_the_right_duration(tmp_path: Path) -> None:
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        pytest.skip("ffprobe (ffmpeg) is not installed")
    path = tmp_path / "chunk.ogg"
    path.write_bytes(encode_ogg_opus(tone(48000, 2.5, 2), 48000, bitrate=32000))
    result = subprocess.run(
        [ffprobe, "-v", "error", "-show_entries", "stream=codec_name,channels:format=duration",
         "-of", "default=noprint_wrappers=1", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    fields = dict(line.split("=", 1) for line in result.stdout.split())
    assert fields["codec_name"] == "opus"
    assert fields["channels"] == "2"
    # ffprobe's format duration does not subtract the 6.5 ms pre-skip.
    assert float(fields["duration"]) == pytest.approx(2.5, abs=0.02)


def test_chunks_encoded_separately_decode_independently(tmp_path: Path) -> None:
    a = encode_ogg_opus(tone(16000, 1.0, 1, freq=440.0), 16000)
    b = encode_ogg_opus(tone(16000, 1.5, 1, freq=880.0), 16000)
    for data, seconds, freq in ((a, 1.0, 440.0), (b, 1.5, 880.0)):
        dec = decode_ogg_opus(data)
        assert dec.seconds == pytest.approx(seconds, abs=0.001)
        mid = dec.pcm[4800:-4800, 0]
        peak_hz = np.argmax(np.abs(np.fft.rfft(mid))) * 48000 / mid.size
        assert peak_hz == pytest.approx(freq, abs=5)
    # Distinct serial numbers, so the chunks concatenate into a valid chained file.
    assert a[14:18] != b[14:18]
    path = tmp_path / "both.opus"
    path.write_bytes(a + b)
    assert decode_ogg_opus_file(path).seconds == pytest.approx(2.5, abs=0.001)


def test_comments_and_serial_land_in_the_stream() -> None:
    data = encode_ogg_opus(
        tone(16000, 0.2, 1), 16000, comments={"DEVICE": "pi-7"}, serial=0x1234ABCD
    )
    assert b"DEVICE=pi-7" in data
    starts = [0, *page_ends(data)[:-1]]
    assert {int.from_bytes(data[s + 14 : s + 18], "little") for s in starts} == {0x1234ABCD}


def test_last_complete_page_end_salvages_a_truncated_file() -> None:
    data = encode_ogg_opus(tone(16000, 5.0, 1), 16000, max_page_delay_ms=500)
    ends = page_ends(data)
    assert ends[-1] == len(data)
    assert last_complete_page_end(data) == len(data)

    cut = (ends[5] + ends[6]) // 2  # power cut in the middle of page 7
    salvaged = last_complete_page_end(data[:cut])
    assert salvaged == ends[5]
    dec = decode_ogg_opus(data[:salvaged])
    assert 1.0 < dec.seconds < 5.0

    corrupted = bytearray(data)
    corrupted[ends[3] + 40] ^= 0x01  # one flipped bit in page 5's body
    assert last_complete_page_end(bytes(corrupted)) == ends[3]
    assert last_complete_page_end(b"") == 0
    assert last_complete_page_end(b"\0" * 4096) == 0
    assert last_complete_page_end(data[:20]) == 0


def _reference_ogg_crc(data: bytes) -> int:
    """Straight table-driven CRC from the Ogg spec, to check the fast one."""
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else r << 1
        table.append(r & 0xFFFFFFFF)
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[((crc >> 24) ^ byte) & 0xFF]
    return crc


def test_ogg_crc_matches_the_spec_algorithm() -> None:
    rng = np.random.default_rng(7)
    for size in (0, 1, 27, 300, 4099):
        data = rng.bytes(size)
        assert ogg_crc32(data) == _reference_ogg_crc(data)


@pytest.mark.parametrize("garbage", [b"", b"hello", b"OggS" + bytes(200), bytes(range(256)) * 20])
def test_garbage_does_not_decode(garbage: bytes) -> None:
    with pytest.raises(OpusError, match="op_open"):
        decode_ogg_opus(garbage)
    with pytest.raises(OpusError, match="op_open"):  # nor read from a file
        decode_ogg_opus(io.BytesIO(garbage))


def test_write_after_finish_or_close_raises() -> None:
    enc = OggOpusEncoder(16000, 1)
    enc.write(np.zeros((320, 1), np.int16))
    enc.finish()
    assert enc.finish() == b""
    with pytest.raises(OpusError, match="finished"):
        enc.write(np.zeros((320, 1), np.int16))
    enc.close()
    enc.close()
    with pytest.raises(OpusError, match="closed"):
        enc.flush()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 0}, "rate"),
        ({"channels": 0}, "channels"),
        ({"channels": 9}, "channels"),
        ({"bitrate": 100}, "bitrate"),
        ({"application": "music"}, "application"),
        ({"frame_ms": 15}, "frame_ms"),
        ({"serial": -1}, "serial"),
        ({"max_page_delay_ms": -5}, "max_page_delay_ms"),
        ({"comments": {"A=B": "x"}}, "comments"),
        ({"complexity": 11}, "complexity"),
        ({"complexity": -1}, "complexity"),
    ],
)
def test_bad_encoder_arguments_are_named(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"rate": 16000, "channels": 1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        OggOpusEncoder(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("frame_ms", FRAME_MS)
def test_every_frame_size_and_application_encodes(frame_ms: float) -> None:
    x = tone(48000, 0.5, 1)
    for application in APPLICATIONS:
        dec = decode_ogg_opus(encode_ogg_opus(x, 48000, frame_ms=frame_ms, application=application))
        assert abs(dec.pcm.shape[0] - x.shape[0]) <= FRAME_48K


def test_complexity_changes_the_encoding_and_every_setting_decodes_in_full() -> None:
    speech, rate = read_wav(sample_path())
    decoded = {c: decode_ogg_opus(encode_ogg_opus(speech, rate, complexity=c, serial=1)).pcm
               for c in COMPLEXITIES}
    assert all(len(pcm) == len(speech) * 48000 // rate for pcm in decoded.values())
    # The setting reaches libopus: the least effort encodes the speech differently...
    assert not np.array_equal(decoded[0], decoded[10])
    # ...and without one the encoder keeps libopus's own default, 10.
    default = decode_ogg_opus(encode_ogg_opus(speech, rate, serial=1)).pcm
    np.testing.assert_array_equal(default, decoded[10])


def test_block_shape_must_match_channels() -> None:
    with OggOpusEncoder(16000, 2) as enc, pytest.raises(ValueError, match=r"\(frames, 2\)"):
        enc.write(np.zeros((100, 1), np.int16))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_thousands_of_short_encodes_do_not_leak() -> None:
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc/self/statm (Linux) to read RSS")
    x = from_float32(tone(16000, 0.02, 1), SampleFormat.INT16)
    for _ in range(200):  # warm up allocator pools
        encode_ogg_opus(x, 16000)
    before = _rss_bytes()
    for _ in range(2000):
        encode_ogg_opus(x, 16000)
    for _ in range(200):  # never closed explicitly: freed by garbage collection
        OggOpusEncoder(16000, 1).write(x)
    assert _rss_bytes() - before < 4 * 1024 * 1024
