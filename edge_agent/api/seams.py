"""What the device API reads of the rest of the agent, as small Protocols.

The API never imports another stage: the agent passes the real objects in and
they fit these shapes structurally (the spool, the transcript reader, component
health). Each Protocol lists only what the API uses.

Imports only the bottom layer (wire); never agent, another stage, metrics or
systemd.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..wire import SegmentMeta, SegmentState

__all__ = ["ComponentState", "HealthFn", "SpoolView", "StatusFn", "TranscriptReader"]


class SpoolView(Protocol):
    """The durable spool as the API reads it (``edge_agent.spool.Spool`` fits)."""

    @property
    def root(self) -> Path:
        """The directory every segment file is below."""
        ...

    def audio_path(self, segment_id: str) -> Path:
        """Where the segment's audio is now. Raises KeyError: no such segment."""
        ...

    def get(self, segment_id: str) -> tuple[SegmentMeta, SegmentState] | None:
        """The segment's metadata and state, or None."""
        ...

    def list(self, *, since: float | None = None, until: float | None = None,
             state: SegmentState | None = None, limit: int | None = None,
             newest_first: bool = True) -> builtins.list[tuple[SegmentMeta, SegmentState]]:
        """Segments overlapping ``[since, until)`` (epoch seconds)."""
        ...


class TranscriptReader(Protocol):
    """Transcripts whose chunk starts in ``[since, until)``, oldest first, at most
    ``limit``. Blocking: the API calls it in a worker thread."""

    def __call__(self, since: float | None, until: float | None,
                 limit: int) -> Sequence[Any]: ...


class ComponentState(Protocol):
    """One component's health (``edge_agent.metrics.ComponentHealth`` fits)."""

    @property
    def status(self) -> str: ...

    @property
    def detail(self) -> str: ...

    @property
    def healthy(self) -> bool: ...


#: Every component's health now, by name (for ``/healthz`` and ``/v1/status``).
HealthFn = Callable[[], Mapping[str, ComponentState]]
#: The agent's own sections of ``/v1/status`` (config summary, capture, tasks,
#: stt, spool, segmenter, upload, disk), JSON-encodable.
StatusFn = Callable[[], dict[str, Any]]
