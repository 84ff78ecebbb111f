"""Builds the telemetry context from the shared infrastructure.

Start order: the TELEMETRY and TELEMETRY_DLQ streams, the in-memory projection (loaded from
the tables), the projection consumer, the writer (its durable consumer must exist before
anything is published: the stream keeps messages only while a consumer is interested), the
backlog monitor, the MQTT consumer of ``DEVICES_IN`` (``mqtt.py``, refusals to the
quarantine), the bridge from an external broker (with ``--mqtt-bridge``), the retention
job. Stop is the reverse; the writer finishes its batch.

``provides``: ``telemetry_ingestor`` (the ``Ingestor`` every transport uses),
``telemetry_writer``, ``telemetry_retention``, ``telemetry_directory``, ``telemetry_mqtt``,
``telemetry_quarantine``.
"""

from __future__ import annotations

import asyncio

from fleetmesh.core.module import Deps, Module
from fleetmesh.telemetry import contracts
from fleetmesh.telemetry.api import create_router
from fleetmesh.telemetry.bridge import MqttBridge
from fleetmesh.telemetry.consumers import ProjectionConsumer
from fleetmesh.telemetry.ingest import BacklogMonitor, Ingestor, IngestSettings
from fleetmesh.telemetry.metrics import TelemetryMetrics
from fleetmesh.telemetry.mqtt import MqttTelemetryConsumer
from fleetmesh.telemetry.projection import DeviceDirectory
from fleetmesh.telemetry.quarantine import QuarantineStore
from fleetmesh.telemetry.quarantine import create_router as create_quarantine_router
from fleetmesh.telemetry.retention import RetentionJob
from fleetmesh.telemetry.service import (
    ProjectionChange,
    TelemetryQueries,
    TelemetryUnitOfWork,
    apply_projection_changes,
)
from fleetmesh.telemetry.writer import (
    BatchStore,
    StoredNotifier,
    TelemetryWriter,
    dead_letter_stream_config,
    telemetry_stream_config,
)

NAME = "telemetry"


def create_module(deps: Deps) -> Module:
    metrics = TelemetryMetrics(deps.metrics.registry)
    directory = DeviceDirectory(deps.database, deps.backbone)
    settings = IngestSettings(deps.live_config)
    notifier = StoredNotifier(deps.database)
    monitor = BacklogMonitor(deps.backbone)

    def uow_factory() -> TelemetryUnitOfWork:
        return TelemetryUnitOfWork(deps.database, on_commit=deps.on_commit)

    async def apply(changes: list[ProjectionChange]) -> None:
        await apply_projection_changes(
            changes, uow=uow_factory(), directory=directory, now=deps.clock.now()
        )

    projection = ProjectionConsumer(deps.backbone, apply)
    batch_store = BatchStore(
        uow_factory=uow_factory, notifier=notifier, clock=deps.clock, metrics=metrics
    )
    writer = TelemetryWriter(backbone=deps.backbone, store=batch_store)
    ingestor = Ingestor(
        directory=directory,
        backbone=deps.backbone,
        notifier=notifier,
        clock=deps.clock,
        settings=settings,
        monitor=monitor,
        metrics=metrics,
    )
    retention = RetentionJob(
        database=deps.database,
        directory=directory,
        uow_factory=uow_factory,
        clock=deps.clock,
        live_config=deps.live_config,
        metrics=metrics,
    )
    quarantine = QuarantineStore(deps.database, clock=deps.clock)
    mqtt = MqttTelemetryConsumer(deps, ingestor, batch_store, quarantine)
    bridge = (
        MqttBridge(deps.settings.mqtt_bridge, deps.backbone) if deps.settings.mqtt_bridge else None
    )
    router = create_router(
        ingestor=ingestor,
        queries=TelemetryQueries(deps.database, directory),
        directory=directory,
        uow_factory=uow_factory,
        settings=settings,
        clock=deps.clock,
    )

    async def start() -> None:
        await deps.backbone.ensure_stream(telemetry_stream_config())
        await deps.backbone.ensure_stream(dead_letter_stream_config())
        await directory.start()
        await projection.start()
        await writer.start()
        await monitor.start()
        await mqtt.start()
        if bridge is not None:
            await bridge.start()
        await retention.start()

    async def stop() -> None:
        await retention.stop()
        if bridge is not None:
            await bridge.stop()
        await mqtt.stop()
        await monitor.stop()
        await asyncio.gather(writer.stop(), projection.stop())
        await directory.stop()

    return Module(
        name=NAME,
        routers=[router, create_quarantine_router(store=quarantine)],
        start=start,
        stop=stop,
        provides={
            "telemetry_ingestor": ingestor,
            "telemetry_writer": writer,
            "telemetry_retention": retention,
            "telemetry_directory": directory,
            "telemetry_mqtt": mqtt,
            "telemetry_quarantine": quarantine,
        },
        event_contracts=contracts.SCHEMAS,
    )
