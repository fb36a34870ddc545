"""`LocalStore`: objects as files, written atomically and durably through `FileOps`.

Imports only the bottom layer and the store's `base`; never a stage or the agent.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from ..blocking import ThreadRunner
from ..clock import Clock, SystemClock, iso_utc
from ..fs import FileOps
from .base import (
    CHUNK_BYTES,
    META_DIR,
    Body,
    KeyBuilder,
    StoredObject,
    StoreStats,
    as_stream,
    check_key,
    metadata_json,
)

log = logging.getLogger(__name__)


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
        runner: Runs the disk work in worker threads (default: two at a time).
        clock: For ``stored_utc``.
    """

    def __init__(self, root: str | os.PathLike[str], *, fs: FileOps | None = None,
                 runner: ThreadRunner | None = None, clock: Clock | None = None
                 ) -> None:
        self.root = Path(root)
        self.fs = fs or FileOps()
        self.key_builder = KeyBuilder()
        self.stats = StoreStats()
        self.clock: Clock = clock or SystemClock()
        self._runner = runner or ThreadRunner(2)

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
        return self.root.joinpath(META_DIR, *parts[:-1], parts[-1] + ".json")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await self._runner.run(fn, *args)

    # -- the protocol --------------------------------------------------------------

    async def upload(self, data: Body, key: str, metadata: Mapping[str, Any] | None = None
                     ) -> str:
        path = self.path(key)
        meta = metadata_json(metadata)
        size = await self._run(self._write_object, as_stream(data), key, path, meta)
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
                while chunk := src.read(CHUNK_BYTES):
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
                self.fs.replace(tmp, path)
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
        self.fs.write_atomic(path, json.dumps(record, indent=1).encode() + b"\n")

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


