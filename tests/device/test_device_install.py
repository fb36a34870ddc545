"""What goes onto a device: hardware profiles, ALSA and udev files, and
scripts/install-device (tested with --dry-run only; it never runs for real here)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import default_config, load_config, validate

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install-device"
PROFILES = sorted((REPO / "hardware" / "profiles").glob("*.toml"))
EDGE_AGENT = Path(sys.executable).parent / "edge-agent"


def dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGE_AGENT_PREFIX": str(tmp_path / "opt"),
           "EDGE_AGENT_ETC": str(tmp_path / "etc"), "EDGE_AGENT_STATE": str(tmp_path / "state")}
    return subprocess.run([str(INSTALL), "--dry-run", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def commands(out: str) -> list[list[str]]:
    """The steps a dry run printed, as argument lists."""
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def written(out: str, dest: str) -> str:
    """The content a dry run shows for one file it would write."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"+ write {dest} "))
    body = []
    for line in lines[start + 1:]:
        if not line.startswith("    |"):
            break
        body.append(line[6:])
    return "\n".join(body) + "\n"


def test_profiles_are_valid_configs_with_their_alsa_files() -> None:
    assert {p.stem for p in PROFILES} == {
        "usb-mic", "pi-usb-soundcard", "respeaker-2mic", "respeaker-4mic", "i2s-mems"}
    for path in PROFILES:
        doc = tomllib.loads(path.read_text())
        meta = doc["profile"]
        assert meta["name"] == path.stem
        for key in ("description", "alsa_card", "alsa_conf", "alsa_format", "gain"):
            assert meta[key], f"{path.name}: profile.{key} is empty"
        assert (REPO / "hardware" / "alsa" / meta["alsa_conf"]).is_file()
        cfg = validate(doc["config"])  # what config set will write must be accepted
        assert cfg.capture.device == "edge_mic"
        sample_bits = {"int16": "S16_LE", "int32": "S32_LE", "float32": "FLOAT_LE"}
        assert sample_bits[cfg.capture.format] == meta["alsa_format"]


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed "
                    "(apt-get install shellcheck)")
