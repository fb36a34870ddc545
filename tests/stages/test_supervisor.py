"""The supervisor under Trio's MockClock: restarts, backoff and isolation, exactly."""

from __future__ import annotations

import logging
import random

import pytest
import trio
import trio.testing

from edge_agent.errors import StartupError
from edge_agent.supervisor import Backoff, Supervisor, TaskStatus


class Flaky:
    """A task that fails `failures` times (recording when it started), then runs."""

    def __init__(self, failures: int, run_for: float = 0.0) -> None:
        self.failures = failures
        self.run_for = run_for
        self.starts: list[float] = []

    async def __call__(self, task_status: TaskStatus) -> None:
        self.starts.append(trio.current_time())
        await trio.sleep(self.run_for)
        if len(self.starts) <= self.failures:
            raise ConnectionError(f"attempt {len(self.starts)} failed")
        task_status.started()
        await trio.sleep_forever()


async def test_restarts_with_capped_exponential_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = Supervisor(Backoff(initial=1.0, maximum=8.0, jitter=0.0))
    task = Flaky(failures=6)
    async with trio.open_nursery() as nursery:
        health = await sup.start(nursery, "uploader", task)
        assert health.state == "backoff"  # start() returned after the first failure
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    # Delays 1, 2, 4, 8, 8, 8 (capped) between the seven starts.
    assert task.starts == [0.0, 1.0, 3.0, 7.0, 15.0, 23.0, 31.0]
    assert health.state == "running"
    assert health.failures == 6
    assert health.starts == 7
    assert health.last_error == "ConnectionError: attempt 6 failed"


async def test_jitter_is_bounded_and_reproducible(autojump_clock: trio.testing.MockClock) -> None:
    sup = Supervisor(Backoff(initial=2.0, maximum=60.0, jitter=0.5, rng=random.Random(7)))
    task = Flaky(failures=4)
    async with trio.open_nursery() as nursery:
        await sup.start(nursery, "stt", task)
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    rng = random.Random(7)
    expected = [0.0]
    for attempt in range(4):
        base = 2.0 * 2**attempt
        expected.append(expected[-1] + base * (1 - 0.5 * rng.random()))
    assert task.starts == pytest.approx(expected)
    gaps = [b - a for a, b in zip(task.starts, task.starts[1:], strict=False)]
    for attempt, gap in enumerate(gaps):
        assert 0.5 * 2.0 * 2**attempt <= gap <= 2.0 * 2**attempt


async def test_backoff_resets_after_a_long_healthy_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = Supervisor(Backoff(initial=1.0, maximum=30.0, jitter=0.0), reset_after=60.0)
    starts: list[float] = []

    async def fails_after_a_while(task_status: TaskStatus) -> None:
        starts.append(trio.current_time())
        task_status.started()
        # Runs 100 s the first time (long enough to reset), then 1 s.
        await trio.sleep(100 if len(starts) == 1 else 1)
        raise OSError("device lost")

    async with trio.open_nursery() as nursery:
        await sup.start(nursery, "capture", fails_after_a_while)
        await trio.sleep(110)
        nursery.cancel_scope.cancel()
    # 100 s run -> reset -> delay 1; then 1 s runs: delays 2, 4 (not 1 again).
    assert starts == [0.0, 101.0, 104.0, 109.0]


async def test_one_failing_task_does_not_stop_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = Supervisor(Backoff(initial=1.0, maximum=1.0, jitter=0.0))
    ticks: list[float] = []

    async def always_fails(task_status: TaskStatus) -> None:
        raise RuntimeError("broken")

    async def keeps_ticking(task_status: TaskStatus) -> None:
        task_status.started()
        while True:
            ticks.append(trio.current_time())
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        broken = await sup.start(nursery, "broken", always_fails)
        await sup.start(nursery, "capture", keeps_ticking)
        await trio.sleep(10.5)
        nursery.cancel_scope.cancel()
    assert ticks == [float(t) for t in range(11)]
    assert broken.failures == 11
    assert set(sup.degraded()) == {"broken"}


async def test_a_task_that_returns_is_finished_not_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = Supervisor()
    calls = []

    async def once(task_status: TaskStatus) -> None:
        calls.append(trio.current_time())
        task_status.started()

    async with trio.open_nursery() as nursery:
        health = await sup.start(nursery, "file", once)
        await trio.sleep(60)
    assert calls == [0.0]
    assert health.state == "finished"
    assert sup.degraded() == {}


