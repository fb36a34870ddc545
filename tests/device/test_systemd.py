"""systemd integration: sd_notify against a real datagram socket, the watchdog
cadence and its silence when a task is wedged, and the unit file."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from edge_agent.agent import Agent
from edge_agent.capture import Block, CaptureError, SourceStats
from edge_agent.clock import ManualClock
from edge_agent.config import validate
from edge_agent.supervisor import Backoff, TaskStatus
from edge_agent.systemd import Notifier, watchdog_interval

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "hardware" / "systemd" / "edge-agent.service"


class NotifySocket:
    """What systemd listens on: a bound AF_UNIX datagram socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def drain(self) -> list[list[str]]:
        """Every datagram received so far, each as its lines."""
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode().split("\n"))
            except BlockingIOError:
                return out

    def lines(self) -> list[str]:
        return [line for msg in self.drain() for line in msg]


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    path = tmp_path / "notify"
    sock = NotifySocket(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.sock.close()


def test_notifier_reaches_path_and_abstract_sockets(tmp_path: Path) -> None:
    path_sock = NotifySocket(str(tmp_path / "n"))
    name = f"edge-agent-test-{os.getpid()}"
    abstract = NotifySocket("\0" + name)
    for address, sock in ((str(tmp_path / "n"), path_sock), ("@" + name, abstract)):
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": address})
        assert notifier is not None
        assert notifier.send("READY=1", "STATUS=hello")
        notifier.close()
        assert sock.drain() == [["READY=1", "STATUS=hello"]]


def test_without_systemd_there_is_nothing_to_notify(tmp_path: Path) -> None:
    assert Notifier.from_environment({}) is None
    assert Notifier.from_environment({"NOTIFY_SOCKET": "relative/path"}) is None
    # systemd gone (socket removed): sending fails quietly, it never raises.
    notifier = Notifier(str(tmp_path / "gone"))
    assert notifier.send("WATCHDOG=1") is False
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 3.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000",
                              "WATCHDOG_PID": str(os.getpid())}) == 3.0
    assert watchdog_interval({}) is None


def tone_config(tmp_path: Path) -> dict[str, Any]:
    # No spool: its worker threads would let the mock clock jump during start-up.
    return {"device": {"data_dir": str(tmp_path / "data")},
            "capture": {"source": "tone", "rate": 8000, "block_ms": 100},
            "ring": {"seconds": 5}, "segments": {"enabled": False}}


async def pings_per_second(
    sock: NotifySocket, seconds: int
) -> tuple[list[int], list[tuple[int, str]]]:
    """Virtual-time samples: WATCHDOG=1 count in each second i (from i + 0.5 to
    i + 1.5, so no sample coincides with a ping), and every other line with the
    second it came in (-1: before 0.5)."""
    counts, other = [], []
    await trio.sleep(0.5)
    other += [(-1, line) for line in sock.lines() if line != "WATCHDOG=1"]
    for i in range(seconds):
        await trio.sleep(1.0)
        lines = sock.lines()
        counts.append(lines.count("WATCHDOG=1"))
        other += [(i, line) for line in lines if line != "WATCHDOG=1"]
    return counts, other


async def test_ready_once_capturing_then_pings_at_half_the_watchdog_period(
    tmp_path: Path, notify_socket: NotifySocket, autojump_clock: trio.testing.MockClock
) -> None:
    agent = Agent(validate(tone_config(tmp_path)), clock=ManualClock())
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await trio.sleep(0.15)
        first = notify_socket.drain()
        counts, other = await pings_per_second(notify_socket, 10)
        agent.stop()
    last = notify_socket.lines()
    # Starting, then ready as soon as capture runs (the first poll after start).
    assert first[0] == ["STATUS=starting", "WATCHDOG=1"]
    assert first[1] == ["READY=1", "STATUS=ok: capturing"]
    # WATCHDOG_USEC=2 s: one ping per second, every second.
    assert counts == [1] * 10
    assert other == []
    assert last == ["STOPPING=1", "STATUS=stopping"]
    assert agent.notify_stats.pings == 11


class HangsAfterOneBlock:
    """A source that delivers one block and then blocks forever without failing,
    as a driver stuck in the kernel does (nothing the stall detector catches)."""

    rate, channels, format = 8000, 1, "int16"

    def __init__(self) -> None:
        self.stats = SourceStats()

    @asynccontextmanager
    async def open(self) -> AsyncIterator[AsyncIterator[Block]]:
        async def blocks() -> AsyncIterator[Block]:
            await trio.sleep(0.05)  # between two polls of the notifier (every 0.1 s)
            yield Block(np.zeros((800, 1), np.int16), 1.8e9, 1000.0)
            await trio.sleep_forever()

        yield blocks()


