"""The output of a run: the table printed on stdout and the Markdown report
(``docs/benchmarks.md``) regenerated from ``results.json``, with what each of
its keys means.

Measures nothing. Imports nothing of `edge_agent`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from bench.common import (
    HEAP_FLAT_MB,
    MB,
    PYTHON_BLOCKS_FLAT,
    SCHEMA_VERSION,
    TARGET_GROWTH_MB,
    TARGET_RATIO,
    TARGET_REJECTION_DB,
)
from bench.complexity_report import (
    COMPLEXITY_KEY_DOCS,
    complexity_rows,
    complexity_section,
    opus_complexity,
)
from bench.realtime import realtime_lines, realtime_rows

__all__ = ["KEY_DOCS", "print_table", "write_report"]

def _fmt(v: Any, unit: str = "") -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.3g}{unit}" if abs(v) < 100 else f"{v:,.0f}{unit}"
    return f"{v}{unit}"


def _table_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(measurement, figure, target/verdict) rows for stdout and the report."""
    rows: list[tuple[str, str, str]] = []
    if "realtime" in r:
        rows += realtime_rows(r["realtime"])
    if "cpu" in r:
        c = r["cpu"]
        rows += [
            ("CPU: agent", f"{_fmt(c['agent_cpu_s_per_audio_hour'])} CPU s per audio hour", ""),
            ("CPU: opusenc + sox", f"{_fmt(c['opusenc_cpu_s_per_audio_hour'])} CPU s per audio "
             "hour", ""),
            ("CPU: agent / opusenc", f"{c['ratio_agent_to_opusenc']:.2f}",
             f"<= {TARGET_RATIO}: {_fmt(c['target_met'])}"),
        ]
    if "memory" in r:
        m = r["memory"]
        rows += [
            ("Memory: peak RSS", f"{m['peak_rss_mb']:.1f} MB (ring {m['ring_bytes'] / MB:.1f} MB)",
             ""),
            ("Memory: growth", f"{m['growth_mb']:+.2f} MB from {m['reference_hours']:.2f} h to "
             f"{m['audio_hours']:.2f} h of audio",
             f"< {TARGET_GROWTH_MB:g} MB: {_fmt(m['target_met'])}"),
        ]
    if "ring" in r:
        g = r["ring"]
        rows += [
            ("Ring: read 1 s chunk", f"{g['read_chunk_us_short']:.1f} us vs "
             f"{g['read_chunk_us_long']:.1f} us", f"ratio {g['read_chunk_ratio']:.2f} (~1)"),
            ("Ring: cut 10 s range", f"{g['cut_10s_us_short']:.0f} us vs "
             f"{g['cut_10s_us_long']:.0f} us", f"ratio {g['cut_10s_ratio']:.2f} (~1)"),
        ]
    if "resample" in r:
        s = r["resample"]
        rows.append(("Resample: " + s["default"], f"{s['default_rejection_db']:.0f} dB alias "
                     f"rejection, {s['converters'][s['default']]['cpu_s_per_audio_hour']:.1f} "
                     "CPU s/h", f">= {TARGET_REJECTION_DB:g} dB: {_fmt(s['target_met'])}"))
    if "latency" in r:
        la = r["latency"]
        for mode in ("fixed", "vad"):
            q, t = la[mode]["to_request_s"], la[mode]["to_transcript_s"]
            rows.append((f"Latency: {mode}", f"request p50 {q['p50']:.2f} / p95 {q['p95']:.2f} "
                         f"/ max {q['max']:.2f} s; transcript p95 {t['p95']:.2f} s", ""))
    if "drain" in r:
        d = r["drain"]
        rows.append(("Drain: backlog", f"{d['segments']} segments in {d['drain_seconds']:.1f} s "
                     f"({d['segments_per_second']:.1f}/s), CPU {d['cpu_percent_mean']:.0f}%",
                     f"overruns {d['ring_overruns']}, all synced: {_fmt(d['all_synced'])}"))
    rows += complexity_rows(r)
    if "pi" in r:
        for name, b in r["pi"]["boards"].items():
            rows.append((f"Pi projection: {name}", f"{b['agent_percent_of_one_core']:.0f}% of "
                         f"one core, max load {b['max_realtime_load']:.1f}x real time",
                         f"assumed {b['ratio_assumed']:g}x slower per core"))
    return rows


