"""Liveness on the real platform: telemetry, inactivity timeouts, last will, pings, maintenance."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from typing import Any

import pytest
from nats.aio.msg import Msg

from fleetmesh.core.clock import from_rfc3339, to_rfc3339, utcnow
from fleetmesh.core.envelope import CloudEvent

pytestmark = pytest.mark.integration

Kit = Any  # the `kit` / `sqlite_kit` fixtures of conftest.py (a StatusKit)


def _changes(events: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [(e["data"]["current"], e["data"]["cause"], e["data"]["sequence"]) for e in events]


async def _events(kit: Kit, device_id: str, count: int) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = await kit.status_events(device_id)
        return items if len(items) >= count else None

    found: list[dict[str, Any]] = await kit.eventually(probe)
    return found


async def test_a_silent_device_goes_offline_within_its_timeout_and_only_once(kit: Kit) -> None:
    await kit.define_type(offline_timeout_s=1.0)
    await kit.register("s-1")
    registered = await kit.status("s-1")
    assert (registered["status"], registered["sequence"]) == ("registered", 0)
    assert registered["offline_deadline"] is None
    for _ in range(5):  # a burst: one transition, last_seen follows the last point
        await kit.telemetry("s-1", quality=0.8)
    online = await kit.wait_status("s-1", "online")
    assert online["cause"] == "telemetry" and online["offline_timeout_s"] == 1.0
    offline = await kit.wait_status("s-1", "offline", timeout=5)
    assert offline["cause"] == "timeout"
    assert offline["last_seen"] == online["last_seen"]
    # Stored at the deadline it was observed at (within the 1 s tolerance: exactly on
    # it); how soon after it the commit happens depends on the load of the machine.
    deadline = from_rfc3339(online["last_seen"]) + timedelta(seconds=1)
    assert from_rfc3339(offline["since"]) == deadline
    committed = await kit.committed_changes("s-1")
    assert [event["data"]["current"] for _, event in committed] == ["online", "offline"]
    await asyncio.sleep(0.5)  # nothing fires twice
    events = await _events(kit, "s-1", 2)
    assert _changes(events) == [("online", "telemetry", 1), ("offline", "timeout", 2)]
    assert events[1]["data"]["previous"] == "online" and events[1]["data"]["at"]
    history = await kit.history("s-1")
    assert [(h["sequence"], h["current"], h["cause"]) for h in history] == [
        (0, "registered", "registered"),
        (1, "online", "telemetry"),
        (2, "offline", "timeout"),
    ]
    health = (await kit.status("s-1"))["health"]
    quality = next(c for c in health["components"] if c["name"] == "data_quality")
    assert quality["score"] == pytest.approx(80.0)


async def test_telemetry_keeps_a_device_online_and_moves_its_deadline(sqlite_kit: Kit) -> None:
    kit = sqlite_kit
    await kit.define_type(offline_timeout_s=1.0)
    await kit.register("k-1")
    started = time.monotonic()
    while time.monotonic() - started < 1.6:  # longer than the timeout, never silent for long
        await kit.telemetry("k-1")
        await asyncio.sleep(0.2)
    body = await kit.wait_status("k-1", "online")
    assert body["sequence"] == 1
    await kit.wait_status("k-1", "offline", timeout=3)


async def test_a_last_will_takes_the_device_offline_at_once(sqlite_kit: Kit) -> None:
    kit = sqlite_kit
    await kit.define_type(offline_timeout_s=60.0)
    await kit.register("w-1")
    await kit.telemetry("w-1")
    await kit.wait_status("w-1", "online")
    nc = kit.platform.backbone.nc  # MQTT devices/w-1/status arrives as devices.w-1.status
    await nc.publish("devices.w-1.status", b'{"status":"offline","cause":"last_will"}')
    sent = utcnow()
    offline = await kit.wait_status("w-1", "offline", timeout=5)
    assert offline["cause"] == "last_will"
    decided_at, _ = (await kit.committed_changes("w-1"))[-1]
    assert decided_at - sent < timedelta(seconds=1)  # at once: within one write window
    await nc.publish("devices.w-1.status", b'{"status":"online"}')
    back = await kit.wait_status("w-1", "online")
    assert back["cause"] == "mqtt_connect"
    await nc.publish("devices.w-1.status", b'{"status":"sleeping"}')  # ignored, not a crash
    await nc.publish("devices.w-1.status", b'{"status":"offline"}')
    assert (await kit.wait_status("w-1", "offline"))["cause"] == "mqtt_disconnect"


async def test_offline_device_is_pinged_with_backoff_and_an_answer_brings_it_back(
    sqlite_kit: Kit,
) -> None:
    kit = sqlite_kit
    await kit.set_config("health_check_initial_s", 0.2)
    await kit.set_config("health_check_max_s", 0.8)
    await kit.define_type(offline_timeout_s=0.5)
    await kit.register("p-1")
    nc = kit.platform.backbone.nc
    pings: list[tuple[float, dict[str, Any]]] = []

    async def on_ping(message: Msg) -> None:
        pings.append((time.monotonic(), json.loads(message.data)))

    await nc.subscribe("devices.p-1.commands.ping", cb=on_ping)
    await kit.telemetry("p-1")
    await kit.wait_status("p-1", "online")
    await kit.wait_status("p-1", "offline", timeout=5)
    await kit.eventually(lambda: len(pings) >= 3, timeout=10)
    first, second, third = (p for _, p in pings[:3])
    assert first["reply_topic"] == "devices/p-1/responses/ping"
    assert len({first["command_id"], second["command_id"], third["command_id"]}) == 3
    gaps = [b - a for (a, _), (b, _) in zip(pings, pings[1:3], strict=False)]
    # 0.2 s, doubled: 0.4 s, then 0.8 s (the cap); never earlier, a little later under load.
    assert gaps[0] >= 0.35 and gaps[1] >= 0.75 and max(gaps) < 3, gaps
    waiting = await kit.status("p-1")
    assert waiting["health_checks"]["failed"] >= 2 and waiting["health_checks"]["attempt"] >= 3
    await nc.publish("devices.p-1.responses.ping", b'{"command_id":"not-ours"}')
    latest = pings[-1][1]
    await nc.publish("devices.p-1.responses.ping", json.dumps(latest).encode())
    back = await kit.wait_status("p-1", "online", timeout=5)
    assert back["cause"] == "health_check"
    assert back["health_checks"]["answered"] == 1 and back["health_checks"]["next_at"] is None
    await asyncio.sleep(0.2)  # a ping already on its way when the answer came
    count = len(pings)
    for _ in range(6):  # kept online by telemetry, longer than the largest backoff
        await kit.telemetry("p-1")
        await asyncio.sleep(0.2)
    assert len(pings) == count  # no pings while online
    assert (await kit.status("p-1"))["status"] == "online"


async def test_maintenance_is_not_timed_out_and_an_operator_brings_it_back(kit: Kit) -> None:
    await kit.define_type(offline_timeout_s=0.5)
    await kit.register("m-1")
    await kit.telemetry("m-1")
    await kit.wait_status("m-1", "online")
    response = await kit.client.put(
        "/api/v1/devices/m-1/status", json={"status": "maintenance", "reason": "firmware"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["cause"], body["offline_deadline"]) == (
        "maintenance",
        "manual",
        None,
    )
    await kit.telemetry("m-1")  # evidence of life, but maintenance is kept

    async def seen_again() -> dict[str, Any] | None:
        current: dict[str, Any] = await kit.status("m-1")
        return current if current["last_seen"] > body["last_seen"] else None

    kept = await kit.eventually(seen_again)
    await asyncio.sleep(0.6)  # longer than the timeout
    kept = await kit.status("m-1")
    assert kept["status"] == "maintenance" and kept["sequence"] == body["sequence"]
    etag = response.headers["ETag"]
    stale = await kit.client.put(
        "/api/v1/devices/m-1/status", json={"status": "online"}, headers={"If-Match": '"1"'}
    )
    assert stale.status_code == 412
    back = await kit.client.put(
        "/api/v1/devices/m-1/status",
        json={"status": "online"},
        headers={"If-Match": f'"{kept["version"]}"'},
    )
    assert back.status_code == 200, back.text
    assert back.headers["ETag"] != etag and back.json()["offline_deadline"] is not None
    assert (await kit.wait_status("m-1", "offline", timeout=2))["cause"] == "timeout"
    history = await kit.history("m-1")
    assert [h["current"] for h in history] == [
        "registered",
        "online",
        "maintenance",
        "online",
        "offline",
    ]
    assert history[2]["detail"] == "firmware"
    gone = await kit.client.delete("/api/v1/devices/m-1")
    assert gone.status_code == 200
    assert (await kit.wait_status("m-1", "deregistered"))["cause"] == "deregistered"
    refused = await kit.client.put("/api/v1/devices/m-1/status", json={"status": "online"})
    assert refused.status_code == 409
    await kit.telemetry("m-1")
    await asyncio.sleep(0.3)
    assert (await kit.status("m-1"))["status"] == "deregistered"


async def test_the_default_timeout_is_live_for_devices_without_one(sqlite_kit: Kit) -> None:
    """A device whose type the status service never saw gets the configured default,
    and a change of that default re-arms the deadlines of devices already online."""
    kit = sqlite_kit
    await kit.set_config("offline_timeout_s", 30)
    now = to_rfc3339(utcnow())
    event = CloudEvent(
        type="fleetmesh.device.registered.v1",
        source="/fleetmesh/devices",
        subject="d-1",
        data={"device_id": "d-1", "type": "unseen", "registered_at": now},
    )
    await kit.platform.backbone.publish(event.nats_subject, event.to_json(), msg_id=event.id)
    await kit.eventually(lambda: kit._known("d-1"))
    await kit.telemetry("d-1")
    online = await kit.wait_status("d-1", "online")
    assert online["offline_timeout_s"] == 30
    changed = utcnow()
    await kit.set_config("offline_timeout_s", 0.5)
    await kit.wait_status("d-1", "offline", timeout=5)
    decided_at, event = (await kit.committed_changes("d-1"))[-1]
    assert event["data"]["cause"] == "timeout"
    assert decided_at - changed < timedelta(seconds=1.5)  # re-armed, not after 30 s
