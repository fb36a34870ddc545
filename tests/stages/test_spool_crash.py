"""Crash-point sweep over the seal path, in the manner of SQLite's crash tests.

One scenario (record 9 s into 5 s segments, stop as on SIGTERM, then an uploader
stand-in marks segments synced or quarantines one, then a quota check) is run again
and again; run N makes the N-th disk operation (mkdir, create, write, fsync, close,
rename, directory fsync, unlink, ...) fail or kill the process, for N = 1, 2, ...
until a run completes without reaching N. Three kinds of fault:

* ``fail``: the operation raises EIO once; the agent must carry on and end with
  every frame sealed exactly once.
* ``kill``: the process dies there (page cache kept, as after ``kill -9``).
* ``powercut``: the process dies there and every file loses what no fsync covered,
  keeping a torn half of it (renames are assumed to be journalled).

After a kill a fresh spool recovers the directory, and the invariant must hold for
every N: each segment whose seal returned before the fault is present with the same
digest, each acknowledged state change (synced, quarantined) is kept, every file
verifies and decodes, no two segments hold the same audio, no temp file survives,
and the audio lost is within the bound (the fsync interval plus one Ogg page).
"""

from __future__ import annotations

import errno
import itertools
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from edge_agent.audio.pcm import read_wav
from edge_agent.fs import FileOps
from edge_agent.spool import Spool
from edge_agent.wire import SegmentMeta, SegmentState

from support.spool_rig import MONO0, FaultyOps, Kill, Rig, assert_clean, decoded_frames, signal_at

RATE = 8000
FSYNC_SECONDS = 1.0
FEED_SECONDS = 4.0  # from UTC0 (3 s past a boundary): [3, 5) at the boundary, [5, 7) at the stop


class Acks:
    """What the code under test reported as done before the fault."""

    def __init__(self) -> None:
        self.synced: list[str] = []
        self.quarantined: list[str] = []
        self.completed = False


async def retry_once(fn: object, *args: object) -> None:
    """The uploader's way: a failed state change is tried again (it is idempotent)."""
    assert callable(fn)
    try:
        fn(*args)
    except OSError:
        await trio.sleep(1)
        fn(*args)


async def scenario(rig: Rig, acks: Acks) -> None:
    spool = rig.spool
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.segmenter.run)
        await rig.feed(FEED_SECONDS)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()  # SIGTERM: the open segment is sealed
    pending = spool.pending()
    for meta in pending[:-1]:
        await retry_once(spool.mark_synced, meta.id)
        acks.synced.append(meta.id)
    await retry_once(spool.quarantine, pending[-1].id, "backend said 422")
    acks.quarantined.append(pending[-1].id)
    await retry_once(spool.enforce_quota)
    acks.completed = True


def check_invariants(root: Path, rig: Rig, acks: Acks, mode: str, fmt: str) -> str:
    fresh = Spool(root, device_id="dev-1", config=rig.config, clock=rig.clock, fs=FileOps())
    report = fresh.recover()
    assert_clean(root)
    rows = fresh.list(newest_first=False)
    metas = {m.id: (m, s) for m, s in rows}
    # Sealed before the fault: present, same bytes. Acknowledged changes: kept.
    for sealed in rig.segmenter.sealed:
        assert sealed.id in metas, f"sealed segment {sealed.id} lost"
        assert metas[sealed.id][0].sha256 == sealed.sha256
    for seg_id in acks.synced:
        assert metas[seg_id][1] is SegmentState.SYNCED
    for seg_id in acks.quarantined:
        assert metas[seg_id][1] is SegmentState.QUARANTINED
    # Every file is what its metadata says, and decodes to that many frames.
    for meta, _ in rows:
        assert fresh.verify(meta.id), meta.id
        audio = decoded_frames(meta, fresh.audio_path(meta.id))
        if fmt == "opus":
            assert len(audio) == meta.frames * 48000 // RATE
        else:
            start = round((meta.mono_start - MONO0) * RATE)
            np.testing.assert_array_equal(audio, signal_at(start, meta.frames, RATE))
    # No audio twice: the segments never overlap in capture time.
    ordered = sorted((m for m, _ in rows), key=lambda m: m.mono_start)
    for before, after in itertools.pairwise(ordered):
        assert after.mono_start >= before.mono_end - 1e-9, (before.id, after.id)
    held = sum(m.frames for m, _ in rows)
    if mode == "fail":
        assert acks.completed
        assert held == rig.ring.head, "a single failed operation lost audio"
        return "complete"
    # Audio the segmenter had taken from the ring and lost to the crash: at most the
    # batch in flight (a batch and a block), plus for Opus what the encoder held (one
    # page) and after a power cut one fsync interval; for WAV, whose header records
    # what is durable, one fsync interval, two after a power cut. (An fsync comes
    # with the first batch after it is due, so an interval may be a batch longer.)
    reader = rig.segmenter._reader
    assert reader is not None
    consumed = reader.cursor
    batch = round(rig.segmenter.batch_seconds * RATE) + RATE // 50
    interval = round(FSYNC_SECONDS * RATE) + batch
    intervals = (mode == "powercut") + (fmt == "wav")
    page = RATE + 400 if fmt == "opus" else 0
    bound = batch + page + intervals * interval
    assert held >= consumed - bound, (held, consumed, bound)
    return f"recovered {len(report.recovered)} completed {len(report.completed)}"