async def test_repeated_failures_report_degraded_while_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = Supervisor(Backoff(initial=1.0, maximum=1.0, jitter=0.0), window=300, failing_after=3)
    task = Flaky(failures=3)
    async with trio.open_nursery() as nursery:
        health = await sup.start(nursery, "capture", task)
        await trio.sleep(10)
        assert health.state == "running"
        assert sup.degraded() == {
            "capture": "3 failures in 300 s: ConnectionError: attempt 3 failed"
        }
        await trio.sleep(300)  # the failures age out of the window
        assert sup.degraded() == {}
        nursery.cancel_scope.cancel()


async def test_cancellation_is_not_treated_as_a_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = Supervisor()
    task = Flaky(failures=0)
    async with trio.open_nursery() as nursery:
        health = await sup.start(nursery, "api", task)
        nursery.cancel_scope.cancel()
    assert health.failures == 0
    assert task.starts == [0.0]


def port_taken() -> StartupError:
    return StartupError("api.listen", "127.0.0.1:8640", "address already in use")


async def in_a_nursery(error: Exception) -> None:
    """Fail the way a stage serving from its own nursery does: inside a group."""

    async def fail() -> None:
        raise error

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail)


async def test_a_failure_is_named_by_its_cause_and_its_traceback_logged_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    sup = Supervisor(Backoff(initial=1.0, maximum=1.0, jitter=0.0))
    failures = ["lookup", "lookup", "lookup", "wrapped"]

    async def buggy(task_status: TaskStatus) -> None:
        if not failures:
            await trio.sleep_forever()
        if failures.pop(0) == "lookup":
            await in_a_nursery(KeyError("segment"))
        try:
            raise RuntimeError("the cause")
        except RuntimeError as exc:
            raise ValueError("bad block") from exc

    with caplog.at_level(logging.WARNING, logger="edge_agent.supervisor"):
        async with trio.open_nursery() as nursery:
            health = await sup.start(nursery, "segmenter", buggy)
            assert health.last_error == "KeyError: 'segment'"
            assert sup.degraded() == {"segmenter": "backoff: KeyError: 'segment'"}
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
    lines = [r for r in caplog.records if r.name == "edge_agent.supervisor"]
    assert [r.getMessage().split(" failures=")[0] for r in lines] == [
        "task failed task=segmenter error=KeyError: 'segment'"] * 3 + [
        "task failed task=segmenter error=RuntimeError: the cause"]
    # A traceback the first time; the same failure again is one line; a new one
    # gets its traceback.
    assert [r.exc_info is not None for r in lines] == [True, False, False, True]
    # The traceback is the failure's own, its chain of causes included; never the
    # text of the group around it.
    assert "ValueError: bad block" in caplog.text and "RuntimeError: the cause" in caplog.text
    assert "ExceptionGroup" not in caplog.text


async def test_a_first_attempt_a_person_must_fix_is_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = Supervisor(give_up=(StartupError,))
    starts: list[float] = []

    async def serve(task_status: TaskStatus) -> None:
        starts.append(trio.current_time())
        await in_a_nursery(port_taken())

    async with trio.open_nursery() as nursery:
        with pytest.raises(StartupError) as raised:
            await sup.start(nursery, "api", serve)
        await trio.sleep(600)
    assert str(raised.value) == "api.listen 127.0.0.1:8640: address already in use"
    assert starts == [0.0]
    assert sup.degraded() == {
        "api": "failed: StartupError: api.listen 127.0.0.1:8640: address already in use"}


async def test_the_same_failure_after_a_good_start_is_retried_a_line_each(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    sup = Supervisor(Backoff(initial=1.0, maximum=1.0, jitter=0.0),
                     routine=(StartupError,), give_up=(StartupError,))
    starts: list[float] = []

    async def serve(task_status: TaskStatus) -> None:
        starts.append(trio.current_time())
        if len(starts) == 1:
            task_status.started()
            await trio.sleep(5)  # the port was taken while it restarted
        await in_a_nursery(port_taken())

    with caplog.at_level(logging.WARNING, logger="edge_agent.supervisor"):
        async with trio.open_nursery() as nursery:
            await sup.start(nursery, "api", serve)
            await trio.sleep(7.5)
            nursery.cancel_scope.cancel()
    assert starts == [0.0, 6.0, 7.0]
    lines = [r for r in caplog.records if r.name == "edge_agent.supervisor"]
    assert [r.exc_info for r in lines] == [None] * 3
    assert all("error=StartupError: api.listen 127.0.0.1:8640: address already in use "
               in r.getMessage() for r in lines)
