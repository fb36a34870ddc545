"""A small supervisor for the agent's long-lived Trio tasks.

Trio has no supervisor, so this is the one restart loop of the agent: each task
runs in the shared nursery, is restarted after a failure with capped, jittered
exponential backoff, and keeps its state for health reporting. One task failing
never stops the others: the mic keeps recording while the network is down.
A task that returns normally is finished (e.g. a file source reached its end)
and is not restarted.

A failure is logged and reported by its innermost cause (`errors.describe`),
never as the Trio nursery's `ExceptionGroup` around it; a task failing the same
way again and again logs the traceback once, then one line per retry. A task
whose very first attempt fails with an error a person must fix first (``give_up``,
e.g. a port in use) is not retried: `Supervisor.start` raises it.

Bottom layer: imports only ``errors``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import trio

from .errors import describe, innermost, ungrouped

__all__ = ["Backoff", "Supervisor", "TaskHealth", "TaskStatus"]

log = logging.getLogger(__name__)

TaskState = Literal["starting", "running", "backoff", "finished", "failed"]


# Stages take trio's `task_status` and call `started()` once ready.
TaskStatus = trio.TaskStatus[Any]


TaskFn = Callable[[TaskStatus], Awaitable[None]]


@dataclass
class Backoff:
    """Capped exponential backoff with jitter.

    The delay for attempt n is `min(maximum, initial * 2**n)`, reduced by a
    random fraction of at most `jitter` so that a fleet restarting after a shared
    outage does not retry in lockstep. The RNG is injectable for exact tests.
    """

    initial: float = 0.5
    maximum: float = 30.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * 2.0 ** min(attempt, 62))
        return base * (1.0 - self.jitter * self.rng.random())


@dataclass
class TaskHealth:
    """What the supervisor knows about one task, for /healthz and metrics."""

    name: str
    state: TaskState = "starting"
    starts: int = 0
    failures: int = 0
    last_error: str | None = None
    last_failure_at: float | None = None
    next_start_at: float | None = None
    # Failures within the last `window` seconds (see Supervisor.failing_after).
    recent_failures: list[float] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return self.state in ("running", "finished")


class _Started:
    """The task_status handed to each attempt: the first `started()` of any
    attempt marks the task ready; later ones only update the state."""

    def __init__(self, health: TaskHealth, ready: trio.Event) -> None:
        self.health = health
        self.ready = ready

    def started(self, value: Any = None) -> None:
        self.health.state = "running"
        self.ready.set()


class Supervisor:
    """Runs named tasks, restarting each on failure.

    Args:
        backoff: delays between restarts.
        reset_after: a task that ran this long before failing starts its backoff
            from the beginning again.
        window / failing_after: a task failing this many times within `window`
            seconds is reported as unhealthy even while it is running.
        routine: failures whose message says it all (a missing device, a
            refused connection) are logged in one line, others with a traceback
            the first time they happen.
        give_up: failures of a task's first attempt that end it for good, for
            `start` to raise (the task is "failed"): a setting a person must fix
            before the task can run at all. Later failures are retried as usual.
    """

    def __init__(
        self,
        backoff: Backoff | None = None,
        *,
        reset_after: float = 60.0,
        window: float = 300.0,
        failing_after: int = 3,
        routine: tuple[type[BaseException], ...] = (OSError,),
        give_up: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.backoff = backoff or Backoff()
        self.reset_after = reset_after
        self.window = window
        self.failing_after = failing_after
        self.routine = routine
        self.give_up = give_up
        self.tasks: dict[str, TaskHealth] = {}

    async def start(self, nursery: trio.Nursery, name: str, fn: TaskFn) -> TaskHealth:
        """Start `fn` under supervision; return once it called `task_status.started()`
        or failed for the first time (a missing mic must not block the rest).

        Raises:
            The innermost cause of a first failure that is one of ``give_up``.
        """
        if name in self.tasks:
            raise ValueError(f"task {name!r} is already supervised")
        health = TaskHealth(name)
        self.tasks[name] = health
        first_attempt_over = trio.Event()
        gave_up: list[BaseException] = []
        nursery.start_soon(self._supervise, health, fn, first_attempt_over, gave_up, name=name)
        await first_attempt_over.wait()
        if gave_up:
            raise gave_up[0]
        return health

    def degraded(self) -> dict[str, str]:
        """Tasks that are not healthy now, with the reason."""
        now = trio.current_time()
        out = {}
        for h in self.tasks.values():
            recent = [t for t in h.recent_failures if now - t <= self.window]
            if not h.healthy:
                out[h.name] = f"{h.state}: {h.last_error}" if h.last_error else h.state
            elif len(recent) >= self.failing_after:
                out[h.name] = f"{len(recent)} failures in {self.window:g} s: {h.last_error}"
        return out

    async def _supervise(
        self, health: TaskHealth, fn: TaskFn, first_attempt_over: trio.Event,
        gave_up: list[BaseException],
    ) -> None:
        attempt = 0
        # The failure whose traceback was logged last: the same again is one line.
        shown: tuple[type[BaseException], str, int] | None = None
        while True:
            health.state = "starting"
            health.starts += 1
            health.next_start_at = None
            began = trio.current_time()
            try:
                await fn(_Started(health, first_attempt_over))
            except Exception as exc:  # Cancelled is a BaseException and passes through
                cause = innermost(exc)
                health.last_error = describe(exc)
                if not first_attempt_over.is_set() and isinstance(cause, self.give_up):
                    health.state = "failed"
                    gave_up.append(cause)
                    first_attempt_over.set()
                    return
                now = trio.current_time()
                if now - began >= self.reset_after:
                    attempt = 0
                delay = self.backoff.delay(attempt)
                attempt += 1
                health.failures += 1
                health.last_failure_at = now
                recent = [t for t in health.recent_failures if now - t <= self.window]
                # Only the last few matter for health; keep the list bounded.
                health.recent_failures = [*recent[-(self.failing_after * 4) :], now]
                health.state = "backoff"
                health.next_start_at = now + delay
                first_attempt_over.set()
                failure = ungrouped(exc)  # its traceback, without the group around it
                where = _raised_at(failure)
                show = not isinstance(cause, self.routine) and where != shown
                if show:
                    shown = where
                log.warning(
                    "task failed task=%s error=%s failures=%d restart_in=%.2fs",
                    health.name, health.last_error, health.failures, delay,
                    exc_info=failure if show else None,
                )
                await trio.sleep(delay)
            else:
                health.state = "finished"
                first_attempt_over.set()
                log.info("task finished task=%s", health.name)
                return


def _raised_at(exc: BaseException) -> tuple[type[BaseException], str, int]:
    """What makes two failures "the same": the type and the line that raised it."""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return type(exc), "", 0
    return type(exc), tb.tb_frame.f_code.co_filename, tb.tb_lineno
