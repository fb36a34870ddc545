"""Quota decisions: which segments to evict, given their states, sizes and ages.

Owns the eviction policy as pure functions (values in, lists out; no disk):
synced segments past their retention go always; then, while the spool is over its
limit (``max_spool_mb``, and ``min_free_mb`` left free on the disk), synced
segments oldest first, then quarantined ones, then unsynced ones (each a loss).
`Spool.enforce_quota` carries the decisions out.

Imports only the bottom layer (``wire``, the spool's ``model``); never agent or another stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from ..wire import SegmentState
from .model import MB

__all__ = ["EVICTION_ORDER", "Held", "expired", "loss_note", "over_quota", "quota_limit"]

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


def quota_limit(*, used: int, free: int, max_bytes: int, min_free_bytes: int) -> int:
    """The most bytes the spool may hold: ``max_bytes``, and ``min_free_bytes`` left
    free on a disk where the spool holds ``used`` and ``free`` is left."""
    return min(max_bytes, used + free - min_free_bytes)


def over_quota(held: Sequence[Held], *, limit: int) -> list[Held]:
    """The segments to evict, in order, to bring what ``held`` adds up to within
    ``limit`` (`EVICTION_ORDER`, each state oldest first)."""
    used = sum(h.bytes for h in held)
    ordered = sorted(held, key=lambda h: h.id)
    out: list[Held] = []
    for state in EVICTION_ORDER:
        if used <= limit:
            break
        for h in ordered:
            if used <= limit:
                break
            if h.state is not state:
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
