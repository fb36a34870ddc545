"""The operator's ``fleet.toml``: which bucket the fleet writes to, how its
segments are keyed, whose keys read it, and the operator command's own limits.

Read like the agent's config: `tomllib` through `config.read_toml`, then
`schema.convert_table` key by key, so a file with several mistakes gets one
line per bad key, each naming the file and the key. The bucket's settings are
those of the devices' ``[upload.s3]`` (the same checks apply); the operator's
keys are an AWS shared-credentials file, as a device's are. A relative
``credentials_file`` is taken from the directory of ``fleet.toml``.

Imports only the bottom layer (config, schema, wire, s3's credentials reader).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from ..config import ConfigError, S3Config, read_toml
from ..s3 import Credentials, read_credentials
from ..schema import convert_table
from ..wire import check_s3_target

__all__ = ["OperatorConfig", "load_operator_config"]


class OperatorConfig(S3Config):
    """The whole of ``fleet.toml`` (one table, no sections): the bucket's settings
    as the devices' ``[upload.s3]`` has them (``credentials_file`` holding the
    operator's keys, relative to this file), and the command's own."""

    stale_after: Annotated[float, Meta(gt=1, le=100, description=(
        "A device is stale when its last heartbeat is older than this many of its own "
        "heartbeat intervals"))] = 2.5
    stale_after_seconds: Annotated[float, Meta(ge=0, description=(
        "When above 0: a device is stale past this age of its heartbeat, whatever its "
        "interval (seconds)"))] = 0.0
    max_devices: Annotated[int, Meta(ge=1, le=1_000_000, description=(
        "Heartbeats read by `fleet devices` at most"))] = 10_000
    max_segments: Annotated[int, Meta(ge=1, le=1_000_000, description=(
        "Segments one `fleet segments` or `fleet get` reads at most"))] = 20_000
    max_range_seconds: Annotated[float, Meta(gt=0, le=31 * 86400, description=(
        "Longest range one `fleet get` stitches (seconds)"))] = 86400.0
    max_requests_per_get: Annotated[int, Meta(ge=1, le=100, description=(
        "Missing stretches one `fleet get --request` asks a device for at most"))] = 8
    poll_seconds: Annotated[float, Meta(ge=0.05, le=600, description=(
        "How often `fleet get --request` looks for the device's answer (seconds)"))] = 2.0
    timeout_seconds: Annotated[float, Meta(gt=0, description=(
        "How long `fleet get --request` waits for the answer by default (seconds)"))] = 900.0
    concurrency: Annotated[int, Meta(ge=1, le=64, description=(
        "Requests to the store in flight at once"))] = 8

    def credentials(self) -> Credentials:
        """The operator's keys (`ConfigError` in one line when they cannot be read)."""
        return read_credentials(self.credentials_file, self.profile, key="credentials_file")


def load_operator_config(path: str | os.PathLike[str]) -> OperatorConfig:
    """Read and check `path`; `ConfigError` with one line per problem, each
    starting with the file's name."""
    p = Path(path)
    raw = read_toml(p)
    problems: list[str] = []
    bad: list[str] = []
    value = convert_table(raw, OperatorConfig, "", problems, bad)
    assert isinstance(value, OperatorConfig)
    for key, problem in check_s3_target(value.endpoint, value.region, value.bucket,
                                        value.addressing, value.key_template):
        if key not in bad:
            problems.append(f'{key}: {problem}, got "{getattr(value, key)}"')
    if not value.credentials_file and "credentials_file" not in bad:
        problems.append("credentials_file: expected the AWS shared-credentials file holding "
                        "the operator's keys")
    if problems:
        raise ConfigError([f"{p}: {line}" for line in problems])
    creds = Path(value.credentials_file).expanduser()
    if not creds.is_absolute():
        creds = p.parent / creds
    return msgspec.structs.replace(value, credentials_file=str(creds))
