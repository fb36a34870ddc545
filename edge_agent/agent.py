"""The agent: builds its components from the config and supervises them in one
Trio nursery.

Capture writes into the ring; every other stage reads the ring from its own
cursor. Each long-lived task runs under `Supervisor`, so a failing stage is
restarted with backoff while the others go on. SIGTERM/SIGINT stop the run;
stages that must finish something (sealing a segment) do it in a shielded
scope with its own deadline, so shutdown is bounded.

A start-up failure a person must fix (a data dir the agent may not write, an
``api.listen`` port in use) ends the run with `StartupError`, one line naming
the config key; the same failure later, when a task restarts, is retried.

The composition root, just below ``cli``, ``demo`` and ``recorder``: it may
import every stage, ``fleet``, ``metrics`` and ``systemd``; none of them imports it.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from .api import DeviceApi
from .blocking import ThreadRunner
from .capture import CaptureError, Source, make_source, run_capture
from .clock import Clock, SystemClock
from .config import AgentConfig, ConfigError, config_warnings, is_loopback, load_config
from .discovery import Advertiser
from .errors import StartupError
from .fs import make_writable_dir
from .metrics import (
    AgentParts,
    agent_status,
    component_health,
    health_state,
    heartbeat_figures,
    make_registry,
)
from .recordings import AgentRecordings, recording_routes
from .ring import AudioRing
from .spool import Segmenter, Spool
from .stt import SttStreamer, Transcript, read_transcripts
from .supervisor import Backoff, Supervisor, TaskFn, TaskHealth, TaskStatus
from .systemd import Notifier, NotifyStats, WatchdogPolicy, notify_systemd, watchdog_interval
from .uploader import Uploader
from .wire import agent_version

if TYPE_CHECKING:
    from .fleet.device import FleetDevice

__all__ = ["Agent"]

log = logging.getLogger(__name__)

# How long the stages get to finish their work after a stop is requested.
SHUTDOWN_GRACE_SECONDS = 4.0

# Config sections a running agent applies on SIGHUP; the others need a restart.
LIVE_SECTIONS = ("stt", "upload", "api")

# Called with (old, new) config after a reload was accepted; may be async.
ReloadCallback = Callable[[AgentConfig, AgentConfig], Awaitable[None] | None]


def _reconfigure(section: str, reconfigure: Callable[[Any], None], value: Any) -> None:
    """One stage's reconfigure call: a failure is logged, the other stages go on."""
    try:
        reconfigure(value)
    except Exception:
        log.exception("config reload failed section=%s", section)


