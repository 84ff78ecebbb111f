"""The device registry's domain: device types, devices and their credentials.

Pure Python: no I/O. Aggregates record what happened in `self.events`; the
use cases turn those into integration events (see `contracts.py`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from fleetmesh.core.errors import Conflict, FieldError, InvalidInput, NotFound

DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
TYPE_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,62}")
METRIC_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
CAPABILITY_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
MAX_METADATA_KEYS = 64
MAX_METADATA_BYTES = 8192
MAX_NAME_LENGTH = 200
MAX_BULK_DEVICES = 10_000


class DeviceNotFound(NotFound):
    problem = "device-not-found"


class DeviceTypeNotFound(NotFound):
    problem = "device-type-not-found"


class DuplicateDevice(Conflict):
    problem = "duplicate-device"


class DuplicateDeviceType(Conflict):
    problem = "duplicate-device-type"


class DeviceAlreadyDeregistered(Conflict):
    problem = "device-deregistered"


class InvalidDevice(InvalidInput):
    problem = "invalid-device"


class ValueType(StrEnum):
    number = "number"
    integer = "integer"
    boolean = "boolean"
    string = "string"


class Lifecycle(StrEnum):
    """Where a device is in the registry; liveness is the status context's business."""

    registered = "registered"
    deregistered = "deregistered"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """What one metric of a device type looks like."""

    type: ValueType
    unit: str | None = None
    min: float | None = None
    max: float | None = None

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type.value}
        if self.unit is not None:
            body["unit"] = self.unit
        if self.min is not None:
            body["min"] = self.min
        if self.max is not None:
            body["max"] = self.max
        return body


@dataclass(frozen=True, slots=True)
class DeviceType:
    """A kind of device: what it can do, what it reports, and how often."""

    name: str
    description: str = ""
    capabilities: tuple[str, ...] = ()
    telemetry_schema: dict[str, MetricSpec] = field(default_factory=dict)
    offline_timeout_s: float | None = None
    """None: the platform default (live configuration key `status/offline_timeout_s`)."""
    expected_interval_s: float = 60.0

    def validate(self) -> None:
        errors = _type_errors(self)
        if errors:
            raise InvalidInput("The device type is not valid.", errors=errors)

    def schema_as_dict(self) -> dict[str, dict[str, Any]]:
        return {metric: spec.as_dict() for metric, spec in self.telemetry_schema.items()}


def _type_errors(device_type: DeviceType) -> list[FieldError]:
    errors: list[FieldError] = []
    if not TYPE_NAME_PATTERN.fullmatch(device_type.name):
        errors.append(
            FieldError("name", "use 1-63 of a-z, 0-9, '-' and '_', starting with a letter")
        )
    errors.extend(
        FieldError(f"capabilities.{i}", "use 1-63 of a-z, 0-9, '.', '-' and '_'")
        for i, capability in enumerate(device_type.capabilities)
        if not CAPABILITY_PATTERN.fullmatch(capability)
    )
    for metric, spec in device_type.telemetry_schema.items():
        if not METRIC_PATTERN.fullmatch(metric):
            errors.append(FieldError(f"telemetry_schema.{metric}", "invalid metric name"))
        if spec.min is not None and spec.max is not None and spec.min > spec.max:
            errors.append(FieldError(f"telemetry_schema.{metric}.min", "min is above max"))
        if spec.type in (ValueType.boolean, ValueType.string) and (
            spec.min is not None or spec.max is not None
        ):
            errors.append(
                FieldError(f"telemetry_schema.{metric}", f"a {spec.type} metric has no range")
            )
    if device_type.offline_timeout_s is not None and device_type.offline_timeout_s <= 0:
        errors.append(FieldError("offline_timeout_s", "must be positive"))
    if device_type.expected_interval_s <= 0:
        errors.append(FieldError("expected_interval_s", "must be positive"))
    return errors


@dataclass(frozen=True, slots=True)
class DeviceRegistered:
    device_id: str


