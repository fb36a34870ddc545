"""The spool's in-memory index: which segments it holds, in which state, and sizes.

Owns `SegmentIndex`: one `Entry` per segment directory (its metadata, state and
audio bytes), the lock that orders every state change of the spool, the current
sizes in `SpoolStats`, and the queries (`get`, `pending`, `select`). No disk and no
Trio: the `Spool` changes the directories and then tells the index.

Imports only the bottom layer (``wire``, the spool's ``model``); never agent or
another stage.
"""

from __future__ import annotations

import threading

import msgspec

from ..wire import SegmentMeta, SegmentState
from .model import SpoolStats
from .quota import Held

__all__ = ["Entry", "SegmentIndex"]


#: A synced segment's metadata is kept as msgpack bytes (580 bytes against 1,280 for
#: the decoded record): the index holds a day of synced segments
#: (`segments.retain_synced_hours`), and only listings, cuts and the quota read them.
_PACK = msgspec.msgpack.Encoder()
_UNPACK = msgspec.msgpack.Decoder(SegmentMeta)


class Entry:
    """One segment directory: metadata (None in quarantine when unreadable),
    state, and the bytes of its audio."""

    __slots__ = ("_meta", "_packed", "_state", "bytes")

    def __init__(self, meta: SegmentMeta | None, state: SegmentState, nbytes: int) -> None:
        self._meta = meta
        self._packed: bytes | None = None
        self.bytes = nbytes
        self.state = state

    @property
    def meta(self) -> SegmentMeta | None:
        if self._packed is not None:
            return _UNPACK.decode(self._packed)
        return self._meta

    @property
    def state(self) -> SegmentState:
        return self._state

    @state.setter
    def state(self, state: SegmentState) -> None:
        self._state = state
        if state is SegmentState.SYNCED and self._meta is not None:
            self._packed, self._meta = _PACK.encode(self._meta), None
        elif state is not SegmentState.SYNCED and self._packed is not None:
            self._meta, self._packed = _UNPACK.decode(self._packed), None


class SegmentIndex:
    """Entries by segment id (or directory name in quarantine), under one lock.

    ``lock`` is reentrant; callers hold it across a disk change and the matching
    index change. The queries take it themselves.
    """

    def __init__(self, stats: SpoolStats) -> None:
        self.entries: dict[str, Entry] = {}
        self.lock = threading.RLock()
        self.stats = stats

    def get(self, segment_id: str) -> tuple[SegmentMeta, SegmentState] | None:
        """The segment's metadata and state, or None."""
        with self.lock:
            entry = self.entries.get(segment_id)
            meta = entry.meta if entry is not None else None
            return None if entry is None or meta is None else (meta, entry.state)

    def pending(self) -> list[SegmentMeta]:
        """Sealed segments not yet synced, oldest first."""
        with self.lock:
            metas = [e.meta for e in self.entries.values()
                     if e.state is SegmentState.SEALED and e.meta is not None]
        return sorted(metas, key=lambda m: m.id)

    def has_pending(self) -> bool:
        with self.lock:
            return any(e.state is SegmentState.SEALED for e in self.entries.values())

    def select(self, *, since: float | None = None, until: float | None = None,
               state: SegmentState | None = None, limit: int | None = None,
               newest_first: bool = True) -> list[tuple[SegmentMeta, SegmentState]]:
        """Segments overlapping ``[since, until)`` (epoch seconds), optionally in one state."""
        with self.lock:  # state first: a synced entry's metadata is decoded to read it
            rows = [(m, e.state) for e in self.entries.values()
                    if (state is None or e.state is state) and (m := e.meta) is not None]
        out = [
            (m, s) for m, s in rows
            if (since is None or m.end_ts > since) and (until is None or m.start_ts < until)
        ]
        out.sort(key=lambda row: row[0].id, reverse=newest_first)
        return out[:limit] if limit is not None else out

    def held(self) -> list[Held]:
        """Every entry as the quota sees it."""
        with self.lock:
            return [
                Held(id=name, state=e.state, bytes=e.bytes,
                     end_ts=m.end_ts if (m := e.meta) is not None else None,
                     seconds=m.seconds if m is not None else 0.0)
                for name, e in self.entries.items()
            ]

    def update_sizes(self) -> None:
        """Recount the current sizes in ``stats`` (call with the lock held)."""
        used = pending = pending_bytes = synced = quarantined = 0
        for e in self.entries.values():
            used += e.bytes
            if e.state is SegmentState.SEALED:
                pending += 1
                pending_bytes += e.bytes
            elif e.state is SegmentState.SYNCED:
                synced += 1
            else:
                quarantined += 1
        s = self.stats
        s.bytes_used, s.pending_segments, s.pending_bytes = used, pending, pending_bytes
        s.synced_segments, s.quarantined_segments = synced, quarantined