def test_every_script_passes_shellcheck() -> None:
    scripts = sorted(p for p in (REPO / "scripts").iterdir()
                     if p.is_file() and p.read_text(errors="replace").startswith("#!"))
    assert INSTALL in scripts
    out = subprocess.run(["shellcheck", "--severity=style", *map(str, scripts)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path) -> None:
    token = tmp_path / "upload-token.txt"
    token.write_text("secret\n")
    system_files = [Path("/etc/alsa/conf.d/60-edge-agent.conf"),
                    Path("/etc/systemd/system/edge-agent.service")]
    existed = [f.exists() for f in system_files]
    user_exists = subprocess.run(["id", "-u", "edge-agent"], capture_output=True).returncode == 0
    out = dry_run(tmp_path, "--profile", "i2s-mems", "--device-id", "site-7",
                  "--token", f"upload={token}")
    assert out.returncode == 0, out.stderr
    cmds = commands(out.stdout)
    etc, opt, state = tmp_path / "etc", tmp_path / "opt", tmp_path / "state"
    if not user_exists:
        assert cmds[0][:5] == ["useradd", "--system", "--user-group", "--groups", "audio"]
    assert ["install", "-d", "-m", "0750", "-o", "root", "-g", "edge-agent", str(etc)] in cmds
    assert ["install", "-d", "-m", "0750", "-o", "edge-agent", "-g", "edge-agent",
            str(state)] in cmds
    sync = next(c for c in cmds if "sync" in c)
    assert {"--frozen", "--no-dev", "--no-editable"} <= set(sync)
    assert f"UV_PROJECT_ENVIRONMENT={opt}/venv" in sync
    agent = f"{opt}/venv/bin/edge-agent"
    assert [agent, "config", "init", f"{etc}/agent.toml"] in cmds
    config_set = next(c for c in cmds if c[1:3] == ["config", "set"] and "device.id=site-7" in c)
    assert {f"device.data_dir={state}", 'capture.format="int32"', "capture.rate=48000"} <= set(
        config_set)
    assert ["install", "-m", "0600", "-o", "edge-agent", "-g", "edge-agent", str(token),
            f"{etc}/tokens/upload.token"] in cmds
    assert [agent, "config", "set", f"{etc}/agent.toml",
            f"upload.token_file={etc}/tokens/upload.token"] in cmds
    assert cmds[-3:] == [["systemctl", "daemon-reload"],
                         ["systemctl", "enable", "edge-agent.service"],
                         ["systemctl", "restart", "edge-agent.service"]]
    assert written(out.stdout, "/etc/systemd/system/edge-agent.service") == (
        REPO / "hardware/systemd/edge-agent.service").read_text()
    # Nothing was touched.
    assert not any(p.exists() for p in (etc, opt, state))
    assert [f.exists() for f in system_files] == existed
    assert (subprocess.run(["id", "-u", "edge-agent"], capture_output=True).returncode == 0) \
        == user_exists


def test_printed_config_steps_produce_a_valid_config(tmp_path: Path) -> None:
    """Run the dry run's own config commands with this checkout's edge-agent."""
    out = dry_run(tmp_path, "--profile", "respeaker-2mic", "--device-id", "site-9")
    assert out.returncode == 0, out.stderr
    for cmd in commands(out.stdout):
        if cmd[0].endswith("/bin/edge-agent") and cmd[1] == "config":
            subprocess.run([str(EDGE_AGENT), *cmd[1:]], check=True, capture_output=True,
                           timeout=60)
    cfg = load_config(tmp_path / "etc" / "agent.toml")
    assert (cfg.device.id, cfg.device.data_dir) == ("site-9", str(tmp_path / "state"))
    assert (cfg.capture.device, cfg.capture.rate, cfg.capture.channels) == ("edge_mic", 48000, 2)
    assert cfg.stt == default_config().stt  # everything else stays at its default


def test_rerun_keeps_the_config_and_the_profile(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "agent.toml").write_text('[device]\nid = "site-3"\n[capture]\nrate = 16000\n')
    (etc / "profile").write_text("respeaker-2mic\n")
    out = dry_run(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "profile: respeaker-2mic" in out.stdout
    assert "keeping the existing config" in out.stdout
    cmds = commands(out.stdout)
    assert not any(c[1:3] in (["config", "init"], ["config", "set"]) for c in cmds)
    assert [f"{tmp_path}/opt/venv/bin/edge-agent", "config", "check",
            f"{etc}/agent.toml"] in cmds
    assert "seeed2micvoicec" in written(out.stdout, "/etc/alsa/conf.d/60-edge-agent.conf")


def test_bad_arguments_are_one_clear_line(tmp_path: Path) -> None:
    out = dry_run(tmp_path, "--profile", "respeaker-6mic")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "install-device: unknown profile 'respeaker-6mic'; available: i2s-mems "
        "pi-usb-soundcard respeaker-2mic respeaker-4mic usb-mic")
    out = dry_run(tmp_path, "--token", f"ssh={tmp_path}")
    assert out.returncode == 2
    assert out.stderr.strip().endswith("expected stt=FILE, upload=FILE or api=FILE")


@pytest.mark.skipif(not shutil.which("arecord"), reason="arecord not installed "
                    "(apt-get install alsa-utils)")
@pytest.mark.parametrize("profile", [p.stem for p in PROFILES])
def test_installed_alsa_file_defines_edge_mic_on_the_profile_card(
    profile: str, tmp_path: Path
) -> None:
    out = dry_run(tmp_path, "--profile", profile)
    assert out.returncode == 0, out.stderr
    conf = written(out.stdout, "/etc/alsa/conf.d/60-edge-agent.conf")
    meta: dict[str, Any] = tomllib.loads(
        (REPO / "hardware/profiles" / f"{profile}.toml").read_text())["profile"]
    home = tmp_path / "home"
    home.mkdir()
    (home / ".asoundrc").write_text(conf)
    env = {**os.environ, "HOME": str(home)}
    listed = subprocess.run(["arecord", "-L"], capture_output=True, text=True, env=env,
                            timeout=30)
    assert "ALSA lib" not in listed.stderr, listed.stderr  # the file parses
    assert "edge_mic\n" in listed.stdout
    # Opening it goes down the layers to the profile's card (absent on this machine).
    opened = subprocess.run(["arecord", "-D", "edge_mic", "-d", "1", "-q", "/dev/null"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert opened.returncode != 0
    assert f"Cannot get card index for {meta['alsa_card']}" in opened.stderr
