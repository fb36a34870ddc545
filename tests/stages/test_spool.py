"""The durable spool: segmenting, sealing, recovery, states, quota and disk faults.

Most tests drive the real `Segmenter` over a real ring and real files, with the
worker-thread hop replaced by an inline call so Trio's MockClock stays exact.
Helpers here (`Rig`, `FaultyOps`, `Kill`) are shared with the crash sweep and the
state-machine model in the other `test_spool_*` files.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
import pytest
import trio
import trio.testing

from edge_agent.agent import Agent
from edge_agent.api import decode_segment
from edge_agent.audio.encoders import encode_whole, make_encoder
from edge_agent.audio.opus import decode_ogg_opus, decode_ogg_opus_file
from edge_agent.audio.pcm import SampleFormat, read_wav
from edge_agent.blocking import InlineRunner
from edge_agent.clock import ManualClock
from edge_agent.config import SegmentsConfig, validate
from edge_agent.fs import FileOps
from edge_agent.spool import Spool
from edge_agent.spool.writer import SegmentWriter
from edge_agent.wire import (
    SEGMENT_ID_PATTERN,
    SegmentMeta,
    SegmentState,
    is_segment_id,
    new_segment_id,
)

from support.spool_rig import (
    MONO0,
    UTC0,
    FaultyOps,
    Kill,
    Rig,
    assert_clean,
    decoded_frames,
    signal_at,
)

T = TypeVar("T")











async def run_segmenter(rig: Rig, body: Callable[[], Any], *, settle: float = 1.0) -> None:
    """Start the segmenter, run ``body``, let it catch up, then stop it (as SIGTERM does)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.segmenter.run)
        await body()
        await trio.sleep(settle)
        nursery.cancel_scope.cancel()




def on_disk_meta(spool: Spool, segment_id: str) -> SegmentMeta:
    path = spool.audio_path(segment_id).parent / "meta.json"
    return msgspec.json.decode(path.read_bytes(), type=SegmentMeta)




# ----------------------------------------------------------------------------
# Segmenting and sealing


@pytest.mark.parametrize("fmt", ["opus", "flac", "wav"])
async def test_segments_are_aligned_contiguous_and_hold_every_frame_once(
    tmp_path: Path, fmt: str, autojump_clock: trio.testing.MockClock
) -> None:
    if fmt == "flac" and shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is needed to decode Ogg FLAC here")
    rig = Rig(tmp_path, fmt=fmt)
    await run_segmenter(rig, lambda: rig.feed(13.0))
    metas = [m for m, _ in rig.spool.list(newest_first=False)]

    # 13 s from 3 s past a boundary: [3, 5) partial, [5, 10), [10, 15), [15, 16) at the stop.
    assert [round(m.frames / rig.rate, 3) for m in metas] == [2.0, 5.0, 5.0, 1.0]
    assert [round(m.start_ts - UTC0, 3) for m in metas] == [0.0, 2.0, 7.0, 12.0]
    assert all(re.match(SEGMENT_ID_PATTERN, m.id) for m in metas)
    assert [m.id[:19] for m in metas] == [
        "20270115T080003.000", "20270115T080005.000", "20270115T080010.000",
        "20270115T080015.000",
    ]
    assert sorted(m.id for m in metas) == [m.id for m in metas]
    for before, after in itertools.pairwise(metas):
        assert after.start_ts == pytest.approx(before.end_ts, abs=1e-9)
        assert after.mono_start == pytest.approx(before.mono_end, abs=1e-9)
    assert sum(m.frames for m in metas) == rig.ring.head
    for m in metas:
        path = rig.spool.audio_path(m.id)
        assert on_disk_meta(rig.spool, m.id) == m
        assert rig.spool.verify(m.id)
        assert (m.device, m.rate, m.channels, m.clock_synced, m.recovered) == (
            "dev-1", 8000, 1, True, False)
        assert path.stat().st_size == m.bytes
        audio = decoded_frames(m, path)
        if fmt == "opus":
            assert len(audio) == m.frames * 48000 // rig.rate
    if fmt in ("wav", "flac"):
        # Lossless: the segments concatenated are exactly the captured signal.
        joined = np.concatenate([decoded_frames(m, rig.spool.audio_path(m.id)) for m in metas])
        np.testing.assert_array_equal(joined, rig.fed_signal())
    assert [p.stem for p in (tmp_path / "sealed").iterdir()] != []
    assert_clean(tmp_path)
    assert rig.spool.healthy


