"""The AudioRecorder API: one test per reference method and per documented error.

Input is a FileSource of seeded noise (every stretch of it is unique, so recorded
audio can be located in the file and compared sample for sample) or a ToneSource,
paced in real time on Trio's MockClock (autojump): seconds of audio take
milliseconds. Uploads go to a real LocalStore; MP3 and FLAC are decoded with
ffmpeg, Opus with libopusfile, so no check trusts the encoder that made the file.
"""

from __future__ import annotations

import io
import re
import subprocess
import time
import wave
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from edge_agent import (
    AudioConfig,
    AudioFormat,
    AudioFrame,
    AudioRecorder,
    AudioSegment,
    LocalStore,
)
from edge_agent.audio.opus import decode_ogg_opus
from edge_agent.audio.pcm import SampleFormat, read_wav, write_wav
from edge_agent.audio.resample import StreamResampler
from edge_agent.capture import FileSource, ToneSource
from edge_agent.clock import SystemClock, iso_utc
from edge_agent.recorder import PYAUDIO_FORMATS, pcm_layout

from support.sources import FastSource

RATE = 16000
KEY_RE = r"^session-123/segment/[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[0-9a-f]{8}$"


# ----------------------------------------------------------------------------
# Helpers


@pytest.fixture
def autojump_clock(monkeypatch: pytest.MonkeyPatch) -> trio.testing.MockClock:
    """An autojumping MockClock (pytest-trio runs this module's tests on it) that
    holds still while a worker thread runs.

    Plain autojump takes waiting for a thread (the recorder writes and uploads
    in threads) as idle and jumps to the next deadline, so a real-time-paced
    source raced through virtual time at CPU speed for as long as the thread
    took: on a busy machine a whole file's worth, and what a test recorded
    depended on the machine's load.
    """
    clock = trio.testing.MockClock(autojump_threshold=0)
    threads = 0
    jump = clock._autojump

    def autojump_unless_a_thread_runs() -> None:
        if threads:
            time.sleep(0.0005)  # the loop has nothing to run until the thread is back
        else:
            jump()

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal threads
        threads += 1
        try:
            return await run_sync(*args, **kwargs)
        finally:
            threads -= 1

    run_sync = trio.to_thread.run_sync
    monkeypatch.setattr(clock, "_autojump", autojump_unless_a_thread_runs)
    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    return clock


def noise(seconds: float, rate: int = RATE, channels: int = 1, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 4000, (round(seconds * rate), channels))
    out: np.ndarray = np.clip(x, -32768, 32767).astype(np.int16)
    return out


@pytest.fixture
def noise_file(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """60 s of unique noise at 16 kHz mono, as a WAV file and as samples."""
    x = noise(60.0)
    path = tmp_path / "noise.wav"
    write_wav(path, x, RATE)
    return path, x


def file_source(path: Path, rate: int = RATE, channels: int = 1,
                fmt: SampleFormat = SampleFormat.INT16) -> FileSource:
    return FileSource(path, rate, channels, fmt, SystemClock(), realtime=True, block_ms=20)


def recorder(tmp_path: Path, source: Any, **kw: Any) -> AudioRecorder:
    config = kw.pop("config", AudioConfig(rate=RATE, chunk=1600))
    return AudioRecorder(LocalStore(tmp_path / "store"), config, source=source,
                         work_dir=tmp_path / "work", **kw)




def locate(haystack: np.ndarray, needle: np.ndarray) -> int:
    """Where `needle` starts in `haystack`, asserting it is there sample for sample."""
    assert len(needle) > 16
    first = needle[:16, 0]
    hits = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(haystack[:, 0], 16)
                          .__eq__(first).all(axis=1))
    assert len(hits) == 1, f"{len(hits)} matches"
    start = int(hits[0])
    assert np.array_equal(haystack[start:start + len(needle)], needle)
    return start


def pcm16(data: bytes, channels: int = 1) -> np.ndarray:
    return np.frombuffer(data, "<i2").reshape(-1, channels)


