"""Prometheus metrics of the telemetry context, registered in the platform's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class TelemetryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.points_accepted = Counter(
            "fleetmesh_telemetry_points_accepted",
            "Points accepted and published to the TELEMETRY stream",
            ["source"],
            registry=registry,
        )
        self.points_rejected = Counter(
            "fleetmesh_telemetry_points_rejected",
            "Items rejected by validation",
            ["source"],
            registry=registry,
        )
        self.overloaded = Counter(
            "fleetmesh_telemetry_overloaded",
            "Ingest calls refused with 503 because of overload",
            ["reason"],
            registry=registry,
        )
        self.points_stored = Counter(
            "fleetmesh_telemetry_points_stored",
            "Points written to the database by the writer",
            registry=registry,
        )
        self.batches_stored = Counter(
            "fleetmesh_telemetry_batches_stored",
            "Messages written to the database by the writer",
            registry=registry,
        )
        self.batches_duplicate = Counter(
            "fleetmesh_telemetry_batches_duplicate",
            "Redelivered messages the writer skipped (already stored)",
            registry=registry,
        )
        self.last_stored = Gauge(
            "fleetmesh_telemetry_last_stored_timestamp_seconds",
            "Unix time of the writer's last commit that stored points",
            registry=registry,
        )
        self.writer_backlog = Gauge(
            "fleetmesh_telemetry_writer_backlog",
            "Messages waiting for the writer (pending + unacknowledged)",
            registry=registry,
        )
        self.store_seconds = Histogram(
            "fleetmesh_telemetry_store_seconds",
            "Time to store one writer transaction",
            registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.rows_deleted = Counter(
            "fleetmesh_telemetry_retention_rows_deleted",
            "Raw points deleted by retention",
            registry=registry,
        )
