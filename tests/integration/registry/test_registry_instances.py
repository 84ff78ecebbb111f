"""The service registry over HTTP with the real backbone: registration, health, discovery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from fleetmesh.bootstrap import Platform
from fleetmesh.core.auth import Role
from fleetmesh.registry.repository import KvInstanceStore, RegistryView, StaleRevision

pytestmark = pytest.mark.integration

FAST_HTTP = {"kind": "http", "http_path": "/health", "interval": 0.2, "timeout": 0.1}


async def eventually(
    probe: Callable[[], Awaitable[Any]], *, timeout: float = 5.0, every: float = 0.05
) -> Any:
    """The first truthy result of `probe`, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s (last: {result!r})")
        await asyncio.sleep(every)


async def instances(client: httpx.AsyncClient, service: str, **params: Any) -> list[dict[str, Any]]:
    response = await client.get(f"/api/v1/services/{service}/instances", params=params)
    assert response.status_code == 200, response.text
    return list(response.json()["instances"])


async def event_types(
    client: httpx.AsyncClient, event_type: str, at_least: int = 1
) -> list[dict[str, Any]]:
    """The events of this type on the bus once there are `at_least` of them, else []."""
    body = (await client.get("/api/v1/events", params={"type": event_type})).json()
    return list(body["items"]) if len(body["items"]) >= at_least else []


async def test_registration_is_refused_when_invalid_or_when_the_health_check_fails(
    sqlite_client: httpx.AsyncClient, fake_instance: Any
) -> None:
    fake_instance.status = 503
    refused = await sqlite_client.post(
        "/api/v1/services/billing/instances",
        json={
            "instance_id": "b-1",
            "address": "127.0.0.1",
            "port": fake_instance.port,
            "check": FAST_HTTP,
        },
    )
    assert refused.status_code == 422
    problem = refused.json()
    assert problem["type"].endswith("/health-check-failed")
    assert problem["check"]["outcome"] == "failure"
    assert "HTTP 503" in problem["check"]["output"]

    await fake_instance.stop()
    tcp = await sqlite_client.post(
        "/api/v1/services/billing/instances",
        json={"address": "127.0.0.1", "port": fake_instance.port, "check": {"kind": "tcp"}},
    )
    assert tcp.status_code == 422
    assert tcp.json()["type"].endswith("/health-check-failed")
    assert await instances(sqlite_client, "billing", healthy=False) == []

    bad = await sqlite_client.post(
        "/api/v1/services/Bad_Name/instances",
        json={
            "address": "not a host",
            "port": 70000,
            "weight": 0,
            "check": {"kind": "http", "interval": 1, "timeout": 2},
        },
    )
    assert bad.status_code == 422
    fields = {error["field"] for error in bad.json()["errors"]}
    assert {"service", "address", "port", "weight", "check.interval"} <= fields
    typed = await sqlite_client.post(
        "/api/v1/services/ok/instances", json={"address": "127.0.0.1", "port": "eighty"}
    )
    assert typed.status_code == 422
    assert typed.json()["errors"][0]["field"] == "port"


async def test_register_discover_heartbeat_and_deregister(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient, fake_instance: Any
) -> None:
    http_instance = {
        "instance_id": "api-1",
        "address": "127.0.0.1",
        "port": fake_instance.port,
        "zone": "eu-west",
        "tags": ["v2", "edge"],
        "check": {"kind": "http", "http_path": "/health", "interval": 5, "timeout": 1},
    }
    created = await sqlite_client.post("/api/v1/services/api/instances", json=http_instance)
    assert created.status_code == 201, created.text
    assert created.headers["Location"] == "/api/v1/services/api/instances/api-1"
    assert created.json()["health"]["state"] == "passing"
    ttl_instance = {
        "instance_id": "api-2.local:9000",
        "address": "127.0.0.1",
        "port": 9000,
        "zone": "us-east",
        "check": {"kind": "ttl", "ttl": 30},
    }
    assert (
        await sqlite_client.post("/api/v1/services/api/instances", json=ttl_instance)
    ).status_code == 201
    again = await sqlite_client.post("/api/v1/services/api/instances", json=ttl_instance)
    assert again.status_code == 200  # re-registering replaces

    found = await instances(sqlite_client, "api")
    assert sorted(i["instance_id"] for i in found) == ["api-1", "api-2.local:9000"]
    assert [i["instance_id"] for i in await instances(sqlite_client, "api", tag="edge")] == [
        "api-1"
    ]
    assert [i["instance_id"] for i in await instances(sqlite_client, "api", zone="us-east")] == [
        "api-2.local:9000"
    ]
    services = (await sqlite_client.get("/api/v1/services")).json()["services"]
    assert services == [
        {
            "name": "api",
            "instances": 2,
            "passing": 2,
            "warning": 0,
            "critical": 0,
            "index": services[0]["index"],
        }
    ]

    beat = await sqlite_client.put("/api/v1/services/api/instances/api-2.local:9000/heartbeat")
    assert beat.status_code == 200
    assert beat.json()["health"]["last_heartbeat"] > beat.json()["registered_at"]
    wrong_kind = await sqlite_client.put("/api/v1/services/api/instances/api-1/heartbeat")
    assert wrong_kind.status_code == 409
    unknown = await sqlite_client.put("/api/v1/services/api/instances/nope/heartbeat")
    assert unknown.status_code == 404

    removed = await sqlite_client.delete("/api/v1/services/api/instances/api-1")
    assert removed.status_code == 200
    assert (await sqlite_client.delete("/api/v1/services/api/instances/api-1")).status_code == 404
    assert [i["instance_id"] for i in await instances(sqlite_client, "api")] == ["api-2.local:9000"]

    registered = await eventually(
        lambda: event_types(sqlite_client, "fleetmesh.registry.instance_registered.v1", 3)
    )
    assert {e["subject"] for e in registered} == {"api/api-1", "api/api-2.local:9000"}
    gone = await eventually(
        lambda: event_types(sqlite_client, "fleetmesh.registry.instance_deregistered.v1")
    )
    assert gone[0]["data"]["reason"] == "deregistered by initial admin"

    _, viewer_key = await sqlite_platform.keys.create(role=Role.viewer, name="viewer")
    headers = {"Authorization": f"Bearer {viewer_key}"}
    listed = await sqlite_client.get("/api/v1/services", headers=headers)
    assert listed.status_code == 200
    refused = await sqlite_client.post(
        "/api/v1/services/api/instances",
        json={"address": "127.0.0.1", "port": 1, "check": {"kind": "ttl"}},
        headers=headers,
    )
    assert refused.status_code == 403