def ffmpeg_decode(data: bytes, rate: int, channels: int) -> np.ndarray:
    """Decode any audio file with ffmpeg (independent of the encoders under test)."""
    out = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", "pipe:0", "-f", "s16le", "-acodec", "pcm_s16le",
         "-ar", str(rate), "-ac", str(channels), "pipe:1"],
        input=data, capture_output=True, check=True, timeout=60)
    return pcm16(out.stdout, channels)


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


# ----------------------------------------------------------------------------
# Types and config


def test_reference_types_have_their_fields() -> None:
    assert [f.value for f in AudioFormat] == ["pcm", "wav", "mp3", "opus", "flac"]
    assert issubclass(AudioFormat, str)
    assert AudioConfig._fields == ("format", "channels", "rate", "chunk", "input_device_index")
    assert AudioSegment._fields == ("key", "duration_ms", "started_at", "ended_at", "frames")
    frame = AudioFrame(datetime(2026, 1, 1, tzinfo=UTC), b"\x01\x02")
    assert (frame.timestamp.year, frame.data) == (2026, b"\x01\x02")
    assert not hasattr(frame, "__dict__")  # slots


@pytest.mark.parametrize(("value", "name", "width"), [
    (8, "int16", 2), (4, "int24", 3), (2, "int32", 4), (1, "float32", 4),
    ("int16", "int16", 2), ("int24", "int24", 3), (SampleFormat.FLOAT32, "float32", 4),
])
def test_pyaudio_constants_and_names_map_to_layouts(value: Any, name: str, width: int) -> None:
    layout = pcm_layout(value)
    assert (layout.name, layout.width) == (name, width)
    assert PYAUDIO_FORMATS[8] == "int16"


@pytest.mark.parametrize(("config", "message"), [
    (AudioConfig(channels=0), "AudioConfig.channels"),
    (AudioConfig(rate=4000), "AudioConfig.rate"),
    (AudioConfig(chunk=0), "AudioConfig.chunk"),
    (AudioConfig(format=16), "paInt16=8"),  # paInt8 is not supported
    (AudioConfig(format="int12"), "expected int16, int24, int32 or float32"),
    (AudioConfig(rate=48000), "source delivers 16000 Hz x1 int16; AudioConfig asks for 48000"),
    (AudioConfig(format=1), "AudioConfig asks for 16000 Hz x1 float32"),
])
async def test_init_rejects_a_bad_config_naming_the_field(
    tmp_path: Path, config: AudioConfig, message: str
) -> None:
    source = ToneSource(RATE, 1, SampleFormat.INT16, SystemClock())
    rec = recorder(tmp_path, source, config=config)
    with pytest.raises(ValueError, match=message):
        await rec.init()
    with pytest.raises(RuntimeError, match="not initialised"):
        await rec.start()


async def test_every_method_needs_init(tmp_path: Path) -> None:
    rec = recorder(tmp_path, ToneSource(RATE, 1, SampleFormat.INT16, SystemClock()))
    now = datetime.now(UTC)
    for call in (rec.start("x"), rec.stop(), rec.segment(now, now + timedelta(seconds=1))):
        with pytest.raises(RuntimeError, match="not initialised"):
            await call
    with pytest.raises(RuntimeError, match="not initialised"):
        async for _ in rec.stream():
            pass
    with pytest.raises(RuntimeError, match="not initialised"):
        rec.clear_frames()
    assert not rec.is_recording
    assert rec.current_segment_key is None
    await rec.close()  # closing what was never opened is fine


# ----------------------------------------------------------------------------
# start / stop / close


