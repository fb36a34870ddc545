"""The device API's own counters: `ApiStats`, and `ApiCollector` reading them into
the agent's Prometheus registry (exposed in ``/metrics`` and ``/v1/status``).

Imports nothing of the project; never agent, another stage, metrics or systemd.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..http import ConnectionStats

__all__ = ["ApiCollector", "ApiStats"]


@dataclass
class ApiStats:
    """Counters of the device API (exposed in /metrics and /v1/status)."""

    requests: int = 0
    responses: dict[int, int] = field(default_factory=dict)  # by status code
    unauthorized: int = 0
    bodies_refused: int = 0
    heads_refused: int = 0  # 431: request heads over the limit
    timeouts: int = 0
    errors: int = 0  # 500: bugs
    audio_requests: int = 0
    audio_busy: int = 0  # 503: no encode slot within the queue time
    audio_active: int = 0
    audio_aborted: int = 0  # bodies cut off (client gone or stalled, audio lost)
    audio_seconds: float = 0.0  # audio planned into responses
    downloads: int = 0
    downloads_busy: int = 0
    downloads_active: int = 0
    live_sessions: int = 0
    live_listeners: int = 0
    live_rejected: int = 0
    live_overruns: int = 0
    live_lost_seconds: float = 0.0
    level_sessions: int = 0  # /v1/levels streams started
    level_listeners: int = 0
    level_rejected: int = 0  # 503: over api.max_live_listeners
    media_urls: int = 0  # signed media URLs handed out
    bytes_sent: int = 0
    connections: ConnectionStats = field(default_factory=ConnectionStats)


class ApiCollector:
    """The API's own counters, for the agent's metrics registry."""

    def __init__(self, stats: ApiStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        codes = CounterMetricFamily("edge_agent_api_responses", "API responses by status code.",
                                    labels=["code"])
        for code, n in sorted(s.responses.items()):
            codes.add_metric([str(code)], n)
        yield codes
        for name, doc, value in (
            ("requests", "API requests.", s.requests),
            ("unauthorized", "Requests without a valid token.", s.unauthorized),
            ("timeouts", "Requests that did not start a response in time.", s.timeouts),
            ("heads_refused", "Requests refused for a head over the size limit (431).",
             s.heads_refused),
            ("audio_busy", "/v1/audio requests turned away (503).", s.audio_busy),
            ("audio_aborted", "Audio responses cut off.", s.audio_aborted),
            ("audio_seconds", "Seconds of audio planned into responses.", s.audio_seconds),
            ("downloads", "Segment downloads started.", s.downloads),
            ("live_overruns", "Live listeners that fell off the ring.", s.live_overruns),
            ("level_rejected", "/v1/levels streams turned away (503).", s.level_rejected),
            ("bytes", "Response body bytes.", s.bytes_sent),
            ("connections_refused", "Connections closed at accept: over api.max_connections "
             "and its health-check reserve.", s.connections.refused),
            ("connections_reserved", "Connections over api.max_connections let in for "
             "health checks only.", s.connections.reserved),
            ("connections_failed", "Connections ended by an error in the HTTP layer.",
             s.connections.failed),
        ):
            family = CounterMetricFamily(f"edge_agent_api_{name}", doc)
            family.add_metric([], value)
            yield family
        for name, doc, value in (
            ("audio_active", "/v1/audio responses being produced.", s.audio_active),
            ("downloads_active", "Segment downloads in progress.", s.downloads_active),
            ("live_listeners", "/v1/live listeners now.", s.live_listeners),
            ("level_listeners", "/v1/levels listeners now.", s.level_listeners),
            ("connections", "Client connections open now.", s.connections.open),
        ):
            gauge = GaugeMetricFamily(f"edge_agent_api_{name}", doc)
            gauge.add_metric([], value)
            yield gauge
