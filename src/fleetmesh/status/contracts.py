"""Integration contracts of the status context: what it publishes and what it reads.

Published: `fleetmesh.device.status_changed.v1`, once per real transition, with
the device's transition `sequence` (1, 2, 3, ... per device, no gaps), so a
consumer can order a device's changes and notice a missed one.

Read (never imported from the producing context; these are their published
shapes): the device registry's lifecycle events, the telemetry context's
`fleetmesh.telemetry.collected.v1`, and what devices publish over MQTT:
`devices/<id>/status` (`{"status": "online"|"offline", "cause"?: "last_will"}`)
and `devices/<id>/responses/ping` (`{"command_id": ...}`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

import msgspec

from fleetmesh.core.clock import from_rfc3339, to_rfc3339
from fleetmesh.core.envelope import CloudEvent, envelope, subject_for_type
from fleetmesh.core.ids import new_id
from fleetmesh.status.domain import StatusChanged

SOURCE = "/fleetmesh/status"
STATUS_CHANGED = "fleetmesh.device.status_changed.v1"

DEVICE_TYPE_DEFINED = "fleetmesh.device.type_defined.v1"
DEVICE_REGISTERED = "fleetmesh.device.registered.v1"
DEVICE_DEREGISTERED = "fleetmesh.device.deregistered.v1"
TELEMETRY_COLLECTED = "fleetmesh.telemetry.collected.v1"

PROJECTED_TYPES = (DEVICE_TYPE_DEFINED, DEVICE_REGISTERED, DEVICE_DEREGISTERED)
PROJECTION_SUBJECTS = [subject_for_type(t) for t in PROJECTED_TYPES]
TELEMETRY_SUBJECT = subject_for_type(TELEMETRY_COLLECTED)

DEVICE_STATUS_SUBJECTS = "devices.*.status"
PING_RESPONSE_SUBJECTS = "devices.*.responses.ping"

_STATES = ["registered", "online", "offline", "maintenance", "deregistered"]
_CAUSES = [
    "telemetry",
    "mqtt_connect",
    "mqtt_disconnect",
    "last_will",
    "timeout",
    "manual",
    "health_check",
    "deregistered",
]

SCHEMAS: dict[str, dict[str, Any]] = {
    STATUS_CHANGED: {
        "type": "object",
        "required": ["device_id", "previous", "current", "cause", "at", "sequence"],
        "properties": {
            "device_id": {"type": "string"},
            "previous": {"type": "string", "enum": _STATES},
            "current": {"type": "string", "enum": _STATES},
            "cause": {"type": "string", "enum": _CAUSES},
            "at": {"type": "string", "format": "date-time"},
            "sequence": {"type": "integer", "minimum": 1},
            "detail": {"type": "string"},
        },
    },
}


def status_changed(change: StatusChanged) -> CloudEvent:
    return CloudEvent(
        type=STATUS_CHANGED,
        source=SOURCE,
        subject=change.device_id,
        time=change.at,
        data=_status_changed_data(change, to_rfc3339(change.at)),
    )


def _status_changed_data(change: StatusChanged, at: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "device_id": change.device_id,
        "previous": change.previous.value,
        "current": change.current.value,
        "cause": change.cause.value,
        "at": at,
        "sequence": change.sequence,
    }
    if change.detail:
        data["detail"] = change.detail
    return data


STATUS_CHANGED_SUBJECT = subject_for_type(STATUS_CHANGED)
_encode = msgspec.json.Encoder().encode


def encoded_status_changed(change: StatusChanged) -> tuple[str, bytes]:
    """`status_changed(change).to_json()` and its event id, a third of the cost: no
    `CloudEvent` is built, and the time is rendered once for the envelope and the data."""
    event_id = new_id()
    at = to_rfc3339(change.at)
    body = envelope(
        event_id=event_id,
        source=SOURCE,
        event_type=STATUS_CHANGED,
        time=at,
        subject=change.device_id,
        data=_status_changed_data(change, at),
    )
    return event_id, _encode(body)


def ping_command_subject(device_id: str) -> str:
    """NATS side of the MQTT topic `devices/<id>/commands/ping`."""
    return f"devices.{device_id}.commands.ping"


def ping_reply_topic(device_id: str) -> str:
    return f"devices/{device_id}/responses/ping"


def ping_command(device_id: str, command_id: str, sent_at: datetime) -> bytes:
    return msgspec.json.encode(
        {
            "command_id": command_id,
            "sent_at": to_rfc3339(sent_at),
            "reply_topic": ping_reply_topic(device_id),
        }
    )


def device_of_subject(subject: str) -> str:
    """`devices.<id>.status` / `devices.<id>.responses.ping` -> `<id>`."""
    parts = subject.split(".")
    if len(parts) < 3 or parts[0] != "devices" or not parts[1]:
        raise ValueError(f"not a device subject: {subject!r}")
    return parts[1]


# ---------------------------------------------------------------- what we read


class _Envelope(msgspec.Struct):
    type: str
    data: Any = None
    id: str = ""


class TypeDefined(msgspec.Struct):
    name: str
    offline_timeout_s: float | None = None
    expected_interval_s: float | None = None


class Registered(msgspec.Struct):
    device_id: str
    registered_at: str
    type: str | None = None
    offline_timeout_s: float | None = None


class Deregistered(msgspec.Struct):
    device_id: str
    deregistered_at: str


class Collected(msgspec.Struct):
    device_id: str
    received_at: str
    count: int = 1
    quality_mean: float | None = None


class StatusMessage(msgspec.Struct):
    status: str
    cause: str | None = None


class PingAnswer(msgspec.Struct):
    command_id: str


ProjectionEvent = TypeDefined | Registered | Deregistered


class UnreadableEvent(ValueError):
    """An event whose body does not match the contract it claims (never retried)."""


def decode_event(raw: bytes) -> tuple[str, Any]:
    """The CloudEvent type and its raw data."""
    try:
        envelope = msgspec.json.decode(raw, type=_Envelope)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise UnreadableEvent(f"not a CloudEvent: {error}") from None
    return envelope.type, envelope.data


def decode_projection(raw: bytes) -> ProjectionEvent | None:
    """A device lifecycle event, or None for types the status context does not project."""
    kind, data = decode_event(raw)
    target: type[ProjectionEvent]
    if kind == DEVICE_TYPE_DEFINED:
        target = TypeDefined
    elif kind == DEVICE_REGISTERED:
        target = Registered
    elif kind == DEVICE_DEREGISTERED:
        target = Deregistered
    else:
        return None
    event = _convert(data, target)
    if isinstance(event, Registered):
        parse_time(event.registered_at)
    elif isinstance(event, Deregistered):
        parse_time(event.deregistered_at)
    return event


def decode_collected(raw: bytes) -> Collected | None:
    kind, data = decode_event(raw)
    if kind != TELEMETRY_COLLECTED:
        return None
    collected = _convert(data, Collected)
    parse_time(collected.received_at)
    if collected.quality_mean is not None and not 0.0 <= collected.quality_mean <= 1.0:
        raise UnreadableEvent(f"quality_mean {collected.quality_mean} is outside [0, 1]")
    if collected.count < 0:
        raise UnreadableEvent(f"count {collected.count} is negative")
    return collected


def decode_status_message(raw: bytes) -> StatusMessage:
    message = _decode(raw, StatusMessage)
    if message.status not in ("online", "offline"):
        raise UnreadableEvent(f"status must be online or offline, got {message.status!r}")
    return message


def decode_ping_answer(raw: bytes) -> PingAnswer:
    return _decode(raw, PingAnswer)


def parse_time(text: str) -> datetime:
    try:
        return from_rfc3339(text)
    except (ValueError, TypeError):
        raise UnreadableEvent(f"not an RFC 3339 time: {text!r}") from None


_T = TypeVar("_T")


def _convert(data: Any, target: type[_T]) -> _T:
    try:
        return msgspec.convert(data, type=target)
    except msgspec.ValidationError as error:
        raise UnreadableEvent(f"bad {target.__name__} data: {error}") from None


def _decode(raw: bytes, target: type[_T]) -> _T:
    try:
        return msgspec.json.decode(raw, type=target)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise UnreadableEvent(f"bad {target.__name__}: {error}") from None
