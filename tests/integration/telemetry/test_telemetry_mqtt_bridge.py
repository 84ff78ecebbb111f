"""The bridge from the machine's Mosquitto (127.0.0.1:1883) into DEVICES_IN.

Every test uses its own topic prefix and client id, and wipes its persistent
session from Mosquitto at the end.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError
from paho.mqtt.enums import CallbackAPIVersion

from fleetmesh.bootstrap import Platform, bootstrap
from fleetmesh.core.backbone import Backbone
from fleetmesh.telemetry.bridge import MqttBridge
from fleetmesh.telemetry.mqtt import DEVICES_IN_STREAM, SOURCE_HEADER
from support import make_settings

pytestmark = pytest.mark.integration

MOSQUITTO = ("127.0.0.1", 1883)


class Scope:
    """A unique topic prefix and bridge client id for one test."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.prefix = f"fmtest-{tag}"
        self.client_id = f"fmtest-bridge-{tag}"
        self.device = f"dev-{tag}"

    @property
    def url(self) -> str:
        return (
            f"mqtt://{MOSQUITTO[0]}:{MOSQUITTO[1]}"
            f"?client_id={self.client_id}&topic={self.prefix}/devices/%2B/telemetry"
        )

    def topic(self, device_id: str | None = None) -> str:
        return f"{self.prefix}/devices/{device_id or self.device}/telemetry"


@pytest.fixture
async def devices_only(tmp_path: Path) -> AsyncIterator[Platform]:
    """NATS JetStream without the telemetry context: DEVICES_IN is only written here."""
    platform = bootstrap(make_settings(tmp_path / "data"), contexts=["devices"])
    await platform.start()
    try:
        yield platform
    finally:
        await platform.stop()


@pytest.fixture
async def scope() -> AsyncIterator[Scope]:
    created = Scope()
    yield created
    await asyncio.to_thread(_forget_session, created.client_id)


def _forget_session(client_id: str) -> None:
    """Connect once with a clean session: Mosquitto drops the persistent one."""
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True
    )
    client.connect(*MOSQUITTO)
    client.loop_start()
    client.disconnect()
    client.loop_stop()


async def publish_to_mosquitto(topic: str, payloads: list[bytes], qos: int = 1) -> None:
    """Publish with `mosquitto_pub`, one process per message, waiting for each PUBACK."""
    for payload in payloads:
        process = await asyncio.create_subprocess_exec(
            "mosquitto_pub", "-h", MOSQUITTO[0], "-p", str(MOSQUITTO[1]),
            "-t", topic, "-q", str(qos), "-m", payload.decode(),
        )  # fmt: skip
        assert await process.wait() == 0


async def stored_in(backbone: Backbone, subject: str) -> list[Any]:
    """Every message DEVICES_IN holds on a subject (an ephemeral consumer reads them)."""
    try:
        info = await backbone.js.stream_info(DEVICES_IN_STREAM, subjects_filter=subject)
    except NotFoundError:
        return []
    if not (info.state.subjects or {}).get(subject):
        return []
    subscription = await backbone.js.pull_subscribe(
        subject,
        stream=DEVICES_IN_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=5.0),
    )
    messages: list[Any] = []
    try:
        while True:
            try:
                batch = await subscription.fetch(100, timeout=0.5)
            except Exception:
                return messages
            messages.extend(batch)
    finally:
        await subscription.unsubscribe()


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


class StallingBackbone:
    """A backbone that stores messages but never returns from publish (a crash before PUBACK)."""

    def __init__(self, real: Backbone) -> None:
        self.real = real
        self.published = 0

    async def ensure_stream(self, config: Any) -> None:
        await self.real.ensure_stream(config)

    async def publish(self, subject: str, payload: bytes, **options: Any) -> Any:
        await self.real.publish(subject, payload, **options)
        self.published += 1
        await asyncio.Event().wait()


async def test_bridged_messages_land_in_devices_in_with_their_source(
    devices_only: Platform, scope: Scope
) -> None:
    bridge = MqttBridge(scope.url, devices_only.backbone)
    await bridge.start()
    await bridge.wait_subscribed(5)
    try:
        payloads = [b'{"metric": "temp", "value": 21.5}', b'{"metric": "temp", "value": 22}']
        await publish_to_mosquitto(scope.topic(), payloads[:1], qos=1)
        await publish_to_mosquitto(scope.topic(), payloads[1:], qos=0)
        await publish_to_mosquitto(f"{scope.prefix}/devices/bad.id/telemetry", [b"{}"])
        subject = f"devices.{scope.device}.telemetry"

        async def both_arrived() -> bool:
            return len(await stored_in(devices_only.backbone, subject)) == 2

        await until(both_arrived)
        messages = await stored_in(devices_only.backbone, subject)
        assert [m.data for m in messages] == payloads
        assert {m.headers[SOURCE_HEADER] for m in messages} == {"mqtt-bridge"}
        await until(lambda: _true(bridge.skipped == 1))
    finally:
        await bridge.stop()


async def test_messages_queued_while_the_bridge_was_down_arrive_when_it_reconnects(
    devices_only: Platform, scope: Scope
) -> None:
    bridge = MqttBridge(scope.url, devices_only.backbone)
    await bridge.start()
    await bridge.wait_subscribed(5)
    await bridge.stop()
    payloads = [f'{{"metric": "n", "value": {i}}}'.encode() for i in range(5)]
    await publish_to_mosquitto(scope.topic(), payloads, qos=1)
    subject = f"devices.{scope.device}.telemetry"
    assert await stored_in(devices_only.backbone, subject) == []

    again = MqttBridge(scope.url, devices_only.backbone)
    await again.start()
    try:

        async def all_arrived() -> bool:
            return len(await stored_in(devices_only.backbone, subject)) >= 5

        await until(all_arrived)
        assert [m.data for m in await stored_in(devices_only.backbone, subject)] == payloads
    finally:
        await again.stop()


async def test_a_message_stored_but_not_acked_is_redelivered_and_kept_once(
    devices_only: Platform, scope: Scope
) -> None:
    stalling = StallingBackbone(devices_only.backbone)
    crashed = MqttBridge(scope.url, stalling)  # type: ignore[arg-type]
    await crashed.start()
    await crashed.wait_subscribed(5)
    payloads = [b'{"metric": "a", "value": 1}', b'{"metric": "a", "value": 2}']
    await publish_to_mosquitto(scope.topic(), payloads, qos=1)
    await until(lambda: _true(stalling.published >= 1))
    await crashed.stop(drain_timeout_s=0.2)  # no PUBACK went out: Mosquitto keeps them

    recovered = MqttBridge(scope.url, devices_only.backbone)
    await recovered.start()
    subject = f"devices.{scope.device}.telemetry"
    try:
        await until(lambda: _true(recovered.forwarded >= 2))
        await asyncio.sleep(0.3)
        assert [m.data for m in await stored_in(devices_only.backbone, subject)] == payloads
    finally:
        await recovered.stop()


async def _true(value: bool) -> bool:
    return value
