"""The agent's recordings on demand: named stretches of the continuous capture.

Owns `AgentRecordings` (the supervised stage: start/stop/list, sealing into the
spool), its errors (`RecordingConflict`, `RecordingLimit`), its counters
(`RecordingsStats`) and `RecordingSpool`, the Protocol of exactly what it uses of
the spool (the agent passes the real `Spool` in; the spool never imports this).

Imports only the bottom layer (and ``store`` for keys); never agent, recorder,
api, spool or another stage.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..audio.encoders import PcmLayout
from ..audio.pcm import SampleFormat
from ..blocking import ThreadRunner
from ..clock import Clock, iso_utc
from ..errors import EdgeAgentError
from ..ring import AudioRing
from ..store import KeyBuilder, check_key
from ..supervisor import TaskStatus
from ..wire import GapNote, SegmentMeta, SegmentState, is_segment_id, new_segment_id
from .file import FileRecording
from .formats import FORMAT_INFO, AudioFormat, EncodeOptions, audio_format, new_encoder

if TYPE_CHECKING:
    from ..config import RecordingsConfig

__all__ = [
    "AgentRecordings",
    "RecordingConflict",
    "RecordingLimit",
    "RecordingSpool",
    "RecordingsStats",
]

log = logging.getLogger(__name__)


class RecordingSpool(Protocol):
    """What `AgentRecordings` uses of the spool (`spool.Spool` has it)."""

    def publish_file(self, audio: Path, *, fmt: str, start_ts: float, mono_start: float,
                     mono_end: float, frames: int, rate: int, channels: int,
                     sample_format: SampleFormat | str, clock_synced: bool,
                     segment_id: str | None, recording: str, bitrate: int | None,
                     gaps: Sequence[GapNote]) -> SegmentMeta:
        """Seal an encoded audio file into the spool (blocking; moves the file)."""
        ...

    def get(self, segment_id: str) -> tuple[SegmentMeta, SegmentState] | None:
        """A segment's metadata and state, or None."""
        ...

    def list(self) -> builtins.list[tuple[SegmentMeta, SegmentState]]:
        """Every segment, newest first."""
        ...


class RecordingConflict(EdgeAgentError, RuntimeError):
    """The recording is not in a state that allows this (e.g. stopped twice)."""


class RecordingLimit(EdgeAgentError, RuntimeError):
    """Too many recordings at once."""


@dataclass
class RecordingsStats:
    """Counters of `AgentRecordings`."""

    started: int = 0
    sealed: int = 0
    auto_stopped: int = 0  # reached `max_seconds`
    failed: int = 0
    refused: int = 0  # over `max_active`
    lost_frames: int = 0
    active: int = 0


@dataclass
class _Active:
    key: str
    id: str
    format: AudioFormat
    recording: FileRecording
    started_utc: str
    finished: trio.Event = field(default_factory=trio.Event)
    meta: SegmentMeta | None = None
    error: str | None = None
    # Shields the recording from the agent's shutdown until it is sealed (or the
    # grace time is over and run() cancels it).
    scope: trio.CancelScope = field(default_factory=lambda: trio.CancelScope(shield=True))


