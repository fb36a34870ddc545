"""The spool's vocabulary: its on-disk layout, records, counters and error.

Owns the file and directory names of a spool (``tmp/``, ``sealed/``, ``synced/``,
``quarantine/``, ``trash/``; ``open.json``, ``meta.json``, ``reason.txt`` and the
audio file of each format), `SegmentHeader` (``open.json``), `SpoolStats`,
`RecoveryReport` and `SpoolError`. Plain values: no disk, no Trio.

Imports only the bottom layer (``wire``, ``errors``); never agent or another stage.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec

from ..errors import EdgeAgentError
from ..wire import ClockStepNote, GapNote, SegmentState, is_segment_id

__all__ = [
    "ALL_DIRS",
    "FORMATS",
    "MB",
    "META_JSON",
    "META_VERSION",
    "OPEN_JSON",
    "QUARANTINE",
    "REASON_TXT",
    "SEALED",
    "SEGMENT_FORMATS",
    "STATE_DIRS",
    "SYNCED",
    "TMP",
    "TRASH",
    "RecoveryReport",
    "SegmentHeader",
    "SpoolError",
    "SpoolStats",
    "check_id",
    "dir_audio_bytes",
    "encode_json",
]

FORMATS: Final = {
    # format: (audio file name, Content-Type)
    "opus": ("audio.opus", "audio/ogg; codecs=opus"),
    "flac": ("audio.oga", "audio/ogg; codecs=flac"),
    "wav": ("audio.wav", "audio/wav"),
    # Only recordings cut by recordings.AgentRecordings (published with publish_file).
    "mp3": ("audio.mp3", "audio/mpeg"),
    "pcm": ("audio.pcm", "application/octet-stream"),
}
#: Formats the segmenter records (a `SegmentWriter` can write).
SEGMENT_FORMATS: Final = ("opus", "flac", "wav")

OPEN_JSON: Final = "open.json"
META_JSON: Final = "meta.json"
REASON_TXT: Final = "reason.txt"
TMP, SEALED, SYNCED, QUARANTINE, TRASH = "tmp", "sealed", "synced", "quarantine", "trash"
ALL_DIRS: Final = (TMP, SEALED, SYNCED, QUARANTINE, TRASH)
STATE_DIRS: Final = {
    SegmentState.SEALED: SEALED,
    SegmentState.SYNCED: SYNCED,
    SegmentState.QUARANTINED: QUARANTINE,
}
MB: Final = 1024 * 1024
META_VERSION: Final = 1


def check_id(segment_id: str) -> None:
    """Raise ValueError unless ``segment_id`` is a well-formed segment id."""
    if not is_segment_id(segment_id):
        raise ValueError(
            f"bad segment id {segment_id!r}; expected e.g. 20261124T053000.000Z-3f9a1c2b"
        )


def encode_json(obj: msgspec.Struct) -> bytes:
    """``open.json``/``meta.json`` bytes: indented, one trailing newline."""
    return msgspec.json.format(msgspec.json.encode(obj), indent=2) + b"\n"


def dir_audio_bytes(path: Path) -> int:
    """Bytes of the audio files in a segment directory (any format; 0 if none)."""
    total = 0
    for name, _ in FORMATS.values():
        with contextlib.suppress(OSError):
            total += (path / name).stat().st_size
    return total


class SegmentHeader(msgspec.Struct, frozen=True, kw_only=True):
    """``tmp/<id>/open.json``: what recovery needs to seal a segment cut short."""

    id: str
    device: str
    start_ts: float
    mono_start: float
    rate: int
    channels: int
    format: str
    content_type: str
    sample_format: str
    clock_synced: bool
    created_at: str
    bitrate: int | None = None
    gaps: list[GapNote] = []
    clock_steps: list[ClockStepNote] = []
    recording: str = ""
    version: int = META_VERSION


@dataclass
class SpoolStats:
    """Counters for metrics (since this process started) and current sizes."""

    segments_sealed: int = 0  # including those sealed by salvaging (segments_recovered)
    segments_recovered: int = 0
    segments_synced: int = 0
    segments_quarantined: int = 0
    # Temp segments with nothing salvageable (crash right after opening one).
    segments_discarded: int = 0
    evicted_synced: int = 0
    evicted_expired: int = 0
    evicted_quarantined: int = 0
    evicted_unsynced: int = 0
    evicted_unsynced_seconds: float = 0.0
    evicted_unsynced_bytes: int = 0
    # Sealed files whose bytes no longer match their digest (bit rot, truncation).
    integrity_failures: int = 0
    disk_errors: int = 0
    fsync_failures: int = 0
    # Current sizes.
    bytes_used: int = 0
    pending_segments: int = 0
    pending_bytes: int = 0
    synced_segments: int = 0
    quarantined_segments: int = 0


@dataclass
class RecoveryReport:
    """What :meth:`Spool.recover` found and did."""

    sealed: int = 0
    synced: int = 0
    quarantined: int = 0
    completed: list[str] = field(default_factory=list)  # seals a crash interrupted
    recovered: list[str] = field(default_factory=list)  # salvaged, recovered=True
    recovered_seconds: float = 0.0
    discarded: list[str] = field(default_factory=list)  # nothing salvageable
    newly_quarantined: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    trash_removed: int = 0
    left_in_tmp: list[str] = field(default_factory=list)  # disk errors; retried next start


class SpoolError(EdgeAgentError):
    """A segment cannot be written or sealed (not a disk error: misuse or bad audio)."""
