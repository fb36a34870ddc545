"""Where finished recordings go: the `Store` protocol, `LocalStore` and `HttpStore`.

`AudioRecorder.stop()` uploads each recording to a store under a key its
`key_builder` made from the caller's prefixes and a unique id. The stores are the
agent's own machinery, not a second copy of it:

* `LocalStore` writes through the spool's `FileOps` the way the spool seals a
  segment: a private temp file, fsync, rename, fsync of the directory. A crash
  leaves either the old object or the new one, never half of one. Keys are checked
  part by part, so no key can name a path outside the root.
* `HttpStore` speaks the uploader's idempotent protocol: `PUT` with the SHA-256 in
  `Content-Digest` and `If-None-Match: *`, judged by `uploader.judge_response`. A
  lost acknowledgement costs one more request, never a second object; a different
  body under an existing key is refused, never written over.
* The server side of that protocol is `reference.objects.store_routes`: the
  reference backend serves a `LocalStore` under `/v1/objects`, so `HttpStore` is
  tested against a real server.

Keys are ``/``-separated parts of letters, digits and ``._@=+,-`` (a part never
starts with ``.``), at most 1024 characters: safe as file paths and URL paths.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable
from urllib.parse import quote

import httpx
import trio

from .clock import Clock, SystemClock, iso_utc
from .errors import EdgeAgentError
from .fs import FileOps
from .supervisor import Backoff
from .wire import (
    Verdict,
    idempotent_put_headers,
    judge_response,
    parse_digest_header,
    parse_retry_after,
)

__all__ = [
    "Body",
    "HttpStore",
    "KeyBuilder",
    "LocalStore",
    "Store",
    "StoreError",
    "StoreStats",
    "StoredObject",
    "check_key",
]

log = logging.getLogger(__name__)

#: What `Store.upload` takes: bytes, or a binary file read from its current position.
Body = bytes | bytearray | memoryview | IO[bytes]

MAX_KEY_CHARS = 1024
MAX_PART_CHARS = 200
_PART_RE = re.compile(r"^[A-Za-z0-9_@=+,-][A-Za-z0-9._@=+,-]*$")
_CHUNK = 1 << 20
_META_DIR = ".meta"
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


def _metadata_json(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A JSON-safe copy of `metadata` (ValueError for what JSON cannot hold)."""
    try:
        out: dict[str, Any] = json.loads(json.dumps(dict(metadata or {}), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"store metadata must be JSON-serialisable: {exc}") from None
    return out


def _as_stream(data: Body) -> IO[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(data))
    return data


# ----------------------------------------------------------------------------
# LocalStore


class LocalStore:
    """Objects as files under `root`: ``root/<key>``, metadata in ``root/.meta/<key>.json``.

    Writes are atomic and durable (temp file, fsync, rename, fsync of the
    directory) through the spool's `FileOps`, so tests can fail any single step.
    An upload to an existing key replaces it: the metadata first, then the data,
    whose rename is the commit (a failed rename puts the old metadata back; a
    crash between the two renames can pair the new metadata with the old data).
    The recorder never replaces: its keys are unique.

    Args:
        root: The directory holding the objects (created on first upload).
        fs: The file-operations layer (a faulty one in tests).
        limiter: Bounds the worker threads doing the disk work.
        clock: For ``stored_utc``.
    """

    def __init__(self, root: str | os.PathLike[str], *, fs: FileOps | None = None,
                 limiter: trio.CapacityLimiter | None = None, clock: Clock | None = None
                 ) -> None:
        self.root = Path(root)
        self.fs = fs or FileOps()
        self.key_builder = KeyBuilder()
        self.stats = StoreStats()
        self.clock: Clock = clock or SystemClock()
        self._limiter = limiter or trio.CapacityLimiter(2)

    def __repr__(self) -> str:
        return f"<LocalStore root={str(self.root)!r}>"

    def path(self, key: str) -> Path:
        """The file holding `key` (ValueError for a bad key).

        Besides the syntax check, the resolved path must stay under the resolved
        root, so a symlink inside the root cannot lead a key out of it either.
        """
        parts = check_key(key)
        path = self.root.joinpath(*parts)
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root):
            raise ValueError(f"store key {key!r} leads outside the store root")
        return path

    def _meta_path(self, key: str) -> Path:
        parts = check_key(key)
        return self.root.joinpath(_META_DIR, *parts[:-1], parts[-1] + ".json")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- the protocol --------------------------------------------------------------

    async def upload(self, data: Body, key: str, metadata: Mapping[str, Any] | None = None
                     ) -> str:
        path = self.path(key)
        meta = _metadata_json(metadata)
        size = await self._run(self._write_object, _as_stream(data), key, path, meta)
        self.stats.uploads += 1
        self.stats.bytes_uploaded += size
        log.info("store upload key=%s bytes=%d root=%s", key, size, self.root)
        return key

    async def download(self, key: str) -> bytes:
        path = self.path(key)
        try:
            data: bytes = await self._run(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None
        self.stats.downloads += 1
        return data

    async def exists(self, key: str) -> bool:
        path = self.path(key)
        found: bool = await self._run(path.is_file)
        return found

    async def list(self, prefix: str = "") -> builtins.list[str]:
        keys: builtins.list[str] = await self._run(self._list, prefix)
        return keys

    async def delete(self, key: str) -> None:
        path = self.path(key)
        await self._run(self._delete, path, self._meta_path(key))
        self.stats.deletes += 1

    async def stat(self, key: str) -> StoredObject:
        """Size, digest and metadata of `key`; KeyError if there is none."""
        obj: StoredObject | None = await self._run(self.stat_sync, key)
        if obj is None:
            raise KeyError(key)
        return obj

    async def metadata(self, key: str) -> dict[str, Any]:
        """The metadata stored with `key`; KeyError if there is none."""
        return (await self.stat(key)).metadata

    # -- blocking parts (worker threads) -------------------------------------------

    def _write_object(self, src: IO[bytes], key: str, path: Path, meta: dict[str, Any]) -> int:
        fs = self.fs
        fs.makedirs(path.parent)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        digest = hashlib.sha256()
        size = 0
        fd = fs.create(tmp)
        try:
            try:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    fs.write(fd, chunk, str(tmp))
                fs.fsync(fd, str(tmp))
            finally:
                fs.close(fd, str(tmp))
            record = {"key": key, "bytes": size, "sha256": digest.hexdigest(),
                      "stored_utc": iso_utc(self.clock.utc()), "metadata": meta}
            meta_path = self._meta_path(key)
            try:
                previous: dict[str, Any] | None = json.loads(meta_path.read_bytes())
            except (FileNotFoundError, NotADirectoryError, ValueError):
                previous = None
            self._write_meta(meta_path, record)
            try:
                self._replace(tmp, path)
            except Exception:
                # The data stayed as it was: so must its metadata.
                with contextlib.suppress(OSError):
                    if previous is None:
                        fs.unlink(meta_path)
                    else:
                        self._write_meta(meta_path, previous)
                raise
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        return size

    def _write_meta(self, path: Path, record: dict[str, Any]) -> None:
        fs = self.fs
        fs.makedirs(path.parent)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = fs.create(tmp)
        try:
            try:
                fs.write(fd, json.dumps(record, indent=1).encode() + b"\n", str(tmp))
                fs.fsync(fd, str(tmp))
            finally:
                fs.close(fd, str(tmp))
            self._replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise

    def _replace(self, tmp: Path, path: Path) -> None:
        """Atomically put `tmp` in place of `path` (replacing it) and make it durable.

        `FileOps.rename` never replaces (the spool's segments are directories that
        must not be), so this is `os.replace` behind the same fault hook.
        """
        self.fs.before("rename", f"{tmp} -> {path}")
        os.replace(tmp, path)
        self.fs.fsync_dir(path.parent)

    def stat_sync(self, key: str) -> StoredObject | None:
        """`stat` for synchronous callers (blocking)."""
        path = self.path(key)
        try:
            size = path.stat().st_size
            record = json.loads(self._meta_path(key).read_bytes())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        if not path.is_file():
            return None
        return StoredObject(key=key, bytes=size, sha256=str(record.get("sha256", "")),
                            metadata=dict(record.get("metadata", {})),
                            stored_utc=str(record.get("stored_utc", "")))

    def _list(self, prefix: str) -> builtins.list[str]:
        # Walk only below the deepest directory the prefix names completely.
        head, _, _ = prefix.rpartition("/")
        start = self.root
        if head:
            try:
                start = self.path(head)
            except ValueError:
                return []
        found: builtins.list[str] = []
        if not start.is_dir():
            return found
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root)
            for name in filenames:
                if name.startswith("."):
                    continue
                key = (rel / name).as_posix() if rel.parts else name
                if key.startswith(prefix):
                    found.append(key)
        return sorted(found)

    def _delete(self, path: Path, meta_path: Path) -> None:
        fs = self.fs
        if path.is_file():
            fs.unlink(path)
            fs.fsync_dir(path.parent)
        if meta_path.exists():
            fs.unlink(meta_path)


