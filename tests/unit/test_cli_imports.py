"""Commands import only what they use: an installer typing `config set` on a Pi Zero
must not wait seconds for the HTTP server, the STT client and numpy to load.

Each case runs the real command line in a fresh interpreter and lists which of
the agent's heavy dependencies it loaded (start-up CPU is measured by the benchmark)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.wire import agent_version

HEAVY = ("hypercorn", "starlette", "httpx", "zeroconf", "numpy", "trio", "sounddevice",
         "soxr", "pyogg", "prometheus_client", "tomlkit", "webrtcvad")

PROBE = """
import contextlib, io, json, sys
from edge_agent.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    code = main(sys.argv[1:])
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.stdin.read())))
print(json.dumps({"heavy": heavy, "out": out.getvalue()}))
"""


def run(*args: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], input=json.dumps(HEAVY),
                          capture_output=True, text=True, check=True, timeout=60)
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text('[device]\nid = "site-1"\n')
    return path


def test_config_check_loads_none_of_the_heavy_parts(config_file: Path) -> None:
    got = run("config", "check", str(config_file))
    assert got["heavy"] == []
    assert "ok" in str(got["out"])


def test_help_and_version_load_none_of_the_heavy_parts() -> None:
    assert run("--help")["heavy"] == []
    got = run("--version")
    assert got["heavy"] == [] and got["out"] == f"edge-agent {agent_version()}\n"


def test_config_set_loads_only_the_toml_editor(config_file: Path) -> None:
    assert run("config", "set", str(config_file), "capture.rate=16000")["heavy"] == ["tomlkit"]
    assert "rate = 16000" in config_file.read_text()


def test_levels_loads_audio_but_no_server_or_network_client() -> None:
    got = run("--log-level", "error", "levels", "--seconds", "0.1", "--device", "x")
    # (no device "x" here, or no PortAudio: either way the command got that far)
    assert not {"hypercorn", "starlette", "httpx", "zeroconf"} & set(got["heavy"])  # type: ignore[arg-type]


def test_fleet_help_loads_none_of_the_heavy_parts() -> None:
    # The operator's command loads the store's client only when it runs.
    got = run("fleet", "get", "--help")
    assert got["heavy"] == [] and "--request" in str(got["out"])
