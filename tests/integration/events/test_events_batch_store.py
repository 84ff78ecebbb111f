"""A batch is stored in order, once; a repeat is recognised; requests are counted per route."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

BATCH = {"content-type": "application/cloudevents-batch+json"}


async def test_a_repeated_batch_is_stored_once_and_delivered_once(
    sqlite_client: httpx.AsyncClient, sqlite_bus: Any, receivers: Any, wait_until: Any
) -> None:
    await sqlite_bus.contract()
    receiver = await receivers()
    await sqlite_bus.subscribe(receiver.url)
    events = [sqlite_bus.event(data={"temp": i}) for i in range(30)]
    body = json.dumps(events)

    first = await sqlite_client.post("/api/v1/events", content=body, headers=BATCH)
    again = await sqlite_client.post("/api/v1/events", content=body, headers=BATCH)

    assert first.status_code == again.status_code == 202
    stored, repeated = first.json()["items"], again.json()["items"]
    assert [item["id"] for item in stored] == [event["id"] for event in events]
    sequences = [item["sequence"] for item in stored]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(events)
    assert not any(item.get("duplicate") for item in stored)
    assert [item["sequence"] for item in repeated] == sequences
    assert all(item["duplicate"] for item in repeated)
    await wait_until(lambda: len(receiver.delivered) == len(events))
    delivered = sorted(request.headers["ce-id"] for request in receiver.delivered)
    assert delivered == sorted(event["id"] for event in events)


async def test_publishes_are_counted_per_route_and_status(
    sqlite_client: httpx.AsyncClient, sqlite_bus: Any
) -> None:
    await sqlite_bus.contract()
    for _ in range(3):
        assert (await sqlite_bus.publish(sqlite_bus.event())).status_code == 202
    assert (await sqlite_bus.publish(sqlite_bus.event(type="com.acme.unknown"))).status_code == 422

    metrics = (await sqlite_client.get("/metrics")).text

    def count(status: str) -> float:
        prefix = (
            'fleetmesh_http_requests_total{method="POST",route="/api/v1/events",'
            f'status="{status}"}} '
        )
        line = next(line for line in metrics.splitlines() if line.startswith(prefix))
        return float(line.removeprefix(prefix))

    assert count("202") == 3
    assert count("422") == 1
    assert 'fleetmesh_http_request_seconds_count{method="POST",route="/api/v1/events"} 4.0' in (
        metrics
    )
