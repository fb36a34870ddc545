"""What goes onto a device: hardware profiles, ALSA and udev files, and
scripts/install-device: dry runs, and real runs only with input it must refuse
before its first step (with stand-ins on PATH for the commands that change the
system, should it not)."""

from __future__ import annotations

import os
import select
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import default_config, load_config, validate

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install-device"
PROFILES = sorted((REPO / "hardware" / "profiles").glob("*.toml"))


def install(tmp_path: Path, *args: str, dry: bool = True, path: Path | None = None,
            repo: Path = REPO) -> subprocess.CompletedProcess[str]:
    """scripts/install-device with the device's directories under tmp_path; `path`
    goes first on PATH."""
    return subprocess.run([str(repo / "scripts" / "install-device"),
                           *(["--dry-run"] if dry else []), *args],
                          capture_output=True, text=True, env=device_env(tmp_path, path),
                          timeout=120)


def device_env(tmp_path: Path, path: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "EDGE_AGENT_PREFIX": str(tmp_path / "opt"),
           "EDGE_AGENT_ETC": str(tmp_path / "etc"), "EDGE_AGENT_STATE": str(tmp_path / "state")}
    if path is not None:
        env["PATH"] = f"{path}:{env['PATH']}"
    return env


def dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return install(tmp_path, *args)


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


def steps(out: str) -> list[str]:
    """The names of the steps a run printed, in order."""
    return [line[3:] for line in out.splitlines() if line.startswith("== ")]


def summary(out: str) -> list[str]:
    """The lines of the summary a run ends with."""
    lines = out.splitlines()
    start = lines.index("== summary")
    return lines[start + 1:lines.index("", start)]


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path) -> None:
    token = tmp_path / "upload-token.txt"
    token.write_text("secret\n")
    system_files = [Path("/etc/alsa/conf.d/60-edge-agent.conf"),
                    Path("/etc/systemd/system/edge-agent.service")]
    existed = [f.exists() for f in system_files]
    user_exists = subprocess.run(["id", "-u", "edge-agent"], capture_output=True).returncode == 0
    out = dry_run(tmp_path, "--profile", "i2s-mems", "--device-id", "site-7",
                  "--token", f"upload={token}",
                  "--upload-url", "https://backend.example/v1/devices/{device}/segments/{segment}",
                  "--stt-url", "https://user:pw@stt.example/v1/audio/transcriptions?key=k",
                  "--stt-protocol", "openai", "--stt-model", "whisper-1",
                  "--api-listen", "127.0.0.1:8641")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    # The environment is built before the user, the directories and the config.
    assert steps(out.stdout) == [
        "system packages", "edge-agent code and Python environment (from uv.lock)",
        "user edge-agent", "directories", f"config {tmp_path}/etc/agent.toml", "tokens",
        "audio: ALSA device edge_mic on card sndrpii2scard", "systemd unit edge-agent.service",
        "summary"]
    cmds = commands(out.stdout)
    etc, opt, state = tmp_path / "etc", tmp_path / "opt", tmp_path / "state"
    if not user_exists:
        assert ["useradd", "--system", "--user-group", "--groups", "audio"] in [
            c[:5] for c in cmds]
    assert ["install", "-d", "-m", "0750", "-o", "root", "-g", "edge-agent", str(etc)] in cmds
    assert ["install", "-d", "-m", "0750", "-o", "edge-agent", "-g", "edge-agent",
            str(state)] in cmds
    sync = next(c for c in cmds if "sync" in c)
    assert {"--frozen", "--no-dev", "--no-editable"} <= set(sync)
    assert f"UV_PROJECT_ENVIRONMENT={opt}/venv" in sync
    # The config is written whole, as it was checked, from the profile and the options.
    assert ["write", f"{etc}/agent.toml", "(mode", "0640,", "owner",
            "root:edge-agent)"] in cmds
    cfg = validate(tomllib.loads(written(out.stdout, f"{etc}/agent.toml")))
    assert (cfg.device.id, cfg.device.data_dir) == ("site-7", str(state))
    assert (cfg.capture.format, cfg.capture.rate) == ("int32", 48000)
    assert (cfg.upload.enabled, cfg.upload.token_file) == (True, f"{etc}/tokens/upload.token")
    assert (cfg.stt.enabled, cfg.stt.protocol, cfg.stt.model) == (True, "openai", "whisper-1")
    assert (cfg.api.enabled, cfg.api.listen) == (True, "127.0.0.1:8641")
    assert ["install", "-m", "0600", "-o", "edge-agent", "-g", "edge-agent", str(token),
            f"{etc}/tokens/upload.token"] in cmds
    assert cmds[-3:] == [["systemctl", "daemon-reload"],
                         ["systemctl", "enable", "edge-agent.service"],
                         ["systemctl", "restart", "edge-agent.service"]]
    assert written(out.stdout, "/etc/systemd/system/edge-agent.service") == (
        REPO / "hardware/systemd/edge-agent.service").read_text()
    # What is on, with no credentials or query in the URLs shown.
    assert summary(out.stdout) == [
        f"device: site-7, data in {state}",
        "capture: sounddevice edge_mic (profile i2s-mems, ALSA card sndrpii2scard), "
        "48000 Hz, 1 ch, int32",
        "segments: enabled, opus, 60 s each",
        "stt: enabled, openai protocol, https://stt.example/v1/audio/transcriptions, "
        "no token (--token stt=FILE)",
        "uploads: enabled, https://backend.example/v1/devices/{device}/segments/{segment}, "
        f"token {etc}/tokens/upload.token",
        f"api: enabled on 127.0.0.1:8641, token {state}/api-token (made on first start)",
        "service: enabled and (re)started",
        "(dry run: nothing was changed)",
    ]
    # Nothing was touched.
    assert not any(p.exists() for p in (etc, opt, state))
    assert [f.exists() for f in system_files] == existed
    assert (subprocess.run(["id", "-u", "edge-agent"], capture_output=True).returncode == 0) \
        == user_exists


