"""Log lines of the real command line, as journald and a terminal receive them.

Under systemd, stderr is the journal stream named by ``JOURNAL_STREAM`` (device
and inode); here the agent's stderr is a pipe whose device and inode the test
puts in that variable, exactly as systemd would. The agent uploads to the real
reference backend at a path it refuses, so a run logs at every level: a refused
segment is an error, its quarantine a warning, requests go out through httpx.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# What each syslog priority prefix stands for (sd-daemon(3)).
PRIORITIES = {"3": "ERROR", "4": "WARNING", "6": "INFO", "7": "DEBUG"}
PLAIN_LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=(DEBUG|INFO|WARNING|ERROR) logger=\S+ \S")


def read_until(fd: int, needle: str, seconds: float) -> str:
    """What the pipe `fd` gives until a line holds `needle` (or the writer closes)."""
    text, deadline = "", time.monotonic() + seconds
    while needle not in text:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            pytest.fail(f"no {needle!r} within {seconds:g} s; got:\n{text}")
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        text += chunk.decode()
    return text


def spawn(args: list[str], journal_of: int | None) -> tuple[subprocess.Popen[bytes], int]:
    """Start the command line with stderr on a new pipe; `journal_of`: the file
    descriptor whose device and inode go into JOURNAL_STREAM. Returns the process
    and the pipe's read end."""
    read_end, write_end = os.pipe()
    target = os.fstat(write_end if journal_of is None else journal_of)
    env = {**os.environ, "JOURNAL_STREAM": f"{target.st_dev}:{target.st_ino}"}
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "--log-level", "debug", *args],
                            stderr=write_end, stdout=subprocess.DEVNULL, env=env)
    os.close(write_end)
    return proc, read_end


def stop(proc: subprocess.Popen[bytes], read_end: int) -> str:
    """SIGTERM, then everything the process wrote after."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
        return drain(read_end)
    finally:
        proc.kill()
        os.close(read_end)


def drain(fd: int) -> str:
    """Everything left in the pipe `fd`, once its writer has exited."""
    out = b""
    while chunk := os.read(fd, 65536):
        out += chunk
    return out.decode()


def test_under_journald_every_line_has_the_priority_of_its_level(tmp_path: Path) -> None:
    # The backend inherits a JOURNAL_STREAM that is not its stderr (a redirected
    # child): its lines stay plain, with their own time.
    with open(os.devnull, "w") as elsewhere:
        backend, backend_err = spawn(["backend", "--listen", "127.0.0.1:0", "--data-dir",
                                      str(tmp_path / "backend")], journal_of=elsewhere.fileno())
    agent = None
    try:
        started = read_until(backend_err, "backend serving url=", 30)
        url = re.search(r"backend serving url=(\S+)", started)
        assert url is not None
        cfg = tmp_path / "agent.toml"
        cfg.write_text(
            f'[device]\ndata_dir = "{tmp_path}/data"\n'
            '[capture]\nsource = "tone"\nrate = 16000\n'
            '[segments]\nseconds = 5\n'
            f'[upload]\nenabled = true\nurl = "{url[1]}/nowhere/{{segment}}"\n'
            "backoff_initial_seconds = 0.1\n")
        agent, agent_err = spawn(["run", "--config", str(cfg)], journal_of=None)
        journal = read_until(agent_err, "segment quarantined", 30)
        journal += stop(agent, agent_err)
    finally:
        if agent is not None:
            agent.kill()
        plain = stop(backend, backend_err)
    plain = started + plain

    lines = journal.splitlines()
    assert lines
    for line in lines:
        prefix = re.match(r"<(\d)>", line)
        assert prefix is not None, f"no priority: {line!r}"
        assert not PLAIN_LINE.match(line[3:]), f"a time of its own under journald: {line!r}"
        level = re.match(r"level=(\w+) ", line[3:])
        if level is not None:
            assert level[1] == PRIORITIES[prefix[1]], line
    seen = {line[1] for line in lines}
    assert {"3", "4", "6", "7"} <= seen, journal
    assert any(line.startswith("<3>level=ERROR logger=edge_agent.uploader segment quarantined ")
               for line in lines), journal
    # The uploads went out, but httpx's and httpcore's own per-request lines did not.
    assert not [line for line in lines if "logger=httpx" in line or "logger=httpcore" in line]

    assert "backend serving" in plain
    for line in plain.splitlines():
        assert PLAIN_LINE.match(line), f"not one of the plain lines: {line!r}"
