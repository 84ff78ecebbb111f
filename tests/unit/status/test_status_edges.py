"""Parsing at the edges of the status context: windows, contracts, $SYS events, settings."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetmesh.core.errors import InvalidInput
from fleetmesh.status import contracts
from fleetmesh.status.api import parse_window
from fleetmesh.status.domain import DeviceState, StatusCause, StatusChanged
from fleetmesh.status.options import StatusOptions
from fleetmesh.status.presence import parse_presence_event
from fleetmesh.status.repository import resolve_timeout

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
        ("1h30m", timedelta(minutes=90)),
        ("90s", timedelta(seconds=90)),
        ("2w", timedelta(days=14)),
        (" 15M ", timedelta(minutes=15)),
    ],
)
def test_windows(text: str, expected: timedelta) -> None:
    assert parse_window(text) == expected


@pytest.mark.parametrize("text", ["", "24", "h", "1.5h", "-1h", "0s", "367d", "1h 30m", "1y"])
def test_bad_windows_are_field_errors(text: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_window(text)
    assert caught.value.errors[0].field == "window"


def test_status_changed_event_matches_its_published_schema() -> None:
    at = datetime(2026, 1, 1, 12, tzinfo=UTC)
    change = StatusChanged(
        "d-1", DeviceState.ONLINE, DeviceState.OFFLINE, StatusCause.TIMEOUT, at, 7
    )
    event = contracts.status_changed(change).to_dict()
    assert event["type"] == "fleetmesh.device.status_changed.v1"
    assert event["subject"] == "d-1" and event["time"] == "2026-01-01T12:00:00.000Z"
    assert event["data"] == {
        "device_id": "d-1",
        "previous": "online",
        "current": "offline",
        "cause": "timeout",
        "at": "2026-01-01T12:00:00.000Z",
        "sequence": 7,
    }
    jsonschema.validate(event["data"], contracts.SCHEMAS[contracts.STATUS_CHANGED])


def _event(kind: str, data: Any) -> bytes:
    return json.dumps({"type": kind, "id": "e", "source": "s", "data": data}).encode()


def test_projection_and_telemetry_events_are_decoded_or_refused() -> None:
    registered = contracts.decode_projection(
        _event(
            contracts.DEVICE_REGISTERED,
            {"device_id": "d", "registered_at": "2026-01-01T00:00:00Z", "type": "t"},
        )
    )
    assert isinstance(registered, contracts.Registered) and registered.offline_timeout_s is None
    assert contracts.decode_projection(_event("fleetmesh.device.other.v1", {})) is None
    with pytest.raises(contracts.UnreadableEvent):
        contracts.decode_projection(_event(contracts.DEVICE_REGISTERED, {"device_id": "d"}))
    with pytest.raises(contracts.UnreadableEvent):
        contracts.decode_projection(b"{not json")
    collected = {"device_id": "d", "received_at": "2026-01-01T00:00:00Z", "quality_mean": 1.5}
    with pytest.raises(contracts.UnreadableEvent):
        contracts.decode_collected(_event(contracts.TELEMETRY_COLLECTED, collected))
    collected["quality_mean"] = 0.5
    decoded = contracts.decode_collected(_event(contracts.TELEMETRY_COLLECTED, collected))
    assert decoded is not None and decoded.count == 1


def test_device_messages() -> None:
    assert contracts.device_of_subject("devices.d-1.status") == "d-1"
    with pytest.raises(ValueError):
        contracts.device_of_subject("telemetry.d-1")
    will = contracts.decode_status_message(b'{"status":"offline","cause":"last_will"}')
    assert (will.status, will.cause) == ("offline", "last_will")
    with pytest.raises(ValueError):
        contracts.decode_status_message(b'{"status":"napping"}')
    ping = json.loads(contracts.ping_command("d-1", "C1", datetime(2026, 1, 1, tzinfo=UTC)))
    assert ping == {
        "command_id": "C1",
        "sent_at": "2026-01-01T00:00:00.000Z",
        "reply_topic": "devices/d-1/responses/ping",
    }


SYS_DISCONNECT = {
    "type": "io.nats.server.advisory.v1.client_disconnect",
    "timestamp": "2026-11-26T18:18:20.112037809Z",
    "server": {"name": "fleetmesh-x", "id": "NSERVER"},
    "client": {
        "start": "2026-11-26T18:18:19.582527585Z",
        "id": 17,
        "acc": "IOT",
        "user": "d1",
        "stop": "2026-11-26T18:18:20.112037809Z",
        "kind": "Client",
        "client_type": "mqtt",
        "client_id": "d1",
    },
    "reason": "Client Closed",
}


def test_sys_events_of_mqtt_clients_are_parsed() -> None:
    event = parse_presence_event("$SYS.ACCOUNT.IOT.DISCONNECT", json.dumps(SYS_DISCONNECT).encode())
    assert event is not None
    assert (event.connected, event.device_id, event.key, event.reason) == (
        False,
        "d1",
        ("NSERVER", 17),
        "Client Closed",
    )
    assert event.at == datetime(2026, 11, 26, 18, 18, 20, 112037, tzinfo=UTC)
    service_client = json.loads(json.dumps(SYS_DISCONNECT))
    service_client["client"]["client_type"] = "nats"
    assert (
        parse_presence_event("$SYS.ACCOUNT.IOT.DISCONNECT", json.dumps(service_client).encode())
        is None
    )
    assert parse_presence_event("$SYS.ACCOUNT.IOT.CONNECT", b"[]") is None


def test_timeouts_resolve_from_device_then_type_then_default() -> None:
    assert resolve_timeout(5.0, 60.0, 300.0) == 5.0
    assert resolve_timeout(None, 60.0, 300.0) == 60.0
    assert resolve_timeout(None, None, 300.0) == 300.0
    assert resolve_timeout(0.0, -1.0, 300.0) == 300.0


class FakeLiveConfig:
    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def get(self, service: str, key: str, default: Any = None) -> Any:
        assert service == "status"
        return self.values.get(key, default)


def test_settings_fall_back_to_defaults_when_invalid() -> None:
    options = StatusOptions(FakeLiveConfig({}))  # type: ignore[arg-type]
    assert options.offline_timeout_s() == 300.0
    assert options.backoff().initial == timedelta(seconds=30)
    tuned = StatusOptions(
        FakeLiveConfig(  # type: ignore[arg-type]
            {"offline_timeout_s": 42, "health_check_initial_s": 0.2, "health_check_max_s": 0.1}
        )
    )
    assert tuned.offline_timeout_s() == 42.0
    assert tuned.backoff().initial == timedelta(seconds=0.2)
    assert tuned.backoff().maximum == timedelta(seconds=0.2)  # never below the initial delay
    for bad in ("fast", True, -3, 0, float("nan"), 10**9):
        broken = StatusOptions(FakeLiveConfig({"offline_timeout_s": bad}))  # type: ignore[arg-type]
        assert broken.offline_timeout_s() == 300.0


changes = st.builds(
    StatusChanged,
    device_id=st.text(min_size=1, max_size=64),
    previous=st.sampled_from(DeviceState),
    current=st.sampled_from(DeviceState),
    cause=st.sampled_from(StatusCause),
    at=st.datetimes(min_value=datetime(1970, 1, 2), timezones=st.just(UTC)),
    sequence=st.integers(min_value=1, max_value=2**40),
    detail=st.text(max_size=80),
)


@given(changes)
def test_the_encoded_status_changed_is_the_cloud_event_json(change: StatusChanged) -> None:
    event_id, payload = contracts.encoded_status_changed(change)

    expected = dataclasses.replace(contracts.status_changed(change), id=event_id)
    assert payload == expected.to_json()
