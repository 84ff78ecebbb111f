"""Live settings of fleetmesh's own services, read from the configuration center.

The configuration center (the `config` context) keeps the current value of
every entry in the JetStream KV bucket `config`, under the key
`<namespace>.<service>.<key>`, as JSON `{"version": N, "value": ...}` (a
published contract, so every context can read its settings without importing
the config context). This reader keeps a local cache fed by a KV watch: a
change takes effect within milliseconds, and if NATS is briefly unreachable
the last known values keep being served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleetmesh.core.backbone import Backbone
from fleetmesh.core.logging import get_logger, set_log_level

log = get_logger(__name__)

CONFIG_BUCKET = "config"
DEFAULT_NAMESPACE = "default"

Listener = Callable[[Any], None]


def config_kv_key(service: str, key: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    return f"{namespace}.{service}.{key}"


@dataclass(frozen=True, slots=True)
class CachedValue:
    version: int
    value: Any
    deleted: bool = False


class LiveConfig:
    """A watched, cached view of the `config` KV bucket."""

    def __init__(self, backbone: Backbone, *, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.backbone = backbone
        self.namespace = namespace
        self._values: dict[str, CachedValue] = {}
        self._listeners: dict[str, list[Listener]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        await self.backbone.ensure_kv(CONFIG_BUCKET, history=1)
        self._task = asyncio.create_task(self._watch(), name="live-config")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), 5)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def get(self, service: str, key: str, default: Any = None) -> Any:
        cached = self._values.get(config_kv_key(service, key, self.namespace))
        if cached is None or cached.deleted:
            return default
        return cached.value

    def on_change(self, service: str, key: str, listener: Listener) -> Callable[[], None]:
        """Call `listener(new_value)` on every change; returns the unsubscribe function."""
        name = config_kv_key(service, key, self.namespace)
        self._listeners.setdefault(name, []).append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners[name].remove(listener)

        return unsubscribe

    def apply(self, kv_key: str, raw: bytes | None, *, deleted: bool = False) -> bool:
        """Take one update from the bucket; older versions never replace newer ones."""
        if deleted or raw is None:
            previous = self._values.get(kv_key)
            self._values[kv_key] = CachedValue(
                (previous.version if previous else 0) + 1, None, True
            )
            self._notify(kv_key, None)
            return True
        try:
            document = json.loads(raw)
            update = CachedValue(int(document["version"]), document.get("value"))
        except (ValueError, KeyError, TypeError):
            log.warning("config_value_unreadable", key=kv_key)
            return False
        current = self._values.get(kv_key)
        if current is not None and current.version >= update.version and not current.deleted:
            return False
        self._values[kv_key] = update
        self._notify(kv_key, update.value)
        return True

    def _notify(self, kv_key: str, value: Any) -> None:
        for listener in list(self._listeners.get(kv_key, [])):
            try:
                listener(value)
            except Exception as error:  # one failing listener never stops the others
                log.warning("config_listener_failed", key=kv_key, error=repr(error))

    async def _watch(self) -> None:
        backoff = 0.1
        while True:
            try:
                kv = await self.backbone.js.key_value(CONFIG_BUCKET)
                watcher = await kv.watchall()
                backoff = 0.1
                async for entry in watcher:
                    if entry is None:
                        self._ready.set()
                        continue
                    self.apply(entry.key, entry.value, deleted=entry.operation in ("DEL", "PURGE"))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("config_watch_failed", error=repr(error), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)


PLATFORM_SERVICE = "platform"
LOG_LEVEL_KEY = "log_level"


def follow_log_level(live_config: LiveConfig, default_level: str) -> Callable[[], None]:
    """Apply `platform`/`log_level` to this process, now and on every change (a deletion
    restores `default_level`); returns the function that stops following."""

    def apply(value: Any) -> None:
        level = default_level if value is None else str(value)
        try:
            set_log_level(level)
        except ValueError:
            log.warning("config_log_level_ignored", value=value)
            return
        log.info("log_level_changed", level=level.upper())

    unsubscribe = live_config.on_change(PLATFORM_SERVICE, LOG_LEVEL_KEY, apply)
    current = live_config.get(PLATFORM_SERVICE, LOG_LEVEL_KEY)
    if current is not None:
        apply(current)
    return unsubscribe
