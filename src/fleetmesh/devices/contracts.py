"""Integration events the device registry publishes (versioned, stable for consumers)."""

from __future__ import annotations

from typing import Any

from fleetmesh.core.clock import to_rfc3339
from fleetmesh.core.envelope import CloudEvent
from fleetmesh.devices.domain import Device, DeviceType

SOURCE = "/fleetmesh/devices"
DEVICE_TYPE_DEFINED = "fleetmesh.device.type_defined.v1"
DEVICE_REGISTERED = "fleetmesh.device.registered.v1"
DEVICE_DEREGISTERED = "fleetmesh.device.deregistered.v1"
CREDENTIALS_ROTATED = "fleetmesh.device.credentials_rotated.v1"

_STRING = {"type": "string"}
_TIME = {"type": "string", "format": "date-time"}

SCHEMAS: dict[str, dict[str, Any]] = {
    DEVICE_TYPE_DEFINED: {
        "type": "object",
        "required": ["name", "telemetry_schema", "offline_timeout_s", "expected_interval_s"],
        "properties": {
            "name": _STRING,
            "description": _STRING,
            "capabilities": {"type": "array", "items": _STRING},
            "telemetry_schema": {"type": "object"},
            "offline_timeout_s": {"type": ["number", "null"]},
            "expected_interval_s": {"type": "number"},
        },
    },
    DEVICE_REGISTERED: {
        "type": "object",
        "required": ["device_id", "type", "registered_at"],
        "properties": {
            "device_id": _STRING,
            "type": _STRING,
            "name": {"type": ["string", "null"]},
            "capabilities": {"type": "array", "items": _STRING},
            "metadata": {"type": "object"},
            "offline_timeout_s": {"type": ["number", "null"]},
            "registered_at": _TIME,
        },
    },
    DEVICE_DEREGISTERED: {
        "type": "object",
        "required": ["device_id", "deregistered_at"],
        "properties": {"device_id": _STRING, "type": _STRING, "deregistered_at": _TIME},
    },
    CREDENTIALS_ROTATED: {
        "type": "object",
        "required": ["device_id", "rotated_at"],
        "properties": {"device_id": _STRING, "rotated_at": _TIME},
    },
}


def type_defined(device_type: DeviceType) -> CloudEvent:
    return CloudEvent(
        type=DEVICE_TYPE_DEFINED,
        source=SOURCE,
        subject=device_type.name,
        data={
            "name": device_type.name,
            "description": device_type.description,
            "capabilities": list(device_type.capabilities),
            "telemetry_schema": device_type.schema_as_dict(),
            "offline_timeout_s": device_type.offline_timeout_s,
            "expected_interval_s": device_type.expected_interval_s,
        },
    )


def registered(device: Device, *, correlation_id: str | None = None) -> CloudEvent:
    return CloudEvent(
        type=DEVICE_REGISTERED,
        source=SOURCE,
        subject=device.id,
        correlationid=correlation_id,
        data={
            "device_id": device.id,
            "type": device.type_name,
            "name": device.name,
            "capabilities": list(device.capabilities),
            "metadata": device.metadata,
            "offline_timeout_s": device.offline_timeout_s,
            "registered_at": to_rfc3339(device.registered_at),
        },
    )


def deregistered(device: Device) -> CloudEvent:
    assert device.deregistered_at is not None
    return CloudEvent(
        type=DEVICE_DEREGISTERED,
        source=SOURCE,
        subject=device.id,
        data={
            "device_id": device.id,
            "type": device.type_name,
            "deregistered_at": to_rfc3339(device.deregistered_at),
        },
    )


def credentials_rotated(device: Device) -> CloudEvent:
    assert device.credentials_rotated_at is not None
    return CloudEvent(
        type=CREDENTIALS_ROTATED,
        source=SOURCE,
        subject=device.id,
        data={"device_id": device.id, "rotated_at": to_rfc3339(device.credentials_rotated_at)},
    )