async def test_pings_stop_while_capture_is_wedged(
    tmp_path: Path, notify_socket: NotifySocket, autojump_clock: trio.testing.MockClock
) -> None:
    agent = Agent(validate(tone_config(tmp_path)), clock=ManualClock(),
                  source=HangsAfterOneBlock())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        counts, other = await pings_per_second(notify_socket, 40)
        agent.stop()
    # The block is seen at the 0.1 s poll; once ready, the notifier looks every second,
    # so at 31 s capture has been silent for 30 s or more: the 31 s ping is the first
    # one withheld.
    assert counts == [1] * 30 + [0] * 10
    assert other == [(-1, "STATUS=starting"), (-1, "READY=1"), (-1, "STATUS=ok: capturing"),
                     (30, "STATUS=wedged: capture: running but no audio for 30 s")]
    assert agent.notify_stats.withheld == 10


async def test_a_task_stuck_starting_is_wedged_and_ready_never_sent(
    tmp_path: Path, notify_socket: NotifySocket, autojump_clock: trio.testing.MockClock
) -> None:
    agent = Agent(validate(tone_config(tmp_path)), clock=ManualClock())

    async def never_starts(task_status: TaskStatus) -> None:
        await trio.sleep_forever()  # e.g. an open that never returns

    agent.add_task("stuck", never_starts)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        counts, other = await pings_per_second(notify_socket, 125)
        nursery.cancel_scope.cancel()
    # Seen starting at the first poll (0.1 s), wedged from 120.1 s: the ping at 120 s
    # is the last.
    assert counts == [1] * 120 + [0] * 5
    assert other == [(-1, "STATUS=starting"),
                     (119, "STATUS=wedged: stuck: starting for more than 120 s")]


class NoMic:
    rate, channels, format = 8000, 1, "int16"

    def __init__(self) -> None:
        self.stats = SourceStats()

    def open(self) -> Any:
        raise CaptureError("no input device matches 'USB'; available: no input devices at all")


async def test_missing_mic_at_boot_is_degraded_not_wedged(
    tmp_path: Path, notify_socket: NotifySocket, autojump_clock: trio.testing.MockClock
) -> None:
    agent = Agent(validate(tone_config(tmp_path)), clock=ManualClock(), source=NoMic(),  # type: ignore[arg-type]
                  backoff=Backoff(initial=1.0, maximum=5.0, jitter=0.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        counts, other = await pings_per_second(notify_socket, 40)
        print(counts, other)
        agent.stop()
    # READY waits 30 s for a mic, then is sent anyway; pings never stop: a restart
    # would not bring the mic back, the supervisor keeps trying.
    assert counts == [1] * 40
    assert other == [
        (-1, "STATUS=starting"),
        (-1, "STATUS=degraded: capture: backoff: CaptureError: no input device matches 'USB'; "
             "available: no input devices at all"),
        (29, "READY=1"),
    ]


def test_edge_agent_run_talks_to_systemd(tmp_path: Path) -> None:
    sock = NotifySocket(str(tmp_path / "notify"))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[device]\ndata_dir = "{tmp_path}/data"\n'
                   '[capture]\nsource = "tone"\nrate = 16000\n')
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
                            env=env, stderr=subprocess.DEVNULL)
    got: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while got.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
            got += sock.lines()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    got += sock.lines()
    assert got[:2] == ["STATUS=starting", "WATCHDOG=1"]
    assert got.index("READY=1") < got.index("STOPPING=1")
    assert got.count("WATCHDOG=1") >= 3
    assert got[-2:] == ["STOPPING=1", "STATUS=stopping"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed "
                    "(apt-get install systemd)")
def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for key in ("Type=notify", "WatchdogSec=", "Restart=always", "StateDirectory=edge-agent",
                "SupplementaryGroups=audio", "ProtectSystem=strict", "NoNewPrivileges=yes",
                "After=sound.target network-online.target"):
        assert key in text
    # verify checks that ExecStart exists: point it at this checkout's entry point.
    exe = Path(sys.executable).parent / "edge-agent"
    unit = tmp_path / "edge-agent.service"
    unit.write_text(text.replace("/opt/edge-agent/venv/bin/edge-agent", str(exe)))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # Unknown or misspelt keys are only warnings: there must be none.
    assert out.stderr.strip() == "" and out.stdout.strip() == ""
