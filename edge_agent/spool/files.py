"""The spool directory on disk: where each segment lives and the durable steps on it.

Owns `SpoolFiles`: the paths of the layout (``tmp/<id>``, ``<state>/<id>``), and the
few multi-step disk operations every part of the spool orders the same way: create
a small file durably, discard a directory through ``trash/``, and read metadata.
Every call goes through `FileOps`, so tests can fail or "kill" any single one. No
index, no locks: the `Spool` and recovery decide when these run.

Imports only the bottom layer (``fs``, ``wire``, the spool's ``model``); never agent
or another stage.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import msgspec

from ..fs import FileOps
from ..wire import SegmentMeta, SegmentState
from .model import ALL_DIRS, STATE_DIRS, TMP, TRASH

__all__ = ["SpoolFiles"]


class SpoolFiles:
    """Paths and durable file steps of the spool directory ``root``."""

    def __init__(self, root: Path, fs: FileOps) -> None:
        self.root = root
        self.fs = fs

    def dir(self, state: SegmentState, name: str) -> Path:
        """The directory of segment ``name`` while in ``state``."""
        return self.root / STATE_DIRS[state] / name

    def tmp(self, name: str = "") -> Path:
        """``tmp/<name>`` (``tmp/`` itself without a name)."""
        return self.root / TMP / name if name else self.root / TMP

    def subdir(self, name: str) -> Path:
        """One of the top-level directories (``sealed``, ``trash``, ...)."""
        return self.root / name

    def make_dirs(self) -> None:
        for name in ALL_DIRS:
            self.fs.makedirs(self.root / name)

    def write_file(self, path: Path, data: bytes) -> None:
        """Create ``path`` with ``data``, durable (fsync) before returning."""
        fs = self.fs
        fd = fs.create(path)
        try:
            fs.write(fd, data, str(path))
            fs.fsync(fd, str(path))
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        fs.close(fd, str(path))

    def discard(self, path: Path) -> None:
        """Remove a segment directory: rename into trash/ (atomic), then delete."""
        trash = self.root / TRASH / f"{path.name}.{secrets.token_hex(4)}"
        self.fs.rename(path, trash)
        self.fs.rmtree(trash)

    def sync_parents(self, src: Path, dst: Path) -> None:
        """After renaming ``src`` to ``dst``: make the move durable in both parents."""
        self.fs.fsync_dir(dst.parent)
        self.fs.fsync_dir(src.parent)

    def read_meta(self, path: Path) -> SegmentMeta:
        return msgspec.json.decode(self.fs.read_bytes(path), type=SegmentMeta)