async def test_an_instance_that_stops_answering_turns_critical_and_is_removed(
    sqlite_client: httpx.AsyncClient, fake_instance: Any
) -> None:
    check = {**FAST_HTTP, "failures_before_critical": 2, "deregister_critical_after": 0.8}
    body = {
        "instance_id": "w-1",
        "address": "127.0.0.1",
        "port": fake_instance.port,
        "check": check,
    }
    assert (
        await sqlite_client.post("/api/v1/services/worker/instances", json=body)
    ).status_code == 201
    await eventually(lambda: asyncio.sleep(0, fake_instance.requests >= 3))  # probed repeatedly

    fake_instance.status = 500
    states: list[str] = []

    async def critical() -> bool:
        found = await instances(sqlite_client, "worker", healthy=False)
        if found:
            states.append(found[0]["health"]["state"])
            # Discovery never returns a critical instance.
            healthy = await instances(sqlite_client, "worker")
            assert all(i["health"]["state"] != "critical" for i in healthy)
        return bool(found) and found[0]["health"]["state"] == "critical"

    await eventually(critical, timeout=5)
    assert "warning" in states  # one failure is a warning, two in a row are critical
    assert await instances(sqlite_client, "worker") == []

    async def deregistered() -> bool:
        response = await sqlite_client.get("/api/v1/services/worker/instances/w-1")
        return response.status_code == 404

    await eventually(deregistered, timeout=5)
    changes = await eventually(
        lambda: event_types(sqlite_client, "fleetmesh.registry.instance_health_changed.v1", 2)
    )
    assert ("passing", "warning") in {
        (e["data"]["previous"], e["data"]["current"]) for e in changes
    }
    gone = await eventually(
        lambda: event_types(sqlite_client, "fleetmesh.registry.instance_deregistered.v1")
    )
    assert gone[0]["data"]["reason"] == "critical for more than 0.8s"


async def test_a_ttl_instance_expires_without_heartbeats_and_recovers_with_one(
    sqlite_client: httpx.AsyncClient,
) -> None:
    body = {
        "instance_id": "t-1",
        "address": "127.0.0.1",
        "port": 7000,
        "check": {"kind": "ttl", "ttl": 0.3, "deregister_critical_after": 30},
    }
    assert (
        await sqlite_client.post("/api/v1/services/ttl-svc/instances", json=body)
    ).status_code == 201
    for _ in range(4):  # heartbeats keep it passing past several TTLs
        await asyncio.sleep(0.15)
        beat = await sqlite_client.put("/api/v1/services/ttl-svc/instances/t-1/heartbeat")
        assert beat.json()["health"]["state"] == "passing"

    async def expired() -> bool:
        found = await instances(sqlite_client, "ttl-svc", healthy=False)
        return found[0]["health"]["state"] == "critical"

    await eventually(expired, timeout=3)
    assert await instances(sqlite_client, "ttl-svc") == []
    beat = await sqlite_client.put("/api/v1/services/ttl-svc/instances/t-1/heartbeat")
    assert beat.json()["health"]["state"] == "passing"
    assert [i["instance_id"] for i in await instances(sqlite_client, "ttl-svc")] == ["t-1"]


async def test_a_second_replica_sees_the_same_instances_and_writes_are_conditional(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    replica = RegistryView(sqlite_platform.backbone)
    await replica.start()
    try:
        body = {
            "instance_id": "r-1",
            "address": "127.0.0.1",
            "port": 7001,
            "check": {"kind": "ttl"},
        }
        assert (
            await sqlite_client.post("/api/v1/services/shared/instances", json=body)
        ).status_code == 201

        async def seen() -> bool:
            return replica.find("shared", "r-1") is not None

        await eventually(seen, timeout=2)
        store = KvInstanceStore(sqlite_platform.backbone)
        await store.open()
        record = await store.get("shared", "r-1")
        assert record is not None
        instance = record.fresh()
        instance.weight = 5
        updated = await store.put(instance, last_revision=record.revision)
        with pytest.raises(StaleRevision):  # a second writer that read the same revision loses
            await store.put(record.fresh(), last_revision=record.revision)
        await eventually(lambda: asyncio.sleep(0, replica.index("shared") == updated.revision))
        assert replica.find("shared", "r-1").instance.weight == 5  # type: ignore[union-attr]
    finally:
        await replica.stop()
