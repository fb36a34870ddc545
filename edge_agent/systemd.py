"""systemd integration: readiness, status lines and the watchdog (sd_notify).

The unit runs the agent as `Type=notify` with `WatchdogSec=`. systemd passes a
datagram socket in `NOTIFY_SOCKET` (a path, or an abstract name starting with
'@') and the watchdog period in `WATCHDOG_USEC`. The protocol is a few
newline-separated `KEY=value` lines per datagram, so it is written here in a few
lines rather than pulled in as a dependency.

The agent says `READY=1` once capture is running (or, when the mic is missing
at boot, after `ready_timeout` so that systemd does not kill an agent that is
waiting for a USB mic and still draining its spool). It pings `WATCHDOG=1` at
half the watchdog period only while no task is *wedged*: stuck in a way the
supervisor cannot fix. A failing task is not wedged (the supervisor restarts
it, and a process restart would not bring an unplugged mic back); these are:

- a task that has been starting for `start_timeout` (an open that never returns,
  e.g. a driver hung in the kernel);
- capture that is running but has not written a frame for `capture_silence`
  seconds (its own stall detector should have failed it long before);
- a task still in backoff `backoff_grace` seconds after its planned restart
  (the restart loop itself is stuck);
- and, implicitly, a blocked Trio loop, because then this task cannot ping.

When the pings stop, systemd kills and restarts the agent (`Restart=always`).
Without `NOTIFY_SOCKET` none of this runs.

What is watched comes in as a `Watched` (the agent passes its
`metrics.AgentParts`, which fits). This module sits just below
`edge_agent.agent`: it never imports the agent, metrics, or any stage.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .ring import AudioRing
from .supervisor import Supervisor

__all__ = [
    "Notifier",
    "NotifyStats",
    "WatchdogPolicy",
    "Watched",
    "WedgeDetector",
    "notify_systemd",
    "watchdog_interval",
]

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify datagrams to `address` (the value of NOTIFY_SOCKET).

    Sending never blocks and never raises: systemd being away must not stop the
    agent. The first failure is logged as a warning, later ones at debug level.
    """

    def __init__(self, address: str) -> None:
        if not address or address[0] not in "/@":
            raise ValueError(f"NOTIFY_SOCKET {address!r}: expected a path or an @abstract name")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._warned = False

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Notifier | None:
        """A notifier for NOTIFY_SOCKET, or None when not run by systemd (or unusable)."""
        address = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
        if not address:
            return None
        try:
            return cls(address)
        except (ValueError, OSError) as exc:
            log.warning("systemd notify disabled error=%r", str(exc))
            return None

    def send(self, *lines: str) -> bool:
        """Send `KEY=value` lines in one datagram; False if it could not be sent."""
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "systemd notify failed error=%r", str(exc))
            return False
        return True

    def close(self) -> None:
        self._sock.close()


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog period systemd asks for, in seconds, or None when there is none.

    `WATCHDOG_PID`, when set, must be this process (the variable may be inherited).
    """
    env = os.environ if env is None else env
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


@dataclass
class WatchdogPolicy:
    """When a task counts as wedged, and how long READY may wait for capture."""

    start_timeout: float = 120.0
    capture_silence: float = 30.0
    backoff_grace: float = 30.0
    ready_timeout: float = 30.0


@dataclass
class NotifyStats:
    """Counters for metrics: what was told to systemd."""

    ready: bool = False
    pings: int = 0
    withheld: int = 0
    status: str = ""
    wedged: dict[str, str] = field(default_factory=dict)


class Watched(Protocol):
    """What the watchdog reads of a running agent."""

    @property
    def supervisor(self) -> Supervisor: ...

    @property
    def ring(self) -> AudioRing: ...

    @property
    def ready(self) -> trio.Event:
        """Set once every stage has started."""
        ...

    @property
    def source(self) -> object:
        """The capture source (its ``device_name``, when it has one, goes in the status)."""
        ...

    def degraded(self) -> dict[str, str]:
        """Components that are not healthy now, with the reason."""
        ...


class WedgeDetector:
    """Watches the agent's tasks and capture progress over time (Trio time)."""

    def __init__(self, policy: WatchdogPolicy) -> None:
        self.policy = policy
        self._seen: dict[str, tuple[str, int, float]] = {}  # name -> (state, starts, since)
        self._head = -1
        self._head_since = 0.0

    def check(self, agent: Watched, now: float) -> dict[str, str]:
        """Tasks that are wedged now, with why (empty when all is well)."""
        wedged: dict[str, str] = {}
        policy = self.policy
        tasks = agent.supervisor.tasks
        for name, health in tasks.items():
            key = (health.state, health.starts)
            seen = self._seen.get(name)
            if seen is None or seen[:2] != key:
                seen = (*key, now)
                self._seen[name] = seen
            in_state = now - seen[2]
            if health.state == "starting" and in_state >= policy.start_timeout:
                wedged[name] = f"starting for more than {policy.start_timeout:g} s"
            elif (health.state == "backoff" and health.next_start_at is not None
                  and now - health.next_start_at >= policy.backoff_grace):
                wedged[name] = f"restart overdue by more than {policy.backoff_grace:g} s"
        head = agent.ring.head
        if head != self._head:
            self._head, self._head_since = head, now
        capture = tasks.get("capture")
        if capture is not None and capture.state == "running":
            silent = now - max(self._head_since, self._seen["capture"][2])
            if silent >= policy.capture_silence:
                wedged["capture"] = f"running but no audio for {policy.capture_silence:g} s"
        return wedged


