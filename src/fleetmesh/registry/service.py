"""Use cases of the service registry: register, heartbeat, deregister, and the checker's results.

There is no SQL transaction here: the instance document in KV is the state, and
each write is conditional on the revision it was read at. Events are published
after the write (see `contracts`): at-least-once with dedup by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from fleetmesh.core.backbone import Backbone
from fleetmesh.core.clock import Clock, to_rfc3339
from fleetmesh.core.envelope import CloudEvent
from fleetmesh.core.errors import InvalidInput, NotFound
from fleetmesh.core.ids import new_id
from fleetmesh.core.logging import get_logger
from fleetmesh.registry import contracts
from fleetmesh.registry.domain import (
    DEFAULT_WEIGHT,
    INSTANCE_ID_PATTERN,
    CheckKind,
    CheckKindMismatch,
    CheckOutcome,
    HealthCheck,
    HealthState,
    ServiceInstance,
)
from fleetmesh.registry.repository import (
    InstanceRecord,
    KvInstanceStore,
    RegistryView,
    StaleRevision,
)

log = get_logger(__name__)

WRITE_ATTEMPTS = 5
Probe = Callable[[ServiceInstance], Awaitable[tuple[CheckOutcome, str]]]


class InstanceNotFound(NotFound):
    problem = "service-instance-not-found"


class HealthCheckFailed(InvalidInput):
    """The instance failed its health check at registration, so it was not registered.

    422 like any refused input (the client fixes the address, path or port, or
    starts the instance first); the problem type is `health-check-failed` and
    `check` carries what the probe saw.
    """

    problem = "health-check-failed"
    title = "Health check failed"

    def __init__(self, instance: ServiceInstance, outcome: CheckOutcome, output: str) -> None:
        super().__init__(
            f"{instance.qualified_id} was not registered: its {instance.check.kind} check "
            f"did not pass ({outcome}): {output}",
            extra={
                "check": {
                    **contracts.check_document(instance.check),
                    "outcome": outcome.value,
                    "output": output,
                }
            },
        )


class RegistryBusy(InvalidInput):
    """Too many concurrent writers kept changing the same instance."""

    status = 409
    problem = "registry-write-conflict"
    title = "Conflict"


@dataclass(frozen=True, slots=True)
class RegisterInstance:
    service: str
    address: str
    port: int
    check: HealthCheck
    instance_id: str | None = None
    version: str = ""
    zone: str = ""
    tags: Sequence[str] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    weight: int = DEFAULT_WEIGHT

    def resolved_id(self) -> str:
        """The given id, or `address:port` when that is a valid id (so re-registering replaces)."""
        if self.instance_id:
            return self.instance_id
        candidate = re.sub(r"[^A-Za-z0-9._:-]", "-", f"{self.address}:{self.port}")
        return candidate if INSTANCE_ID_PATTERN.fullmatch(candidate) else new_id().lower()


@dataclass(frozen=True, slots=True)
class Registered:
    record: InstanceRecord
    replaced: bool


class EventPublisher:
    """Publishes registry events to JetStream; failures are retried with the same id."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self._retry: asyncio.Queue[CloudEvent] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._retry_loop(), name="registry-events")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while not self._retry.empty():
            with contextlib.suppress(Exception):
                await self._send(self._retry.get_nowait())

    async def publish(self, events: Sequence[CloudEvent]) -> None:
        for event in events:
            try:
                await self._send(event)
            except Exception as error:
                log.warning("registry_event_deferred", type=event.type, error=repr(error))
                self._retry.put_nowait(event)

    async def _send(self, event: CloudEvent) -> None:
        await self.backbone.publish(event.nats_subject, event.to_json(), msg_id=event.id, timeout=5)

    async def _retry_loop(self) -> None:
        delay = 0.2
        while True:
            event = await self._retry.get()
            try:
                await self._send(event)
                delay = 0.2
            except Exception:
                self._retry.put_nowait(event)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)