async def test_segments_are_encoded_at_the_configured_complexity(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rig = Rig(tmp_path, complexity=0)
    await run_segmenter(rig, lambda: rig.feed(4.0))
    first = next(m for m, _ in rig.spool.list(newest_first=False))
    segment = decode_ogg_opus_file(rig.spool.audio_path(first.id)).pcm

    def encoded_at(complexity: int) -> np.ndarray:
        enc = make_encoder("opus", rig.rate, 1, SampleFormat.INT16,
                           bitrate=rig.config.bitrate, complexity=complexity)
        return decode_ogg_opus(encode_whole(enc, rig.fed_signal()[:first.frames])).pcm

    np.testing.assert_array_equal(segment, encoded_at(0))
    assert not np.array_equal(segment, encoded_at(10))


@pytest.mark.parametrize("stop_after_blocks", [101, 113, 127, 240, 251])
async def test_stopping_in_the_middle_of_a_write_loses_no_frame(
    tmp_path: Path, stop_after_blocks: int, autojump_clock: trio.testing.MockClock
) -> None:
    # A stop can land while a chunk is on its way to the worker thread: the chunk
    # must then still be written by the final seal, not skipped.
    rig = Rig(tmp_path / str(stop_after_blocks), fmt="wav")

    class ThreadHop(InlineRunner):
        async def run(self, fn: Callable[..., T], *args: Any) -> T:
            await trio.sleep(0.003)  # like to_thread: cancellable until the thread starts
            return fn(*args)

    rig.segmenter.runner = ThreadHop()
    rig.segmenter.batch_seconds = 0.0  # a trip to the worker for every block
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.segmenter.run)
        for _ in range(stop_after_blocks):
            rig.write_block(160)
            await trio.sleep(0.02)
        rig.write_block(160)
        await trio.sleep(0.001)  # the segmenter is now on its way to write that block
        nursery.cancel_scope.cancel()
    metas = [m for m, _ in rig.spool.list(newest_first=False)]
    joined = np.concatenate([read_wav(rig.spool.audio_path(m.id))[0] for m in metas])
    np.testing.assert_array_equal(joined, rig.fed_signal())


class SlowWrites(InlineRunner):
    """Inline, but each segment write takes as long as its audio (of the format
    `only`, when given): an encoder far behind a source that runs ahead."""

    def __init__(self, rate: int, only: str | None = None) -> None:
        super().__init__()
        self.rate, self.only = rate, only

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        writer = getattr(fn, "__self__", None)
        if args and isinstance(args[0], np.ndarray) and (
                self.only is None or writer.header.format == self.only):  # type: ignore[union-attr]
            await trio.sleep(len(args[0]) / self.rate)
        return fn(*args)


async def test_an_encode_backlog_at_shutdown_is_sealed_as_wav(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A source ahead of real time: 18 s more captured than encoded, and the Opus
    # encode (1 s of work per second of audio here) far behind when the stop comes.
    rig = Rig(tmp_path, fmt="opus", seconds=60)
    rig.segmenter.runner = SlowWrites(rig.rate, only="opus")
    rig.segmenter.seal_grace = 2.0
    paced = 2 * rig.segmenter.batch_seconds
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.segmenter.run)
        await rig.feed(paced)  # two batches at real time: encoded as they come
        await rig.feed(18.0, paced=False)  # then the source runs ahead
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert rig.segmenter.stats.shutdown_lost_frames == 0
    assert "sealing the rest as WAV" in caplog.text
    metas = [m for m, _ in rig.spool.list(newest_first=False)]
    # What was encoded in time is Opus; the backlog follows in a WAV segment that
    # starts where the Opus one ends, and the two hold every captured frame.
    assert [m.format for m in metas] == ["opus", "wav"]
    opus, wav = metas
    assert 0 < opus.frames < (paced + 3) * rig.rate
    assert opus.frames + wav.frames == (paced + 18) * rig.rate
    assert wav.start_ts == pytest.approx(opus.end_ts)
    np.testing.assert_array_equal(decoded_frames(wav, rig.spool.audio_path(wav.id)),
                                  rig.fed_signal()[opus.frames:])


