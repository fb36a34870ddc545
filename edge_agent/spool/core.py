"""The `Spool`: sealed segments on disk, their states, recovery and quota.

Owns the one object the agent hands to the segmenter, the uploader, the API and
the recordings: opening and sealing segments (``tmp/<id>`` published into
``sealed/`` with one rename), publishing a file encoded elsewhere, every state
move (``sealed/`` -> ``synced/`` or ``quarantine/``, eviction through ``trash/``),
digest checks, the queries, the health it reports, and waking the uploader. It
composes the pieces of this package: `SpoolFiles` (paths, durable steps),
`SegmentIndex` (entries, lock, sizes), `Recovery`, the pure decisions of ``quota``
and `SegmentWriter` with an encoder from `audio.encoders.make_encoder`.

Imports only the bottom layer (``audio``, ``clock``, ``config``, ``fs``, ``wire``,
``errors``) and this package; never agent or another stage.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import logging
from collections.abc import Sequence
from pathlib import Path

import trio

from ..audio.encoders import make_encoder
from ..audio.pcm import SampleFormat
from ..clock import Clock, iso_utc
from ..config import SegmentsConfig
from ..fs import FileOps
from ..wire import ClockStepNote, GapNote, SegmentMeta, SegmentState, new_segment_id
from .files import SpoolFiles
from .index import Entry, SegmentIndex
from .model import (
    FORMATS,
    MB,
    META_JSON,
    OPEN_JSON,
    REASON_TXT,
    SEALED,
    SEGMENT_FORMATS,
    SYNCED,
    RecoveryReport,
    SegmentHeader,
    SpoolError,
    SpoolStats,
    check_id,
    encode_json,
)
from .quota import expired, headroom, loss_note, over_quota, quota_limit
from .recovery import Recovery
from .writer import SegmentWriter

__all__ = ["Spool"]

log = logging.getLogger("edge_agent.spool")


class Spool:
    """Sealed segments on disk, their states, recovery and quota.

    The methods are synchronous and thread-safe (one lock orders state changes);
    the agent calls the ones that touch the disk in worker threads.
    :meth:`wait_pending` is the one async method.

    Args:
        root: The spool directory (``<data_dir>/spool``).
        device_id: Recorded in every segment.
        config: The ``[segments]`` section.
        clock: Wall clock for ``created_at``/``sealed_at`` and retention.
        fs: The file-operations layer (a faulty one in tests).
    """

    def __init__(self, root: Path, *, device_id: str, config: SegmentsConfig, clock: Clock,
                 fs: FileOps | None = None) -> None:
        self.root = Path(root)
        self.device_id = device_id
        self.config = config
        self.clock = clock
        self.fs = fs or FileOps()
        self.stats = SpoolStats()
        self.files = SpoolFiles(self.root, self.fs)
        self.index = SegmentIndex(self.stats)
        self._lock = self.index.lock
        self._recovery = Recovery(self.files, self.index, self._publish, self.note_disk_error)
        self._lot = trio.lowlevel.ParkingLot()
        self._token: trio.lowlevel.TrioToken | None = None
        self._disk_error: str | None = None
        self._loss_note: str | None = None
        self.recovered = False

    # -- health --------------------------------------------------------------

    @property
    def degraded_reason(self) -> str | None:
        """Why the spool is not healthy now, or None: a disk error not yet overcome,
        unsynced audio evicted by the last quota check, or quarantined segments held
        (audio the backend will never get unless somebody looks at it; the state
        clears when they are gone)."""
        quarantined = self.stats.quarantined_segments
        held = (f"{quarantined} quarantined segment(s) held, never to be uploaded "
                "(see /v1/segments?state=quarantined)") if quarantined else None
        return self._disk_error or self._loss_note or held

    @property
    def healthy(self) -> bool:
        return self.degraded_reason is None

    def note_disk_error(self, exc: BaseException, doing: str) -> None:
        """Record a failed disk operation (health turns degraded until `clear_disk_error`)."""
        with self._lock:
            self.stats.disk_errors += 1
            if isinstance(exc, OSError):
                name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                prefix = {"ENOSPC": "disk full", "EDQUOT": "disk quota exceeded",
                          "EROFS": "file system read-only"}.get(name, "disk error")
                self._disk_error = f"{prefix}: {name} {doing}: {exc.strerror or exc}"
            else:
                self._disk_error = f"cannot write segments: {doing}: {exc}"

    def clear_disk_error(self) -> None:
        with self._lock:
            if self._disk_error is not None:
                log.info("spool disk ok again after=%r", self._disk_error)
            self._disk_error = None

    def _count_fsync_failure(self) -> None:
        with self._lock:
            self.stats.fsync_failures += 1

    # -- paths -----------------------------------------------------------------

    def audio_path(self, segment_id: str) -> Path:
        """Where the segment's audio is now (it moves when its state changes).

        Raises:
            ValueError: Malformed id.
            KeyError: No such segment.
        """
        check_id(segment_id)
        with self._lock:
            entry = self.index.entries.get(segment_id)
            meta = entry.meta if entry is not None else None
            if entry is None or meta is None:
                raise KeyError(segment_id)
            return self.files.dir(entry.state, segment_id) / FORMATS[meta.format][0]

    # -- recording -------------------------------------------------------------

    def open_segment(self, *, start_ts: float, mono_start: float, rate: int, channels: int,
                     sample_format: SampleFormat | str, clock_synced: bool,
                     gaps: Sequence[GapNote] = (), clock_steps: Sequence[ClockStepNote] = (),
                     segment_id: str | None = None, now: float = 0.0,
                     fmt: str | None = None) -> SegmentWriter:
        """Start a segment in ``tmp/``: ``open.json`` and the audio file's first bytes,
        both durable before this returns.

        ``segment_id`` reuses an id (rewriting a segment whose first attempt failed),
        so a leftover of that attempt can never surface as a second segment.
        ``fmt`` overrides the configured format (WAV for a shutdown backlog).

        Raises:
            SpoolError: The configured format is not one segments are recorded in.
        """
        fmt = fmt or self.config.format
        if fmt not in SEGMENT_FORMATS:
            raise SpoolError(f"unknown segment format {fmt!r}; "
                             f"expected one of {sorted(SEGMENT_FORMATS)}")
        sfmt = SampleFormat(sample_format)
        seg_id = segment_id or new_segment_id(start_ts)
        check_id(seg_id)
        header = SegmentHeader(
            id=seg_id, device=self.device_id, start_ts=start_ts, mono_start=mono_start,
            rate=rate, channels=channels, format=fmt, content_type=FORMATS[fmt][1],
            sample_format=sfmt.value, clock_synced=clock_synced,
            created_at=iso_utc(self.clock.utc()),
            bitrate=self.config.bitrate if fmt == "opus" else None,
            gaps=list(gaps), clock_steps=list(clock_steps),
        )
        tags = {"ENCODER": "edge-agent", "DEVICE": self.device_id, "SEGMENT": seg_id,
                "DATE": iso_utc(start_ts)}
        encoder = make_encoder(fmt, rate, channels, sfmt, bitrate=self.config.bitrate,
                               complexity=self.config.complexity, comments=tags,
                               wav_sizes="durable")
        writer = SegmentWriter(self.fs, self.files.tmp(seg_id), header, encoder,
                               self.config.fsync_seconds,
                               on_fsync_failure=self._count_fsync_failure)
        fs = self.fs
        try:
            if fs.exists(writer.dir):
                self.files.discard(writer.dir)
            fs.makedirs(writer.dir)
            self.files.write_file(writer.dir / OPEN_JSON, encode_json(header))
            writer.open(now)
            fs.fsync_dir(writer.dir)
            fs.fsync_dir(self.files.tmp())
        except Exception:
            self.abort(writer)
            raise
        except BaseException:
            writer.close()
            raise
        log.debug("segment opened id=%s format=%s", seg_id, fmt)
        return writer

    def seal(self, seg: SegmentWriter, *, mono_end: float | None = None,
             gaps: Sequence[GapNote] = (),
             clock_steps: Sequence[ClockStepNote] = ()) -> SegmentMeta:
        """Finish the audio and publish audio and metadata together.

        ``mono_end`` is the monotonic time just after the last frame (by default the
        start plus the frames written plus the gaps). On any error the segment is
        not sealed: call :meth:`abort` and write it again.

        Raises:
            SpoolError: The segment holds no audio (abort it instead).
            OSError: A disk operation failed.
        """
        if seg.frames == 0:
            raise SpoolError(f"segment {seg.id} holds no audio; abort it instead")
        h = seg.header
        all_gaps = [*h.gaps, *gaps]
        if mono_end is None:
            holes = sum(g.seconds for g in all_gaps if g.frame > 0)
            mono_end = h.mono_start + seg.frames / h.rate + holes
        seg.finish()
        return self._publish(seg.dir, h, frames=seg.frames, mono_end=mono_end, gaps=all_gaps,
                             clock_steps=[*h.clock_steps, *clock_steps], recovered=False,
                             writer=seg)

    def _publish(self, src: Path, h: SegmentHeader, *, frames: int, mono_end: float,
                 gaps: builtins.list[GapNote], clock_steps: builtins.list[ClockStepNote],
                 recovered: bool, writer: SegmentWriter | None = None) -> SegmentMeta:
        """Write ``meta.json`` into ``src`` and rename it into ``sealed/`` (durable)."""
        fs = self.fs
        audio_name, content_type = FORMATS[h.format]
        size, digest = fs.sha256(src / audio_name)
        end_ts = h.start_ts + (mono_end - h.mono_start)
        meta = SegmentMeta(
            id=h.id, device=h.device, start_utc=iso_utc(h.start_ts), end_utc=iso_utc(end_ts),
            start_ts=h.start_ts, end_ts=end_ts, mono_start=h.mono_start, mono_end=mono_end,
            frames=frames, rate=h.rate, channels=h.channels, format=h.format,
            content_type=content_type, bytes=size, sha256=digest, clock_synced=h.clock_synced,
            gaps=gaps, clock_steps=clock_steps, recovered=recovered, created_at=h.created_at,
            sealed_at=iso_utc(self.clock.utc()), bitrate=h.bitrate,
            sample_format=h.sample_format, recording=h.recording,
        )
        self.files.write_file(src / META_JSON, encode_json(meta))
        fs.unlink(src / OPEN_JSON)
        fs.fsync_dir(src)
        dst = self.files.dir(SegmentState.SEALED, h.id)
        with self._lock:
            fs.rename(src, dst)
            if writer is not None:
                writer.published = True
            self.files.sync_parents(src, dst)
            self.index.entries[h.id] = Entry(meta, SegmentState.SEALED, size)
            self.stats.segments_sealed += 1
            if recovered:
                self.stats.segments_recovered += 1
            self.index.update_sizes()
        log.info("segment sealed id=%s seconds=%.3f bytes=%d recovered=%s", h.id,
                 meta.seconds, size, recovered)
        self._wake()
        return meta

    def publish_file(self, audio: Path, *, fmt: str, start_ts: float, mono_start: float,
                     mono_end: float, frames: int, rate: int, channels: int,
                     sample_format: SampleFormat | str, clock_synced: bool,
                     segment_id: str | None = None, recording: str = "",
                     bitrate: int | None = None, gaps: Sequence[GapNote] = ()) -> SegmentMeta:
        """Seal an audio file encoded outside the segmenter (a recording cut from the
        ring), moving it in: ``tmp/<id>/`` gets the file (fsynced), then it is sealed
        like any segment and queued for upload. ``audio`` must be on the spool's file
        system. A crash before the seal leaves ``tmp/<id>/`` without ``open.json``,
        which recovery quarantines (the audio is kept, never uploaded half-known).

        Raises:
            SpoolError: Unknown format or no audio.
            OSError: A disk operation failed (the file stays where it was if the move
                did not happen).
        """
        if fmt not in FORMATS:
            raise SpoolError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
        if frames <= 0:
            raise SpoolError(f"recording {audio.name} holds no audio")
        seg_id = segment_id or new_segment_id(start_ts)
        check_id(seg_id)
        header = SegmentHeader(
            id=seg_id, device=self.device_id, start_ts=start_ts, mono_start=mono_start,
            rate=rate, channels=channels, format=fmt, content_type=FORMATS[fmt][1],
            sample_format=SampleFormat(sample_format).value, clock_synced=clock_synced,
            created_at=iso_utc(self.clock.utc()), bitrate=bitrate, recording=recording,
        )
        fs = self.fs
        src = self.files.tmp(seg_id)
        fs.makedirs(src)
        fd = fs.open_rw(audio)
        try:
            fs.fsync(fd, str(audio))
        finally:
            fs.close(fd, str(audio))
        fs.rename(audio, src / FORMATS[fmt][0])
        fs.fsync_dir(src)
        fs.fsync_dir(src.parent)
        return self._publish(src, header, frames=frames, mono_end=mono_end, gaps=list(gaps),
                             clock_steps=[], recovered=False)

    def abort(self, seg: SegmentWriter) -> None:
        """Drop a segment that could not be written or sealed (best effort, never raises
        an OSError: whatever stays behind is cleaned up by the next recovery)."""
        seg.close()
        paths = [seg.dir]
        if seg.published:
            # Renamed into sealed/ but not durably: not listed, so drop it too.
            paths.append(self.files.dir(SegmentState.SEALED, seg.id))
        for path in paths:
            try:
                if self.fs.exists(path):
                    self.files.discard(path)
            except OSError as exc:
                log.warning("cannot remove abandoned segment path=%s error=%r", path, exc)

    # -- states ------------------------------------------------------------------

    def _move(self, segment_id: str, entry: Entry, to: SegmentState) -> None:
        src = self.files.dir(entry.state, segment_id)
        dst = self.files.dir(to, segment_id)
        self.fs.rename(src, dst)
        entry.state = to  # the directory moved: the index must say so even if fsync fails
        self.files.sync_parents(src, dst)

    def mark_synced(self, segment_id: str) -> None:
        """Record that the backend holds the segment; durable before it returns.

        Idempotent. A segment evicted meanwhile is ignored (logged).

        Raises:
            ValueError: Malformed id.
            SpoolError: The segment is quarantined.
            OSError: The state change could not be made durable; calling again is safe.
        """
        check_id(segment_id)
        with self._lock:
            entry = self.index.entries.get(segment_id)
            if entry is None:
                log.warning("mark_synced of a segment no longer held id=%s", segment_id)
                return
            if entry.state is SegmentState.QUARANTINED:
                raise SpoolError(f"segment {segment_id} is quarantined")
            if entry.state is SegmentState.SYNCED:
                # Maybe a retry after a failed directory fsync: make it durable again.
                self.fs.fsync_dir(self.files.subdir(SYNCED))
                self.fs.fsync_dir(self.files.subdir(SEALED))
                return
            self._move(segment_id, entry, SegmentState.SYNCED)
            self.stats.segments_synced += 1
            self.index.update_sizes()
        log.info("segment synced id=%s", segment_id)

    def quarantine(self, segment_id: str, reason: str) -> None:
        """Take a segment out of pending for good; ``reason`` is kept in ``reason.txt``.

        A segment evicted meanwhile is ignored (logged).

        Raises:
            ValueError: Malformed id.
            OSError: The change could not be made durable; calling again is safe.
        """
        check_id(segment_id)
        with self._lock:
            entry = self.index.entries.get(segment_id)
            if entry is None:
                log.warning("quarantine of a segment no longer held id=%s", segment_id)
                return
            if entry.state is SegmentState.QUARANTINED:
                return
            reason_file = self.files.dir(entry.state, segment_id) / REASON_TXT
            try:
                self.files.write_file(reason_file, reason.encode("utf-8", "replace") + b"\n")
            except OSError:
                # A reason file left behind would finish this quarantine at the next
                # recovery although the caller was told it failed.
                with contextlib.suppress(OSError):
                    self.fs.unlink(reason_file)
                raise
            self._move(segment_id, entry, SegmentState.QUARANTINED)
            self.stats.segments_quarantined += 1
            self.index.update_sizes()
        log.warning("segment quarantined id=%s reason=%r", segment_id, reason)

    def verify(self, segment_id: str) -> bool:
        """Re-hash the audio file against its metadata (bit rot, truncation).

        A mismatch or a missing file returns False and is counted; the caller
        quarantines the segment.

        Raises:
            ValueError: Malformed id.
            KeyError: No such segment.
        """
        path = self.audio_path(segment_id)
        with self._lock:
            meta = self.index.entries[segment_id].meta
        assert meta is not None
        try:
            size, digest = self.fs.sha256(path)
        except FileNotFoundError:
            size, digest = -1, ""
        ok = size == meta.bytes and digest == meta.sha256
        if not ok:
            with self._lock:
                self.stats.integrity_failures += 1
            log.warning("segment fails its digest id=%s bytes=%d expected_bytes=%d",
                        segment_id, size, meta.bytes)
        return ok

    # -- queries -------------------------------------------------------------------

    def get(self, segment_id: str) -> tuple[SegmentMeta, SegmentState] | None:
        """The segment's metadata and state, or None.

        Raises:
            ValueError: Malformed id.
        """
        check_id(segment_id)
        return self.index.get(segment_id)

    def pending(self) -> builtins.list[SegmentMeta]:
        """Sealed segments not yet synced, oldest first."""
        return self.index.pending()

    async def wait_pending(self) -> None:
        """Return once at least one segment is pending (at once if one is).

        Each seal wakes the waiters immediately, so an uploader never polls.
        """
        self._token = trio.lowlevel.current_trio_token()
        await trio.lowlevel.checkpoint()
        while not self.index.has_pending():
            await self._lot.park()

    def _wake(self) -> None:
        """Wake `wait_pending` from any thread."""
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            token = self._token
            if token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(self._lot.unpark_all)
        else:
            self._lot.unpark_all()

    # -- quota -----------------------------------------------------------------------

    def enforce_quota(self) -> None:
        """Evict until the spool fits ``max_spool_mb`` and leaves ``min_free_mb`` free.

        Order: synced segments past ``retain_synced_hours`` (always), then synced ones
        oldest first, then quarantined ones, then, only when unsynced audio alone is
        over the limit, unsynced ones oldest first but never the newest: each logged
        and counted as loss. The disk keeps room for one more segment even with
        ``min_free_mb = 0``. The decisions are the pure functions of ``quota``.

        Raises:
            OSError: The disk could not be queried or a segment not removed.
        """
        cfg, stats = self.config, self.stats
        with self._lock:
            retain = cfg.retain_synced_hours * 3600.0
            for seg_id in expired(self.index.held(), now=self.clock.utc(),
                                  retain_seconds=retain):
                self._evict(seg_id)
                stats.evicted_expired += 1
            free = self.fs.disk_free(self.root)
            held = self.index.held()
            limit = quota_limit(used=sum(h.bytes for h in held), free=free,
                                max_bytes=cfg.max_spool_mb * MB,
                                min_free_bytes=cfg.min_free_mb * MB, headroom=headroom(held))
            evicted_unsynced = 0
            for h in over_quota(held, limit=limit):
                self._evict(h.id)
                if h.state is SegmentState.SYNCED:
                    stats.evicted_synced += 1
                elif h.state is SegmentState.QUARANTINED:
                    stats.evicted_quarantined += 1
                else:
                    evicted_unsynced += 1
                    stats.evicted_unsynced += 1
                    stats.evicted_unsynced_seconds += h.seconds
                    stats.evicted_unsynced_bytes += h.bytes
                    log.error("unsynced audio evicted id=%s seconds=%.3f bytes=%d "
                              "limit_bytes=%d", h.id, h.seconds, h.bytes, limit)
            self._loss_note = loss_note(evicted_unsynced, limit)
            self.index.update_sizes()

    def _evict(self, segment_id: str) -> None:
        entry = self.index.entries[segment_id]
        self.files.discard(self.files.dir(entry.state, segment_id))
        del self.index.entries[segment_id]

    # -- recovery ----------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Bring the spool directory to a clean state and load the index; run once at start.

        Every temp segment is finished, salvaged (``recovered=True``), removed when
        nothing in it is audio, or quarantined when it cannot be read. Sealed and
        synced segments whose metadata cannot be read are quarantined.

        Raises:
            OSError: The spool directory itself cannot be used.
        """
        with self._lock:
            report = self._recovery.recover()
            self.recovered = True
        log.info("spool recovered root=%s pending=%d synced=%d quarantined=%d completed=%d "
                 "salvaged=%d salvaged_seconds=%.3f discarded=%d newly_quarantined=%d",
                 self.root, report.sealed, report.synced, report.quarantined,
                 len(report.completed), len(report.recovered), report.recovered_seconds,
                 len(report.discarded), len(report.newly_quarantined))
        if report.sealed:
            self._wake()
        return report

    def salvage(self, segment_id: str) -> SegmentMeta | None:
        """Seal what is intact of a segment left in ``tmp/`` (as recovery does at start).

        The segmenter uses it for a segment it had to set aside for lack of space.
        Returns the sealed metadata (``recovered=True``), or None when nothing was
        salvageable (removed) or the file was unreadable (quarantined).

        Raises:
            OSError: Still no room (the temp segment stays as it is; call again later).
        """
        check_id(segment_id)
        return self._recovery.salvage(segment_id)

    # -- listing (last: its name shadows the builtin in the class body) --------------

    def list(self, *, since: float | None = None, until: float | None = None,
             state: SegmentState | None = None, limit: int | None = None,
             newest_first: bool = True) -> builtins.list[tuple[SegmentMeta, SegmentState]]:
        """Segments overlapping ``[since, until)`` (epoch seconds), optionally in one state."""
        return self.index.select(since=since, until=until, state=state, limit=limit,
                                 newest_first=newest_first)
