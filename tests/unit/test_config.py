"""The config file as an installer meets it: `edge-agent config ...` on real files."""

from __future__ import annotations

import tomllib
import typing
from pathlib import Path
from typing import Literal

import msgspec
import pytest

from edge_agent.cli import main
from edge_agent.config import (
    AgentConfig,
    CaptureConfig,
    ConfigError,
    default_config,
    load_config,
    validate,
)
from edge_agent.configfile import describe


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cfg_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "agent.toml"
    assert run_cli(capsys, "config", "init", str(path))[0] == 0
    return path


def test_init_writes_a_complete_default_file(cfg_file: Path) -> None:
    raw = tomllib.loads(cfg_file.read_text())
    assert set(raw) == {"device", "capture", "ring", "stt", "segments", "upload", "api",
                        "recordings", "fleet"}
    assert raw["capture"]["rate"] == 48000
    assert validate(raw) == default_config()


def test_init_refuses_to_overwrite(cfg_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = cfg_file.read_bytes()
    code, _, err = run_cli(capsys, "config", "init", str(cfg_file))
    assert code == 2
    assert err == f"error: {cfg_file}: already exists (use --force to overwrite)\n"
    assert cfg_file.read_bytes() == before


def test_init_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "config", "init")
    assert code == 0
    assert validate(tomllib.loads(out)) == default_config()


def test_check_accepts_the_default(cfg_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "config", "check", str(cfg_file)) == (0, f"{cfg_file}: ok\n", "")


def test_check_warns_about_an_empty_model_for_hosted_protocols(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[stt]\nenabled = true\nprotocol = "openai"\n'
                    'url = "https://api.openai.com/v1/audio/transcriptions"\n')
    code, out, err = run_cli(capsys, "config", "check", str(path))
    assert code == 0 and out.strip() == f"{path}: ok"
    assert err.strip().splitlines() == [
        f'warning: {path}: stt.model: empty with stt.protocol = "openai"; hosted services '
        'and most servers refuse a request without one (e.g. "whisper-1")']
    path.write_text(path.read_text() + 'model = "whisper-1"\n')
    code, out, err = run_cli(capsys, "config", "check", str(path))
    assert code == 0 and err == ""


def test_bad_values_get_one_line_each_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[capture]\nrate = "48k"\nchannels = 0\nformat = "int8"\nrat = 1\n'
        '[device]\nid = "my device"\n[ring]\nseconds = true\n[stt]\nprotocol = "grpc"\n'
        "[bogus]\nx = 1\n"
    )
    code, out, err = run_cli(capsys, "config", "check", str(path))
    assert code == 2
    assert out == ""
    p = str(path)
    assert err.splitlines() == [
        f"error: {p}: bogus: unknown key; known keys here: "
        "api, capture, device, fleet, recordings, ring, segments, stt, upload",
        f"error: {p}: device.id: expected a string of letters, digits, '.', '_' or '-' "
        '(at most 64), got "my device"',
        f"error: {p}: capture.rat: unknown key (did you mean 'rate'?); known keys here: "
        "block_ms, channels, device, file, format, loop, queue_blocks, rate, realtime, source, "
        "stall_seconds, tone_dbfs, tone_hz, tone_seconds",
        f'error: {p}: capture.rate: expected an integer, got "48k"',
        f"error: {p}: capture.channels: expected an integer >= 1, got 0",
        f'error: {p}: capture.format: expected one of "int16", "int32", "float32", got "int8"',
        f"error: {p}: ring.seconds: expected a number, got true",
        f'error: {p}: stt.protocol: expected one of "openai", "deepgram", "raw", got "grpc"',
    ]


def test_opus_complexity_is_0_to_10_in_both_encoding_sections() -> None:
    for section in ("stt", "segments"):
        for complexity in (0, 10):
            assert getattr(validate({section: {"complexity": complexity}}),
                           section).complexity == complexity
        with pytest.raises(ConfigError) as info:
            validate({section: {"complexity": 11}})
        assert info.value.problems == [f"{section}.complexity: expected an integer <= 10, "
                                       "got 11"]


def test_rules_across_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        validate({"capture": {"source": "file"}, "upload": {"enabled": True, "url": "ftp://x"}})
    assert info.value.problems == [
        'capture.file: expected a WAV file path when capture.source = "file"',
        'upload.url: expected an http:// or https:// URL, got "ftp://x"',
    ]


