"""Planning a ``/v1/audio`` response: what it will hold, from where, and its holes.

`plan_audio` decides the whole response from metadata before the first byte:
ring where held, spooled segments where older, gaps between them, so the gaps go
into a header and WAV/PCM bodies have an exact ``Content-Length``. The plan is a
list of pieces (`RingPiece`, `SegmentPiece`, `Silence`) and `AudioGap` notes.

Synchronous, no Trio, no I/O. Imports only the bottom layer (ring, wire, clock);
never agent, another stage, metrics or systemd.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from ..clock import iso_utc
from ..ring import AudioRing
from ..wire import SegmentMeta

__all__ = [
    "MAX_GAPS_LISTED",
    "AudioGap",
    "AudioPlan",
    "RingPiece",
    "SegmentPiece",
    "Silence",
    "plan_audio",
]

#: Holes listed in the gaps header at most (keeps it well under client header limits).
MAX_GAPS_LISTED: Final = 64


@dataclass(frozen=True)
class RingPiece:
    """Ring frames ``[start, stop)``; the first was captured at ``utc``."""

    start: int
    stop: int
    utc: float
    rate: int

    @property
    def frames(self) -> int:
        return self.stop - self.start

    @property
    def end_utc(self) -> float:
        return self.utc + self.frames / self.rate


@dataclass(frozen=True)
class SegmentPiece:
    """Frames ``[first, last)`` of a spooled segment; ``frames`` on the output timeline."""

    meta: SegmentMeta
    first: int
    last: int
    utc: float
    frames: int

    @property
    def end_utc(self) -> float:
        return self.utc + (self.last - self.first) / self.meta.rate


@dataclass(frozen=True)
class Silence:
    """Zeros standing in for a hole (``fill=silence``)."""

    frames: int


@dataclass(frozen=True)
class AudioGap:
    """A hole: no audio from ``utc`` for ``seconds``; ``at`` seconds into the response."""

    utc: float
    seconds: float
    at: float


@dataclass
class AudioPlan:
    """Everything a /v1/audio response will hold, in order, at ``rate``."""

    start: float
    end: float
    rate: int
    items: list[RingPiece | SegmentPiece | Silence] = field(default_factory=list)
    gaps: list[AudioGap] = field(default_factory=list)
    frames: int = 0
    first_utc: float | None = None
    last_utc: float | None = None

    def frames_at(self, rate: int) -> int:
        """The plan's frames converted to `rate` (what a renderer of it emits)."""
        return self.frames if rate == self.rate else self.frames * rate // self.rate

    @property
    def audio_frames(self) -> int:
        return sum(i.frames for i in self.items if not isinstance(i, Silence))

    @property
    def sources(self) -> list[str]:
        kinds = []
        for item in self.items:
            kind = ("ring" if isinstance(item, RingPiece)
                    else "spool" if isinstance(item, SegmentPiece) else "")
            if kind and kind not in kinds:
                kinds.append(kind)
        return kinds

    def gaps_header(self) -> str:
        return ", ".join(f"{iso_utc(g.utc)}/{g.seconds:.6f}@{g.at:.6f}"
                         for g in self.gaps[:MAX_GAPS_LISTED])


def _count_before(seconds: float, rate: int) -> int:
    """Frames of a run at ``rate`` captured less than ``seconds`` after its first one.

    A frame within a millionth of a second (or a quarter frame) of the limit counts
    as at it, as `AudioRing.utc_to_index` does, so ISO round trips land exactly.
    """
    eps = min(1e-6 * rate, 0.25)
    return max(0, math.ceil(seconds * rate - eps))


def _segment_runs(meta: SegmentMeta) -> list[tuple[int, int, float]]:
    """(first frame, end frame, utc of the first) of each stretch of a segment
    without a hole in it."""
    holes: dict[int, float] = {}
    for g in meta.gaps:
        if 0 < g.frame < meta.frames:
            holes[g.frame] = holes.get(g.frame, 0.0) + g.seconds
    runs = []
    first, skipped = 0, 0.0
    for cut in [*sorted(holes), meta.frames]:
        if cut > first:
            runs.append((first, cut, meta.start_ts + first / meta.rate + skipped))
        skipped += holes.get(cut, 0.0)
        first = cut
    return runs


def _segment_pieces(meta: SegmentMeta, lo: float, hi: float,
                    rate: int) -> list[SegmentPiece]:
    out = []
    for first, last, t in _segment_runs(meta):
        a = first + min(last - first, _count_before(lo - t, meta.rate))
        b = first + min(last - first, _count_before(hi - t, meta.rate))
        if b > a:
            frames = b - a if meta.rate == rate else round((b - a) * rate / meta.rate)
            out.append(SegmentPiece(meta, a, b, t + (a - first) / meta.rate, frames))
    return out