def test_written_config_is_the_profile_and_the_defaults(tmp_path: Path) -> None:
    # A device id of digits stays a string (TOML would read 7001 as a number).
    out = dry_run(tmp_path, "--profile", "respeaker-2mic", "--device-id", "7001", "--no-start")
    assert out.returncode == 0, out.stderr
    config = tmp_path / "agent.toml"
    config.write_text(written(out.stdout, f"{tmp_path}/etc/agent.toml"))
    cfg = load_config(config)
    assert (cfg.device.id, cfg.device.data_dir) == ("7001", str(tmp_path / "state"))
    assert (cfg.capture.device, cfg.capture.rate, cfg.capture.channels) == ("edge_mic", 48000, 2)
    assert (cfg.stt, cfg.upload, cfg.api) == (
        default_config().stt, default_config().upload, default_config().api)
    # What stays off says how to turn it on.
    assert summary(out.stdout)[3:] == [
        "stt: disabled (no --stt-url)",
        "uploads: disabled (no --upload-url)",
        "api: disabled (no --api-listen)",
        "service: enabled, not started (--no-start)",
        "(dry run: nothing was changed)",
    ]


def test_rerun_keeps_the_config_and_the_profile(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "agent.toml").write_text('[device]\nid = "site-3"\n[capture]\nrate = 16000\n')
    (etc / "profile").write_text("respeaker-2mic\n")
    out = dry_run(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "profile: respeaker-2mic" in out.stdout
    assert "keeping the existing config" in out.stdout
    assert not any(c[:2] == ["write", f"{etc}/agent.toml"] for c in commands(out.stdout))
    assert "seeed2micvoicec" in written(out.stdout, "/etc/alsa/conf.d/60-edge-agent.conf")
    assert summary(out.stdout)[0] == "device: site-3, data in /var/lib/edge-agent"


def test_rerun_with_options_changes_only_those_keys(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "agent.toml").write_text('[device]\nid = "site-3"\n[capture]\nrate = 16000\n')
    (etc / "profile").write_text("respeaker-2mic\n")
    token = tmp_path / "upload.token"
    token.write_text("secret\n")
    url = "http://10.0.0.2:8650/v1/devices/{device}/segments/{segment}"
    stt = "http://10.0.0.2:8000/v1/audio/transcriptions"
    out = dry_run(tmp_path, "--upload-url", url, "--token", f"upload={token}",
                  "--stt-url", stt, "--stt-protocol", "openai")
    assert out.returncode == 0, out.stderr
    # The agent's warnings pass through, naming the option.
    assert out.stderr == (
        'install-device: warning: --stt-url: stt.model: empty with stt.protocol = "openai"; '
        'hosted services and most servers refuse a request without one (e.g. "whisper-1")\n')
    assert ("changing stt.enabled stt.url upload.enabled upload.url stt.protocol "
            "upload.token_file of the existing config") in out.stdout
    raw = tomllib.loads(written(out.stdout, f"{etc}/agent.toml"))
    assert raw == {"device": {"id": "site-3"}, "capture": {"rate": 16000},
                   "stt": {"enabled": True, "url": stt, "protocol": "openai"},
                   "upload": {"enabled": True, "url": url,
                              "token_file": f"{etc}/tokens/upload.token"}}
    assert f"uploads: enabled, {url}, token {etc}/tokens/upload.token" in summary(out.stdout)


def test_bad_input_fails_before_any_step_one_line_per_problem(tmp_path: Path) -> None:
    out = dry_run(tmp_path, "--device-id", "my mic", "--token", f"upload={tmp_path}/up.token",
                  "--token", f"ssh={tmp_path}", "--stt-url", "stt.example:9000",
                  "--upload-url", "https://backend.example/segments", "--api-listen",
                  "0.0.0.0:8640", "--stt-protocol", "grpc", "--card", "hw:1", "--profile")
    assert (out.returncode, commands(out.stdout), steps(out.stdout)) == (2, [], [])
    assert out.stderr.splitlines() == [
        "install-device: --profile: expected a value",
        "install-device: --card 'hw:1': expected an ALSA card id: letters, digits or '_' "
        "(see arecord -l)",
        f"install-device: --token upload={tmp_path}/up.token: no such file {tmp_path}/up.token",
        f"install-device: --token ssh={tmp_path}: expected stt=FILE, upload=FILE or api=FILE",
        "install-device: --device-id: device.id: expected a string of letters, digits, '.', "
        """'_' or '-' (at most 64), got "my mic\"""",
        'install-device: --stt-protocol: stt.protocol: expected one of "openai", "deepgram", '
        '"raw", got "grpc"',
        'install-device: --stt-url: stt.url: expected an http:// or https:// URL, '
        'got "stt.example:9000"',
        "install-device: --upload-url: upload.url: expected a {segment} placeholder (each "
        'segment has its own URL), got "https://backend.example/segments"',
        'install-device: --api-listen: api.token_file: expected a token file when api.listen '
        '("0.0.0.0:8640") is not a loopback address: without one anybody on the network '
        "could listen to the mic",
    ]
    assert not any((tmp_path / d).exists() for d in ("etc", "opt", "state"))


@pytest.mark.parametrize(("args", "line"), [
    (["--device-id", "my mic"], "--device-id: device.id: expected a string of letters, "
                                """digits, '.', '_' or '-' (at most 64), got "my mic\""""),
    (["--token", "api=/nonexistent/api.token"],
     "--token api=/nonexistent/api.token: no such file /nonexistent/api.token"),
    (["--upload-url", "backend.example/{segment}"],
     '--upload-url: upload.url: expected an http:// or https:// URL, '
     'got "backend.example/{segment}"'),
])
def test_each_bad_input_alone_is_one_line(tmp_path: Path, args: list[str], line: str) -> None:
    out = dry_run(tmp_path, *args)
    assert (out.returncode, steps(out.stdout)) == (2, [])
    assert out.stderr == f"install-device: {line}\n"


def test_a_real_run_refuses_bad_input_as_the_dry_run_does(tmp_path: Path) -> None:
    # Should a check fail to stop the run, these stand in the way of its first steps.
    guard = tmp_path / "guard"
    guard.mkdir()
    for name in ("apt-get", "install", "useradd", "usermod", "chown", "chmod", "mv",
                 "systemctl", "udevadm"):
        (guard / name).write_text('#!/bin/sh\necho "guard: $0 would change the system" >&2\n'
                                  "exit 99\n")
        (guard / name).chmod(0o755)
    bad = ["--device-id", "my mic", "--token", f"upload={tmp_path}/missing.token",
           "--stt-url", "ftp://stt.example"]
    dry = dry_run(tmp_path, *bad)
    real = install(tmp_path, *bad, dry=False, path=guard)
    assert (real.returncode, commands(real.stdout), steps(real.stdout)) == (2, [], [])
    assert steps(dry.stdout) == []
    expected = dry.stderr.splitlines()
    assert len(expected) == 3
    if os.geteuid() != 0:
        expected.insert(0, f"install-device: run as root (sudo {REPO}/scripts/install-device "
                           f"{' '.join(bad)}), or add --dry-run to see the steps")
    assert real.stderr.splitlines() == expected


def test_bad_arguments_are_one_clear_line(tmp_path: Path) -> None:
    out = dry_run(tmp_path, "--profile", "respeaker-6mic")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "install-device: unknown profile 'respeaker-6mic'; available: i2s-mems "
        "pi-usb-soundcard respeaker-2mic respeaker-4mic usb-mic")


