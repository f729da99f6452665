"""Prometheus metrics for every connection an adapter serves (needs the ``metrics`` extra).

    observer = PrometheusObserver()
    app = PerspectiveASGIApp(server, settings=Settings(observer=observer))
    # expose prometheus_client.generate_latest(observer.registry) at /metrics

Each observer registers its metrics in its own ``CollectorRegistry`` (pass
``prometheus_client.REGISTRY`` to share the default one), so two apps in one process do not
clash.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ._core import registry, sharing
from ._core.wire import REQUEST_KIND_NAMES
from ._observer import SessionObserver
from ._types import Connection

#: Request latency buckets in seconds: cheap requests take microseconds, queries seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class PrometheusObserver(SessionObserver):
    """Counts connections, messages, bytes, request latency, closes and refusals of
    connections and requests, and what shared views save."""

    def __init__(
        self, registry: CollectorRegistry | None = None, prefix: str = "perspective"
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.connections = Gauge(
            f"{prefix}_connections", "Open websocket connections.", registry=self.registry
        )
        self.messages = Counter(
            f"{prefix}_messages", "Websocket messages, by direction.", ["direction"],
            registry=self.registry,
        )
        self.bytes = Counter(
            f"{prefix}_message_bytes", "Websocket message payload bytes, by direction.",
            ["direction"], registry=self.registry,
        )
        self.request_seconds = Histogram(
            f"{prefix}_request_seconds", "Time the engine took to answer a request, by kind.",
            ["kind"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.closes = Counter(
            f"{prefix}_closes", "Connections ended, by close code.", ["code"],
            registry=self.registry,
        )
        self.refusals = Counter(
            f"{prefix}_refused_connections", "Connections refused before a session, by reason.",
            ["reason"], registry=self.registry,
        )
        self.refused_requests = Counter(
            f"{prefix}_refused_requests",
            "Requests refused without reaching the engine, by reason and kind.",
            ["reason", "kind"], registry=self.registry,
        )
        self.queued = Gauge(
            f"{prefix}_send_queue_bytes",
            "Bytes waiting in outbound queues across the process's open connections.",
            registry=self.registry,
        )
        # Read at scrape time: the queues change on every thread that runs the engine.
        self.queued.set_function(_queued_bytes)
        self.shared_views = Gauge(
            f"{prefix}_shared_views",
            "Engine views serving the connections' views when views are shared.",
            registry=self.registry,
        )
        self.shared_views.set_function(lambda: float(sharing.totals()[0]))
        self.view_aliases = Gauge(
            f"{prefix}_view_aliases",
            "Connections' views served by a shared engine view.", registry=self.registry,
        )
        self.view_aliases.set_function(lambda: float(sharing.totals()[1]))
        self.views_saved = Gauge(
            f"{prefix}_engine_views_saved",
            "Engine views that sharing saves: aliases less the engine views serving them.",
            registry=self.registry,
        )
        self.views_saved.set_function(_views_saved)
        self._received = (self.messages.labels("in"), self.bytes.labels("in"))
        self._sent = (self.messages.labels("out"), self.bytes.labels("out"))

    def connection_opened(self, bridge: Connection) -> None:
        self.connections.inc()

    def connection_closed(self, bridge: Connection, code: int | None) -> None:
        self.connections.dec()
        self.closes.labels(str(code) if code is not None else "none").inc()

    def connection_refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def request_refused(self, kind: int | None, reason: str) -> None:
        name = REQUEST_KIND_NAMES.get(kind, "other") if kind is not None else "none"
        self.refused_requests.labels(reason, name).inc()

    def message_received(self, size: int) -> None:
        self._received[0].inc()
        self._received[1].inc(size)

    def message_sent(self, size: int) -> None:
        self._sent[0].inc()
        self._sent[1].inc(size)

    def request_handled(self, kind: int | None, seconds: float) -> None:
        name = REQUEST_KIND_NAMES.get(kind, "other") if kind is not None else "none"
        self.request_seconds.labels(name).observe(seconds)


def _views_saved() -> float:
    views, aliases = sharing.totals()
    return float(aliases - views)


def _queued_bytes() -> float:
    return float(registry.queued_bytes())
