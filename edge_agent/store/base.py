"""What every store shares: the `Store` protocol, keys, and the stored-object record.

Keys are ``/``-separated parts of letters, digits and ``._@=+,-`` (a part never
starts with ``.``), at most 1024 characters: safe as file paths and URL paths.

Imports only the bottom layer; never a stage or the agent.
"""

from __future__ import annotations

import builtins
import io
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any, Protocol, runtime_checkable

from ..errors import EdgeAgentError

log = logging.getLogger(__name__)

#: What `Store.upload` takes: bytes, or a binary file read from its current position.
Body = bytes | bytearray | memoryview | IO[bytes]

MAX_KEY_CHARS = 1024
MAX_PART_CHARS = 200
_PART_RE = re.compile(r"^[A-Za-z0-9_@=+,-][A-Za-z0-9._@=+,-]*$")
CHUNK_BYTES = 1 << 20
META_DIR = ".meta"
# Metadata travels as one compact JSON header (ASCII-escaped, so any value fits).
METADATA_HEADER = "Edge-Metadata"
MAX_METADATA_HEADER_BYTES = 8192


class StoreError(EdgeAgentError):
    """A store refused or failed an operation for good (the message says why)."""


def check_key(key: str) -> list[str]:
    """The parts of a valid key, or ValueError naming what is wrong with it."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"store key {key!r}: expected a non-empty string")
    if len(key) > MAX_KEY_CHARS:
        raise ValueError(f"store key {key[:40]!r}...: longer than {MAX_KEY_CHARS} characters")
    parts = key.split("/")
    for part in parts:
        _check_part(part, key)
    return parts


def _check_part(part: str, key: str) -> None:
    if not part:
        raise ValueError(f"store key {key!r}: empty part (leading, trailing or double '/')")
    if len(part) > MAX_PART_CHARS:
        raise ValueError(f"store key {key!r}: part longer than {MAX_PART_CHARS} characters")
    if not _PART_RE.fullmatch(part):
        raise ValueError(
            f"store key {key!r}: part {part!r} must be letters, digits or ._@=+,- "
            "and must not start with '.'"
        )


class KeyBuilder:
    """Builds storage keys from parts: ``build("session-123", "segment", id)`` gives
    ``session-123/segment/<id>``. A part may itself hold ``/``-separated parts."""

    separator = "/"

    def build(self, *parts: str) -> str:
        """Join `parts` into a key; ValueError names a part that cannot be in a key."""
        if not parts:
            raise ValueError("a store key needs at least one part")
        for part in parts:
            if not isinstance(part, str):
                raise ValueError(f"store key part {part!r}: expected a string")
        key = self.separator.join(parts)
        check_key(key)
        return key


@runtime_checkable
class Store(Protocol):
    """Where recordings are uploaded. All methods are async (Trio)."""

    key_builder: KeyBuilder

    async def upload(self, data: Body, key: str, metadata: Mapping[str, Any] | None = None
                     ) -> str:
        """Store `data` under `key` with JSON-serialisable `metadata`; returns the key."""
        ...

    async def download(self, key: str) -> bytes:
        """The object's bytes; KeyError if there is none."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def list(self, prefix: str = "") -> builtins.list[str]:
        """Keys starting with `prefix` (a plain string prefix, as in S3), sorted."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""
        ...


@dataclass(frozen=True)
class StoredObject:
    """What a store knows about one object."""

    key: str
    bytes: int
    sha256: str
    metadata: dict[str, Any]
    stored_utc: str


@dataclass
class StoreStats:
    """Counters of one store instance."""

    uploads: int = 0
    bytes_uploaded: int = 0
    already_present: int = 0  # idempotent repeats the server recognised
    retries: int = 0
    failures: int = 0
    downloads: int = 0
    deletes: int = 0


def metadata_json(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A JSON-safe copy of `metadata` (ValueError for what JSON cannot hold)."""
    try:
        out: dict[str, Any] = json.loads(json.dumps(dict(metadata or {}), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"store metadata must be JSON-serialisable: {exc}") from None
    return out


def as_stream(data: Body) -> IO[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(data))
    return data


# ----------------------------------------------------------------------------
# LocalStore