def print_table(results: dict[str, Any]) -> None:
    rows = _table_rows(results)
    w0 = max((len(a) for a, _, _ in rows), default=10)
    w1 = max((len(b) for _, b, _ in rows), default=10)
    print(f"{'measurement':<{w0}}  {'figure':<{w1}}  target")
    print(f"{'-' * w0}  {'-' * w1}  ------")
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:<{w1}}  {c}")
    meta = results["meta"]
    print(f"load average {meta['loadavg_start']} -> {meta['loadavg_end']} on {meta['cores']} "
          f"cores; {meta['wall_seconds']:.0f} s wall in total")


#: What each key of results.json means (rendered into the report).
KEY_DOCS: Final[tuple[tuple[str, str], ...]] = (
    ('`meta.schema`', 'version of this layout (bumped when a key changes meaning)'),
    ('`meta.mode`', '`full` or `tiny` (CI: seconds of audio; numbers are not meaningful)'),
    ('`meta.loadavg_start`, `meta.loadavg_end`', '`os.getloadavg()` before and after the run'),
    ('`meta.wall_seconds`', 'wall time of the whole run'),
    ('`realtime.blocks.<ms>.agent_cpu_s_per_audio_hour`, `...trio_thread_s_per_audio_hour`',
     'the agent at real time, default config, capture delivered by a thread as a mic is'),
    ('`realtime.blocks.<ms>.ratio_agent_to_c_tools_realtime`',
     'the headline: agent / (sox + opusenc) on the same mono input at the same complexity, '
     'both fed at real time in the same capture block'),
    ('`realtime.blocks.<ms>.c_tools_realtime_cpu_s_per_audio_hour`, '
     '`...c_tools_realtime_parts`', 'the C tools fed at real time through pipes by a thread '
     'standing for `arecord` (`feeder`: that thread, counted as the agent\'s capture thread is)'),
    ('`realtime.blocks.<ms>.ratio_agent_to_c_tools`',
     'agent / (sox + opusenc fed as fast as they go from files)'),
    ('`realtime.blocks.<ms>.trio_thread_wakes_per_s`, `...capture_wakes_per_s`, '
     '`...task_steps_per_s`', 'how often the Trio thread woke, how often capture woke it, '
     'and how often Trio ran each task'),
    ('`realtime.c_tools_cpu_s_per_audio_hour` (and its parts)',
     '`sox` to 16 kHz + `opusenc` for STT + `opusenc` for segments, as fast as they go'),
    ('`realtime.startup`', 'CPU s of `config check`, `--help`, and `run` to its ready line'),
    ('`realtime.before`', 'the figures before the capture thread woke Trio per batch'),
    ('`cpu.agent_cpu_s_per_audio_hour`',
     'agent process CPU (user+system, all threads) per hour of audio'),
    ('`cpu.agent_trio_thread_s_per_audio_hour`', 'of that, the Trio (main) thread: Python work'),
    ('`cpu.agent_worker_threads_s_per_audio_hour`',
     'of that, worker threads: Opus encoding, disk, hashing'),
    ('`cpu.opusenc_cpu_s_per_audio_hour`',
     '`sox` + both `opusenc` runs per hour of the same audio'),
    ('`cpu.opusenc_stt_s_per_audio_hour`, `cpu.opusenc_segments_s_per_audio_hour`, '
     '`cpu.sox_resample_s_per_audio_hour`', 'its parts'),
    ('`cpu.ratio_agent_to_opusenc`',
     'the headline: agent / (sox + opusenc); target `cpu.target_ratio`'),
    ('`cpu.ratio_agent_to_opusenc_without_sox`',
     'the same without counting the resampling of the C side'),
    ('`cpu.agent_speed_x_realtime`',
     'audio seconds per wall second of the fast run (load dependent)'),
    ('`cpu.stt_chunks_sent`, `cpu.stt_dropped`, `cpu.segments_synced`, `cpu.lost_frames`',
     'proof the run did all the work (drops and lost frames must be 0)'),
    ('`cpu.backend_cpu_s`', 'CPU of the loopback reference backend (not counted)'),
    ('`cpu.realtime_agent_cpu_s_per_audio_hour`, `cpu.realtime_trio_thread_s_per_audio_hour`',
     'the same agent with its source paced at real time for `realtime_audio_seconds`'),
    ('`cpu.realtime_ratio_agent_to_opusenc`', 'its ratio to the C tools'),
    ('`cpu.realtime_block_100ms_*`', 'the same with `capture.block_ms = 100` instead of 20'),
    ('`cpu.trio_timer_wakeup_us`', 'CPU us of one timed Trio wake-up on this machine'),
    ('`memory.audio_hours`', 'audio pushed through the agent while RSS was sampled'),
    ('`memory.ring_bytes`', "the ring's configured size"),
    ('`memory.heap_in_use_mb_at_reference`, `memory.heap_in_use_mb_at_end`',
     'bytes malloc has handed out, samples (glibc mallinfo2, ring included; null elsewhere)'),
    ('`memory.heap_in_use_growth_mb`',
     'its least-squares change from the reference to the end: not growing means no leak'),
    ('`memory.heap_free_growth_mb`',
     'the same for the free bytes malloc keeps (retention, fragmentation)'),
    ('`memory.python_blocks_at_reference`, `memory.python_blocks_growth`',
     "Python's allocated objects (`sys.getallocatedblocks`) and their fitted change"),
    ('`memory.peak_rss_mb`', 'VmHWM of the agent process'),
    ('`memory.reference_hours`, `memory.rss_mb_at_reference`',
     'RSS at 1 h of audio (half the run when shorter)'),
    ('`memory.rss_mb_at_end`, `memory.growth_mb`',
     'RSS at the end and its growth since the reference'),
    ('`memory.growth_mb_per_hour`, `memory.projected_growth_mb_12h`',
     'least-squares slope after the reference, and growth projected to 12 h'),
    ('`ring.read_chunk_us_short`, `ring.read_chunk_us_long`, `ring.read_chunk_ratio`',
     'CPU us to read one 1 s chunk through a reader after `short_seconds` and '
     '`long_seconds` of capture'),
    ('`ring.cut_10s_us_*`, `ring.cut_10s_ratio`', 'the same for cutting a 10 s range by UTC'),
    ('`ring.short_seconds`, `ring.long_seconds`, `ring.naive_minutes`',
     'the capture ages compared'),
    ('`ring.naive_cut_10s_ms_short`, `ring.naive_cut_10s_ms_10x`, `ring.naive_ratio_10x`, '
     '`ring.naive_projected_ratio_long`',
     'a design that re-concatenates the whole history, after `naive_minutes`'),
    ('`resample.converters.<name>.alias_rejection_db`, `.cpu_s_per_audio_hour`',
     '10 kHz tone, 48 kHz -> 16 kHz, per converter and `linear`'),
    ('`resample.default`, `resample.default_rejection_db`, `resample.target_met`',
     "the agent's converter against the 90 dB bar"),
    ('`latency.<fixed,vad>.to_request_s`, `.to_transcript_s`',
     'p50/p95/max/n seconds per 20 ms block'),
    ('`latency.<fixed,vad>.last_block_to_request_s`',
     "from a chunk's last block to its request: the agent's own processing delay"),
    ('`latency.<fixed,vad>.chunks`, `.chunk_seconds`, `.dropped`', 'what was sent'),
    ('`latency.capture_late_ms_max`', 'how late the real-time source delivered a block, at most'),
    ('`drain.segments`, `drain.segment_seconds`, `drain.audio_hours`', 'the simulated outage'),
    ('`drain.recover_seconds`, `drain.drain_seconds`',
     'spool recovery at start; start to everything synced'),
    ('`drain.segments_per_second`, `drain.mb_per_second`, `drain.audio_hours_per_minute`',
     'throughput'),
    ('`drain.cpu_percent_mean`, `drain.cpu_percent_max`',
     'agent CPU while draining (100 = one core; max over 0.5 s intervals)'),
    ('`drain.ring_overruns`, `drain.lost_frames`, `drain.capture_gaps`, '
     '`drain.capture_late_ms_max`, `drain.capture_late_ms_p99`',
     'capture during the drain (all must stay 0 / small)'),
    ('`pi.basis`', 'which CPU run the projection scales (the real-time one when measured)'),
    ('`pi.assumption`, `pi.boards.<board>.*`',
     'projection to a Pi 4 and a Pi Zero 2 W by the stated single-core ratios'),
    ('`series.*`', 'downsampled data behind the plots (RSS, latency, drain progress)'),
)


