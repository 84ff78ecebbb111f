"""The CloudEvents 1.0 envelope every integration event travels in.

Type names are `fleetmesh.<context>.<event>.v<N>`; the NATS subject of a type
is `events.` followed by the type without its `fleetmesh.` prefix, so
`fleetmesh.device.registered.v1` travels on `events.device.registered.v1`
and a subscription to `events.device.>` sees every device event.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from fleetmesh.core.clock import from_rfc3339, to_rfc3339, utcnow
from fleetmesh.core.ids import new_id

SPEC_VERSION = "1.0"
EVENTS_SUBJECT_PREFIX = "events."
_UNSAFE_SUBJECT_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass(frozen=True, slots=True)
class CloudEvent:
    """A CloudEvents 1.0 event with fleetmesh's correlation and causation extensions."""

    type: str
    source: str
    data: Any
    subject: str | None = None
    id: str = field(default_factory=new_id)
    time: datetime = field(default_factory=utcnow)
    datacontenttype: str = "application/json"
    correlationid: str | None = None
    causationid: str | None = None
    extensions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return envelope(
            event_id=self.id,
            source=self.source,
            event_type=self.type,
            time=to_rfc3339(self.time),
            subject=self.subject,
            data=self.data,
            datacontenttype=self.datacontenttype,
            correlationid=self.correlationid,
            causationid=self.causationid,
            extensions=self.extensions,
        )

    def to_json(self) -> bytes:
        return msgspec.json.encode(self.to_dict())

    @property
    def nats_subject(self) -> str:
        return subject_for_type(self.type)


def envelope(
    *,
    event_id: str,
    source: str,
    event_type: str,
    time: str,
    subject: str | None,
    data: Any,
    datacontenttype: str = "application/json",
    correlationid: str | None = None,
    causationid: str | None = None,
    extensions: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON object of an event, its time already rendered (RFC 3339). `CloudEvent`
    goes through here; a hot path may too, without building a `CloudEvent` first."""
    body: dict[str, Any] = {
        "specversion": SPEC_VERSION,
        "id": event_id,
        "source": source,
        "type": event_type,
        "time": time,
        "datacontenttype": datacontenttype,
    }
    if subject is not None:
        body["subject"] = subject
    body["correlationid"] = correlationid or event_id
    if causationid:
        body["causationid"] = causationid
    if extensions:
        body.update(extensions)
    body["data"] = data
    return body


_KNOWN_ATTRIBUTES = {
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "datacontenttype",
    "subject",
    "correlationid",
    "causationid",
    "data",
}


def event_from_dict(body: dict[str, Any]) -> CloudEvent:
    """Rebuild an event read back from the store (already validated when it was written)."""
    return CloudEvent(
        type=body["type"],
        source=body["source"],
        data=body.get("data"),
        subject=body.get("subject"),
        id=body["id"],
        time=from_rfc3339(body["time"]) if body.get("time") else utcnow(),
        datacontenttype=body.get("datacontenttype", "application/json"),
        correlationid=body.get("correlationid"),
        causationid=body.get("causationid"),
        extensions={k: v for k, v in body.items() if k not in _KNOWN_ATTRIBUTES},
    )


@functools.lru_cache(maxsize=1024)
def subject_for_type(event_type: str) -> str:
    """The NATS subject an event type is stored under."""
    name = event_type.removeprefix("fleetmesh.")
    tokens = [_UNSAFE_SUBJECT_CHARS.sub("_", token) or "_" for token in name.split(".")]
    return EVENTS_SUBJECT_PREFIX + ".".join(tokens)


def subject_filter_for_type_pattern(pattern: str) -> str:
    """Map a type pattern (`fleetmesh.device.*`, `fleetmesh.>`, exact) to a subject filter."""
    if pattern in ("*", ">", "fleetmesh.>", "fleetmesh.*"):
        return EVENTS_SUBJECT_PREFIX + ">"
    name = pattern.removeprefix("fleetmesh.")
    tokens = []
    for token in name.split("."):
        if token in ("*", ">"):
            tokens.append(token)
        else:
            tokens.append(_UNSAFE_SUBJECT_CHARS.sub("_", token) or "_")
    if tokens and tokens[-1] == "*":
        # A trailing `*` reads as "and everything below", because the version
        # token makes every type at least three tokens deep.
        tokens[-1] = ">"
    return EVENTS_SUBJECT_PREFIX + ".".join(tokens)
