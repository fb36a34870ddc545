"""Durable writes: a replaced file is the old one or the new one, a secret is never
readable by others while it is written, and a create-only write never overwrites."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edge_agent.fs import FileOps, write_atomic


class Watching(FileOps):
    """Records the mode of the file being fsynced, i.e. while the data sits in it."""

    def __init__(self) -> None:
        self.modes: list[int] = []

    def fsync(self, fd: int, path: str = "") -> None:
        self.modes.append(stat.S_IMODE(Path(path).stat().st_mode))
        super().fsync(fd, path)


def test_a_secret_is_private_from_its_first_byte(tmp_path: Path) -> None:
    ops = Watching()
    ops.write_atomic(tmp_path / "token", "s3cret-s3cret-s3cret\n", mode=0o600)
    assert ops.modes == [0o600]
    assert stat.S_IMODE((tmp_path / "token").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["token"]  # no temp file left


def test_a_replaced_file_keeps_its_mode_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("old\n")
    path.chmod(0o640)
    write_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["agent.toml"]


def test_create_only_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "api-token"
    write_atomic(path, "first\n", mode=0o600, replace=False)
    with pytest.raises(FileExistsError):
        write_atomic(path, "second\n", mode=0o600, replace=False)
    assert path.read_text() == "first\n"
    assert [p.name for p in tmp_path.iterdir()] == ["api-token"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_replaced_file_keeps_its_owner_and_group(tmp_path: Path) -> None:
    """`sudo edge-agent config set` must leave the config readable by the service's user."""
    path = tmp_path / "agent.toml"
    path.write_text("old\n")
    os.chown(path, 0, 4321)  # root:<the service's group>, as the installer leaves it
    path.chmod(0o640)
    write_atomic(path, "new\n")
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 4321, 0o640)
    assert path.read_text() == "new\n"
