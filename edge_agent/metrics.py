"""Health and Prometheus metrics of a running agent, read from the components' stats.

Nothing here runs on the hot path. Every stage keeps plain counters in a small
stats dataclass (`SourceStats`, `SttStats`, `SpoolStats`, ...); `AgentCollector`
reads them when `/metrics` is scraped, into a registry that belongs to one agent
(never prometheus-client's global registry, so two agents in one process, as in
tests, never share or clash). `component_health` is the one place that decides
what "healthy" means per component, for `/healthz`, `/v1/status` and the
`edge_agent_component_healthy` gauge alike.

The one thing a stage records for metrics itself is a latency distribution:
`Histogram` is a few integers a stage bumps per event (no lock, no registry).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    from .agent import Agent

__all__ = [
    "COMPONENTS",
    "LATENCY_BUCKETS",
    "AgentCollector",
    "ComponentHealth",
    "Histogram",
    "component_health",
    "disk_free_bytes",
    "make_registry",
    "overall_status",
]

#: Bucket bounds (seconds) for request latencies to remote services.
LATENCY_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

#: Components `/healthz` always reports, in this order.
COMPONENTS: Final = ("capture", "ring", "stt", "segmenter", "uploader", "disk", "clock")

# A reader this far behind (fraction of the ring) is about to lose audio.
_READER_LAG_WARN: Final = 0.9

HealthState = Literal["ok", "degraded", "disabled"]


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


# ----------------------------------------------------------------------------
# Health


@dataclass(frozen=True)
class ComponentHealth:
    """One component's state and, when it matters, why."""

    status: HealthState
    detail: str = ""

    @property
    def healthy(self) -> bool:
        return self.status != "degraded"


