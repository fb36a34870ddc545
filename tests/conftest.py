"""Shared fixtures for every test folder.

The folders mirror the layers: ``unit/`` (synchronous cores, no Trio run),
``stages/`` (one stage under Trio, mostly on MockClock), ``integration/`` (real
servers on loopback, real agent processes), ``device/`` (PortAudio, ALSA, systemd).
Helpers that are not fixtures live in ``support/`` (this folder is on the import
path because this file is here); no test module imports another.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from edge_agent.reference import Backend

from support.faults import Faults, run_backend


@pytest.fixture
async def served(tmp_path: Path, nursery: trio.Nursery) -> tuple[Backend, str]:
    """The reference backend on loopback behind the fault proxy: (backend, base URL)."""
    backend = Backend(tmp_path / "backend", faults=Faults())
    url = await nursery.start(run_backend, backend)
    return backend, url