def test_one_check_lists_bad_values_and_rules_across_keys_together() -> None:
    """An installer passing a bad device id and a bad URL hears of both at once."""
    with pytest.raises(ConfigError) as info:
        validate({"device": {"id": "my mic"},
                  "stt": {"enabled": True, "url": "stt.example", "max_chunk_seconds": "long",
                          "min_chunk_seconds": 20},
                  "api": {"enabled": True, "listen": "0.0.0.0:8640"}})
    assert info.value.problems == [
        "device.id: expected a string of letters, digits, '.', '_' or '-' (at most 64), "
        'got "my mic"',
        'stt.max_chunk_seconds: expected a number, got "long"',
        # min_chunk_seconds > max_chunk_seconds is not judged against the default of
        # the bad max_chunk_seconds.
        'stt.url: expected an http:// or https:// URL, got "stt.example"',
        'api.token_file: expected a token file when api.listen ("0.0.0.0:8640") is not a '
        "loopback address: without one anybody on the network could listen to the mic",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file (create one with: edge-agent config init {p})"),
        (b"[capture\nrate=1", "not valid TOML: Expected ']' at the end of a table declaration "
                              "(at line 1, column 9)"),
        (b"\xff\xfe", "not UTF-8 text (byte 0)"),
    ],
)
def test_unreadable_files_are_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    path = tmp_path / "agent.toml"
    if content is not None:
        path.write_bytes(content)
    code, _, err = run_cli(capsys, "config", "check", str(path))
    assert code == 2
    assert err == f"error: {path}: {message.format(p=path)}\n"


def test_directory_instead_of_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "config", "show", str(tmp_path))
    assert (code, err) == (2, f"error: {tmp_path}: is a directory, expected a TOML file\n")


def test_show_prints_the_effective_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "small.toml"
    path.write_text('[capture]\nrate = 16000\n[device]\nid = "kitchen-1"\n')
    code, out, _ = run_cli(capsys, "config", "show", str(path))
    assert code == 0
    shown = tomllib.loads(out)
    assert shown["capture"]["rate"] == 16000
    assert shown["device"]["id"] == "kitchen-1"
    assert shown["ring"]["seconds"] == default_config().ring.seconds  # defaults filled in
    assert f"# {describe(CaptureConfig)['rate']}\nrate = 16000\n" in out


def test_set_edits_in_place_and_keeps_other_keys(
    cfg_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys, "config", "set", str(cfg_file),
        "capture.rate=16000", "device.id=porch-7", "capture.device=2", "stt.enabled=false",
    )
    assert code == 0, out
    cfg = load_config(cfg_file)
    assert cfg.capture.rate == 16000
    assert cfg.device.id == "porch-7"
    assert cfg.capture.device == 2
    assert cfg.segments == default_config().segments


def test_set_with_a_bad_value_leaves_the_file_untouched(
    cfg_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = cfg_file.read_bytes()
    code, _, err = run_cli(capsys, "config", "set", str(cfg_file), "capture.rate=48k",
                           "capture.chanels=2")
    assert code == 2
    assert err.splitlines() == [
        f"error: {cfg_file}: capture.chanels: unknown key (did you mean 'channels'?); known keys "
        "here: block_ms, channels, device, file, format, loop, queue_blocks, rate, realtime, "
        "source, stall_seconds, tone_dbfs, tone_hz, tone_seconds (file left unchanged)",
        f'error: {cfg_file}: capture.rate: expected an integer, got "48k" (file left unchanged)',
    ]
    assert cfg_file.read_bytes() == before
    assert [p.name for p in cfg_file.parent.iterdir()] == [cfg_file.name]  # no temp left


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("capture.rate", "capture.rate: expected key.path=value"),
        ("=5", "=5: expected key.path=value"),
        ("capture..rate=5", "capture..rate: expected a dotted key path such as capture.rate"),
        ("capture.rate.x=5", "capture.rate: is a value, not a table"),
    ],
)
def test_set_rejects_malformed_assignments(
    cfg_file: Path, capsys: pytest.CaptureFixture[str], arg: str, message: str
) -> None:
    before = cfg_file.read_bytes()
    code, _, err = run_cli(capsys, "config", "set", str(cfg_file), arg)
    assert (code, err) == (2, f"error: {message}\n")
    assert cfg_file.read_bytes() == before


