"""Durable file writes and the file-system seam.

`FileOps` is every disk operation the spool performs, one method each, so a test
subclass can fail or "kill the process" at any single call. `write_atomic` is the
one way edge-agent replaces a small file durably (config edits, backend metadata,
tokens): write a temporary file beside it, fsync, rename, fsync the directory, so
a reader or a power cut sees the old file or the new one, never a mix.
`make_writable_dir` checks a data directory at start, before anything relies on it.

Imports nothing of the project but `errors`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Final

__all__ = ["FileOps", "fsync_dir", "make_writable_dir", "sync_file", "write_atomic"]

_HASH_CHUNK: Final = 1 << 20


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *,
                 mode: int | None = None, replace: bool = True) -> None:
    """Replace ``path`` with ``data`` durably and atomically (`FileOps.write_atomic`)."""
    FileOps().write_atomic(Path(path), data, mode=mode, replace=replace)


def make_writable_dir(path: str | os.PathLike[str]) -> None:
    """Create directory ``path`` (and its parents) if needed and make sure files can
    be created in it; OSError (permission denied, read-only file system) if not.

    The check creates an unnamed temporary file, so it needs no cleanup and holds
    for the user the process runs as, whatever the mode bits say.
    """
    Path(path).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


def sync_file(f: IO[bytes]) -> None:
    """Make what was written to the open file ``f`` durable (flush, then fsync)."""
    f.flush()
    os.fsync(f.fileno())


class FileOps:
    """Every disk operation the spool performs, one method each.

    The spool never touches the disk any other way, so a subclass can fail or
    interrupt any single call (see :meth:`before`) to test crash safety.
    """

    def before(self, op: str, path: str) -> None:
        """Called before each operation; a test subclass raises here to inject faults."""

    def makedirs(self, path: Path) -> None:
        if path.is_dir():
            return
        self.before("mkdir", str(path))
        path.mkdir(parents=True, exist_ok=True)

    def create(self, path: Path, mode: int = 0o644, *, exclusive: bool = False) -> int:
        """Open a new (or truncated) file for writing; returns the descriptor.

        ``exclusive``: the file must not exist yet (a private temp file).
        """
        self.before("create", str(path))
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
        return os.open(path, flags, mode)

    def open_rw(self, path: Path) -> int:
        self.before("open", str(path))
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def write(self, fd: int, data: bytes, path: str = "") -> None:
        """Write all of ``data`` (looping over short writes)."""
        self.before("write", path)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def pwrite(self, fd: int, data: bytes, offset: int, path: str = "") -> None:
        self.before("pwrite", path)
        if os.pwrite(fd, data, offset) != len(data):
            raise OSError(errno.EIO, f"short pwrite of {len(data)} bytes", path)

    def truncate(self, fd: int, size: int, path: str = "") -> None:
        self.before("truncate", path)
        os.ftruncate(fd, size)

    def fsync(self, fd: int, path: str = "") -> None:
        self.before("fsync", path)
        os.fsync(fd)

    def close(self, fd: int, path: str = "") -> None:
        self.before("close", path)
        os.close(fd)

    def fsync_dir(self, path: Path) -> None:
        self.before("fsync_dir", str(path))
        fsync_dir(path)

    def replace(self, src: Path, dst: Path) -> None:
        """Atomically put ``src`` in place of ``dst`` (replacing it) and make it durable."""
        self.before("rename", f"{src} -> {dst}")
        os.replace(src, dst)
        self.fsync_dir(dst.parent)

    def write_atomic(self, path: Path, data: bytes | str, *, mode: int | None = None,
                     replace: bool = True) -> None:
        """Replace ``path`` with ``data`` so that a reader, a crash or a power cut sees
        the old file or the new one, never a mix: a private temp file beside it
        (mode 0600 while it is written, so a secret is never readable by others),
        fsync, rename, fsync of the directory.

        The file keeps its permissions when it exists, and its owner and group
        where the writer may set them (root can): `config set` run with sudo must
        leave the config readable by the service's user. A new file gets ``mode``
        (default 0644). Parent directories are created. ``replace=False`` creates
        the file only if it does not exist yet (`FileExistsError` otherwise): two
        writers racing to create it never overwrite each other.
        """
        self.makedirs(path.parent)
        old = path.stat() if path.exists() else None
        if mode is None:
            mode = old.st_mode & 0o7777 if old is not None else 0o644
        raw = data.encode("utf-8") if isinstance(data, str) else data
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = self.create(tmp, 0o600, exclusive=True)
            try:
                self.write(fd, raw, str(tmp))
                self.fsync(fd, str(tmp))
            finally:
                self.close(fd, str(tmp))
            if old is not None:
                with contextlib.suppress(PermissionError):  # only root may give a file away
                    os.chown(tmp, old.st_uid, old.st_gid)
            os.chmod(tmp, mode)
            if replace:
                self.replace(tmp, path)
            else:
                self.before("link", f"{tmp} -> {path}")
                os.link(tmp, path)  # fails if path exists: the first writer wins
                self.fsync_dir(path.parent)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def rename(self, src: Path, dst: Path) -> None:
        """Atomic rename; never replaces an existing target directory."""
        self.before("rename", f"{src} -> {dst}")
        if dst.exists():
            raise FileExistsError(errno.EEXIST, "rename target exists", str(dst))
        os.rename(src, dst)

    def unlink(self, path: Path) -> None:
        self.before("unlink", str(path))
        path.unlink(missing_ok=True)

    def rmtree(self, path: Path) -> None:
        self.before("rmtree", str(path))
        shutil.rmtree(path, ignore_errors=False)

    def listdir(self, path: Path) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []

    def exists(self, path: Path) -> bool:
        return path.exists()

    def size(self, path: Path) -> int:
        return path.stat().st_size

    def read_bytes(self, path: Path) -> bytes:
        return path.read_bytes()

    def sha256(self, path: Path) -> tuple[int, str]:
        """Size and SHA-256 hex digest of a file, read in chunks."""
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    @contextlib.contextmanager
    def map_file(self, path: Path) -> Iterator[memoryview]:
        """A read-only view of a whole file without reading it into memory."""
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                yield memoryview(b"")
                return
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)
                try:
                    yield view
                finally:
                    view.release()

    def disk_free(self, path: Path) -> int:
        """Bytes available to this process on the file system holding ``path``."""
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
