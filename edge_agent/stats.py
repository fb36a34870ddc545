"""Latency distributions a stage records for metrics: `Histogram` and its buckets.

A `Histogram` is a few integers a stage bumps per event (no lock, no registry);
`edge_agent.metrics` turns it into a Prometheus histogram when scraped. It lives
here, in the bottom layer, so a stage can keep one without importing metrics.

Imports nothing of the project.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Final

__all__ = ["LATENCY_BUCKETS", "Histogram"]

#: Bucket bounds (seconds) for request latencies to remote services.
LATENCY_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    """Observations counted into fixed buckets, for a Prometheus histogram.

    `counts[i]` counts values `<= bounds[i]` and above the previous bound; the
    last slot counts values above every bound. Cheap enough for any event rate.
    """

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    count: int = 0
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (upper bound, observations at or below it), "+Inf" last."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), float(running)))
        out.append(("+Inf", float(self.count)))
        return out
