"""The bridge's URL, topic and message-id rules (the broker side runs in integration tests)."""

from __future__ import annotations

import pytest

from fleetmesh.telemetry.bridge import BridgeConfigError, BridgeTarget, _Incoming, bridge_msg_id

pytestmark = pytest.mark.unit


def test_a_plain_url_gets_the_defaults() -> None:
    target = BridgeTarget.parse("mqtt://broker.local")
    assert (target.host, target.port, target.tls) == ("broker.local", 1883, False)
    assert (target.client_id, target.topic) == ("fleetmesh-bridge", "devices/+/telemetry")
    assert target.username is None


def test_credentials_client_id_and_topic_come_from_the_url() -> None:
    target = BridgeTarget.parse(
        "mqtts://us%40er:p%3Ass@10.0.0.5:8884?client_id=fm-1&topic=site/devices/%2B/telemetry"
    )
    assert (target.host, target.port, target.tls) == ("10.0.0.5", 8884, True)
    assert (target.username, target.password) == ("us@er", "p:ss")
    assert (target.client_id, target.topic) == ("fm-1", "site/devices/+/telemetry")


@pytest.mark.parametrize(
    "url",
    [
        "http://broker:1883",
        "mqtt://",
        "mqtt://broker?topic=devices/%23",
        "mqtt://broker?topic=devices/telemetry",
        "mqtt://broker?topic=%2B/%2B/telemetry",
    ],
)
def test_unusable_urls_are_refused(url: str) -> None:
    with pytest.raises(BridgeConfigError):
        BridgeTarget.parse(url)


@pytest.mark.parametrize(
    ("topic", "device_id"),
    [
        ("devices/s-1/telemetry", "s-1"),
        ("devices/s-1/status", None),
        ("devices/s-1/telemetry/x", None),
        ("devices/bad.id/telemetry", None),
        ("devices/-x/telemetry", None),
    ],
)
def test_the_device_id_is_the_plus_level(topic: str, device_id: str | None) -> None:
    assert BridgeTarget.parse("mqtt://b").device_id_of(topic) == device_id


def test_a_shared_subscription_matches_without_its_prefix() -> None:
    target = BridgeTarget.parse("mqtt://b?topic=$share/fm/site/%2B/telemetry")
    assert target.device_id_of("site/d-7/telemetry") == "d-7"


def test_a_qos1_redelivery_has_the_same_msg_id_and_qos0_messages_never_do() -> None:
    first = _Incoming("devices/a/telemetry", b'{"t":1}', mid=17, qos=1, session=1)
    redelivered = _Incoming("devices/a/telemetry", b'{"t":1}', mid=17, qos=1, session=2)
    other = _Incoming("devices/a/telemetry", b'{"t":2}', mid=17, qos=1, session=1)
    assert bridge_msg_id("c", first) == bridge_msg_id("c", redelivered)
    assert bridge_msg_id("c", first) != bridge_msg_id("c", other)
    assert bridge_msg_id("c", first) != bridge_msg_id("other-client", first)
    qos0 = _Incoming("devices/a/telemetry", b'{"t":1}', mid=0, qos=0, session=1)
    assert bridge_msg_id("c", qos0) != bridge_msg_id("c", qos0)