@dataclass(frozen=True, slots=True)
class DeviceDeregistered:
    device_id: str


@dataclass(frozen=True, slots=True)
class CredentialsRotated:
    device_id: str


DomainEvent = DeviceRegistered | DeviceDeregistered | CredentialsRotated


@dataclass
class Device:
    """A registered device. Its secret is never held here, only the secret's hash."""

    id: str
    type_name: str
    name: str | None
    registered_at: datetime
    credential_hash: str
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    offline_timeout_s: float | None = None
    lifecycle: Lifecycle = Lifecycle.registered
    deregistered_at: datetime | None = None
    credentials_rotated_at: datetime | None = None
    events: list[DomainEvent] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def register(
        cls,
        *,
        device_id: str,
        device_type: DeviceType,
        name: str | None,
        capabilities: tuple[str, ...],
        metadata: dict[str, str],
        offline_timeout_s: float | None,
        credential_hash: str,
        now: datetime,
    ) -> Device:
        errors = registration_errors(
            device_id=device_id,
            device_type=device_type,
            name=name,
            capabilities=capabilities,
            metadata=metadata,
            offline_timeout_s=offline_timeout_s,
        )
        if errors:
            raise InvalidDevice("The device cannot be registered.", errors=errors)
        device = cls(
            id=device_id,
            type_name=device_type.name,
            name=name,
            registered_at=now,
            credential_hash=credential_hash,
            capabilities=capabilities,
            metadata=metadata,
            offline_timeout_s=offline_timeout_s,
        )
        device.events.append(DeviceRegistered(device_id))
        return device

    @property
    def is_active(self) -> bool:
        return self.lifecycle is Lifecycle.registered

    def deregister(self, now: datetime) -> None:
        if not self.is_active:
            raise DeviceAlreadyDeregistered(f"Device {self.id} is already deregistered.")
        self.lifecycle = Lifecycle.deregistered
        self.deregistered_at = now
        self.credential_hash = ""
        self.events.append(DeviceDeregistered(self.id))

    def rotate_credentials(self, new_hash: str, now: datetime) -> None:
        if not self.is_active:
            raise DeviceAlreadyDeregistered(f"Device {self.id} is deregistered.")
        self.credential_hash = new_hash
        self.credentials_rotated_at = now
        self.events.append(CredentialsRotated(self.id))


def registration_errors(
    *,
    device_id: str,
    device_type: DeviceType,
    name: str | None,
    capabilities: tuple[str, ...],
    metadata: dict[str, str],
    offline_timeout_s: float | None,
) -> list[FieldError]:
    """Every reason a registration is invalid, so the caller can fix them all at once."""
    errors: list[FieldError] = []
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        errors.append(
            FieldError("id", "use 1-64 of A-Z, a-z, 0-9, '-' and '_', starting alphanumeric")
        )
    if name is not None and not (0 < len(name.strip()) <= MAX_NAME_LENGTH):
        errors.append(FieldError("name", f"must be 1-{MAX_NAME_LENGTH} characters"))
    allowed = set(device_type.capabilities)
    errors.extend(
        FieldError(
            f"capabilities.{i}",
            f"{capability!r} is not a capability of type {device_type.name!r}",
            "not_allowed",
        )
        for i, capability in enumerate(capabilities)
        if capability not in allowed
    )
    errors.extend(_metadata_errors(metadata))
    if offline_timeout_s is not None and offline_timeout_s <= 0:
        errors.append(FieldError("offline_timeout_s", "must be positive"))
    return errors


def _metadata_errors(metadata: dict[str, str]) -> list[FieldError]:
    if len(metadata) > MAX_METADATA_KEYS:
        return [FieldError("metadata", f"at most {MAX_METADATA_KEYS} keys", "too_large")]
    if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
        return [FieldError("metadata", f"at most {MAX_METADATA_BYTES} bytes as JSON", "too_large")]
    return []
