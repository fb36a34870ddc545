"""Section 8 of the report, what each Opus complexity costs and keeps (measured by
`bench.complexity`): its summary rows, its text and tables, and its keys; and how
the CPU section names the complexity it ran at.

Measures nothing. Imports nothing of `edge_agent`.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["COMPLEXITY_KEY_DOCS", "complexity_rows", "complexity_section", "opus_complexity"]


def opus_complexity(cpu: dict[str, Any]) -> str:
    """The complexity both sides of the CPU comparison encoded at: the agent's
    config defaults, given to opusenc as ``--comp`` (libopus's own default, 10,
    in runs from before the setting existed)."""
    cx = cpu.get("opus_complexity")
    if cx is None:
        return "libopus's default complexity 10"
    if cx["stt"] == cx["segments"]:
        return f"complexity {cx['stt']}"
    return f"complexity {cx['stt']} (STT) and {cx['segments']} (segments)"


_ENCODER_NAMES: Final = {"stt": "STT chunks", "segments": "segments"}


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _percent(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def complexity_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Summary rows: what each encoder's default costs and keeps against 10."""
    if "complexity" not in r:
        return []
    rows = []
    for name, e in r["complexity"]["encoders"].items():
        by = {row["complexity"]: row for row in e["rows"]}
        d, top = by.get(e["config_default"], by[e["chosen"]]), e["rows"][0]
        rows.append((f"Opus complexity: {name}",
                     f"default {e['config_default']}: {d['cpu_s_per_audio_hour']:.0f} CPU s/h "
                     f"({top['cpu_s_per_audio_hour']:.0f} at {top['complexity']}), words "
                     f"{_percent(d['word_accuracy'])} ({_percent(top['word_accuracy'])})",
                     f"rule picks {e['chosen']}: "
                     f"{'yes' if e['default_follows_rule'] else 'NO'}"))
    return rows


def complexity_section(results: dict[str, Any]) -> list[str]:
    """Section 8: the complexity table of each encoder, the rule and the defaults."""
    if "complexity" not in results:
        return []
    x = results["complexity"]
    shifts = ", ".join(f"{s:g}" for s in x["sample_shifts_ms"])
    plain = x["uncompressed_word_accuracy_renditions"]
    lines = [
        "## 8. Opus complexity",
        "",
        f"Measured {x['measured_utc']} ({x['wall_seconds']:.0f} s wall, load average "
        f"{x['loadavg_end']} at the end). What each libopus complexity (10, its default, down "
        "to 0) costs and keeps for the agent's two Opus encoders at their default bit "
        "rates: STT chunks (16 kHz mono, `voip`, cut into the streamer's 5 s fixed chunks, "
        "each its own file) and segments (48 kHz mono as a default capture gives them, "
        "`audio`, one file fed in 1 s batches), both through the agent's own encoder "
        "functions.",
        "",
        f"- **CPU**: process CPU time of the encode alone per audio hour, the least of "
        f"{_count(x['passes'], 'pass', 'passes')} over the first {x['audio_seconds']:g} s of "
        "the speech workload "
        "of section 1 (its left channel), the complexities interleaved so that other load "
        "on the machine hits them alike.",
        f"- **Word accuracy** (1 - word error rate): pocketsphinx, as the reference backend "
        f"runs it, on the bundled sample ({x['sample_words']} words) encoded and decoded, "
        f"averaged over {_count(len(x['sample_shifts_ms']), 'rendition', 'renditions')} "
        f"delayed by {shifts} ms; the "
        "range is in brackets. The recogniser is the noisy part: a shift of a few "
        "milliseconds moves one rendition by several words even uncompressed"
        + ("" if plain is None else
           f" (uncompressed: {_percent(x['uncompressed_word_accuracy'])}, renditions "
           f"{_percent(min(plain))} to {_percent(max(plain))})") + ".",
        "- **SNR**: the decoded workload against the original after aligning them (the "
        "lag of greatest cross-correlation within 20 ms), in dB; **LSD**: the log-spectral "
        "distance, RMS over 0-8 kHz (the sample's band) of 32 ms frames, averaged over the "
        "frames within 35 dB of the loudest (the pauses' noise floor left out), in dB; "
        "lower is closer.",
        "",
    ]
    for name, e in x["encoders"].items():
        lines += [
            f"{_ENCODER_NAMES.get(name, name)} ({e['rate'] // 1000} kHz mono, "
            f"{e['bitrate'] // 1000} kbit/s, `{e['application']}`):",
            "",
            "| complexity | CPU s per audio hour | kbit/s | word accuracy | SNR dB | LSD dB |",
            "|---|---|---|---|---|---|",
        ]
        for row in e["rows"]:
            c = row["complexity"]
            mark = " (default)" if c == e["config_default"] else ""
            words = row["word_accuracy_renditions"]
            spread = "" if not words or len(words) < 2 else (
                f" ({_percent(min(words))}-{_percent(max(words))})")
            lines.append(f"| {c}{mark} | {row['cpu_s_per_audio_hour']:.1f} | "
                         f"{row['kbit_s']:.1f} | {_percent(row['word_accuracy'])}{spread} | "
                         f"{row['snr_db']:.2f} | {row['lsd_db']:.2f} |")
        lines.append("")
    lines += [
        "From complexity 7 up, a floating-point libopus (as on this machine) runs its "
        "signal analysis (speech or music, bandwidth) on every frame; below 7 it does not, "
        "and the mode decisions it informs change: that is the step in the segments' "
        "figures between 7 and 6. A fixed-point build of libopus runs the analysis only "
        "at 10. The STT encoder (`voip` at 16 kHz, which libopus codes with SILK) shows "
        "no such step.",
        "",
        f"The rule for a default: {x['rule']}.",
        "",
    ]
    for name, e in x["encoders"].items():
        lines.append(_verdict(name, e, x))
    lines += ["", "`scripts/bench --only complexity` measures this section again and keeps "
              "the others.", ""]
    return lines


