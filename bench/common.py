"""What every measurement shares: the result schema, the sizes of a full and a
tiny run, the targets, and small figures of the running process (its CPU time,
the load average, percentiles of a sample).

Measures nothing by itself. Imports `edge_agent` as an installed library only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

__all__ = [
    "AGENT_RUN_WALL_BUDGET",
    "BENCH_CHANNELS",
    "BENCH_RATE",
    "BLOCK_MS",
    "DEFAULT_PI4_RATIO",
    "DEFAULT_PIZERO_RATIO",
    "DEVICE_ID",
    "FULL",
    "HEAP_FLAT_MB",
    "MB",
    "MEASUREMENTS",
    "PYTHON_BLOCKS_FLAT",
    "RESULT_KEYS",
    "SCHEMA_VERSION",
    "TARGET_GROWTH_MB",
    "TARGET_RATIO",
    "TARGET_REJECTION_DB",
    "TINY",
    "WARMUP_SECONDS",
    "BenchError",
    "BenchOptions",
    "Sizes",
    "as_dict",
    "cpu_model",
    "cpu_seconds",
    "downsample",
    "loadavg",
    "spread",
]

#: Bumped when a key of results.json changes meaning or disappears.
SCHEMA_VERSION: Final = 1

#: The keys every full or tiny run writes, section by section (documented in
#: docs/benchmarks.md); tests check them so a later run stays comparable.
RESULT_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "meta": ("schema", "mode", "started_utc", "wall_seconds", "cpu_model", "cores",
             "python", "loadavg_start", "loadavg_end", "audio_file_seconds"),
    "cpu": ("audio_hours", "agent_cpu_s", "agent_cpu_s_per_audio_hour",
            "agent_trio_thread_s_per_audio_hour", "agent_worker_threads_s_per_audio_hour",
            "agent_speed_x_realtime", "opusenc_cpu_s_per_audio_hour",
            "opusenc_stt_s_per_audio_hour", "opusenc_segments_s_per_audio_hour",
            "sox_resample_s_per_audio_hour", "ratio_agent_to_opusenc",
            "ratio_agent_to_opusenc_without_sox", "target_ratio", "target_met",
            "stt_chunks_sent", "stt_dropped", "segments_synced", "lost_frames",
            "backend_cpu_s", "realtime_audio_seconds", "realtime_agent_cpu_s_per_audio_hour",
            "realtime_trio_thread_s_per_audio_hour", "realtime_ratio_agent_to_opusenc",
            "realtime_block_100ms_cpu_s_per_audio_hour",
            "realtime_block_100ms_trio_thread_s_per_audio_hour",
            "realtime_block_100ms_ratio_agent_to_opusenc", "trio_timer_wakeup_us"),
    "memory": ("audio_hours", "ring_bytes", "peak_rss_mb", "reference_hours",
               "rss_mb_at_reference", "rss_mb_at_end", "growth_mb", "growth_mb_per_hour",
               "projected_growth_mb_12h", "target_growth_mb", "target_met",
               "heap_in_use_mb_at_reference", "heap_in_use_mb_at_end", "heap_in_use_growth_mb",
               "heap_free_growth_mb", "python_blocks_at_reference", "python_blocks_growth"),
    "ring": ("short_seconds", "long_seconds", "read_chunk_us_short", "read_chunk_us_long",
             "read_chunk_ratio", "cut_10s_us_short", "cut_10s_us_long", "cut_10s_ratio",
             "naive_cut_10s_ms_short", "naive_cut_10s_ms_10x", "naive_ratio_10x",
             "naive_projected_ratio_long"),
    "resample": ("default", "default_rejection_db", "target_db", "target_met", "converters"),
    "latency": ("method", "backend", "seconds", "fixed", "vad"),
    "drain": ("segments", "segment_seconds", "audio_hours", "recover_seconds",
              "drain_seconds", "segments_per_second", "mb_per_second",
              "audio_hours_per_minute", "cpu_percent_mean", "cpu_percent_max",
              "ring_overruns", "lost_frames", "capture_gaps", "capture_late_ms_max",
              "all_synced"),
    "pi": ("assumption", "basis", "boards"),
    "realtime": ("c_tools_cpu_s_per_audio_hour", "sox_cpu_s_per_audio_hour",
                 "opusenc_stt_cpu_s_per_audio_hour", "opusenc_segments_cpu_s_per_audio_hour",
                 "stt_complexity", "segments_complexity", "before", "blocks", "target_ratio",
                 "ratio_met", "trio_thread_factor", "trio_factor_met", "startup"),
    "complexity": ("audio_seconds", "passes", "rule", "max_snr_loss_db", "max_lsd_growth_db",
                   "sample_words", "sample_shifts_ms", "uncompressed_word_accuracy",
                   "encoders", "measured_utc", "wall_seconds"),
}

# The capture format of the CPU, memory and drain runs: what the issue specifies.
BENCH_RATE: Final = 48000
BENCH_CHANNELS: Final = 2
BLOCK_MS: Final = 20
DEVICE_ID: Final = "bench-0001"
MB: Final = 1024 * 1024
TARGET_RATIO: Final = 1.3
TARGET_GROWTH_MB: Final = 2.0
TARGET_REJECTION_DB: Final = 90.0
# Single-core speed of this kind of x86 core relative to the boards: an
# assumption (public single-thread benchmarks put a current server/desktop core
# at roughly 5-6x a Pi 4's Cortex-A72 and 8-12x a Pi Zero 2 W's Cortex-A53).
DEFAULT_PI4_RATIO: Final = 6.0
DEFAULT_PIZERO_RATIO: Final = 10.0
# Wall seconds the default full run gives the fast agent run (the rest of the
# measurements take about three minutes; the whole run must stay under ten).
AGENT_RUN_WALL_BUDGET: Final = 330.0
# Heap-in-use change (MB) below which memory counts as flat (allocator noise).
HEAP_FLAT_MB: Final = 0.5
# Growth of Python's allocated blocks below which they count as flat (~1 MB of objects).
PYTHON_BLOCKS_FLAT: Final = 10_000
# Audio seconds after which an agent run counts as warmed up (real-time CPU window).
WARMUP_SECONDS: Final = 2.0


class BenchError(Exception):
    """A measurement could not be made (missing tool, a worker failed)."""


@dataclass
class BenchOptions:
    """What to run and where to write it."""

    tiny: bool = False
    hours: float | None = None  # audio hours of the CPU/memory run (None: mode default)
    results: Path = Path("bench/results.json")
    report: Path = Path("docs/benchmarks.md")
    only: frozenset[str] | None = None
    work_dir: Path | None = None
    keep: bool = False
    profile: bool = False
    pi4_ratio: float = DEFAULT_PI4_RATIO
    pizero_ratio: float = DEFAULT_PIZERO_RATIO
    drain_segments: int | None = None


@dataclass
class Sizes:
    """How much of everything one mode measures."""

    audio_file_seconds: float
    hours: float
    opusenc_reps: int
    ring_short_s: float
    ring_long_s: float
    ring_reps: int
    naive_minutes: tuple[float, float]
    resample_seconds: float
    latency_seconds: float
    drain_segments: int
    drain_segment_seconds: float
    realtime_seconds: float
    realtime_reps: int  # runs of the agent at the default block (the least CPU is kept)
    startup_reps: int


FULL = Sizes(audio_file_seconds=300, hours=1.5, opusenc_reps=1, ring_short_s=60,
            ring_long_s=12 * 3600, ring_reps=300, naive_minutes=(1, 10),
            resample_seconds=60, latency_seconds=30, drain_segments=1440,
            drain_segment_seconds=60, realtime_seconds=120, realtime_reps=3,
            startup_reps=3)
TINY = Sizes(audio_file_seconds=12, hours=20 / 3600, opusenc_reps=1, ring_short_s=60,
            ring_long_s=12 * 3600, ring_reps=20, naive_minutes=(0.5, 5),
            resample_seconds=2, latency_seconds=5, drain_segments=8,
            drain_segment_seconds=5, realtime_seconds=4, realtime_reps=1,
            startup_reps=1)
MEASUREMENTS: Final = ("realtime", "cpu", "ring", "resample", "latency", "drain", "complexity")


def cpu_seconds() -> float:
    """CPU time of this process so far, all threads, user + system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def spread(values: list[float]) -> dict[str, float]:
    """p50 / p95 / max of a sample (zeros when empty), rounded to milliseconds' tenths."""
    if not values:
        return {"p50": 0.0, "p95": 0.0, "max": 0.0, "n": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": round(float(np.percentile(arr, 50)), 4),
            "p95": round(float(np.percentile(arr, 95)), 4),
            "max": round(float(arr.max()), 4), "n": len(values)}


def downsample(points: list[Any], limit: int = 300) -> list[Any]:
    if len(points) <= limit:
        return points
    step = len(points) / limit
    picked = [points[int(i * step)] for i in range(limit)]
    return [*picked, points[-1]]


def as_dict(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(obj).items()
            if isinstance(v, int | float | str | bool) or v is None}
