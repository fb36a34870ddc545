"""4: resampling quality and cost. Alias rejection of a 10 kHz tone going
48 kHz -> 16 kHz and CPU per audio hour, for every soxr quality the agent offers and
for linear interpolation.

Imports `edge_agent` as an installed library only.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.common import BENCH_RATE, TARGET_REJECTION_DB, Sizes
from edge_agent.audio.resample import (
    CONVERTERS,
    DEFAULT_CONVERTER,
    StreamResampler,
    alias_rejection_db,
    linear_interpolation,
)

__all__ = ["measure_resample"]

def measure_resample(sizes: Sizes) -> dict[str, Any]:
    """Alias rejection of a 10 kHz tone going 48 kHz -> 16 kHz and CPU per audio
    hour (mono, 1 s blocks as the STT streamer feeds them) for every converter."""
    rng = np.random.default_rng(3)
    n = round(sizes.resample_seconds * BENCH_RATE)
    x = (rng.normal(0, 0.1, n)).astype(np.float32).reshape(-1, 1)
    per_hour = 3600 / sizes.resample_seconds
    out: dict[str, dict[str, float]] = {}
    for conv in (*CONVERTERS, "linear"):
        if conv == "linear":
            t0 = time.thread_time()
            linear_interpolation(x, BENCH_RATE, 16000)
        else:
            # Set up once per stream, not per audio hour: left out of the time.
            rs = StreamResampler(BENCH_RATE, 16000, 1, conv)
            t0 = time.thread_time()
            for i in range(0, n, BENCH_RATE):
                rs.process(x[i:i + BENCH_RATE])
            rs.flush()
        cpu = (time.thread_time() - t0) * per_hour
        out[conv] = {"alias_rejection_db": round(alias_rejection_db(conv), 1),
                     "cpu_s_per_audio_hour": round(cpu, 3)}
    default_db = out[DEFAULT_CONVERTER]["alias_rejection_db"]
    return {"default": DEFAULT_CONVERTER, "default_rejection_db": default_db,
            "target_db": TARGET_REJECTION_DB, "target_met": bool(default_db >= TARGET_REJECTION_DB),
            "converters": out}