def _ring_pieces(ring: AudioRing, lo: float, hi: float) -> list[RingPiece]:
    if ring.head <= ring.tail:
        return []
    a = max(ring.tail, ring.utc_to_index(lo))
    b = min(ring.head, ring.utc_to_index(hi))
    if b <= a:
        return []
    cuts = [g.index for g in ring.gaps(a, b - 1)]
    out = []
    for s, e in zip([a, *cuts], [*cuts, b], strict=True):
        if e > s:
            out.append(RingPiece(s, e, ring.index_to_utc(s), ring.rate))
    return out


def _trim(piece: RingPiece | SegmentPiece, ring: AudioRing | None, cursor: float,
          rate: int) -> RingPiece | SegmentPiece | None:
    """The part of ``piece`` at or after ``cursor`` (an overlap with what came before)."""
    if isinstance(piece, RingPiece):
        assert ring is not None  # a ring piece comes from the ring
        # Half a frame early: the frame meant to follow the cursor, despite jitter.
        start = max(piece.start, ring.utc_to_index(cursor - 0.5 / piece.rate))
        if start >= piece.stop:
            return None
        return RingPiece(start, piece.stop, ring.index_to_utc(start), piece.rate)
    m = piece.meta
    first = piece.first + min(piece.last - piece.first,
                              max(0, round((cursor - piece.utc) * m.rate)))
    if first >= piece.last:
        return None
    frames = piece.last - first if m.rate == rate else round((piece.last - first) * rate / m.rate)
    return SegmentPiece(m, first, piece.last, piece.utc + (first - piece.first) / m.rate, frames)


def plan_audio(ring: AudioRing | None, segments: Sequence[SegmentMeta], start: float,
               end: float, *, rate: int | None = None, gap_tolerance: float | None = None,
               fill: bool = False, guard: float = 30.0) -> AudioPlan:
    """Plan the audio of ``[start, end)`` (UTC seconds) at the ring's rate.

    The ring serves what it holds from ``guard`` seconds after its oldest frame
    on (older frames may be overwritten before the response gets to them);
    ``segments`` serve what is older, each one whole where it starts before
    that point. Where both hold the same stretch the earlier piece wins and the
    later one is trimmed to follow it. Holes longer than the ring's gap
    tolerance become gaps, filled with silence when ``fill``.

    Without a ring (the operator, who has only segments fetched from the bucket)
    the plan is made of ``segments`` alone, at ``rate`` with ``gap_tolerance``
    (both required then; with a ring they default to the ring's).
    """
    if ring is not None:
        if rate not in (None, ring.rate):
            raise ValueError(f"plan_audio: rate {rate} is not the ring's ({ring.rate})")
        rate = ring.rate
        tol = ring.gap_tolerance if gap_tolerance is None else gap_tolerance
    elif rate is None or gap_tolerance is None:
        raise ValueError("plan_audio without a ring needs rate and gap_tolerance")
    else:
        tol = gap_tolerance
    plan = AudioPlan(start, end, rate)
    held = ring is not None and ring.head > ring.tail
    ring_from = ring.index_to_utc(ring.tail) + guard if ring is not None and held else math.inf
    pieces: list[RingPiece | SegmentPiece] = []
    for meta in sorted(segments, key=lambda m: (m.start_ts, m.id)):
        if meta.start_ts < ring_from and meta.end_ts > start and meta.start_ts < end:
            pieces.extend(_segment_pieces(meta, start, end, rate))
    if ring is not None and held:
        pieces.extend(_ring_pieces(ring, start, end))
    # Segments before the ring where both start together: the ring is the fallback.
    pieces.sort(key=lambda p: (p.utc, isinstance(p, RingPiece)))

    cursor = start
    for piece in pieces:
        trimmed = _trim(piece, ring, cursor, rate) if piece.utc < cursor - tol else piece
        if trimmed is None:
            continue
        if trimmed.utc > cursor + tol:
            _add_gap(plan, cursor, trimmed.utc - cursor, fill)
        plan.items.append(trimmed)
        plan.frames += trimmed.frames
        if plan.first_utc is None:
            plan.first_utc = trimmed.utc
        cursor = trimmed.end_utc
        plan.last_utc = cursor
    if plan.first_utc is not None and end - cursor > tol:
        _add_gap(plan, cursor, end - cursor, fill)
    if plan.first_utc is not None and fill:
        plan.first_utc = min(plan.first_utc, start)
        plan.last_utc = max(cursor, end)
    return plan


def _add_gap(plan: AudioPlan, utc: float, seconds: float, fill: bool) -> None:
    plan.gaps.append(AudioGap(utc, seconds, plan.frames / plan.rate))
    if fill:
        frames = round(seconds * plan.rate)
        if frames:
            plan.items.append(Silence(frames))
            plan.frames += frames
