"""The spool on a small real filesystem (tmpfs) that another writer fills up:
the newest audio keeps flowing, nothing is evicted before the uploader could send
it, and a full disk with ``min_free_mb = 0`` gives up synced audio, not recording."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.clock import ManualClock
from edge_agent.config import SegmentsConfig
from edge_agent.spool import Spool

from support.spool_rig import seal

SEGMENT = 44 + 2 * 2 * 16000  # bytes of one 2 s, 16 kHz mono 16-bit WAV segment (`seal`)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a disk small enough to fill."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def other_writer(disk: Path, leave: int) -> None:
    """Another process's file that leaves about ``leave`` bytes free on ``disk``."""
    free = shutil.disk_usage(disk).free
    with (disk / "someone-else.bin").open("ab") as f:
        f.write(b"\x01" * max(0, free - leave))
        f.flush()
        os.fsync(f.fileno())


def open_spool(disk: Path, **segments: object) -> Spool:
    spool = Spool(disk / "spool", device_id="dev-1", clock=ManualClock(),
                  config=SegmentsConfig(**{"format": "wav", **segments}))  # type: ignore[arg-type]
    spool.recover()
    return spool


def test_a_disk_filled_by_others_never_deletes_audio_the_uploader_can_still_send(
        small_disk: Path) -> None:
    spool = open_spool(small_disk, min_free_mb=1)
    for _ in range(3):
        spool.mark_synced(seal(spool).id)
    other_writer(small_disk, leave=512 * 1024)  # under min_free_mb: over quota
    for _ in range(20):  # the backend is up: each segment is sent after its seal
        segment = seal(spool)
        spool.enforce_quota()  # the segmenter does this after every seal
        assert [m.id for m in spool.pending()] == [segment.id]
        spool.mark_synced(segment.id)
    assert spool.stats.evicted_unsynced == 0 and spool.stats.evicted_synced >= 3
    assert spool.degraded_reason is None


def test_with_the_backend_down_the_newest_audio_is_kept_and_older_loss_counted(
        small_disk: Path) -> None:
    spool = open_spool(small_disk, min_free_mb=1)
    other_writer(small_disk, leave=512 * 1024)
    sealed = []
    for _ in range(10):
        sealed.append(seal(spool))
        spool.enforce_quota()
        assert spool.pending()[-1].id == sealed[-1].id  # the newest always survives
    held = [m.id for m in spool.pending()]
    assert held[-1] == sealed[-1].id
    assert spool.stats.evicted_unsynced == len(sealed) - len(held) > 0
    assert spool.degraded_reason is not None
    assert spool.degraded_reason.startswith("unsynced audio evicted")


def test_a_full_disk_with_no_min_free_evicts_synced_audio_to_keep_recording(
        small_disk: Path) -> None:
    spool = open_spool(small_disk, min_free_mb=0)
    for _ in range(6):
        spool.mark_synced(seal(spool).id)
    other_writer(small_disk, leave=SEGMENT // 4)  # not even room for one more segment
    spool.enforce_quota()
    assert shutil.disk_usage(small_disk).free >= SEGMENT
    assert spool.stats.evicted_synced >= 1
    segment = seal(spool)  # recording goes on
    assert [m.id for m in spool.pending()] == [segment.id]
    assert spool.stats.evicted_unsynced == 0
