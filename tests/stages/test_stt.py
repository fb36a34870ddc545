"""Live transcription without a network: config errors, chunking, the backlog, the
retry/backoff/freshness rules (MockClock + httpx.MockTransport), overruns and
the transcript log."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
import trio.testing

from edge_agent.agent import Agent
from edge_agent.audio.opus import decode_ogg_opus
from edge_agent.audio.pcm import read_wav
from edge_agent.blocking import InlineRunner
from edge_agent.clock import ManualClock, iso_utc
from edge_agent.config import ConfigError, SttConfig, validate
from edge_agent.demo import sample_path
from edge_agent.ring import AudioRing
from edge_agent.stt import (
    Backlog,
    Chunk,
    FixedChunker,
    SttStreamer,
    Transcript,
    TranscriptLog,
    VadChunker,
    read_transcripts,
)
from edge_agent.stt.protocols import encode_chunk
from edge_agent.stt.vad import EnergyVad, WebRtcVad

RATE = 16000


def stt_section(**over: Any) -> dict[str, Any]:
    return {"enabled": True, "protocol": "raw", "url": "http://stt.test/v1/stt/raw",
            "chunking": "fixed", "chunk_seconds": 1.0, **over}


def stt_cfg(**over: Any) -> SttConfig:
    return validate({"stt": stt_section(**over)}).stt


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(raw)
    return info.value.problems


# ----------------------------------------------------------------------------
# Config: bad settings are one clear line at start


def test_unknown_protocol_and_bad_url_scheme_are_config_errors() -> None:
    lines = problems({"stt": stt_section(protocol="whisper")})
    assert lines == ['stt.protocol: expected one of "openai", "deepgram", "raw", got "whisper"']
    lines = problems({"stt": stt_section(url="ftp://stt.test/listen")})
    assert lines == ['stt.url: expected an http:// or https:// URL, got "ftp://stt.test/listen"']


def test_cross_checks_name_the_key_and_what_was_expected() -> None:
    assert problems({"stt": stt_section(protocol="deepgram")}) == [
        'stt.token_file: expected the file holding the Deepgram API key when '
        'stt.protocol = "deepgram"']
    assert problems({"stt": stt_section(chunking="vad", rate=22050)}) == [
        'stt.rate: expected one of 8000, 16000, 32000, 48000 when stt.chunking = "vad" '
        "(rates the VAD takes), got 22050"]
    assert problems({"stt": stt_section(chunking="vad", backlog_seconds=10)}) == [
        "stt.backlog_seconds: expected room for the longest chunk "
        "(stt.max_chunk_seconds = 15), got 10"]
    # A disabled section is not nagged about.
    validate({"stt": stt_section(protocol="deepgram", enabled=False)})


def test_missing_token_file_is_a_config_error_when_the_agent_is_built(tmp_path: Path) -> None:
    config = validate({
        "device": {"data_dir": str(tmp_path / "data")},
        "capture": {"source": "tone", "rate": RATE},
        "segments": {"enabled": False},
        "stt": stt_section(token_file=str(tmp_path / "nope.token")),
    })
    with pytest.raises(ConfigError) as info:
        Agent(config, clock=ManualClock())
    assert info.value.problems == [f"stt.token_file: {tmp_path / 'nope.token'}: no such file"]
    (tmp_path / "two.token").write_text("a b\n")
    config = validate({**msgspec_to_raw(config), "stt": stt_section(
        token_file=str(tmp_path / "two.token"))})
    with pytest.raises(ConfigError, match="expected one token on one line"):
        Agent(config, clock=ManualClock())


def msgspec_to_raw(config: Any) -> dict[str, Any]:
    import msgspec

    raw: dict[str, Any] = msgspec.to_builtins(config)
    return raw


# ----------------------------------------------------------------------------
# Chunking


def speech16k() -> np.ndarray:
    pcm, rate = read_wav(sample_path())
    assert rate == RATE
    return pcm[:, 0]


def test_vad_cuts_the_two_sentence_sample_in_its_pause() -> None:
    # The sample: speech from 0.5 s to ~3.6 s, a 1.5 s pause, speech to ~9.4 s.
    pcm = speech16k()
    chunker = VadChunker(WebRtcVad(RATE, aggressiveness=2), min_chunk=1.0, max_chunk=15.0,
                         silence=0.5, preroll=0.3)
    cuts = []
    for i in range(0, len(pcm), 320):  # 20 ms capture blocks
        cuts += chunker.feed(pcm[i : i + 320])
    cuts += chunker.flush()
    spans = [(c.start / RATE, (c.start + len(c.pcm)) / RATE) for c in cuts]
    print("vad chunks (s):", [(round(a, 2), round(b, 2)) for a, b in spans])
    assert len(cuts) == 2
    (a0, a1), (b0, b1) = spans
    assert 0.1 <= a0 <= 0.5 and 3.5 <= a1 <= 4.4  # the first sentence, with its edges
    assert 4.3 <= b0 <= 5.2 and b1 >= 9.3  # the second starts in the pause
    assert a1 <= b0  # nothing sent twice
    # Each chunk is exactly the audio at its position.
    for c in cuts:
        assert np.array_equal(c.pcm, pcm[c.start : c.start + len(c.pcm)])
    sent = sum(len(c.pcm) for c in cuts) / RATE
    assert chunker.skipped_samples / RATE == pytest.approx(len(pcm) / RATE - sent, abs=0.03)


def test_vad_sends_nothing_for_silence_while_fixed_chunking_does() -> None:
    rng = np.random.default_rng(7)
    hiss = (rng.standard_normal(10 * RATE) * 30).astype(np.int16)  # about -60 dBFS
    for quiet in (np.zeros(10 * RATE, np.int16), hiss):
        chunker = VadChunker(WebRtcVad(RATE), min_chunk=1.0, max_chunk=15.0, silence=0.5,
                             preroll=0.3)
        assert chunker.feed(quiet) + chunker.flush() == []
        assert chunker.skipped_samples == len(quiet)
    fixed = FixedChunker(RATE, 4.0)
    cuts = fixed.feed(hiss) + fixed.flush()
    assert [(c.start, len(c.pcm)) for c in cuts] == [(0, 64000), (64000, 64000), (128000, 32000)]


def tone(seconds: float, dbfs: float = -20.0) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (32768 * 10 ** (dbfs / 20) * np.sin(2 * np.pi * 300 * t)).astype(np.int16)


def test_vad_min_joins_short_utterances_max_cuts_long_ones_blips_are_dropped() -> None:
    def chunks(pcm: np.ndarray) -> tuple[list[tuple[float, float]], VadChunker]:
        ch = VadChunker(EnergyVad(RATE), min_chunk=1.0, max_chunk=3.0, silence=0.3,
                        preroll=0.0)
        cuts = ch.feed(pcm) + ch.flush()
        return [(c.start / RATE, len(c.pcm) / RATE) for c in cuts], ch

    gap = np.zeros(round(0.6 * RATE), np.int16)
    silence = np.zeros(3 * RATE, np.int16)
    # Two 0.42 s words 0.6 s apart: one chunk (each alone is under min_chunk).
    spans, _ = chunks(np.concatenate([tone(0.42), gap, tone(0.42), silence]))
    assert len(spans) == 1 and spans[0][0] == 0.0 and 1.4 <= spans[0][1] <= 1.8
    # Ten seconds without a pause: cut every max_chunk seconds.
    spans, _ = chunks(np.concatenate([tone(10.0), silence]))
    assert [round(s, 2) for s, _ in spans] == [0.0, 3.0, 6.0, 9.0]
    assert [round(d, 2) for _, d in spans[:3]] == [3.0, 3.0, 3.0]
    # A 60 ms click is not worth a request.
    spans, ch = chunks(np.concatenate([silence, tone(0.06), silence]))
    assert spans == [] and ch.discarded == 1


# ----------------------------------------------------------------------------
# The backlog


def chunk(seq: int, seconds: float = 1.0, size: int = 3000) -> Chunk:
    return Chunk(seq, 1_800_000_000.0 + seq, seconds, True, bytes(size), 0.0)


def test_backlog_is_bounded_by_seconds_and_bytes_dropping_the_oldest_first() -> None:
    backlog = Backlog(max_seconds=5.0, max_bytes=10_000)
    dropped: list[int] = []
    for i in range(4):
        dropped += [c.seq for c in backlog.push(chunk(i, size=2000))]
    assert backlog.take() is not None and backlog.inflight is not None
    assert backlog.inflight.seq == 0
    dropped += [c.seq for c in backlog.push(chunk(4, size=5000))]  # over the byte limit
    assert dropped == [0, 1]  # the one in flight went first: it is the oldest
    assert backlog.inflight is None and [c.seq for c in backlog.queue] == [2, 3, 4]
    for i in range(5, 12):
        dropped += [c.seq for c in backlog.push(chunk(i, size=100))]
        assert backlog.seconds <= 5.0 and backlog.bytes <= 10_000
    assert [c.seq for c in backlog.queue] == [7, 8, 9, 10, 11]
    assert dropped == [0, 1, 2, 3, 4, 5, 6]
    assert backlog.peak_seconds <= 5.0 and backlog.peak_bytes <= 10_000


# ----------------------------------------------------------------------------
# The streamer against httpx.MockTransport, in virtual time


class NoJitter(random.Random):
    def random(self) -> float:
        return 0.0


Handler = Callable[[httpx.Request], Any]


def streamer(tmp_path: Path, cfg: SttConfig, handler: Handler,
             ring: AudioRing | None = None) -> SttStreamer:
    ring = ring or AudioRing(rate=RATE, channels=1, dtype="int16", seconds=60)
    return SttStreamer(cfg, ring, device_id="dev-1", data_dir=tmp_path, clock=ManualClock(),
                       transport=httpx.MockTransport(handler), rng=NoJitter(),
                       runner=InlineRunner())


async def run_until_idle(s: SttStreamer) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        with trio.fail_after(60):
            await s.wait_idle()
        nursery.cancel_scope.cancel()


def write_seconds(s: SttStreamer, seconds: float, at: float = 0.0) -> None:
    s.ring.write(tone(seconds).reshape(-1, 1), utc=1_800_000_000.0 + at, mono=1000.0 + at)


def ok(text: str = "hello") -> httpx.Response:
    return httpx.Response(200, json={"text": text})


async def test_retries_back_off_exponentially_then_succeed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    times: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        times.append(trio.current_time())
        return httpx.Response(503) if len(times) <= 3 else ok()

    s = streamer(tmp_path, stt_cfg(backoff_initial_seconds=0.5, backoff_max_seconds=4.0),
                 handler)
    write_seconds(s, 1.0)
    await run_until_idle(s)
    assert np.diff(times).tolist() == [0.5, 1.0, 2.0]
    st = s.statistics()
    assert (st.chunks_cut, st.chunks_sent, st.requests, st.retries) == (1, 1, 4, 3)
    assert st.consecutive_failures == 0 and s.degraded() is None
    assert [t.text for t in s.recent] == ["hello"] and s.recent[0].attempts == 4


async def test_retry_after_is_honoured_and_stale_chunks_are_dropped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    times: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        times.append(trio.current_time())
        if len(times) == 1:
            return httpx.Response(429, headers={"Retry-After": "7"})
        return httpx.Response(503)

    cfg = stt_cfg(backoff_initial_seconds=1.0, backoff_max_seconds=4.0, max_age_seconds=20.0)
    s = streamer(tmp_path, cfg, handler)
    write_seconds(s, 1.0)
    await run_until_idle(s)
    # 7 s (Retry-After, above the 1 s backoff), then 2, 4, 4: the next try would
    # come 21 s after the cut, past max_age_seconds, so the chunk is given up.
    assert np.diff(times).tolist() == [7.0, 2.0, 4.0, 4.0]
    st = s.statistics()
    assert (st.dropped_stale, st.chunks_sent, st.dropped) == (1, 0, 1)
    assert st.seconds_dropped == 1.0 and st.backlog_chunks == 0
    assert s.degraded() is not None and "status=503" in s.degraded()  # type: ignore[operator]


async def test_rejections_and_garbage_are_dropped_at_once_and_counted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    answers = [httpx.Response(400, text="bad audio"),
               httpx.Response(200, content=b'{"text": ',
                              headers={"Content-Type": "application/json"}),
               httpx.Response(200, json={"words": []}), httpx.Response(204), ok("fine")]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    s = streamer(tmp_path, stt_cfg(), handler)
    write_seconds(s, 5.0)
    await run_until_idle(s)
    st = s.statistics()
    assert (st.chunks_cut, st.requests, st.retries) == (5, 5, 0)
    assert (st.dropped_rejected, st.bad_responses, st.chunks_empty, st.chunks_sent) == (1, 2, 1, 2)
    assert [t.seq for t in s.recent] == [4]
    assert st.chunks_cut == st.chunks_sent + st.dropped + st.backlog_chunks


async def test_chunks_refused_in_a_row_degrade_health_until_one_gets_through(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    answers = [httpx.Response(401, json={"error": "invalid api key"}) for _ in range(3)]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0) if answers else ok("back")

    s = streamer(tmp_path, stt_cfg(), handler)
    write_seconds(s, 2.0)
    await run_until_idle(s)
    assert s.degraded() is None  # two refusals: maybe the chunks, not the setup
    write_seconds(s, 1.0, at=2.0)
    await run_until_idle(s)
    reason = s.degraded()
    assert reason is not None and reason.startswith("3 STT chunks in a row refused")
    assert "status=401" in reason and "invalid api key" in reason
    write_seconds(s, 1.0, at=3.0)
    await run_until_idle(s)
    assert s.degraded() is None and [t.text for t in s.recent] == ["back"]


async def test_plain_text_answers_are_transcripts_and_an_error_in_a_200_is_a_refusal(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    answers = [httpx.Response(200, text="hello there\n"),  # response_format=text
               httpx.Response(200, json={"error": "failed to read audio data"})]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    s = streamer(tmp_path, stt_cfg(), handler)
    write_seconds(s, 2.0)
    await run_until_idle(s)
    st = s.statistics()
    assert [t.text for t in s.recent] == ["hello there"]
    assert (st.chunks_sent, st.dropped_rejected, st.bad_responses) == (1, 1, 0)
    assert "failed to read audio data" in st.last_error


async def test_a_hung_endpoint_bounds_the_backlog_and_drops_exactly_the_excess(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    release = trio.Event()
    seen: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await release.wait()
        seen.append(int(request.headers["x-sequence"]))
        return ok(request.headers["x-sequence"])

    cfg = stt_cfg(backlog_seconds=5.0, timeout_seconds=1000.0, max_age_seconds=2000.0)
    s = streamer(tmp_path, cfg, handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        for i in range(20):  # 20 s of audio, one chunk a second
            write_seconds(s, 1.0, at=float(i))
            await trio.sleep(1.0)
            st = s.statistics()
            assert st.backlog_seconds <= 5.0 and st.backlog_chunks <= 5
        st = s.statistics()
        assert (st.chunks_cut, st.dropped_overflow, st.backlog_chunks) == (20, 15, 5)
        release.set()
        with trio.fail_after(60):
            await s.wait_idle()
        nursery.cancel_scope.cancel()
    st = s.statistics()
    assert (st.chunks_sent, st.dropped_overflow, st.dropped) == (5, 15, 15)
    assert seen == [15, 16, 17, 18, 19]  # the freshest audio survived
    assert st.backlog_peak_seconds == 5.0 and st.backlog_peak_bytes <= cfg.backlog_bytes


async def test_a_reader_overrun_is_counted_in_seconds_and_the_stream_goes_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    ring = AudioRing(rate=RATE, channels=1, dtype="int16", seconds=2)
    s = streamer(tmp_path, stt_cfg(), lambda r: ok(), ring=ring)
    write_seconds(s, 5.0)  # before the streamer reads: 3 s are evicted
    await run_until_idle(s)
    st = s.statistics()
    assert (st.overruns, st.seconds_lost) == (1, 3.0)
    assert (st.chunks_cut, st.chunks_sent) == (2, 2)
    # The chunks carry the times of the audio that was held: 3 s and 4 s in.
    assert [t.start_utc for t in s.recent] == [iso_utc(1_800_000_003.0),
                                                iso_utc(1_800_000_004.0)]


async def test_wire_formats_of_the_three_protocols(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.url.path == "/v1/listen":
            return httpx.Response(200, json={"results": {"channels": [
                {"alternatives": [{"transcript": "deep words"}]}]}})
        return ok("words")

    urls = {"openai": "https://stt.test/v1/audio/transcriptions",
            "deepgram": "https://stt.test/v1/listen?model=nova-2", "raw": "https://stt.test/raw"}
    for protocol, url in urls.items():
        cfg = stt_cfg(protocol=protocol, url=url, token_file=str(tmp_path / "token"),
                      model="small", language="en")
        s = streamer(tmp_path / protocol, cfg, handler)
        write_seconds(s, 1.0)
        await run_until_idle(s)
        assert s.statistics().chunks_sent == 1
    openai, deepgram, raw = requests
    assert openai.headers["authorization"] == "Bearer s3cret"
    assert openai.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert deepgram.headers["authorization"] == "Token s3cret"
    assert deepgram.headers["content-type"] == "audio/ogg"
    # The model in the URL wins; the language is added.
    assert dict(deepgram.url.params) == {"model": "nova-2", "language": "en"}
    assert raw.headers["content-type"] == "audio/ogg; codecs=opus"
    assert raw.headers["x-device-id"] == "dev-1" and raw.headers["x-sequence"] == "0"
    assert raw.headers["x-chunk-start"] == iso_utc(1_800_000_000.0)
    assert float(raw.headers["x-chunk-duration"]) == 1.0
    for r in (deepgram, raw):  # the body is a complete Ogg Opus file of the chunk
        decoded = decode_ogg_opus(r.content)
        assert decoded.input_rate == RATE and abs(decoded.seconds - 1.0) < 0.01


async def test_chunks_are_encoded_at_the_configured_complexity(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sent: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        return ok()

    s = streamer(tmp_path, stt_cfg(complexity=0), handler)
    write_seconds(s, 1.0)
    await run_until_idle(s)
    [chunk] = [decode_ogg_opus(body).pcm for body in sent]

    def encoded_at(complexity: int) -> np.ndarray:
        return decode_ogg_opus(encode_chunk(tone(1.0), RATE, 24000, complexity)).pcm

    np.testing.assert_array_equal(chunk, encoded_at(0))
    assert not np.array_equal(chunk, encoded_at(10))


# ----------------------------------------------------------------------------
# Transcripts on disk


def transcript(seq: int, start: float, text: str = "hi") -> Transcript:
    return Transcript(seq=seq, stream_id="s", device_id="d", start_utc=iso_utc(start),
                      end_utc=iso_utc(start + 1), duration=1.0, text=text, protocol="raw",
                      latency_seconds=0.1, age_seconds=0.2, attempts=1, clock_synced=True)


def test_transcripts_rotate_by_utc_day_are_pruned_and_read_by_time(tmp_path: Path) -> None:
    day = 86400.0
    t0 = 1_800_000_000.0 - 1_800_000_000.0 % day  # a UTC midnight
    log = TranscriptLog(tmp_path / "transcripts", days=2)
    log.append(transcript(0, t0 - 10))  # the day before
    log.append(transcript(1, t0 + 5))
    log.append(transcript(2, t0 + 7))
    names = sorted(p.name for p in (tmp_path / "transcripts").iterdir())
    assert names == [iso_utc(t0 - 10)[:10] + ".jsonl", iso_utc(t0)[:10] + ".jsonl"]
    line = json.loads((tmp_path / "transcripts" / names[1]).read_text().splitlines()[0])
    assert line["seq"] == 1 and line["start_utc"] == iso_utc(t0 + 5) and line["text"] == "hi"

    assert [t.seq for t in read_transcripts(tmp_path)] == [0, 1, 2]
    assert [t.seq for t in read_transcripts(tmp_path, since=t0, until=t0 + 7)] == [1]
    assert [t.seq for t in read_transcripts(tmp_path, since=t0 - 20, limit=2)] == [0, 1]
    # A torn last line (power cut mid-write) is skipped, not fatal.
    with open(tmp_path / "transcripts" / names[1], "ab") as f:
        f.write(b'{"seq": 3, "stream')
    assert [t.seq for t in read_transcripts(tmp_path)] == [0, 1, 2]
    # The next day the day before t0 is pruned: 2 days are kept, the new one included.
    log.append(transcript(4, t0 + day))
    assert [t.seq for t in read_transcripts(tmp_path)] == [1, 2, 4]


async def test_a_capture_gap_ends_the_chunk_so_none_spans_a_hole_in_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    s = streamer(tmp_path, stt_cfg(), lambda r: ok())
    write_seconds(s, 1.5)
    write_seconds(s, 1.5, at=3.5)  # the mic was gone for 2 s
    assert len(s.ring.gaps(0, s.ring.head)) == 1
    await run_until_idle(s)
    spans = [(t.start_utc, t.duration) for t in s.recent]
    t0 = 1_800_000_000.0
    assert spans == [(iso_utc(t0), 1.0), (iso_utc(t0 + 1.0), 0.5),
                     (iso_utc(t0 + 3.5), 1.0), (iso_utc(t0 + 4.5), 0.5)]


async def test_reconfigure_switches_endpoint_and_keeps_the_cursor(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return ok()

    s = streamer(tmp_path, stt_cfg(url="http://old.test/raw"), handler)
    write_seconds(s, 1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        with trio.fail_after(60):
            await s.wait_idle()
        with pytest.raises(ConfigError, match=r"stt\.token_file"):
            s.reconfigure(stt_cfg(url="http://new.test/raw", token_file=str(tmp_path / "x")))
        s.reconfigure(stt_cfg(url="http://new.test/raw"))
        write_seconds(s, 1.0, at=1.0)
        await trio.sleep(0.1)
        with trio.fail_after(60):
            await s.wait_idle()
        nursery.cancel_scope.cancel()
    assert hosts == ["old.test", "new.test"]
    assert [t.seq for t in s.recent] == [0, 1] and s.statistics().overruns == 0
