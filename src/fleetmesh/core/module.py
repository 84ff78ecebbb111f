"""What a bounded context hands the composition root: routers, streams, start and stop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import APIRouter

from fleetmesh.core.backbone import Backbone, NatsEndpoint
from fleetmesh.core.clock import Clock
from fleetmesh.core.database import Database
from fleetmesh.core.live_config import LiveConfig
from fleetmesh.core.metrics import Metrics
from fleetmesh.core.settings import Settings


async def _nothing() -> None:
    return None


def _no_contracts() -> dict[str, dict[str, dict[str, Any]]]:
    return {}


@dataclass
class Deps:
    """The shared infrastructure a context is built from."""

    settings: Settings
    database: Database
    backbone: Backbone
    metrics: Metrics
    clock: Clock
    on_commit: Callable[[], None]
    live_config: LiveConfig
    platform_api: Callable[[], httpx.AsyncClient]
    """A client of the platform's public HTTP API (to read another context's published API)."""
    callout_issuer_seed: str | None = None
    """The nkey seed that signs auth callout answers (embedded NATS); None: no callout here."""
    contract_catalog: Callable[[], dict[str, dict[str, dict[str, Any]]]] = _no_contracts
    """Module name -> event type -> JSON Schema of every module of this process (read at start)."""
    system_nats: NatsEndpoint | None = None
    """The NATS system account (MQTT connect/disconnect events, CONNZ); None: not available."""


@dataclass
class Module:
    """One bounded context, ready to be mounted in a process."""

    name: str
    routers: list[APIRouter] = field(default_factory=list)
    start: Callable[[], Awaitable[None]] = _nothing
    stop: Callable[[], Awaitable[None]] = _nothing
    provides: dict[str, Any] = field(default_factory=dict)
    event_contracts: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Event type -> JSON Schema of the integration events this context publishes."""