#: Everything after this line of the report is measured by other means and kept.
HAND_MEASURED = "<!-- measured outside scripts/bench: kept when this report is regenerated -->"


def write_report(results: dict[str, Any], path: Path, plots: dict[str, str],
                 plot_note: str | None) -> None:
    """Regenerate docs/benchmarks.md from `results`."""
    meta = results["meta"]
    lines: list[str] = [
        "# Benchmarks",
        "",
        "<!-- Generated by scripts/bench from bench/results.json; edits are overwritten. -->",
        "",
        f"Measured {meta['started_utc']} on {meta['cores']} cores of `{meta['cpu_model']}` "
        f"(Python {meta['python']}), mode `{meta['mode']}`, {meta['wall_seconds']:.0f} s wall "
        f"for the whole run. Load average {meta['loadavg_start']} at the start and "
        f"{meta['loadavg_end']} at the end: other work shared the machine, so every CPU "
        "figure is process CPU time (user + system), not wall time, and the headline "
        "figures are ratios. Regenerate with `scripts/bench` (about 15 minutes; "
        "`scripts/bench --tiny` in seconds)."
        + "".join(f" Section `{k}` was measured again on {v} (`--only {k}`)."
                  for k, v in sorted(meta.get("remeasured", {}).items())),
        "",
        "| measurement | figure | target |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _table_rows(results)]
    lines.append("")
    if plot_note:
        lines += [f"_{plot_note}_", ""]

    def plot(name: str) -> None:
        if name in plots:
            lines.extend([f"![{name}]({plots[name]})", ""])

    if "realtime" in results:
        lines += realtime_lines(results["realtime"])
    if "cpu" in results:
        c = results["cpu"]
        lines += [
            "## 1. CPU per audio second",
            "",
            f"The whole agent ran {c['audio_hours']:.2f} h of audio as fast as its pipeline "
            f"went ({c['agent_speed_x_realtime']:g}x real time here): a 48 kHz stereo "
            "`FileSource` looping a "
            f"{meta['audio_file_seconds']:.0f} s speech recording (the bundled sample at "
            "varying levels and pauses over a -55 dBFS noise floor), the ring, the STT "
            "streamer (fixed 5 s chunks, so every second is encoded as on the C side; "
            "16 kHz mono, 24 kbit/s Opus, POSTed to the loopback reference backend), the "
            "segmenter (60 s segments, 32 kbit/s Opus, fsynced into the spool) and the "
            "uploader (PUT to the same backend). Capture pauses whenever a reader is half a "
            "ring behind, so no audio is skipped: "
            f"{c['stt_chunks_sent']} STT chunks sent, {c['stt_dropped']} dropped, "
            f"{c['segments_synced']} segments synced, {c['lost_frames']} frames lost. "
            f"The backend ({c['backend_cpu_s']:.1f} CPU s) runs in another process and is not "
            "counted.",
            "",
            "The C side does the same two encodes of the same file: `sox in.wav -r 16000 -c 1` "
            "(resampling and mix-down, which the agent does too, so it is counted), "
            "`opusenc --bitrate 24` on that, and `opusenc --bitrate 32` on the 48 kHz stereo "
            "file; CPU from `wait4` per child. Both sides use the same libopus, at "
            f"{opus_complexity(c)}"
            + (", the agent's config defaults (`opusenc --comp`)." if "opus_complexity" in c
               else "."),
            "",
            "| | CPU s per audio hour |",
            "|---|---|",
            f"| agent, total | {c['agent_cpu_s_per_audio_hour']:.1f} |",
            f"| of which Trio thread (Python: capture, ring, resampling, chunking, HTTP) "
            f"| {c['agent_trio_thread_s_per_audio_hour']:.1f} |",
            f"| of which worker threads (Opus encoding, disk, hashing) "
            f"| {c['agent_worker_threads_s_per_audio_hour']:.1f} |",
            f"| sox resample | {c['sox_resample_s_per_audio_hour']:.1f} |",
            f"| opusenc STT (16 kHz mono, 24 kbit/s) | {c['opusenc_stt_s_per_audio_hour']:.1f} |",
            f"| opusenc segments (48 kHz stereo, 32 kbit/s) "
            f"| {c['opusenc_segments_s_per_audio_hour']:.1f} |",
            f"| **agent / (sox + opusenc)** | **{c['ratio_agent_to_opusenc']:.2f}** "
            f"(target <= {TARGET_RATIO}; without sox "
            f"{c['ratio_agent_to_opusenc_without_sox']:.2f}) |",
        ]
        if "realtime_agent_cpu_s_per_audio_hour" in c:
            lines += [
                f"| agent with the source paced at real time ({c['realtime_audio_seconds']:.0f} s; "
                f"Trio thread {c['realtime_trio_thread_s_per_audio_hour']:.1f}) "
                f"| {c['realtime_agent_cpu_s_per_audio_hour']:.1f} (ratio "
                f"{c['realtime_ratio_agent_to_opusenc']:.2f}) |",
            ]
            if "realtime_block_100ms_cpu_s_per_audio_hour" in c:
                lines.append(
                    f"| the same with `capture.block_ms = 100` (Trio thread "
                    f"{c['realtime_block_100ms_trio_thread_s_per_audio_hour']:.1f}) "
                    f"| {c['realtime_block_100ms_cpu_s_per_audio_hour']:.1f} (ratio "
                    f"{c['realtime_block_100ms_ratio_agent_to_opusenc']:.2f}) |")
            lines += [
                "",
                "**The target holds for the fast run the issue specifies, not in real time.** "
                "The real-time rows are what a device pays: every capture block wakes the "
                "capture task, the STT streamer and the segmenter, which the fast run "
                "amortises over large reads (the runs are otherwise identical). One timed "
                f"Trio wake-up costs {c.get('trio_timer_wakeup_us', 0):.0f} us of CPU on this "
                "virtual machine, so at 50 blocks a second the Trio thread's share is mostly "
                "wake-ups, not audio work: the cProfile of a real-time run spreads its time "
                "over Trio's scheduler, cancel scopes and small numpy calls per block, with "
                "no single hot spot. The cheapest lever is the capture block size: "
                "`capture.block_ms = 100` (measured above) costs 80 ms more capture latency. "
                "A `FileSource` also converts every block to float and back, which a "
                "microphone source does not.",
            ]
        lines.append("")
        plot("cpu")
        if "profile" in results.get("series", {}):
            lines += [
                "Where the Trio thread's time goes in real time (cProfile with the thread's "
                "CPU clock, of a separate real-time run that profiling slows down; own time, "
                "top entries):",
                "",
                "| function | calls | own s | cumulative s |",
                "|---|---|---|---|",
            ]
            lines += [f"| `{row['function']}` | {row['calls']} | {row['own_s']} | "
                      f"{row['cumulative_s']} |" for row in results["series"]["profile"][:15]]
            lines.append("")
    if "memory" in results:
        m = results["memory"]
        lines += [
            "## 2. Memory over uptime",
            "",
            f"RSS of the same fast run, sampled from `/proc/self/statm` every 0.2 s against "
            f"the audio hours processed: peak {m['peak_rss_mb']:.1f} MB, of which the ring's "
            f"preallocated buffer is {m['ring_bytes'] / MB:.1f} MB (300 s, 48 kHz stereo "
            f"int16). RSS was {m['rss_mb_at_reference']:.1f} MB at "
            f"{m['reference_hours']:.2f} h of audio and {m['rss_mb_at_end']:.1f} MB at "
            f"{m['audio_hours']:.2f} h: growth {m['growth_mb']:+.2f} MB (target < "
            f"{TARGET_GROWTH_MB:g} MB), slope {m['growth_mb_per_hour']:+.3f} MB per audio hour, "
            f"{m['projected_growth_mb_12h']:.2f} MB projected to 12 h.",
            "",
        ]
        if m["audio_hours"] < 12:
            lines += [
                f"**Not 12 h in this run.** The whole agent costs about "
                f"{results['cpu']['agent_cpu_s_per_audio_hour']:.0f} CPU s per audio hour "
                f"here (two real Opus encodes at {opus_complexity(results['cpu'])}), so 12 h "
                "of audio take about "
                f"{12 * results['cpu']['agent_cpu_s_per_audio_hour'] / 60:.0f} CPU minutes: "
                "more than the 10-minute budget of the whole benchmark on 2 shared cores. "
                "The run covers what fits; the 12 h figure above is the slope projected. "
                "`scripts/bench --hours 12 --only cpu` measures it literally."
                + (f" **If that slope held, 12 h would exceed the {TARGET_GROWTH_MB:g} MB "
                   "target**; see the heap figures below for what is growing."
                   if m["projected_growth_mb_12h"] >= TARGET_GROWTH_MB else ""),
                "",
            ] if "cpu" in results else []
        if m["heap_in_use_growth_mb"] is not None:
            # Python objects live in pymalloc arenas, outside malloc's figures.
            flat = (m["heap_in_use_growth_mb"] < HEAP_FLAT_MB
                    and m["python_blocks_growth"] < PYTHON_BLOCKS_FLAT)
            lines += [
                f"What malloc has handed out and not got back (glibc `mallinfo2`, the ring "
                f"included; {m['heap_in_use_mb_at_reference']:.1f} MB at the reference) "
                f"changed by {m['heap_in_use_growth_mb']:+.2f} MB from the reference to the "
                f"end (least-squares fit; single samples jump with the buffers in flight), "
                f"while the free memory it keeps changed by "
                f"{m['heap_free_growth_mb']:+.2f} MB; Python's allocated objects "
                f"({m['python_blocks_at_reference']:.0f} at the reference) changed by "
                f"{m['python_blocks_growth']:+d}. "
                + ("Neither grows beyond noise (a few thousand Python objects are expected: "
                   "the spool's index keeps every segment's metadata until its retention "
                   "ends), so what RSS gains is the allocator keeping freed memory in its "
                   "per-thread arenas (encoders and buffers are made and freed in worker "
                   "threads), not objects piling up. Such retention usually levels off, but "
                   "whether it stays within 2 MB over 12 h is not shown by this run. "
                   "Capping the arenas (`MALLOC_ARENA_MAX=2` in the service's environment) is "
                   "the usual remedy; it is not measured here." if flat else
                   "**Memory in use grows: objects are piling up somewhere** (profile with "
                   "`tracemalloc` snapshots at two audio ages)."),
                "",
            ]
        plot("memory")
    if "ring" in results:
        g = results["ring"]
        lines += [
            "## 3. Constant cost per chunk",
            "",
            f"A 300 s ring (48 kHz stereo) after {g['short_seconds'] / 60:g} min and after "
            f"{g['long_seconds'] / 3600:g} h of capture (indices far out; everything but "
            "the newest ring-full written as large zero-stride blocks, the newest ring-full "
            "in 20 ms blocks). CPU per operation, best of seven batches alternating between "
            "the two rings:",
            "",
            "| operation | after short | after long | ratio |",
            "|---|---|---|---|",
            f"| read one 1 s chunk through a reader | {g['read_chunk_us_short']:.1f} us | "
            f"{g['read_chunk_us_long']:.1f} us | {g['read_chunk_ratio']:.2f} |",
            f"| cut a 10 s range by UTC (`utc_to_index` x2 + `read`) | "
            f"{g['cut_10s_us_short']:.0f} us | {g['cut_10s_us_long']:.0f} us | "
            f"{g['cut_10s_ratio']:.2f} |",
            f"| naive: concatenate the whole history, then cut | "
            f"{g['naive_cut_10s_ms_short']:.1f} ms ({g['naive_minutes'][0]:g} min) | "
            f"{g['naive_cut_10s_ms_10x']:.1f} ms ({g['naive_minutes'][1]:g} min) | "
            f"{g['naive_ratio_10x']:.1f} (x{g['naive_projected_ratio_long']:g} projected at "
            f"{g['long_seconds'] / 3600:g} h) |",
            "",
        ]
    if "resample" in results:
        s = results["resample"]
        lines += [
            "## 4. Resampling quality and cost",
            "",
            "A full-scale 10 kHz tone resampled 48 kHz -> 16 kHz "
            "(`resample.alias_rejection_db`: input RMS over output RMS); CPU per audio hour "
            "of mono audio fed in 1 s blocks, as the STT streamer does.",
            "",
            "| converter | alias rejection | CPU s per audio hour |",
            "|---|---|---|",
        ]
        for name, v in s["converters"].items():
            mark = " (agent default)" if name == s["default"] else ""
            lines.append(f"| {name}{mark} | {v['alias_rejection_db']:.1f} dB | "
                         f"{v['cpu_s_per_audio_hour']:.2f} |")
        lines += ["", f"The default rejects {s['default_rejection_db']:.0f} dB "
                  f"(target >= {TARGET_REJECTION_DB:g} dB: {_fmt(s['target_met'])}).", ""]
        plot("resample")
    if "latency" in results:
        la = results["latency"]
        lines += [
            "## 5. Latency",
            "",
            f"The whole agent on a real-time 48 kHz stereo `FileSource` for "
            f"{la['seconds']:.0f} s, with two STT streamers on the same ring (fixed 2 s chunks, "
            "and VAD chunks with the default settings). An httpx transport around the real "
            "one notes when each request leaves and when its answer is back. For every 20 ms "
            "block of every chunk, latency is measured from the block's capture (its end: "
            "when a microphone would have delivered it) to the request holding it and to the "
            f"transcript. {la['backend']}",
            "",
            "| chunking | chunks | to request p50 / p95 / max | to transcript p50 / p95 / max "
            "| chunk's last block to request, p50 |",
            "|---|---|---|---|---|",
        ]
        for mode in ("fixed", "vad"):
            q, t = la[mode]["to_request_s"], la[mode]["to_transcript_s"]
            last = la[mode]["last_block_to_request_s"]
            lines.append(f"| {mode} | {la[mode]['chunks']} | {q['p50']:.3f} / {q['p95']:.3f} / "
                         f"{q['max']:.3f} s | {t['p50']:.3f} / {t['p95']:.3f} / {t['max']:.3f} s "
                         f"| {last['p50']:.3f} s |")
        lines += ["", "With fixed chunks a block waits for the rest of its chunk (up to 2 s); "
                  "with VAD it waits for the end of the utterance and the pause that ends it "
                  "(`vad_silence_seconds`), so the oldest blocks of a long utterance wait "
                  "longest. The last column is the agent's own delay once a chunk is "
                  "complete: the next capture block (the resampler holds back a few samples), "
                  "the Opus encode in a worker thread and the hand-over to the sender; for VAD "
                  "it also holds the pause that ends the utterance beyond the trailing "
                  "silence kept in the chunk. The chunk that was open when the source ended "
                  "is left out (only the idle flush cuts it).", ""]
        plot("latency")
    if "drain" in results:
        d = results["drain"]
        lines += [
            "## 6. Backlog drain",
            "",
            f"{d['segments']} sealed segments of {d['segment_seconds']:g} s "
            f"({d['audio_hours']:g} h of 48 kHz stereo audio at 32 kbit/s, as a "
            f"{d['audio_hours']:g} h outage leaves them) were put in the spool in its on-disk "
            "format; the agent then started with a real-time source capturing, STT streaming "
            "and the segmenter recording, and the uploader drained the backlog to the "
            "loopback backend (another process, fsyncing every upload).",
            "",
            "| | |",
            "|---|---|",
            f"| spool recovery at start | {d['recover_seconds']:.2f} s |",
            f"| drain (start to all synced) | {d['drain_seconds']:.1f} s |",
            f"| throughput | {d['segments_per_second']:.1f} segments/s, "
            f"{d['mb_per_second']:.2f} MB/s, {d['audio_hours_per_minute']:.1f} audio hours "
            "per minute |",
            f"| agent CPU while draining | {d['cpu_percent_mean']:.0f}% of one core on average, "
            f"{d['cpu_percent_max']:.0f}% at most over 0.5 s |",
            f"| capture meanwhile | {d['ring_overruns']} reader overruns, {d['lost_frames']} "
            f"lost frames, {d['capture_gaps']} gaps, blocks at most "
            f"{d['capture_late_ms_max']:.1f} ms late (p99 {d['capture_late_ms_p99']:.1f} ms) |",
            f"| every segment synced | {_fmt(d['all_synced'])} |",
            "",
            "The uploader sends one segment at a time, so the drain costs at most about "
            "one core whatever the backlog; `upload.max_bytes_per_second` caps it further "
            "where the uplink is shared.",
            "",
        ]
        plot("drain")
    if "pi" in results:
        pi = results["pi"]
        lines += [
            "## 7. Raspberry Pi projection",
            "",
            f"Assumption: {pi['assumption']}. Scaled from the {pi['basis']} above. "
            "The Opus encoder has NEON code paths on ARM, "
            "so the codec part may scale better than Python; treat these as estimates "
            "until measured on a board.",
            "",
            "| board | agent CPU s per audio hour | share of one core | share of all cores "
            "| Trio thread share of one core | max real-time load |",
            "|---|---|---|---|---|---|",
        ]
        rt = results.get("realtime") if pi.get("basis") == "real-time run" else None
        encodes = (f"STT at complexity {rt['stt_complexity']}, segments at "
                   f"{rt['segments_complexity']}, of a 48 kHz mono capture" if rt else
                   f"at {opus_complexity(results.get('cpu', {}))}, on 48 kHz stereo")
        for name, b in pi["boards"].items():
            lines.append(
                f"| {name} | {b['agent_cpu_s_per_audio_hour']:.0f} | "
                f"{b['agent_percent_of_one_core']:.0f}% | {b['agent_percent_of_all_cores']:.0f}% "
                f"| {b['trio_thread_percent_of_one_core']:.0f}% | "
                f"{b['max_realtime_load']:.1f}x |")
        lines += ["", "The maximum real-time load is how many such streams' worth of work "
                  "the board could carry: one core over the Trio thread's share, and all "
                  "cores over the whole agent's share, whichever is smaller. Most of the "
                  f"cost is the two Opus encodes ({encodes}); section 8 measures what each "
                  "encoder complexity costs and keeps.", ""]
    lines += complexity_section(results)
    lines += ["## `bench/results.json`", "",
              "Stable keys, so a later run can be compared with this one "
              f"(schema {SCHEMA_VERSION}):", "", "| key | meaning |", "|---|---|",
              *(f"| {k} | {m} |" for k, m in (*KEY_DOCS, *COMPLEXITY_KEY_DOCS)), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    # Figures measured by other means (the API load test) follow a marker; a
    # regenerated report keeps them as they are.
    kept = ""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if HAND_MEASURED in old:
            kept = old[old.index(HAND_MEASURED):]
    path.write_text("\n".join(lines) + ("\n" + kept if kept else ""), encoding="utf-8")
