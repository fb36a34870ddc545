"""The device HTTP API through a real HTTP client against the agent served on loopback.

One agent per test captures a known, non-periodic signal (a chirp plus noise) from
a scripted source whose timeline has two capture holes: one old enough to be in
the spool only, one still in the ring. Every /v1/audio answer is compared with what
the source produced: sample for sample for PCM/WAV/FLAC, by duration and SNR for
Opus. Wall-clock time is a ManualClock, so every UTC in the test is exact.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from numpy.typing import NDArray
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.agent import Agent
from edge_agent.api import (
    GAPS_HEADER,
    RangeDecision,
    RingPiece,
    SegmentPiece,
    SegmentUnreadable,
    decide_range,
    decode_segment,
    load_token,
    open_under,
    parse_utc,
    plan_audio,
)
from edge_agent.api import decode as decode_module
from edge_agent.api.decode import UnsafePath
from edge_agent.api.render import StreamResponse
from edge_agent.audio.flac import OggFlacEncoder, decode_ogg_flac
from edge_agent.audio.opus import decode_ogg_opus
from edge_agent.audio.pcm import SampleFormat, read_wav, write_wav
from edge_agent.audio.resample import resample
from edge_agent.clock import iso_utc
from edge_agent.config import ApiConfig, ConfigError, check_api_config, load_config, validate
from edge_agent.ring import AudioRing
from edge_agent.stt import Transcript, TranscriptLog
from edge_agent.wire import SegmentMeta

from support.api_agent import (
    AUDIO_SECONDS,
    RATE,
    RING_SECONDS,
    RUNS,
    SIGNAL,
    T0,
    TOKEN,
    at,
    make_signal,
    serve_agent,
)
from support.signals import encode_ogg_opus


def expected(start: float, end: float, *, fill: bool = False) -> NDArray[np.int16]:
    """What the source captured between capture times start..end (offsets from T0)."""
    parts: list[NDArray[np.int16]] = []
    cursor = start
    for a0, a1, t in RUNS:
        lo, hi = max(start, t), min(end, t + (a1 - a0))
        if hi <= lo:
            continue
        if fill and lo > cursor:
            parts.append(np.zeros(round((lo - cursor) * RATE), np.int16))
        first = round((a0 + lo - t) * RATE)
        parts.append(SIGNAL[first : first + round((hi - lo) * RATE)])
        cursor = hi
    if fill and end > cursor and parts:
        parts.append(np.zeros(round((end - cursor) * RATE), np.int16))
    return np.concatenate(parts) if parts else np.zeros(0, np.int16)














def pcm16(data: bytes) -> NDArray[np.int16]:
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def gaps_of(response: httpx.Response) -> list[tuple[str, float, float]]:
    value = response.headers.get(GAPS_HEADER)
    if not value:
        return []
    out = []
    for item in value.split(", "):
        utc, _, rest = item.partition("/")
        seconds, _, offset = rest.partition("@")
        out.append((utc, float(seconds), float(offset)))
    return out


def snr_db(ref: NDArray[Any], got: NDArray[Any]) -> float:
    ref = ref.astype(np.float64)
    err = ref - got.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum(err**2), 1e-12)))


# ----------------------------------------------------------------------------
# Health, auth, metrics, status


async def test_healthz_needs_no_token_and_names_every_component(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        r = await httpx.AsyncClient().get(s.url + "/healthz")
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "ok"
        assert list(body["components"]) == ["capture", "ring", "stt", "segmenter", "uploader",
                                            "disk", "clock"]
        assert body["components"]["stt"]["status"] == "disabled"
        assert body["components"]["capture"]["detail"].startswith("source finished")
        # An unsynchronised clock is reported, with the reason.
        s.clock.is_synced = False
        body = (await s.client.get("/healthz")).json()
        assert body["status"] == "degraded"
        assert "NTP" in body["components"]["clock"]["detail"]


ROUTES = ["/metrics", "/v1/status", "/v1/segments", "/v1/transcripts",
          f"/v1/audio?start={at(30)}&end={at(31)}&format=pcm", "/v1/nonexistent"]


@pytest.mark.parametrize("route", ROUTES)
async def test_every_route_but_healthz_wants_the_bearer_token(tmp_path: Path, route: str) -> None:
    async with serve_agent(tmp_path) as s, httpx.AsyncClient(base_url=s.url) as anon:
        missing = await anon.get(route)
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        assert missing.json()["parameter"] == "Authorization"
        wrong = await anon.get(route, headers={"Authorization": "Bearer " + "x" * len(TOKEN)})
        assert wrong.status_code == 401
        assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
        basic = await anon.get(route, headers={"Authorization": f"Basic {TOKEN}"})
        assert basic.status_code == 401
        ok = await s.client.get(route)
        assert ok.status_code == (404 if route == "/v1/nonexistent" else 200)


async def test_media_routes_take_the_token_in_the_query_for_audio_elements(
        tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s, httpx.AsyncClient(base_url=s.url) as anon:
        q = {"start": at(30), "end": at(31), "format": "pcm"}
        assert (await anon.get("/v1/audio", params={**q, "access_token": TOKEN})).status_code == 200
        assert (await anon.get("/v1/audio", params={**q, "access_token": "nope"})
                ).status_code == 401
        # Not on the other routes: a token in a URL is a last resort.
        assert (await anon.get("/v1/status", params={"access_token": TOKEN})).status_code == 401


async def test_metrics_are_prometheus_text_with_the_components_counters(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        r = await s.client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        samples = {(sm.name, tuple(sorted(sm.labels.items()))): sm.value
                   for fam in text_string_to_metric_families(r.text) for sm in fam.samples}

        def value(name: str, **labels: str) -> float:
            return samples[(name, tuple(sorted(labels.items())))]

        assert value("edge_agent_capture_seconds_total") == pytest.approx(AUDIO_SECONDS)
        assert value("edge_agent_ring_capacity_seconds") == RING_SECONDS
        assert value("edge_agent_ring_fill_ratio") == 1.0
        assert value("edge_agent_ring_evicted_seconds_total") == pytest.approx(
            AUDIO_SECONDS - RING_SECONDS)
        assert value("edge_agent_ring_gaps_total") == 2
        assert value("edge_agent_ring_reader_overruns_total", reader="segmenter") == 0
        spool = s.agent.spool
        assert spool is not None
        assert value("edge_agent_segments_sealed_total") == spool.stats.segments_sealed >= 8
        assert value("edge_agent_spool_bytes") == spool.stats.bytes_used
        assert value("edge_agent_upload_backlog_segments") == len(spool.pending())
        assert value("edge_agent_clock_synced") == 1
        assert value("edge_agent_component_healthy", component="segmenter") == 1
        assert value("edge_agent_api_requests_total") >= 1


async def test_status_has_ring_span_input_level_and_no_secrets(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        body = (await s.client.get("/v1/status")).json()
        assert body["device"] == "dev-api"
        assert body["ring"]["newest_utc"] == at(43)
        assert body["ring"]["oldest_utc"] == at(27)
        last = SIGNAL[-RATE:].astype(np.float64) / 32768
        rms = 20 * np.log10(np.sqrt(np.mean(last**2)))
        assert body["input"]["rms_dbfs"] == pytest.approx(rms, abs=0.01)
        assert body["capture"]["frames"] == AUDIO_SECONDS * RATE
        assert body["config"]["api"]["listen"] == "127.0.0.1:0"
        config = s.agent.config  # the Opus settings in effect, the encoders' cost
        assert body["config"]["segments"]["complexity"] == config.segments.complexity
        assert body["config"]["stt"]["complexity"] == config.stt.complexity
        assert TOKEN not in json.dumps(body)
        assert "token_file" not in json.dumps(body["config"])


# ----------------------------------------------------------------------------
# Segments


async def test_segments_are_listed_newest_first_with_filters_and_pages(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        spool = s.agent.spool
        assert spool is not None
        all_ids = sorted((m.id for m, _ in spool.list()), reverse=True)
        seen: list[str] = []
        params: dict[str, str] = {"limit": "3"}
        while True:
            page = (await s.client.get("/v1/segments", params=params)).json()
            assert len(page["segments"]) <= 3
            seen += [row["id"] for row in page["segments"]]
            if page["next_before"] is None:
                break
            params["before"] = page["next_before"]
        assert seen == all_ids
        row = (await s.client.get("/v1/segments", params={"limit": "1"})).json()["segments"][0]
        assert row["state"] == "sealed" and row["url"] == f"/v1/segments/{row['id']}"
        window = (await s.client.get("/v1/segments", params={
            "since": at(10), "until": at(20)})).json()["segments"]
        assert [r["start_utc"] for r in window] == [at(15), at(10)]
        spool.mark_synced(all_ids[-1])
        synced = (await s.client.get("/v1/segments", params={"state": "synced"})).json()
        assert [r["id"] for r in synced["segments"]] == [all_ids[-1]]


async def test_segment_download_etag_range_and_conditionals(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        spool = s.agent.spool
        assert spool is not None
        meta, _state = spool.list(since=T0 + 20, until=T0 + 25)[0]
        data = spool.audio_path(meta.id).read_bytes()
        url = f"/v1/segments/{meta.id}"

        full = await s.client.get(url)
        assert full.status_code == 200
        assert full.content == data
        assert full.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
        assert full.headers["ETag"].strip('"') == meta.sha256
        assert full.headers["Content-Length"] == str(len(data))
        assert full.headers["Accept-Ranges"] == "bytes"
        assert full.headers["Content-Type"] == meta.content_type

        size = len(data)
        for spec, first, last in (("bytes=0-0", 0, 0), ("bytes=100-4095", 100, 4095),
                                  ("bytes=1000-", 1000, size - 1), ("bytes=-500", size - 500,
                                                                     size - 1),
                                  (f"bytes=10-{size + 99}", 10, size - 1)):
            part = await s.client.get(url, headers={"Range": spec})
            assert part.status_code == 206, spec
            assert part.content == data[first : last + 1], spec
            assert part.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
            assert part.headers["Content-Length"] == str(last - first + 1)
        for spec in (f"bytes={size}-", "bytes=-0", "bytes=50-10"):
            bad = await s.client.get(url, headers={"Range": spec})
            assert bad.status_code == 416, spec
            assert bad.headers["Content-Range"] == f"bytes */{size}"
        # Several ranges, or not bytes: the whole file.
        many = await s.client.get(url, headers={"Range": "bytes=0-1,5-6"})
        assert many.status_code == 200 and many.content == data
        # If-Range with another tag: the whole file; with ours: the range.
        stale = await s.client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"old"'})
        assert stale.status_code == 200 and stale.content == data
        fresh = await s.client.get(url, headers={"Range": "bytes=0-9",
                                                 "If-Range": full.headers["ETag"]})
        assert fresh.status_code == 206 and fresh.content == data[:10]
        cached = await s.client.get(url, headers={"If-None-Match": full.headers["ETag"]})
        assert cached.status_code == 304 and cached.content == b""
        head = await s.client.head(url)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["Content-Length"] == str(size)

        meta_json = (await s.client.get(url + "/meta")).json()
        assert meta_json["sha256"] == meta.sha256 and meta_json["state"] == "sealed"
        assert meta_json["gaps"][0]["seconds"] == pytest.approx(2.0)

        missing = await s.client.get("/v1/segments/20200101T000000.000Z-00000000")
        assert missing.status_code == 404 and missing.json()["parameter"] == "id"
        for bad_id in ("%2e%2e", "x" * 300, "20261124T053000.000Z-3F9A1C2B",
                       "20261124T053000.000Z-3f9a1c2b%0a", "%00"):
            r = await s.client.get("/v1/segments/" + bad_id)
            assert r.status_code == 400, bad_id
            assert r.json()["parameter"] == "id"
        # An encoded slash makes it another path, which no route serves.
        r = await s.client.get("/v1/segments/..%2f..%2fetc%2fpasswd")
        assert r.status_code == 404 and r.json()["parameter"] == "path"


async def test_a_symlinked_segment_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET\n")
    async with serve_agent(tmp_path) as s:
        spool = s.agent.spool
        assert spool is not None
        meta, _ = spool.list()[0]
        path = spool.audio_path(meta.id)
        path.unlink()
        path.symlink_to(secret)
        r = await s.client.get(f"/v1/segments/{meta.id}")
        assert r.status_code == 403 and b"TOP SECRET" not in r.content
        # A symlinked directory on the way is refused too.
        meta2, _ = spool.list()[1]
        seg_dir = spool.audio_path(meta2.id).parent
        moved = tmp_path / "elsewhere"
        seg_dir.rename(moved)
        seg_dir.symlink_to(moved)
        r = await s.client.get(f"/v1/segments/{meta2.id}")
        assert r.status_code == 403


# ----------------------------------------------------------------------------
# /v1/audio


async def test_audio_pcm_spanning_spool_and_ring_is_sample_exact(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        r = await s.client.get("/v1/audio", params={"start": at(30), "end": at(42),
                                                    "format": "pcm"})
        assert r.status_code == 200
        assert r.headers["X-Audio-Source"] == "spool,ring"
        got = pcm16(r.content)
        want = expected(30, 42)
        assert len(got) == len(want) == int(r.headers["X-Audio-Frames"])
        assert np.array_equal(got, want)
        # The ring's hole (37..38 s) is reported where it sits in the body.
        assert gaps_of(r) == [(at(37), pytest.approx(1.0), pytest.approx(7.0))]
        assert r.headers["X-Audio-Start"] == at(30)
        assert r.headers["X-Audio-End"] == at(42)
        assert r.headers["Content-Length"] == str(len(r.content))


@pytest.mark.parametrize("segment_format", ["wav", "flac"])
async def test_audio_across_a_spooled_gap_with_and_without_silence(
        tmp_path: Path, segment_format: str) -> None:
    # Both lossless segment formats, read from the middle of a segment on.
    async with serve_agent(tmp_path, segment_format=segment_format) as s:
        q = {"start": at(18), "end": at(28), "format": "pcm"}
        plain = await s.client.get("/v1/audio", params=q)
        assert plain.headers["X-Audio-Source"] == "spool"
        assert gaps_of(plain) == [(at(21), pytest.approx(2.0), pytest.approx(3.0))]
        assert np.array_equal(pcm16(plain.content), expected(18, 28))
        assert len(plain.content) == 8 * RATE * 2

        filled = await s.client.get("/v1/audio", params={**q, "fill": "silence"})
        got = pcm16(filled.content)
        assert np.array_equal(got, expected(18, 28, fill=True))
        assert len(got) == 10 * RATE
        assert not got[3 * RATE : 5 * RATE].any()


@pytest.mark.parametrize("segment_format", ["wav", "flac", "opus"])
async def test_segments_decoded_in_windows_join_seamlessly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, segment_format: str) -> None:
    # A long segment is decoded a window at a time (30 s); with 0.7 s windows these
    # 5 s segments are cut at odd places, and the joins must not show.
    monkeypatch.setattr("edge_agent.api.decode._SEGMENT_WINDOW_SECONDS", 0.7)
    async with serve_agent(tmp_path, segment_format=segment_format,
                           segment_bitrate=96000) as s:
        r = await s.client.get("/v1/audio", params={"start": at(2.5), "end": at(19.5),
                                                    "format": "pcm"})
        assert r.headers["X-Audio-Source"] == "spool"
        got, want = pcm16(r.content), expected(2.5, 19.5)
        assert len(got) == len(want)
        if segment_format == "opus":  # lossy (see the Opus test), but aligned throughout
            for a in range(0, len(want) - RATE // 2, RATE // 2):
                assert snr_db(want[a : a + RATE // 2], got[a : a + RATE // 2]) > 20, a
        else:
            assert np.array_equal(got, want)


async def test_audio_wav_resampled_and_upmixed(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        r = await s.client.get("/v1/audio", params={"start": at(30), "end": at(36),
                                                    "format": "wav", "rate": "8000",
                                                    "channels": "2"})
        assert r.status_code == 200 and r.headers["Content-Type"] == "audio/wav"
        assert r.headers["Content-Length"] == str(len(r.content))
        pcm, rate = read_wav(io.BytesIO(r.content))
        assert rate == 8000 and pcm.shape == (6 * 8000, 2)
        assert np.array_equal(pcm[:, 0], pcm[:, 1])
        # Same as resampling the source in one go (soxr), to rounding.
        ref = resample(expected(30, 36), RATE, 8000)
        ref16 = np.clip(np.rint(ref * 32768), -32768, 32767)
        assert np.max(np.abs(pcm[:, 0].astype(np.int32) - ref16)) <= 1


async def test_audio_flac_is_lossless(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        r = await s.client.get("/v1/audio", params={"start": at(24), "end": at(33),
                                                    "format": "flac"})
        assert r.headers["Content-Type"] == "audio/ogg; codecs=flac"
        decoded = decode_ogg_flac(r.content, "int16")
        assert np.array_equal(decoded[:, 0], expected(24, 33))
        if shutil.which("ffmpeg"):  # a standard Ogg FLAC file, not only ours
            done = await trio.run_process(["ffmpeg", "-v", "error", "-i", "-", "-f", "s16le",
                                           "-"], stdin=r.content, capture_stdout=True)
            out = done.stdout
            assert np.array_equal(pcm16(out), expected(24, 33))


async def test_audio_opus_has_the_right_duration_and_snr(tmp_path: Path) -> None:
    # At 96 kbit/s libopus codes in CELT mode, whose waveform follows the input
    # closely; at low bitrates (SILK) it shifts the waveform by a few samples,
    # which sounds the same but would make an SNR meaningless.
    async with serve_agent(tmp_path, segment_format="opus", segment_bitrate=96000) as s:
        # Opus segments (decoded and re-encoded) and the ring, at 48 kHz.
        r = await s.client.get("/v1/audio", params={"start": at(26), "end": at(36),
                                                    "format": "opus", "rate": "48000",
                                                    "bitrate": "96000"})
        assert r.status_code == 200 and r.headers["X-Audio-Source"] == "spool,ring"
        decoded = decode_ogg_opus(r.content)
        want = resample(expected(26, 36), RATE, 48000)
        assert decoded.pcm.shape[0] == pytest.approx(len(want), abs=480)  # 10 ms
        n = min(len(want), decoded.pcm.shape[0])
        got = decoded.pcm[:n, 0]
        # Opus twice over (segment, then response): still clearly the same audio,
        # and aligned (a shift of one millisecond would ruin the SNR of a chirp).
        aligned, shifted = snr_db(want[:n], got), snr_db(want[48:n], got[: n - 48])
        print(f"opus: SNR {aligned:.1f} dB aligned, {shifted:.1f} dB shifted by 1 ms")
        assert aligned > 20
        assert shifted < 3


@pytest.mark.parametrize(("params", "parameter"), [
    ({"end": at(31)}, "start"),
    ({"start": at(30)}, "end"),
    ({"start": "yesterday", "end": at(31)}, "start"),
    ({"start": "2027-01-15T08:00:30", "end": at(31)}, "start"),  # no timezone
    ({"start": at(30), "end": at(30)}, "end"),
    ({"start": at(31), "end": at(30)}, "end"),
    ({"start": at(-4000), "end": at(31)}, "end"),  # longer than max_range_seconds
    ({"start": at(30), "end": at(3600)}, "end"),  # in the future
    ({"start": at(30), "end": at(31), "format": "mp3"}, "format"),
    ({"start": at(30), "end": at(31), "rate": "1"}, "rate"),
    ({"start": at(30), "end": at(31), "rate": "9999999"}, "rate"),
    ({"start": at(30), "end": at(31), "rate": "16k"}, "rate"),
    ({"start": at(30), "end": at(31), "channels": "0"}, "channels"),
    ({"start": at(30), "end": at(31), "channels": "99"}, "channels"),
    ({"start": at(30), "end": at(31), "fill": "noise"}, "fill"),
    ({"start": at(30), "end": at(31), "format": "wav", "bitrate": "64000"}, "bitrate"),
    ({"start": at(30), "end": at(31), "strat": at(30)}, "strat"),
])
async def test_audio_bad_input_is_a_400_naming_the_parameter(
        tmp_path: Path, params: dict[str, str], parameter: str) -> None:
    async with serve_agent(tmp_path) as s:
        r = await s.client.get("/v1/audio", params=params)
        assert r.status_code == 400, r.text
        assert r.json()["parameter"] == parameter
        assert parameter in r.json()["error"]


async def test_audio_no_longer_held_is_a_404_with_the_oldest_time(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        r = await s.client.get("/v1/audio", params={"start": at(-100), "end": at(-50)})
        assert r.status_code == 404
        assert r.json()["oldest"] == at(0)
        assert at(0) in r.json()["error"]
        # A range partly held is served, the part before reported as a gap.
        r = await s.client.get("/v1/audio", params={"start": at(-3), "end": at(2),
                                                    "format": "pcm"})
        assert r.status_code == 200
        assert gaps_of(r) == [(at(-3), pytest.approx(3.0), 0.0)]
        assert np.array_equal(pcm16(r.content), expected(0, 2))


async def test_excess_audio_requests_wait_briefly_then_get_503(tmp_path: Path) -> None:
    async with serve_agent(tmp_path, max_audio_encodes=1, audio_queue_seconds=0.3) as s:
        q = {"start": at(0), "end": at(40), "format": "wav"}
        # The first client reads a little, then stalls: it holds the one slot.
        async with s.client.stream("GET", "/v1/audio", params=q) as first:
            assert first.status_code == 200
            begin = trio.current_time()
            busy = await s.client.get("/v1/audio", params=q)
            waited = trio.current_time() - begin
            assert busy.status_code == 503
            assert busy.headers["Retry-After"] == "1"
            assert waited >= 0.3
        # The stalled client went away: its slot is free again.
        with trio.fail_after(5):
            while True:
                ok = await s.client.get("/v1/audio", params={**q, "end": at(1)})
                if ok.status_code == 200:
                    break
                await trio.sleep(0.05)
        assert s.agent.api is not None and s.agent.api.stats.audio_busy >= 1


async def test_a_slow_start_is_a_503_and_a_stalled_client_loses_its_slot(
        tmp_path: Path) -> None:
    """api.request_timeout_seconds bounds both ends of a request: a response that
    has not started in time (here: queued behind a busy conversion) is a 503, and a
    client that takes no data for that long is cut off and its slot freed, though
    its connection stays open."""
    async with serve_agent(tmp_path, max_audio_encodes=1, audio_queue_seconds=60,
                           request_timeout_seconds=0.5) as s:
        api = s.agent.api
        assert api is not None
        # 40 s at 48 kHz stereo: far more than the socket buffers hold.
        big = {"start": at(0), "end": at(40), "format": "wav", "rate": "48000",
               "channels": "2"}
        small = {"start": at(0), "end": at(1), "format": "wav"}
        async with s.client.stream("GET", "/v1/audio", params=big) as holder:
            assert holder.status_code == 200
            chunks = holder.aiter_raw()
            stop_reading = trio.Event()

            async def read_slowly() -> None:  # never stalls for 0.5 s
                async for _chunk in chunks:
                    if stop_reading.is_set():
                        return
                    await trio.sleep(0.05)

            async with trio.open_nursery() as reading:
                reading.start_soon(read_slowly)
                began = trio.current_time()
                late = await s.client.get("/v1/audio", params=small)
                assert trio.current_time() - began >= 0.5
                assert late.status_code == 503 and late.headers["Retry-After"]
                assert "api.request_timeout_seconds" in late.json()["error"]
                assert api.stats.timeouts == 1
                stop_reading.set()
            # The holder stops reading: its slot is freed for the next request.
            with trio.fail_after(10):
                while True:
                    if (await s.client.get("/v1/audio", params=small)).status_code == 200:
                        break
                    await trio.sleep(0.05)
            assert api.stats.audio_aborted == 1
            # What the stalled client reads now ends short, never silently whole.
            with pytest.raises(httpx.RemoteProtocolError):
                async for _chunk in chunks:
                    pass


def _appender(messages: list[dict[str, Any]]) -> Callable[[Any], Awaitable[None]]:
    """An ASGI send that records and never yields, as a server may."""

    async def send(message: Any) -> None:
        messages.append(message)

    return send


async def test_a_streamed_body_always_ends_whatever_order_the_tasks_run_in() -> None:
    """The producer's last step and the sender's end-of-body race: a response whose
    producer finished must still be ended properly, or the server drops the
    connection and the client's next request on it fails (seen under load). An
    ASGI server whose send does not yield makes the race likely; Trio varies the
    order of ready tasks, so a few hundred responses try both orders."""
    async def produce(sink: Any) -> None:
        await sink.send(b"abc")

    incomplete = 0
    for _ in range(300):
        messages: list[dict[str, Any]] = []
        response = StreamResponse(200, {"Content-Length": "3"}, produce, stall=5.0, what="t")
        await response({"type": "http", "method": "GET"}, trio.sleep_forever, _appender(messages))
        body = b"".join(m.get("body", b"") for m in messages[1:])
        assert body == b"abc"
        incomplete += messages[-1].get("more_body", True)
    assert incomplete == 0


async def test_requests_with_a_body_or_other_methods_are_refused(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        r = await s.client.request("GET", "/v1/status", content=b"hello")
        assert r.status_code == 413 and r.json()["parameter"] == "body"
        r = await s.client.post("/v1/segments")
        assert r.status_code == 405 and "GET" in r.json()["error"]
        r = await s.client.get("/nope")
        assert r.status_code == 404 and r.headers["content-type"] == "application/json"


# ----------------------------------------------------------------------------
# Transcripts and live


async def test_transcripts_by_time(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        log = TranscriptLog(s.data_dir / "transcripts", days=30)
        for i in range(3):
            log.append(Transcript(seq=i, stream_id="s", device_id="dev-api",
                                  start_utc=at(10 * i), end_utc=at(10 * i + 5), duration=5.0,
                                  text=f"words {i}", protocol="raw", latency_seconds=0.1,
                                  age_seconds=0.2, attempts=1, clock_synced=True))
        body = (await s.client.get("/v1/transcripts", params={"since": at(5),
                                                              "until": at(25)})).json()
        assert [t["text"] for t in body["transcripts"]] == ["words 1", "words 2"]
        r = await s.client.get("/v1/transcripts", params={"since": "soon"})
        assert r.status_code == 400 and r.json()["parameter"] == "since"


async def test_live_is_one_ogg_opus_stream_of_the_mic(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = validate({
        "device": {"data_dir": str(tmp_path / "data")},
        "capture": {"source": "tone", "rate": 48000, "tone_hz": 1000.0, "tone_dbfs": -12.0},
        "segments": {"enabled": False},
        "api": {"enabled": True, "listen": "127.0.0.1:0", "token_file": str(token_file),
                "max_live_listeners": 1},
    })
    agent = Agent(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        assert agent.api is not None and agent.api.url is not None
        async with httpx.AsyncClient(base_url=agent.api.url, timeout=10) as client:
            auth = {"access_token": TOKEN}
            async with client.stream("GET", "/v1/live", params={**auth, "seconds": "2"}) as live:
                assert live.headers["content-type"] == "audio/ogg; codecs=opus"
                assert "content-length" not in live.headers  # chunked, open-ended
                second = await client.get("/v1/live", params=auth)
                assert second.status_code == 503  # one listener at most here
                body = b"".join([chunk async for chunk in live.aiter_bytes()])
        decoded = decode_ogg_opus(body)
        assert decoded.seconds == pytest.approx(2.0, abs=0.1)
        spectrum = np.abs(np.fft.rfft(decoded.pcm[4800:, 0]))
        peak_hz = np.argmax(spectrum) * 48000 / len(decoded.pcm[4800:, 0])
        assert peak_hz == pytest.approx(1000, abs=5)
        assert agent.api.stats.live_listeners == 0
        agent.stop()


# ----------------------------------------------------------------------------
# Config, token, planning


def test_listening_beyond_loopback_needs_a_token_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        validate({"api": {"enabled": True, "listen": "0.0.0.0:8640"}})
    assert err.value.problems[0].startswith("api.token_file:")
    assert "0.0.0.0:8640" in err.value.problems[0]
    assert check_api_config(ApiConfig(enabled=True, listen="[::1]:8640")) == []
    assert check_api_config(ApiConfig(enabled=True, listen="localhost:1")) == []
    bad = check_api_config(ApiConfig(enabled=True, listen="8640"))
    assert bad and bad[0].startswith("api.listen:")
    validate({"api": {"enabled": True, "listen": "0.0.0.0:8640", "token_file": "/x"}})


def test_the_cli_refuses_a_public_listen_without_a_token(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_agent.cli import main

    path = tmp_path / "agent.toml"
    path.write_text('[api]\nenabled = true\nlisten = "0.0.0.0:8640"\n')
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: api.token_file: expected a "
                                               "token file when api.listen")
    assert main(["run", "--config", str(path)]) == 2  # it never starts listening


def test_token_files(tmp_path: Path) -> None:
    generated = load_token(ApiConfig(), tmp_path)
    path = tmp_path / "api-token"
    assert path.read_text().strip() == generated and len(generated) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_token(ApiConfig(), tmp_path) == generated  # kept across restarts
    weak = tmp_path / "weak"
    weak.write_text("hunter2\n")
    with pytest.raises(ConfigError) as err:
        load_token(ApiConfig(token_file=str(weak)), tmp_path)
    assert err.value.problems[0].startswith("api.token_file")
    with pytest.raises(ConfigError, match=r"^api\.token_file: .*missing: no such file$"):
        load_token(ApiConfig(token_file=str(tmp_path / "missing")), tmp_path)


def test_open_under_refuses_anything_but_a_plain_file_below_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "file").write_bytes(b"ok")
    (tmp_path / "outside").write_bytes(b"no")
    fd = open_under(root, ["a", "file"])
    assert os.read(fd, 10) == b"ok"
    os.close(fd)
    os.mkfifo(root / "a" / "fifo")  # would block a plain open() forever
    (root / "a" / "link").symlink_to(tmp_path / "outside")
    (root / "b").symlink_to(root / "a")
    for parts in (["a", "fifo"], ["a", "link"], ["b", "file"], ["..", "outside"],
                  ["a", "..", "..", "outside"], ["a/../..", "outside"], ["a", "file\0"], []):
        with pytest.raises(UnsafePath):
            open_under(root, parts)
    with pytest.raises(FileNotFoundError):
        open_under(root, ["a", "missing"])


async def test_a_reload_applies_a_new_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    path = tmp_path / "agent.toml"
    text = (f'[device]\ndata_dir = "{tmp_path / "data"}"\n[capture]\nsource = "tone"\n'
            f'[segments]\nenabled = false\n[api]\nenabled = true\nlisten = "127.0.0.1:0"\n'
            f'token_file = "{token_file}"\n')
    path.write_text(text)
    agent = Agent(load_config(path), config_path=path)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        assert agent.api is not None and agent.api.url is not None
        async with httpx.AsyncClient(base_url=agent.api.url) as client:
            def auth(token: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {token}"}

            assert (await client.get("/v1/status", headers=auth(TOKEN))).status_code == 200
            new_token = "rotated-token-abcdefghijklmnop"
            token_file.write_text(new_token)
            path.write_text(text + "max_audio_encodes = 3\n")
            assert await agent.reload()
            assert (await client.get("/v1/status", headers=auth(TOKEN))).status_code == 401
            status = await client.get("/v1/status", headers=auth(new_token))
            assert status.json()["config"]["api"]["max_audio_encodes"] == 3
        agent.stop()


def test_times_need_a_timezone() -> None:
    assert parse_utc("t", "2027-01-15T08:00:30Z") == T0 + 30
    assert parse_utc("t", "2027-01-15T09:00:30+01:00") == T0 + 30
    assert parse_utc("t", "2027-01-15T09:00:30 01:00") == T0 + 30  # an unencoded '+'
    assert parse_utc("t", "2027-01-15T08:00:30.25Z") == T0 + 30.25


def _long_segment(tmp_path: Path, fmt: str, seconds: float, rate: int = 48000
                  ) -> tuple[Path, SegmentMeta, NDArray[np.int16]]:
    """A segment file of `seconds` of stereo audio at `rate`, as the spool writes it."""
    mono = make_signal(seconds, rate)
    pcm = np.stack([mono, mono[::-1]], axis=1)
    path = tmp_path / f"long.{fmt}"
    if fmt == "wav":
        write_wav(path, pcm, rate)
    elif fmt == "flac":
        enc = OggFlacEncoder(rate, 2, SampleFormat.INT16)
        path.write_bytes(enc.start() + enc.write(pcm) + enc.finish()[0])
        enc.close()
    else:
        path.write_bytes(encode_ogg_opus(pcm, rate, bitrate=128000))
    meta = SegmentMeta(id="long", device="d", start_utc="", end_utc="", start_ts=T0,
                       end_ts=T0 + seconds, mono_start=0.0, mono_end=seconds,
                       frames=len(pcm), rate=rate, channels=2, format=fmt, content_type="",
                       bytes=path.stat().st_size, sha256="", clock_synced=True)
    return path, meta, pcm


@pytest.mark.parametrize(("fmt", "rate"),
                         [("wav", 48000), ("flac", 48000), ("opus", 48000), ("opus", 44100)])
def test_a_second_of_a_long_segment_is_decoded_alone(tmp_path: Path, fmt: str,
                                                     rate: int) -> None:
    """/v1/audio decodes only the part of a segment it serves: one second out of a
    minute holds about a second of audio in memory, not the minute, and it is the
    same audio a whole decode gives (for Opus also at a rate that does not divide
    its 48 kHz, where the part must start on the right sample)."""
    path, meta, pcm = _long_segment(tmp_path, fmt, 60.0, rate)
    first, last = 30 * meta.rate + 123, 31 * meta.rate + 123
    fd = os.open(path, os.O_RDONLY)
    try:
        tracemalloc.start()
        part = decode_segment(fd, meta, first, last)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        whole = decode_segment(fd, meta)
    finally:
        os.close(fd)
    assert part.shape == (last - first, 2) and whole.shape == pcm.shape
    minute = whole.nbytes
    print(f"{fmt}: peak {peak / 1e6:.1f} MB for one second, {minute / 1e6:.1f} MB the minute")
    assert peak < minute / 8
    if fmt == "opus":  # lossy: the same audio as the whole decode, to far below its noise
        assert snr_db(whole[first:last], part) > 60
    else:
        assert np.array_equal(part, pcm[first:last])


class _FailingStorage(io.BytesIO):
    """A file whose storage fails (EIO) past `fail_at` bytes, as a dying SD card does."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        super().__init__(data)
        self.fail_at = fail_at

    def read(self, n: int | None = -1, /) -> bytes:
        if self.tell() + (n if n is not None and n >= 0 else 1) > self.fail_at:
            raise OSError(errno.EIO, "Input/output error")
        return super().read(n)