class RegistryService:
    """The registry's commands; reads go to the view, writes to KV then the view."""

    def __init__(
        self,
        *,
        store: KvInstanceStore,
        view: RegistryView,
        events: EventPublisher,
        clock: Clock,
        probe: Probe,
    ) -> None:
        self.store = store
        self.view = view
        self.events = events
        self.clock = clock
        self.probe = probe

    async def register(self, command: RegisterInstance) -> Registered:
        """Validate, run the check once, then store the instance (replacing an earlier one)."""
        now = self.clock.now()
        instance = ServiceInstance(
            service=command.service,
            instance_id=command.resolved_id(),
            address=command.address,
            port=command.port,
            registered_at=now,
            check=command.check,
            version=command.version,
            zone=command.zone,
            tags=tuple(command.tags),
            metadata=dict(command.metadata),
            weight=command.weight,
        )
        outcome, output = await self.probe(instance)
        if outcome is not CheckOutcome.SUCCESS:
            raise HealthCheckFailed(instance, outcome, output)
        previous = await self.store.get(instance.service, instance.instance_id)
        record = await self.store.put(instance, last_check_at=self.clock.now(), output=output)
        await self.view.apply_record(record)
        await self.events.publish([contracts.registered(instance)])
        return Registered(record, replaced=previous is not None)

    async def heartbeat(self, service: str, instance_id: str) -> InstanceRecord:
        """A TTL heartbeat: recorded apart; the document changes only if the health does."""
        record = await self._require(service, instance_id)
        if record.instance.check.is_active:
            raise CheckKindMismatch(
                f"{record.instance.qualified_id} uses an active {record.instance.check.kind} "
                "check: heartbeats are only for TTL checks"
            )
        now = self.clock.now()
        await self.store.record_heartbeat(service, instance_id, now)
        self.view.note_heartbeat(record.key, now)
        for _ in range(WRITE_ATTEMPTS):
            if record.instance.state is HealthState.PASSING:
                return record
            instance = record.fresh()
            instance.heartbeat(now)
            try:
                updated = await self.store.put(instance, last_revision=record.revision)
            except StaleRevision:
                record = await self._require(service, instance_id)
                continue
            await self.view.apply_record(updated)
            await self.events.publish([contracts.health_changed(e) for e in instance.events])
            return updated
        raise RegistryBusy(f"{service}/{instance_id} kept changing; retry the heartbeat")

    async def deregister(self, service: str, instance_id: str, *, reason: str) -> ServiceInstance:
        """Remove an instance at once (404 if unknown)."""
        for _ in range(WRITE_ATTEMPTS):
            record = await self._require(service, instance_id)
            try:
                await self._delete(record, reason=reason)
            except StaleRevision:
                continue
            return record.instance
        raise RegistryBusy(f"{service}/{instance_id} kept changing; retry the deregistration")

    # -- what the checker found ----------------------------------------------

    async def apply_check(
        self, record: InstanceRecord, outcome: CheckOutcome, output: str, *, now: datetime
    ) -> InstanceRecord | None:
        """Apply a probe result; writes only when the health changed. None if the write lost."""
        instance = record.fresh()
        before = (instance.state, instance.consecutive_failures)
        instance.apply_check_result(outcome, now)
        if (instance.state, instance.consecutive_failures) == before:
            return record
        try:
            updated = await self.store.put(
                instance, last_revision=record.revision, last_check_at=now, output=output
            )
        except StaleRevision:
            return None
        await self.view.apply_record(updated)
        await self.events.publish([contracts.health_changed(e) for e in instance.events])
        return updated

    async def expire_ttl(
        self, record: InstanceRecord, heartbeat: datetime | None, *, now: datetime
    ) -> None:
        """Turn a TTL instance critical once its last heartbeat is older than the TTL."""
        instance = record.fresh()
        if heartbeat is not None and (
            instance.last_heartbeat is None or heartbeat > instance.last_heartbeat
        ):
            instance.last_heartbeat = heartbeat
        if instance.check_ttl(now) is not HealthState.CRITICAL or not instance.events:
            return
        with contextlib.suppress(StaleRevision):
            updated = await self.store.put(
                instance, last_revision=record.revision, output="TTL expired"
            )
            await self.view.apply_record(updated)
            await self.events.publish([contracts.health_changed(e) for e in instance.events])

    async def remove_critical(self, record: InstanceRecord, *, now: datetime) -> None:
        """Deregister an instance critical for longer than its `deregister_critical_after`."""
        after = record.instance.check.deregister_critical_after
        with contextlib.suppress(StaleRevision):
            await self._delete(record, reason=f"critical for more than {after:g}s", at=now)

    # -- internals -------------------------------------------------------------

    async def _require(self, service: str, instance_id: str) -> InstanceRecord:
        record = await self.store.get(service, instance_id)
        if record is None:
            raise InstanceNotFound(f"Service {service!r} has no instance {instance_id!r}.")
        return record

    async def _delete(
        self, record: InstanceRecord, *, reason: str, at: datetime | None = None
    ) -> None:
        instance = record.instance
        revision = await self.store.delete(
            instance.service, instance.instance_id, last_revision=record.revision
        )
        await self.view.apply_deletion(record.key, revision)
        event = contracts.deregistered(instance, at=at or self.clock.now(), reason=reason)
        await self.events.publish([event])


