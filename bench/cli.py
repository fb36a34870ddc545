"""`scripts/bench` (``python -m bench``): parses the options, runs the chosen
measurements in order (each agent measurement in worker processes against its
own reference backend), writes ``results.json`` and the report, prints the
table. The worker processes come back in here through hidden options.

Imports `edge_agent` as an installed library only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from bench.common import (
    AGENT_RUN_WALL_BUDGET,
    BLOCK_MS,
    DEFAULT_PI4_RATIO,
    DEFAULT_PIZERO_RATIO,
    FULL,
    MEASUREMENTS,
    SCHEMA_VERSION,
    TINY,
    BenchError,
    BenchOptions,
    cpu_model,
    loadavg,
)
from bench.complexity import measure_complexity
from bench.cpu import add_realtime_cpu, agent_run, cpu_result, measure_opusenc, trio_wakeup_us
from bench.drain import drain_result, drain_run
from bench.latency import latency_result, latency_run
from bench.memory import memory_result
from bench.pi import project_pi
from bench.plots import write_plots
from bench.procs import Job, serve_backend
from bench.realtime import (
    BLOCKS_MS,
    least_cpu,
    make_mono,
    measure_c_tools,
    measure_c_tools_realtime,
    measure_startup,
    pi_basis,
    realtime_result,
    realtime_run,
)
from bench.report import print_table, write_report
from bench.resample import measure_resample
from bench.ring import measure_ring
from bench.workload import make_bench_audio

__all__ = ["main", "run_bench"]

@contextlib.contextmanager
def _work_dir(opts: BenchOptions) -> Iterator[Path]:
    if opts.work_dir is not None:
        opts.work_dir.mkdir(parents=True, exist_ok=True)
        yield opts.work_dir
        return
    path = Path(tempfile.mkdtemp(prefix="edge-agent-bench-"))
    try:
        yield path
    finally:
        if not opts.keep:
            shutil.rmtree(path, ignore_errors=True)


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Run the measurements, write results.json and the report; return the results."""
    sizes = dataclasses.replace(TINY if opts.tiny else FULL)
    if opts.hours is not None:
        sizes.hours = opts.hours
    if opts.drain_segments is not None:
        sizes.drain_segments = opts.drain_segments
    todo = set(MEASUREMENTS if opts.only is None else opts.only)
    started = time.monotonic()
    results: dict[str, Any] = {"meta": {
        "schema": SCHEMA_VERSION, "mode": "tiny" if opts.tiny else "full",
        "started_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": cpu_model(), "cores": os.cpu_count() or 1,
        "python": platform.python_version(), "loadavg_start": loadavg(),
        "audio_file_seconds": sizes.audio_file_seconds,
    }}
    series: dict[str, Any] = {}
    with _work_dir(opts) as work:
        _say(f"work dir {work}; worker logs in {work / 'bench.log'}")
        wav = make_bench_audio(work / "bench-48k-stereo.wav", sizes.audio_file_seconds)
        if "realtime" in todo:
            _say(f"the agent at real time, default config: {sizes.realtime_seconds:g} s per "
                 f"block size {', '.join(map(str, BLOCKS_MS))} ms, against sox + opusenc")
            mono = make_mono(wav, work / "bench-48k-mono.wav")
            # One run at a time, each side alone on the machine, and the least CPU of
            # several runs on both sides: side by side, runs slow each other down.
            c_tools = measure_c_tools(mono, work, max(3, sizes.opusenc_reps))
            runs, c_realtime = {}, {}
            for block in BLOCKS_MS:
                reps = sizes.realtime_reps if block == BLOCKS_MS[0] else 1
                c_realtime[block] = min(
                    (measure_c_tools_realtime(mono, work, block, sizes.realtime_seconds)
                     for _ in range(reps)), key=lambda c: sum(c.values()))
                tries = [Job("realtime", {"wav": str(mono), "block_ms": block,
                                          "seconds": sizes.realtime_seconds},
                             work, f"rt-{block}ms-{i}", sizes.realtime_seconds + 300).finish()[0]
                         for i in range(reps)]
                runs[block] = least_cpu(tries)
            _say("start-up CPU: config check, --help, run to ready")
            results["realtime"] = realtime_result(
                runs, c_tools, c_realtime, measure_startup(work, sizes.startup_reps))
        if "cpu" in todo:
            _say("C tools: sox + opusenc on the benchmark audio")
            opus = measure_opusenc(wav, work, sizes.opusenc_reps)
            _say(f"whole agent over {sizes.hours:g} h of audio, as fast as it goes")
            run, backend_cpu = Job("agent", {
                "wav": str(wav), "hours": sizes.hours,
                # Without an explicit --hours, the whole run must fit in 10 minutes.
                "max_wall_s": None if opts.hours is not None or opts.tiny
                else AGENT_RUN_WALL_BUDGET}, work, "cpu", 3600 * 4).finish()
            results["cpu"] = cpu_result(run, opus, backend_cpu)
            results["memory"] = memory_result(run)
            series["rss"] = run["rss"]
        if "ring" in todo:
            _say("ring: per-chunk cost after a short and a long capture")
            results["ring"] = measure_ring(sizes)
        if "resample" in todo:
            _say("resampling: alias rejection and cost per converter")
            results["resample"] = measure_resample(sizes)
        if "latency" in todo:
            # Two real-time runs side by side (each with its own backend): latency,
            # and the CPU run's agent in real time, whose per-block wake-ups the
            # fast run amortises.
            _say(f"latency and real-time CPU: {sizes.latency_seconds:g} s of real-time capture")
            lat_job = Job("latency", {"wav": str(wav), "seconds": sizes.latency_seconds},
                          work, "latency", sizes.latency_seconds + 300)
            rt_jobs = {block: Job("agent", {"wav": str(wav), "realtime": True,
                                            "hours": sizes.latency_seconds / 3600,
                                            "block_ms": block}, work, f"realtime-{block}ms",
                                  sizes.latency_seconds + 300)
                       for block in ((BLOCK_MS, 100) if "cpu" in results else ())}
            # Where the Trio thread's time goes in real time (cProfile slows that run).
            prof_job = (Job("agent", {"wav": str(wav), "realtime": True, "profile": True,
                                      "hours": sizes.latency_seconds / 3600}, work, "profile",
                            sizes.latency_seconds + 300)
                        if "cpu" in results and (opts.profile or not opts.tiny) else None)
            lat, _ = lat_job.finish()
            if prof_job is not None:
                series["profile"] = prof_job.finish()[0]["profile"]
            for block, job in rt_jobs.items():
                rt, _ = job.finish()
                add_realtime_cpu(results["cpu"], rt, block)
            if "cpu" in results:
                results["cpu"]["trio_timer_wakeup_us"] = round(trio_wakeup_us(), 1)
            results["latency"] = latency_result(lat)
            series["latency"] = {f"{m}_{k.removeprefix('samples_')}": lat[m][k]
                                 for m in ("fixed", "vad")
                                 for k in ("samples_to_request", "samples_to_transcript")}
        if "realtime" in results:  # a device runs in real time: project from that run
            results["pi"] = project_pi(pi_basis(results["realtime"]), opts.pi4_ratio,
                                       opts.pizero_ratio)
        elif "cpu" in results:
            results["pi"] = project_pi(results["cpu"], opts.pi4_ratio, opts.pizero_ratio)
        if "drain" in todo:
            _say(f"drain: {sizes.drain_segments} sealed segments to the backend")
            dr, _ = Job("drain", {"wav": str(wav), "segments": sizes.drain_segments,
                                  "segment_seconds": sizes.drain_segment_seconds,
                                  "timeout": 900}, work, "drain", 1200).finish()
            results["drain"] = drain_result(dr, sizes.drain_segment_seconds)
            series["drain"] = dr["progress"]
        if "complexity" in todo:
            _say("Opus complexity 10..0: encode CPU, word accuracy, fidelity")
            results["complexity"] = measure_complexity(wav, opts.tiny)
        results["meta"]["loadavg_end"] = loadavg()
        results["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
        results["series"] = series
        results = _with_earlier(results, opts)
        opts.results.parent.mkdir(parents=True, exist_ok=True)
        opts.results.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        plots, note = write_plots(results, opts.report.parent)
        write_report(results, opts.report, plots, note)
        if note:
            _say(note)
    return results


def _with_earlier(results: dict[str, Any], opts: BenchOptions) -> dict[str, Any]:
    """With ``--only``, the sections this run did not measure kept from the earlier
    results file (same schema and mode), so the report still shows them; the
    earlier meta stays and notes when each section was measured again."""
    if opts.only is None:
        return results
    try:
        earlier = json.loads(opts.results.read_text(encoding="utf-8"))
        meta = earlier["meta"]
    except (OSError, ValueError, KeyError, TypeError):
        return results
    if (meta.get("schema"), meta.get("mode")) != (SCHEMA_VERSION, results["meta"]["mode"]):
        return results
    merged = {**earlier, **{k: v for k, v in results.items() if k not in ("meta", "series")}}
    merged["series"] = {**earlier.get("series", {}), **results["series"]}
    remeasured = {**meta.get("remeasured", {}),
                  **dict.fromkeys(sorted(opts.only), results["meta"]["started_utc"])}
    merged["meta"] = {**meta, "remeasured": remeasured}
    return merged


def _worker_main(kind: str) -> int:
    """Entry of a measurement child process: params on stdin, JSON to params["out"]."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    params = json.loads(sys.stdin.read())
    runners = {"agent": agent_run, "latency": latency_run, "drain": drain_run,
               "realtime": realtime_run}
    result = trio.run(runners[kind], params)
    Path(params["out"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Measure the agent: CPU against opusenc, memory over uptime, per-chunk "
        "cost, resampling, latency, backlog drain, Pi projection, Opus complexity. Writes "
        "results.json and the Markdown report with plots.")
    p.add_argument("--tiny", action="store_true",
                   help="seconds of audio everywhere (CI: checks that it runs, not the numbers)")
    p.add_argument("--hours", type=float,
                   help=f"audio hours of the CPU/memory run (default {FULL.hours:g}; "
                   "tiny: 20 s)")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(MEASUREMENTS)}; "
                   "the other sections of an earlier --results file are kept")
    p.add_argument("--results", type=Path, default=Path("bench/results.json"),
                   help="where to write the JSON (default: bench/results.json)")
    p.add_argument("--report", type=Path, default=Path("docs/benchmarks.md"),
                   help="the Markdown report; plots go beside it (default: docs/benchmarks.md)")
    p.add_argument("--work-dir", type=Path, help="scratch directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--profile", action="store_true",
                   help="profile the Trio thread in tiny mode too (the full run always does)")
    p.add_argument("--drain-segments", type=int, help="segments in the backlog (default 1440)")
    p.add_argument("--pi4-ratio", type=float, default=DEFAULT_PI4_RATIO,
                   help="assumed single-core speed of this machine over a Pi 4")
    p.add_argument("--pizero-ratio", type=float, default=DEFAULT_PIZERO_RATIO,
                   help="assumed single-core speed of this machine over a Pi Zero 2 W")
    p.add_argument("--from-results", type=Path, metavar="JSON",
                   help="measure nothing: regenerate the report and plots from an earlier "
                   "run's results.json")
    p.add_argument("--worker", choices=["agent", "latency", "drain", "realtime"],
                   help=argparse.SUPPRESS)
    p.add_argument("--serve-backend", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        return _worker_main(args.worker)
    if args.serve_backend:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        serve_backend(args.serve_backend)
        return 0
    only = None
    if args.only:
        only = frozenset(x.strip() for x in args.only.split(",") if x.strip())
        unknown = only - set(MEASUREMENTS)
        if unknown:
            print(f"error: --only: unknown measurement(s) {', '.join(sorted(unknown))}; "
                  f"expected some of {', '.join(MEASUREMENTS)}", file=sys.stderr)
            return 2
    if args.hours is not None and not 0 < args.hours <= 48:
        print(f"error: --hours: expected a number of hours in (0, 48], got {args.hours:g}",
              file=sys.stderr)
        return 2
    if args.from_results is not None:
        try:
            results = json.loads(args.from_results.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            print(f"error: --from-results {args.from_results}: cannot read it ({exc})",
                  file=sys.stderr)
            return 2
        plots, note = write_plots(results, args.report.parent)
        write_report(results, args.report, plots, note)
        print_table(results)
        print(f"wrote {args.report}")
        return 0
    opts = BenchOptions(tiny=args.tiny, hours=args.hours, results=args.results,
                        report=args.report, only=only, work_dir=args.work_dir, keep=args.keep,
                        profile=args.profile, pi4_ratio=args.pi4_ratio,
                        pizero_ratio=args.pizero_ratio, drain_segments=args.drain_segments)
    try:
        results = run_bench(opts)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_table(results)
    print(f"wrote {opts.results} and {opts.report}")
    return 0
