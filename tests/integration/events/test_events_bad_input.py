"""Bad input to the event bus is a 4xx problem+json, with the fields at fault."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetmesh.bootstrap import bootstrap
from support import client_for, make_settings

pytestmark = pytest.mark.integration

READING = "com.acme.reading.taken"
GOOD = {
    "specversion": "1.0",
    "id": "e-1",
    "source": "/sensors/lab",
    "type": READING,
    "data": {"temp": 1},
}
STRUCTURED = {"content-type": "application/cloudevents+json"}
HOOK = "http://127.0.0.1/"


def without(name: str) -> dict[str, Any]:
    return {key: value for key, value in GOOD.items() if key != name}


BAD_EVENTS: list[tuple[Any, list[str]]] = [
    (without("id"), ["id"]),
    (without("source"), ["source"]),
    (without("type"), ["type"]),
    (without("specversion"), ["specversion"]),
    ({"data": {}}, ["id", "source", "specversion", "type"]),
    ({**GOOD, "specversion": "0.3"}, ["specversion"]),
    ({**GOOD, "time": "yesterday"}, ["time"]),
    ({**GOOD, "data": {"temp": "hot"}}, ["data/temp"]),
    ({**GOOD, "data": {"unit": "C"}}, ["data"]),
    ({**GOOD, "type": "com.acme.never.registered"}, ["type"]),
    ({**GOOD, "type": "fleetmesh.device.registered.v1"}, ["type"]),
    ({**GOOD, "id": "x" * 256}, ["id"]),
    ({**GOOD, "id": "a\r\nb"}, ["id"]),
]


async def test_invalid_events_are_refused(
    sqlite_client: httpx.AsyncClient, sqlite_bus: Any
) -> None:
    await sqlite_bus.contract()
    for event, fields in BAD_EVENTS:
        response = await sqlite_client.post("/api/v1/events", json=event, headers=STRUCTURED)
        assert response.status_code == 422, (event, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert sorted({e["field"] for e in response.json()["errors"]}) == fields, event


async def test_bad_bodies_and_parameters(sqlite_client: httpx.AsyncClient, sqlite_bus: Any) -> None:
    await sqlite_bus.contract()
    not_json = await sqlite_client.post("/api/v1/events", content=b"{", headers=STRUCTURED)
    assert not_json.status_code == 422
    binary_without_headers = await sqlite_client.post("/api/v1/events", json={"temp": 1})
    assert binary_without_headers.status_code == 422
    assert {"id", "source", "specversion", "type"} <= {
        e["field"] for e in binary_without_headers.json()["errors"]
    }
    batch = await sqlite_client.post(
        "/api/v1/events",
        content=json.dumps([GOOD, without("id")]),
        headers={"content-type": "application/cloudevents-batch+json"},
    )
    assert batch.status_code == 422 and [e["field"] for e in batch.json()["errors"]] == ["1/id"]
    for params in ({"ack": "maybe"}, {"ack": "delivered", "timeout": "forever"}):
        response = await sqlite_client.post(
            "/api/v1/events", json=GOOD, headers=STRUCTURED, params=params
        )
        assert response.status_code == 422, params
    stored = await sqlite_client.get("/api/v1/events", params={"type": READING})
    assert stored.json()["items"] == []


BAD_SUBSCRIPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"endpoint": "ftp://example.com/x"}, "endpoint"),
    ({"endpoint": "not a url"}, "endpoint"),
    ({"endpoint": "http://"}, "endpoint"),
    ({"endpoint": "http://host:99999/"}, "endpoint"),
    ({"endpoint": "nats:events.loop"}, "endpoint"),
    ({"endpoint": "nats:devices.d1.commands.reboot"}, "endpoint"),
    ({"endpoint": "nats:acme.>"}, "endpoint"),
    ({"endpoint": "http://no-such-host.invalid/hook"}, "endpoint"),
    ({"endpoint": HOOK, "types": ["a..b"]}, "/types/0"),
    ({"endpoint": HOOK, "filters": [{"sql": "x"}]}, "/filters/0/sql"),
    ({"endpoint": HOOK, "filters": [{"jmespath": "a["}]}, "/filters/0/jmespath"),
    (
        {"endpoint": HOOK, "filters": [{"exact": {"Bad": "x"}}]},
        "/filters/0/exact/Bad",
    ),
    ({"endpoint": HOOK, "secret": "whsec_???"}, "secret"),
    ({"endpoint": HOOK, "delivery": {"batch_size": 0}}, "delivery.batch_size"),
    (
        {"endpoint": HOOK, "delivery": {"retry": {"max_attempts": 0}}},
        "delivery.retry.max_attempts",
    ),
]


async def test_bad_subscriptions_are_422(sqlite_client: httpx.AsyncClient) -> None:
    for body, field in BAD_SUBSCRIPTIONS:
        response = await sqlite_client.post("/api/v1/subscriptions", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert field in [error["field"] for error in response.json()["errors"]], body
    listed = await sqlite_client.get("/api/v1/subscriptions")
    assert listed.json()["items"] == []


async def test_unknown_subscriptions_are_404(sqlite_client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/api/v1/subscriptions/nope"),
        ("POST", "/api/v1/subscriptions/nope:pause"),
        ("DELETE", "/api/v1/subscriptions/nope"),
        ("GET", "/api/v1/subscriptions/nope/deliveries"),
        ("POST", "/api/v1/subscriptions/nope/dead-letters:redrive"),
    ]:
        response = await sqlite_client.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert response.headers["content-type"] == "application/problem+json"


async def test_private_webhook_addresses_are_refused_by_default(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    settings.allow_private_webhooks = False
    platform = bootstrap(settings)
    await platform.start()
    try:
        async with client_for(platform) as client:
            for endpoint in (
                "http://127.0.0.1:8080/hook",
                "http://localhost/hook",
                "http://10.1.2.3/hook",
                "http://169.254.169.254/latest/meta-data",
                "http://[::1]/hook",
                "http://[::ffff:192.168.0.1]/hook",
            ):
                response = await client.post("/api/v1/subscriptions", json={"endpoint": endpoint})
                assert response.status_code == 422, endpoint
                assert response.json()["errors"][0]["code"] == "blocked", endpoint
            viewer = await client.get("/api/v1/subscriptions", headers={"authorization": ""})
            assert viewer.status_code == 401
    finally:
        await platform.stop()