def test_set_keeps_the_file_mode(cfg_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file.chmod(0o600)
    assert run_cli(capsys, "config", "set", str(cfg_file), "ring.seconds=120")[0] == 0
    assert cfg_file.stat().st_mode & 0o777 == 0o600
    assert load_config(cfg_file).ring.seconds == 120


# ----------------------------------------------------------------------------
# The file stays the person's: comments on every key, edits that keep theirs

def tables(cls: type[msgspec.Struct], prefix: str = "") -> dict[str, type[msgspec.Struct]]:
    """Every table of the schema by its TOML name, sub-tables (``upload.s3``) too."""
    out: dict[str, type[msgspec.Struct]] = {}
    hints = typing.get_type_hints(cls)
    for f in msgspec.structs.fields(cls):
        sub = hints[f.name]
        if isinstance(sub, type) and issubclass(sub, msgspec.Struct):
            out[f"{prefix}{f.encode_name}"] = sub
            out.update(tables(sub, f"{prefix}{f.encode_name}."))
    return out


SECTIONS = tables(AgentConfig)


def scalar_keys(section: type[msgspec.Struct]) -> list[str]:
    hints = typing.get_type_hints(section)
    return [f.encode_name for f in msgspec.structs.fields(section)
            if not (isinstance(hints[f.name], type) and issubclass(hints[f.name], msgspec.Struct))]


def test_init_comments_every_key_and_loads_back_to_the_defaults(
    capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "config", "init")
    assert code == 0
    assert validate(tomllib.loads(out)) == default_config()
    lines = out.splitlines()
    for name, section in SECTIONS.items():
        header = lines.index(f"[{name}]")
        assert lines[header - 1].startswith("# "), f"[{name}] has no comment"
        body = lines[header + 1:]
        end = next((i for i, line in enumerate(body) if line.startswith("[")), len(body))
        keys = [line.split(" = ")[0] for line in body[:end] if " = " in line
                and not line.startswith("#")]
        assert keys == scalar_keys(section)
        for i, line in enumerate(body[:end]):
            if not line.startswith("#") and " = " in line:
                comment = body[i - 1]
                assert comment.startswith("# ") and len(comment) > 10, \
                    f"{name}.{line.split(' = ')[0]} has no comment"


def test_each_comment_is_one_short_line_naming_every_choice() -> None:
    for name, section in SECTIONS.items():
        hints = typing.get_type_hints(section, include_extras=True)
        for key in scalar_keys(section):
            description = describe(section)[key]
            assert "\n" not in description and len(f"# {description}") <= 88, f"{name}.{key}"
            field_type = typing.get_args(hints[key])[0]
            for choice in typing.get_args(field_type) if typing.get_origin(
                    field_type) is Literal else ():
                assert f'"{choice}"' in description, f"{name}.{key} does not name {choice!r}"


COMMENTED = """\
# Porch unit, mounted 2024-05
[device]
  id = 'porch-7'   # the label on the box

# The mic on the left
[capture]
rate   = 48000   # the mic's native rate
format = "int32"

# Keep ten minutes
[ring]
seconds = 600
"""


def test_set_changes_only_the_lines_of_the_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(COMMENTED)
    code, out, err = run_cli(capsys, "config", "set", str(path), "device.id=porch-8",
                             "capture.rate=16000", "ring.seconds=120")
    assert (code, out, err) == (0, f"{path}: updated device.id, capture.rate, ring.seconds\n",
                                "")
    before, after = COMMENTED.splitlines(), path.read_text().splitlines()
    assert len(after) == len(before)
    assert [(a, b) for a, b in zip(before, after, strict=True) if a != b] == [
        ("  id = 'porch-7'   # the label on the box", "  id = 'porch-8'   # the label on the box"),
        ("rate   = 48000   # the mic's native rate", "rate   = 16000   # the mic's native rate"),
        ("seconds = 600", "seconds = 120"),
    ]


def test_set_keeps_every_comment_of_an_init_file(
    cfg_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = cfg_file.read_text().splitlines()
    assert run_cli(capsys, "config", "set", str(cfg_file), "stt.enabled=true",
                   "stt.url=http://127.0.0.1:8650/v1/stt/raw")[0] == 0
    after = cfg_file.read_text().splitlines()
    assert [(a, b) for a, b in zip(before, after, strict=True) if a != b] == [
        ("enabled = false", "enabled = true"),
        ('url = ""', 'url = "http://127.0.0.1:8650/v1/stt/raw"'),
    ]
    assert before.index("[stt]") < after.index('url = "http://127.0.0.1:8650/v1/stt/raw"')


def test_set_adds_an_absent_key_after_the_last_key_of_its_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(COMMENTED)
    assert run_cli(capsys, "config", "set", str(path), "capture.channels=2",
                   "device.data_dir=/srv/porch", "ring.seconds=120",
                   'device.id="porch-9"')[0] == 0
    # Not under "# Keep ten minutes", which introduces [ring]; indented like its neighbour.
    assert path.read_text() == COMMENTED.replace(
        "'porch-7'   # the label on the box\n",
        "'porch-9'   # the label on the box\n  data_dir = \"/srv/porch\"\n").replace(
        'format = "int32"\n', 'format = "int32"\nchannels = 2\n').replace(
        "seconds = 600", "seconds = 120")


@pytest.mark.parametrize("ending", ["", "\n", "\n# seconds = 900 was too much memory\n"])
def test_set_adds_an_absent_section_at_the_end_after_a_blank_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ending: str
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[ring]\nseconds = 600" + ending)
    assert run_cli(capsys, "config", "set", str(path), "capture.rate=16000",
                   "capture.channels=2")[0] == 0
    assert path.read_text() == ("[ring]\nseconds = 600" + (ending or "\n")
                                + "\n[capture]\nrate = 16000\nchannels = 2\n")


def test_set_on_an_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("")
    assert run_cli(capsys, "config", "set", str(path), "device.id=porch-1")[0] == 0
    assert path.read_text() == '[device]\nid = "porch-1"\n'


def test_the_readme_shows_what_init_writes(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Configuration"):]
    start = section.index("```toml\n") + len("```toml\n")
    example = section[start:section.index("```\n", start)]
    assert example in run_cli(capsys, "config", "init")[1]
