"""`edge-agent levels`: a live level meter to check the mic and set its gain on site.

The installer runs it with the device's config, speaks at the usual distance and
turns the capture gain (alsamixer, or the profile's hint) until speech peaks well
below full scale without clipping. Readings are RMS and peak in dBFS over short
windows of captured audio, so the meter is exact for generated and file sources
too (which is how it is tested).

Owns `LevelMeter` (synchronous: blocks in, readings out), `render` and
`run_levels` (meters a source). Part of the `capture` stage. Imports only the
bottom layer (`audio`) and its sibling `source`; never agent, another stage,
metrics or api.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
from numpy.typing import NDArray

from ..audio.pcm import DB_FLOOR, levels
from .source import Source

__all__ = ["LevelMeter", "LevelReading", "LevelSummary", "render", "run_levels"]

# The bar spans this range of dBFS; speech at the usual distance should peak
# between GOOD_PEAK_LOW and GOOD_PEAK_HIGH.
BAR_FLOOR_DB = -60.0
GOOD_PEAK_LOW = -30.0
GOOD_PEAK_HIGH = -3.0


@dataclass(frozen=True)
class LevelReading:
    """Levels of one window of audio, and the source's counters at its end."""

    window: int  # 1 for the first window of the run
    seconds: float  # audio captured so far, at the end of this window
    rms_dbfs: float
    peak_dbfs: float
    clipped: bool
    overflows: int


@dataclass
class LevelSummary:
    """The whole run: what the installer reads at the end."""

    seconds: float = 0.0
    peak_dbfs: float = DB_FLOOR
    rms_dbfs: float = DB_FLOOR
    clipped_windows: int = 0
    windows: int = 0
    overflows: int = 0
    _energy: float = field(default=0.0, repr=False)
    _frames: int = field(default=0, repr=False)

    def advice(self) -> str:
        """One line: what to do with the gain."""
        if self.clipped_windows:
            return (f"clipping in {self.clipped_windows} of {self.windows} readings: "
                    "lower the capture gain")
        if self.peak_dbfs < GOOD_PEAK_LOW:
            return (f"quiet: peak {self.peak_dbfs:.1f} dBFS is below {GOOD_PEAK_LOW:g}; raise "
                    "the capture gain or move the mic closer")
        if self.peak_dbfs > GOOD_PEAK_HIGH:
            return f"hot: peak {self.peak_dbfs:.1f} dBFS leaves little headroom; lower the gain"
        return "level ok"


class LevelMeter:
    """Cuts captured blocks into windows of `window_seconds` and measures each."""

    def __init__(self, rate: int, window_seconds: float = 0.1) -> None:
        self.rate = rate
        self.window_frames = max(1, round(rate * window_seconds))
        self.summary = LevelSummary()
        self._pending: list[NDArray[Any]] = []
        self._pending_frames = 0

    def add(self, frames: NDArray[Any], overflows: int = 0) -> list[LevelReading]:
        """Feed one block; returns the readings of the windows it completed."""
        self._pending.append(frames)
        self._pending_frames += len(frames)
        out = []
        while self._pending_frames >= self.window_frames:
            audio = np.concatenate(self._pending)
            window, rest = audio[: self.window_frames], audio[self.window_frames:]
            self._pending = [rest] if len(rest) else []
            self._pending_frames = len(rest)
            out.append(self._measure(window, overflows))
        return out

    def _measure(self, window: NDArray[Any], overflows: int) -> LevelReading:
        lv = levels(window)
        s = self.summary
        s.windows += 1
        s._frames += len(window)
        s.seconds = s._frames / self.rate
        if lv.rms_dbfs > DB_FLOOR:
            s._energy += len(window) * 10 ** (lv.rms_dbfs / 10)
        s.rms_dbfs = 10 * math.log10(s._energy / s._frames) if s._energy > 0 else DB_FLOOR
        s.peak_dbfs = max(s.peak_dbfs, lv.peak_dbfs)
        s.clipped_windows += lv.clipped
        s.overflows = overflows
        return LevelReading(s.windows, s.seconds, lv.rms_dbfs, lv.peak_dbfs, lv.clipped,
                            overflows)


def render(reading: LevelReading, width: int = 40) -> str:
    """One meter line: a bar (RMS filled, peak marked), the numbers, any warning."""

    def column(db: float) -> int:
        return round(min(1.0, max(0.0, 1 - db / BAR_FLOOR_DB)) * width)

    filled = column(reading.rms_dbfs)
    bar = ["#"] * filled + ["."] * (width - filled)
    peak = column(reading.peak_dbfs)
    if peak > 0:
        bar[peak - 1] = "|"
    line = (f"{reading.seconds:7.1f} s  [{''.join(bar)}]  rms {reading.rms_dbfs:6.1f} dBFS  "
            f"peak {reading.peak_dbfs:6.1f} dBFS  overflows {reading.overflows}")
    if reading.clipped:
        line += "  CLIPPING: lower the gain"
    return line


async def run_levels(
    source: Source,
    out: TextIO,
    *,
    seconds: float = 0.0,
    window_seconds: float = 0.1,
    print_every: int = 1,
    live: bool = False,
    meter: LevelMeter | None = None,
) -> LevelSummary:
    """Meter `source` until `seconds` of audio were captured (0: until cancelled).

    Args:
        print_every: print one reading in this many windows (the others still
            count in the summary, clipping included).
        live: rewrite one terminal line instead of printing a line per reading.
    """
    meter = meter or LevelMeter(source.rate, window_seconds)
    limit = round(seconds * source.rate) if seconds > 0 else None
    captured = 0
    async with source.open() as blocks:
        async for block in blocks:
            frames = block.frames
            if limit is not None:
                frames = frames[: limit - captured]
            captured += len(frames)
            stats = source.stats
            for reading in meter.add(frames, stats.input_overflows + stats.queue_drops):
                if reading.window % print_every == 0 or reading.clipped:
                    line = render(reading)
                    out.write(f"\r{line}\x1b[K" if live else line + "\n")
                    out.flush()
            if limit is not None and captured >= limit:
                break
    if live:
        out.write("\n")
    return meter.summary
