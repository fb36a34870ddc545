"""``[upload.s3]`` as an installer meets it: `config check` and `config set` on real
files, object keys from the key template, and the AWS credentials file."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.config import ConfigError, load_config
from edge_agent.s3 import read_credentials
from edge_agent.wire import DEFAULT_KEY_TEMPLATE, check_key_template, segment_key

SEGMENT = "20261124T053000.000Z-3f9a1c2b"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_keys_list_by_device_then_time_and_never_change_between_attempts() -> None:
    assert segment_key(DEFAULT_KEY_TEMPLATE, "porch-7", SEGMENT, "opus") == \
        f"porch-7/2026/11/24/{SEGMENT}.opus"
    hourly = "{device}/{yyyy}-{mm}-{dd}/{hh}/{segment}.{ext}"
    assert check_key_template(hourly) is None
    assert segment_key(hourly, "porch-7", SEGMENT, "oga") == f"porch-7/2026-11-24/05/{SEGMENT}.oga"


@pytest.mark.parametrize(("template", "problem"), [
    ("{device}/{yyyy}", "expected a {segment} placeholder"),
    ("{device}/{date}/{segment}", "unknown placeholder {date}"),
    ("{device}/{segment:>40}", "{segment} takes no format"),
    ("/{device}/{segment}", "without a leading '/'"),
    ("{device}//{segment}", "an empty part"),
    ("{device}/../{segment}", "'..' part"),
    ("{device} audio/{segment}", "character ' ' is not allowed"),
    ("{device}/{segment", "unbalanced braces"),
])
def test_a_bad_key_template_is_one_line_at_config_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], template: str, problem: str,
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[upload]\nenabled = true\ntarget = "s3"\n\n[upload.s3]\nbucket = "audio"\n'
                   f'credentials_file = "/etc/edge-agent/s3"\nkey_template = "{template}"\n')
    code, out, err = run_cli(capsys, "config", "check", str(cfg))
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {cfg}: upload.s3.key_template: ")
    assert problem in lines[0] and f'got "{template}"' in lines[0]


def test_an_s3_target_needs_a_bucket_and_keys_and_names_each_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[upload]\nenabled = true\ntarget = "s3"\n\n[upload.s3]\n'
                   'endpoint = "http://10.0.0.5:9000/bucket"\nbucket = "Audio_Files"\n'
                   'region = "EU West"\naddressing = "virtual"\n')
    code, _, err = run_cli(capsys, "config", "check", str(cfg))
    assert code == 2
    assert [line.split(": ")[2] for line in err.splitlines()] == [
        "upload.s3.endpoint", "upload.s3.region", "upload.s3.bucket",
        "upload.s3.credentials_file"]
    assert "url" not in err  # the http target's url is not asked for


def test_virtual_addressing_with_an_ip_address_endpoint_is_refused() -> None:
    from edge_agent.config import validate

    with pytest.raises(ConfigError) as caught:
        validate({"upload": {"target": "s3", "s3": {
            "endpoint": "http://127.0.0.1:8333", "bucket": "audio", "addressing": "virtual",
            "credentials_file": "/x"}}})
    assert caught.value.problems == [
        'upload.s3.addressing: "virtual" puts the bucket into the host name, which an IP '
        'address cannot take; expected "path", got "virtual"']


def test_config_set_writes_the_s3_table_and_config_show_reads_it_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = tmp_path / "agent.toml"
    assert run_cli(capsys, "config", "init", str(cfg))[0] == 0
    code, _, err = run_cli(capsys, "config", "set", str(cfg), "upload.enabled=true",
                           "upload.target=s3", "upload.s3.endpoint=https://minio.lan:9000",
                           "upload.s3.bucket=field-audio",
                           "upload.s3.credentials_file=/etc/edge-agent/s3-credentials")
    assert code == 0, err
    s3 = load_config(cfg).upload.s3
    assert (s3.endpoint, s3.bucket, s3.key_template) == (
        "https://minio.lan:9000", "field-audio", DEFAULT_KEY_TEMPLATE)
    text = cfg.read_text()
    assert text.index("[upload]") < text.index("[upload.s3]") < text.index("[api]")
    assert "# Bucket the segments are written to\nbucket = \"field-audio\"" in text
    code, out, _ = run_cli(capsys, "config", "show", str(cfg))
    assert code == 0 and tomllib.loads(out)["upload"]["s3"]["bucket"] == "field-audio"


CREDS = "upload.s3.credentials_file"


def test_the_credentials_file_is_the_aws_shared_format(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    path.write_text("# porch unit\n[default]\naws_access_key_id = AKIAPORCH7\n"
                    "aws_secret_access_key = s3cr3t/Key+\n\n[rotated]\n"
                    "aws_access_key_id=ASIAROT\naws_secret_access_key=other\n"
                    "aws_session_token = FwoGZXIvYXdz\n")
    default = read_credentials(path)
    assert (default.access_key_id, default.secret_access_key, default.session_token) == (
        "AKIAPORCH7", "s3cr3t/Key+", None)
    assert "s3cr3t" not in repr(default)
    assert read_credentials(path, "rotated").session_token == "FwoGZXIvYXdz"


@pytest.mark.parametrize(("text", "problem"), [
    (None, "no such file"),
    ("aws_access_key_id = AKIA\n", "not an AWS credentials file"),
    ("[other]\naws_access_key_id = A\naws_secret_access_key = B\n",
     "expected a [default] section (upload.s3.profile), found [other]"),
    ("[default]\naws_access_key_id = AKIA\n", "expected aws_secret_access_key = ..."),
    ("[default]\naws_access_key_id = AK IA\naws_secret_access_key = x\n",
     "expected aws_access_key_id = ..."),
])
def test_a_bad_credentials_file_is_one_line_naming_the_key_and_the_file(
    tmp_path: Path, text: str | None, problem: str,
) -> None:
    path = tmp_path / "credentials"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        read_credentials(path)
    assert len(caught.value.problems) == 1
    line = caught.value.problems[0]
    assert line.startswith(f"{CREDS}: {path}: ") and problem in line
