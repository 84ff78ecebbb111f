"""Builds the configuration center: versioned store, KV mirror, watch and API."""

from __future__ import annotations

from fleetmesh.config import contracts
from fleetmesh.config.api import create_router
from fleetmesh.config.service import ConfigQueries, ConfigUnitOfWork, ConfigWatch, KvMirror
from fleetmesh.core.module import Deps, Module

NAME = "config"


def create_module(deps: Deps) -> Module:
    queries = ConfigQueries(deps.database)
    mirror = KvMirror(deps.backbone, queries)
    watch = ConfigWatch(deps.backbone)

    def uow_factory() -> ConfigUnitOfWork:
        return ConfigUnitOfWork(deps.database, on_commit=deps.on_commit)

    router = create_router(
        uow_factory=uow_factory, queries=queries, mirror=mirror, watch=watch, clock=deps.clock
    )

    async def start() -> None:
        await mirror.start()
        await watch.start()

    async def stop() -> None:
        await watch.stop()
        await mirror.stop()

    return Module(
        name=NAME,
        routers=[router],
        start=start,
        stop=stop,
        provides={"config_mirror": mirror, "config_watch": watch},
        event_contracts=contracts.SCHEMAS,
    )
