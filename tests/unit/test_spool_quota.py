"""The spool's eviction policy as pure decisions: synced audio goes first, unsynced
audio only as a last resort, each state oldest first."""

from __future__ import annotations

from edge_agent.spool.quota import Held, expired, headroom, loss_note, over_quota, quota_limit
from edge_agent.wire import SegmentState

SEALED, SYNCED, QUARANTINED = SegmentState.SEALED, SegmentState.SYNCED, SegmentState.QUARANTINED


def held(id_: str, state: SegmentState, nbytes: int = 100, end_ts: float | None = 0.0) -> Held:
    return Held(id=id_, state=state, bytes=nbytes, end_ts=end_ts)


def test_within_the_limit_nothing_is_evicted() -> None:
    assert over_quota([held("a", SEALED), held("b", SYNCED)], limit=200) == []


def test_synced_goes_before_quarantined_before_unsynced_each_oldest_first() -> None:
    segs = [held("1", SEALED), held("2", QUARANTINED), held("3", SYNCED), held("4", SYNCED),
            held("5", SEALED)]
    # 500 bytes held; a 100-byte limit takes four segments: both synced (oldest
    # first), then the quarantined one, then the oldest unsynced one.
    assert [h.id for h in over_quota(segs, limit=100)] == ["3", "4", "2", "1"]
    # A 300-byte limit needs only the two synced segments: no audio is lost.
    assert [h.id for h in over_quota(segs, limit=300)] == ["3", "4"]


def test_eviction_stops_as_soon_as_the_spool_fits() -> None:
    segs = [held("a", SYNCED, 50), held("b", SYNCED, 400), held("c", SEALED, 100)]
    assert [h.id for h in over_quota(segs, limit=500)] == ["a"]


def test_the_limit_keeps_min_free_on_the_disk() -> None:
    # 1000 bytes max, but the disk has only 300 free with 200 to be kept free:
    # the spool (holding 400) may hold 500.
    assert quota_limit(used=400, free=300, max_bytes=1000, min_free_bytes=200) == 500
    assert quota_limit(used=400, free=10_000, max_bytes=1000, min_free_bytes=200) == 1000


def test_expired_synced_segments_only_and_oldest_first() -> None:
    segs = [held("b", SYNCED, end_ts=100.0), held("a", SYNCED, end_ts=50.0),
            held("c", SEALED, end_ts=0.0), held("d", SYNCED, end_ts=None),
            held("e", SYNCED, end_ts=1000.0)]
    assert expired(segs, now=1100.0, retain_seconds=1000.0) == ["a", "b"]


def test_a_loss_is_reported_only_when_unsynced_audio_went() -> None:
    assert loss_note(0, 10 << 20) is None
    assert loss_note(2, 10 << 20) == "unsynced audio evicted: 2 segment(s) to stay within 10.0 MB"


def test_a_disk_filled_by_others_gives_no_negative_limit_and_keeps_the_newest_unsynced() -> None:
    # The spool holds 300 bytes, the disk has 10 left, 1000 must stay free.
    limit = quota_limit(used=300, free=10, max_bytes=10_000, min_free_bytes=1000)
    assert limit == 0
    segs = [held("1", SYNCED), held("2", SEALED), held("3", SEALED)]
    assert [h.id for h in over_quota(segs, limit=limit)] == ["1", "2"]


def test_the_disk_keeps_room_for_one_more_segment_even_without_min_free() -> None:
    segs = [held("1", SYNCED, 400), held("2", SYNCED, 300), held("3", SEALED, 100)]
    room = headroom(segs)
    assert room == 400
    # A full disk (nothing free) and min_free_mb = 0: synced audio makes the room.
    limit = quota_limit(used=800, free=0, max_bytes=10_000, min_free_bytes=0, headroom=room)
    assert limit == 400
    assert [h.id for h in over_quota(segs, limit=limit)] == ["1"]
