"""Builds the status context from the shared infrastructure.

Start order: re-arm every deadline from the store, then the writer and the
deadline runner, then the inputs (device projection, telemetry, device
messages, MQTT presence with its reconciliation). Stop in reverse: inputs
first, then the runner, then the writer flushes what it still holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fleetmesh.core.logging import get_logger
from fleetmesh.core.module import Deps, Module
from fleetmesh.core.nats_server import SERVICE_ACCOUNT
from fleetmesh.core.tasks import stop_task
from fleetmesh.status import contracts
from fleetmesh.status.api import create_router
from fleetmesh.status.consumers import DeviceMessages, LivenessConsumer, ProjectionConsumer
from fleetmesh.status.liveness import DeadlineRunner, ReportBatcher, Timers
from fleetmesh.status.options import StatusOptions
from fleetmesh.status.presence import MqttPresence
from fleetmesh.status.queries import StatusQueries
from fleetmesh.status.service import StatusService

NAME = "status"
log = get_logger(__name__)


def create_module(deps: Deps) -> Module:
    options = StatusOptions(deps.live_config)
    timers = Timers()
    service = StatusService(
        deps.database,
        clock=deps.clock,
        on_commit=deps.on_commit,
        options=options,
        timers=timers,
    )
    queries = StatusQueries(deps.database, clock=deps.clock, options=options)
    # PostgreSQL writes one transaction's rows while the next is built here; SQLite
    # has one writer, and a second transaction in flight gained nothing there.
    batcher = ReportBatcher(service, max_in_flight=2 if deps.database.is_postgres else 1)

    async def publish(subject: str, payload: bytes) -> None:
        await deps.backbone.nc.publish(subject, payload)

    runner = DeadlineRunner(
        timers=timers, batcher=batcher, service=service, publish=publish, clock=deps.clock
    )
    projection = ProjectionConsumer(deps.backbone, service)
    liveness = LivenessConsumer(deps.backbone, service, batcher, deps.clock)
    device_messages = DeviceMessages(deps.backbone, batcher, deps.clock)
    presence = MqttPresence(
        deps.system_nats,
        account=SERVICE_ACCOUNT,
        batcher=batcher,
        service=service,
        clock=deps.clock,
    )
    unsubscribe: list[Callable[[], None]] = []
    background: set[asyncio.Task[Any]] = set()

    def on_default_timeout_change(_value: object) -> None:
        task = asyncio.create_task(service.rebuild_timers(default_only=True))
        background.add(task)
        task.add_done_callback(background.discard)

    async def start() -> None:
        service.prepare()
        armed = await service.rebuild_timers()
        log.info("status_timers_rebuilt", devices=armed)
        batcher.start()
        runner.start()
        await projection.start()
        await liveness.start()
        await device_messages.start()
        await presence.start()
        unsubscribe.append(options.on_offline_timeout_change(on_default_timeout_change))

    async def stop() -> None:
        for undo in unsubscribe:
            undo()
        unsubscribe.clear()
        await presence.stop()
        await device_messages.stop()
        await liveness.stop()
        await projection.stop()
        await runner.stop()
        await batcher.stop()
        for task in list(background):
            await stop_task(task)

    return Module(
        name=NAME,
        routers=[create_router(service=service, queries=queries)],
        start=start,
        stop=stop,
        provides={
            "status_service": service,
            "status_queries": queries,
            "status_batcher": batcher,
            "status_timers": timers,
            "status_presence": presence,
            "status_device_messages": device_messages,
        },
        event_contracts=contracts.SCHEMAS,
    )
