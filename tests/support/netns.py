"""A private LAN for tests: two network namespaces joined by a veth cable.

The "device" side holds 10.77.0.1/24, the "laptop" side 10.77.0.2/24. Multicast
(mDNS) and addresses beyond loopback are then real, and nothing reaches the
machine's own network. Commands run on a side through `nsenter`. Needs root,
util-linux (`unshare`, `nsenter`), iproute2 (`ip`) and the kernel's veth driver.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

DEVICE_ADDRESS = "10.77.0.1"
LAPTOP_ADDRESS = "10.77.0.2"


class LanUnavailable(Exception):
    """This machine cannot make the LAN (the reason is the message)."""


def missing() -> str | None:
    """Why the LAN cannot be made here, or None when it can be tried."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux, iproute2) to create network namespaces"
    return None


@dataclass
class Lan:
    device_pid: int
    laptop_pid: int

    def on_device(self, *args: str) -> list[str]:
        """``args`` as a command run on the device side."""
        return ["nsenter", f"--net=/proc/{self.device_pid}/ns/net", "--", *args]

    def on_laptop(self, *args: str) -> list[str]:
        """``args`` as a command run on the laptop side."""
        return ["nsenter", f"--net=/proc/{self.laptop_pid}/ns/net", "--", *args]


def _holder() -> subprocess.Popen[bytes]:
    """A process that sits in a new network namespace, keeping it alive."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
    own = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + 10
    while os.readlink(f"/proc/{proc.pid}/ns/net") == own:  # until unshare() has run
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise LanUnavailable(f"unshare --net failed (exit status {proc.poll()})")
        time.sleep(0.01)
    return proc


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


@contextmanager
def open_lan() -> Iterator[Lan]:
    """The two sides, cabled and up; both namespaces go when the block ends.

    Raises:
        LanUnavailable: namespaces or veth cannot be made on this machine.
    """
    holders: list[subprocess.Popen[bytes]] = []
    try:
        holders += [_holder(), _holder()]
        lan = Lan(holders[0].pid, holders[1].pid)
        made = subprocess.run(
            lan.on_device("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                          "netns", str(lan.laptop_pid)), capture_output=True, text=True)
        if made.returncode != 0:
            raise LanUnavailable(f"cannot create a veth pair: {made.stderr.strip()}")
        for side, address in ((lan.on_device, DEVICE_ADDRESS), (lan.on_laptop, LAPTOP_ADDRESS)):
            _run(side("ip", "link", "set", "lo", "up"))
            _run(side("ip", "addr", "add", f"{address}/24", "dev", "eth0"))
            _run(side("ip", "link", "set", "eth0", "up"))
        yield lan
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