# ----------------------------------------------------------------------------
# HttpStore


class HttpStore:
    """Objects behind an HTTP endpoint speaking the uploader's idempotent protocol.

    ``PUT {base_url}/{key}`` with `Content-Digest`, `If-None-Match: *` and the
    metadata as JSON in `Edge-Metadata`; ``GET``/``HEAD``/``DELETE`` on the same
    URL; ``GET {base_url}?prefix=...`` lists keys (a JSON array). Network errors,
    5xx, 408 and 429 are retried `retries` times with full-jitter backoff
    (honouring `Retry-After`); a library call must end, so unlike the agent's
    uploader it gives up then and raises `StoreError`.

    Args:
        base_url: e.g. ``https://backend.example/v1/objects``.
        token: Bearer token sent with every request.
        timeout: Bound on each whole request, in seconds.
        retries: Attempts after the first for a transient failure.
        transport: An httpx transport (tests may pass one).
        rng: Randomness for the backoff jitter.
    """

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 60.0,
                 retries: int = 5, backoff_initial: float = 0.5, backoff_max: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 rng: random.Random | None = None, clock: Clock | None = None) -> None:
        if not re.match(r"^https?://[^/\s]+", base_url):
            raise ValueError(f"HttpStore base_url {base_url!r}: expected an http(s):// URL")
        if retries < 0:
            raise ValueError(f"HttpStore retries must be >= 0, got {retries}")
        self.base_url = base_url.rstrip("/")
        self.key_builder = KeyBuilder()
        self.stats = StoreStats()
        self.timeout = timeout
        self.retries = retries
        self.backoff = Backoff(initial=backoff_initial, maximum=backoff_max, jitter=1.0,
                               rng=rng or random.Random())
        self.clock: Clock = clock or SystemClock()
        self._headers = {"User-Agent": "edge-agent"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._transport = transport

    def __repr__(self) -> str:
        return f"<HttpStore {self.base_url}>"

    def url(self, key: str) -> str:
        check_key(key)
        return f"{self.base_url}/{quote(key, safe='/')}"

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self._transport, headers=self._headers,
                                 timeout=httpx.Timeout(self.timeout), follow_redirects=False)

    async def _request(self, method: str, url: str, *,
                       body: Callable[[], bytes | AsyncIterator[bytes]] | None = None,
                       headers: Mapping[str, str] | None = None,
                       params: Mapping[str, str] | None = None,
                       judge: Callable[[httpx.Response], Verdict] | None = None
                       ) -> httpx.Response:
        """One logical request with retries; returns the response that ended it.

        Transport errors, timeouts, 5xx, 408 and 429 are retried (or what `judge`
        calls RETRY); `body()` makes a fresh body for each attempt.
        """
        attempt = 0
        async with self._client() as client:
            while True:
                reason: str
                retry_after: float | None = None
                try:
                    with trio.fail_after(self.timeout):
                        response = await client.request(
                            method, url, content=body() if body is not None else None,
                            headers=headers, params=params)
                except trio.TooSlowError:
                    reason = f"no answer within {self.timeout:g} s"
                except httpx.TransportError as exc:
                    reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
                else:
                    status = response.status_code
                    if judge is not None:
                        retry = judge(response) is Verdict.RETRY
                    else:
                        retry = status >= 500 or status in (408, 429)
                    if not retry:
                        return response
                    reason = f"status={status}"
                    retry_after = parse_retry_after(response.headers.get("retry-after"),
                                                    self.clock.utc())
                if attempt >= self.retries:
                    self.stats.failures += 1
                    raise StoreError(f"{method} {url} failed after {attempt + 1} attempt(s): "
                                     f"{reason}")
                delay = self.backoff.delay(attempt)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, self.backoff.maximum))
                attempt += 1
                self.stats.retries += 1
                log.info("store retry method=%s url=%s reason=%r retry_in=%.2fs", method, url,
                         reason, delay)
                await trio.sleep(delay)

    async def upload(self, data: Body, key: str, metadata: Mapping[str, Any] | None = None
                     ) -> str:
        url = self.url(key)
        meta = _metadata_json(metadata)
        encoded = json.dumps(meta, separators=(",", ":"), ensure_ascii=True)
        if len(encoded) > MAX_METADATA_HEADER_BYTES:
            raise ValueError(f"store metadata: {len(encoded)} bytes of JSON, at most "
                             f"{MAX_METADATA_HEADER_BYTES} fit in a header")
        # The digest goes in a header, so a file is read twice: once to hash it, then
        # streamed (from the same position) for each attempt; memory stays flat.
        if isinstance(data, bytes | bytearray | memoryview):
            raw = bytes(data)
            size, sha = len(raw), hashlib.sha256(raw).hexdigest()

            def body() -> bytes | AsyncIterator[bytes]:
                return raw
        else:
            stream = data
            origin, size, sha = await trio.to_thread.run_sync(_hash_from_here, stream)

            def body() -> bytes | AsyncIterator[bytes]:
                return _file_body(stream, origin, size)

        content_type = str(meta.get("content_type") or "application/octet-stream")
        headers = idempotent_put_headers(content_type, size, sha, {METADATA_HEADER: encoded})

        def judge(response: httpx.Response) -> Verdict:
            return judge_response(response.status_code, response.headers,
                                  response.text[:300], sha, self.clock.utc()).verdict

        response = await self._request("PUT", url, body=body, headers=headers, judge=judge)
        decision = judge_response(response.status_code, response.headers,
                                  response.text[:300].strip(), sha, self.clock.utc())
        if decision.verdict is Verdict.ALREADY:
            self.stats.already_present += 1
        elif decision.verdict is not Verdict.SYNCED:
            self.stats.failures += 1
            raise StoreError(f"PUT {url} refused: {decision.reason}")
        self.stats.uploads += 1
        self.stats.bytes_uploaded += size
        log.info("store upload key=%s bytes=%d url=%s already_present=%s", key, size, url,
                 decision.verdict is Verdict.ALREADY)
        return key

    async def download(self, key: str) -> bytes:
        url = self.url(key)
        response = await self._request("GET", url)
        if response.status_code == 404:
            raise KeyError(key)
        if response.status_code != 200:
            raise StoreError(f"GET {url}: status={response.status_code} {response.text[:200]!r}")
        self.stats.downloads += 1
        return response.content

    async def exists(self, key: str) -> bool:
        url = self.url(key)
        response = await self._request("HEAD", url)
        if response.status_code not in (200, 404):
            raise StoreError(f"HEAD {url}: status={response.status_code}")
        return response.status_code == 200

    async def list(self, prefix: str = "") -> builtins.list[str]:
        response = await self._request("GET", self.base_url, params={"prefix": prefix})
        if response.status_code != 200:
            raise StoreError(f"GET {self.base_url}?prefix={prefix}: "
                             f"status={response.status_code} {response.text[:200]!r}")
        keys = response.json()
        if not isinstance(keys, builtins.list) or not all(isinstance(k, str) for k in keys):
            raise StoreError(f"GET {self.base_url}: expected a JSON array of keys")
        return sorted(keys)

    async def delete(self, key: str) -> None:
        url = self.url(key)
        response = await self._request("DELETE", url)
        if response.status_code not in (200, 204, 404):
            raise StoreError(f"DELETE {url}: status={response.status_code}")
        self.stats.deletes += 1

    async def stat(self, key: str) -> StoredObject:
        """Size, digest and metadata of `key` (from a HEAD); KeyError if there is none."""
        url = self.url(key)
        response = await self._request("HEAD", url)
        if response.status_code == 404:
            raise KeyError(key)
        if response.status_code != 200:
            raise StoreError(f"HEAD {url}: status={response.status_code}")
        digest = parse_digest_header(response.headers.get("repr-digest")).get("sha-256", b"")
        try:
            meta = json.loads(response.headers.get(METADATA_HEADER.lower(), "{}"))
        except ValueError:
            meta = {}
        return StoredObject(key=key, bytes=int(response.headers.get("content-length", 0)),
                            sha256=digest.hex(), metadata=meta,
                            stored_utc=response.headers.get("edge-stored-utc", ""))

    async def metadata(self, key: str) -> dict[str, Any]:
        """The metadata stored with `key`; KeyError if there is none."""
        return (await self.stat(key)).metadata


def _hash_from_here(f: IO[bytes]) -> tuple[int, int, str]:
    """(position, bytes to the end, sha256 hex) of a seekable file from where it is."""
    origin = f.tell()
    digest = hashlib.sha256()
    size = 0
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return origin, size, digest.hexdigest()


async def _file_body(f: IO[bytes], origin: int, size: int) -> AsyncIterator[bytes]:
    """`size` bytes of `f` from `origin`, read in a worker thread chunk by chunk."""
    await trio.to_thread.run_sync(f.seek, origin)
    sent = 0
    while sent < size:
        chunk: bytes = await trio.to_thread.run_sync(f.read, min(_CHUNK, size - sent))
        if not chunk:
            raise OSError(f"upload body shrank at byte {sent} of {size}")
        sent += len(chunk)
        yield chunk
