"""1: CPU per audio hour. The whole agent over hours of audio as fast as its
pipeline goes (`agent_run`, in a worker process; it also samples the RSS that
`bench.memory` judges), against ``sox`` + ``opusenc`` doing the same two encodes
of the same file (`measure_opusenc`); the same agent paced at real time
(`add_realtime_cpu`), the cost of one timed Trio wake-up, and a cProfile of the
Trio thread. CPU is process CPU time (user + system), never wall time.

Imports `edge_agent` as an installed library only.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time
import wave
from pathlib import Path
from typing import Any

import trio

from bench.common import (
    BENCH_RATE,
    BLOCK_MS,
    MB,
    TARGET_RATIO,
    WARMUP_SECONDS,
    as_dict,
    cpu_seconds,
    downsample,
)
from bench.complexity import default_complexities, opusenc_comp_args
from bench.memory import MemorySamples, heap_mb, peak_rss_bytes, rss_bytes
from bench.procs import require_tool, run_tool
from bench.workload import agent_config, capped_source
from edge_agent.agent import Agent

__all__ = ["add_realtime_cpu", "agent_run", "cpu_result", "measure_opusenc", "trio_wakeup_us"]

async def agent_run(p: dict[str, Any]) -> dict[str, Any]:
    """Child process: the whole agent over `hours` of audio as fast as the pipeline
    goes; CPU of the process and RSS against audio hours."""
    config = agent_config(Path(p["data_dir"]), Path(p["wav"]), p["backend_url"],
                          realtime=bool(p.get("realtime")),
                          stt={"chunking": "fixed", "chunk_seconds": 5.0},
                          block_ms=p.get("block_ms", BLOCK_MS))
    source = capped_source(config, p["hours"] * 3600)
    agent = Agent(config, source=source)
    ring, stt, spool = agent.ring, agent.stt, agent.spool
    assert stt is not None and spool is not None and agent.uploader is not None
    half_ring = ring.capacity // 2
    half_backlog = config.stt.backlog_seconds / 2

    def hold() -> bool:
        lag = max((r.lag for r in ring.readers()), default=0)
        return (lag > half_ring or stt.statistics().backlog_seconds > half_backlog
                or spool.stats.pending_segments > 5)

    source.hold = hold
    if p.get("max_wall_s"):
        source.deadline = trio.current_time() + p["max_wall_s"]
    samples = MemorySamples()
    profiler = cProfile.Profile(time.thread_time) if p.get("profile") else None
    cpu0, thread0, wall0 = cpu_seconds(), time.thread_time(), time.monotonic()
    if profiler is not None:
        profiler.enable()

    # The steady-state window: from WARMUP_SECONDS of audio (clients, encoders and
    # threads exist by then) to the end of capture, on the Trio thread.
    window: dict[str, float] = {}

    def mark(prefix: str) -> None:
        window.update({f"{prefix}_cpu": cpu_seconds(), f"{prefix}_thread": time.thread_time(),
                       f"{prefix}_frames": float(ring.head)})

    def sample() -> list[float | None]:
        return [ring.head / ring.rate / 3600, rss_bytes() / MB, *heap_mb(),
                float(sys.getallocatedblocks())]

    async def sample_rss() -> None:
        while True:
            samples.add(sample())
            if "start_cpu" not in window and ring.head >= WARMUP_SECONDS * ring.rate:
                mark("start")
            await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        sampler = trio.CancelScope()

        async def sampling() -> None:
            with sampler:
                await sample_rss()

        nursery.start_soon(sampling)
        await agent.capture_finished.wait()
        mark("end")
        with trio.move_on_after(120):
            await stt.wait_idle()
        # Let the segmenter catch up too: stopping seals within a short grace time.
        for _ in range(2400):
            if max((r.lag for r in ring.readers()), default=0) <= ring.rate:
                break
            await trio.sleep(0.05)
        samples.add(sample(), last=True)
        agent.stop()
        sampler.cancel()
    with trio.move_on_after(120):
        await agent.uploader.drain()
    if profiler is not None:
        profiler.disable()
    cpu = cpu_seconds() - cpu0
    trio_thread = time.thread_time() - thread0
    wall = time.monotonic() - wall0
    result: dict[str, Any] = {
        "audio_seconds": ring.head / ring.rate, "cpu_s": cpu, "trio_thread_cpu_s": trio_thread,
        "wall_s": wall, "peak_rss_mb": peak_rss_bytes() / MB, "ring_bytes": ring.nbytes,
        "rss": downsample(samples.rows(), 400), "stt": as_dict(stt.statistics()),
        "segmenter": as_dict(agent.segmenter.stats) if agent.segmenter else {},
        "uploader": as_dict(agent.uploader.stats), "spool": as_dict(spool.stats),
        "source": as_dict(source.stats),
    }
    if "start_cpu" in window:
        result["window"] = {
            "audio_seconds": (window["end_frames"] - window["start_frames"]) / ring.rate,
            "cpu_s": window["end_cpu"] - window["start_cpu"],
            "trio_thread_cpu_s": window["end_thread"] - window["start_thread"]}
    if profiler is not None:
        result["profile"] = _profile_top(profiler, 25)
    return result


def _short_source(filename: str) -> str:
    """A source file named without the paths of the machine that ran the profile."""
    for marker in ("site-packages/", "/lib/python3"):
        if marker in filename:
            rest = filename.rpartition(marker)[2]
            return rest if marker == "site-packages/" else "stdlib/" + rest.partition("/")[2]
    for package in ("edge_agent/", "bench/"):
        if package in filename:
            return package + filename.rpartition(package)[2]
    return filename if filename.startswith(("~", "<")) else os.path.basename(filename)


def _profile_top(profiler: cProfile.Profile, n: int) -> list[dict[str, Any]]:
    """The functions with the most own time on the Trio thread."""
    st = pstats.Stats(profiler)
    rows: list[dict[str, Any]] = []
    entries: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in entries.items():
        where = _short_source(filename)
        rows.append({"function": f"{where}:{line}({name})", "calls": ncalls,
                     "own_s": round(tottime, 3), "cumulative_s": round(cumtime, 3)})
    rows.sort(key=lambda r: r["own_s"], reverse=True)
    return rows[:n]


def measure_opusenc(wav: Path, work: Path, reps: int) -> dict[str, float]:
    """CPU of the C tools doing the agent's two encodes of the same audio.

    STT: ``sox`` resamples and mixes to 16 kHz mono (the agent does this too, so
    it is counted), then ``opusenc --bitrate 24``; segments: ``opusenc --bitrate
    32`` on the 48 kHz stereo file; each at the complexity the agent's encoder
    uses by default (``--comp``). Per audio hour, the minimum over `reps`.
    """
    opusenc, sox = require_tool("opusenc"), require_tool("sox")
    with wave.open(str(wav), "rb") as w:
        seconds = w.getnframes() / w.getframerate()
    mono16 = work / "stt-16k-mono.wav"
    runs: dict[str, list[float]] = {"sox": [], "stt": [], "seg": []}
    for _ in range(reps):
        runs["sox"].append(run_tool([sox, "-q", str(wav), "-r", "16000", "-c", "1", "-b", "16",
                                     str(mono16)]))
        runs["stt"].append(run_tool([opusenc, "--quiet", "--bitrate", "24",
                                     *opusenc_comp_args("stt"), str(mono16),
                                     str(work / "stt.opus")]))
        runs["seg"].append(run_tool([opusenc, "--quiet", "--bitrate", "32",
                                     *opusenc_comp_args("segments"), str(wav),
                                     str(work / "segments.opus")]))
    per_hour = 3600 / seconds
    return {k: min(v) * per_hour for k, v in runs.items()}


def cpu_result(run: dict[str, Any], opus: dict[str, float], backend_cpu: float,
               ) -> dict[str, Any]:
    hours = run["audio_seconds"] / 3600
    agent = run["cpu_s"] / hours
    trio_thread = run["trio_thread_cpu_s"] / hours
    c_tools = opus["sox"] + opus["stt"] + opus["seg"]
    ratio = agent / c_tools
    stt, seg, up = run["stt"], run["segmenter"], run["uploader"]
    return {
        "audio_hours": round(hours, 4), "agent_cpu_s": round(run["cpu_s"], 2),
        "agent_cpu_s_per_audio_hour": round(agent, 2),
        "agent_trio_thread_s_per_audio_hour": round(trio_thread, 2),
        "agent_worker_threads_s_per_audio_hour": round(agent - trio_thread, 2),
        "agent_speed_x_realtime": round(run["audio_seconds"] / run["wall_s"], 1),
        "opusenc_cpu_s_per_audio_hour": round(c_tools, 2),
        "opusenc_stt_s_per_audio_hour": round(opus["stt"], 2),
        "opusenc_segments_s_per_audio_hour": round(opus["seg"], 2),
        "sox_resample_s_per_audio_hour": round(opus["sox"], 2),
        "ratio_agent_to_opusenc": round(ratio, 3),
        "ratio_agent_to_opusenc_without_sox": round(agent / (opus["stt"] + opus["seg"]), 3),
        "target_ratio": TARGET_RATIO, "target_met": bool(ratio <= TARGET_RATIO),
        "stt_chunks_sent": stt.get("chunks_sent", 0),
        "stt_dropped": stt.get("dropped_overflow", 0) + stt.get("dropped_stale", 0)
        + stt.get("dropped_rejected", 0) + stt.get("bad_responses", 0),
        "segments_synced": up.get("successes", 0) + up.get("already_present", 0),
        "lost_frames": seg.get("lost_frames", 0) + round(stt.get("seconds_lost", 0.0)
                                                         * BENCH_RATE),
        "backend_cpu_s": round(backend_cpu, 2),
        "opus_complexity": default_complexities(),  # both sides (opusenc --comp)
    }


def add_realtime_cpu(cpu: dict[str, Any], rt: dict[str, Any], block_ms: int) -> None:
    """The same agent with its source paced at real time: every capture block wakes
    the readers, which the fast run amortises over larger reads. With the default
    block the keys are `realtime_*`; with another, `realtime_block_<ms>ms_*`."""
    # Steady state only: start-up (HTTP clients, TLS contexts, threads) would weigh
    # heavily on a run of seconds.
    w = rt.get("window") or rt
    hours = w["audio_seconds"] / 3600
    per_hour = w["cpu_s"] / hours
    ratio = round(per_hour / cpu["opusenc_cpu_s_per_audio_hour"], 3)
    if block_ms != BLOCK_MS:
        cpu[f"realtime_block_{block_ms}ms_cpu_s_per_audio_hour"] = round(per_hour, 2)
        cpu[f"realtime_block_{block_ms}ms_trio_thread_s_per_audio_hour"] = round(
            w["trio_thread_cpu_s"] / hours, 2)
        cpu[f"realtime_block_{block_ms}ms_ratio_agent_to_opusenc"] = ratio
        return
    cpu["realtime_audio_seconds"] = round(w["audio_seconds"], 1)
    cpu["realtime_agent_cpu_s_per_audio_hour"] = round(per_hour, 2)
    cpu["realtime_trio_thread_s_per_audio_hour"] = round(w["trio_thread_cpu_s"] / hours, 2)
    cpu["realtime_ratio_agent_to_opusenc"] = ratio


def trio_wakeup_us(count: int = 50) -> float:
    """CPU microseconds one timed Trio wake-up (a sleep of 20 ms) costs here: the
    floor under every per-block cost of a real-time run."""

    async def wakes() -> float:
        t0, c0 = trio.current_time(), time.thread_time()
        for i in range(1, count + 1):
            await trio.sleep_until(t0 + i * BLOCK_MS / 1000)
        return (time.thread_time() - c0) / count * 1e6

    return float(trio.run(wakes))
