"""What the device wheel holds: the `edge_agent` package with its `py.typed`
marker, and nothing that only the benchmarks or the tests use (the `bench/`
package, the fault-injecting proxy in front of the reference backend)."""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _uv() -> str | None:
    pinned = REPO / ".tools" / "bin" / "uv"
    if pinned.is_file() and os.access(pinned, os.X_OK):
        return str(pinned)
    return shutil.which("uv")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    uv = _uv()
    if uv is None:
        pytest.skip("uv is not installed (scripts/bootstrap installs the pinned one in .tools)")
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([uv, "build", "--wheel", "--out-dir", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = sorted(out.glob("edge_agent-*.whl"))
    assert len(built) == 1, [p.name for p in out.iterdir()]
    return zipfile.ZipFile(built[0])


def test_wheel_holds_the_package_and_its_typed_marker(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert "edge_agent/__init__.py" in names
    assert "edge_agent/py.typed" in names
    assert "edge_agent/reference/__init__.py" in names  # `edge-agent backend` ships


def test_wheel_holds_no_benchmarks(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert not [n for n in names if n.startswith("bench/")]
    assert not [n for n in names if n.startswith("edge_agent/bench")]


def test_wheel_holds_no_tests_and_no_fault_proxy(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert not [n for n in names if n.startswith("tests/") or n.startswith("support/")]
    for name in names:
        if name.endswith(".py"):
            source = wheel.read(name).decode("utf-8")
            assert "FaultFront" not in source, name
            assert "reset_mid_body" not in source, name
