"""The agent: builds its components from the config and supervises them in one
Trio nursery.

Capture writes into the ring; every other stage reads the ring from its own
cursor. Each long-lived task runs under `Supervisor`, so a failing stage is
restarted with backoff while the others go on. SIGTERM/SIGINT stop the run;
stages that must finish something (sealing a segment) do it in a shielded
scope with its own deadline, so shutdown is bounded.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .audio.pcm import SampleFormat
from .audio.sources import CaptureError, FileSource, SoundDeviceSource, Source, ToneSource
from .clock import Clock, SystemClock
from .config import AgentConfig, CaptureConfig
from .ring import AudioRing
from .supervisor import Backoff, Supervisor, TaskFn, TaskHealth, TaskStatus

__all__ = ["Agent", "make_source"]

log = logging.getLogger(__name__)

# How long the stages get to finish their work after a stop is requested.
SHUTDOWN_GRACE_SECONDS = 4.0


def make_source(cfg: CaptureConfig, clock: Clock) -> Source:
    """The capture source the config asks for."""
    fmt = SampleFormat(cfg.format)
    if cfg.source == "file":
        return FileSource(
            Path(cfg.file), cfg.rate, cfg.channels, fmt, clock,
            block_ms=cfg.block_ms, realtime=cfg.realtime, loop=cfg.loop,
        )
    if cfg.source == "tone":
        return ToneSource(
            cfg.rate, cfg.channels, fmt, clock, block_ms=cfg.block_ms, tone_hz=cfg.tone_hz,
            dbfs=cfg.tone_dbfs, seconds=cfg.tone_seconds, realtime=cfg.realtime,
        )
    return SoundDeviceSource(
        cfg.device, cfg.rate, cfg.channels, fmt, clock, block_ms=cfg.block_ms,
        queue_blocks=cfg.queue_blocks, stall_seconds=cfg.stall_seconds,
    )


class Agent:
    """One agent run: the ring, the source, and the supervised stages.

    Later stages register with `add_task` before `run`; they are started in the
    order added, each after the previous one reported ready.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Clock | None = None,
        source: Source | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        cap = config.capture
        self.ring = AudioRing(
            rate=cap.rate, channels=cap.channels, dtype=cap.format, seconds=config.ring.seconds
        )
        self.source: Source = source or make_source(cap, self.clock)
        self.supervisor = Supervisor(backoff, routine=(OSError, CaptureError))
        self.data_dir = Path(config.device.data_dir)
        self.capture_finished = trio.Event()
        self.ready = trio.Event()
        self._tasks: list[tuple[str, TaskFn]] = [("capture", self._capture)]
        self._cancel_scope: trio.CancelScope | None = None
        self._on_stop: list[Callable[[], Any]] = []

    def add_task(self, name: str, fn: TaskFn) -> None:
        """Register a long-lived stage; call before `run`."""
        self._tasks.append((name, fn))

    @property
    def tasks(self) -> dict[str, TaskHealth]:
        return self.supervisor.tasks

    def degraded(self) -> dict[str, str]:
        """Components that are not healthy now, with the reason (empty when ok)."""
        return self.supervisor.degraded()

    async def run(
        self, *, handle_signals: bool = False, task_status: TaskStatus = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until `stop()` (or a signal, when `handle_signals`)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        async with trio.open_nursery() as nursery:
            self._cancel_scope = nursery.cancel_scope
            if handle_signals:
                nursery.start_soon(self._watch_signals)
            for name, fn in self._tasks:
                await self.supervisor.start(nursery, name, fn)
            log.info("agent ready device=%s tasks=%s", self.config.device.id,
                     ",".join(n for n, _ in self._tasks))
            self.ready.set()
            task_status.started()
        log.info("agent stopped device=%s", self.config.device.id)

    def stop(self) -> None:
        """Ask the run to end; stages finish their shielded work within the grace time."""
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("stopping signal=%s", signal.Signals(signum).name)
                self.stop()
                return

    async def _capture(self, task_status: TaskStatus) -> None:
        """Move blocks from the source into the ring until the source ends."""
        ring, clock = self.ring, self.clock
        async with self.source.open() as blocks:
            task_status.started()
            async for block in blocks:
                ring.write(block.frames, utc=block.utc, mono=block.mono, synced=clock.synced())
        self.capture_finished.set()
        log.info("capture finished frames=%d", ring.head)
