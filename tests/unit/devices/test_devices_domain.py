"""The device registry's domain rules, without I/O."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fleetmesh.core.errors import InvalidInput
from fleetmesh.devices.domain import (
    DEVICE_ID_PATTERN,
    Device,
    DeviceAlreadyDeregistered,
    DeviceDeregistered,
    DeviceRegistered,
    DeviceType,
    InvalidDevice,
    Lifecycle,
    MetricSpec,
    ValueType,
    registration_errors,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 1, tzinfo=UTC)
THERMO = DeviceType(
    name="thermo",
    capabilities=("temperature", "ping"),
    telemetry_schema={"temp": MetricSpec(ValueType.number, "degC", -40, 85)},
)


def _register(**overrides: object) -> Device:
    options: dict[str, object] = {
        "device_id": "t-1",
        "device_type": THERMO,
        "name": None,
        "capabilities": (),
        "metadata": {},
        "offline_timeout_s": None,
        "credential_hash": "$argon2id$hash",
        "now": NOW,
    }
    options.update(overrides)
    return Device.register(**options)  # type: ignore[arg-type]


def test_registration_records_an_event_and_starts_registered() -> None:
    device = _register()
    assert device.lifecycle is Lifecycle.registered
    assert device.events == [DeviceRegistered("t-1")]


def test_every_invalid_field_is_reported_at_once() -> None:
    with pytest.raises(InvalidDevice) as caught:
        _register(
            device_id="bad id",
            name="",
            capabilities=("flying",),
            metadata={f"k{i}": "v" for i in range(65)},
            offline_timeout_s=-1,
        )
    fields = {error.field for error in caught.value.errors}
    assert fields == {"id", "name", "capabilities.0", "metadata", "offline_timeout_s"}


def test_deregistration_revokes_credentials_and_is_final() -> None:
    device = _register()
    device.deregister(NOW)
    assert device.lifecycle is Lifecycle.deregistered
    assert device.credential_hash == ""
    assert device.events[-1] == DeviceDeregistered("t-1")
    with pytest.raises(DeviceAlreadyDeregistered):
        device.deregister(NOW)
    with pytest.raises(DeviceAlreadyDeregistered):
        device.rotate_credentials("new", NOW)


def test_device_type_validation() -> None:
    bad = DeviceType(
        name="Bad",
        capabilities=("Has Space",),
        telemetry_schema={
            "t": MetricSpec(ValueType.number, min=10, max=0),
            "s": MetricSpec(ValueType.string, min=1),
        },
        offline_timeout_s=0,
    )
    with pytest.raises(InvalidInput) as caught:
        bad.validate()
    fields = {error.field for error in caught.value.errors}
    assert {"name", "capabilities.0", "telemetry_schema.t.min", "telemetry_schema.s"} <= fields
    assert "offline_timeout_s" in fields


def test_names_ending_in_a_newline_are_refused() -> None:
    bad = DeviceType(
        name="meter\n",
        capabilities=("ping\n",),
        telemetry_schema={"t\n": MetricSpec(ValueType.number)},
    )
    with pytest.raises(InvalidInput) as caught:
        bad.validate()
    fields = {error.field for error in caught.value.errors}
    assert {"name", "capabilities.0", "telemetry_schema.t\n"} <= fields


@given(st.text(max_size=80))
@example("0\n")
def test_accepted_ids_are_safe_in_mqtt_topics_and_nats_subjects(candidate: str) -> None:
    errors = registration_errors(
        device_id=candidate,
        device_type=THERMO,
        name=None,
        capabilities=(),
        metadata={},
        offline_timeout_s=None,
    )
    if not errors:
        assert DEVICE_ID_PATTERN.fullmatch(candidate)
        assert not set(candidate) & set("./#+*> \t\n$")
        assert 1 <= len(candidate) <= 64
