"""Publishing CloudEvents and delivering them to webhooks, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import pytest

from fleetmesh.events.signing import verify_headers

pytestmark = pytest.mark.integration

READING = "com.acme.reading.taken"


async def test_builtin_contracts_are_registered_at_start(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/api/v1/event-contracts", params={"limit": 1000})).json()
    types = {item["type"] for item in listed["items"]}
    assert "fleetmesh.device.registered.v1" in types
    assert "fleetmesh.events.subscription_created.v1" in types
    one = await client.get("/api/v1/event-contracts/fleetmesh.device.registered.v1/versions/1")
    assert one.status_code == 200
    assert one.json()["builtin"] is True and one.json()["publisher"] == "devices"
    assert one.json()["schema"]["required"] == ["device_id", "type", "registered_at"]


async def test_an_event_is_stored_and_delivered_signed_in_binary_mode(
    client: httpx.AsyncClient, bus: Any, receivers: Any, wait_until: Any
) -> None:
    await bus.contract()
    receiver = await receivers()
    subscription = await bus.subscribe(receiver.url)
    assert subscription["secret"].startswith("whsec_")
    event = bus.event(data={"temp": 22.5, "unit": "C"})

    response = await bus.publish(event)

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "stored" and body["id"] == event["id"] and body["sequence"] > 0
    assert body["matched"] == [subscription["id"]]
    await wait_until(lambda: len(receiver.delivered) == 1)
    request = receiver.delivered[0]
    assert request.headers["ce-id"] == event["id"]
    assert request.headers["ce-type"] == READING
    assert request.headers["ce-source"] == "/sensors/lab"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body) == {"temp": 22.5, "unit": "C"}
    verify_headers(subscription["secret"], request.headers, request.body, now=time.time())
    stored = await client.get(f"/api/v1/events/{event['id']}")
    assert stored.status_code == 200 and stored.json()["data"]["temp"] == 22.5

    async def logged() -> bool:
        deliveries = await bus.deliveries(subscription["id"])
        return deliveries["stats"]["delivered"] == 1

    await wait_until(logged)
    deliveries = await bus.deliveries(subscription["id"])
    item = deliveries["items"][0]
    assert item["event_id"] == event["id"] and item["status"] == "delivered"
    assert item["http_status"] == 200 and item["attempt"] == 1
    assert deliveries["stats"]["success_rate"] == 1.0
    assert deliveries["stats"]["lag"] == 0


async def test_binary_mode_publish_and_ack_delivered(
    client: httpx.AsyncClient, bus: Any, receivers: Any
) -> None:
    await bus.contract()
    ok = await receivers()
    broken = await receivers(lambda _n, _r: (500, 0.0))
    filtered_out = await receivers()
    good = await bus.subscribe(ok.url)
    bad = await bus.subscribe(
        broken.url, delivery={"retry": {"max_attempts": 2, "base_delay": 0.01}}
    )
    picky = await bus.subscribe(
        filtered_out.url, filters=[{"exact": {"subject": "another-sensor"}}]
    )
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "binary-1",
        "ce-source": "/sensors/lab",
        "ce-type": READING,
        "ce-subject": "sensor-1",
        "content-type": "application/json",
    }

    response = await client.post(
        "/api/v1/events",
        content=json.dumps({"temp": 3}),
        headers=headers,
        params={"ack": "delivered", "timeout": "5s"},
    )

    assert response.status_code == 207, response.text
    body = response.json()
    assert sorted(body["matched"]) == sorted([good["id"], bad["id"]])
    deliveries = body["deliveries"]
    assert deliveries[good["id"]]["status"] == "delivered"
    assert deliveries[bad["id"]]["status"] == "failed"
    assert deliveries[bad["id"]]["will_retry"] is False
    assert deliveries[bad["id"]]["http_status"] == 500
    assert deliveries[picky["id"]]["status"] == "filtered"
    assert body["summary"] == {"delivered": 1, "of": 2}
    assert len(ok.delivered) == 1 and not filtered_out.requests

    await client.delete(f"/api/v1/subscriptions/{bad['id']}")
    again = await client.post(
        "/api/v1/events",
        content=json.dumps({"temp": 4}),
        headers={**headers, "ce-id": "binary-2"},
        params={"ack": "delivered"},
    )
    assert again.status_code == 200, again.text
    assert again.json()["deliveries"][good["id"]]["status"] == "delivered"


async def test_a_batch_is_published_and_delivered_in_batched_mode(
    client: httpx.AsyncClient, bus: Any, receivers: Any, wait_until: Any
) -> None:
    await bus.contract()
    receiver = await receivers()
    await bus.subscribe(receiver.url, delivery={"batch_size": 50})
    events = [bus.event(data={"temp": i}) for i in range(20)]

    response = await client.post(
        "/api/v1/events",
        content=json.dumps(events),
        headers={"content-type": "application/cloudevents-batch+json"},
    )

    assert response.status_code == 202, response.text
    assert response.json()["count"] == 20

    def delivered_ids() -> list[str]:
        return [e["id"] for r in receiver.delivered for e in json.loads(r.body)]

    await wait_until(lambda: len(delivered_ids()) == 20)
    assert sorted(delivered_ids()) == sorted(e["id"] for e in events)
    assert receiver.delivered[0].headers["content-type"] == "application/cloudevents-batch+json"
    assert len(receiver.delivered) < 20


async def test_device_events_reach_a_subscription_of_builtin_types(
    client: httpx.AsyncClient, bus: Any, receivers: Any, wait_until: Any
) -> None:
    receiver = await receivers()
    await bus.subscribe(receiver.url, types=["fleetmesh.device.*"])
    created = await client.post("/api/v1/device-types", json={"name": "thermo"})
    assert created.status_code == 201
    assert (await client.post("/api/v1/devices", json={"type": "thermo", "id": "d-1"})).is_success

    await wait_until(lambda: len(receiver.delivered) == 2)
    types = [r.headers["ce-type"] for r in receiver.delivered]
    assert types == ["fleetmesh.device.type_defined.v1", "fleetmesh.device.registered.v1"]
    assert json.loads(receiver.delivered[1].body)["device_id"] == "d-1"


async def test_a_nats_endpoint_receives_structured_events(
    client: httpx.AsyncClient, bus: Any, platform: Any
) -> None:
    await bus.contract()
    inbox = await platform.backbone.nc.subscribe("acme.readings")
    subscription = await bus.subscribe("nats:acme.readings")
    event = bus.event()

    await bus.publish(event)

    message = await inbox.next_msg(timeout=5)
    assert json.loads(message.data)["id"] == event["id"]
    assert message.headers["content-type"] == "application/cloudevents+json"
    verify_headers(subscription["secret"], message.headers, message.data, now=time.time())
    await inbox.unsubscribe()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
