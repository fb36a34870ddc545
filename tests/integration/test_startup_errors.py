"""Start-up failures a person causes, through the real command line: a port in
use, an address this host does not have, a data dir the agent may not write.
Each ends the command with one line naming the setting and the cause, exit 2,
and no traceback or ExceptionGroup text."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# TEST-NET-1 (RFC 5737): documentation only, never an address of this host.
ABSENT_ADDRESS = "192.0.2.1"


def edge_agent(*args: str, obeying_modes: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the command line; `obeying_modes`: as root too, without the capabilities
    that let root ignore file mode bits."""
    prefix: list[str] = []
    if obeying_modes and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to drop root's file capabilities")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]
    return subprocess.run([*prefix, sys.executable, "-m", "edge_agent", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def agent_config(tmp_path: Path, data_dir: Path, api: str = "") -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[device]\ndata_dir = "{data_dir}"\n'
                   '[capture]\nsource = "tone"\nrate = 16000\n' + api)
    return cfg


def with_api(tmp_path: Path, listen: str) -> str:
    token = tmp_path / "api.token"
    token.write_text("a-token-long-enough-for-the-api-0123456789\n")
    token.chmod(0o600)
    return f'[api]\nenabled = true\nlisten = "{listen}"\ntoken_file = "{token}"\n'


def only_the_error(stderr: str) -> str:
    """The last line of stderr, after checking no line is a traceback or group."""
    assert "Traceback" not in stderr and "ExceptionGroup" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def test_run_ends_with_one_line_when_the_api_port_is_taken(tmp_path: Path,
                                                           taken_port: int) -> None:
    cfg = agent_config(tmp_path, tmp_path / "data", with_api(tmp_path, f"127.0.0.1:{taken_port}"))
    done = edge_agent("run", "--config", str(cfg))
    assert done.returncode == 2
    assert only_the_error(done.stderr) == (
        f"error: api.listen 127.0.0.1:{taken_port}: address already in use")
    # It said so once and stopped, rather than retrying the port.
    assert done.stderr.count("address already in use") == 1
    assert "task failed" not in done.stderr


def test_run_names_an_api_address_this_host_does_not_have(tmp_path: Path) -> None:
    cfg = agent_config(tmp_path, tmp_path / "data", with_api(tmp_path, f"{ABSENT_ADDRESS}:8640"))
    done = edge_agent("run", "--config", str(cfg))
    assert done.returncode == 2
    assert only_the_error(done.stderr) == (
        f"error: api.listen {ABSENT_ADDRESS}:8640: address not available on this host")


def test_backend_ends_with_one_line_when_its_port_is_taken(tmp_path: Path,
                                                           taken_port: int) -> None:
    done = edge_agent("backend", "--listen", f"127.0.0.1:{taken_port}",
                      "--data-dir", str(tmp_path / "backend"))
    assert done.returncode == 2
    assert done.stderr == f"error: --listen 127.0.0.1:{taken_port}: address already in use\n"


def test_backend_names_an_address_this_host_does_not_have(tmp_path: Path) -> None:
    done = edge_agent("backend", "--listen", f"{ABSENT_ADDRESS}:8650",
                      "--data-dir", str(tmp_path / "backend"))
    assert done.returncode == 2
    assert done.stderr == (
        f"error: --listen {ABSENT_ADDRESS}:8650: address not available on this host\n")


@pytest.fixture
def locked(tmp_path: Path) -> Path:
    """A directory no file may be created in (mode 0555)."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    return locked


def test_run_names_a_data_dir_it_may_not_write(locked: Path) -> None:
    cfg = agent_config(locked.parent, locked / "data")
    done = edge_agent("run", "--config", str(cfg), obeying_modes=True)
    assert done.returncode == 2
    assert done.stderr == f"error: device.data_dir {locked}/data: permission denied\n"


def test_backend_names_a_data_dir_it_may_not_write(locked: Path) -> None:
    done = edge_agent("backend", "--listen", "127.0.0.1:0", "--data-dir", str(locked),
                      obeying_modes=True)
    assert done.returncode == 2
    assert done.stderr == f"error: --data-dir {locked}: permission denied\n"
