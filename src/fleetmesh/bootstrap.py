"""The composition root: builds a fleetmesh process from `Settings`.

The CLI, the ASGI app, the service runner and the tests all come through
`bootstrap()`. Nothing here runs at import time; `Platform.start()` connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from nats.js.api import DiscardPolicy, StreamConfig

from fleetmesh.analytics import module as analytics_module
from fleetmesh.config import module as config_module
from fleetmesh.core.auth import ApiKeyStore, Role
from fleetmesh.core.backbone import EVENTS_STREAM, Backbone, NatsEndpoint
from fleetmesh.core.clock import Clock, SystemClock
from fleetmesh.core.database import Database
from fleetmesh.core.live_config import LiveConfig, follow_log_level
from fleetmesh.core.logging import get_logger
from fleetmesh.core.metrics import Metrics
from fleetmesh.core.module import Deps, Module
from fleetmesh.core.nats_server import (
    SERVICE_USER,
    SYSTEM_USER,
    EmbeddedNatsServer,
    NatsSecrets,
)
from fleetmesh.core.outbox import OutboxRelay
from fleetmesh.core.ports import choose_port
from fleetmesh.core.settings import (
    DEFAULT_HTTP_PORT,
    DEFAULT_MQTT_PORT,
    DEFAULT_NATS_PORT,
    Settings,
)
from fleetmesh.devices import module as devices_module
from fleetmesh.events import module as events_module
from fleetmesh.registry import module as registry_module
from fleetmesh.status import module as status_module
from fleetmesh.telemetry import module as telemetry_module

log = get_logger(__name__)

ModuleFactory = Callable[[Deps], Module]

CONTEXTS: dict[str, ModuleFactory] = {
    devices_module.NAME: devices_module.create_module,
    analytics_module.NAME: analytics_module.create_module,
    events_module.NAME: events_module.create_module,
    registry_module.NAME: registry_module.create_module,
    status_module.NAME: status_module.create_module,
    telemetry_module.NAME: telemetry_module.create_module,
    config_module.NAME: config_module.create_module,
}

ADMIN_KEY_FILE = "admin.key"
DAY_S = 86_400


@dataclass
class Ports:
    http: int
    nats: int
    mqtt: int


@dataclass
class Platform:
    """A running (or ready to run) set of contexts with their infrastructure."""

    settings: Settings
    database: Database
    backbone: Backbone
    metrics: Metrics
    clock: Clock
    keys: ApiKeyStore
    relay: OutboxRelay
    ports: Ports
    nats_server: EmbeddedNatsServer | None
    module_factories: dict[str, ModuleFactory]
    live_config: LiveConfig
    modules: list[Module] = field(default_factory=list)
    admin_key_path: Path | None = None
    _unfollow_log_level: Callable[[], None] | None = None
    admin_key_created: bool = False
    started: bool = False
    app: Any = None
    _internal_key: str | None = None

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.host}:{self.ports.http}"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://{self.settings.host}:{self.ports.mqtt}"

    @property
    def nats_urls(self) -> list[str]:
        return self.backbone.endpoint.servers

    def provided(self, name: str) -> object | None:
        for module in self.modules:
            if name in module.provides:
                provided: object = module.provides[name]
                return provided
        return None

    async def start(self) -> None:
        """Start NATS (embedded), connect, migrate, then the contexts and the relay."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        if self.nats_server is not None:
            await self.nats_server.start()
            self._follow_embedded_ports(self.nats_server)
        await self.backbone.connect()
        await self.backbone.wait_for_jetstream()
        await self.backbone.ensure_stream(events_stream_config(self.settings))
        await self.database.migrate()
        await self.live_config.start()
        self._unfollow_log_level = follow_log_level(self.live_config, self.settings.log_level)
        deps = Deps(
            settings=self.settings,
            database=self.database,
            backbone=self.backbone,
            metrics=self.metrics,
            clock=self.clock,
            on_commit=self.relay.wake,
            live_config=self.live_config,
            platform_api=self.api_client,
            contract_catalog=self.event_contracts,
            callout_issuer_seed=(
                self.nats_server.secrets.callout_issuer_seed
                if self.nats_server
                else self.settings.callout_issuer_seed
            ),
            system_nats=self._system_nats(),
        )
        self.modules = [factory(deps) for factory in self.module_factories.values()]
        for module in self.modules:
            await module.start()
        self.relay.start()
        await self._ensure_admin_key()
        self.started = True

    def _follow_embedded_ports(self, server: EmbeddedNatsServer) -> None:
        """The ports the embedded server listens on: a picked one may have been replaced."""
        self.ports.nats, self.ports.mqtt = server.client_port, server.mqtt_port
        self.backbone.endpoint = replace(self.backbone.endpoint, servers=[server.url])

    def _system_nats(self) -> NatsEndpoint | None:
        """The system account's login: the embedded server's, or the one given for external
        NATS (`fleetmesh up --distributed` hands it to its processes)."""
        if self.nats_server is not None:
            return NatsEndpoint(
                servers=[self.nats_server.url],
                user=SYSTEM_USER,
                password=self.nats_server.secrets.system_password,
            )
        settings = self.settings
        if settings.nats_system_user and settings.nats_system_password:
            return NatsEndpoint(
                servers=settings.external_nats,
                user=settings.nats_system_user,
                password=settings.nats_system_password,
            )
        return None

    async def stop(self) -> None:
        """Staged shutdown, each stage with a time limit: contexts, relay, NATS, database."""
        for module in reversed(self.modules):
            await _bounded(module.stop(), f"stop {module.name}")
        await _bounded(self.relay.stop(), "stop outbox relay")
        await _bounded(self.relay.publish_pending_quietly(), "flush outbox")
        if self._unfollow_log_level is not None:
            self._unfollow_log_level()
        await _bounded(self.live_config.stop(), "stop config watch")
        await _bounded(self.backbone.close(), "close NATS connection")
        if self.nats_server is not None:
            await _bounded(self.nats_server.stop(), "stop nats-server", timeout=15)
        await _bounded(self.database.dispose(), "close database")
        self.started = False

    def event_contracts(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Module name -> event type -> JSON Schema, of every module in this process."""
        return {module.name: dict(module.event_contracts) for module in self.modules}

    def api_client(self) -> httpx.AsyncClient:
        """A client of this platform's public API: in-process when the app is here."""
        if self._internal_key is None:
            self._internal_key = self.keys.create_in_memory(role=Role.admin, name="internal")
        key = self.settings.api_key or self._internal_key
        headers = {"Authorization": f"Bearer {key}"}
        if self.app is not None:
            transport = httpx.ASGITransport(app=self.app)
            return httpx.AsyncClient(
                transport=transport, base_url="http://fleetmesh.internal", headers=headers
            )
        base_url = self.settings.gateway_url or self.api_url
        return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30)

    async def _ensure_admin_key(self) -> None:
        """On first start, create an admin key and write it to a file only the owner can read."""
        path = self.settings.data_dir / ADMIN_KEY_FILE
        self.admin_key_path = path
        if path.exists() or await self.keys.count_active_admins() > 0:
            return
        _, plaintext = await self.keys.create(role=Role.admin, name="initial admin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(plaintext + "\n")
        self.admin_key_created = True


async def _bounded(awaitable: Awaitable[object], stage: str, *, timeout: float = 10.0) -> None:
    try:
        await asyncio.wait_for(awaitable, timeout)
    except Exception as error:
        log.warning("shutdown_stage_failed", stage=stage, error=repr(error))


def events_stream_config(settings: Settings) -> StreamConfig:
    return StreamConfig(
        name=EVENTS_STREAM,
        subjects=["events.>"],
        max_age=settings.event_retention_days * DAY_S,
        max_bytes=settings.event_retention_bytes,
        discard=DiscardPolicy.OLD,
        duplicate_window=120.0,
        allow_atomic=True,  # the outbox relay publishes in atomic batches
    )


def bootstrap(
    settings: Settings,
    *,
    contexts: list[str] | None = None,
    clock: Clock | None = None,
    database: Database | None = None,
) -> Platform:
    """Build a platform: embedded NATS unless `settings.nats` names external servers."""
    host = settings.host
    ports = Ports(
        http=choose_port(host, settings.http_port, DEFAULT_HTTP_PORT, what="HTTP"),
        nats=0,
        mqtt=0,
    )
    nats_server: EmbeddedNatsServer | None = None
    if settings.external_nats:
        endpoint = NatsEndpoint(
            servers=settings.external_nats,
            user=settings.nats_user,
            password=settings.nats_password,
            replicas=settings.nats_replicas,
        )
    else:
        ports.nats = choose_port(host, settings.nats_port, DEFAULT_NATS_PORT, what="NATS")
        ports.mqtt = choose_port(host, settings.mqtt_port, DEFAULT_MQTT_PORT, what="MQTT")
        nats_secrets = NatsSecrets.load_or_create(settings.data_dir / "nats" / "secrets.json")
        nats_server = EmbeddedNatsServer(
            data_dir=settings.data_dir,
            host=host,
            client_port=ports.nats,
            mqtt_port=ports.mqtt,
            nats_secrets=nats_secrets,
            ports_replaceable=not settings.nats_port and not settings.mqtt_port,
        )
        endpoint = NatsEndpoint(
            servers=[nats_server.url], user=SERVICE_USER, password=nats_secrets.service_password
        )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = database or Database(settings.sqlalchemy_url, shared_sqlite=settings.shared_sqlite)
    backbone = Backbone(endpoint)
    metrics = Metrics()
    selected = contexts or list(CONTEXTS)
    unknown = [name for name in selected if name not in CONTEXTS]
    if unknown:
        raise ValueError(f"unknown contexts {unknown}; known: {sorted(CONTEXTS)}")
    return Platform(
        settings=settings,
        database=database,
        backbone=backbone,
        metrics=metrics,
        clock=clock or SystemClock(),
        keys=ApiKeyStore(database),
        relay=OutboxRelay(database, backbone, metrics, poll_seconds=settings.outbox_poll_seconds),
        ports=ports,
        nats_server=nats_server,
        module_factories={name: CONTEXTS[name] for name in selected},
        live_config=LiveConfig(backbone),
    )


@contextlib.asynccontextmanager
async def running(
    settings: Settings, *, contexts: list[str] | None = None, clock: Clock | None = None
) -> AsyncIterator[Platform]:
    """Start a platform for the duration of a block (tests, benchmarks)."""
    platform = bootstrap(settings, contexts=contexts, clock=clock)
    await platform.start()
    try:
        yield platform
    finally:
        await platform.stop()
