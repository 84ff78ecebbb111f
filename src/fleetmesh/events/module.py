"""Builds the event bus from the shared infrastructure."""

from __future__ import annotations

from fleetmesh.core.module import Deps, Module
from fleetmesh.events.api import create_router
from fleetmesh.events.store import EventStore

NAME = "events"


def create_module(deps: Deps) -> Module:
    store = EventStore(deps.backbone)
    return Module(name=NAME, routers=[create_router(store=store)], provides={"event_store": store})