def _verdict(name: str, e: dict[str, Any], x: dict[str, Any]) -> str:
    """What the rule picks for one encoder, what the config default costs and keeps
    against complexity 10, and why the next lower complexity was not picked."""
    rows = e["rows"]
    by = {row["complexity"]: row for row in rows}
    top, default = rows[0], e["config_default"]
    follows = "follows the rule" if e["default_follows_rule"] else "**not the rule's pick**"
    text = (f"- {_ENCODER_NAMES.get(name, name)}: the rule picks **{e['chosen']}**; "
            f"`{name}.complexity` defaults to {default} ({follows}).")
    d = by.get(default)
    if d is not None and d is not top:
        saved = 1 - d["cpu_s_per_audio_hour"] / top["cpu_s_per_audio_hour"]
        text += (f" At {default} the encode costs {d['cpu_s_per_audio_hour']:.1f} CPU s per "
                 f"audio hour instead of {top['cpu_s_per_audio_hour']:.1f} at "
                 f"{top['complexity']} ({saved:.0%} less), recognises "
                 f"{_percent(d['word_accuracy'])} of the words "
                 f"({_percent(top['word_accuracy'])} at {top['complexity']}) and keeps "
                 f"{d['snr_db']:.1f} dB SNR ({top['snr_db']:.1f}) and {d['lsd_db']:.2f} dB "
                 f"LSD ({top['lsd_db']:.2f}).")
    below = [row for row in rows if row["complexity"] < e["chosen"]]
    for row in below:
        snr_loss, lsd_more = top["snr_db"] - row["snr_db"], row["lsd_db"] - top["lsd_db"]
        if snr_loss > x["max_snr_loss_db"] or lsd_more > x["max_lsd_growth_db"]:
            return text + (f" Below it, {row['complexity']} is the first to lose more fidelity: "
                           f"{snr_loss:.1f} dB of SNR, {lsd_more:+.2f} dB of LSD (at "
                           f"{row['cpu_s_per_audio_hour']:.1f} CPU s per audio hour).")
    if below:
        text += (" Below it the fidelity holds, but no complexity recognises the sample as "
                 f"well as {top['complexity']}.")
    return text


COMPLEXITY_KEY_DOCS: Final[tuple[tuple[str, str], ...]] = (
    ('`cpu.opus_complexity`', 'complexity both sides of the CPU comparison encoded at '
     '(absent: 10)'),
    ('`complexity.encoders.<stt,segments>.rows[]`',
     'per complexity: `cpu_s_per_audio_hour` (encode alone), `kbit_s` (output), '
     '`word_accuracy` (mean of `word_accuracy_renditions`; null without pocketsphinx), '
     '`snr_db`, `lsd_db`'),
    ('`complexity.encoders.<stt,segments>.chosen`, `.config_default`, `.default_follows_rule`',
     'what `complexity.rule` picks from the rows, and the config default beside it'),
    ('`complexity.audio_seconds`, `complexity.passes`',
     'speech workload per CPU pass, and passes (the least CPU counts)'),
    ('`complexity.sample_words`, `complexity.sample_shifts_ms`, '
     '`complexity.uncompressed_word_accuracy`',
     'the recognised sample, its renditions, and its accuracy without encoding'),
    ('`complexity.max_snr_loss_db`, `complexity.max_lsd_growth_db`',
     'the fidelity a default may give up against complexity 10'),
    ('`complexity.measured_utc`, `.wall_seconds`, `.loadavg_end`, `.cores`',
     'when this section was measured, how long it took, and the load on the machine'),
    ('`meta.remeasured`', 'sections measured again later with `--only` (their start time)'),
)
