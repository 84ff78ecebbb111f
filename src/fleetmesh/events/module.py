"""Builds the event bus from the shared infrastructure.

At start the contracts of every context in this process (`Deps.contract_catalog`,
filled from each context's `contracts.SCHEMAS`) are registered, then one
delivery worker per active subscription starts.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from fleetmesh.core.logging import get_logger
from fleetmesh.core.module import Deps, Module
from fleetmesh.events import contracts
from fleetmesh.events.api import create_router
from fleetmesh.events.asyncapi import ServerInfo
from fleetmesh.events.domain import InvalidRetryPolicy, RetryPolicy
from fleetmesh.events.guard import HostGuard
from fleetmesh.events.publishing import EventPublisher
from fleetmesh.events.service import (
    ContractCache,
    EventBusQueries,
    EventsUnitOfWork,
    reserved_roots,
    seed_builtin_contracts,
)
from fleetmesh.events.store import EventStore
from fleetmesh.events.subscription import retry_policy_from
from fleetmesh.events.supervisor import Supervisor

NAME = "events"
CONFIG_SERVICE = "events"
RETRY_CONFIG_KEY = "webhook_retry"

log = get_logger(__name__)


class LiveRetryPolicy:
    """The default retry policy, read from the configuration center on every use.

    `events/webhook_retry` is a JSON object with `RetryPolicy` fields; missing
    fields keep their defaults, and an invalid value is ignored (with a warning).
    """

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self._seen: tuple[int, RetryPolicy] | None = None

    def __call__(self) -> RetryPolicy:
        value: Any = self.deps.live_config.get(CONFIG_SERVICE, RETRY_CONFIG_KEY, None)
        if self._seen is not None and self._seen[0] == id(value):
            return self._seen[1]
        try:
            policy = retry_policy_from(value, RetryPolicy())
        except InvalidRetryPolicy as error:
            log.warning("webhook_retry_config_invalid", error=error.detail)
            policy = RetryPolicy()
        self._seen = (id(value), policy)
        return policy


def create_module(deps: Deps) -> Module:
    def uow_factory() -> EventsUnitOfWork:
        return EventsUnitOfWork(deps.database, on_commit=deps.on_commit)

    store = EventStore(deps.backbone)
    queries = EventBusQueries(deps.database)
    guard = HostGuard(allow_private=deps.settings.allow_private_webhooks)
    cache = ContractCache(deps.database)
    supervisor = Supervisor(
        backbone=deps.backbone,
        database=deps.database,
        uow_factory=uow_factory,
        queries=queries,
        guard=guard,
        clock=deps.clock,
        policy=LiveRetryPolicy(deps),
    )
    publisher = EventPublisher(backbone=deps.backbone, contracts=cache, supervisor=supervisor)

    def roots() -> frozenset[str]:
        return reserved_roots(deps.contract_catalog())

    def server_info() -> ServerInfo:
        server = urlsplit(deps.backbone.endpoint.servers[0])
        host = f"{server.hostname or 'localhost'}:{server.port or 4222}"
        return ServerInfo(host=host)

    router = create_router(
        store=store,
        queries=queries,
        uow_factory=uow_factory,
        clock=deps.clock,
        publisher=publisher,
        supervisor=supervisor,
        guard=guard,
        contract_cache=cache,
        reserved_roots=roots,
        server_info=server_info,
    )

    async def start() -> None:
        registered = await seed_builtin_contracts(
            deps.contract_catalog(), uow_factory=uow_factory, clock=deps.clock
        )
        if registered:
            log.info("builtin_contracts_registered", count=registered)
        await supervisor.start()

    async def stop() -> None:
        await supervisor.stop()

    return Module(
        name=NAME,
        routers=[router],
        start=start,
        stop=stop,
        provides={"event_store": store, "event_publisher": publisher},
        event_contracts=contracts.SCHEMAS,
    )
