"""Use cases of the configuration center, the KV mirror of current values, and its watch.

Every change is one transaction: the new version row, the entry's current
version, and `fleetmesh.config.changed.v1` in the outbox. After the commit the
current value is mirrored to the KV bucket `config` (see `contracts`), which is
what running services read through `LiveConfig`. A mirror write that fails is
queued for the reconciler, which also re-mirrors every entry at start, so a
crash between the commit and the KV write heals on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass

import nats.js.errors
from nats.js.kv import KeyValue
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.config import contracts
from fleetmesh.config.domain import (
    ConfigChanged,
    ConfigEntry,
    ConfigNotFound,
    ConfigRef,
    ConfigVersion,
    InvalidSchema,
    JsonSchema,
    JsonValue,
)
from fleetmesh.config.repository import (
    ConcurrentChange,
    ConfigReads,
    LatestVersion,
    SqlConfigRepository,
)
from fleetmesh.core.backbone import Backbone
from fleetmesh.core.blocking import IndexWaiters
from fleetmesh.core.clock import Clock
from fleetmesh.core.database import Database
from fleetmesh.core.errors import Conflict, FieldError
from fleetmesh.core.live_config import CONFIG_BUCKET, config_kv_key
from fleetmesh.core.logging import get_logger
from fleetmesh.core.uow import SqlUnitOfWork

log = get_logger(__name__)

WRITE_ATTEMPTS = 5
KV_OPERATION = "KV-Operation"
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE_CODES = (10071, 10164)
RECONCILE_EVERY_S = 60.0


class ConfigUnitOfWork(SqlUnitOfWork):
    configs: SqlConfigRepository

    def _open(self, session: AsyncSession) -> None:
        self.configs = SqlConfigRepository(session)


UnitOfWorkFactory = Callable[[], ConfigUnitOfWork]


class ConfigBusy(Conflict):
    problem = "config-write-conflict"


@dataclass(frozen=True, slots=True)
class Change:
    """The result of a change: the entry's new version (None for a schema-only change)."""

    ref: ConfigRef
    version: ConfigVersion | None
    schema: JsonSchema | None


_KEEP = object()
"""`SetConfig.schema` default: leave the entry's schema as it is."""


@dataclass(frozen=True, slots=True)
class SetConfig:
    ref: ConfigRef
    value: JsonValue
    author: str
    comment: str = ""
    schema: object = _KEEP
    expected_version: int | None = None


@dataclass(frozen=True, slots=True)
class RollbackConfig:
    ref: ConfigRef
    to_version: int
    author: str
    reason: str = ""
    expected_version: int | None = None


@dataclass(frozen=True, slots=True)
class DeleteConfig:
    ref: ConfigRef
    author: str
    comment: str = ""
    expected_version: int | None = None


@dataclass(frozen=True, slots=True)
class SetSchema:
    ref: ConfigRef
    schema: JsonSchema | None
    author: str


Command = SetConfig | RollbackConfig | DeleteConfig | SetSchema


def _apply(command: Command, entry: ConfigEntry, clock: Clock) -> None:
    now = clock.now()
    match command:
        case SetConfig():
            if command.schema is not _KEEP:
                # The new value is checked against the new schema, not the old one.
                entry.set_schema(None, author=command.author, now=now)
            entry.set(
                command.value,
                author=command.author,
                now=now,
                comment=command.comment,
                expected_version=command.expected_version,
            )
            if command.schema is not _KEEP:
                entry.set_schema(_as_schema(command.schema), author=command.author, now=now)
        case RollbackConfig():
            entry.rollback(
                command.to_version,
                author=command.author,
                now=now,
                reason=command.reason,
                expected_version=command.expected_version,
            )
        case DeleteConfig():
            entry.delete(
                author=command.author,
                now=now,
                comment=command.comment,
                expected_version=command.expected_version,
            )
        case SetSchema():
            entry.set_schema(command.schema, author=command.author, now=now)


