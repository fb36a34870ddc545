"""Health, status and Prometheus metrics of a running agent, read from the stages' stats.

Nothing here runs on the hot path. Every stage keeps plain counters in a small
stats dataclass (`SourceStats`, `SttStats`, `SpoolStats`, ...); `AgentCollector`
reads them when `/metrics` is scraped, into a registry that belongs to one agent
(never prometheus-client's global registry, so two agents in one process, as in
tests, never share or clash). `component_health` is the one place that decides
what "healthy" means per component, for `/healthz`, `/v1/status` and the
`edge_agent_component_healthy` gauge alike; `agent_status` is the agent's part of
`/v1/status`.

What is read comes in `AgentParts`, a value object the agent builds from the
stages it made. This module sits just below `edge_agent.agent`: it reads the
stages, never imports the agent, and is not imported by any stage (a stage's
latency `Histogram` lives in `edge_agent.stats`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from .stats import Histogram
from .wire import SegmentState

if TYPE_CHECKING:
    from .capture import Source
    from .clock import Clock
    from .config import AgentConfig
    from .discovery import Advertiser
    from .ring import AudioRing
    from .spool import Segmenter, Spool
    from .stt import SttStreamer
    from .supervisor import Supervisor
    from .uploader import Uploader

__all__ = [
    "COMPONENTS",
    "AgentCollector",
    "AgentParts",
    "ComponentHealth",
    "agent_status",
    "component_health",
    "disk_free_bytes",
    "health_state",
    "heartbeat_figures",
    "make_registry",
    "overall_status",
]

#: Components `/healthz` always reports, in this order.
COMPONENTS: Final = ("capture", "ring", "stt", "segmenter", "uploader", "disk", "clock")

# A reader this far behind (fraction of the ring) is about to lose audio.
_READER_LAG_WARN: Final = 0.9

HealthState = Literal["ok", "degraded", "disabled"]


@dataclass
class AgentParts:
    """The stages of one agent, as health, status, metrics and the watchdog read
    them. The agent builds it and keeps ``config`` current across reloads."""

    config: AgentConfig
    data_dir: Path
    clock: Clock
    source: Source
    ring: AudioRing
    supervisor: Supervisor
    ready: trio.Event  # set once every stage has started
    spool: Spool | None = None
    segmenter: Segmenter | None = None
    uploader: Uploader | None = None
    stt: SttStreamer | None = None
    advertiser: Advertiser | None = None
    fleet_stats: Any = None  # the fleet device's counters (a dataclass), when enabled

    def degraded(self) -> dict[str, str]:
        """Components that are not healthy now, with the reason (empty when ok)."""
        out = self.supervisor.degraded()
        if self.spool is not None and (reason := self.spool.degraded_reason):
            out["spool"] = reason
        if self.uploader is not None and (reason := self.uploader.degraded()):
            out.setdefault("uploader", reason)
        if self.stt is not None and (reason := self.stt.degraded()):
            out.setdefault("stt", reason)
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


def _task_health(parts: AgentParts, name: str, reasons: dict[str, str]) -> ComponentHealth | None:
    if name in reasons:
        return ComponentHealth("degraded", reasons[name])
    task = parts.supervisor.tasks.get(name)
    if task is not None and not task.healthy:
        return ComponentHealth("degraded", task.state)
    return None


def component_health(parts: AgentParts) -> dict[str, ComponentHealth]:
    """Every component of `COMPONENTS` (plus any other task that is unhealthy)."""
    reasons = dict(parts.degraded())
    out: dict[str, ComponentHealth] = {}
    ring = parts.ring
    rate = ring.rate

    # capture
    stats = parts.source.stats
    captured = ring.head / rate
    bad = _task_health(parts, "capture", reasons)
    task = parts.supervisor.tasks.get("capture")
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
    if parts.stt is None:
        out["stt"] = ComponentHealth("disabled")
    else:
        out["stt"] = _task_health(parts, "stt", reasons) or ComponentHealth(
            "ok", f"{parts.stt.stats.chunks_sent} chunks transcribed")
    if parts.spool is None:
        out["segmenter"] = ComponentHealth("disabled")
    else:
        spool_reason = reasons.get("spool")
        out["segmenter"] = (
            _task_health(parts, "segmenter", reasons)
            or (ComponentHealth("degraded", spool_reason) if spool_reason else None)
            or ComponentHealth("ok", f"{parts.spool.stats.pending_segments} segments pending "
                                     "upload")
        )
    if parts.uploader is None:
        out["uploader"] = ComponentHealth("disabled")
    else:
        out["uploader"] = _task_health(parts, "uploader", reasons) or ComponentHealth(
            "ok", f"{parts.uploader.stats.successes} segments uploaded")

    # disk
    free = disk_free_bytes(parts.data_dir)
    floor = parts.config.segments.min_free_mb * 1024 * 1024
    if free is None:
        out["disk"] = ComponentHealth("degraded", f"cannot read free space of {parts.data_dir}")
    elif parts.spool is not None and free < floor:
        out["disk"] = ComponentHealth(
            "degraded", f"{free / 2**20:.0f} MB free, below segments.min_free_mb "
                        f"({parts.config.segments.min_free_mb} MB)")
    else:
        out["disk"] = ComponentHealth("ok", f"{free / 2**20:.0f} MB free")

    # clock: the object store's answers show a wrong clock even when NTP claims sync
    offset = parts.uploader.stats.clock_offset_seconds if parts.uploader is not None else 0.0
    if offset:
        out["clock"] = ComponentHealth(
            "degraded", f"wall clock {abs(offset):.0f} s {'behind' if offset > 0 else 'ahead of'}"
                        " the object store's: uploads are signed with the store's time and "
                        "audio times are off by as much (check NTP)")
    elif parts.clock.synced():
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
# Status (the agent's part of /v1/status)


def _sanitize_url(url: str) -> str:
    """A URL without credentials or query (they may hold keys)."""
    if not url:
        return url
    try:
        split = urlsplit(url)
        host = split.hostname or ""
        if split.port:
            host = f"{host}:{split.port}"
        return urlunsplit((split.scheme, host, split.path, "", ""))
    except ValueError:
        return "<unparsable>"


def _config_summary(parts: AgentParts) -> dict[str, Any]:
    """The config in effect, without secrets (the API adds its own section)."""
    c = parts.config
    cap, seg = c.capture, c.segments
    return {
        "capture": {"source": cap.source, "device": cap.device, "rate": cap.rate,
                    "channels": cap.channels, "format": cap.format,
                    "block_ms": cap.block_ms},
        "ring": {"seconds": c.ring.seconds},
        "stt": {"enabled": c.stt.enabled, "protocol": c.stt.protocol,
                "url": _sanitize_url(c.stt.url), "rate": c.stt.rate,
                "bitrate": c.stt.bitrate, "complexity": c.stt.complexity,
                "chunking": c.stt.chunking, "token": bool(c.stt.token_file)},
        "segments": {"enabled": seg.enabled, "seconds": seg.seconds, "format": seg.format,
                     "bitrate": seg.bitrate, "complexity": seg.complexity,
                     "max_spool_mb": seg.max_spool_mb, "min_free_mb": seg.min_free_mb},
        "upload": {"enabled": c.upload.enabled, "target": c.upload.target,
                   "url": _sanitize_url(c.upload.url), "token": bool(c.upload.token_file),
                   "s3": ({"endpoint": _sanitize_url(c.upload.s3.endpoint),
                           "region": c.upload.s3.region, "bucket": c.upload.s3.bucket,
                           "key_template": c.upload.s3.key_template,
                           "addressing": c.upload.s3.addressing}
                          if c.upload.target == "s3" else None)},
    }


def agent_status(parts: AgentParts) -> dict[str, Any]:
    """The agent's sections of ``/v1/status``: ``config`` (summary), ``capture``,
    ``tasks``, ``stt``, ``spool``, ``segmenter``, ``upload``, ``disk``, ``discovery``
    (the network announcement; None when the API is not announced) and ``fleet``
    (the mailbox and heartbeat counters; None when the fleet is disabled)."""
    ring = parts.ring
    return {
        "config": _config_summary(parts),
        "capture": {"seconds": ring.head / ring.rate, **dataclasses.asdict(parts.source.stats)},
        "tasks": {n: {"state": t.state, "starts": t.starts, "failures": t.failures,
                      "last_error": t.last_error}
                  for n, t in parts.supervisor.tasks.items()},
        "stt": parts.stt.statistics() if parts.stt is not None else None,
        "spool": parts.spool.stats if parts.spool is not None else None,
        "segmenter": parts.segmenter.stats if parts.segmenter is not None else None,
        "upload": parts.uploader.stats if parts.uploader is not None else None,
        "disk": {"free_bytes": disk_free_bytes(parts.data_dir)},
        "discovery": parts.advertiser.stats if parts.advertiser is not None else None,
        "fleet": parts.fleet_stats,
    }


def health_state(parts: AgentParts) -> tuple[str, tuple[str, ...]]:
    """The agent's health in brief: its state and the components to blame (what a
    fleet heartbeat is sent again at once for when it changes)."""
    health = component_health(parts)
    return overall_status(health), tuple(sorted(n for n, h in health.items() if not h.healthy))


def heartbeat_figures(parts: AgentParts, started_mono: float) -> dict[str, Any]:
    """What a fleet heartbeat says of the agent (the fields of
    ``fleet.records.Heartbeat`` the agent knows): health and its reasons, capture,
    clock, the spool's backlog, the last segment synced, STT and free disk.
    `started_mono` is the clock's monotonic time when the agent started."""
    health = component_health(parts)
    ring = parts.ring
    task = parts.supervisor.tasks.get("capture")
    spool = parts.spool
    pending = spool.pending() if spool is not None else []
    synced = (spool.list(state=SegmentState.SYNCED, limit=1, newest_first=True)
              if spool is not None else [])
    uploader = parts.uploader
    stt = parts.stt.statistics() if parts.stt is not None else None
    free = disk_free_bytes(parts.data_dir)
    return {
        "health": overall_status(health),
        "reasons": [f"{name}: {h.detail}" for name, h in health.items() if not h.healthy],
        "uptime_seconds": round(parts.clock.mono() - started_mono, 3),
        "capture": {"state": task.state if task is not None else "",
                    "seconds": round(ring.head / ring.rate, 3),
                    "input_overflows": parts.source.stats.input_overflows,
                    "detail": health["capture"].detail},
        "clock": {"synced": parts.clock.synced(),
                  "offset_seconds": (uploader.stats.clock_offset_seconds
                                     if uploader is not None else None)},
        "spool": {"segments": len(pending),
                  "seconds": round(sum(m.seconds for m in pending), 3),
                  "mb": round(sum(m.bytes for m in pending) / 2**20, 3)},
        "last_synced_segment": synced[0][0].id if synced else "",
        "stt": ({"chunks_sent": stt.chunks_sent, "requests": stt.requests,
                 "dropped": (stt.dropped_overflow + stt.dropped_stale
                             + stt.dropped_rejected),
                 "backlog_seconds": round(stt.backlog_seconds, 3)}
                if stt is not None else {}),
        "disk_free_mb": round(free / 2**20, 1) if free is not None else None,
    }


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
        parts: the running agent's stages.
        extra: more stats sources, each an object with `collect()` yielding
            metric families (the device API adds its request counters).
    """

    def __init__(self, parts: AgentParts, extra: Iterable[Any] = ()) -> None:
        self.parts = parts
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
        parts = self.parts
        info = InfoMetricFamily("edge_agent", "The agent's identity.", labels=["device"])
        info.add_metric([parts.config.device.id], {"device": parts.config.device.id})
        yield info
        health = component_health(parts)
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
        for name, task in parts.supervisor.tasks.items():
            running.add_metric([name], 1.0 if task.state == "running" else 0.0)
            restarts.add_metric([name], task.failures)
        yield running
        yield restarts
        free = disk_free_bytes(parts.data_dir)
        if free is not None:
            yield _gauge("edge_agent_disk_free_bytes",
                         "Bytes free on the file system of the data directory.", free)
        yield _gauge("edge_agent_clock_synced", "1 when the wall clock is NTP-synchronised.",
                     1.0 if parts.clock.synced() else 0.0)

    def _capture(self) -> Iterator[Metric]:
        parts = self.parts
        stats = parts.source.stats
        yield _counter("edge_agent_capture_seconds", "Seconds of audio captured.",
                       parts.ring.head / parts.ring.rate)
        yield _counter("edge_agent_capture_input_overflows",
                       "Input overflows the audio device reported.", stats.input_overflows)
        yield _counter("edge_agent_capture_queue_drops",
                       "Captured blocks dropped because the event loop did not take them in "
                       "time.", stats.queue_drops)
        yield _counter("edge_agent_capture_wakeups",
                       "Times the capture thread woke the event loop (once per reader batch).",
                       stats.wakeups)
        task = parts.supervisor.tasks.get("capture")
        yield _counter("edge_agent_capture_restarts",
                       "Times capture failed and the source was reopened.",
                       task.failures if task is not None else 0)

    def _ring(self) -> Iterator[Metric]:
        ring = self.parts.ring
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
        stt = self.parts.stt
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
        spool = self.parts.spool
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
        segmenter = self.parts.segmenter
        if segmenter is not None:
            yield _counter("edge_agent_segmenter_lost_seconds",
                           "Audio the segmenter never wrote (evicted from the ring first).",
                           segmenter.stats.lost_frames / self.parts.ring.rate)

    def _upload(self) -> Iterator[Metric]:
        spool = self.parts.spool
        if spool is not None:
            pending = spool.pending()
            yield _gauge("edge_agent_upload_backlog_segments", "Sealed segments not uploaded.",
                         len(pending))
            yield _gauge("edge_agent_upload_backlog_bytes", "Bytes not uploaded yet.",
                         sum(m.bytes for m in pending))
            yield _gauge("edge_agent_upload_backlog_seconds", "Audio not uploaded yet.",
                         sum(m.seconds for m in pending))
        uploader = self.parts.uploader
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
        yield _gauge("edge_agent_upload_clock_offset_seconds",
                     "Seconds the object store's clock is ahead of the device's, as used to "
                     "sign (0: within 5 minutes).", u.clock_offset_seconds)


def make_registry(parts: AgentParts, extra: Iterable[Any] = ()) -> CollectorRegistry:
    """A registry of its own for one agent (never the process-wide default one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(parts, extra))
    return registry