class AgentRecordings:
    """Named recordings bracketed from the agent's continuous capture.

    `start` opens a ring reader at the live head and encodes from it into
    ``work_dir`` (audio is never captured twice); `stop` fixes the end, finishes
    the file and publishes it into the spool (`publish_file`), where the
    uploader picks it up like any segment. The key is ``<prefixes>/<id>``, the id
    being the spool segment id. Bounded: `max_active` recordings at once, each at
    most `max_seconds` (then it stops and is sealed by itself). At shutdown the
    open recordings are sealed within the grace time. The disk work (encoding,
    sealing) runs on ``runner``, one call at a time by default.
    """

    def __init__(self, ring: AudioRing, spool: RecordingSpool, config: RecordingsConfig, *,
                 work_dir: Path, clock: Clock, seal_grace: float = 3.0,
                 runner: ThreadRunner | None = None) -> None:
        self.ring = ring
        self.spool = spool
        self.config = config
        self.work_dir = Path(work_dir)
        self.clock = clock
        self.seal_grace = seal_grace
        self.stats = RecordingsStats()
        self.key_builder = KeyBuilder()
        self.layout = PcmLayout(SampleFormat(str(ring.dtype)))
        self.options = EncodeOptions(opus_bitrate=config.bitrate,
                                     mp3_kbps=config.bitrate // 1000)
        self._active: dict[str, _Active] = {}
        # Keys stopped by this run whose seal failed (published ones are in the spool).
        self._failed: dict[str, str] = {}
        self._nursery: trio.Nursery | None = None
        self._runner = runner if runner is not None else ThreadRunner(1)

    async def run(self, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """The supervised task: clear leftovers, then serve start/stop until cancelled."""
        leftovers = await self._runner.run(self._clear_work_dir)
        if leftovers:
            log.warning("recordings interrupted by a restart were lost files=%d", leftovers)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                # Shutdown: seal what is recording, within the grace time.
                self._nursery = None
                with trio.move_on_after(self.seal_grace, shield=True):
                    for active in builtins.list(self._active.values()):
                        active.recording.request_stop(self.ring.head)
                    for active in builtins.list(self._active.values()):
                        await active.finished.wait()
                for active in builtins.list(self._active.values()):
                    log.error("recording not sealed before shutdown key=%s", active.key)
                    active.scope.cancel()

    def _clear_work_dir(self) -> int:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        count = 0
        for path in self.work_dir.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
                count += 1
        return count

    async def start(self, prefixes: Sequence[str] = (), format: str | None = None
                    ) -> dict[str, Any]:
        """Begin a named recording at the live head; returns its description.

        Raises:
            ValueError: Bad prefixes or format.
            RecordingLimit: `max_active` recordings are running.
            RuntimeError: The recordings task is not running.
        """
        if self._nursery is None:
            raise RuntimeError("recordings are not running")
        fmt = audio_format(format or self.config.format)
        if len(self._active) >= self.config.max_active:
            self.stats.refused += 1
            raise RecordingLimit(f"{len(self._active)} recordings are running; at most "
                                 f"{self.config.max_active} at once (recordings.max_active)")
        ring = self.ring
        now = ring.index_to_utc(ring.head) if ring.head else self.clock.utc()
        rec_id = new_segment_id(now)
        key = self.key_builder.build(*prefixes, rec_id) if prefixes else rec_id
        encoder = new_encoder(fmt, ring.rate, ring.channels, self.layout, self.options)
        path = self.work_dir / f"{rec_id}.{FORMAT_INFO[fmt][0]}"
        recording = FileRecording(ring, ring.head, path, encoder, name=f"recording:{rec_id}",
                                  runner=self._runner,
                                  max_frames=round(self.config.max_seconds * ring.rate))
        active = _Active(key, rec_id, fmt, recording, iso_utc(now))
        self._active[key] = active
        self.stats.started += 1
        self.stats.active = len(self._active)
        try:
            await self._nursery.start(self._record, active)
        except BaseException:
            self._active.pop(key, None)
            self.stats.active = len(self._active)
            raise
        log.info("recording started key=%s format=%s", key, fmt)
        return self._describe_active(active)

    async def _record(self, active: _Active, task_status: TaskStatus) -> None:
        """Record, then seal, shielded from the agent's shutdown (see `run`)."""
        with active.scope:
            await active.recording.run(task_status=task_status)
            await self._seal(active)
        if active.scope.cancelled_caught:
            self._forget(active)

    async def _seal(self, active: _Active) -> None:
        rec = active.recording
        try:
            if rec.auto_stopped:
                self.stats.auto_stopped += 1
            self.stats.lost_frames += rec.lost_frames
            if rec.error is not None:
                raise rec.error
            assert rec.stop_index is not None
            if rec.frames == 0:
                raise RuntimeError("the recording holds no audio (stopped before any frame "
                                   "was captured)")
            start_utc, start_mono, _, end_mono = rec.times()
            fmt = active.format
            bitrate = (self.options.opus_bitrate if fmt is AudioFormat.OPUS else
                       (self.options.mp3_kbps or 0) * 1000 if fmt is AudioFormat.MP3 else None)
            active.meta = await self._runner.run(
                lambda: self.spool.publish_file(
                    rec.path, fmt=fmt.value, start_ts=start_utc, mono_start=start_mono,
                    mono_end=end_mono, frames=rec.frames, rate=self.ring.rate,
                    channels=self.ring.channels, sample_format=self.layout.sample_format,
                    clock_synced=self.ring.anchor_at(rec.start).synced,
                    segment_id=active.id, recording=active.key, bitrate=bitrate,
                    gaps=rec.gap_notes()))
            self.stats.sealed += 1
            log.info("recording sealed key=%s id=%s seconds=%.3f", active.key, active.id,
                     rec.frames / self.ring.rate)
        except Exception as exc:
            self.stats.failed += 1
            active.error = f"{type(exc).__name__}: {exc}"
            self._failed[active.key] = active.error
            while len(self._failed) > 1000:
                self._failed.pop(next(iter(self._failed)))
            log.error("recording not sealed key=%s error=%r", active.key, active.error)
            with contextlib.suppress(OSError):
                await self._runner.run(lambda: rec.path.unlink(missing_ok=True))
        finally:
            self._forget(active)

    def _forget(self, active: _Active) -> None:
        self._active.pop(active.key, None)
        self.stats.active = len(self._active)
        active.finished.set()

    def _check(self, key: str) -> None:
        check_key(key)
        if not is_segment_id(key.rsplit("/", 1)[-1]):
            raise ValueError(f"recording key {key!r}: expected <prefixes>/<id>, the id like "
                             "20261124T053000.000Z-3f9a1c2b")

    def _find_sealed(self, key: str) -> tuple[SegmentMeta, SegmentState] | None:
        found = self.spool.get(key.rsplit("/", 1)[-1])
        if found is None or found[0].recording != key:
            return None
        return found

    async def stop(self, key: str) -> dict[str, Any]:
        """End recording `key`, seal it into the spool; returns its description.

        Raises:
            ValueError: A malformed key.
            KeyError: No such recording.
            RecordingConflict: It was stopped already (or stopped by itself).
            RuntimeError: Sealing it failed (the message says why).
        """
        self._check(key)
        active = self._active.get(key)
        if active is None:
            if self._find_sealed(key) is not None or key in self._failed:
                raise RecordingConflict(f"recording {key!r} is already stopped")
            raise KeyError(key)
        if active.recording.stop_index is not None:
            raise RecordingConflict(f"recording {key!r} is already stopping")
        active.recording.request_stop(self.ring.head)
        await active.finished.wait()
        if active.meta is None:
            raise RuntimeError(f"recording {key!r} could not be sealed: {active.error}")
        return self._describe_sealed(active.meta, SegmentState.SEALED)

    def list(self) -> builtins.list[dict[str, Any]]:
        """Running recordings first, then sealed ones (newest first)."""
        out = [self._describe_active(a) for a in self._active.values()]
        out.extend(self._describe_sealed(meta, state) for meta, state in self.spool.list()
                   if meta.recording)
        return out

    def _describe_active(self, active: _Active) -> dict[str, Any]:
        rec = active.recording
        return {"key": active.key, "id": active.id, "state": "recording",
                "format": active.format.value, "start_utc": active.started_utc,
                "seconds": round(rec.frames / self.ring.rate, 3)}

    def _describe_sealed(self, meta: SegmentMeta, state: SegmentState) -> dict[str, Any]:
        return {"key": meta.recording, "id": meta.id, "state": state.value,
                "format": meta.format,
                "start_utc": meta.start_utc, "end_utc": meta.end_utc,
                "seconds": round(meta.seconds, 3), "bytes": meta.bytes, "sha256": meta.sha256,
                "content_type": meta.content_type}