async def test_start_records_and_stop_uploads_the_audio_with_metadata(
    tmp_path: Path, noise_file: tuple[Path, np.ndarray], autojump_clock: Any
) -> None:
    path, source_audio = noise_file
    async with recorder(tmp_path, file_source(path)) as rec:
        await trio.sleep(0.5)
        called = trio.current_time()
        key = await rec.start("session-123", "segment")
        assert rec.is_recording
        assert rec.current_segment_key == key
        await trio.sleep(2.0)
        span = trio.current_time() - called
        seg = await rec.stop()
        assert not rec.is_recording
        assert rec.current_segment_key is None
        ring = rec.ring
    assert isinstance(seg, AudioSegment)
    assert seg.key == key
    assert re.match(KEY_RE, key)
    # The frames are the source audio, sample for sample, ~2 s of it.
    frames = pcm16(seg.frames)
    start = locate(source_audio, frames)
    # From the start() call to the stop() call, to within a capture block.
    assert len(frames) / RATE == pytest.approx(span, abs=0.021)
    assert seg.duration_ms == round(len(frames) * 1000 / RATE)
    # Times are the ring's capture times of the first frame and just after the last.
    assert seg.started_at.tzinfo is not None
    assert seg.started_at.timestamp() == pytest.approx(ring.index_to_utc(start), abs=1e-6)
    assert (seg.ended_at - seg.started_at).total_seconds() == pytest.approx(
        len(frames) / RATE, abs=2e-6)  # datetimes hold microseconds
    # The store holds the same audio as a WAV, with the metadata the reference sent.
    store = LocalStore(tmp_path / "store")
    assert await store.list() == [key]
    stored, rate = read_wav(io.BytesIO(await store.download(key)))
    assert rate == RATE
    assert np.array_equal(stored, frames)
    assert await store.metadata(key) == {
        "content_type": "audio/wav", "format": "wav", "duration_ms": seg.duration_ms,
        "rate": RATE, "channels": 1, "sample_format": "int16",
        "started_at": iso_utc(seg.started_at.timestamp()),
        "ended_at": iso_utc(seg.ended_at.timestamp()), "frames": len(frames),
        "lost_frames": 0, "gaps": 0,
    }
    assert list((tmp_path / "work").iterdir()) == []  # the local copy is gone once uploaded


async def test_bare_init_and_close_in_other_scopes_with_an_error_between(
    tmp_path: Path, noise_file: tuple[Path, np.ndarray], autojump_clock: Any
) -> None:
    """As the reference's users write it: init() and close() without `async with`,
    from different cancel scopes, an exception in between; the open recording is
    still uploaded at close()."""
    path, _audio = noise_file
    rec = recorder(tmp_path, file_source(path))
    with trio.CancelScope():  # init() inside a scope that is gone before close()
        await rec.init()
        key = await rec.start("session-123", "segment")
    try:
        with trio.move_on_after(100):  # close() inside a scope opened after init()
            await trio.sleep(1.0)
            try:
                raise ValueError("the caller's own code failed")
            finally:
                await rec.close()
    except ValueError:
        pass
    assert not rec.is_recording
    store = LocalStore(tmp_path / "store")
    assert await store.list() == [key]
    stored, rate = read_wav(io.BytesIO(await store.download(key)))
    assert rate == RATE and len(stored) / RATE == pytest.approx(1.0, abs=0.05)
    await rec.init()  # and it opens again
    await rec.close()


