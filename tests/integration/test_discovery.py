"""Found on the network: real agents announce themselves over mDNS and
`edge-agent discover` on another machine lists them.

The network is a private LAN of two network namespaces joined by a veth cable
(`support.netns`): the agents (`edge-agent run` with a tone source) run on the
"device" side, `edge-agent discover` on the "laptop" side, so the questions and
answers cross a real link as on site, and nothing reaches this machine's own
network. Creating namespaces needs root; CI runs the tests as root.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent import __version__

from support.netns import DEVICE_ADDRESS, Lan, LanUnavailable, missing, open_lan

pytestmark = [pytest.mark.skipif(missing() is not None, reason=str(missing())),
              pytest.mark.slow]

EDGE_AGENT = [sys.executable, "-m", "edge_agent"]
TOKEN = "discovery-test-token-0123456789"


@pytest.fixture
def lan() -> Iterator[Lan]:
    try:
        with open_lan() as lan:
            yield lan
    except LanUnavailable as exc:
        pytest.skip(f"no private LAN on this machine: {exc}")


@dataclass
class RunningAgent:
    device_id: str
    config: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def wait_for_log(self, needle: str, *, limit: float = 60.0) -> None:
        """Return once the agent has logged ``needle``; fail if it exits first."""
        deadline = time.monotonic() + limit
        while needle not in self.log.read_text():
            assert self.proc.poll() is None, f"{self.device_id} exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"no {needle!r} in:\n{self.log.read_text()}"
            time.sleep(0.05)


def start_agent(lan: Lan, tmp_path: Path, device_id: str, listen: str) -> RunningAgent:
    token = tmp_path / "api.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    config = tmp_path / f"{device_id}.toml"
    config.write_text(f"""\
[device]
id = "{device_id}"
data_dir = "{tmp_path / device_id}"

[capture]
source = "tone"
rate = 8000
block_ms = 100

[ring]
seconds = 10

[segments]
enabled = false

[api]
enabled = true
listen = "{listen}"
token_file = "{token}"
""")
    log = tmp_path / f"{device_id}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(lan.on_device(*EDGE_AGENT, "run", "--config", str(config)),
                                stdout=out, stderr=subprocess.STDOUT)
    return RunningAgent(device_id, config, log, proc)


def discover(lan: Lan, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lan.on_laptop(*EDGE_AGENT, "discover", "--seconds", "2", *args),
                          capture_output=True, text=True, timeout=60)


def http_get(command: list[str], url: str) -> tuple[int, dict[str, object]]:
    """GET ``url`` with the token from inside a namespace (``command`` prefix)."""
    script = ("import httpx, json, sys; r = httpx.get(sys.argv[1], headers={'Authorization': "
              f"'Bearer {TOKEN}'}}); print(json.dumps([r.status_code, r.json()]))")
    done = subprocess.run([*command, sys.executable, "-c", script, url],
                          capture_output=True, text=True, timeout=60, check=True)
    status, body = json.loads(done.stdout)
    return status, body


def test_two_agents_on_the_lan_are_listed_by_discover(lan: Lan, tmp_path: Path) -> None:
    # Nobody there yet: one line on stderr, exit status 1, and [] for scripts.
    nobody = discover(lan, "--seconds", "1")
    assert (nobody.returncode, nobody.stdout) == (1, "")
    assert nobody.stderr == "no edge-agent device answered within 1 s\n"
    nobody_json = discover(lan, "--json", "--seconds", "1")
    assert (nobody_json.returncode, json.loads(nobody_json.stdout)) == (1, [])

    agents = [start_agent(lan, tmp_path, "mic-north", "0.0.0.0:8640"),
              start_agent(lan, tmp_path, "mic-south", "0.0.0.0:8641"),
              # Listening on loopback only: nothing to announce.
              start_agent(lan, tmp_path, "mic-quiet", "127.0.0.1:8642")]
    north, south, quiet = agents
    try:
        north.wait_for_log("advertising on the network")
        south.wait_for_log("advertising on the network")
        quiet.wait_for_log("agent ready")

        found = discover(lan, "--json")
        assert found.returncode == 0, found.stderr
        devices = json.loads(found.stdout)
        assert [d["device"] for d in devices] == ["mic-north", "mic-south"]
        for device, port in zip(devices, (8640, 8641), strict=True):
            assert device["address"] == f"{DEVICE_ADDRESS}:{port}"
            assert device["addresses"] == [DEVICE_ADDRESS]
            assert device["url"] == f"http://{DEVICE_ADDRESS}:{port}/"
            assert device["version"] == __version__
            # The URL works from the laptop: it is the device's API.
            status, health = http_get(lan.on_laptop(), device["url"] + "healthz")
            assert status == 200 and "components" in health

        table = discover(lan)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["device", "address", "version", "url"]
        assert [line.split() for line in lines[1:]] == [
            ["mic-north", f"{DEVICE_ADDRESS}:8640", __version__, f"http://{DEVICE_ADDRESS}:8640/"],
            ["mic-south", f"{DEVICE_ADDRESS}:8641", __version__, f"http://{DEVICE_ADDRESS}:8641/"],
        ]

        # /v1/status tells what is announced, and that loopback is not.
        _, status = http_get(lan.on_device(), "http://127.0.0.1:8641/v1/status")
        assert status["discovery"] == {
            "state": "advertising", "detail": "1 address(es)",
            "name": "mic-south._edge-agent._tcp.local.", "addresses": [DEVICE_ADDRESS],
            "port": 8641, "registrations": 1, "failures": 0}
        _, status = http_get(lan.on_device(), "http://127.0.0.1:8642/v1/status")
        assert status["discovery"] is None

        # api.advertise = false on a reload withdraws the announcement at once.
        north.config.write_text(north.config.read_text() + "advertise = false\n")
        north.proc.send_signal(signal.SIGHUP)
        north.wait_for_log('not advertising on the network reason="api.advertise = false"')
        after = discover(lan, "--json")
        assert [d["device"] for d in json.loads(after.stdout)] == ["mic-south"]
    finally:
        for agent in agents:
            agent.proc.send_signal(signal.SIGTERM)
        codes = [agent.proc.wait(timeout=30) for agent in agents]
    assert codes == [0, 0, 0]
    assert "stopped advertising on the network" in south.log.read_text()


def test_discover_without_a_network_says_so_in_one_line() -> None:
    # A namespace of its own with no interface up: like a laptop off the network.
    done = subprocess.run(["unshare", "--net", *EDGE_AGENT, "discover", "--seconds", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == ("error: discover: no network interface with an IPv4 address to "
                           "ask on (is the network up?)\n")
