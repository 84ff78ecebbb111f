"""Builds the service registry: the KV store, its watched view, the checker and the API."""

from __future__ import annotations

from fleetmesh.core.module import Deps, Module
from fleetmesh.registry import contracts
from fleetmesh.registry.api import create_router
from fleetmesh.registry.checker import HealthChecker, Prober
from fleetmesh.registry.repository import KvInstanceStore, RegistryView
from fleetmesh.registry.service import EventPublisher, RegistryQueries, RegistryService

NAME = "registry"


def create_module(deps: Deps) -> Module:
    store = KvInstanceStore(deps.backbone)
    view = RegistryView(deps.backbone)
    events = EventPublisher(deps.backbone)
    prober = Prober()
    service = RegistryService(
        store=store, view=view, events=events, clock=deps.clock, probe=prober.probe
    )
    queries = RegistryQueries(view, deps.clock)
    checker = HealthChecker(view, service, prober, deps.clock)

    async def start() -> None:
        await store.open()
        await view.start()
        events.start()
        checker.start()

    async def stop() -> None:
        await checker.stop()
        await view.stop()
        await events.stop()
        await prober.close()

    return Module(
        name=NAME,
        routers=[create_router(service=service, queries=queries, view=view)],
        start=start,
        stop=stop,
        provides={"registry_view": view, "registry_checker": checker},
        event_contracts=contracts.SCHEMAS,
    )