# -- reads --------------------------------------------------------------------


def effective_health(
    record: InstanceRecord, heartbeat: datetime | None, now: datetime
) -> tuple[HealthState, datetime | None, datetime | None]:
    """State, critical-since and last heartbeat as of `now`, TTL expiry and heartbeats included."""
    instance = record.instance
    last_beat = instance.last_heartbeat
    if heartbeat is not None and (last_beat is None or heartbeat > last_beat):
        last_beat = heartbeat
    if instance.state is HealthState.CRITICAL:
        return instance.state, instance.critical_since, last_beat
    if instance.check.kind is CheckKind.TTL and last_beat is not None:
        expires = last_beat + timedelta(seconds=instance.check.interval)
        if now > expires:
            return HealthState.CRITICAL, expires, last_beat
    return instance.state, None, last_beat


def public_document(
    record: InstanceRecord, heartbeat: datetime | None, now: datetime
) -> dict[str, Any]:
    """The instance as discovery shows it: the stored document with its health as of now."""
    state, critical_since, last_beat = effective_health(record, heartbeat, now)
    health = dict(record.document.get("health") or {})
    health.update(
        state=state.value,
        critical_since=None if critical_since is None else to_rfc3339(critical_since),
        last_heartbeat=None if last_beat is None else to_rfc3339(last_beat),
    )
    return {**record.document, "health": health, "revision": record.revision}


@dataclass(frozen=True, slots=True)
class Discovery:
    service: str
    index: int
    instances: list[dict[str, Any]]


class RegistryQueries:
    """Discovery and listings, from this process's view."""

    def __init__(self, view: RegistryView, clock: Clock) -> None:
        self.view = view
        self.clock = clock

    def discover(
        self,
        service: str,
        *,
        healthy: bool = True,
        tag: str | None = None,
        zone: str | None = None,
    ) -> Discovery:
        now = self.clock.now()
        documents = []
        for record in self.view.records(service):
            instance = record.instance
            if tag is not None and tag not in instance.tags:
                continue
            if zone is not None and instance.zone != zone:
                continue
            document = public_document(record, self.view.last_heartbeat(record.key), now)
            if healthy and document["health"]["state"] == HealthState.CRITICAL.value:
                continue
            documents.append(document)
        return Discovery(service, self.view.index(service), documents)

    def instance(self, service: str, instance_id: str) -> dict[str, Any]:
        record = self.view.find(service, instance_id)
        if record is None:
            raise InstanceNotFound(f"Service {service!r} has no instance {instance_id!r}.")
        return public_document(record, self.view.last_heartbeat(record.key), self.clock.now())

    def summary(self) -> list[dict[str, Any]]:
        """Every service with its instance counts by health."""
        now = self.clock.now()
        rows = []
        for service in self.view.services():
            counts = {state.value: 0 for state in HealthState}
            records = self.view.records(service)
            for record in records:
                state, _, _ = effective_health(record, self.view.last_heartbeat(record.key), now)
                counts[state.value] += 1
            rows.append(
                {
                    "name": service,
                    "instances": len(records),
                    **counts,
                    "index": self.view.index(service),
                }
            )
        return rows
