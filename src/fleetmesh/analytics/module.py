"""Builds the analytics service from the shared infrastructure."""

from __future__ import annotations

import asyncio

from nats.js.api import DeliverPolicy

from fleetmesh.analytics import contracts
from fleetmesh.analytics.api import create_router
from fleetmesh.analytics.consumers import (
    ConsumerSpec,
    DeviceProjection,
    DurableConsumer,
    StreamingDetection,
)
from fleetmesh.analytics.jobs import TrainingJobs
from fleetmesh.analytics.reader import HttpDeviceDirectory, HttpTelemetryReader
from fleetmesh.analytics.scoring import ScoringPool
from fleetmesh.analytics.service import AnalyticsQueries, AnalyticsService, AnalyticsUnitOfWork
from fleetmesh.core.module import Deps, Module

NAME = "analytics"
COLLECTED_CONSUMER = "analytics-telemetry-collected"
DEVICES_CONSUMER = "analytics-devices"


def create_module(deps: Deps) -> Module:
    def uow_factory() -> AnalyticsUnitOfWork:
        return AnalyticsUnitOfWork(deps.database, on_commit=deps.on_commit)

    pool = ScoringPool()
    reader = HttpTelemetryReader(deps.platform_api)
    queries = AnalyticsQueries(deps.database)
    streaming = StreamingDetection(
        database=deps.database,
        uow_factory=uow_factory,
        reader=reader,
        directory=HttpDeviceDirectory(deps.platform_api),
        pool=pool,
        clock=deps.clock,
    )
    service = AnalyticsService(
        uow_factory=uow_factory,
        queries=queries,
        reader=reader,
        pool=pool,
        clock=deps.clock,
        on_deployments_changed=streaming.deployments_changed,
    )
    jobs = TrainingJobs(
        uow_factory=uow_factory,
        reader=reader,
        pool=pool,
        clock=deps.clock,
        # An embedded platform is the only process on its database.
        sole_owner=not deps.settings.external_nats,
    )
    projection = DeviceProjection(uow_factory, deps.clock)
    consumers = [
        DurableConsumer(
            deps.backbone,
            uow_factory,
            deps.clock,
            ConsumerSpec(
                durable=COLLECTED_CONSUMER,
                subject=contracts.TELEMETRY_COLLECTED_SUBJECT,
                handler=streaming.handle_collected,
                # Deployments score what arrives after they exist: no replay of history.
                deliver_policy=DeliverPolicy.NEW,
            ),
        ),
        DurableConsumer(
            deps.backbone,
            uow_factory,
            deps.clock,
            ConsumerSpec(
                durable=DEVICES_CONSUMER,
                subject=contracts.DEVICE_EVENTS_SUBJECT,
                handler=projection.handle,
            ),
        ),
    ]
    router = create_router(
        uow_factory=uow_factory, service=service, queries=queries, jobs=jobs, clock=deps.clock
    )

    async def start() -> None:
        await jobs.start()
        streaming.start()
        for consumer in consumers:
            await consumer.start()

    async def stop() -> None:
        for consumer in consumers:
            await consumer.stop()
        await streaming.stop()
        await jobs.stop()
        await asyncio.to_thread(pool.shutdown)

    return Module(
        name=NAME,
        routers=[router],
        start=start,
        stop=stop,
        event_contracts=contracts.SCHEMAS,
        provides={
            "analytics_jobs": jobs,
            "analytics_streaming": streaming,
            "analytics_service": service,
        },
    )
