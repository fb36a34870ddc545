"""Recovery: bring a spool directory left by a crash to a clean state, and load it.

Owns `Recovery`, run once at start (and for a segment the segmenter set aside for
lack of space): empties ``trash/``; loads ``sealed/``, ``synced/`` and
``quarantine/`` into the index, quarantining any directory whose metadata or audio
does not check out and finishing a quarantine a crash interrupted; and for each
``tmp/<id>`` finishes a seal a crash interrupted, salvages the intact part of a cut
file (sealed with ``recovered=True``), removes what holds no audio, or quarantines
what cannot be read. What is intact is decided by `salvage.salvage` on the mapped
file; sealing goes through the spool's own publish step.

Imports only the bottom layer (``fs``, ``wire``, the spool's ``model``, ``files``,
``index``, ``salvage``); never agent or another stage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import msgspec

from ..wire import ClockStepNote, GapNote, SegmentMeta, SegmentState, is_segment_id
from .files import SpoolFiles
from .index import Entry, SegmentIndex
from .model import (
    FORMATS,
    META_JSON,
    OPEN_JSON,
    QUARANTINE,
    REASON_TXT,
    STATE_DIRS,
    TRASH,
    RecoveryReport,
    SegmentHeader,
    dir_audio_bytes,
)
from .salvage import Salvage, Unsalvageable, salvage

__all__ = ["Publish", "Recovery"]

log = logging.getLogger("edge_agent.spool")

_LOADED_STATES = (SegmentState.SEALED, SegmentState.SYNCED, SegmentState.QUARANTINED)


class Publish(Protocol):
    """The spool's seal step: write ``meta.json`` into ``src`` and rename it into
    ``sealed/`` (see `Spool`)."""

    def __call__(self, src: Path, h: SegmentHeader, *, frames: int, mono_end: float,
                 gaps: list[GapNote], clock_steps: list[ClockStepNote],
                 recovered: bool) -> SegmentMeta: ...


class Recovery:
    """Recovers the spool directory of ``files`` into ``index``.

    Args:
        files: The spool directory.
        index: Filled by :meth:`recover`; updated by :meth:`salvage`.
        publish: Seals a salvaged ``tmp/<id>`` (the spool's publish step).
        note_disk_error: Records a temp segment that a disk error kept from recovery.
    """

    def __init__(self, files: SpoolFiles, index: SegmentIndex, publish: Publish,
                 note_disk_error: Callable[[BaseException, str], None]) -> None:
        self.files = files
        self.index = index
        self.publish = publish
        self.note_disk_error = note_disk_error

    def recover(self) -> RecoveryReport:
        """Clean the directory and load the index (see `Spool.recover`).

        Raises:
            OSError: The spool directory itself cannot be used.
        """
        files, fs, index = self.files, self.files.fs, self.index
        report = RecoveryReport()
        files.make_dirs()
        with index.lock:
            index.entries.clear()
            trash = files.subdir(TRASH)
            for name in fs.listdir(trash):
                fs.rmtree(trash / name)
                report.trash_removed += 1
            for state in _LOADED_STATES:
                for name in fs.listdir(files.subdir(STATE_DIRS[state])):
                    self._load(name, state, report)
            for name in fs.listdir(files.tmp()):
                try:
                    self._recover_tmp(name, report)
                except OSError as exc:
                    # A full disk must not keep the agent from recording: leave it for
                    # the next start and go on.
                    self.note_disk_error(exc, f"recovering tmp/{name}")
                    report.left_in_tmp.append(name)
                    log.error("cannot recover temp segment name=%s error=%r", name, exc)
            index.update_sizes()
            stats = index.stats
            report.sealed = stats.pending_segments
            report.synced = stats.synced_segments
            report.quarantined = stats.quarantined_segments
        return report

    def salvage(self, segment_id: str) -> SegmentMeta | None:
        """Seal what is intact of ``tmp/<segment_id>`` (see `Spool.salvage`)."""
        index = self.index
        with index.lock:
            self._recover_tmp(segment_id, RecoveryReport())
            index.update_sizes()
            entry = index.entries.get(segment_id)
            if entry is None or entry.state is not SegmentState.SEALED:
                return None
            return entry.meta

    def _load(self, name: str, state: SegmentState, report: RecoveryReport) -> None:
        files, fs = self.files, self.files.fs
        seg_dir = files.dir(state, name)
        if state is SegmentState.QUARANTINED:
            try:
                meta: SegmentMeta | None = files.read_meta(seg_dir / META_JSON)
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                meta = None
            keep = meta if meta is not None and meta.id == name else None
            self.index.entries[name] = Entry(keep, state, dir_audio_bytes(seg_dir))
            return
        reason = None
        meta = None
        if not is_segment_id(name):
            reason = "directory name is not a segment id"
        else:
            try:
                meta = files.read_meta(seg_dir / META_JSON)
            except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                reason = f"unreadable meta.json: {exc}"
        if meta is not None:
            audio = seg_dir / FORMATS.get(meta.format, ("?",))[0]
            if meta.id != name:
                reason = f"meta.json is for segment {meta.id}"
            elif not fs.exists(audio):
                reason = "audio file missing"
            elif (size := fs.size(audio)) != meta.bytes:
                reason = f"audio file holds {size} bytes, meta.json says {meta.bytes}"
        if reason is None and fs.exists(seg_dir / REASON_TXT):
            # A quarantine a crash interrupted: finish it.
            reason = fs.read_bytes(seg_dir / REASON_TXT).decode("utf-8", "replace").strip()
            self._to_quarantine(seg_dir, name, reason, report, write_reason=False, meta=meta)
            return
        if reason is not None:
            self._to_quarantine(seg_dir, name, reason, report, meta=meta)
            return
        assert meta is not None
        self.index.entries[name] = Entry(meta, state, meta.bytes)

    def _to_quarantine(self, src: Path, name: str, reason: str, report: RecoveryReport, *,
                       write_reason: bool = True, meta: SegmentMeta | None = None) -> None:
        files, fs = self.files, self.files.fs
        safe = name if re.fullmatch(r"[A-Za-z0-9._-]{1,100}", name) else secrets.token_hex(8)
        dst = files.subdir(QUARANTINE) / safe
        if fs.exists(dst):
            dst = dst.with_name(f"{safe}.{secrets.token_hex(4)}")
        if write_reason:
            files.write_file(src / REASON_TXT, reason.encode("utf-8", "replace") + b"\n")
        fs.rename(src, dst)
        files.sync_parents(src, dst)
        keep = meta if meta is not None and meta.id == dst.name else None
        self.index.entries[dst.name] = Entry(keep, SegmentState.QUARANTINED,
                                             dir_audio_bytes(dst))
        self.index.stats.segments_quarantined += 1
        report.newly_quarantined.append((name, reason))
        log.warning("quarantined in recovery name=%s reason=%r", name, reason)

    def _discard_tmp(self, src: Path, name: str, report: RecoveryReport) -> None:
        """Remove a temp segment that holds no audio."""
        self.files.discard(src)
        self.index.stats.segments_discarded += 1
        report.discarded.append(name)

    def _recover_tmp(self, name: str, report: RecoveryReport) -> None:
        files, fs, index = self.files, self.files.fs, self.index
        src = files.tmp(name)
        if name in index.entries:
            # A rewrite of this id was sealed: this is the abandoned first attempt.
            files.discard(src)
            report.discarded.append(name)
            return
        header = None
        with contextlib.suppress(OSError, msgspec.DecodeError, msgspec.ValidationError):
            header = msgspec.json.decode(fs.read_bytes(src / OPEN_JSON), type=SegmentHeader)
        complete = None
        with contextlib.suppress(OSError, msgspec.DecodeError, msgspec.ValidationError):
            meta = files.read_meta(src / META_JSON)
            audio = src / FORMATS[meta.format][0]
            if meta.id == name and fs.sha256(audio) == (meta.bytes, meta.sha256):
                complete = meta
        if complete is not None:
            # A crash between writing meta.json and the rename: finish the seal.
            fs.unlink(src / OPEN_JSON)
            fs.fsync_dir(src)
            dst = files.dir(SegmentState.SEALED, name)
            fs.rename(src, dst)
            files.sync_parents(src, dst)
            index.entries[name] = Entry(complete, SegmentState.SEALED, complete.bytes)
            index.stats.segments_sealed += 1
            report.completed.append(name)
            return
        if header is None or header.id != name or header.format not in FORMATS:
            if dir_audio_bytes(src) == 0:
                self._discard_tmp(src, name, report)
            else:
                self._to_quarantine(src, name, "no readable open.json for the audio", report)
            return
        audio = src / FORMATS[header.format][0]
        try:
            if fs.exists(audio):
                with fs.map_file(audio) as view:
                    kept = salvage(view, header)
            else:
                kept = Salvage(0, 0, [])
        except Unsalvageable as exc:
            self._to_quarantine(src, name, f"cannot salvage: {exc}", report)
            return
        if kept.frames == 0:
            self._discard_tmp(src, name, report)
            log.info("discarded empty temp segment id=%s", name)
            return
        fd = fs.open_rw(audio)
        try:
            fs.truncate(fd, kept.keep_bytes, str(audio))
            for offset, data in kept.patches:
                fs.pwrite(fd, data, offset, str(audio))
            if kept.tail:  # the intact pages from past damage, spliced on
                fs.pwrite(fd, kept.tail, kept.keep_bytes, str(audio))
            fs.fsync(fd, str(audio))
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        fs.close(fd, str(audio))
        seconds = kept.frames / header.rate
        lost = sum(g.seconds for g in kept.gaps)
        if kept.gaps:
            log.warning("salvaged past damage id=%s gaps=%d lost_seconds=%.3f", name,
                        len(kept.gaps), lost)
        self.publish(src, header, frames=kept.frames,
                     mono_end=header.mono_start + seconds + lost,
                     gaps=[*header.gaps, *kept.gaps], clock_steps=list(header.clock_steps),
                     recovered=True)
        report.recovered.append(name)
        report.recovered_seconds += seconds
