"""Builds the configuration center, and applies fleetmesh's own live settings here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fleetmesh.config.api import create_router
from fleetmesh.config.service import ConfigQueries, ConfigUnitOfWork, ConfigWatch, KvMirror
from fleetmesh.core.logging import get_logger, set_log_level
from fleetmesh.core.module import Deps, Module

NAME = "config"
PLATFORM_SERVICE = "platform"
LOG_LEVEL_KEY = "log_level"

log = get_logger(__name__)


def log_level_listener(default_level: str) -> Callable[[Any], None]:
    """`platform`/`log_level` -> the process's log level; a deletion restores the default."""

    def apply(value: Any) -> None:
        level = default_level if value is None else str(value)
        try:
            set_log_level(level)
        except ValueError:
            log.warning("config_log_level_ignored", value=value)
            return
        log.info("log_level_changed", level=level.upper())

    return apply


def create_module(deps: Deps) -> Module:
    queries = ConfigQueries(deps.database)
    mirror = KvMirror(deps.backbone, queries)
    watch = ConfigWatch(deps.backbone)
    unsubscribe: list[Callable[[], None]] = []

    def uow_factory() -> ConfigUnitOfWork:
        return ConfigUnitOfWork(deps.database, on_commit=deps.on_commit)

    router = create_router(
        uow_factory=uow_factory, queries=queries, mirror=mirror, watch=watch, clock=deps.clock
    )

    async def start() -> None:
        await mirror.start()
        await watch.start()
        listener = log_level_listener(deps.settings.log_level)
        unsubscribe.append(deps.live_config.on_change(PLATFORM_SERVICE, LOG_LEVEL_KEY, listener))
        current = deps.live_config.get(PLATFORM_SERVICE, LOG_LEVEL_KEY)
        if current is not None:
            listener(current)

    async def stop() -> None:
        while unsubscribe:
            unsubscribe.pop()()
        await watch.stop()
        await mirror.stop()

    return Module(
        name=NAME,
        routers=[router],
        start=start,
        stop=stop,
        provides={"config_mirror": mirror, "config_watch": watch},
    )
