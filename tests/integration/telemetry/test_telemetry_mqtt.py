"""MQTT telemetry end to end on the embedded platform: publish, store, refuse, quarantine."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import httpx
import pytest
from nats.js.api import StorageType
from nats.js.errors import NotFoundError

from fleetmesh.bootstrap import Platform
from fleetmesh.telemetry.bridge import MqttBridge
from fleetmesh.telemetry.mqtt import DEVICES_IN_STREAM
from support import restart_repeatedly

pytestmark = pytest.mark.integration

DEVICE_TYPE = {
    "name": "thermo",
    "telemetry_schema": {"temp": {"type": "number", "unit": "degC", "min": -40, "max": 85}},
}


async def register(client: httpx.AsyncClient, *device_ids: str) -> dict[str, str]:
    await client.post("/api/v1/device-types", json=DEVICE_TYPE)
    secrets: dict[str, str] = {}
    for device_id in device_ids:
        created = await client.post("/api/v1/devices", json={"type": "thermo", "id": device_id})
        assert created.status_code == 201, created.text
        secrets[device_id] = created.json()["credentials"]["secret"]
    return secrets


def mqtt(platform: Platform, device_id: str, secret: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1", platform.ports.mqtt, identifier=device_id, username=device_id, password=secret
    )


def point(value: float, ts_ms: int, metric: str = "temp") -> bytes:
    return json.dumps({"metric": metric, "value": value, "ts": ts_ms}).encode()


async def stored(client: httpx.AsyncClient, device_id: str, metric: str = "temp") -> list[Any]:
    """The points the query API returns for a device's metric (last hour to now)."""
    now = time.time()
    answer = await client.get(
        f"/api/v1/devices/{device_id}/telemetry",
        params={
            "metric": metric,
            "from": _iso(now - 3600),
            "to": _iso(now + 60),
        },
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    points = body.get("points", body.get("items")) if isinstance(body, dict) else body
    assert isinstance(points, list), body
    return points


def values_of(points: list[Any]) -> list[float]:
    return sorted(float(p["value"]) for p in points)


def _iso(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


async def wait_stored(
    client: httpx.AsyncClient, device_id: str, count: int, timeout: float = 15.0
) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        points = await stored(client, device_id)
        if len(points) >= count or time.monotonic() > deadline:
            return points
        await asyncio.sleep(0.1)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_qos0_and_qos1_publishes_are_stored(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    secrets = await register(client, "m-1")
    at = now_ms()
    async with mqtt(platform, "m-1", secrets["m-1"]) as device:
        await device.publish("devices/m-1/telemetry", point(21.5, at), qos=1)
        await device.publish("devices/m-1/telemetry", point(22.5, at + 1), qos=0)
        compact = json.dumps({"ts": at + 2, "values": {"temp": 23.5}}).encode()
        await device.publish("devices/m-1/telemetry", compact, qos=1)
    points = await wait_stored(client, "m-1", 3)
    assert values_of(points) == [21.5, 22.5, 23.5]


async def test_mosquitto_pub_publishes_are_stored(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    secrets = await register(client, "cli-1")
    at = now_ms()
    for qos, value in ((0, 19.25), (1, 19.5)):
        process = await asyncio.create_subprocess_exec(
            "mosquitto_pub", "-h", "127.0.0.1", "-p", str(platform.ports.mqtt),
            "-i", "cli-1", "-u", "cli-1", "-P", secrets["cli-1"], "-t", "devices/cli-1/telemetry",
            "-q", str(qos), "-m", point(value, at + qos).decode(),
        )  # fmt: skip
        assert await process.wait() == 0
    points = await wait_stored(client, "cli-1", 2)
    assert values_of(points) == [19.25, 19.5]


async def test_a_device_cannot_publish_as_another(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    secrets = await register(sqlite_client, "dev-a", "dev-b")
    at = now_ms()
    async with mqtt(sqlite_platform, "dev-b", secrets["dev-b"]) as intruder:
        # nats-server drops it yet still PUBACKs it (MQTT 3.1.1 has no negative ack).
        await intruder.publish("devices/dev-a/telemetry", point(66.0, at), qos=1)
        await intruder.publish("devices/dev-b/telemetry", point(11.0, at), qos=1)
    assert values_of(await wait_stored(sqlite_client, "dev-b", 1)) == [11.0]
    await asyncio.sleep(0.3)
    assert await stored(sqlite_client, "dev-a") == []
    info = await sqlite_platform.backbone.js.stream_info(
        DEVICES_IN_STREAM, subjects_filter="devices.dev-a.telemetry"
    )
    assert not (info.state.subjects or {}).get("devices.dev-a.telemetry")


async def test_an_invalid_payload_is_reported_to_the_device_and_quarantined(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    secrets = await register(client, "bad-1")
    at = now_ms()
    partly_bad = json.dumps(
        [{"metric": "temp", "value": 20.0, "ts": at}, {"metric": "temp", "value": 999, "ts": at}]
    ).encode()
    async with mqtt(platform, "bad-1", secrets["bad-1"]) as device:
        await device.subscribe("devices/bad-1/errors", qos=1)
        await device.publish("devices/bad-1/telemetry", b"{not json", qos=1)
        await device.publish("devices/bad-1/telemetry", partly_bad, qos=1)
        reports = await _receive(device, 2)
    assert [r["reason"] for r in reports] == ["malformed-telemetry", "points_rejected"]
    assert reports[1]["accepted"] == 1 and reports[1]["rejected"] == 1
    assert reports[1]["errors"][0]["index"] == 1
    assert values_of(await wait_stored(client, "bad-1", 1)) == [20.0]

    answer = await client.get("/api/v1/devices/bad-1/telemetry/rejections")
    assert answer.status_code == 200, answer.text
    rows = answer.json()["items"]
    assert [row["reason"] for row in rows] == ["points_rejected", "malformed-telemetry"]
    assert rows[1]["payload"] == "{not json"
    assert rows[0]["payload"] == partly_bad.decode()
    assert rows[0]["sequence"] > rows[1]["sequence"] > 0
    assert {row["id"] for row in rows} == {r["quarantine_id"] for r in reports}

    first = await client.get("/api/v1/devices/bad-1/telemetry/rejections", params={"limit": 1})
    cursor = first.json()["next_cursor"]
    second = await client.get(
        "/api/v1/devices/bad-1/telemetry/rejections", params={"limit": 1, "cursor": cursor}
    )
    assert [r["id"] for r in first.json()["items"] + second.json()["items"]] == [
        row["id"] for row in rows
    ]
    assert second.json()["next_cursor"] is None


async def test_rejections_need_a_viewer_key_or_the_device_itself(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    secrets = await register(sqlite_client, "own-1", "own-2")
    path = "/api/v1/devices/own-1/telemetry/rejections"
    anonymous = await sqlite_client.get(path, headers={"Authorization": ""})
    assert anonymous.status_code == 401
    itself = await sqlite_client.get(path, auth=("own-1", secrets["own-1"]))
    assert itself.status_code == 200
    other = await sqlite_client.get(path, auth=("own-2", secrets["own-2"]))
    assert other.status_code == 403


async def _receive(device: aiomqtt.Client, count: int) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        async for message in device.messages:
            received.append(json.loads(bytes(message.payload)))  # type: ignore[arg-type]
            if len(received) == count:
                return received
    return received


@pytest.fixture
async def bridge_scope() -> AsyncIterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:10]
    prefix, client_id = f"fmtest-{tag}", f"fmtest-bridge-{tag}"
    yield prefix, client_id
    async with aiomqtt.Client("127.0.0.1", 1883, identifier=client_id, clean_session=True):
        pass  # a clean session makes Mosquitto forget the bridge's persistent one


async def test_the_bridge_from_mosquitto_stores_points(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient, bridge_scope: tuple[str, str]
) -> None:
    prefix, client_id = bridge_scope
    await register(sqlite_client, "br-1")
    url = f"mqtt://127.0.0.1:1883?client_id={client_id}&topic={prefix}/devices/%2B/telemetry"
    bridge = MqttBridge(url, sqlite_platform.backbone)
    await bridge.start()
    await bridge.wait_subscribed(5)
    try:
        at = now_ms()
        async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"{client_id}-pub") as broker:
            for i in range(3):
                await broker.publish(f"{prefix}/devices/br-1/telemetry", point(i, at + i), qos=1)
        points = await wait_stored(sqlite_client, "br-1", 3)
        assert values_of(points) == [0.0, 1.0, 2.0]
    finally:
        await bridge.stop()


async def test_devices_in_is_a_file_stream_of_device_telemetry(
    sqlite_platform: Platform,
) -> None:
    try:
        info = await sqlite_platform.backbone.js.stream_info(DEVICES_IN_STREAM)
    except NotFoundError:
        pytest.fail("the telemetry module did not create DEVICES_IN")
    assert info.config.subjects == ["devices.*.telemetry"]
    assert StorageType(info.config.storage) is StorageType.FILE


async def test_restarting_the_mqtt_consumer_while_devices_publish_loses_and_duplicates_nothing(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    secrets = await register(client, "m-r")
    consumer = platform.provided("telemetry_mqtt")
    at = now_ms() - 60_000
    published = 600

    async def publish() -> None:
        async with mqtt(platform, "m-r", secrets["m-r"]) as device:
            for n in range(published):
                value = float(n % 80)  # inside the type's range
                await device.publish("devices/m-r/telemetry", point(value, at + n), qos=1)

    await asyncio.gather(publish(), restart_repeatedly(consumer, every_s=0.1, down_s=0.05))
    points = await wait_stored(client, "m-r", published, timeout=30.0)
    await asyncio.sleep(0.3)  # anything stored twice would show up by now
    points = await stored(client, "m-r")
    assert values_of(points) == sorted(float(n % 80) for n in range(published))