def _as_schema(value: object) -> JsonSchema | None:
    if value is None or isinstance(value, bool | dict):
        return value
    raise InvalidSchema([FieldError("", "a JSON Schema is an object or a boolean", "schema")])


async def change_config(
    command: Command, *, uow_factory: UnitOfWorkFactory, clock: Clock, mirror: KvMirror
) -> Change:
    """Apply one change in a transaction (retried on a concurrent writer), then mirror it."""
    for attempt in range(WRITE_ATTEMPTS):
        try:
            change = await _change_once(command, uow_factory(), clock)
        except (ConcurrentChange, IntegrityError):
            await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))
            continue
        if change.version is not None:
            await mirror.publish(
                LatestVersion(change.ref, change.version.version, change.version.value_json)
            )
        return change
    raise ConfigBusy(f"{command.ref} kept changing under concurrent writers; retry.")


async def _change_once(command: Command, uow: ConfigUnitOfWork, clock: Clock) -> Change:
    async with uow:
        entry = await uow.configs.get(command.ref)
        loaded = None if entry is None else entry.current_version
        if entry is None:
            entry = ConfigEntry(ref=command.ref)
        if isinstance(command, DeleteConfig | RollbackConfig) and loaded is None:
            raise ConfigNotFound(f"{command.ref} has no value")
        before = entry.current_version
        _apply(command, entry, clock)
        for event in entry.events:
            if isinstance(event, ConfigChanged):
                uow.emit(contracts.changed(event))
        await uow.configs.save(entry, loaded_version=loaded, now=clock.now())
        await uow.commit()
    version = entry.history()[-1] if entry.current_version > before else None
    return Change(command.ref, version, entry.schema)