class Terminal:
    """A pseudo-terminal as the installer's stdin and stdout: a person at a keyboard."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.seen = ""

    def expect(self, text: str) -> None:
        while text not in self.seen:
            ready, _, _ = select.select([self.master], [], [], 60)
            assert ready, f"no {text!r} in {self.seen!r}"
            self.seen += os.read(self.master, 4096).decode(errors="replace")
        self.seen = self.seen[self.seen.index(text) + len(text):]

    def answer(self, text: str) -> None:
        os.write(self.master, text.encode() + b"\r")

    def rest(self) -> str:
        out = self.seen
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the other side is closed
                return out.replace("\r\n", "\n")
            if not chunk:
                return out.replace("\r\n", "\n")
            out += chunk.decode(errors="replace")


def test_a_first_install_in_a_terminal_asks_what_was_not_given(tmp_path: Path) -> None:
    token = tmp_path / "upload.token"
    token.write_text("secret\n")
    url = "https://backend.example/v1/devices/{device}/segments/{segment}"
    term = Terminal()
    proc = subprocess.Popen([str(INSTALL), "--dry-run", "--api-listen", ""], stdin=term.slave,
                            stdout=term.slave, stderr=term.slave,
                            env={**device_env(tmp_path), "TERM": "dumb"})
    os.close(term.slave)
    try:
        for prompt, answer in [("device id [", "site-5"), ("(STT) URL", ""),
                               ("upload URL", url), ("upload token", str(token))]:
            term.expect(prompt)
            term.answer(answer)
        out = term.rest()
    except BaseException:
        proc.kill()
        raise
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0, out
    assert "device API address" not in out  # given (empty: no API)
    cfg = validate(tomllib.loads(written(out, f"{tmp_path}/etc/agent.toml")))
    assert (cfg.device.id, cfg.stt.enabled, cfg.api.enabled) == ("site-5", False, False)
    assert (cfg.upload.enabled, cfg.upload.url, cfg.upload.token_file) == (
        True, url, f"{tmp_path}/etc/tokens/upload.token")


def test_a_fresh_device_checks_the_config_once_the_environment_is_built(
    tmp_path: Path
) -> None:
    """No Python on a fresh device can run edge-agent before it is installed."""
    bare = tmp_path / "bin"
    bare.mkdir()
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    assert system_python is not None
    if subprocess.run([system_python, "-c", "import msgspec, trio"],
                      capture_output=True).returncode == 0:
        pytest.skip("the system's python3 has edge-agent's dependencies")
    (bare / "python3").symlink_to(system_python)
    checkout = tmp_path / "checkout"  # a clone: no .venv
    for part in ("scripts", "hardware", "edge_agent"):
        shutil.copytree(REPO / part, checkout / part)
    out = install(tmp_path, "--device-id", "site-8", path=bare, repo=checkout)
    assert out.returncode == 0, out.stderr
    assert "the config is checked once the Python environment is installed" in out.stdout
    assert steps(out.stdout)[1:4] == [
        "edge-agent code and Python environment (from uv.lock)",
        "config check (edge-agent config check, before the user, config and unit)",
        "user edge-agent"]
    assert "known once the config is checked" in out.stdout


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
