"""What the service registry publishes: its integration events and its KV document.

Events (CloudEvents on the `EVENTS` stream, subject = `<service>/<instance id>`):

* `fleetmesh.registry.instance_registered.v1`
* `fleetmesh.registry.instance_health_changed.v1`
* `fleetmesh.registry.instance_deregistered.v1`

The registry keeps no SQL state, so there is no transactional outbox: each
event is published to JetStream right after the KV write that caused it, with
`Nats-Msg-Id` = the event id. A failed publish is retried in the background
with the same id (JetStream drops duplicates), so delivery is at-least-once
while the process lives; a crash between the KV write and the publish loses
that one event, and the KV bucket stays the source of truth.

KV bucket `registry` (history 1, no bucket TTL: liveness is the per-instance
check, not the age of the record):

* `<service>.<instance>` -> the JSON instance document below. The instance id
  is one KV token: `.` is written `=2E` and `:` is written `=3A` (instance ids
  never contain `=`).
* `_hb.<service>.<instance>` -> `{"at": "<RFC 3339>"}`: the last TTL heartbeat.
  Heartbeats live apart from the document so that they do not bump the
  service's index and wake every watcher; only health changes do.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from fleetmesh.core.clock import from_rfc3339, to_rfc3339
from fleetmesh.core.envelope import CloudEvent
from fleetmesh.registry.domain import (
    DEFAULT_FAILURES_BEFORE_CRITICAL,
    CheckKind,
    HealthCheck,
    HealthState,
    InstanceHealthChanged,
    ServiceInstance,
)

SOURCE = "/fleetmesh/registry"
INSTANCE_REGISTERED = "fleetmesh.registry.instance_registered.v1"
INSTANCE_HEALTH_CHANGED = "fleetmesh.registry.instance_health_changed.v1"
INSTANCE_DEREGISTERED = "fleetmesh.registry.instance_deregistered.v1"

REGISTRY_BUCKET = "registry"
HEARTBEAT_PREFIX = "_hb."

_STRING = {"type": "string"}
_TIME = {"type": "string", "format": "date-time"}
_STATE = {"type": "string", "enum": [state.value for state in HealthState]}
_IDENTITY = {"service": _STRING, "instance_id": _STRING}

SCHEMAS: dict[str, dict[str, Any]] = {
    INSTANCE_REGISTERED: {
        "type": "object",
        "required": ["service", "instance_id", "address", "port", "check", "registered_at"],
        "properties": {
            **_IDENTITY,
            "address": _STRING,
            "port": {"type": "integer"},
            "version": _STRING,
            "zone": _STRING,
            "tags": {"type": "array", "items": _STRING},
            "metadata": {"type": "object", "additionalProperties": _STRING},
            "weight": {"type": "integer"},
            "check": {"type": "object"},
            "registered_at": _TIME,
        },
    },
    INSTANCE_HEALTH_CHANGED: {
        "type": "object",
        "required": ["service", "instance_id", "previous", "current", "at", "reason"],
        "properties": {
            **_IDENTITY,
            "previous": _STATE,
            "current": _STATE,
            "at": _TIME,
            "reason": _STRING,
        },
    },
    INSTANCE_DEREGISTERED: {
        "type": "object",
        "required": ["service", "instance_id", "at", "reason"],
        "properties": {**_IDENTITY, "at": _TIME, "reason": _STRING},
    },
}


# -- KV keys -------------------------------------------------------------

_ESCAPES = (("=", "=3D"), (".", "=2E"), (":", "=3A"))


def _escape(instance_id: str) -> str:
    for raw, escaped in _ESCAPES:
        instance_id = instance_id.replace(raw, escaped)
    return instance_id


def _unescape(token: str) -> str:
    for raw, escaped in reversed(_ESCAPES):
        token = token.replace(escaped, raw)
    return token


def kv_key(service: str, instance_id: str) -> str:
    """The KV key of an instance document."""
    return f"{service}.{_escape(instance_id)}"


def heartbeat_key(service: str, instance_id: str) -> str:
    """The KV key of an instance's last TTL heartbeat."""
    return HEARTBEAT_PREFIX + kv_key(service, instance_id)


def parse_kv_key(key: str) -> tuple[str, str] | None:
    """`(service, instance_id)` of an instance document key, None for any other key."""
    if key.startswith(HEARTBEAT_PREFIX):
        return None
    service, dot, token = key.partition(".")
    if not dot or not token:
        return None
    return service, _unescape(token)


