"""A 12-hour recording, simulated as fast as the recorder can take it.

Claims checked: memory stays at the ring plus a constant however long the
recording runs (RSS sampled every simulated hour), producing a stream chunk at
hour 12 costs what it cost at the start (printed; only a generous ratio is
asserted), and the uploaded recording holds all 12 hours.

The source is `FastSource` (see test_recorder.py): one-second blocks of a tone,
paced only by the recorder's own ring readers, so nothing is lost and nothing
waits for the wall clock. 8 kHz mono keeps the 12-hour FLAC file small.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import trio

from edge_agent import AudioConfig, AudioFormat, AudioRecorder, LocalStore

from support.sources import FastSource

pytestmark = pytest.mark.slow

RATE = 8000
HOURS = 12
RING_SECONDS = 60.0
CHUNKS = 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def chunk_times(rec: AudioRecorder, source: FastSource, until: int) -> list[float]:
    """Seconds to produce each of CHUNKS one-second Opus chunks of a new stream."""
    times: list[float] = []
    gen = rec.stream(chunk_size=RATE, format=AudioFormat.OPUS)
    source.limit = until
    try:
        while len(times) < CHUNKS:
            began = time.perf_counter()
            chunk = await gen.__anext__()
            times.append(time.perf_counter() - began)
            assert chunk[:4] == b"OggS"
    finally:
        await gen.aclose()
    return times


async def test_twelve_hours_in_bounded_memory_at_constant_cost(tmp_path: Path) -> None:
    t = np.arange(RATE) / RATE
    tone = (np.sin(2 * np.pi * 400 * t) * 1000).astype(np.int16).reshape(-1, 1)
    source = FastSource(tone, RATE, block=RATE, limit=10 * RATE)
    store = LocalStore(tmp_path / "store")
    total = HOURS * 3600 * RATE
    rss: dict[int, int] = {}
    wall = time.perf_counter()
    async with AudioRecorder(store, AudioConfig(rate=RATE, chunk=RATE), source=source,
                             ring_seconds=RING_SECONDS, upload_format=AudioFormat.FLAC,
                             work_dir=tmp_path / "work") as rec:
        source.ring_of = lambda: rec.ring
        await source.run_to(10 * RATE)
        first = rec.ring.head
        key = await rec.start("long", "run")
        early = await chunk_times(rec, source, first + 60 * RATE)

        # Run to 30 s before the end, sampling RSS every simulated hour.
        source.limit = first + total - 30 * RATE
        hour = 3600 * RATE
        while rec.ring.head < source.limit:
            done = (rec.ring.head - first) // hour
            if done >= 1 and done not in rss:
                rss[done] = rss_bytes()
            await trio.sleep(0.01)
        rss[HOURS] = rss_bytes()
        late = await chunk_times(rec, source, first + total)
        await source.run_to(first + total)
        last = rec.ring.head
        segment = await rec.stop()
        stats = rec.stats
    wall = time.perf_counter() - wall

    ring_mb = RING_SECONDS * RATE * 2 / 1e6
    growth = {h: (b - rss[1]) / 1e6 for h, b in sorted(rss.items())}
    early_ms, late_ms = statistics.median(early) * 1e3, statistics.median(late) * 1e3
    print(f"\n12 h of {RATE} Hz audio in {wall:.1f} s wall; ring {ring_mb:.2f} MB")
    print("RSS growth since hour 1 (MB): "
          + ", ".join(f"h{h}={g:+.2f}" for h, g in growth.items()))
    print(f"stream chunk (1 s Opus): median {early_ms:.3f} ms at the start, "
          f"{late_ms:.3f} ms after 12 h (ratio {late_ms / early_ms:.2f})")

    # Memory: flat after the first hour (allocator noise only), whatever the length.
    assert len(rss) >= HOURS - 1
    assert max(growth.values()) < 4.0, growth
    # Cost per chunk does not grow with the recording (generous bound; numbers above).
    assert statistics.median(late) < 3 * statistics.median(early) + 0.002
    # Nothing was lost, and the store holds all twelve hours.
    assert last - first == total
    assert stats.lost_frames == 0 and stats.stream_lost_frames == 0
    assert segment.duration_ms == HOURS * 3600 * 1000
    assert segment.frames == b""  # far longer than the ring: the audio is in the store
    meta = await store.metadata(key)
    assert meta["frames"] == total and meta["content_type"] == "audio/ogg; codecs=flac"
    probe = await trio.run_process(
        ["ffprobe", "-v", "error", "-show_entries", "stream=duration_ts,sample_rate",
         "-of", "default=nw=1", str(store.path(key))], capture_stdout=True)
    fields = dict(line.split("=", 1) for line in probe.stdout.decode().split())
    print(f"ffprobe: {fields}; stored {store.path(key).stat().st_size / 1e6:.1f} MB")
    assert int(fields["sample_rate"]) == RATE
    assert int(fields["duration_ts"]) == total
    await store.delete(key)  # ~100 MB: do not leave it in pytest's kept temp dirs
