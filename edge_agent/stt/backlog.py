"""The backlog: encoded chunks waiting to be sent, bounded by audio seconds and bytes.

Owns `Chunk` (one encoded chunk and its place on the timeline) and `Backlog`
(the queue plus the chunk in flight, and what to drop when it is full).
Synchronous: no Trio, no I/O.

Part of the `stt` stage. Imports nothing of the project; never agent, another
stage, metrics or api.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["Backlog", "Chunk"]


@dataclass(frozen=True, slots=True)
class Chunk:
    """One encoded chunk ready to send; `cut_at` is the Trio time it was cut."""

    seq: int
    start_utc: float
    duration: float
    synced: bool
    ogg: bytes
    cut_at: float

    @property
    def end_utc(self) -> float:
        return self.start_utc + self.duration


class Backlog:
    """Chunks waiting to be sent, plus the one in flight, bounded by audio seconds
    and bytes. `push` returns what it had to drop to stay within both, oldest
    first, starting with the chunk in flight (the caller abandons it): when the
    endpoint cannot keep up, the freshest speech is what is worth sending."""

    def __init__(self, max_seconds: float, max_bytes: int) -> None:
        self.max_seconds = max_seconds
        self.max_bytes = max_bytes
        self.queue: deque[Chunk] = deque()
        self.inflight: Chunk | None = None
        self.seconds = 0.0
        self.bytes = 0
        self.peak_seconds = 0.0
        self.peak_bytes = 0

    def __len__(self) -> int:
        return len(self.queue) + (self.inflight is not None)

    def push(self, chunk: Chunk) -> list[Chunk]:
        dropped: list[Chunk] = []
        while self._over(chunk):
            if self.inflight is not None:  # the oldest: it has had its chance
                old, self.inflight = self.inflight, None
            elif self.queue:
                old = self.queue.popleft()
            else:
                break  # a chunk larger than the limits alone is still sent (config forbids it)
            self._account(old, -1)
            dropped.append(old)
        self.queue.append(chunk)
        self._account(chunk, +1)
        self.peak_seconds = max(self.peak_seconds, self.seconds)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return dropped

    def take(self) -> Chunk | None:
        """Move the oldest waiting chunk in flight."""
        if self.inflight is not None or not self.queue:
            return None
        self.inflight = self.queue.popleft()
        return self.inflight

    def done(self, chunk: Chunk) -> None:
        """The chunk in flight is finished with (sent or given up)."""
        if self.inflight is chunk:
            self.inflight = None
            self._account(chunk, -1)

    def release(self, chunk: Chunk) -> None:
        """The chunk in flight was interrupted (restart): it is the oldest again."""
        if self.inflight is chunk:
            self.inflight = None
            self.queue.appendleft(chunk)

    def _over(self, new: Chunk) -> bool:
        return (self.seconds + new.duration > self.max_seconds + 1e-9
                or self.bytes + len(new.ogg) > self.max_bytes)

    def _account(self, chunk: Chunk, sign: int) -> None:
        self.seconds = max(0.0, self.seconds + sign * chunk.duration)
        self.bytes += sign * len(chunk.ogg)
