"""Benchmarks of the whole agent: CPU, memory, per-chunk cost, resampling quality,
latency, backlog drain, what the figures imply on a Raspberry Pi, and what each
Opus encoder complexity costs and keeps.

`scripts/bench` (or ``python -m bench`` from the repository root) runs every
measurement in one go, prints a table, writes ``bench/results.json`` and
regenerates ``docs/benchmarks.md`` with its plots. Every figure comes from a
measurement in that run. CPU is process CPU time (user + system, all threads),
never wall time, so ratios stay meaningful on a machine shared with other work;
the load average is recorded beside them.

Each agent measurement runs the real agent (`Agent` built from a config) in its
own child process, so its CPU and RSS are its own; the reference backend it
talks to runs in another child process on loopback and its CPU is never counted
as the agent's. ``--tiny`` runs everything on seconds of audio (what CI checks).

This package is not part of the device wheel: it imports `edge_agent` as an
installed library, and nothing in `edge_agent` imports it. One module per
concern: `common` (schema, sizes, targets), `workload` (audio, config, capped
source), `procs` (worker and backend processes), `cpu`, `memory`, `ring`,
`resample`, `latency`, `drain`, `pi`, `complexity` (the measurements), `report`,
`complexity_report` and `plots` (the output), `cli` (options and the run).
"""

from bench.cli import main, run_bench
from bench.common import RESULT_KEYS, SCHEMA_VERSION, BenchError, BenchOptions
from bench.workload import make_bench_audio

__all__ = [
    "RESULT_KEYS",
    "SCHEMA_VERSION",
    "BenchError",
    "BenchOptions",
    "main",
    "make_bench_audio",
    "run_bench",
]
