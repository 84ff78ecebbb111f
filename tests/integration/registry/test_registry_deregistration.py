"""A critical instance is kept (and never discovered) for `deregister_critical_after`, then removed.

The timing is read from what the registry recorded (`critical_since`, the
`at` of its events), not from the test's own clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest

from fleetmesh.core.clock import from_rfc3339

pytestmark = pytest.mark.integration

GRACE_S = 1.5
CHECK = {
    "kind": "http",
    "http_path": "/health",
    "interval": 0.2,
    "timeout": 0.1,
    "failures_before_critical": 1,
    "deregister_critical_after": GRACE_S,
}


async def eventually(
    probe: Callable[[], Awaitable[Any]], *, timeout: float = 10.0, every: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s (last: {result!r})")
        await asyncio.sleep(every)


async def discover(client: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    response = await client.get("/api/v1/services/meter/instances", params=params)
    assert response.status_code == 200, response.text
    return list(response.json()["instances"])


async def events_of(client: httpx.AsyncClient, event_type: str) -> list[dict[str, Any]]:
    body = (await client.get("/api/v1/events", params={"type": event_type})).json()
    return list(body["items"])


async def test_a_critical_instance_is_removed_only_once_critical_for_the_configured_time(
    sqlite_client: httpx.AsyncClient, fake_instance: Any
) -> None:
    body = {"instance_id": "m-1", "address": "127.0.0.1", "port": fake_instance.port}
    created = await sqlite_client.post(
        "/api/v1/services/meter/instances", json=body | {"check": CHECK}
    )
    assert created.status_code == 201, created.text
    fake_instance.status = 503

    async def critical() -> dict[str, Any] | None:
        found = await discover(sqlite_client, healthy="false")
        return found[0] if found and found[0]["health"]["state"] == "critical" else None

    kept = await eventually(critical)
    assert await discover(sqlite_client) == []  # known, but never discovered while critical
    critical_since = from_rfc3339(kept["health"]["critical_since"])

    async def removed() -> bool:
        response = await sqlite_client.get("/api/v1/services/meter/instances/m-1")
        return response.status_code == 404

    await eventually(removed)
    [gone] = await eventually(
        lambda: events_of(sqlite_client, "fleetmesh.registry.instance_deregistered.v1")
    )
    assert gone["data"]["reason"] == f"critical for more than {GRACE_S:g}s"
    removed_at = from_rfc3339(gone["data"]["at"])
    assert removed_at - critical_since >= timedelta(seconds=GRACE_S)
    changes = await events_of(sqlite_client, "fleetmesh.registry.instance_health_changed.v1")
    to_critical = [e["data"] for e in changes if e["data"]["current"] == "critical"]
    assert [from_rfc3339(change["at"]) for change in to_critical] == [critical_since]