def disk_free_bytes(path: os.PathLike[str] | str) -> int | None:
    """Bytes available to this process on the file system holding `path`."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _task_health(agent: Agent, name: str, reasons: dict[str, str]) -> ComponentHealth | None:
    if name in reasons:
        return ComponentHealth("degraded", reasons[name])
    task = agent.supervisor.tasks.get(name)
    if task is not None and not task.healthy:
        return ComponentHealth("degraded", task.state)
    return None


def component_health(agent: Agent) -> dict[str, ComponentHealth]:
    """Every component of `COMPONENTS` (plus any other task that is unhealthy)."""
    reasons = dict(agent.degraded())
    out: dict[str, ComponentHealth] = {}
    ring = agent.ring
    rate = ring.rate

    # capture
    stats = agent.source.stats
    captured = ring.head / rate
    bad = _task_health(agent, "capture", reasons)
    task = agent.supervisor.tasks.get("capture")
    if bad is not None:
        out["capture"] = bad
    elif task is not None and task.state == "finished":
        out["capture"] = ComponentHealth("ok", f"source finished after {captured:.1f} s")
    else:
        out["capture"] = ComponentHealth(
            "ok", f"{captured:.1f} s captured, {stats.input_overflows} input overflows")

    # ring: healthy unless a reader is about to fall off its end
    rs = ring.statistics()
    late = [r for r in ring.readers() if r.lag > _READER_LAG_WARN * ring.capacity]
    held = f"holds {rs.held_frames / rate:.1f} s of {rs.capacity_frames / rate:.1f} s"
    if late:
        names = ", ".join(sorted({r.name for r in late}))
        out["ring"] = ComponentHealth("degraded", f"reader(s) {names} near the end of the "
                                                  f"ring; {held}")
    else:
        out["ring"] = ComponentHealth("ok", held)

    # stt, segmenter (with the spool), uploader
    if agent.stt is None:
        out["stt"] = ComponentHealth("disabled")
    else:
        out["stt"] = _task_health(agent, "stt", reasons) or ComponentHealth(
            "ok", f"{agent.stt.stats.chunks_sent} chunks transcribed")
    if agent.spool is None:
        out["segmenter"] = ComponentHealth("disabled")
    else:
        spool_reason = reasons.get("spool")
        out["segmenter"] = (
            _task_health(agent, "segmenter", reasons)
            or (ComponentHealth("degraded", spool_reason) if spool_reason else None)
            or ComponentHealth("ok", f"{agent.spool.stats.pending_segments} segments pending "
                                     "upload")
        )
    if agent.uploader is None:
        out["uploader"] = ComponentHealth("disabled")
    else:
        out["uploader"] = _task_health(agent, "uploader", reasons) or ComponentHealth(
            "ok", f"{agent.uploader.stats.successes} segments uploaded")

    # disk
    free = disk_free_bytes(agent.data_dir)
    floor = agent.config.segments.min_free_mb * 1024 * 1024
    if free is None:
        out["disk"] = ComponentHealth("degraded", f"cannot read free space of {agent.data_dir}")
    elif agent.spool is not None and free < floor:
        out["disk"] = ComponentHealth(
            "degraded", f"{free / 2**20:.0f} MB free, below segments.min_free_mb "
                        f"({agent.config.segments.min_free_mb} MB)")
    else:
        out["disk"] = ComponentHealth("ok", f"{free / 2**20:.0f} MB free")

    # clock
    if agent.clock.synced():
        out["clock"] = ComponentHealth("ok", "NTP-synchronised")
    else:
        out["clock"] = ComponentHealth(
            "degraded", "wall clock not NTP-synchronised: audio times are the device's guess")

    # any other stage that is unhealthy (the API itself, stages added later)
    for name, reason in reasons.items():
        if name not in out and name != "spool":
            out[name] = ComponentHealth("degraded", reason)
    return out


def overall_status(health: dict[str, ComponentHealth]) -> HealthState:
    return "ok" if all(h.healthy for h in health.values()) else "degraded"


# ----------------------------------------------------------------------------
# Prometheus


def _counter(name: str, doc: str, value: float, **labels: str) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _gauge(name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class AgentCollector:
    """Reads an agent's stats into Prometheus metrics when scraped.

    Args:
        agent: the running agent.
        extra: more stats sources, each an object with `collect()` yielding
            metric families (the device API adds its request counters).
    """

    def __init__(self, agent: Agent, extra: Iterable[Any] = ()) -> None:
        self.agent = agent
        self.extra = list(extra)

    def collect(self) -> Iterator[Metric]:
        yield from self._agent()
        yield from self._capture()
        yield from self._ring()
        yield from self._stt()
        yield from self._segments()
        yield from self._upload()
        for source in self.extra:
            yield from source.collect()

    def _agent(self) -> Iterator[Metric]:
        agent = self.agent
        info = InfoMetricFamily("edge_agent", "The agent's identity.", labels=["device"])
        info.add_metric([agent.config.device.id], {"device": agent.config.device.id})
        yield info
        health = component_health(agent)
        yield _gauge("edge_agent_healthy", "1 when every component is healthy.",
                     1.0 if overall_status(health) == "ok" else 0.0)
        comp = GaugeMetricFamily("edge_agent_component_healthy",
                                 "1 when the component is healthy (or disabled).",
                                 labels=["component"])
        for name, h in health.items():
            comp.add_metric([name], 1.0 if h.healthy else 0.0)
        yield comp
        running = GaugeMetricFamily("edge_agent_task_running", "1 while the task runs.",
                                    labels=["task"])
        restarts = CounterMetricFamily("edge_agent_task_failures",
                                       "Times the task failed and was restarted.",
                                       labels=["task"])
        for name, task in agent.supervisor.tasks.items():
            running.add_metric([name], 1.0 if task.state == "running" else 0.0)
            restarts.add_metric([name], task.failures)
        yield running
        yield restarts
        free = disk_free_bytes(agent.data_dir)
        if free is not None:
            yield _gauge("edge_agent_disk_free_bytes",
                         "Bytes free on the file system of the data directory.", free)
        yield _gauge("edge_agent_clock_synced", "1 when the wall clock is NTP-synchronised.",
                     1.0 if agent.clock.synced() else 0.0)

    def _capture(self) -> Iterator[Metric]:
        agent = self.agent
        stats = agent.source.stats
        yield _counter("edge_agent_capture_seconds", "Seconds of audio captured.",
                       agent.ring.head / agent.ring.rate)
        yield _counter("edge_agent_capture_input_overflows",
                       "Input overflows the audio device reported.", stats.input_overflows)
        yield _counter("edge_agent_capture_queue_drops",
                       "Captured blocks dropped because the event loop did not take them in "
                       "time.", stats.queue_drops)
        task = agent.supervisor.tasks.get("capture")
        yield _counter("edge_agent_capture_restarts",
                       "Times capture failed and the source was reopened.",
                       task.failures if task is not None else 0)

    def _ring(self) -> Iterator[Metric]:
        ring = self.agent.ring
        rs = ring.statistics()
        rate = ring.rate
        yield _gauge("edge_agent_ring_capacity_seconds", "Seconds of audio the ring holds.",
                     rs.capacity_frames / rate)
        yield _gauge("edge_agent_ring_held_seconds", "Seconds of audio in the ring now.",
                     rs.held_frames / rate)
        yield _gauge("edge_agent_ring_fill_ratio", "Held / capacity.",
                     rs.held_frames / rs.capacity_frames)
        yield _counter("edge_agent_ring_evicted_seconds",
                       "Seconds of audio overwritten by newer audio.", rs.evicted_frames / rate)
        yield _counter("edge_agent_ring_gaps", "Capture gaps recorded.", rs.gaps)
        yield _counter("edge_agent_ring_clock_steps", "Wall-clock steps recorded.",
                       rs.clock_steps)
        # Long-lived readers only: a live listener's reader comes and goes, and its
        # losses are counted by the API (edge_agent_api_live_overruns_total).
        overruns = CounterMetricFamily("edge_agent_ring_reader_overruns",
                                       "Times the reader fell off the end of the ring.",
                                       labels=["reader"])
        lost = CounterMetricFamily("edge_agent_ring_reader_lost_seconds",
                                   "Audio evicted before the reader read it.",
                                   labels=["reader"])
        lag = GaugeMetricFamily("edge_agent_ring_reader_lag_seconds",
                                "How far behind the newest audio the reader is.",
                                labels=["reader"])
        per_name: dict[str, list[float]] = {}
        for reader in ring.readers():
            if reader.name.startswith("api-"):
                continue
            acc = per_name.setdefault(reader.name, [0.0, 0.0, 0.0])
            acc[0] += reader.overruns
            acc[1] += reader.lost_frames / rate
            acc[2] = max(acc[2], reader.lag / rate)
        for name, (n, seconds, behind) in sorted(per_name.items()):
            overruns.add_metric([name], n)
            lost.add_metric([name], seconds)
            lag.add_metric([name], behind)
        yield overruns
        yield lost
        yield lag

    def _stt(self) -> Iterator[Metric]:
        stt = self.agent.stt
        if stt is None:
            return
        s = stt.statistics()
        yield _counter("edge_agent_stt_chunks_cut", "Chunks cut for transcription.",
                       s.chunks_cut)
        yield _counter("edge_agent_stt_chunks_sent", "Chunks answered with a transcript.",
                       s.chunks_sent)
        yield _counter("edge_agent_stt_requests", "Requests to the STT service.", s.requests)
        # Every request that did not bring a usable transcript back.
        yield _counter("edge_agent_stt_requests_failed",
                       "STT requests that failed (retried or given up).",
                       max(0, s.requests - s.chunks_sent - s.bad_responses))
        dropped = CounterMetricFamily("edge_agent_stt_chunks_dropped",
                                      "Chunks never transcribed, by reason.", labels=["reason"])
        for reason, n in (("overflow", s.dropped_overflow), ("stale", s.dropped_stale),
                          ("rejected", s.dropped_rejected), ("bad_response", s.bad_responses)):
            dropped.add_metric([reason], n)
        yield dropped
        yield _counter("edge_agent_stt_seconds_lost",
                       "Audio the STT reader lost to ring overruns.", s.seconds_lost)
        yield _gauge("edge_agent_stt_backlog_seconds", "Audio waiting to be sent.",
                     s.backlog_seconds)
        yield _gauge("edge_agent_stt_backlog_bytes", "Bytes waiting to be sent.",
                     s.backlog_bytes)
        latency: Histogram | None = getattr(s, "latency", None)
        if latency is not None:
            yield HistogramMetricFamily(
                "edge_agent_stt_latency_seconds",
                "Round trip of successful STT requests.",
                buckets=latency.cumulative(), sum_value=latency.sum)

    def _segments(self) -> Iterator[Metric]:
        spool = self.agent.spool
        if spool is None:
            return
        s = spool.stats
        yield _counter("edge_agent_segments_sealed", "Segments sealed to disk.",
                       s.segments_sealed)
        yield _counter("edge_agent_segments_recovered",
                       "Segments salvaged after a crash (of those sealed).",
                       s.segments_recovered)
        yield _counter("edge_agent_segments_quarantined", "Segments quarantined.",
                       s.segments_quarantined)
        evicted = CounterMetricFamily("edge_agent_segments_evicted",
                                      "Segments removed to respect the disk quota, by kind.",
                                      labels=["kind"])
        for kind, n in (("synced", s.evicted_synced), ("expired", s.evicted_expired),
                        ("quarantined", s.evicted_quarantined),
                        ("unsynced", s.evicted_unsynced)):
            evicted.add_metric([kind], n)
        yield evicted
        yield _counter("edge_agent_segments_evicted_unsynced_seconds",
                       "Audio lost because unsynced segments had to be evicted.",
                       s.evicted_unsynced_seconds)
        yield _counter("edge_agent_spool_disk_errors", "Failed disk operations.", s.disk_errors)
        yield _gauge("edge_agent_spool_bytes", "Bytes of audio in the spool.", s.bytes_used)
        held = GaugeMetricFamily("edge_agent_spool_segments", "Segments in the spool, by state.",
                                 labels=["state"])
        held.add_metric(["sealed"], s.pending_segments)
        held.add_metric(["synced"], s.synced_segments)
        held.add_metric(["quarantined"], s.quarantined_segments)
        yield held
        segmenter = self.agent.segmenter
        if segmenter is not None:
            yield _counter("edge_agent_segmenter_lost_seconds",
                           "Audio the segmenter never wrote (evicted from the ring first).",
                           segmenter.stats.lost_frames / self.agent.ring.rate)

    def _upload(self) -> Iterator[Metric]:
        spool = self.agent.spool
        if spool is not None:
            pending = spool.pending()
            yield _gauge("edge_agent_upload_backlog_segments", "Sealed segments not uploaded.",
                         len(pending))
            yield _gauge("edge_agent_upload_backlog_bytes", "Bytes not uploaded yet.",
                         sum(m.bytes for m in pending))
            yield _gauge("edge_agent_upload_backlog_seconds", "Audio not uploaded yet.",
                         sum(m.seconds for m in pending))
        uploader = self.agent.uploader
        if uploader is None:
            return
        u = uploader.stats
        yield _counter("edge_agent_upload_attempts", "Segment upload requests.", u.attempts)
        yield _counter("edge_agent_upload_failures",
                       "Upload attempts that failed and will be retried.", u.failures)
        yield _counter("edge_agent_upload_successes",
                       "Segments the backend confirmed holding.", u.successes + u.already_present)
        yield _counter("edge_agent_upload_quarantined", "Segments the backend refused.",
                       u.quarantined)
        yield _counter("edge_agent_upload_bytes", "Bytes of segment bodies sent.", u.bytes_sent)


def make_registry(agent: Agent, extra: Iterable[Any] = ()) -> CollectorRegistry:
    """A registry of its own for `agent` (never the process-wide default one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent, extra))
    return registry
