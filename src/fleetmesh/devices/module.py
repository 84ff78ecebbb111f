"""Builds the device registry from the shared infrastructure."""

from __future__ import annotations

from fleetmesh.core.module import Deps, Module
from fleetmesh.devices import contracts
from fleetmesh.devices.api import create_router
from fleetmesh.devices.credentials import CredentialHasher
from fleetmesh.devices.mqtt_auth import MqttAuthResponder
from fleetmesh.devices.service import DeviceQueries, DevicesUnitOfWork
from fleetmesh.devices.verify import VerifyResponder

NAME = "devices"


def create_module(deps: Deps) -> Module:
    hasher = CredentialHasher()
    queries = DeviceQueries(deps.database, hasher)

    def uow_factory() -> DevicesUnitOfWork:
        return DevicesUnitOfWork(deps.database, on_commit=deps.on_commit)

    router = create_router(
        uow_factory=uow_factory, queries=queries, hasher=hasher, clock=deps.clock
    )

    responder = VerifyResponder(deps.backbone, queries)
    mqtt_auth = (
        MqttAuthResponder(deps.backbone, queries, deps.callout_issuer_seed)
        if deps.callout_issuer_seed
        else None
    )

    async def start() -> None:
        await responder.start()
        if mqtt_auth is not None:
            await mqtt_auth.start()

    async def stop() -> None:
        if mqtt_auth is not None:
            await mqtt_auth.stop()
        await responder.stop()
        hasher.close()

    return Module(
        name=NAME,
        routers=[router],
        start=start,
        stop=stop,
        provides={"device_verifier": queries},
        event_contracts=contracts.SCHEMAS,
    )
