"""2: memory over uptime. The resident set size and glibc's heap figures of the
agent process, sampled by the CPU run (`bench.cpu.agent_run`) against the audio
hours processed, and the verdict drawn from them: growth from a reference point
to the end, its least-squares slope, and whether malloc's memory in use grows
(objects piling up) or only what it keeps free (allocator retention).

Imports `edge_agent` as an installed library only (here: nothing of it).
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
from typing import Any

import numpy as np

from bench.common import MB, TARGET_GROWTH_MB

__all__ = ["MemorySamples", "heap_mb", "memory_result", "peak_rss_bytes", "rss_bytes"]

def rss_bytes() -> int:
    """Resident set size now, from /proc/self/statm."""
    with open("/proc/self/statm", "rb") as f:
        resident = int(f.read().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@functools.cache
def _mallinfo2() -> Any:
    """glibc's mallinfo2 (2.33+), or None elsewhere."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


def heap_mb() -> tuple[float | None, float | None]:
    """(bytes malloc has handed out and not got back, bytes it holds free) in MB:
    RSS growing while the first stays flat is allocator retention, not a leak.
    None without glibc."""
    fn = _mallinfo2()
    if fn is None:
        return None, None
    info = fn()
    return (info.uordblks + info.hblkhd) / MB, info.fordblks / MB


class MemorySamples:
    """Samples of a run of any length in a fixed, preallocated table: when it is
    full, every other row goes and only every second sample after that is kept.
    The sampler must not grow the heap it measures: a list that took a sample
    every 0.2 s grew by 25,000 samples (about 5 MB) over a 12 h run, and read as
    the agent's growth.

    Args:
        capacity: rows held at most.
        width: values per sample (None is held as NaN).
    """

    def __init__(self, capacity: int = 1024, width: int = 5) -> None:
        self._rows = np.full((capacity, width), np.nan)
        self._count = 0
        self._every = 1  # keep one sample in this many
        self._offered = 0

    def add(self, row: list[float | None], *, last: bool = False) -> None:
        """Offer a sample; kept when it falls on the current spacing, or `last`."""
        self._offered += 1
        if self._offered % self._every and not last:
            return
        if self._count == len(self._rows):
            kept = (self._count + 1) // 2
            self._rows[:kept] = self._rows[: self._count : 2]
            self._rows[kept:] = np.nan
            self._count = kept
            self._every *= 2
        self._rows[self._count] = [np.nan if v is None else v for v in row]
        self._count += 1

    def rows(self) -> list[list[float | None]]:
        return [[None if np.isnan(v) else float(v) for v in row]
                for row in self._rows[: self._count]]


def peak_rss_bytes() -> int:
    """The largest resident set size this process had (VmHWM)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_result(run: dict[str, Any]) -> dict[str, Any]:
    rss: list[list[Any]] = run["rss"]
    hours = run["audio_seconds"] / 3600
    # RSS at 1 h against the end, or at half the run when it is shorter than 2 h.
    ref_h = 1.0 if hours >= 2 else hours / 2
    ref = min(rss, key=lambda s: abs(s[0] - ref_h))
    end = rss[-1][1]
    tail = [s for s in rss if s[0] >= ref[0]]
    span = tail[-1][0] - tail[0][0] if tail else 0.0

    def slope(i: int) -> float | None:
        """Least-squares MB per audio hour of column `i` from the reference on."""
        if len(tail) < 3 or span <= 0 or any(s[i] is None for s in tail):
            return None
        return float(np.polyfit([s[0] for s in tail], [s[i] for s in tail], 1)[0])

    rss_slope = slope(1) or 0.0
    growth = end - ref[1]
    # The heap in use jumps by the buffers in flight at the sampled instant, so its
    # change is the fitted one over the window, not the difference of two samples.
    heap_slope, free_slope = slope(2), slope(3)

    def change(rate: float | None) -> float | None:
        return None if rate is None else round(rate * span, 3)

    return {
        "audio_hours": round(hours, 4), "ring_bytes": run["ring_bytes"],
        "peak_rss_mb": round(run["peak_rss_mb"], 2), "reference_hours": round(ref[0], 4),
        "rss_mb_at_reference": round(ref[1], 2), "rss_mb_at_end": round(end, 2),
        "growth_mb": round(growth, 3), "growth_mb_per_hour": round(rss_slope, 4),
        "projected_growth_mb_12h": round(max(growth, 0.0) + max(rss_slope, 0.0)
                                         * max(0.0, 12 - hours), 3),
        "target_growth_mb": TARGET_GROWTH_MB,
        "target_met": bool(growth < TARGET_GROWTH_MB),
        "heap_in_use_mb_at_reference": ref[2], "heap_in_use_mb_at_end": rss[-1][2],
        "heap_in_use_growth_mb": change(heap_slope), "heap_free_growth_mb": change(free_slope),
        "python_blocks_at_reference": ref[4],
        "python_blocks_growth": None if (b := change(slope(4))) is None else round(b),
    }
