"""A model of the spool, checked step by step against the real one (Hypothesis).

The machine records, seals, uploads (ok, rejected, acknowledgement lost), lets time
pass (retention), fills and frees the disk (quota, ENOSPC), and crashes and restarts
the process, in any order. After every step the real spool's pending ids, synced and
quarantined ids, bytes used, eviction and loss counters and health must equal what
the model says, exactly.

The model is the rule as specified, written plainly: a segment's audio costs
``44 + 2 * frames`` bytes (16-bit mono WAV); the spool may use at most
``max(0, min(max_spool_mb, disk - other_usage - max(min_free_mb, largest segment)))``;
eviction takes synced segments past retention, then synced, then quarantined, then
unsynced ones but never the newest, each group oldest first, and only unsynced
evictions count as loss. Health is degraded by a disk error, a loss, or a held
quarantined segment. WAV is used so that
what a crash leaves is exact (every write is followed by an fsync here).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from edge_agent.clock import ManualClock
from edge_agent.config import SegmentsConfig
from edge_agent.spool import SegmentWriter, Spool
from edge_agent.wire import SegmentState

from support.spool_rig import UTC0, FaultyOps, signal_at

RATE = 8000
MB = 1024 * 1024
DISK = 3 * MB
CONFIG = SegmentsConfig(format="wav", max_spool_mb=1, min_free_mb=1, retain_synced_hours=2,
                        fsync_seconds=1.0)


class ModelDisk(FaultyOps):
    """A small disk: free space is what the spool's audio and other files leave."""

    def __init__(self, root: Path) -> None:
        super().__init__(fake_fsync=True, fail_when=self._full)
        self.root = root
        self.other = 0
        self.full = False

    def _full(self, op: str, path: str) -> OSError | None:
        if self.full and op in ("create", "write", "pwrite", "mkdir"):
            return OSError(errno.ENOSPC, "No space left on device", path)
        return None

    def disk_free(self, path: Path) -> int:
        used = sum(f.stat().st_size for state in ("sealed", "synced", "quarantine")
                   for f in (self.root / state).glob("*/audio.*"))
        return DISK - self.other - used


@dataclass
class Seg:
    state: SegmentState
    frames: int
    start_ts: float

    @property
    def bytes(self) -> int:
        return 44 + 2 * self.frames

    @property
    def end_ts(self) -> float:
        return self.start_ts + self.frames / RATE


class SpoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-model-"))
        self.disk = ModelDisk(self.dir)
        self.clock = ManualClock(utc_now=UTC0)
        self.now = 0.0  # the segmenter's monotonic time, for fsync pacing
        self.writer: SegmentWriter | None = None
        self.open_frames = 0
        self.open_start = 0.0
        # The model.
        self.segs: dict[str, Seg] = {}
        self.orphans: list[tuple[float, int]] = []  # left in tmp/ by a failed recovery
        self.counts: dict[str, int] = {}
        self.lost_seconds = 0.0
        self.disk_error = False
        self.loss_note = False

    @initialize()
    def start(self) -> None:
        self.spool = Spool(self.dir, device_id="dev-1", config=CONFIG, clock=self.clock,
                           fs=self.disk)
        self.spool.recover()

    def teardown(self) -> None:
        self.die()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def die(self) -> None:
        """The process ends without sealing: its open file is simply closed."""
        if self.writer is not None and self.writer._fd is not None:
            os.close(self.writer._fd)
            self.writer._fd = None
        self.writer = None

    def disk_failed(self, exc: OSError) -> None:
        """The segmenter's reaction to a disk error: note it, abandon the segment."""
        assert exc.errno == errno.ENOSPC, exc
        self.spool.note_disk_error(exc, "writing a segment")
        self.count("disk_errors")
        self.disk_error = True
        if self.writer is not None:
            self.spool.abort(self.writer)
        self.writer = None

    def disk_ok(self) -> None:
        self.spool.clear_disk_error()
        self.disk_error = False

    def write(self, frames: int) -> None:
        assert self.writer is not None
        self.now += 2 * CONFIG.fsync_seconds  # every write is followed by an fsync
        self.writer.write(signal_at(self.open_frames, frames, RATE), now=self.now)
        self.open_frames += frames

    def enforce(self) -> None:
        """The quota rule as specified, applied to the model, then to the spool."""
        now = self.clock.utc()
        for seg_id in sorted(self.segs):
            seg = self.segs[seg_id]
            if seg.state is SegmentState.SYNCED and now - seg.end_ts >= 2 * 3600:
                del self.segs[seg_id]
                self.count("evicted_expired")
        # Room for one more segment like the largest held, and never a negative cap.
        room = max(CONFIG.min_free_mb * MB, max((s.bytes for s in self.segs.values()), default=0))
        cap = max(0, min(CONFIG.max_spool_mb * MB, DISK - self.disk.other - room))
        used = sum(s.bytes for s in self.segs.values())
        lost_now = 0
        newest_unsynced = max(self.ids(SegmentState.SEALED), default=None)
        for state in (SegmentState.SYNCED, SegmentState.QUARANTINED, SegmentState.SEALED):
            for seg_id in sorted(i for i, s in self.segs.items() if s.state is state):
                if used <= cap:
                    break
                if seg_id == newest_unsynced:  # never evicted: the uploader sends it next
                    continue
                seg = self.segs.pop(seg_id)
                used -= seg.bytes
                name = {SegmentState.SYNCED: "evicted_synced",
                        SegmentState.QUARANTINED: "evicted_quarantined",
                        SegmentState.SEALED: "evicted_unsynced"}[state]
                self.count(name)
                if state is SegmentState.SEALED:
                    lost_now += 1
                    self.lost_seconds += seg.frames / RATE
        self.loss_note = lost_now > 0
        self.spool.enforce_quota()

    def ids(self, state: SegmentState) -> list[str]:
        return sorted(i for i, s in self.segs.items() if s.state is state)

    # -- rules -------------------------------------------------------------------------

    @precondition(lambda self: self.writer is None)
    @rule(frames=st.integers(1, 100).map(lambda k: k * 800))
    def record_a_segment(self, frames: int) -> None:
        """Open, write and seal in one step: the segmenter's everyday path."""
        self.open_and_write(frames)
        if self.writer is not None:
            self.seal()

    @precondition(lambda self: self.writer is None)
    @rule(frames=st.integers(1, 40).map(lambda k: k * 400))
    def open_and_write(self, frames: int) -> None:
        self.clock.utc_now += 1.0
        self.open_start, self.open_frames = self.clock.utc(), 0
        try:
            self.writer = self.spool.open_segment(
                start_ts=self.open_start, mono_start=0.0, rate=RATE, channels=1,
                sample_format="int16", clock_synced=True, now=self.now)
            self.write(frames)
        except OSError as exc:
            self.disk_failed(exc)
            return
        self.disk_ok()

    @precondition(lambda self: self.writer is not None)
    @rule(frames=st.integers(1, 40).map(lambda k: k * 400))
    def write_more(self, frames: int) -> None:
        try:
            self.write(frames)
        except OSError as exc:
            self.disk_failed(exc)

    @precondition(lambda self: self.writer is not None)
    @rule()
    def seal(self) -> None:
        assert self.writer is not None
        try:
            meta = self.spool.seal(self.writer)
        except OSError as exc:
            self.disk_failed(exc)
            return
        self.disk_ok()
        self.writer = None
        assert meta.frames == self.open_frames and meta.bytes == 44 + 2 * self.open_frames
        self.segs[meta.id] = Seg(SegmentState.SEALED, self.open_frames, self.open_start)
        self.count("segments_sealed")
        self.enforce()

    @precondition(lambda self: any(s.state is SegmentState.SEALED for s in self.segs.values()))
    @rule(pick=st.integers(0, 100))
    def upload_ok(self, pick: int) -> None:
        pending = self.ids(SegmentState.SEALED)
        seg_id = pending[pick % len(pending)]
        self.spool.mark_synced(seg_id)
        self.segs[seg_id].state = SegmentState.SYNCED
        self.count("segments_synced")

    @precondition(lambda self: any(s.state is SegmentState.SEALED for s in self.segs.values()))
    @rule(pick=st.integers(0, 100))
    def upload_rejected(self, pick: int) -> None:
        pending = self.ids(SegmentState.SEALED)
        seg_id = pending[pick % len(pending)]
        try:
            self.spool.quarantine(seg_id, "backend said 400")
        except OSError as exc:  # no room for the reason file: nothing changes
            assert self.disk.full and exc.errno == errno.ENOSPC
            return
        self.segs[seg_id].state = SegmentState.QUARANTINED
        self.count("segments_quarantined")

    @rule()
    def acknowledgement_lost(self) -> None:
        """The backend stored a segment but the answer never came: the spool must
        simply still list it as pending (nothing to do, nothing may change)."""

    @rule(hours=st.sampled_from([0.5, 1.0, 3.0]))
    def time_passes(self, hours: float) -> None:
        self.clock.utc_now += hours * 3600
        self.enforce()

    @rule(other_mb=st.sampled_from([0.0, 0.5, 1.0, 1.5, 1.8]))
    def another_program_uses_the_disk(self, other_mb: float) -> None:
        self.disk.other = round(other_mb * MB)
        self.enforce()

    @rule()
    def disk_fills_or_empties(self) -> None:
        self.disk.full = not self.disk.full

    @rule()
    def crash_and_restart(self) -> None:
        if self.writer is not None and self.open_frames:
            self.orphans.append((self.open_start, self.open_frames))
        self.die()
        self.spool = Spool(self.dir, device_id="dev-1", config=CONFIG, clock=self.clock,
                           fs=self.disk)
        # A new process: counters start again; health is what recovery found.
        self.counts, self.lost_seconds, self.loss_note, self.disk_error = {}, 0.0, False, False
        report = self.spool.recover()
        if self.disk.full:
            # No room to seal the salvaged audio: it waits in tmp/ for the next start.
            assert len(report.left_in_tmp) == len(self.orphans)
            if self.orphans:
                self.count("disk_errors", len(self.orphans))
                self.disk_error = True
            return
        assert len(report.recovered) == len(self.orphans) and report.left_in_tmp == []
        for seg_id in report.recovered:
            meta = self.spool.get(seg_id)
            assert meta is not None and meta[0].recovered
            start, frames = next(o for o in self.orphans if o[0] == meta[0].start_ts)
            assert meta[0].frames == frames
            self.segs[seg_id] = Seg(SegmentState.SEALED, frames, start)
            self.count("segments_sealed")
            self.count("segments_recovered")
        self.orphans = []

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def matches_the_model(self) -> None:
        spool, stats = self.spool, self.spool.stats
        assert [m.id for m in spool.pending()] == self.ids(SegmentState.SEALED)
        for state in (SegmentState.SYNCED, SegmentState.QUARANTINED):
            assert sorted(m.id for m, _ in spool.list(state=state)) == self.ids(state)
        assert stats.bytes_used == sum(s.bytes for s in self.segs.values())
        assert stats.pending_bytes == sum(
            s.bytes for s in self.segs.values() if s.state is SegmentState.SEALED)
        for name in ("segments_sealed", "segments_recovered", "segments_synced",
                     "segments_quarantined", "evicted_synced", "evicted_expired",
                     "evicted_quarantined", "evicted_unsynced", "disk_errors"):
            assert getattr(stats, name) == self.counts.get(name, 0), name
        assert stats.evicted_unsynced_seconds == pytest.approx(self.lost_seconds)
        reason = spool.degraded_reason
        quarantined = bool(self.ids(SegmentState.QUARANTINED))
        assert (reason is not None) == (self.disk_error or self.loss_note or quarantined), reason
        if self.disk_error:
            assert reason is not None and reason.startswith("disk full: ENOSPC")
        elif self.loss_note:
            assert reason is not None and reason.startswith("unsynced audio evicted")
        elif quarantined:
            assert reason is not None and "quarantined segment(s) held" in reason


SpoolMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("SPOOL_MODEL_EXAMPLES", "40")), stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSpoolModel = SpoolMachine.TestCase