# -- the instance document -------------------------------------------------


def check_document(check: HealthCheck) -> dict[str, Any]:
    document: dict[str, Any] = {
        "kind": check.kind.value,
        "interval": check.interval,
        "deregister_critical_after": check.deregister_critical_after,
    }
    if check.is_active:
        document["timeout"] = check.timeout
        document["failures_before_critical"] = check.failures_before_critical
    if check.http_path is not None:
        document["http_path"] = check.http_path
    return document


def check_from_document(document: Mapping[str, Any]) -> HealthCheck:
    kind = CheckKind(document["kind"])
    return HealthCheck(
        kind=kind,
        interval=float(document["interval"]),
        timeout=float(document.get("timeout") or 0.0),
        deregister_critical_after=float(document["deregister_critical_after"]),
        http_path=document.get("http_path"),
        failures_before_critical=int(
            document.get("failures_before_critical") or DEFAULT_FAILURES_BEFORE_CRITICAL
        ),
    )


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else to_rfc3339(moment)


def _parse_time(text: Any) -> datetime | None:
    return from_rfc3339(text) if isinstance(text, str) and text else None


def instance_document(
    instance: ServiceInstance, *, last_check_at: datetime | None = None, output: str = ""
) -> dict[str, Any]:
    """The published JSON form of an instance with its health."""
    return {
        "service": instance.service,
        "instance_id": instance.instance_id,
        "address": instance.address,
        "port": instance.port,
        "version": instance.version,
        "zone": instance.zone,
        "tags": list(instance.tags),
        "metadata": dict(instance.metadata),
        "weight": instance.weight,
        "check": check_document(instance.check),
        "registered_at": to_rfc3339(instance.registered_at),
        "health": {
            "state": instance.state.value,
            "consecutive_failures": instance.consecutive_failures,
            "critical_since": _time(instance.critical_since),
            "last_heartbeat": _time(instance.last_heartbeat),
            "last_check_at": _time(last_check_at),
            "output": output,
        },
    }


def instance_from_document(document: Mapping[str, Any]) -> ServiceInstance:
    """Rebuild an instance; unknown fields are ignored (open world)."""
    health = document.get("health") or {}
    return ServiceInstance(
        service=document["service"],
        instance_id=document["instance_id"],
        address=document["address"],
        port=int(document["port"]),
        registered_at=from_rfc3339(document["registered_at"]),
        check=check_from_document(document["check"]),
        version=document.get("version", ""),
        zone=document.get("zone", ""),
        tags=tuple(document.get("tags", ())),
        metadata=dict(document.get("metadata", {})),
        weight=int(document.get("weight", 100)),
        state=HealthState(health.get("state", HealthState.PASSING.value)),
        consecutive_failures=int(health.get("consecutive_failures", 0)),
        critical_since=_parse_time(health.get("critical_since")),
        last_heartbeat=_parse_time(health.get("last_heartbeat")),
    )


def last_check_of(document: Mapping[str, Any]) -> datetime | None:
    return _parse_time((document.get("health") or {}).get("last_check_at"))


# -- events ------------------------------------------------------------------


def registered(instance: ServiceInstance) -> CloudEvent:
    document = instance_document(instance)
    document.pop("health")
    return CloudEvent(
        type=INSTANCE_REGISTERED, source=SOURCE, subject=instance.qualified_id, data=document
    )


def health_changed(change: InstanceHealthChanged) -> CloudEvent:
    return CloudEvent(
        type=INSTANCE_HEALTH_CHANGED,
        source=SOURCE,
        subject=f"{change.service}/{change.instance_id}",
        data={
            "service": change.service,
            "instance_id": change.instance_id,
            "previous": change.previous.value,
            "current": change.current.value,
            "at": to_rfc3339(change.at),
            "reason": change.reason,
        },
    )


def deregistered(instance: ServiceInstance, *, at: datetime, reason: str) -> CloudEvent:
    return CloudEvent(
        type=INSTANCE_DEREGISTERED,
        source=SOURCE,
        subject=instance.qualified_id,
        data={
            "service": instance.service,
            "instance_id": instance.instance_id,
            "at": to_rfc3339(at),
            "reason": reason,
        },
    )