@pytest.mark.parametrize("fmt", ["wav", "flac", "opus"])
def test_a_storage_error_while_decoding_is_reported_not_a_crash(
        tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read error from the card in the middle of a segment ends that decode with
    an error naming it (the request is cut, the agent goes on capturing)."""
    path, meta, _pcm = _long_segment(tmp_path, fmt, 5.0)
    data = path.read_bytes()
    monkeypatch.setattr(decode_module, "open",
                        lambda *_a, **_k: _FailingStorage(data, len(data) // 2), raising=False)
    with pytest.raises(SegmentUnreadable, match="Input/output error"):
        decode_segment(0, meta, meta.rate, 4 * meta.rate)


def test_range_decisions_are_values_in_values_out() -> None:
    """If-None-Match, If-Range and Range decide the answer without a request or Trio."""
    etag, whole = '"abc"', RangeDecision(200, 0, 100)
    unsatisfiable = RangeDecision(416, 0, 0, "bytes */100")
    assert decide_range(etag, 100) == whole
    assert decide_range(etag, 100, if_none_match='"x", "abc"') == RangeDecision(304, 0, 0)
    assert decide_range(etag, 100, if_none_match="*").status == 304
    assert decide_range(etag, 100, range_header="bytes=10-19") == RangeDecision(
        206, 10, 10, "bytes 10-19/100")
    assert decide_range(etag, 100, range_header="bytes=-5") == RangeDecision(
        206, 95, 5, "bytes 95-99/100")
    assert decide_range(etag, 100, range_header="bytes=90-150") == RangeDecision(
        206, 90, 10, "bytes 90-99/100")
    assert decide_range(etag, 100, range_header="bytes=100-") == unsatisfiable
    assert decide_range(etag, 100, range_header="bytes=-0") == unsatisfiable
    assert decide_range(etag, 100, range_header="bytes=5-1") == unsatisfiable
    assert decide_range(etag, 100, range_header="bytes=0-1,3-4") == whole
    assert decide_range(etag, 100, range_header="items=0-1") == whole
    assert decide_range(etag, 100, range_header="bytes=0-1", if_range='"old"') == whole
    assert decide_range(etag, 100, range_header="bytes=0-1", if_range=etag).status == 206


def test_plan_trims_overlapping_segments_after_a_clock_step() -> None:
    """Two segments claiming the same wall-clock second (the clock stepped back):
    the second is trimmed to follow the first, never played twice."""
    ring = AudioRing(rate=RATE, channels=1, dtype="int16", seconds=10)

    def meta(start: float, seconds: float, sid: str) -> SegmentMeta:
        return SegmentMeta(id=sid, device="d", start_utc=iso_utc(start), end_utc=iso_utc(
            start + seconds), start_ts=start, end_ts=start + seconds, mono_start=0.0,
            mono_end=seconds, frames=int(seconds * RATE), rate=RATE, channels=1, format="wav",
            content_type="audio/wav", bytes=0, sha256="", clock_synced=True)

    a = meta(T0, 5.0, "20270115T080000.000Z-00000001")
    b = meta(T0 + 3.0, 5.0, "20270115T080003.000Z-00000002")
    plan = plan_audio(ring, [b, a], T0, T0 + 8)
    assert [(p.meta.id, p.first, p.last) for p in plan.items
            if isinstance(p, SegmentPiece)] == [(a.id, 0, 5 * RATE), (b.id, 2 * RATE, 5 * RATE)]
    assert plan.gaps == [] and plan.frames == 8 * RATE
    assert not any(isinstance(p, RingPiece) for p in plan.items)


# ----------------------------------------------------------------------------
# curl, and the demo's commands


def _curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                          check=False)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_against_the_api(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        spool = s.agent.spool
        assert spool is not None
        meta, _ = spool.list()[0]
        data = spool.audio_path(meta.id).read_bytes()
        auth = f"Authorization: Bearer {TOKEN}"
        health = await trio.to_thread.run_sync(_curl, "-f", s.url + "/healthz")
        assert json.loads(health.stdout)["status"] == "ok"
        denied = await trio.to_thread.run_sync(_curl, "-o", os.devnull, "-w", "%{http_code}",
                                               s.url + "/v1/status")
        assert denied.stdout == b"401"
        part = await trio.to_thread.run_sync(_curl, "-f", "-H", auth, "-r", "100-199",
                                             f"{s.url}/v1/segments/{meta.id}")
        assert part.stdout == data[100:200]
        audio = await trio.to_thread.run_sync(
            _curl, "-f", "-H", auth, f"{s.url}/v1/audio?start={at(30)}&end={at(32)}&format=pcm")
        assert np.array_equal(pcm16(audio.stdout), expected(30, 32))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_the_demo_prints_curl_commands_that_work(tmp_path: Path) -> None:
    from edge_agent.demo import run_demo

    commands: list[str] = []
    results: list[subprocess.CompletedProcess[bytes]] = []

    async def try_commands(cmds: list[str]) -> None:
        commands.extend(cmds)
        for cmd in cmds:
            # As a person would paste them; -f makes curl fail on an HTTP error.
            results.append(await trio.to_thread.run_sync(partial_shell, cmd, tmp_path))

    report = await run_demo(tmp_path / "demo", serve=0.0, on_api=try_commands)
    assert len(commands) >= 4
    assert any("/v1/audio" in c for c in commands)
    for cmd, res in zip(commands, results, strict=True):
        assert res.returncode == 0, (cmd, res.stderr)
    assert report.seconds_captured > 0


def partial_shell(cmd: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd.replace("curl ", "curl -f --max-time 20 ", 1), shell=True,
                          cwd=cwd, capture_output=True, check=False)