@pytest.mark.parametrize(("fmt", "mode"), [
    ("opus", "fail"), ("opus", "kill"), ("opus", "powercut"),
    ("wav", "fail"), ("wav", "kill"), ("wav", "powercut"),
])
async def test_every_crash_point_on_the_seal_path_keeps_the_spool_consistent(
    tmp_path: Path, fmt: str, mode: str, autojump_clock: trio.testing.MockClock
) -> None:
    outcomes: dict[str, int] = {}
    n = 0
    while True:
        n += 1
        root = tmp_path / f"run{n}"
        ops = FaultyOps(mode=mode, fake_fsync=True)
        rig = Rig(root, fmt=fmt, rate=RATE, fs=ops, fsync_seconds=FSYNC_SECONDS)
        rig.spool.recover()
        ops.fail_at = ops.calls + n  # count from the first operation after start-up
        acks = Acks()
        try:
            await scenario(rig, acks)
        except BaseExceptionGroup as group:
            assert group.subgroup(Kill) is not None and mode != "fail", group
        except Kill:
            assert mode != "fail"
        if ops.fired is None:
            assert acks.completed and n > 50
            break
        if mode == "powercut":
            ops.power_cut()
        outcome = check_invariants(root, rig, acks, mode, fmt)
        key = f"{ops.fired[0]}: {outcome}"
        outcomes[key] = outcomes.get(key, 0) + 1
    print(f"\n{fmt}/{mode}: {n - 1} crash points")
    for key, count in sorted(outcomes.items()):
        print(f"  {count:3d} x {key}")


async def test_a_failed_state_change_leaves_the_segment_pending_and_a_retry_completes_it(
    tmp_path: Path,
) -> None:
    failed: list[str] = []

    def fail_first_rename_into_synced(op: str, path: str) -> OSError | None:
        if op == "rename" and "/synced/" in path and not failed:
            failed.append(path)
            return OSError(errno.EIO, "Input/output error", path)
        return None

    rig = Rig(tmp_path, fmt="wav", fs=FaultyOps(fail_when=fail_first_rename_into_synced))
    rig.spool.recover()
    writer = rig.spool.open_segment(start_ts=rig.utc0, mono_start=MONO0, rate=RATE,
                                    channels=1, sample_format="int16", clock_synced=True)
    writer.write(signal_at(0, RATE, RATE), now=0.0)
    meta: SegmentMeta = rig.spool.seal(writer)
    with pytest.raises(OSError, match="Input/output error"):
        rig.spool.mark_synced(meta.id)
    assert [m.id for m in rig.spool.pending()] == [meta.id]
    rig.spool.mark_synced(meta.id)
    assert rig.spool.get(meta.id) == (meta, SegmentState.SYNCED)
    samples, _ = read_wav(rig.spool.audio_path(meta.id))
    assert len(samples) == RATE
