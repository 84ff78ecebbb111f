"""What the telemetry context publishes and consumes on the backbone (versioned, stable).

Published:

* ``fleetmesh.telemetry.collected.v1`` on ``EVENTS``: one per device per stored
  transaction, covering that device's batches in it (the status context derives liveness
  from it; analytics uses it as a trigger);
* the ``TELEMETRY`` stream (``telemetry.ingest.<device>``): accepted points, one message per
  batch, ``Nats-Msg-Id`` = the batch's message id, body = ``IngestMessage`` as compact JSON
  (points as arrays ``[index, metric, value, ts_ms, quality]``); consumed by the writer;
* ``TELEMETRY_DLQ`` (``telemetry.dead.<device>``): messages the writer gave up on, with the
  reason in the ``Fleetmesh-Dead-Reason`` header.

Consumed: the device registry's ``type_defined``/``registered``/``deregistered`` events (type
names only: a context never imports another).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec

from fleetmesh.core.clock import to_rfc3339
from fleetmesh.core.envelope import CloudEvent

SOURCE: Final = "/fleetmesh/telemetry"
TELEMETRY_COLLECTED: Final = "fleetmesh.telemetry.collected.v1"

TELEMETRY_STREAM: Final = "TELEMETRY"
INGEST_SUBJECT_PREFIX: Final = "telemetry.ingest."
DEAD_LETTER_STREAM: Final = "TELEMETRY_DLQ"
DEAD_LETTER_SUBJECT_PREFIX: Final = "telemetry.dead."
DEAD_REASON_HEADER: Final = "Fleetmesh-Dead-Reason"

DEVICE_EVENTS_FILTER: Final = "events.device.>"
DEVICE_TYPE_DEFINED: Final = "fleetmesh.device.type_defined.v1"
DEVICE_REGISTERED: Final = "fleetmesh.device.registered.v1"
DEVICE_DEREGISTERED: Final = "fleetmesh.device.deregistered.v1"

_TIME = {"type": "string", "format": "date-time"}

SCHEMAS: dict[str, dict[str, Any]] = {
    TELEMETRY_COLLECTED: {
        "type": "object",
        "required": [
            "device_id",
            "count",
            "first_ts",
            "last_ts",
            "metrics",
            "received_at",
            "quality_mean",
            "message_id",
        ],
        "additionalProperties": False,
        "properties": {
            "device_id": {"type": "string", "minLength": 1},
            "count": {"type": "integer", "minimum": 1},
            "first_ts": _TIME,
            "last_ts": _TIME,
            "metrics": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "received_at": _TIME,
            "quality_mean": {"type": "number", "minimum": 0, "maximum": 1},
            "message_id": {"type": "string", "minLength": 1},
        },
    },
}

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def ms_to_datetime(ms: int) -> datetime:
    """Exact conversion of epoch milliseconds (no float rounding)."""
    return _EPOCH + timedelta(milliseconds=ms)


def ms_to_rfc3339(ms: int) -> str:
    return to_rfc3339(ms_to_datetime(ms))


def ingest_subject(device_id: str) -> str:
    return INGEST_SUBJECT_PREFIX + device_id


def dead_letter_subject(device_id: str) -> str:
    return DEAD_LETTER_SUBJECT_PREFIX + (device_id or "_")


# --------------------------------------------------------------------------- TELEMETRY stream


class WirePoint(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One accepted point on the TELEMETRY stream: ``[index, metric, value, ts_ms, quality]``."""

    index: int
    metric: str
    value: bool | int | float | str
    ts_ms: int
    quality: float


class IngestMessage(msgspec.Struct, frozen=True):
    """One accepted batch: the unit the writer stores (and deduplicates) atomically."""

    id: str
    device_id: str
    received_at_ms: int
    source: str
    points: list[WirePoint]


_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(IngestMessage)


def encode_message(message: IngestMessage) -> bytes:
    return _ENCODER.encode(message)


def decode_message(payload: bytes) -> IngestMessage:
    """Raises ``msgspec.DecodeError``/``msgspec.ValidationError`` on a foreign payload."""
    return _DECODER.decode(payload)


# --------------------------------------------------------------------------- events


def collected(
    *,
    device_id: str,
    message_id: str,
    count: int,
    first_ts_ms: int,
    last_ts_ms: int,
    metrics: list[str],
    received_at_ms: int,
    quality_mean: float,
) -> CloudEvent:
    """``fleetmesh.telemetry.collected.v1`` for a device's batches stored together."""
    return CloudEvent(
        type=TELEMETRY_COLLECTED,
        source=SOURCE,
        subject=device_id,
        correlationid=message_id,
        data={
            "device_id": device_id,
            "count": count,
            "first_ts": ms_to_rfc3339(first_ts_ms),
            "last_ts": ms_to_rfc3339(last_ts_ms),
            "metrics": sorted(metrics),
            "received_at": ms_to_rfc3339(received_at_ms),
            "quality_mean": min(1.0, max(0.0, quality_mean)),
            "message_id": message_id,
        },
    )
