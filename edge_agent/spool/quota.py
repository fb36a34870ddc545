"""Quota decisions: which segments to evict, given their states, sizes and ages.

Owns the eviction policy as pure functions (values in, lists out; no disk):
synced segments past their retention go always; then, while the spool is over its
limit (``max_spool_mb``, and ``min_free_mb`` left free on the disk), synced
segments oldest first, then quarantined ones, then unsynced ones (each a loss).
`Spool.enforce_quota` carries the decisions out.

Two rules keep the newest audio flowing when the disk fills up for reasons
that are not the spool's (another process writing): the limit is never
negative, and the newest unsynced segment is never evicted, so a segment is
never deleted the moment it is sealed, before the uploader could send it. And
the disk keeps room for at least one more segment like the largest one held,
even with ``min_free_mb = 0``: synced audio is evicted to make that room, so
recording does not stall on a full disk while there is something to evict.

Imports only the bottom layer (``wire``, the spool's ``model``); never agent or another stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from ..wire import SegmentState
from .model import MB

__all__ = ["EVICTION_ORDER", "Held", "expired", "headroom", "loss_note", "over_quota",
           "quota_limit"]

#: While over the limit, states are evicted in this order (each oldest first).
EVICTION_ORDER: Final = (SegmentState.SYNCED, SegmentState.QUARANTINED, SegmentState.SEALED)


@dataclass(frozen=True)
class Held:
    """One segment as the quota sees it."""

    id: str  # segment id (any directory name in quarantine); ids sort oldest first
    state: SegmentState
    bytes: int
    end_ts: float | None = None  # None: no readable metadata
    seconds: float = 0.0


def expired(held: Iterable[Held], *, now: float, retain_seconds: float) -> list[str]:
    """Synced segments ended at least ``retain_seconds`` before ``now``, oldest first."""
    return [
        h.id for h in sorted(held, key=lambda h: h.id)
        if h.state is SegmentState.SYNCED and h.end_ts is not None
        and now - h.end_ts >= retain_seconds
    ]


def quota_limit(*, used: int, free: int, max_bytes: int, min_free_bytes: int,
                headroom: int = 0) -> int:
    """The most bytes the spool may hold: ``max_bytes``, and ``min_free_bytes`` (at
    least ``headroom``: room for the next segment) left free on a disk where the
    spool holds ``used`` and ``free`` is left; never less than nothing."""
    return max(0, min(max_bytes, used + free - max(min_free_bytes, headroom)))


def headroom(held: Iterable[Held]) -> int:
    """Room for one more segment like the largest held (none held: nothing known)."""
    return max((h.bytes for h in held), default=0)


def over_quota(held: Sequence[Held], *, limit: int) -> list[Held]:
    """The segments to evict, in order, to bring what ``held`` adds up to within
    ``limit`` (`EVICTION_ORDER`, each state oldest first). The newest unsynced
    segment is kept whatever the limit: it is the one the uploader sends next
    once the rest is gone, and the newest audio the device has."""
    used = sum(h.bytes for h in held)
    ordered = sorted(held, key=lambda h: h.id)
    unsynced = [h for h in ordered if h.state is SegmentState.SEALED]
    keep = unsynced[-1].id if unsynced else None
    out: list[Held] = []
    for state in EVICTION_ORDER:
        if used <= limit:
            break
        for h in ordered:
            if used <= limit:
                break
            if h.state is not state or h.id == keep:
                continue
            used -= h.bytes
            out.append(h)
    return out


def loss_note(evicted_unsynced: int, limit: int) -> str | None:
    """The spool's degraded reason after evicting unsynced segments (None if none)."""
    if not evicted_unsynced:
        return None
    return (f"unsynced audio evicted: {evicted_unsynced} segment(s) to stay within "
            f"{limit / MB:.1f} MB")
