"""Transcripts on disk: one JSONL file per UTC day under `data_dir/transcripts`.

Owns `Transcript` (one line of the log), `TranscriptLog` (durable appends and
pruning to `days` days) and `read_transcripts` (a time range, for the device
API). Blocking file I/O: callers run it off the Trio thread.

Part of the `stt` stage. Imports only the bottom layer (`clock`); never agent,
another stage, metrics or api.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta
from pathlib import Path

import msgspec

from ..clock import iso_utc

__all__ = ["Transcript", "TranscriptLog", "read_transcripts"]

log = logging.getLogger(__name__)


class Transcript(msgspec.Struct, frozen=True, kw_only=True):
    """One line of the transcript log."""

    seq: int
    stream_id: str
    device_id: str
    start_utc: str
    end_utc: str
    duration: float
    text: str
    protocol: str
    latency_seconds: float  # the successful request's round trip
    age_seconds: float  # from the chunk being cut to its transcript (queueing, retries)
    attempts: int
    clock_synced: bool


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Transcript)


def _day_of(iso: str) -> str:
    return iso[:10]


class TranscriptLog:
    """Append-only JSONL files, one per UTC day (`YYYY-MM-DD.jsonl`), kept for
    `days` days. Blocking: call it from a worker thread."""

    def __init__(self, directory: Path, days: int) -> None:
        self.directory = Path(directory)
        self.days = days
        self._pruned_for: str | None = None

    def path_for(self, day: str) -> Path:
        return self.directory / f"{day}.jsonl"

    def append(self, t: Transcript) -> None:
        """Add one line and make it durable (a power cut loses at most this line)."""
        day = _day_of(t.start_utc)
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path_for(day), "ab") as f:
            f.write(_ENCODER.encode(t) + b"\n")
            f.flush()
            os.fdatasync(f.fileno())
        if self._pruned_for != day:
            self.prune(day)
            self._pruned_for = day

    def prune(self, today: str) -> list[Path]:
        """Delete day files older than `days` days before `today`; return them."""
        try:
            first_kept = datetime.strptime(today, "%Y-%m-%d") - timedelta(days=self.days - 1)
        except ValueError:
            return []
        removed = []
        for path in _day_files(self.directory):
            if path.stem < first_kept.strftime("%Y-%m-%d"):
                path.unlink(missing_ok=True)
                removed.append(path)
                log.info("transcripts pruned file=%s keep_days=%d", path.name, self.days)
        return removed


def _day_files(directory: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        stem, _, ext = name.partition(".")
        if ext == "jsonl" and len(stem) == 10 and stem[4] == "-" and stem[7] == "-":
            out.append(directory / name)
    return out


def read_transcripts(
    data_dir: Path, since: float | None = None, until: float | None = None, *,
    limit: int = 1000,
) -> list[Transcript]:
    """Transcripts whose chunk starts in `[since, until)` (UTC seconds), oldest
    first, at most `limit`. Lines that do not parse (a torn last line after a
    power cut) are skipped. Blocking: call it from a worker thread."""
    directory = Path(data_dir) / "transcripts"
    lo = iso_utc(since) if since is not None else None
    hi = iso_utc(until) if until is not None else None
    out: list[Transcript] = []
    for path in _day_files(directory):
        day = path.stem
        if (lo is not None and day < lo[:10]) or (hi is not None and day > hi[:10]):
            continue
        with open(path, "rb") as f:
            for line in f:
                try:
                    t = _DECODER.decode(line)
                except msgspec.DecodeError:
                    continue
                if (lo is None or t.start_utc >= lo) and (hi is None or t.start_utc < hi):
                    out.append(t)
                    if len(out) >= limit:
                        return out
    return out
