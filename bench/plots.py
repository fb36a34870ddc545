"""The report's PNG plots (memory over uptime, CPU split, latency CDFs,
resampling quality against cost, backlog drain), drawn with matplotlib (the
optional `bench` extra); without it the plots are skipped with a note.

Measures nothing. Imports nothing of `edge_agent`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import MB, TARGET_REJECTION_DB

__all__ = ["write_plots"]

def _pyplot() -> Any:
    """matplotlib's pyplot (the optional `bench` extra) with a file-only backend."""
    mpl = importlib.import_module("matplotlib")
    mpl.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def write_plots(results: dict[str, Any], out_dir: Path) -> tuple[dict[str, str], str | None]:
    """PNG plots next to the report; returns ({name: file name}, note when skipped)."""
    try:
        plt = _pyplot()
    except ImportError:
        return {}, ("plots skipped: matplotlib is not installed (install the `bench` extra: "
                    "uv sync --extra bench)")
    series = results.get("series", {})
    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made[name.removeprefix("bench-").removesuffix(".png")] = name

    if "rss" in series:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        xs = [pt[0] for pt in series["rss"]]
        ys = [pt[1] for pt in series["rss"]]
        ax.plot(xs, ys, lw=1.2, label="RSS")
        if all(pt[2] is not None for pt in series["rss"]):
            ax.plot(xs, [pt[2] for pt in series["rss"]], lw=1.0,
                    label="malloc: in use (ring included)")
        ring_mb = results["memory"]["ring_bytes"] / MB
        ax.axhline(ring_mb, color="grey", ls="--", lw=0.8, label=f"ring {ring_mb:.1f} MB")
        ax.set_xlabel("audio hours processed")
        ax.set_ylabel("RSS (MB)")
        ax.set_title("Agent RSS over uptime (fast run)")
        ax.set_ylim(0, max(ys) * 1.15)
        ax.legend(loc="lower right")
        save(fig, "bench-memory.png")
    if "cpu" in results:
        c = results["cpu"]
        fig, ax = plt.subplots(figsize=(7, 3.4))
        trio_t = c["agent_trio_thread_s_per_audio_hour"]
        workers = c["agent_worker_threads_s_per_audio_hour"]
        ax.barh(["agent"], [trio_t], color="#4c72b0", label="agent: Trio thread")
        ax.barh(["agent"], [workers], left=[trio_t], color="#8fb0d8",
                label="agent: worker threads (Opus, disk)")
        left = 0.0
        for key, label, colour in (("sox_resample_s_per_audio_hour", "sox resample", "#c44e52"),
                                   ("opusenc_stt_s_per_audio_hour", "opusenc STT", "#dd8452"),
                                   ("opusenc_segments_s_per_audio_hour", "opusenc segments",
                                    "#f2c48d")):
            ax.barh(["opusenc + sox"], [c[key]], left=[left], color=colour, label=label)
            left += c[key]
        ax.set_xlabel("CPU seconds per audio hour")
        ax.set_title(f"Both encodes: agent / C tools = {c['ratio_agent_to_opusenc']:.2f}")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=3)
        save(fig, "bench-cpu.png")
    if "latency" in series:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for key, label in (("fixed_to_request", "fixed 2 s: to request"),
                           ("fixed_to_transcript", "fixed 2 s: to transcript"),
                           ("vad_to_request", "VAD: to request"),
                           ("vad_to_transcript", "VAD: to transcript")):
            vals = sorted(series["latency"].get(key, []))
            if vals:
                ax.plot(vals, np.linspace(0, 1, len(vals)), label=label,
                        ls="-" if "request" in key else "--")
        ax.set_xlabel("seconds from a block's capture")
        ax.set_ylabel("fraction of blocks")
        ax.set_title("STT latency per 20 ms block (real-time source, loopback backend)")
        ax.legend(fontsize=8)
        save(fig, "bench-latency.png")
    if "resample" in results:
        conv = results["resample"]["converters"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, v in conv.items():
            ax.scatter(v["cpu_s_per_audio_hour"], v["alias_rejection_db"], s=30)
            ax.annotate(name, (v["cpu_s_per_audio_hour"], v["alias_rejection_db"]),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.axhline(TARGET_REJECTION_DB, color="grey", ls="--", lw=0.8)
        ax.set_xlim(left=0)
        ax.set_xlabel("CPU s per audio hour (48 kHz -> 16 kHz mono)")
        ax.set_ylabel("alias rejection (dB)")
        ax.set_title("Resampling: quality against cost")
        save(fig, "bench-resample.png")
    if "drain" in series:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ts = [pt[0] for pt in series["drain"]]
        ax.plot(ts, [pt[1] for pt in series["drain"]], label="segments synced")
        ax.set_xlabel("seconds since the agent started")
        ax.set_ylabel("segments synced")
        ax2 = ax.twinx()
        ax2.plot(ts, [pt[2] for pt in series["drain"]], color="#c44e52", lw=0.8,
                 label="agent CPU % (over 0.5 s)")
        ax2.set_ylabel("CPU %")
        ax2.set_ylim(0, 110)
        ax.set_title("Backlog drain after a simulated 24 h outage")
        fig.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.1, 0.88))
        save(fig, "bench-drain.png")
    return made, None
