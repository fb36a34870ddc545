"""3: constant cost per chunk. CPU per ring operation (read a 1 s chunk through
a reader, cut a 10 s range by UTC) after a short and after a 12-hour capture,
against a naive design that concatenates the whole history for every cut.

Imports `edge_agent` as an installed library only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.common import BENCH_CHANNELS, BENCH_RATE, BLOCK_MS, Sizes
from edge_agent.ring import AudioRing

__all__ = ["measure_ring"]

def _filled_ring(seconds: float) -> AudioRing:
    """A 300 s ring at 48 kHz stereo after `seconds` of capture.

    Everything but the newest ring-full is written as one-hour blocks of a
    zero-stride array (indices and anchors advance, no memory is touched); the
    newest ring-full arrives in 20 ms blocks, as from a microphone.
    """
    ring = AudioRing(rate=BENCH_RATE, channels=BENCH_CHANNELS, dtype="int16", seconds=300)
    total = round(seconds * BENCH_RATE)
    recent = min(total, ring.capacity)
    utc0, mono0 = 1_800_000_000.0, 1000.0
    hour = 3600 * BENCH_RATE
    zero = np.zeros((1, BENCH_CHANNELS), np.int16)
    pos = 0
    while pos < total - recent:
        n = min(hour, total - recent - pos)
        ring.write(np.broadcast_to(zero, (n, BENCH_CHANNELS)), utc=utc0 + pos / BENCH_RATE,
                   mono=mono0 + pos / BENCH_RATE)
        pos += n
    block_frames = BENCH_RATE * BLOCK_MS // 1000
    block = np.random.default_rng(1).integers(-3000, 3000, (block_frames, BENCH_CHANNELS),
                                              dtype=np.int16)
    while pos < total:
        n = min(block_frames, total - pos)
        ring.write(block[:n], utc=utc0 + pos / BENCH_RATE, mono=mono0 + pos / BENCH_RATE)
        pos += n
    return ring


def _batch_us(fn: Callable[[], object], reps: int) -> float:
    """CPU microseconds per call over one batch of `reps` calls."""
    t0 = time.thread_time()
    for _ in range(reps):
        fn()
    return (time.thread_time() - t0) / reps * 1e6


def _ring_ops(ring: AudioRing) -> dict[str, Callable[[], object]]:
    """Read one 1 s chunk through a reader (the STT streamer's step), and cut a
    10 s range by UTC (what the device API does), both near the head."""
    chunk = ring.rate
    reader = ring.open_reader("bench")
    head = ring.head

    def read_chunk() -> None:
        reader.seek(head - chunk)
        reader.read(chunk)

    end_utc = ring.index_to_utc(head) - 30.0

    def cut() -> None:
        ring.read(ring.utc_to_index(end_utc - 10.0), ring.utc_to_index(end_utc))

    return {"read": read_chunk, "cut": cut}


def _naive_cut_ms(minutes: float) -> float:
    """The naive design: every block kept in a list since the start; a range is cut
    from the concatenation of the whole history (ms per cut, best of 3)."""
    block_frames = BENCH_RATE * BLOCK_MS // 1000
    block = np.ones((block_frames, BENCH_CHANNELS), np.int16)
    history = [block.copy() for _ in range(round(minutes * 60 * 1000 / BLOCK_MS))]
    total = len(history) * block_frames
    stop = total - 30 * BENCH_RATE if total > 40 * BENCH_RATE else total
    start = max(0, stop - 10 * BENCH_RATE)
    best = math.inf
    for _ in range(3):
        t0 = time.thread_time()
        np.concatenate(history)[start:stop].copy()
        best = min(best, time.thread_time() - t0)
    return best * 1e3


def measure_ring(sizes: Sizes) -> dict[str, Any]:
    """Per-operation CPU on a ring after a short and after a long capture; batches
    alternate between the two rings so a change in machine load hits both, and
    the best batch of each counts."""
    ops = {"short": _ring_ops(_filled_ring(sizes.ring_short_s)),
           "long": _ring_ops(_filled_ring(sizes.ring_long_s))}
    best: dict[tuple[str, str], float] = {}
    for _ in range(7):
        for age, fns in ops.items():
            for op, fn in fns.items():
                us = _batch_us(fn, sizes.ring_reps)
                best[age, op] = min(best.get((age, op), math.inf), us)
    del ops
    read_s, cut_s = best["short", "read"], best["short", "cut"]
    read_l, cut_l = best["long", "read"], best["long", "cut"]
    m1, m2 = sizes.naive_minutes
    naive1, naive2 = _naive_cut_ms(m1), _naive_cut_ms(m2)
    return {
        "short_seconds": sizes.ring_short_s, "long_seconds": sizes.ring_long_s,
        "read_chunk_us_short": round(read_s, 2), "read_chunk_us_long": round(read_l, 2),
        "read_chunk_ratio": round(read_l / read_s, 3),
        "cut_10s_us_short": round(cut_s, 2), "cut_10s_us_long": round(cut_l, 2),
        "cut_10s_ratio": round(cut_l / cut_s, 3),
        "naive_minutes": [m1, m2],
        "naive_cut_10s_ms_short": round(naive1, 3), "naive_cut_10s_ms_10x": round(naive2, 3),
        "naive_ratio_10x": round(naive2 / naive1, 2),
        # Linear in history: what the naive cut would cost after the long capture.
        "naive_projected_ratio_long": round(sizes.ring_long_s / (m1 * 60), 1),
    }