class ConfigQueries:
    """Reads that change nothing."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def current(self, ref: ConfigRef) -> ConfigVersion | None:
        async with self.database.session() as session:
            return await ConfigReads(session).version(ref)

    async def require_value(self, ref: ConfigRef) -> ConfigVersion:
        version = await self.current(ref)
        if version is None or version.deleted:
            raise ConfigNotFound(f"{ref} has no value", extra={"version": _number(version)})
        return version

    async def schema(self, ref: ConfigRef) -> JsonSchema | None:
        async with self.database.session() as session:
            exists, schema = await ConfigReads(session).schema(ref)
        if not exists:
            raise ConfigNotFound(f"{ref} does not exist")
        return schema  # type: ignore[no-any-return]

    async def history(
        self, ref: ConfigRef, *, before: int | None, limit: int
    ) -> list[ConfigVersion]:
        async with self.database.session() as session:
            return await ConfigReads(session).history(ref, before=before, limit=limit)

    async def entries(self, *, namespace: str, service: str | None) -> list[tuple[ConfigRef, int]]:
        async with self.database.session() as session:
            return await ConfigReads(session).entries(namespace=namespace, service=service)

    async def latest_all(self) -> list[LatestVersion]:
        async with self.database.session() as session:
            return await ConfigReads(session).latest_all()


def _number(version: ConfigVersion | None) -> int:
    return 0 if version is None else version.version


class KvMirror:
    """Keeps the `config` bucket at the latest committed version of every entry."""

    def __init__(self, backbone: Backbone, queries: ConfigQueries) -> None:
        self.backbone = backbone
        self.queries = queries
        self._kv: KeyValue | None = None
        self._pending: dict[ConfigRef, LatestVersion] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        self._kv = await self.backbone.ensure_kv(CONFIG_BUCKET, history=1)
        try:
            await self.reconcile()
        except Exception as error:  # NATS or the database not ready: the loop retries
            log.warning("config_mirror_reconcile_failed", error=repr(error))
            self._wakeup.set()
        self._task = asyncio.create_task(self._run(), name="config-mirror")

    async def stop(self) -> None:
        # The flag as well as the cancel: a cancel that lands as the wait ends can be lost.
        self._stopping = True
        self._wakeup.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def publish(self, latest: LatestVersion) -> bool:
        """Mirror one version now; on failure the reconciler retries it."""
        try:
            await self._write(latest)
        except Exception as error:
            log.warning("config_mirror_deferred", ref=str(latest.ref), error=repr(error))
            self._pending[latest.ref] = latest
            self._wakeup.set()
            return False
        return True

    async def reconcile(self) -> int:
        """Re-mirror every entry whose KV copy is behind SQL; returns how many were written."""
        known = await self._kv_versions()
        written = 0
        for latest in await self.queries.latest_all():
            key = config_kv_key(latest.ref.service, latest.ref.key, latest.ref.namespace)
            if known.get(key, 0) < latest.version:
                await self._write(latest)
                written += 1
        if written:
            log.info("config_mirror_reconciled", written=written)
        return written

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), RECONCILE_EVERY_S)
            self._wakeup.clear()
            if self._stopping:
                return
            try:
                for ref, latest in list(self._pending.items()):
                    await self._write(latest)
                    self._pending.pop(ref, None)
                await self.reconcile()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as error:
                failures += 1
                delay = min(5.0, 0.2 * 2**failures)
                log.warning("config_mirror_failed", error=repr(error), retry_in_s=delay)
                await asyncio.sleep(delay)
                self._wakeup.set()

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("config mirror not started")
        return self._kv

    async def _kv_versions(self) -> dict[str, int]:
        versions: dict[str, int] = {}
        watcher = await self.kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    break
                versions[entry.key] = contracts.kv_version(entry.value)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return versions

    async def _write(self, latest: LatestVersion) -> None:
        """Move the KV copy forward to this version, never backward (compare-and-set loop)."""
        ref = latest.ref
        key = config_kv_key(ref.service, ref.key, ref.namespace)
        for _ in range(WRITE_ATTEMPTS):
            revision, current = await self._read(key)
            if current >= latest.version:
                return
            try:
                if latest.value_json is None:
                    await self._delete(key, latest.version, revision)
                else:
                    payload = contracts.kv_value(latest.version, latest.value_json)
                    await self.kv.update(key, payload, last=revision)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        raise ConfigBusy(f"the KV copy of {ref} kept changing")

    async def _read(self, key: str) -> tuple[int, int]:
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError as missing:
            deleted = missing.entry
            if deleted is None:
                return 0, 0
            return deleted.revision or 0, contracts.kv_version(deleted.value)
        return entry.revision or 0, contracts.kv_version(entry.value)

    async def _delete(self, key: str, version: int, revision: int) -> None:
        headers = {KV_OPERATION: "DEL", EXPECTED_LAST_SUBJECT_SEQUENCE: str(revision)}
        try:
            await self.backbone.js.publish(
                f"$KV.{CONFIG_BUCKET}.{key}", contracts.kv_tombstone(version), headers=headers
            )
        except nats.js.errors.APIError as error:
            if error.err_code in WRONG_LAST_SEQUENCE_CODES:
                raise nats.js.errors.KeyWrongLastSequenceError(error.description) from None
            raise


class ConfigWatch:
    """One watch of the `config` bucket per process; waiters sleep on a Condition per key."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self._waiters = IndexWaiters()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="config-watch")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), 10)

    async def stop(self) -> None:
        await self._waiters.close()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def closed(self) -> bool:
        return self._waiters.closed

    def version(self, ref: ConfigRef) -> int:
        return self._waiters.index(config_kv_key(ref.service, ref.key, ref.namespace))

    async def wait(self, ref: ConfigRef, after: int, timeout: float) -> int:
        """Wait until the mirrored version passes `after` (or the timeout)."""
        key = config_kv_key(ref.service, ref.key, ref.namespace)
        return await self._waiters.wait(key, after, timeout)

    async def _watch(self) -> None:
        backoff = 0.1
        while True:
            try:
                kv = await self.backbone.ensure_kv(CONFIG_BUCKET, history=1)
                watcher = await kv.watchall()
                backoff = 0.1
                async for entry in watcher:
                    if entry is None:
                        self._ready.set()
                        continue
                    await self._waiters.advance(entry.key, contracts.kv_version(entry.value))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("config_watch_failed", error=repr(error), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
