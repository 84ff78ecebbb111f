"""MQTT presence: real MQTT clients through the auth callout, and the $SYS event handling."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import struct
from datetime import timedelta
from typing import Any

import aiomqtt
import pytest

from fleetmesh.core.clock import to_rfc3339, utcnow

pytestmark = pytest.mark.integration

Kit = Any  # the `kit` / `sqlite_kit` fixtures of conftest.py (a StatusKit)

needs_callout = pytest.mark.skipif(
    importlib.util.find_spec("fleetmesh.devices.mqtt_auth") is None,
    reason="MQTT logins need the auth callout responder (fleetmesh.devices.mqtt_auth)",
)


def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def _connect_with_will(device_id: str, secret: str, topic: str, will: bytes) -> bytes:
    """MQTT 3.1.1 CONNECT: username, password, a QoS 1 last will, clean session."""
    flags = 0x80 | 0x40 | 0x08 | 0x04 | 0x02
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", 30)
    body += _string(device_id) + _string(topic) + _string(will)
    body += _string(device_id) + _string(secret)
    length, size = b"", len(body)
    while True:
        size, digit = divmod(size, 128)
        length += bytes([digit | (0x80 if size else 0)])
        if not size:
            return b"\x10" + length + body


def _sys_event(kind: str, device_id: str, cid: int, reason: str = "") -> bytes:
    """A `$SYS.ACCOUNT.IOT.<kind>` advisory as nats-server 2.15 sends it for MQTT clients."""
    now = to_rfc3339(utcnow())
    body: dict[str, Any] = {
        "type": f"io.nats.server.advisory.v1.client_{kind.lower()}",
        "timestamp": now,
        "server": {"id": "NTESTSERVER", "name": "test"},
        "client": {
            "start": now,
            "id": cid,
            "acc": "IOT",
            "user": device_id,
            "kind": "Client",
            "client_type": "mqtt",
            "client_id": device_id,
        },
    }
    if reason:
        body["reason"] = reason
    return json.dumps(body).encode()


def _presence(kit: Kit) -> Any:
    presence = kit.platform.provided("status_presence")
    assert presence is not None and presence.enabled
    return presence


@needs_callout
async def test_a_real_mqtt_client_connecting_and_disconnecting(sqlite_kit: Kit) -> None:
    kit = sqlite_kit
    await kit.define_type(offline_timeout_s=60.0)
    secrets = await kit.register("q-1")
    async with aiomqtt.Client(
        "127.0.0.1",
        kit.platform.ports.mqtt,
        identifier="q-1",
        username="q-1",
        password=secrets["q-1"],
    ):
        online = await kit.wait_status("q-1", "online", timeout=3)
        assert online["cause"] == "mqtt_connect" and online["mqtt_connected"] is True
    offline = await kit.wait_status("q-1", "offline", timeout=3)
    assert offline["cause"] == "mqtt_disconnect" and offline["mqtt_connected"] is False
    history = await kit.history("q-1")
    assert history[-1]["detail"] == "MQTT disconnected: Client Closed"


@needs_callout
async def test_a_real_client_that_dies_goes_offline_at_once_by_its_last_will(
    sqlite_kit: Kit,
) -> None:
    kit = sqlite_kit
    await kit.define_type(offline_timeout_s=60.0)
    secrets = await kit.register("q-2")
    will = b'{"status":"offline","cause":"last_will"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", kit.platform.ports.mqtt)
    writer.write(_connect_with_will("q-2", secrets["q-2"], "devices/q-2/status", will))
    await writer.drain()
    connack = await asyncio.wait_for(reader.readexactly(4), 5)
    assert connack[0] == 0x20 and connack[3] == 0, connack
    await kit.wait_status("q-2", "online", timeout=3)
    died = utcnow()
    writer.transport.abort()  # the device dies: no DISCONNECT packet
    offline = await kit.wait_status("q-2", "offline", timeout=5)
    decided_at, _ = (await kit.committed_changes("q-2"))[-1]
    assert decided_at - died < timedelta(seconds=1)
    assert offline["cause"] in ("last_will", "mqtt_disconnect")
    await asyncio.sleep(0.3)  # the will and the disconnect event make one transition
    assert [h["current"] for h in await kit.history("q-2")] == ["registered", "online", "offline"]


@needs_callout
async def test_reconciliation_finds_connections_made_while_nobody_listened(
    sqlite_kit: Kit,
) -> None:
    kit = sqlite_kit
    await kit.define_type(offline_timeout_s=60.0)
    secrets = await kit.register("q-3")
    presence = _presence(kit)
    async with aiomqtt.Client(
        "127.0.0.1",
        kit.platform.ports.mqtt,
        identifier="q-3",
        username="q-3",
        password=secrets["q-3"],
    ):
        await kit.wait_status("q-3", "online", timeout=3)
        put = await kit.client.put("/api/v1/devices/q-3/status", json={"status": "offline"})
        assert put.json()["status"] == "offline"
        await presence.reconcile()  # what a restart of the status service does
        back = await kit.wait_status("q-3", "online", timeout=3)
        assert back["cause"] == "mqtt_connect" and back["mqtt_connected"] is True


async def test_sys_events_drive_presence_and_a_second_session_keeps_it(kit: Kit) -> None:
    await kit.define_type(offline_timeout_s=60.0)
    await kit.register("x-1")
    presence = _presence(kit)
    await presence.wait_reconciled()
    presence.handle("$SYS.ACCOUNT.IOT.CONNECT", _sys_event("CONNECT", "x-1", 41))
    assert (await kit.wait_status("x-1", "online"))["cause"] == "mqtt_connect"
    # The device reconnects before the old session is dropped ("Duplicate Client ID").
    presence.handle("$SYS.ACCOUNT.IOT.CONNECT", _sys_event("CONNECT", "x-1", 42))
    presence.handle(
        "$SYS.ACCOUNT.IOT.DISCONNECT",
        _sys_event("DISCONNECT", "x-1", 41, "Duplicate Client ID"),
    )
    await asyncio.sleep(0.4)
    assert (await kit.status("x-1"))["status"] == "online"
    presence.handle(
        "$SYS.ACCOUNT.IOT.DISCONNECT", _sys_event("DISCONNECT", "x-1", 42, "Read Error")
    )
    offline = await kit.wait_status("x-1", "offline")
    assert offline["cause"] == "mqtt_disconnect"
    assert (await kit.history("x-1"))[-1]["detail"] == "MQTT disconnected: Read Error"
    presence.handle("$SYS.ACCOUNT.IOT.CONNECT", b"not json")  # ignored
    nats_client = json.loads(_sys_event("CONNECT", "x-1", 43))
    nats_client["client"]["client_type"] = "nats"
    presence.handle("$SYS.ACCOUNT.IOT.CONNECT", json.dumps(nats_client).encode())
    await asyncio.sleep(0.3)
    assert (await kit.status("x-1"))["status"] == "offline"  # only MQTT clients count


async def test_an_open_mqtt_connection_is_not_timed_out_and_reconcile_drops_stale_ones(
    sqlite_kit: Kit,
) -> None:
    kit = sqlite_kit
    await kit.define_type(offline_timeout_s=0.5)
    await kit.register("x-2")
    presence = _presence(kit)
    await presence.wait_reconciled()
    presence.handle("$SYS.ACCOUNT.IOT.CONNECT", _sys_event("CONNECT", "x-2", 7))
    await kit.wait_status("x-2", "online")
    await asyncio.sleep(1.5)  # three timeouts long, but the connection is open
    still = await kit.status("x-2")
    assert still["status"] == "online" and still["sequence"] == 1
    # No such connection exists on the server: reconciling takes the device offline.
    await presence.reconcile()
    offline = await kit.wait_status("x-2", "offline")
    assert offline["cause"] == "mqtt_disconnect" and offline["mqtt_connected"] is False