class Agent:
    """One agent run: the ring, the source, and the supervised stages.

    Later stages register with `add_task` before `run`; they are started in the
    order added, each after the previous one reported ready.

    Raises:
        StartupError: ``device.data_dir`` cannot be created or written.
        ConfigError: a section cannot be used (a token file, an input file).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Clock | None = None,
        source: Source | None = None,
        backoff: Backoff | None = None,
        config_path: str | os.PathLike[str] | None = None,
        started_at: float | None = None,
    ) -> None:
        self.config = config
        # time.monotonic() when the start began (the command line's first moment):
        # the ready line says how long start-up took.
        self.started_at = time.monotonic() if started_at is None else started_at
        # The file SIGHUP re-reads; None: no reload.
        self.config_path = Path(config_path) if config_path is not None else None
        self._on_reload: list[ReloadCallback] = []
        self.reloads = 0
        self.reloads_rejected = 0
        self.notify_stats = NotifyStats()
        self.clock: Clock = clock or SystemClock()
        cap = config.capture
        self.ring = AudioRing(
            rate=cap.rate, channels=cap.channels, dtype=cap.format, seconds=config.ring.seconds
        )
        self.data_dir = Path(config.device.data_dir)
        try:
            make_writable_dir(self.data_dir)
        except OSError as exc:
            raise StartupError.from_os_error("device.data_dir", self.data_dir, exc) from exc
        self.source: Source = source or make_source(cap, self.clock, demand=self.ring)
        self.supervisor = Supervisor(backoff, routine=(OSError, CaptureError, ConfigError,
                                                       StartupError), give_up=(StartupError,))
        self.capture_finished = trio.Event()
        self.ready = trio.Event()
        self._tasks: list[tuple[str, TaskFn]] = [
            ("capture", partial(run_capture, self.source, self.ring, self.clock,
                                self.capture_finished))]
        self._cancel_scope: trio.CancelScope | None = None
        # The durable spool: the segmenter recovers it before it reports ready.
        self.spool: Spool | None = None
        self.segmenter: Segmenter | None = None
        if config.segments.enabled:
            self.spool = Spool(self.data_dir / "spool", device_id=config.device.id,
                               config=config.segments, clock=self.clock)
            self.segmenter = Segmenter(self.ring, self.spool, config.segments)
            self._tasks.append(("segmenter", self.segmenter.run))
        # The uploader drains the spool once the segmenter has recovered it.
        self.uploader: Uploader | None = None
        if config.upload.enabled and self.spool is not None:
            self.uploader = Uploader(config.upload, config.device.id, self.spool,
                                     clock=self.clock)
            self._tasks.append(("uploader", self.uploader.run))
        # Named recordings cut from the ring on demand, sealed into the spool.
        self.recordings: AgentRecordings | None = None
        if config.recordings.enabled and self.spool is not None:
            self.recordings = AgentRecordings(self.ring, self.spool, config.recordings,
                                              work_dir=self.data_dir / "recordings",
                                              clock=self.clock)
            self._tasks.append(("recordings", self.recordings.run))
        # Live transcription (best effort) reads the ring from its own cursor; a bad
        # [stt] section or a missing token file is a ConfigError here, at start.
        self.stt: SttStreamer | None = None
        if config.stt.enabled:
            self.stt = SttStreamer(config.stt, self.ring, device_id=config.device.id,
                                   data_dir=self.data_dir, clock=self.clock)
            self._tasks.append(("stt", self.stt.run))
        # What health, /v1/status, metrics and the systemd watchdog read of the stages.
        self.parts = AgentParts(
            config=config, data_dir=self.data_dir, clock=self.clock, source=self.source,
            ring=self.ring, supervisor=self.supervisor, ready=self.ready, spool=self.spool,
            segmenter=self.segmenter, uploader=self.uploader, stt=self.stt,
        )
        self.registry = make_registry(self.parts)
        # Fleet operations through the bucket: the mailbox answered, the heartbeat sent
        # (no listening port needed); the figures come from here, not from metrics.
        self.fleet: FleetDevice | None = None
        if config.fleet.enabled:
            # Imported here: the signer (awscrt) only where it is used.
            from .fleet.device import FleetCollector, FleetDevice

            self.fleet = FleetDevice(
                config.fleet, config.upload, device_id=config.device.id, ring=self.ring,
                spool=self.spool, clock=self.clock, work_dir=self.data_dir / "fleet",
                figures=partial(heartbeat_figures, self.parts, self.clock.mono()),
                health=partial(health_state, self.parts),
                version=agent_version())
            self.parts.fleet_stats = self.fleet.stats
            self.registry.register(FleetCollector(self.fleet.stats))
            self._tasks.append(("fleet", self.fleet.run))
        # The device HTTP API, last: it serves what the stages above hold. An
        # unusable token file is a ConfigError here, at start.
        self.api: DeviceApi | None = None
        if config.api.enabled:
            self.api = DeviceApi(
                config.api, device_id=config.device.id, data_dir=self.data_dir,
                ring=self.ring, clock=self.clock, capture_finished=self.capture_finished,
                spool=self.spool, transcripts=self._read_transcripts,
                health=partial(component_health, self.parts),
                status=partial(agent_status, self.parts), registry=self.registry,
                input_overflows=lambda: self.source.stats.input_overflows,
                routes=recording_routes(lambda: self.recordings),  # the recordings stage owns these
            )
            self._tasks.append(("api", self.api.run))
        # Announced on the local network (mDNS) once the API serves beyond loopback;
        # api.advertise turns it off, on reload too.
        self.advertiser: Advertiser | None = None
        if self.api is not None and not is_loopback(config.api.listen):
            api = self.api
            self.advertiser = Advertiser(config.api, device_id=config.device.id,
                                         api_url=lambda: api.url)
            self.parts.advertiser = self.advertiser
            self._tasks.append(("discovery", self.advertiser.run))

    def add_task(self, name: str, fn: TaskFn) -> None:
        """Register a long-lived stage; call before `run`."""
        self._tasks.append((name, fn))

    def on_reload(self, callback: ReloadCallback) -> None:
        """Call `callback(old, new)` after each accepted config reload (SIGHUP),
        after the stages got their new sections (`_apply`).

        Only the sections in `LIVE_SECTIONS` differ between old and new.
        """
        self._on_reload.append(callback)

    async def reload(self) -> bool:
        """Re-read `config_path`: apply live sections, keep everything on errors.

        Returns whether the file was accepted. Capture and ring settings are
        never changed in a running agent (audio must not drop); a change to them
        is logged as needing a restart and the running values are kept.
        """
        if self.config_path is None:
            log.warning("config reload ignored: the agent was not started from a file")
            return False
        try:
            new = await ThreadRunner().run(load_config, self.config_path)
        except ConfigError as exc:
            self.reloads_rejected += 1
            for line in exc.problems:
                log.error("config reload rejected problem=%r", line)
            log.error("config reload rejected path=%s kept=running config", self.config_path)
            return False
        old = self.config
        changed = [f for f in old.__struct_fields__ if getattr(old, f) != getattr(new, f)]
        live = {f: getattr(new, f) for f in changed if f in LIVE_SECTIONS}
        for f in changed:
            if f not in LIVE_SECTIONS:
                log.warning("config reload section=%s changed: restart the agent to apply it "
                            "(the running values are kept)", f)
        self.config = msgspec.structs.replace(old, **live)
        self.parts.config = self.config
        self.reloads += 1
        self._apply(old, self.config)
        for callback in self._on_reload:
            try:
                result = callback(old, self.config)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("config reload callback failed callback=%r", callback)
        log.info("config reloaded path=%s applied=%s", self.config_path,
                 ",".join(live) or "nothing changed")
        return True

    def _apply(self, old: AgentConfig, new: AgentConfig) -> None:
        """Hand each running stage its new section, where it changed (a reload)."""
        if self.uploader is not None and old.upload != new.upload:
            if old.upload.enabled != new.upload.enabled:
                log.warning("config reload upload.enabled changed: restart the agent to "
                            "apply it")
            _reconfigure("upload", self.uploader.reconfigure, new.upload)
        if self.stt is not None and old.stt != new.stt:
            if not new.stt.enabled:
                log.warning("config reload stt.enabled changed: restart the agent to apply it")
            else:
                _reconfigure("stt", self.stt.reconfigure, new.stt)
        if self.api is not None and old.api != new.api:
            _reconfigure("api", self.api.reconfigure, new.api)
        if self.advertiser is not None and old.api != new.api:
            _reconfigure("api", self.advertiser.reconfigure, new.api)

    def _read_transcripts(self, since: float | None, until: float | None,
                          limit: int) -> list[Transcript]:
        return read_transcripts(self.data_dir, since, until, limit=limit)

    @property
    def tasks(self) -> dict[str, TaskHealth]:
        return self.supervisor.tasks

    def degraded(self) -> dict[str, str]:
        """Components that are not healthy now, with the reason (empty when ok)."""
        return self.parts.degraded()

    async def run(
        self, *, handle_signals: bool = False, systemd: bool = True,
        task_status: TaskStatus = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until `stop()` (or a signal, when `handle_signals`).

        `systemd=False` never talks to systemd, even under NOTIFY_SOCKET: an agent
        embedded in another program (`recorder.AudioRecorder`) is not the service.

        Raises:
            StartupError: a stage cannot start until a person fixes a setting; the
                stages already started are stopped first.
        """
        failed: StartupError | None = None
        async with trio.open_nursery() as nursery:
            self._cancel_scope = nursery.cancel_scope
            if handle_signals:
                nursery.start_soon(self._watch_signals)
                nursery.start_soon(self._watch_sighup)
            notifier = Notifier.from_environment() if systemd else None
            if notifier is not None:  # started by systemd
                nursery.start_soon(self._notify_systemd, notifier)
            try:
                for name, fn in self._tasks:
                    await self.supervisor.start(nursery, name, fn)
            except StartupError as exc:
                failed = exc
                nursery.cancel_scope.cancel()
            else:
                for warning in config_warnings(self.config):
                    log.warning("config %s", warning)
                log.info("agent ready device=%s tasks=%s started_in=%.2fs cpu=%.2fs",
                         self.config.device.id, ",".join(n for n, _ in self._tasks),
                         time.monotonic() - self.started_at, time.process_time())
                self.ready.set()
                task_status.started()
        if failed is not None:
            raise failed
        await self._final_upload()
        log.info("agent stopped device=%s", self.config.device.id)

    async def _final_upload(self) -> None:
        """The stages stopped and the open segment is sealed: while the backend
        answers, send what is pending for up to ``upload.shutdown_seconds`` (shielded:
        a stop is what brought us here)."""
        seconds = self.config.upload.shutdown_seconds
        if self.uploader is None or self.spool is None or not seconds:
            return
        if not self.spool.pending():
            return
        with trio.move_on_after(seconds, shield=True) as scope:
            try:
                await self.uploader.drain(give_up_on_retry=True)
            except Exception as exc:  # best effort: the spool keeps it for the next start
                log.warning("final upload failed error=%r", exc)
        left = len(self.spool.pending())
        log.info("final upload done pending=%d%s", left,
                 " (time ran out)" if scope.cancelled_caught else "")

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

    async def _watch_sighup(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                log.info("reloading config signal=SIGHUP path=%s", self.config_path)
                await self.reload()

    async def _notify_systemd(self, notifier: Notifier) -> None:
        # A source's own stall detector must get to fail it before capture counts as wedged.
        policy = WatchdogPolicy(capture_silence=max(30.0, 3 * self.config.capture.stall_seconds))
        try:
            await notify_systemd(self.parts, notifier, watchdog=watchdog_interval(), policy=policy,
                                 stats=self.notify_stats)
        finally:
            notifier.close()