def _status(agent: Watched, wedged: dict[str, str]) -> str:
    """One line for `systemctl status`."""
    if wedged:
        return "wedged: " + "; ".join(f"{k}: {v}" for k, v in wedged.items())
    if not agent.ready.is_set():
        return "starting"
    degraded = agent.degraded()
    if degraded:
        return "degraded: " + "; ".join(f"{k}: {v}" for k, v in degraded.items())
    device = getattr(agent.source, "device_name", "")
    return f"ok: capturing from '{device}'" if device else "ok: capturing"


async def notify_systemd(
    agent: Watched,
    notifier: Notifier,
    *,
    watchdog: float | None = None,
    policy: WatchdogPolicy | None = None,
    stats: NotifyStats | None = None,
) -> None:
    """Tell systemd about readiness, status and liveness until cancelled.

    Args:
        watchdog: the watchdog period in seconds (from `watchdog_interval()`);
            pings go out at half of it. None: no pings.
    """
    policy = policy or WatchdogPolicy()
    stats = stats if stats is not None else NotifyStats()
    detector = WedgeDetector(policy)
    ping_every = watchdog / 2 if watchdog else None
    began = trio.current_time()
    next_ping = began
    try:
        while True:
            now = trio.current_time()
            wedged = detector.check(agent, now)
            status = _status(agent, wedged)
            lines = []
            if not stats.ready and _ready(agent, now - began, policy):
                stats.ready = True
                lines.append("READY=1")
                log.info("systemd notified ready status=%r", status)
            if status != stats.status:
                lines.append(f"STATUS={status}")
                stats.status = status
            if wedged != stats.wedged:
                if wedged:
                    log.error("watchdog pings withheld wedged=%r", wedged)
                elif stats.wedged:
                    log.info("watchdog pings resumed")
                stats.wedged = wedged
            if ping_every is not None and now >= next_ping:
                next_ping = now + ping_every
                if wedged:
                    stats.withheld += 1
                else:
                    lines.append("WATCHDOG=1")
                    stats.pings += 1
            if lines:
                notifier.send(*lines)
            # Poll quickly until READY so it is sent as soon as capture runs.
            tick = 0.1 if not stats.ready else (ping_every or 1.0)
            if ping_every is not None:
                tick = min(tick, max(0.0, next_ping - now))
            await trio.sleep(tick)
    finally:
        notifier.send("STOPPING=1", "STATUS=stopping")


def _ready(agent: Watched, waited: float, policy: WatchdogPolicy) -> bool:
    if not agent.ready.is_set():
        return False
    capture = agent.supervisor.tasks.get("capture")
    if capture is None or capture.state in ("running", "finished"):
        return True
    return waited >= policy.ready_timeout