async def test_start_twice_and_stop_when_idle_raise(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with recorder(tmp_path, ToneSource(RATE, 1, SampleFormat.INT16, SystemClock())
                        ) as rec:
        with pytest.raises(RuntimeError, match="not recording"):
            await rec.stop()
        key = await rec.start("a")
        with pytest.raises(RuntimeError, match="already recording"):
            await rec.start("b")
        assert rec.current_segment_key == key  # the first recording goes on
        await rec.stop()
        with pytest.raises(RuntimeError, match="not recording"):
            await rec.stop()
    # Each start/stop pair is its own object in the store.
    async with recorder(tmp_path, ToneSource(RATE, 1, SampleFormat.INT16, SystemClock())
                        ) as rec:
        keys = []
        for _ in range(3):
            keys.append(await rec.start("many"))
            await trio.sleep(0.2)
            await rec.stop()
    assert sorted(await LocalStore(tmp_path / "store").list("many/")) == sorted(keys)
    assert len(set(keys)) == 3


async def test_bad_prefixes_are_refused_before_recording(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with recorder(tmp_path, ToneSource(RATE, 1, SampleFormat.INT16, SystemClock())
                        ) as rec:
        with pytest.raises(ValueError, match="store key"):
            await rec.start("..", "escape")
        assert not rec.is_recording


async def test_start_fails_cleanly_when_the_recording_cannot_be_written(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with recorder(tmp_path, ToneSource(RATE, 1, SampleFormat.INT16, SystemClock())
                        ) as rec:
        (tmp_path / "work").rmdir()  # the disk went away under the work directory
        with pytest.raises(FileNotFoundError):
            await rec.start("x")
        assert not rec.is_recording
        (tmp_path / "work").mkdir()
        await rec.start("x")  # usable again once the disk is back
        await trio.sleep(0.1)
        assert (await rec.stop()).duration_ms > 0


@pytest.mark.parametrize("fmt", ["wav", "pcm", "flac", "opus", "mp3"])
async def test_recordings_upload_in_every_format(
    tmp_path: Path, noise_file: tuple[Path, np.ndarray], autojump_clock: Any, fmt: str
) -> None:
    path, _ = noise_file
    async with recorder(tmp_path, file_source(path), upload_format=fmt) as rec:
        await trio.sleep(0.3)
        key = await rec.start("fmt")
        await trio.sleep(1.5)
        seg = await rec.stop()
    store = LocalStore(tmp_path / "store")
    data = await store.download(key)
    meta = await store.metadata(key)
    frames = pcm16(seg.frames)
    assert meta["format"] == fmt
    assert meta["content_type"] == {"wav": "audio/wav", "pcm": "application/octet-stream",
                                    "flac": "audio/ogg; codecs=flac",
                                    "opus": "audio/ogg; codecs=opus", "mp3": "audio/mpeg"}[fmt]
    if fmt == "pcm":
        decoded = pcm16(data)
    elif fmt == "opus":
        d = decode_ogg_opus(data)
        decoded = np.round(d.pcm[::3] * 32767).astype(np.int16)  # 48 kHz -> 16 kHz samples
    else:
        decoded = ffmpeg_decode(data, RATE, 1)
    if fmt in ("wav", "pcm", "flac"):  # lossless: the very samples
        assert np.array_equal(decoded, frames)
    else:  # lossy: the duration, plus MP3's encoder delay and frame padding (< 0.15 s)
        assert len(frames) <= len(decoded) <= len(frames) + 0.15 * RATE


async def test_a_recording_longer_than_the_ring_is_kept_whole(
    tmp_path: Path, noise_file: tuple[Path, np.ndarray], autojump_clock: Any
) -> None:
    """Memory is the ring, but a recording is encoded to disk as it goes: 6 s through
    a 2 s ring arrive complete; only AudioSegment.frames (held in memory) is empty."""
    _, source_audio = noise_file
    source = FastSource(source_audio, RATE, block=320, limit=RATE)
    async with recorder(tmp_path, source, ring_seconds=2.0) as rec:
        source.ring_of = lambda: rec.ring
        await source.run_to(RATE)
        first = rec.ring.head
        key = await rec.start("long")
        await source.run_to(first + 6 * RATE)
        last = rec.ring.head
        seg = await rec.stop()
        assert rec.stats.lost_frames == 0
    assert (first, last) == (RATE, 7 * RATE)
    assert seg.frames == b""
    stored, _ = read_wav(io.BytesIO(await LocalStore(tmp_path / "store").download(key)))
    assert np.array_equal(stored, source_audio[first:last])  # from start() to stop()
    assert seg.duration_ms == round((last - first) * 1000 / RATE)


async def test_close_stops_and_uploads_the_recording_in_progress(
    tmp_path: Path, noise_file: tuple[Path, np.ndarray], autojump_clock: Any
) -> None:
    path, source_audio = noise_file
    rec = recorder(tmp_path, file_source(path))
    await rec.init()
    called = trio.current_time()
    key = await rec.start("closing")
    await trio.sleep(1.0)
    span = trio.current_time() - called
    await rec.close()
    assert not rec.is_recording
    with pytest.raises(RuntimeError, match="not initialised"):
        await rec.start()
    stored, _ = read_wav(io.BytesIO(await LocalStore(tmp_path / "store").download(key)))
    locate(source_audio, stored)
    assert len(stored) / RATE == pytest.approx(span, abs=0.021)
    await rec.close()  # twice is fine


# ----------------------------------------------------------------------------
# stream


async def test_stream_yields_consecutive_chunks_and_ends_at_stop(
    tmp_path: Path, noise_file: tuple[Path, np.ndarray], autojump_clock: Any
) -> None:
    path, source_audio = noise_file
    got: dict[str, list[bytes]] = {"a": [], "b": []}
    async with recorder(tmp_path, file_source(path)) as rec:
        await rec.start("s")

        async def listen(name: str, **kw: Any) -> None:
            async for chunk in rec.stream(**kw):
                got[name].append(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen, "a")  # config.chunk = 1600 frames
            nursery.start_soon(listen, "b")
            await trio.sleep(1.05)
            seg = await rec.stop()
        # Both streams ended by themselves when the recording stopped.
    for name in ("a", "b"):
        chunks = got[name]
        assert all(len(c) == 1600 * 2 for c in chunks[:-1])
        assert 0 < len(chunks[-1]) <= 1600 * 2
    # Two streams at once see the same audio; it is the source's, in order, from when
    # each stream began (after start() returned) to the end of the recording.
    assert got["a"] == got["b"]
    streamed = pcm16(b"".join(got["a"]))
    recorded = pcm16(seg.frames)
    start, rec_start = locate(source_audio, streamed), locate(source_audio, recorded)
    assert rec_start <= start
    assert start + len(streamed) == rec_start + len(recorded)
    assert len(streamed) > 0.9 * RATE
    assert rec.stats.streams == 2


async def test_stream_converts_rate_channels_and_format(
    tmp_path: Path, autojump_clock: Any
) -> None:
    source = ToneSource(RATE, 1, SampleFormat.INT16, SystemClock(), tone_hz=1000.0,
                        dbfs=-6.0)
    chunks: dict[str, list[bytes]] = {}
    async with recorder(tmp_path, source) as rec:
        await rec.start("s")

        async def listen(fmt: str) -> None:
            chunks[fmt] = []
            async for chunk in rec.stream(chunk_size=RATE // 2, format=fmt, rate=8000,
                                          channels=2):
                chunks[fmt].append(chunk)
                if len(chunks[fmt]) == 3:
                    return

        async with trio.open_nursery() as nursery:
            for fmt in ("pcm", "wav", "flac", "opus", "mp3"):
                nursery.start_soon(listen, fmt)
        await rec.stop()
    # Every chunk is a complete file of half a second at 8 kHz, stereo, of the tone.
    for fmt, parts in chunks.items():
        for i, data in enumerate(parts):
            if fmt == "pcm":
                x = pcm16(data, 2)
            elif fmt == "wav":
                with wave.open(io.BytesIO(data)) as w:
                    assert (w.getframerate(), w.getnchannels()) == (8000, 2)
                x, _ = read_wav(io.BytesIO(data))
            elif fmt == "opus":
                d = decode_ogg_opus(data)
                assert (d.channels, d.input_rate) == (2, 8000)
                x = np.round(d.pcm[::6] * 32767).astype(np.int16)
            else:
                x = ffmpeg_decode(data, 8000, 2)
            if i > 0 or fmt in ("opus", "mp3"):  # the first chunk lags by the filter delay
                slack = 1300 if fmt == "mp3" else 800  # MP3: LAME's delay and padding
                lag = StreamResampler(RATE, 8000, 2).lag_frames if i == 0 else 0
                assert 3900 - lag <= len(x) <= 4000 + slack, (fmt, i, len(x))
            if fmt in ("pcm", "wav", "flac"):
                assert np.array_equal(x[:, 0], x[:, 1])  # mono duplicated to stereo
            else:  # joint stereo coding: the same signal, not the same bits
                assert np.corrcoef(x[800:, 0], x[800:, 1])[0, 1] > 0.99
            assert dominant_hz(x[len(x) // 4:, 0], 8000) == pytest.approx(1000, abs=20)


async def test_stream_needs_a_recording_and_valid_options(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with recorder(tmp_path, ToneSource(RATE, 1, SampleFormat.INT16, SystemClock())
                        ) as rec:
        with pytest.raises(RuntimeError, match="not recording"):
            async for _ in rec.stream():
                pass
        await rec.start("s")
        for kw, message in (({"format": "aac"}, "format 'aac'"),
                            ({"chunk_size": 0}, "chunk_size"),
                            ({"rate": 0}, "rate"),
                            ({"format": "mp3", "rate": 96000}, "MP3 cannot hold 96000 Hz")):
            with pytest.raises(ValueError, match=message):
                async for _ in rec.stream(**kw):
                    pass
        await rec.stop()


# ----------------------------------------------------------------------------
# segment and clear_frames


def at(rec: AudioRecorder, index: int) -> datetime:
    return datetime.fromtimestamp(rec.ring.index_to_utc(index), tz=UTC)


async def test_segment_cuts_exactly_the_range_asked_for(
    tmp_path: Path, noise_file: tuple[Path, np.ndarray], autojump_clock: Any
) -> None:
    path, source_audio = noise_file
    async with recorder(tmp_path, file_source(path)) as rec:
        await trio.sleep(3.0)  # no recording needed: the ring holds the audio
        # Ring index i is file frame i (the source started with the ring).
        pcm = await rec.segment(at(rec, 8000), at(rec, 24000))
        assert np.array_equal(pcm16(pcm), source_audio[8000:24000])
        wav = await rec.segment(at(rec, 8000), at(rec, 24000), format=AudioFormat.WAV)
        x, rate = read_wav(io.BytesIO(wav))
        assert rate == RATE and np.array_equal(x, source_audio[8000:24000])
        half = await rec.segment(at(rec, 8000), at(rec, 24000), format="wav", rate=8000,
                                 channels=2)
        y, rate = read_wav(io.BytesIO(half))
        assert (rate, y.shape) == (8000, (8000, 2))
        # A range reaching past the newest frame ends there.
        newest = rec.ring.head
        tail = await rec.segment(at(rec, newest - 1600), at(rec, newest) + timedelta(hours=1))
        assert np.array_equal(pcm16(tail), source_audio[newest - 1600:newest])
        assert rec.stats.segments == 4


async def test_segment_errors(
    tmp_path: Path, noise_file: tuple[Path, np.ndarray], autojump_clock: Any
) -> None:
    path, _ = noise_file
    async with recorder(tmp_path, file_source(path), ring_seconds=1.0) as rec:
        await trio.sleep(3.0)
        ring = rec.ring
        t = at(rec, ring.head - 4000)
        with pytest.raises(ValueError, match="invalid time range"):
            await rec.segment(t, t - timedelta(seconds=0.1))
        with pytest.raises(ValueError, match="invalid time range"):
            await rec.segment(t, t)
        future = at(rec, ring.head) + timedelta(seconds=10)
        with pytest.raises(ValueError, match="no frames between"):
            await rec.segment(future, future + timedelta(seconds=1))
        # Evicted audio: the message names the oldest time still available.
        oldest = iso_utc(ring.index_to_utc(ring.tail))
        with pytest.raises(ValueError, match=f"oldest audio still available starts at {oldest}"):
            await rec.segment(at(rec, 0), at(rec, 16000))
        with pytest.raises(ValueError, match="format 'ogg'"):
            await rec.segment(t, t + timedelta(seconds=0.1), format="ogg")


async def test_clear_frames_forgets_what_was_held(
    tmp_path: Path, noise_file: tuple[Path, np.ndarray], autojump_clock: Any
) -> None:
    path, source_audio = noise_file
    async with recorder(tmp_path, file_source(path)) as rec:
        await trio.sleep(1.0)
        before = rec.ring.head
        rec.clear_frames()
        await trio.sleep(1.0)
        with pytest.raises(ValueError, match="cleared by clear_frames"):
            await rec.segment(at(rec, before - 1600), at(rec, before + 1600))
        pcm = await rec.segment(at(rec, before), at(rec, before + 1600))
        assert np.array_equal(pcm16(pcm), source_audio[before:before + 1600])


# ----------------------------------------------------------------------------
# 24-bit samples


def write_wav24(path: Path, samples24: np.ndarray, rate: int) -> bytes:
    """A 24-bit PCM WAV of integer samples in [-2**23, 2**23); returns the packed bytes."""
    packed = samples24.astype("<i4").reshape(-1).view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples24.shape[1])
        w.setsampwidth(3)
        w.setframerate(rate)
        w.writeframes(packed)
    return packed


async def test_pa_int24_records_and_streams_packed_24_bit_samples(
    tmp_path: Path, autojump_clock: Any
) -> None:
    rng = np.random.default_rng(7)
    x24 = rng.integers(-(1 << 23), 1 << 23, (10 * RATE, 2))
    packed = write_wav24(tmp_path / "s24.wav", x24, RATE)
    source = file_source(tmp_path / "s24.wav", channels=2, fmt=SampleFormat.INT32)
    config = AudioConfig(format=4, channels=2, rate=RATE, chunk=1600)  # paInt24
    chunks = []
    async with recorder(tmp_path, source, config=config) as rec:
        assert rec.layout.name == "int24"
        key = await rec.start("s24")

        async def listen() -> None:
            async for chunk in rec.stream():
                chunks.append(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            await trio.sleep(1.0)
            seg = await rec.stop()
    # 3 bytes per sample, exactly the file's bytes (no 32-bit words, no rounding).
    assert len(seg.frames) % 6 == 0
    assert seg.frames in packed
    assert b"".join(chunks) in packed
    assert len(chunks[0]) == 1600 * 6
    data = await LocalStore(tmp_path / "store").download(key)
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getsampwidth(), w.getnchannels()) == (3, 2)
        assert w.readframes(w.getnframes()) == seg.frames


# ----------------------------------------------------------------------------
# The reference's own example, in Trio


async def test_reference_example_streams_one_second_mp3_chunks(
    tmp_path: Path, autojump_clock: Any
) -> None:
    """recorder = AudioRecorder(store, AudioConfig(paInt16, 1, 16000, 1024)); init;
    start("session-123", "segment"); stream 1 s MP3 chunks while recording; stop;
    close. Each MP3 chunk decodes (ffmpeg) to one second."""
    local_store = LocalStore(tmp_path / "store")
    recorder = AudioRecorder(
        store=local_store,
        config=AudioConfig(format=8, channels=1, rate=16000, chunk=1024),  # pyaudio.paInt16
        source=ToneSource(16000, 1, SampleFormat.INT16, SystemClock(), tone_hz=440.0),
    )
    await recorder.init()
    sent: list[bytes] = []

    async def send_to_api(chunk: bytes) -> None:
        sent.append(chunk)

    try:
        called = trio.current_time()
        await recorder.start("session-123", "segment")

        async def stream_chunks() -> None:
            async for chunk in recorder.stream(
                chunk_size=16000,  # 1 second chunks
                format=AudioFormat.MP3,
            ):
                await send_to_api(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_chunks)
            await trio.sleep(4.5)
            span = trio.current_time() - called
            segment = await recorder.stop()
    finally:
        await recorder.close()
    assert segment.duration_ms / 1000 == pytest.approx(span, abs=0.021)
    assert len(sent) >= 5  # whole seconds, then what was left at stop
    seconds = [len(ffmpeg_decode(c, 16000, 1)) / 16000 for c in sent]
    print("decoded MP3 chunk seconds:", [round(s, 3) for s in seconds])
    for s in seconds[:-1]:
        assert 1.0 <= s <= 1.1  # LAME's encoder delay and frame padding
    assert 0 < seconds[-1] <= 1.1
    # The stream began after start() returned: the recording holds all it sent.
    assert sum(seconds) - 0.1 * len(sent) <= segment.duration_ms / 1000
    for c in sent[:-1]:
        x = ffmpeg_decode(c, 16000, 1)
        assert dominant_hz(x[2000:, 0], 16000) == pytest.approx(440, abs=5)
    assert await local_store.list("session-123/segment/") == [segment.key]
