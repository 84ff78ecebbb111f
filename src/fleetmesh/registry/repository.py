"""The registry's live state: the JetStream KV bucket `registry`, and a watched view of it.

`KvInstanceStore` writes instance documents with optimistic concurrency (the
KV revision: `kv.update(key, value, last=revision)`), so two registry
replicas, or two checkers, never overwrite each other's change unseen.

`RegistryView` is this process's copy of the whole bucket, fed by one KV watch.
Every read (discovery, listings, the checker's schedule) is served from it;
waiters for a service's next change (blocking queries, SSE streams) sleep on
an `asyncio.Condition` per service and are woken by the watch, so a change
made by any replica reaches them within milliseconds. Writes made here are
applied to the view at once as well (read-your-writes), and the revision
check makes the watch's later copy of the same write a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from fleetmesh.core.backbone import Backbone
from fleetmesh.core.blocking import IndexWaiters
from fleetmesh.core.clock import from_rfc3339, to_rfc3339
from fleetmesh.core.errors import Overloaded
from fleetmesh.core.logging import get_logger
from fleetmesh.registry.contracts import (
    HEARTBEAT_PREFIX,
    REGISTRY_BUCKET,
    heartbeat_key,
    instance_document,
    instance_from_document,
    kv_key,
    last_check_of,
    parse_kv_key,
)
from fleetmesh.registry.domain import ServiceInstance

log = get_logger(__name__)

KV_OPERATION = "KV-Operation"
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE_CODES = (10071, 10164)


class StaleRevision(Exception):
    """Someone else changed the instance since it was read: re-read and decide again."""


class RegistryUnavailable(Overloaded):
    """The KV store did not answer (NATS unreachable): 503 with Retry-After."""

    problem = "registry-unavailable"


@contextlib.contextmanager
def _kv_errors(action: str) -> Iterator[None]:
    try:
        yield
    except (
        StaleRevision,
        nats.js.errors.KeyNotFoundError,
        nats.js.errors.KeyWrongLastSequenceError,
    ):
        raise
    except (nats.errors.Error, TimeoutError) as error:
        raise RegistryUnavailable(f"The registry store could not {action}: {error!r}") from error


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """An instance document as stored, with the KV revision it was read at.

    `instance` is shared by every reader and must not be mutated; use
    `fresh()` for a private copy to apply domain commands to.
    """

    document: dict[str, Any]
    revision: int
    instance: ServiceInstance = field(compare=False)

    @classmethod
    def of(cls, document: dict[str, Any], revision: int) -> InstanceRecord:
        return cls(document, revision, instance_from_document(document))

    def fresh(self) -> ServiceInstance:
        return instance_from_document(self.document)

    @property
    def key(self) -> str:
        return kv_key(self.instance.service, self.instance.instance_id)

    @property
    def last_check_at(self) -> datetime | None:
        return last_check_of(self.document)

    @property
    def output(self) -> str:
        return str((self.document.get("health") or {}).get("output", ""))


class KvInstanceStore:
    """Reads and writes instance documents in the `registry` bucket."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self._kv: KeyValue | None = None

    async def open(self) -> KeyValue:
        self._kv = await self.backbone.ensure_kv(REGISTRY_BUCKET, history=1)
        return self._kv

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("registry store not opened")
        return self._kv

    async def get(self, service: str, instance_id: str) -> InstanceRecord | None:
        try:
            with _kv_errors("read"):
                entry = await self.kv.get(kv_key(service, instance_id))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        if entry.value is None or entry.revision is None:
            return None
        return InstanceRecord.of(json.loads(entry.value), entry.revision)

    async def put(
        self,
        instance: ServiceInstance,
        *,
        last_revision: int | None = None,
        last_check_at: datetime | None = None,
        output: str = "",
    ) -> InstanceRecord:
        """Write the document; with `last_revision` only over that revision, else StaleRevision."""
        document = instance_document(instance, last_check_at=last_check_at, output=output)
        payload = json.dumps(document, separators=(",", ":")).encode()
        key = kv_key(instance.service, instance.instance_id)
        try:
            with _kv_errors("write"):
                if last_revision is None:
                    revision = await self.kv.put(key, payload)
                else:
                    revision = await self.kv.update(key, payload, last=last_revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise StaleRevision(key) from None
        return InstanceRecord(document, revision, instance_from_document(document))

    async def delete(self, service: str, instance_id: str, *, last_revision: int) -> int:
        """Delete over exactly this revision; returns the revision of the delete marker."""
        key = kv_key(service, instance_id)
        headers = {KV_OPERATION: "DEL", EXPECTED_LAST_SUBJECT_SEQUENCE: str(last_revision)}
        try:
            with _kv_errors("delete"):
                ack = await self._js.publish(f"$KV.{REGISTRY_BUCKET}.{key}", b"", headers=headers)
        except RegistryUnavailable as error:
            cause = error.__cause__
            if isinstance(cause, nats.js.errors.APIError) and (
                cause.err_code in WRONG_LAST_SEQUENCE_CODES
            ):
                raise StaleRevision(key) from None
            raise
        with contextlib.suppress(Exception):
            await self.kv.purge(heartbeat_key(service, instance_id))
        return int(ack.seq)

    async def record_heartbeat(self, service: str, instance_id: str, at: datetime) -> None:
        payload = json.dumps({"at": to_rfc3339(at)}).encode()
        with _kv_errors("record the heartbeat"):
            await self.kv.put(heartbeat_key(service, instance_id), payload)

    @property
    def _js(self) -> JetStreamContext:
        return self.backbone.js


ChangeListener = Callable[[str], None]
"""Called with the KV key of an instance whose document or heartbeat changed."""


class RegistryView:
    """This process's watched copy of the registry bucket."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self._records: dict[str, InstanceRecord] = {}
        self._by_service: dict[str, set[str]] = {}
        self._revisions: dict[str, int] = {}
        self._heartbeats: dict[str, datetime] = {}
        self._waiters = IndexWaiters()
        self._listeners: list[ChangeListener] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------

    async def start(self, *, timeout: float = 10.0) -> None:
        self._task = asyncio.create_task(self._watch(), name="registry-view")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)

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

    def on_change(self, listener: ChangeListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    # -- reads -------------------------------------------------------------

    def get(self, key: str) -> InstanceRecord | None:
        return self._records.get(key)

    def find(self, service: str, instance_id: str) -> InstanceRecord | None:
        return self._records.get(kv_key(service, instance_id))

    def records(self, service: str) -> list[InstanceRecord]:
        keys = sorted(self._by_service.get(service, ()))
        return [self._records[key] for key in keys]

    def services(self) -> list[str]:
        return sorted(self._by_service)

    def index(self, service: str) -> int:
        """The highest KV revision of the service's keys, deletions included."""
        return self._waiters.index(service)

    def last_heartbeat(self, key: str) -> datetime | None:
        return self._heartbeats.get(key)

    def keys(self) -> Iterator[str]:
        return iter(list(self._records))

    async def wait_for_change(self, service: str, after: int, timeout: float) -> int:
        """Wait until the service's index passes `after` (or the timeout); returns the index."""
        return await self._waiters.wait(service, after, timeout)

    # -- writes ------------------------------------------------------------

    async def apply_record(self, record: InstanceRecord) -> None:
        """Take a write made here, ahead of the watch."""
        await self._apply_document(record.key, record.document, record.revision)

    async def apply_deletion(self, key: str, revision: int) -> None:
        await self._apply_deleted(key, revision)

    async def _apply_entry(self, entry: KeyValue.Entry) -> None:
        revision = entry.revision or 0
        deleted = entry.operation in ("DEL", "PURGE")
        if entry.key.startswith(HEARTBEAT_PREFIX):
            self._apply_heartbeat(entry.key.removeprefix(HEARTBEAT_PREFIX), entry.value, deleted)
            return
        if deleted or not entry.value:
            await self._apply_deleted(entry.key, revision)
            return
        try:
            document = json.loads(entry.value)
        except ValueError:
            log.warning("registry_document_unreadable", key=entry.key)
            return
        await self._apply_document(entry.key, document, revision)

    async def _apply_document(self, key: str, document: dict[str, Any], revision: int) -> None:
        parsed = parse_kv_key(key)
        if parsed is None or revision <= self._revisions.get(key, 0):
            return
        try:
            record = InstanceRecord.of(document, revision)
        except Exception as error:  # a document this version cannot read is skipped, not fatal
            log.warning("registry_document_invalid", key=key, error=repr(error))
            return
        service = parsed[0]
        self._records[key] = record
        self._by_service.setdefault(service, set()).add(key)
        await self._changed(service, key, revision)

    async def _apply_deleted(self, key: str, revision: int) -> None:
        parsed = parse_kv_key(key)
        if parsed is None or revision <= self._revisions.get(key, 0):
            return
        service = parsed[0]
        self._records.pop(key, None)
        keys = self._by_service.get(service)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_service[service]
        await self._changed(service, key, revision)

    def note_heartbeat(self, key: str, at: datetime) -> None:
        """Take a heartbeat recorded here (or seen by the watch); the latest one wins."""
        previous = self._heartbeats.get(key)
        self._heartbeats[key] = at if previous is None else max(previous, at)
        self._tell(key)

    def _apply_heartbeat(self, key: str, value: bytes | None, deleted: bool) -> None:
        if deleted or not value:
            self._heartbeats.pop(key, None)
            return
        try:
            at = from_rfc3339(json.loads(value)["at"])
        except (ValueError, KeyError, TypeError):
            log.warning("registry_heartbeat_unreadable", key=key)
            return
        self.note_heartbeat(key, at)

    async def _changed(self, service: str, key: str, revision: int) -> None:
        self._revisions[key] = revision
        self._tell(key)
        await self._waiters.advance(service, revision)

    def _tell(self, key: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(key)
            except Exception as error:  # one failing listener never stops the others
                log.warning("registry_listener_failed", error=repr(error))

    # -- the watch -----------------------------------------------------------

    async def _watch(self) -> None:
        backoff = 0.1
        while True:
            try:
                kv = await self.backbone.ensure_kv(REGISTRY_BUCKET, history=1)
                watcher = await kv.watchall()
                backoff = 0.1
                seen: set[str] | None = set()
                async for entry in watcher:
                    if entry is None:
                        if seen is not None:
                            await self._forget_unseen(seen)
                            seen = None
                        self._ready.set()
                        continue
                    if seen is not None:
                        seen.add(entry.key)
                    await self._apply_entry(entry)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("registry_watch_failed", error=repr(error), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)

    async def _forget_unseen(self, seen: set[str]) -> None:
        """After a (re)started watch's snapshot, drop records whose keys were purged meanwhile."""
        for key in [key for key in self._records if key not in seen]:
            await self._apply_deleted(key, self._revisions.get(key, 0) + 1)
