"""CloudEvents 1.0 validation in structured mode and the HTTP binary binding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from fleetmesh.events.cloudevents import (
    CloudEvent,
    parse_binary,
    parse_http,
    parse_structured,
    to_binary,
    to_structured,
)
from fleetmesh.events.domain import InvalidCloudEvent

pytestmark = pytest.mark.unit


def structured(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/devices/thermo-7",
        "type": "fleetmesh.telemetry.reading_taken.v1",
    }
    event.update(overrides)
    return {name: value for name, value in event.items() if value is not ...}


def failing_fields(document: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidCloudEvent) as caught:
        parse_structured(document)
    return {error.field: error.message for error in caught.value.errors}


def test_a_minimal_event_is_valid() -> None:
    event = parse_structured(structured())

    assert event.id == "evt-1"
    assert event.specversion == "1.0"
    assert event.time is None and event.data is None and event.extensions == {}


def test_every_attribute_is_read() -> None:
    event = parse_structured(
        structured(
            time="2024-05-01T12:30:00.123456789+02:00",
            subject="room-1",
            datacontenttype="application/json",
            dataschema="https://fleetmesh.dev/schemas/reading.json",
            correlationid="c-1",
            causationid="e-0",
            data={"temp": 31.5},
        )
    )

    assert event.time == datetime(2024, 5, 1, 10, 30, 0, 123456, tzinfo=UTC)
    assert event.subject == "room-1"
    assert event.datacontenttype == "application/json"
    assert event.dataschema == "https://fleetmesh.dev/schemas/reading.json"
    assert event.correlation_id == "c-1" and event.causation_id == "e-0"
    assert event.data == {"temp": 31.5}


@pytest.mark.parametrize("name", ["id", "source", "specversion", "type"])
def test_a_missing_required_attribute_is_named(name: str) -> None:
    assert failing_fields(structured(**{name: ...})) == {name: "required attribute is missing"}


def test_every_failing_attribute_is_listed() -> None:
    errors = failing_fields(
        {
            "specversion": "0.3",
            "source": "",
            "time": "yesterday",
            "dataschema": "not a uri",
            "Bad-Name": "x",
            "ratio": 0.5,
            "data": 1,
            "data_base64": "AA==",
        }
    )

    assert set(errors) == {
        "id",
        "type",
        "specversion",
        "source",
        "time",
        "dataschema",
        "Bad-Name",
        "ratio",
        "data_base64",
    }
    assert errors["specversion"] == "unsupported specversion '0.3'; expected '1.0'"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("id", 7),
        ("id", ""),
        ("type", "fleetmesh.devices.registered"),
        ("type", "fleetmesh.Devices.registered.v1"),
        ("source", "has space"),
        ("subject", ""),
        ("datacontenttype", "json"),
        ("time", "2024-05-01T12:30:00"),
        ("time", "2024-13-01T12:30:00Z"),
        ("time", 1714566600),
        ("correlationid", {"nested": True}),
        ("count", 2**31),
        ("data_base64", "not base64!"),
    ],
)
def test_invalid_attribute_values_are_rejected(name: str, value: object) -> None:
    assert name in failing_fields(structured(**{name: value}))


@pytest.mark.parametrize(
    "event_type", ["com.acme.door.opened", "Door Opened", "fleetmesh.devices.registered.v12"]
)
def test_user_types_are_free_form_but_builtins_follow_the_convention(event_type: str) -> None:
    assert parse_structured(structured(type=event_type)).type == event_type


def test_null_optional_attributes_are_absent() -> None:
    event = parse_structured(structured(subject=None, time=None, tenant=None))

    assert event.subject is None and event.time is None and "tenant" not in event.extensions


def test_binary_data_travels_as_base64() -> None:
    event = parse_structured(structured(data_base64="AAEC"))

    assert event.data == b"\x00\x01\x02"
    assert to_structured(event)["data_base64"] == "AAEC"


def test_structured_round_trip() -> None:
    document = structured(
        time="2024-05-01T10:30:00Z", subject="s", correlationid="c", retries=2, data=[1]
    )

    assert to_structured(parse_structured(document)) == document


def test_constructed_events_are_validated_too() -> None:
    with pytest.raises(InvalidCloudEvent) as caught:
        CloudEvent(id="", source="/s", type="t", time=datetime(2024, 1, 1))

    assert {error.field for error in caught.value.errors} == {"id", "time"}


def test_binary_mode_reads_ce_headers_and_the_body() -> None:
    headers = {
        "CE-SpecVersion": "1.0",
        "ce-id": "evt-2",
        "ce-source": "/devices/thermo-7",
        "ce-type": "fleetmesh.telemetry.reading_taken.v1",
        "ce-time": "2024-05-01T10:30:00Z",
        "ce-subject": "room%201%20%E2%82%AC",
        "ce-correlationid": "c-9",
        "Content-Type": "application/json; charset=utf-8",
        "x-other": "ignored",
    }

    event = parse_binary(headers, b'{"temp": 12}')

    assert event.id == "evt-2"
    assert event.subject == "room 1 \N{EURO SIGN}"
    assert event.time == datetime(2024, 5, 1, 10, 30, tzinfo=UTC)
    assert event.datacontenttype == "application/json; charset=utf-8"
    assert event.data == {"temp": 12}
    assert event.extensions == {"correlationid": "c-9"}


def test_binary_mode_keeps_non_json_bodies_as_bytes() -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}

    event = parse_binary(headers, b"\x89PNG", content_type="image/png")

    assert event.data == b"\x89PNG" and event.datacontenttype == "image/png"


def test_binary_mode_lists_missing_headers_and_bad_json() -> None:
    with pytest.raises(InvalidCloudEvent) as caught:
        parse_binary({"ce-id": "1"}, b"{oops", content_type="application/json")

    assert {error.field for error in caught.value.errors} == {
        "source",
        "specversion",
        "type",
        "data",
    }


def test_binary_round_trip_percent_encodes_header_values() -> None:
    event = CloudEvent(
        id="1",
        source="/s",
        type="t",
        subject='a "quoted" 50% €',
        time=datetime(2024, 1, 1, 8, tzinfo=timezone(timedelta(hours=2))),
        extensions={"retries": 3, "urgent": True},
        data={"ok": True},
    )

    headers, body = to_binary(event)

    assert headers["ce-subject"] == "a%20%22quoted%22%2050%25%20%E2%82%AC"
    assert headers["ce-retries"] == "3" and headers["ce-urgent"] == "true"
    assert headers["content-type"] == "application/json"
    again = parse_binary(headers, body)
    assert again.subject == event.subject and again.time == event.time and again.data == event.data
    assert again.extensions == {"retries": "3", "urgent": "true"}


def test_http_parsing_picks_the_content_mode() -> None:
    body = b'{"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": 5}'
    structured_event = parse_http({"Content-Type": "application/cloudevents+json"}, body)
    binary_event = parse_http(
        {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}, b""
    )

    assert structured_event.data == 5
    assert binary_event.data is None


def test_attribute_strings_are_canonical() -> None:
    event = CloudEvent(
        id="1",
        source="/s",
        type="t",
        time=datetime(2024, 1, 1, tzinfo=UTC),
        extensions={"urgent": False, "retries": 3},
    )

    assert event.attribute_strings == {
        "id": "1",
        "source": "/s",
        "type": "t",
        "specversion": "1.0",
        "time": "2024-01-01T00:00:00Z",
        "urgent": "false",
        "retries": "3",
    }