async def test_audio_the_grace_cannot_write_at_shutdown_is_counted_and_logged(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A source ahead of real time: 20 s captured, and the encode (1 s of work per
    # second of audio here) is far behind when the stop comes.
    rig = Rig(tmp_path, fmt="wav", seconds=60)
    rig.segmenter.runner = SlowWrites(rig.rate)
    rig.segmenter.seal_grace = 2.0
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.segmenter.run)
        await rig.feed(20.0, paced=False)
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    fresh = rig.new_spool()
    fresh.recover()
    kept = sum(m.frames for m in fresh.pending())
    lost = rig.segmenter.stats.shutdown_lost_frames
    written = rig.segmenter.stats.frames_written
    # Every captured frame was handed to the segment file (sealed, or in tmp/ for
    # the next start's recovery, which keeps what an fsync made durable) or is
    # counted as lost: here most of it is lost, and it says so.
    assert lost > 10 * rig.rate
    assert written + lost == 20 * rig.rate
    assert kept <= written
    assert rig.segmenter.stats.lost_frames == lost
    assert "captured audio not written at shutdown" in caplog.text


async def test_a_capture_gap_is_noted_and_the_segment_goes_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rig = Rig(tmp_path, fmt="wav", seconds=60, utc0=1_800_000_000.0)

    async def body() -> None:
        await rig.feed(2.0)
        rig.t += 3.5  # the mic delivered nothing for 3.5 s
        await trio.sleep(3.5)
        await rig.feed(1.0)

    await run_segmenter(rig, body)
    [meta] = [m for m, _ in rig.spool.list()]
    assert meta.frames == 3 * rig.rate
    assert [(g.frame, round(g.seconds, 3), g.reason) for g in meta.gaps] == [
        (2 * rig.rate, 3.5, "capture")]
    assert meta.gaps[0].utc == "2027-01-15T08:00:02.000000Z"
    assert meta.end_ts - meta.start_ts == pytest.approx(6.5)


async def test_a_wall_clock_step_starts_a_new_segment(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rig = Rig(tmp_path, fmt="wav", seconds=60, utc0=1_800_000_000.0)

    async def body() -> None:
        await rig.feed(2.0)
        rig.step = 3600.0  # NTP's first sync on a board without RTC
        await rig.feed(1.0)

    await run_segmenter(rig, body)
    first, second = (m for m, _ in rig.spool.list(newest_first=False))
    assert (first.frames, second.frames) == (2 * rig.rate, rig.rate)
    assert first.clock_steps == []
    assert [(s.frame, s.seconds) for s in second.clock_steps] == [(0, pytest.approx(3600.0))]
    # Each segment keeps the time mapping it was captured with.
    assert first.end_ts == pytest.approx(1_800_000_002.0)
    assert second.start_ts == pytest.approx(1_800_003_602.0)
    assert second.id.startswith("20270115T090002.000Z-")


def test_segment_ids_sort_by_time_and_are_safe_names() -> None:
    ids = [new_segment_id(1_800_000_000.0 + k * 0.0004) for k in range(10)]
    assert all(re.fullmatch(SEGMENT_ID_PATTERN, i) for i in ids)
    assert ids[0].startswith("20270115T080000.000Z-")
    assert len(set(ids)) == 10  # same millisecond, still unique
    later = new_segment_id(1_800_000_000.5)
    assert later > max(i[:19] for i in ids) and later.startswith("20270115T080000.500Z-")


def test_segment_id_check_is_whole_string(tmp_path: Path) -> None:
    good = new_segment_id(1_800_000_000.0)
    assert is_segment_id(good)
    for bad in (good + "\n", good + "/../x", "../" + good, good.replace("T", "t"), "", None):
        assert not is_segment_id(bad)


# ----------------------------------------------------------------------------
# Recovery


def crash_while_recording(spool: Spool, seconds: float, rate: int = 8000) -> int:
    """Open a segment, write audio with an fsync per second, then die without sealing.

    Returns the frames written.
    """
    writer = spool.open_segment(start_ts=UTC0, mono_start=MONO0, rate=rate, channels=1,
                                sample_format="int16", clock_synced=True, now=0.0)
    block = rate // 50
    written = 0
    for i in range(round(seconds * 50)):
        writer.write(signal_at(written, block, rate), now=i * 0.02)
        written += block
    # The process dies: the descriptor goes away, nothing is finished or sealed.
    writer._enc.close()
    assert writer._fd is not None
    os.close(writer._fd)
    return written


def max_page_span(path: Path) -> int:
    """The most samples one Ogg page of the file spans (from granule positions)."""
    data, pos, granules = path.read_bytes(), 0, [0]
    while pos < len(data):
        granules.append(max(granules[-1], int.from_bytes(data[pos + 6:pos + 14], "little")))
        nsegs = data[pos + 26]
        pos += 27 + nsegs + sum(data[pos + 27:pos + 27 + nsegs])
    return max(b - a for a, b in itertools.pairwise(granules))


@pytest.mark.parametrize("fmt", ["opus", "flac", "wav"])
def test_recovery_salvages_a_segment_cut_by_a_crash(tmp_path: Path, fmt: str) -> None:
    if fmt == "flac" and shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is needed to decode Ogg FLAC here")
    config = SegmentsConfig(format=fmt, fsync_seconds=1.0)
    spool = Spool(tmp_path, device_id="dev-1", config=config, clock=ManualClock())
    spool.recover()
    written = crash_while_recording(spool, 7.3)
    # A torn tail: the half-written next page (Ogg) or frame (WAV, which has no
    # checksums to tell junk from audio) that a power cut leaves behind.
    [tmp_dir] = (tmp_path / "tmp").iterdir()
    audio = next(p for p in tmp_dir.iterdir() if p.name.startswith("audio."))
    with audio.open("ab") as f:
        f.write(b"\x01" if fmt == "wav" else b"OggS\0" + bytes(range(200)))

    fresh = Spool(tmp_path, device_id="dev-1", config=config, clock=ManualClock())
    report = fresh.recover()
    [meta] = fresh.pending()
    assert report.recovered == [meta.id] and meta.recovered
    assert fresh.stats.segments_recovered == 1
    assert fresh.verify(meta.id)
    decoded = decoded_frames(meta, fresh.audio_path(meta.id))
    lost = written - meta.frames
    print(f"{fmt}: wrote {written / 8000:.3f} s, salvaged {meta.frames / 8000:.3f} s")
    # A crash of the process loses what the encoder still held: at most one page
    # (Opus: <= 1 s, plus look-ahead; Ogg FLAC: one ~4 KB page of 4096-sample frames,
    # plus the frame being filled); WAV what came after the last fsync (1 s here).
    bound = {"opus": 8000 + 400, "flac": max_page_span(fresh.audio_path(meta.id)) + 4096,
             "wav": 8000}[fmt]
    assert 0 <= lost <= bound
    if fmt == "opus":
        assert len(decoded) == pytest.approx(meta.frames * 6, abs=6)
    else:
        np.testing.assert_array_equal(decoded, signal_at(0, meta.frames, 8000))
    assert meta.end_ts == pytest.approx(UTC0 + meta.frames / 8000)
    assert_clean(tmp_path)


@pytest.mark.parametrize("fmt", ["opus", "flac"])
def test_recovery_resynchronises_past_damage_and_records_the_hole_as_a_gap(
        tmp_path: Path, fmt: str) -> None:
    config = SegmentsConfig(format=fmt, fsync_seconds=1.0)
    spool = Spool(tmp_path, device_id="dev-1", config=config, clock=ManualClock())
    spool.recover()
    written = crash_while_recording(spool, 7.3)
    [tmp_dir] = (tmp_path / "tmp").iterdir()
    [audio] = [p for p in tmp_dir.iterdir() if p.name.startswith("audio.")]
    span = max_page_span(audio)  # samples of one page (Opus: at 48 kHz)
    page_seconds = span / (48000 if fmt == "opus" else 8000)
    data = bytearray(audio.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 32] = b"\xaa" * 32  # a bad block in the middle of the file
    audio.write_bytes(bytes(data))

    fresh = Spool(tmp_path, device_id="dev-1", config=config, clock=ManualClock())
    report = fresh.recover()
    [meta] = fresh.pending()
    assert report.recovered == [meta.id] and meta.recovered and fresh.verify(meta.id)
    [gap] = meta.gaps
    # The hole is the damaged page (and a packet that ran into it from the page
    # before), placed inside the segment.
    assert gap.reason == "damage" and 0.0 < gap.seconds <= 2 * page_seconds + 0.1
    # The pages after the damage are kept: all but the damaged page and the
    # audio the crash cut off (Opus: a page and look-ahead; FLAC: the frame and page
    # being filled).
    cut_off = {"opus": 8000 + 400, "flac": round(page_seconds * 8000) + 4096}[fmt]
    assert meta.frames >= written - round(gap.seconds * 8000) - cut_off
    assert meta.frames + gap.seconds * 8000 == pytest.approx(written, abs=cut_off)
    # The spliced file decodes whole, and its timeline counts the hole.
    decoded = decoded_frames(meta, fresh.audio_path(meta.id))
    if fmt == "opus":
        assert len(decoded) == pytest.approx(meta.frames * 6, abs=6)
    else:  # exactly the captured samples on either side of the hole
        at, missing = gap.frame, round(gap.seconds * 8000)
        np.testing.assert_array_equal(decoded[:at], signal_at(0, at, 8000))
        np.testing.assert_array_equal(decoded[at:],
                                      signal_at(at + missing, meta.frames - at, 8000))
    assert meta.end_ts == pytest.approx(UTC0 + meta.frames / 8000 + gap.seconds)
    assert UTC0 < datetime.fromisoformat(gap.utc).timestamp() < meta.end_ts
    # The API reads a part after the hole as the same audio a whole decode has there.
    fd = os.open(fresh.audio_path(meta.id), os.O_RDONLY)
    try:
        whole = decode_segment(fd, meta)
        first, last = gap.frame + 4000, gap.frame + 8000
        part = decode_segment(fd, meta, first, last)
    finally:
        os.close(fd)
    assert len(whole) == meta.frames
    np.testing.assert_allclose(part, whole[first:last], atol=1e-3)
    assert_clean(tmp_path)


def test_recovery_discards_empty_segments_and_quarantines_what_it_cannot_read(
    tmp_path: Path,
) -> None:
    config = SegmentsConfig(format="opus")
    spool = Spool(tmp_path, device_id="dev-1", config=config, clock=ManualClock())
    spool.recover()
    # 1: opened, then the process died before any audio page.
    w = spool.open_segment(start_ts=UTC0, mono_start=MONO0, rate=8000, channels=1,
                           sample_format="int16", clock_synced=False)
    w.close()
    # 2: a header that names the segment, but audio that is not Ogg at all.
    w = spool.open_segment(start_ts=UTC0 + 5, mono_start=MONO0 + 5, rate=8000, channels=1,
                           sample_format="int16", clock_synced=False)
    w.close()
    w.audio.write_bytes(b"\x7fELF" + os.urandom(3000))
    garbage_id = w.id
    # 3: audio with no header at all.
    stray = tmp_path / "tmp" / "stray"
    stray.mkdir()
    (stray / "audio.opus").write_bytes(b"junk" * 100)
    # 4: a sealed segment whose metadata is damaged.
    broken = tmp_path / "sealed" / new_segment_id(UTC0 + 10)
    broken.mkdir()
    (broken / "meta.json").write_text("{not json")
    (broken / "audio.opus").write_bytes(b"x")

    report = Spool(tmp_path, device_id="dev-1", config=config, clock=ManualClock()).recover()
    assert len(report.discarded) == 1
    reasons = dict(report.newly_quarantined)
    assert reasons[garbage_id] == "cannot salvage: not an Ogg stream (no valid first page)"
    assert reasons["stray"] == "no readable open.json for the audio"
    assert reasons[broken.name].startswith("unreadable meta.json: ")
    for name, reason in reasons.items():
        assert (tmp_path / "quarantine" / name / "reason.txt").read_text() == reason + "\n"
    assert os.listdir(tmp_path / "sealed") == []
    assert_clean(tmp_path)


def test_recovery_finishes_a_seal_that_a_crash_interrupted(tmp_path: Path) -> None:
    ops = FaultyOps(fake_fsync=True)
    config = SegmentsConfig(format="wav")
    spool = Spool(tmp_path, device_id="dev-1", config=config, clock=ManualClock(), fs=ops)
    spool.recover()
    writer = spool.open_segment(start_ts=UTC0, mono_start=MONO0, rate=8000, channels=1,
                                sample_format="int16", clock_synced=True)
    writer.write(signal_at(0, 8000, 8000), now=0.0)
    # The process dies at the rename, after meta.json was written and fsynced.
    ops.fail_when = lambda op, path: Kill() if op == "rename" else None
    with pytest.raises(Kill):
        spool.seal(writer)
    assert (tmp_path / "tmp" / writer.id / "meta.json").exists()
    fresh = Spool(tmp_path, device_id="dev-1", config=config, clock=ManualClock())
    report = fresh.recover()
    [meta] = fresh.pending()
    assert report.completed == [meta.id] and not meta.recovered
    assert meta.frames == 8000 and fresh.verify(meta.id)
    assert_clean(tmp_path)


# ----------------------------------------------------------------------------
# States, queries, integrity


def seal_one(spool: Spool, start: float, seconds: float = 1.0, rate: int = 8000) -> SegmentMeta:
    writer = spool.open_segment(start_ts=start, mono_start=start - UTC0 + MONO0, rate=rate,
                                channels=1, sample_format="int16", clock_synced=True)
    writer.write(signal_at(0, round(seconds * rate), rate), now=0.0)
    return spool.seal(writer)


def test_a_held_quarantined_segment_degrades_health(tmp_path: Path) -> None:
    spool = Spool(tmp_path, device_id="dev-1", config=SegmentsConfig(format="wav"),
                  clock=ManualClock())
    spool.recover()
    a, b = seal_one(spool, UTC0), seal_one(spool, UTC0 + 5)
    assert spool.degraded_reason is None
    spool.quarantine(a.id, "backend said 400")
    assert spool.degraded_reason == ("1 quarantined segment(s) held, never to be uploaded "
                                     "(see /v1/segments?state=quarantined)")
    fresh = Spool(tmp_path, device_id="dev-1", config=SegmentsConfig(format="wav"),
                  clock=ManualClock())
    fresh.recover()  # a restart does not hide it
    assert fresh.degraded_reason is not None and fresh.degraded_reason.startswith("1 quar")
    assert [m.id for m in fresh.pending()] == [b.id]  # the rest still goes up


def test_states_are_durable_and_survive_a_restart(tmp_path: Path) -> None:
    config = SegmentsConfig(format="wav")
    spool = Spool(tmp_path, device_id="dev-1", config=config, clock=ManualClock())
    spool.recover()
    a, b, c = (seal_one(spool, UTC0 + 5 * k) for k in range(3))
    assert [m.id for m in spool.pending()] == [a.id, b.id, c.id]
    spool.mark_synced(a.id)
    spool.mark_synced(a.id)  # a repeat (lost acknowledgement retried) is harmless
    spool.quarantine(b.id, "backend said 400: segment too long")
    assert spool.audio_path(a.id) == tmp_path / "synced" / a.id / "audio.wav"

    fresh = Spool(tmp_path, device_id="dev-1", config=config, clock=ManualClock())
    fresh.recover()
    assert [m.id for m in fresh.pending()] == [c.id]
    assert fresh.get(a.id) == (a, SegmentState.SYNCED)
    assert fresh.get(b.id) == (b, SegmentState.QUARANTINED)
    assert (tmp_path / "quarantine" / b.id / "reason.txt").read_text() == (
        "backend said 400: segment too long\n")
    assert [m.id for m, _ in fresh.list(state=SegmentState.SYNCED)] == [a.id]
    assert [m.id for m, _ in fresh.list(limit=2)] == [c.id, b.id]
    assert [m.id for m, _ in fresh.list(since=UTC0 + 5.5, newest_first=False)] == [b.id, c.id]
    assert [m.id for m, _ in fresh.list(until=UTC0 + 5.0)] == [a.id]
    assert fresh.stats.bytes_used == a.bytes + b.bytes + c.bytes
    assert fresh.get(new_segment_id(UTC0)) is None
    for bad in ("../../etc/passwd", "20261124T053000.000Z-3F9A1C2B", "x" * 30, ""):
        with pytest.raises(ValueError, match="bad segment id"):
            fresh.get(bad)
        with pytest.raises(ValueError, match="bad segment id"):
            fresh.audio_path(bad)


def test_verify_catches_bit_rot_and_truncation(tmp_path: Path) -> None:
    spool = Spool(tmp_path, device_id="dev-1", config=SegmentsConfig(), clock=ManualClock())
    spool.recover()
    a, b, c = (seal_one(spool, UTC0 + 5 * k) for k in range(3))
    path = spool.audio_path(a.id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with spool.audio_path(b.id).open("r+b") as f:
        f.truncate(b.bytes - 10)
    assert (spool.verify(a.id), spool.verify(b.id), spool.verify(c.id)) == (False, False, True)
    assert spool.stats.integrity_failures == 2


async def test_audio_goes_to_disk_in_batches_of_fsync_seconds_each_durable_when_written(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # One trip to the worker thread per fsync interval of audio, not per capture
    # block (each trip wakes two threads), and each batch is durable when its trip
    # ends, so a crash of either kind loses at most fsync_seconds of audio.
    rig = Rig(tmp_path, fmt="opus", seconds=60, fsync_seconds=2.0)
    trips: list[tuple[int, bool]] = []

    class Trips(InlineRunner):
        async def run(self, fn: Callable[..., T], *args: Any) -> T:
            result = await super().run(fn, *args)
            writer = getattr(fn, "__self__", None)
            if isinstance(writer, SegmentWriter) and fn.__name__ == "write":
                trips.append((len(args[0]), writer.unsynced))
            return result

    rig.segmenter.runner = Trips()
    await run_segmenter(rig, lambda: rig.feed(10.0))
    batch = 2 * rig.rate
    # The first frames open the segment; a minute boundary may split one batch.
    assert len(trips) <= 10 // 2 + 2, trips
    assert sum(n for n, _ in trips) == 10 * rig.rate
    assert [unsynced for n, unsynced in trips if n >= batch] == [False] * 4


async def test_wait_pending_wakes_at_the_seal_without_polling(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rig = Rig(tmp_path, fmt="wav")
    woke_at: list[float] = []
    sealed_at: list[float] = []
    seal = rig.spool.seal

    def timed_seal(*args: Any, **kwargs: Any) -> SegmentMeta:
        sealed_at.append(trio.current_time())
        return seal(*args, **kwargs)

    rig.spool.seal = timed_seal  # type: ignore[method-assign]

    async def uploader() -> None:
        await rig.spool.wait_pending()
        woke_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(uploader)
        await run_segmenter(rig, lambda: rig.feed(2.5))
    # The first boundary (2 s in) is sealed within one batch (0.25 s) of being
    # captured, and the waiter wakes at that very moment of virtual time.
    assert woke_at == sealed_at[:1]
    assert 2.0 < sealed_at[0] <= 2.0 + 0.02 + 0.25


async def test_wait_pending_is_woken_by_a_seal_in_a_worker_thread(tmp_path: Path) -> None:
    spool = Spool(tmp_path, device_id="dev-1", config=SegmentsConfig(format="wav"),
                  clock=ManualClock())
    await trio.to_thread.run_sync(spool.recover)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spool.wait_pending)
            await trio.sleep(0.05)
            await trio.to_thread.run_sync(seal_one, spool, UTC0)
    assert len(spool.pending()) == 1


# ----------------------------------------------------------------------------
# Disk faults


async def test_a_failed_fsync_is_never_retried_on_the_same_descriptor(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    audio_fsyncs = []

    def fail_one_audio_fsync(op: str, path: str) -> OSError | None:
        # The 3rd fsync of an audio file: 2 s into the first segment, audio written.
        if op == "fsync" and path.endswith("audio.wav"):
            audio_fsyncs.append(path)
            if len(audio_fsyncs) == 3:
                return OSError(errno.EIO, "Input/output error", path)
        return None

    ops = FaultyOps(fail_when=fail_one_audio_fsync)
    rig = Rig(tmp_path, fmt="wav", fs=ops, fsync_seconds=1.0)
    await run_segmenter(rig, lambda: rig.feed(7.0))
    # The descriptor whose fsync failed was never fsynced again; the segment was
    # written again from the ring into a new file and sealed whole.
    [failed_at] = [i for i, (_, ok) in enumerate(ops.fsyncs) if not ok]
    bad = ops.fsyncs[failed_at][0]
    assert all(generation != bad for generation, _ in ops.fsyncs[failed_at + 1:])
    assert rig.spool.stats.fsync_failures == 1
    assert rig.segmenter.stats.rewrites == 1
    metas = [m for m, _ in rig.spool.list(newest_first=False)]
    joined = np.concatenate([read_wav(rig.spool.audio_path(m.id))[0] for m in metas])
    np.testing.assert_array_equal(joined, rig.fed_signal())
    assert rig.spool.healthy and rig.segmenter.stats.lost_frames == 0
    assert_clean(tmp_path)


class DiskFull:
    """ENOSPC for every write-like operation while ``full`` is set."""

    def __init__(self) -> None:
        self.full = False
        self.refused = 0

    def __call__(self, op: str, path: str) -> OSError | None:
        if self.full and op in ("create", "write", "pwrite", "mkdir"):
            self.refused += 1
            return OSError(errno.ENOSPC, "No space left on device", path)
        return None


async def test_a_full_disk_degrades_health_then_recording_resumes_with_nothing_lost(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    disk = DiskFull()
    rig = Rig(tmp_path, fmt="opus", fs=FaultyOps(fail_when=disk), ring_seconds=30)
    health: list[str | None] = []

    async def body() -> None:
        await rig.feed(6.0)
        sealed_before = [m for m, _ in rig.spool.list()]
        disk.full = True
        await rig.feed(10.0, between=lambda: health.append(rig.spool.degraded_reason))
        disk.full = False
        await rig.feed(4.0)
        await trio.sleep(6)  # the backoff runs out and the segment is written again
        for m in sealed_before:  # what was sealed before the disk filled is intact
            assert rig.spool.verify(m.id)

    await run_segmenter(rig, body)
    assert disk.refused > 0
    reasons = {r for r in health if r}
    assert reasons and all(r.startswith("disk full: ENOSPC writing a segment") for r in reasons)
    assert rig.spool.healthy
    metas = [m for m, _ in rig.spool.list(newest_first=False)]
    # The ring (30 s) outlasted the outage (10 s): every frame is in a segment.
    assert sum(m.frames for m in metas) == rig.ring.head == 20 * rig.rate
    assert rig.segmenter.stats.lost_frames == 0
    for before, after in itertools.pairwise(metas):
        assert after.mono_start == pytest.approx(before.mono_end, abs=1e-9)
    assert all(rig.spool.verify(m.id) for m in metas)
    assert_clean(tmp_path)


async def test_a_full_disk_at_shutdown_leaves_the_open_segment_to_the_next_start(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    disk = DiskFull()
    rig = Rig(tmp_path, fmt="opus", seconds=60, fs=FaultyOps(fail_when=disk),
              fsync_seconds=1.0)

    async def body() -> None:
        await rig.feed(4.0)
        await trio.sleep(1)
        disk.full = True  # the final pages and meta.json will not fit

    await run_segmenter(rig, body)
    assert rig.spool.pending() == []
    assert len(os.listdir(tmp_path / "tmp")) == 1  # kept, not deleted
    disk.full = False
    fresh = rig.new_spool(FileOps())
    report = fresh.recover()
    [meta] = fresh.pending()
    assert report.recovered == [meta.id] and fresh.verify(meta.id)
    # What the fsyncs had made durable survives: all but the Opus page in the making
    # (<= 1 s) and the encoder's look-ahead.
    assert meta.frames >= 4 * rig.rate - (rig.rate + 400)
    assert_clean(tmp_path)


async def test_an_outage_longer_than_the_ring_counts_exactly_what_was_lost(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    disk = DiskFull()
    rig = Rig(tmp_path, fmt="wav", fs=FaultyOps(fail_when=disk), ring_seconds=4)

    async def body() -> None:
        await rig.feed(3.0)
        disk.full = True
        await rig.feed(12.0)
        disk.full = False
        await rig.feed(3.0)
        await trio.sleep(6)

    await run_segmenter(rig, body)
    metas = [m for m, _ in rig.spool.list(newest_first=False)]
    lost = rig.segmenter.stats.lost_frames
    assert lost > 0
    # Every captured frame is either in a sealed segment or counted as lost.
    assert sum(m.frames for m in metas) + lost == rig.ring.head
    overruns = [g for m in metas for g in m.gaps if g.reason == "overrun"]
    assert sum(round(g.seconds * rig.rate) for g in overruns) == lost
    # And what was kept is the right audio: each segment matches the signal at its place.
    for m in metas:
        start = round((m.mono_start - MONO0) * rig.rate)
        samples = read_wav(rig.spool.audio_path(m.id))[0]
        if not m.gaps or m.gaps[0].frame == 0:
            np.testing.assert_array_equal(samples, signal_at(start, m.frames, rig.rate))
    held = sum(m.frames for m in metas) / rig.rate
    print(f"disk full for 12 s, ring of 4 s: sealed {held:.2f} s, lost {lost / rig.rate:.2f} s "
          f"of {rig.ring.head / rig.rate:.0f} s captured")


async def test_a_small_quota_evicts_synced_first_then_the_oldest_unsynced_as_counted_loss(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # 16 kHz WAV: 160 044 bytes per 5 s segment, so 6 fit in 1 MiB.
    rig = Rig(tmp_path, fmt="wav", rate=16000, max_spool_mb=1, min_free_mb=0,
              utc0=1_800_000_000.0)
    synced: list[str] = []

    async def backend_up_for_two() -> None:
        while len(synced) < 2:
            await rig.spool.wait_pending()
            seg = rig.spool.pending()[0]
            rig.spool.mark_synced(seg.id)
            synced.append(seg.id)

    seen: list[list[str]] = []

    def snapshot() -> None:
        seen.append([m.id for m, _ in rig.spool.list(newest_first=False)])

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend_up_for_two)
            await rig.feed(45.0, between=snapshot)  # then the backend is down

    await run_segmenter(rig, body)
    snapshot()
    sealed = list(dict.fromkeys(i for ids in seen for i in ids))  # every id ever listed
    assert len(sealed) == 9 and synced == sealed[:2]
    remaining = [m.id for m, _ in rig.spool.list(newest_first=False)]
    # Seal 7 evicted synced #1, seal 8 synced #2, and seal 9 (at the stop), with no
    # synced segment left, the oldest unsynced one (#3): 5 s of audio lost, counted.
    stats = rig.spool.stats
    assert (stats.evicted_synced, stats.evicted_unsynced) == (2, 1)
    assert stats.evicted_unsynced_seconds == pytest.approx(5.0)
    assert stats.evicted_unsynced_bytes == 160_044
    assert remaining == sealed[3:]
    assert stats.bytes_used == sum(m.bytes for m, _ in rig.spool.list()) <= 1024 * 1024
    assert rig.spool.degraded_reason is not None
    assert rig.spool.degraded_reason.startswith("unsynced audio evicted: 1 segment(s)")
    # The backend comes back and the uploader drains what is left: healthy again
    # at the next quota check, which now finds synced audio to evict instead.
    for m in rig.spool.pending():
        rig.spool.mark_synced(m.id)
    rig.spool.enforce_quota()
    assert rig.spool.healthy and rig.spool.pending() == []


async def test_the_agent_reports_a_degraded_spool(tmp_path: Path) -> None:
    agent = Agent(validate({"device": {"data_dir": str(tmp_path)},
                            "capture": {"source": "tone", "rate": 16000}}))
    assert agent.spool is not None and agent.degraded() == {}
    agent.spool.note_disk_error(OSError(errno.EROFS, "Read-only file system"), "writing a segment")
    assert agent.degraded() == {
        "spool": "file system read-only: EROFS writing a segment: Read-only file system"}


def test_retention_removes_old_synced_segments_but_never_unsynced_ones(tmp_path: Path) -> None:
    clock = ManualClock(utc_now=UTC0 + 10)
    spool = Spool(tmp_path, device_id="dev-1", config=SegmentsConfig(retain_synced_hours=1),
                  clock=clock)
    spool.recover()
    a, b = seal_one(spool, UTC0), seal_one(spool, UTC0 + 5)
    spool.mark_synced(a.id)
    clock.utc_now += 3600
    spool.enforce_quota()
    assert spool.get(a.id) is None and spool.get(b.id) is not None
    assert spool.stats.evicted_expired == 1 and spool.stats.evicted_unsynced == 0
    assert spool.healthy


# ----------------------------------------------------------------------------
# The agent process


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_agent", *args]


def start_agent(tmp_path: Path, extra: str = "") -> subprocess.Popen[str]:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[device]\ndata_dir = "{tmp_path}/data"\n'
        '[capture]\nsource = "tone"\nrate = 16000\n'
        f'[segments]\nseconds = 60\nfsync_seconds = 0.5\n{extra}'
    )
    proc = subprocess.Popen(agent_cmd("run", "--config", str(cfg)), stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    for line in proc.stderr:
        if "agent ready" in line or time.monotonic() > deadline:
            break
    return proc


def run_segments(spool: Spool) -> list[SegmentMeta]:
    """The segments of a short run: one, or two back to back when the run crossed
    a wall-clock minute (segments are aligned to it)."""
    metas = spool.pending()
    assert 1 <= len(metas) <= 2
    if len(metas) == 2:
        assert metas[0].end_ts / 60 == pytest.approx(round(metas[0].end_ts / 60), abs=1e-4)
        assert metas[1].start_ts == pytest.approx(metas[0].end_ts, abs=1e-3)
    return metas


def test_sigterm_seals_the_open_segment_within_4_seconds(tmp_path: Path) -> None:
    proc = start_agent(tmp_path)
    ready = time.monotonic()
    try:
        time.sleep(1.5)
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=10)
        stopped_in = time.monotonic() - started
    finally:
        proc.kill()
    ran = time.monotonic() - ready
    print(f"stopped {stopped_in:.2f} s after SIGTERM")
    assert code == 0
    spool = Spool(tmp_path / "data" / "spool", device_id="x", config=SegmentsConfig(),
                  clock=ManualClock())
    report = spool.recover()
    assert report.recovered == [] and report.completed == []  # sealed, not salvaged
    metas = run_segments(spool)
    # All the audio of the run, sealed at the stop (capture starts just before "ready").
    total = sum(m.seconds for m in metas)
    assert 1.3 < total < ran + 1.0
    for meta in metas:
        assert spool.verify(meta.id)
        assert len(decode_ogg_opus_file(spool.audio_path(meta.id)).pcm) == meta.frames * 3
    assert_clean(tmp_path / "data" / "spool")


def test_kill_9_loses_at_most_the_last_fsync_interval_and_a_page(tmp_path: Path) -> None:
    proc = start_agent(tmp_path)
    try:
        time.sleep(3.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    spool = Spool(tmp_path / "data" / "spool", device_id="x", config=SegmentsConfig(),
                  clock=ManualClock())
    report = spool.recover()
    *sealed, meta = run_segments(spool)
    assert report.recovered == [meta.id] and meta.recovered and spool.verify(meta.id)
    assert all(spool.verify(m.id) and not m.recovered for m in sealed)
    decoded = decode_ogg_opus_file(spool.audio_path(meta.id))
    assert len(decoded.pcm) == pytest.approx(meta.frames * 3, abs=3)
    # The agent captured about 3 s (plus start-up); a process crash keeps everything
    # written, so what is lost is at most the Opus page in the making (<= 1 s).
    total = sum(m.seconds for m in sealed) + meta.seconds
    print(f"salvaged {total:.2f} s after kill -9 about 3 s after start")
    assert total > 1.5
    assert_clean(tmp_path / "data" / "spool")
