"""Settings changed through the config API change what a running platform does, without a restart.

Each test writes only through `PUT /api/v1/config/{service}/{key}` (the
configuration center), then watches the behaviour of another context change:
the status service's default offline timeout, the telemetry batch limit, and
the webhook retry policy. (The log level is in `test_config_live.py`.)
"""

from __future__ import annotations

import asyncio
import json
import time
from base64 import b64encode
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest

from fleetmesh.bootstrap import Platform
from fleetmesh.core.clock import from_rfc3339
from fleetmesh.core.envelope import CloudEvent

pytestmark = pytest.mark.integration

READING = "com.acme.config.reading"


async def eventually(
    probe: Callable[[], Awaitable[Any]], *, timeout: float = 10.0, every: float = 0.05
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


async def configure(client: httpx.AsyncClient, service: str, key: str, value: Any) -> int:
    """Set one entry through the config API; returns its new version."""
    response = await client.put(f"/api/v1/config/{service}/{key}", json={"value": value})
    assert response.status_code in (200, 201), response.text
    version: int = response.json()["version"]
    return version


# -- status: the default offline timeout ------------------------------------------


async def announce(
    platform: Platform, event_type: str, device_id: str, data: dict[str, Any]
) -> None:
    """Publish what another context publishes about a device."""
    event = CloudEvent(type=event_type, source="/tests", subject=device_id, data=data)
    await platform.backbone.publish(event.nats_subject, event.to_json(), msg_id=event.id)


async def status_of(client: httpx.AsyncClient, device_id: str) -> dict[str, Any] | None:
    response = await client.get(f"/api/v1/devices/{device_id}/status")
    return dict(response.json()) if response.status_code == 200 else None


async def test_a_new_default_offline_timeout_takes_a_silent_device_offline(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    """The default applies to devices whose type and own record set no timeout, and a change
    re-arms a deadline already running."""
    assert await configure(sqlite_client, "status", "offline_timeout_s", 60) == 1
    plain = {"name": "plain", "telemetry_schema": {"temp": {"type": "number"}}}
    assert (await sqlite_client.post("/api/v1/device-types", json=plain)).status_code == 201
    created = await sqlite_client.post("/api/v1/devices", json={"type": "plain", "id": "cfg-1"})
    secret = created.json()["credentials"]["secret"]
    await eventually(lambda: status_of(sqlite_client, "cfg-1"))
    sent = await sqlite_client.post(
        "/api/v1/devices/cfg-1/telemetry",
        json={"metric": "temp", "value": 21.5},
        headers={"Authorization": "Basic " + b64encode(f"cfg-1:{secret}".encode()).decode()},
    )
    assert sent.status_code == 202, sent.text

    async def online() -> dict[str, Any] | None:
        found = await status_of(sqlite_client, "cfg-1")
        return found if found and found["status"] == "online" else None

    seen = await eventually(online)
    last_seen = from_rfc3339(seen["last_seen"])
    assert seen["offline_timeout_s"] == 60
    assert from_rfc3339(seen["offline_deadline"]) == last_seen + timedelta(seconds=60)

    assert await configure(sqlite_client, "status", "offline_timeout_s", 1) == 2

    async def offline() -> dict[str, Any] | None:
        found = await status_of(sqlite_client, "cfg-1")
        return found if found and found["status"] == "offline" else None

    gone = await eventually(offline)  # long before the 60 s of the old default
    assert (gone["cause"], gone["offline_timeout_s"]) == ("timeout", 1)
    assert from_rfc3339(gone["since"]) == last_seen + timedelta(seconds=1)


# -- telemetry: the batch limit ----------------------------------------------------


async def test_a_smaller_batch_limit_refuses_larger_batches_until_it_is_deleted(
    sqlite_client: httpx.AsyncClient,
) -> None:
    sensor = {"name": "cfg-sensor", "telemetry_schema": {"temp": {"type": "number"}}}
    assert (await sqlite_client.post("/api/v1/device-types", json=sensor)).status_code == 201
    device = {"type": "cfg-sensor", "id": "cfg-batch"}
    assert (await sqlite_client.post("/api/v1/devices", json=device)).status_code == 201
    at = time.time_ns() // 1_000_000
    sequence = iter(range(10_000))

    async def send(points: int) -> httpx.Response:
        start = next(sequence) * 10
        batch = [
            {"metric": "temp", "value": 20.0, "ts": at - start - index} for index in range(points)
        ]
        return await sqlite_client.post(
            "/api/v1/devices/cfg-batch/telemetry",
            content=json.dumps(batch),
            params={"wait": "stored"},
        )

    first = await send(4)
    assert first.status_code == 202, first.text

    await configure(sqlite_client, "telemetry", "max_batch_points", 3)

    async def refused() -> httpx.Response | None:
        answer = await send(4)
        return answer if answer.status_code == 413 else None

    too_large = await eventually(refused)
    assert too_large.json()["limit"] == 3
    assert (await send(3)).status_code == 202

    deleted = await sqlite_client.delete("/api/v1/config/telemetry/max_batch_points")
    assert deleted.status_code in (200, 204), deleted.text

    async def accepted() -> bool:
        return (await send(4)).status_code == 202

    await eventually(accepted)


# -- events: the default webhook retry policy ----------------------------------------


class FailingWebhook:
    """A webhook endpoint on loopback that answers every request 500."""

    def __init__(self) -> None:
        self.requests = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> FailingWebhook:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            self.requests += 1
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n")
            writer.write(b"connection: close\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def failing_webhook() -> AsyncIterator[FailingWebhook]:
    webhook = await FailingWebhook().start()
    try:
        yield webhook
    finally:
        await webhook.close()


async def test_the_default_retry_policy_decides_how_often_a_failing_webhook_is_tried(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient, failing_webhook: FailingWebhook
) -> None:
    schema = {"type": "object", "properties": {"temp": {"type": "number"}}}
    contract = await sqlite_client.post(
        "/api/v1/event-contracts", json={"type": READING, "schema": schema}
    )
    assert contract.status_code in (200, 201), contract.text
    subscribed = await sqlite_client.post(
        "/api/v1/subscriptions", json={"endpoint": failing_webhook.url, "types": [READING]}
    )
    assert subscribed.status_code == 201, subscribed.text
    subscription = subscribed.json()
    assert subscription["delivery"]["retry"] is None  # it follows the default policy

    async def set_policy(max_attempts: int) -> None:
        policy = {"max_attempts": max_attempts, "base_delay": 0.01, "max_delay": 0.02}
        await configure(sqlite_client, "events", "webhook_retry", policy)

        async def applied() -> bool:
            return bool(sqlite_platform.live_config.get("events", "webhook_retry") == policy)

        await eventually(applied)

    async def publish(number: int) -> None:
        event = {
            "specversion": "1.0",
            "id": f"cfg-retry-{number}",
            "source": "/tests",
            "type": READING,
            "subject": "sensor-1",
            "data": {"temp": 20.0 + number},
        }
        answer = await sqlite_client.post(
            "/api/v1/events",
            json=event,
            headers={"content-type": "application/cloudevents+json"},
        )
        assert answer.status_code == 202, answer.text

    async def dead_letter_attempts(count: int) -> list[int]:
        path = f"/api/v1/subscriptions/{subscription['id']}/dead-letters"

        async def arrived() -> list[dict[str, Any]] | None:
            items = (await sqlite_client.get(path)).json()["items"]
            return items if len(items) == count else None

        return sorted(item["attempts"] for item in await eventually(arrived))

    await set_policy(2)
    await publish(1)
    assert await dead_letter_attempts(1) == [2]
    assert failing_webhook.requests == 2

    await set_policy(4)
    await publish(2)
    assert await dead_letter_attempts(2) == [2, 4]
    assert failing_webhook.requests == 6
