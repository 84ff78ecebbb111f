"""The health checker with an in-memory store: cheap at 1,000 instances, exact in effect."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from fleetmesh.core.envelope import CloudEvent
from fleetmesh.registry.checker import HealthChecker
from fleetmesh.registry.contracts import instance_document, instance_from_document, kv_key
from fleetmesh.registry.domain import CheckOutcome, HealthCheck, HealthState, ServiceInstance
from fleetmesh.registry.repository import InstanceRecord, RegistryView, StaleRevision
from fleetmesh.registry.service import RegistryService

pytestmark = pytest.mark.unit


class Clock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class MemoryStore:
    """The KV store's contract, in memory: revisions and conditional writes."""

    def __init__(self) -> None:
        self.revision = 0
        self.records: dict[str, InstanceRecord] = {}
        self.writes = 0

    async def put(
        self,
        instance: ServiceInstance,
        *,
        last_revision: int | None = None,
        last_check_at: datetime | None = None,
        output: str = "",
    ) -> InstanceRecord:
        key = kv_key(instance.service, instance.instance_id)
        current = self.records.get(key)
        if last_revision is not None and (current is None or current.revision != last_revision):
            raise StaleRevision(key)
        self.revision += 1
        self.writes += 1
        document = instance_document(instance, last_check_at=last_check_at, output=output)
        record = InstanceRecord(document, self.revision, instance_from_document(document))
        self.records[key] = record
        return record

    async def get(self, service: str, instance_id: str) -> InstanceRecord | None:
        return self.records.get(kv_key(service, instance_id))

    async def delete(self, service: str, instance_id: str, *, last_revision: int) -> int:
        key = kv_key(service, instance_id)
        if self.records[key].revision != last_revision:
            raise StaleRevision(key)
        del self.records[key]
        self.revision += 1
        return self.revision

    async def record_heartbeat(self, service: str, instance_id: str, at: datetime) -> None:
        return None


class Events:
    def __init__(self) -> None:
        self.published: list[CloudEvent] = []

    async def publish(self, events: list[CloudEvent]) -> None:
        self.published.extend(events)


class Prober:
    """Answers after a short delay; counts probes and the peak of probes in flight."""

    def __init__(self, outcome: CheckOutcome = CheckOutcome.SUCCESS) -> None:
        self.outcome = outcome
        self.probes: dict[str, int] = {}
        self.in_flight = 0
        self.peak = 0
        self.peak_tasks = 0

    async def probe(self, instance: ServiceInstance) -> tuple[CheckOutcome, str]:
        self.probes[instance.instance_id] = self.probes.get(instance.instance_id, 0) + 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.peak_tasks = max(self.peak_tasks, len(asyncio.all_tasks()))
        await asyncio.sleep(0.005)
        self.in_flight -= 1
        return self.outcome, self.outcome.value


def build(
    prober: Prober, concurrency: int
) -> tuple[RegistryView, MemoryStore, Events, HealthChecker]:
    view = RegistryView(backbone=None)  # type: ignore[arg-type]  # fed by hand, never started
    store, events = MemoryStore(), Events()
    service = RegistryService(
        store=store,  # type: ignore[arg-type]
        view=view,
        events=events,  # type: ignore[arg-type]
        clock=Clock(),
        probe=prober.probe,
    )
    checker = HealthChecker(view, service, prober, Clock(), concurrency=concurrency)  # type: ignore[arg-type]
    return view, store, events, checker


async def add(view: RegistryView, store: MemoryStore, instance_id: str, check: HealthCheck) -> None:
    instance = ServiceInstance(
        service="fleet",
        instance_id=instance_id,
        address="10.0.0.1",
        port=8080,
        registered_at=Clock().now(),
        check=check,
    )
    await view.apply_record(await store.put(instance, last_check_at=Clock().now()))


async def test_a_thousand_instances_cost_one_scheduler_and_bounded_probes() -> None:
    prober = Prober()
    view, store, _, checker = build(prober, concurrency=50)
    check = HealthCheck.http("/health", interval=0.5, timeout=0.1)
    for n in range(1000):
        await add(view, store, f"i-{n}", check)
    tasks_before = len(asyncio.all_tasks())
    started = time.monotonic()
    checker.start()
    try:
        # Until each instance was probed twice (a hang guard, not a speed check).
        for _ in range(3000):
            if min(prober.probes.get(f"i-{n}", 0) for n in range(1000)) >= 2:
                break
            await asyncio.sleep(0.01)
    finally:
        await checker.stop()
    elapsed = time.monotonic() - started
    counts = [prober.probes.get(f"i-{n}", 0) for n in range(1000)]
    assert min(counts) >= 2
    # Never more often than its interval allows, however the loop was scheduled.
    assert max(counts) <= elapsed / 0.5 + 1
    assert prober.peak <= 50
    # The scheduler, the probes in flight and a few finishing: nowhere near one task per instance.
    assert prober.peak_tasks <= tasks_before + 1 + 50 + 10
    assert store.writes == 1000  # passing results change nothing: no KV write


async def test_failures_turn_an_instance_critical_then_remove_it() -> None:
    prober = Prober(CheckOutcome.FAILURE)
    view, store, events, checker = build(prober, concurrency=4)
    check = HealthCheck.http(
        "/health",
        interval=0.1,
        timeout=0.05,
        failures_before_critical=2,
        deregister_critical_after=0.3,
    )
    await add(view, store, "doomed", check)
    checker.start()
    try:
        for _ in range(100):
            if not store.records:
                break
            await asyncio.sleep(0.02)
    finally:
        await checker.stop()
    assert not store.records
    assert view.find("fleet", "doomed") is None
    kinds = [event.type.rsplit(".", 2)[-2] for event in events.published]
    assert kinds == ["instance_health_changed", "instance_health_changed", "instance_deregistered"]
    states = [(e.data["previous"], e.data["current"]) for e in events.published[:2]]
    assert states == [("passing", "warning"), ("warning", "critical")]


async def test_a_ttl_instance_turns_critical_at_expiry_unless_heartbeats_arrive() -> None:
    view, store, events, checker = build(Prober(), concurrency=4)
    await add(view, store, "beating", HealthCheck.ttl_heartbeat(0.5))
    await add(view, store, "silent", HealthCheck.ttl_heartbeat(0.5))
    checker.start()
    try:
        for _ in range(8):
            await asyncio.sleep(0.1)
            view.note_heartbeat(kv_key("fleet", "beating"), Clock().now())
    finally:
        await checker.stop()
    states: dict[str, Any] = {
        record.instance.instance_id: record.instance.state for record in store.records.values()
    }
    assert states == {"beating": HealthState.PASSING, "silent": HealthState.CRITICAL}, states
    assert [e.subject for e in events.published] == ["fleet/silent"]
