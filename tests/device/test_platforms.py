"""Where edge-agent installs: 64-bit x86 and 64-bit ARM, from wheels only.

What uv.lock pins must install on a Pi running Raspberry Pi OS 64-bit without a
compiler, and scripts/bootstrap and scripts/install-device must refuse 32-bit ARM
with one line before they change anything, rather than start an hour-long
source build. (scripts/arm64-check runs the real install and the demo in an
arm64 root under emulation; it is too slow for the test suite.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCK = tomllib.loads((REPO / "uv.lock").read_text(encoding="utf-8"))
#: The extras a device may install (bench's matplotlib stays on the workstation).
DEVICE_EXTRAS = ("asr", "mp3")


def wheel_tags(package: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(python, abi, platform) of every wheel the lock has for `package`."""
    for wheel in package.get("wheels", []):
        python, abi, platforms = wheel["url"].rsplit("/", 1)[1].removesuffix(".whl").split("-")[-3:]
        for platform in platforms.split("."):
            yield python, abi, platform


def linux_wheels(package: dict[str, Any], machine: str) -> set[tuple[str, str]]:
    """The (python, abi) pairs with a glibc (manylinux) wheel for `machine`, for
    CPython (Debian's python3; PyPy and GraalPy wheels do not count)."""
    return {(py, abi) for py, abi, plat in wheel_tags(package)
            if py.startswith("cp") and plat.startswith("manylinux")
            and plat.endswith(f"_{machine}")}


def device_packages() -> set[str]:
    """The names of what a device installs: edge-agent's dependencies and those of
    its device extras, and theirs (every version and marker, to be safe)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for package in LOCK["package"]:
        by_name.setdefault(package["name"], []).append(package)
    (agent,) = by_name["edge-agent"]
    todo = [d["name"] for d in agent["dependencies"]]
    for extra in DEVICE_EXTRAS:
        todo += [d["name"] for d in agent["optional-dependencies"][extra]]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            for package in by_name[name]:
                todo += [d["name"] for d in package.get("dependencies", [])]
    return seen


def test_every_compiled_dependency_has_an_aarch64_wheel_wherever_it_has_an_x86_64_one() -> None:
    # A Pi on 64-bit Raspberry Pi OS gets a wheel for every Python that an x86-64
    # machine gets one for; a package without any Linux wheel must be pure Python
    # (its other wheels carry no compiled ABI), so its sdist installs anywhere.
    compiled_everywhere = 0
    for package in LOCK["package"]:
        label = f"{package['name']} {package['version']}"
        x86 = linux_wheels(package, "x86_64")
        if x86:
            assert x86 <= linux_wheels(package, "aarch64"), f"{label}: no aarch64 wheel for " \
                f"{sorted(x86 - linux_wheels(package, 'aarch64'))}"
            compiled_everywhere += 1
        elif package.get("wheels"):
            abis = {abi for _, abi, _ in wheel_tags(package)}
            assert abis == {"none"}, f"{label}: compiled wheels, none of them for Linux"
        else:
            assert package["source"] == {"editable": "."}, f"{label}: only an sdist"
    assert compiled_everywhere >= 10  # numpy, soxr, msgspec, cffi, ...: the check bites


def run_as(arch: str, script: str, tmp_path: Path, *args: str, copy: bool = True,
           ) -> subprocess.CompletedProcess[str]:
    """Run `script` as if on `arch` (EDGE_AGENT_ARCH), with the device's directories
    under tmp_path. With `copy`, it runs from a copy of the scripts alone, with
    stand-ins on PATH for the commands that would change the system, each
    recording that it ran: had it not refused, it could not touch this checkout
    or this machine."""
    env = {**os.environ, "EDGE_AGENT_ARCH": arch, "EDGE_AGENT_PREFIX": str(tmp_path / "opt"),
           "EDGE_AGENT_ETC": str(tmp_path / "etc"), "EDGE_AGENT_STATE": str(tmp_path / "state")}
    repo = REPO
    if copy:
        repo = tmp_path / "repo"
        (repo / "scripts").mkdir(parents=True)
        for name in (script, "check-platform"):
            shutil.copy2(REPO / "scripts" / name, repo / "scripts" / name)
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for command in ("apt-get", "sudo", "python3", "useradd", "systemctl"):
            stand_in = bin_dir / command
            stand_in.write_text(f'#!/bin/sh\necho "{command} $*" >> {tmp_path / "ran"}\n')
            stand_in.chmod(0o755)
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return subprocess.run([str(repo / "scripts" / script), *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.parametrize(("script", "args"), [
    ("bootstrap", ()), ("bootstrap", ("--dev",)),
    ("install-device", ("--no-prompt", "--profile", "usb-mic")),
    ("install-device", ("--dry-run",)),
])
def test_32_bit_arm_is_refused_with_one_line_before_anything_runs(
        tmp_path: Path, script: str, args: tuple[str, ...]) -> None:
    out = run_as("armhf", script, tmp_path, *args)
    assert out.returncode == 2
    assert out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"{script}: this system is 32-bit ARM (armhf), where numpy, ")
    assert "install Raspberry Pi OS (64-bit) instead" in line
    assert not (tmp_path / "ran").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "repo"]


def test_the_refusal_names_exactly_the_device_dependencies_without_a_32_bit_arm_wheel(
        tmp_path: Path) -> None:
    # From uv.lock: what a device installs that is compiled (it has x86-64 wheels)
    # and has no armv7l wheel. A new dependency like that must join the message.
    packages = {p["name"]: p for p in LOCK["package"]}
    expected = {name for name in device_packages() - {"edge-agent"}
                if linux_wheels(packages[name], "x86_64")
                and not linux_wheels(packages[name], "armv7l")}
    line = run_as("armhf", "check-platform", tmp_path).stderr
    named = re.search(r"where (.+) have no wheel on PyPI", line)
    assert named is not None, line
    assert set(re.split(r", | and ", named.group(1))) == expected


def test_64_bit_arm_and_x86_are_accepted_other_systems_refused(tmp_path: Path) -> None:
    for arch in ("arm64", "amd64"):
        out = run_as(arch, "install-device", tmp_path / arch, "--dry-run", "--no-prompt",
                     copy=False)
        assert out.returncode == 0, out.stderr
        assert "== systemd unit edge-agent.service" in out.stdout
    other = run_as("riscv64", "check-platform", tmp_path)
    assert other.returncode == 2
    assert other.stderr.startswith("check-platform: this system is riscv64; edge-agent installs "
                                   "on 64-bit ARM")
