"""Prometheus metrics of the platform, in one registry per process instance."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class Metrics:
    """The metrics every context may update; each platform instance has its own registry."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.http_requests = Counter(
            "fleetmesh_http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "fleetmesh_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.outbox_backlog = Gauge(
            "fleetmesh_outbox_backlog",
            "Domain events committed but not yet published",
            registry=self.registry,
        )
        self.outbox_published = Counter(
            "fleetmesh_outbox_published",
            "Domain events published from the outbox",
            registry=self.registry,
        )
