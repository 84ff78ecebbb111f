"""MQTT device logins through the nats-server auth callout, answered by the devices context."""

from __future__ import annotations

import asyncio
import shutil
import struct
from collections.abc import Callable

import aiomqtt
import httpx
import nats
import pytest
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from fleetmesh.bootstrap import Platform

pytestmark = pytest.mark.integration

CONNACK_ACCEPTED = 0
CONNACK_NOT_AUTHORISED = 5
SUBACK_FAILURE = 128


async def _register(client: httpx.AsyncClient, *device_ids: str) -> dict[str, str]:
    await client.post("/api/v1/device-types", json={"name": "thermo"})
    secrets: dict[str, str] = {}
    for device_id in device_ids:
        created = await client.post("/api/v1/devices", json={"type": "thermo", "id": device_id})
        assert created.status_code == 201, created.text
        secrets[device_id] = created.json()["credentials"]["secret"]
    return secrets


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _connect_packet(client_id: str, username: str, password: str) -> bytes:
    """An MQTT 3.1.1 CONNECT with username, password and a clean session."""
    variable = _string("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 30)
    body = variable + _string(client_id) + _string(username) + _string(password)
    length, size = b"", len(body)
    while True:
        size, digit = divmod(size, 128)
        length += bytes([digit | (0x80 if size else 0)])
        if not size:
            return b"\x10" + length + body


async def _connack(platform: Platform, client_id: str, username: str, password: str) -> int:
    """The CONNACK return code the broker answers to a login."""
    reader, writer = await asyncio.open_connection("127.0.0.1", platform.ports.mqtt)
    try:
        writer.write(_connect_packet(client_id, username, password))
        await writer.drain()
        packet = await asyncio.wait_for(reader.readexactly(4), 5)
    finally:
        writer.close()
    assert packet[0] == 0x20, packet
    return packet[3]


def _mqtt(platform: Platform, device_id: str, secret: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1", platform.ports.mqtt, identifier=device_id, username=device_id, password=secret
    )


async def _collect(platform: Platform, subject: str) -> list[bytes]:
    """Payloads published on a NATS subject from now on."""
    received: list[bytes] = []

    async def on_message(message: Msg) -> None:
        received.append(message.data)

    await platform.backbone.nc.subscribe(subject, cb=on_message)
    await platform.backbone.nc.flush()
    return received


async def _until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_device_logs_in_and_publishes_qos1_telemetry(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    secrets = await _register(sqlite_client, "t-1")
    received = await _collect(sqlite_platform, "devices.t-1.telemetry")
    async with _mqtt(sqlite_platform, "t-1", secrets["t-1"]) as device:
        await device.publish("devices/t-1/telemetry", b'{"temp": 21.5}', qos=1)
        await _until(lambda: received)
    assert received == [b'{"temp": 21.5}']


async def test_refused_logins_get_connack_5(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    secrets = await _register(sqlite_client, "t-1", "t-2", "gone")
    assert (await sqlite_client.delete("/api/v1/devices/gone")).status_code == 200
    attempts = {
        "right": ("t-1", "t-1", secrets["t-1"]),
        "wrong secret": ("t-1", "t-1", secrets["t-2"]),
        "unknown device": ("nobody", "nobody", secrets["t-1"]),
        "deregistered": ("gone", "gone", secrets["gone"]),
        "client id is another device": ("t-2", "t-1", secrets["t-1"]),
        "empty password": ("t-1", "t-1", ""),
    }
    codes = {case: await _connack(sqlite_platform, *attempt) for case, attempt in attempts.items()}
    assert codes == {
        case: CONNACK_ACCEPTED if case == "right" else CONNACK_NOT_AUTHORISED for case in attempts
    }


async def test_device_credentials_do_not_open_a_plain_nats_connection(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    secrets = await _register(sqlite_client, "t-1")
    assert sqlite_platform.nats_server is not None
    with pytest.raises(NatsError):
        await nats.connect(
            sqlite_platform.nats_server.url,
            user="t-1",
            password=secrets["t-1"],
            allow_reconnect=False,
            connect_timeout=3,
        )


async def test_a_device_cannot_publish_or_subscribe_as_another(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    secrets = await _register(sqlite_client, "a", "b")
    stolen = await _collect(sqlite_platform, "devices.a.telemetry")
    own = await _collect(sqlite_platform, "devices.b.telemetry")
    async with _mqtt(sqlite_platform, "b", secrets["b"]) as device:
        await device.publish("devices/a/telemetry", b"forged", qos=1)
        # One connection's publishes arrive in order: once b's own is in, a forged one is gone.
        await device.publish("devices/b/telemetry", b"mine", qos=1)
        await _until(lambda: own)
        denied = await device.subscribe("devices/a/#", qos=1)
        allowed = await device.subscribe("devices/b/#", qos=1)
    assert stolen == [] and own == [b"mine"]
    assert list(denied) == [SUBACK_FAILURE]
    assert list(allowed) == [1]


async def test_many_devices_log_in_at_once(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    device_ids = [f"m-{i}" for i in range(40)]
    secrets = await _register(sqlite_client, *device_ids)
    codes = await asyncio.gather(*(_connack(sqlite_platform, d, d, secrets[d]) for d in device_ids))
    assert set(codes) == {CONNACK_ACCEPTED}


async def test_mosquitto_pub_publishes_with_device_credentials(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    assert shutil.which("mosquitto_pub"), "apt-get install -y mosquitto-clients"
    secrets = await _register(sqlite_client, "cli-1")
    received = await _collect(sqlite_platform, "devices.cli-1.telemetry")
    process = await asyncio.create_subprocess_exec(
        *["mosquitto_pub", "-h", "127.0.0.1", "-p", str(sqlite_platform.ports.mqtt)],
        *["-u", "cli-1", "-P", secrets["cli-1"], "-i", "cli-1", "-q", "1"],
        *["-t", "devices/cli-1/telemetry", "-m", '{"temp": 7}'],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0, stderr.decode()
    await _until(lambda: received)
    assert received == [b'{"temp": 7}']
