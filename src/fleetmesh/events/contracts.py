"""Integration events the event bus publishes about itself (versioned, stable for consumers).

Deliveries and dead letters publish no events on purpose: a subscription to every
event whose endpoint fails would otherwise feed on its own failures.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fleetmesh.core.clock import to_rfc3339
from fleetmesh.core.envelope import CloudEvent
from fleetmesh.events.domain import Contract
from fleetmesh.events.subscription import Subscription

SOURCE = "/fleetmesh/events"
CONTRACT_REGISTERED = "fleetmesh.events.contract_registered.v1"
SUBSCRIPTION_CREATED = "fleetmesh.events.subscription_created.v1"
SUBSCRIPTION_DELETED = "fleetmesh.events.subscription_deleted.v1"

_STRING = {"type": "string"}
_TIME = {"type": "string", "format": "date-time"}

SCHEMAS: dict[str, dict[str, Any]] = {
    CONTRACT_REGISTERED: {
        "type": "object",
        "required": ["event_type", "version", "compatibility", "builtin"],
        "properties": {
            "event_type": _STRING,
            "version": {"type": "integer", "minimum": 1},
            "publisher": _STRING,
            "compatibility": _STRING,
            "builtin": {"type": "boolean"},
        },
    },
    SUBSCRIPTION_CREATED: {
        "type": "object",
        "required": ["subscription_id", "types", "endpoint", "created_at"],
        "properties": {
            "subscription_id": _STRING,
            "name": {"type": ["string", "null"]},
            "types": {"type": "array", "items": _STRING},
            "endpoint": _STRING,
            "created_at": _TIME,
        },
    },
    SUBSCRIPTION_DELETED: {
        "type": "object",
        "required": ["subscription_id", "deleted_at"],
        "properties": {"subscription_id": _STRING, "deleted_at": _TIME},
    },
}


def contract_registered(contract: Contract, *, builtin: bool) -> CloudEvent:
    return CloudEvent(
        type=CONTRACT_REGISTERED,
        source=SOURCE,
        subject=contract.event_type,
        data={
            "event_type": contract.event_type,
            "version": contract.version,
            "publisher": contract.publisher,
            "compatibility": contract.compatibility.value,
            "builtin": builtin,
        },
    )


def subscription_created(subscription: Subscription) -> CloudEvent:
    assert subscription.created_at is not None
    return CloudEvent(
        type=SUBSCRIPTION_CREATED,
        source=SOURCE,
        subject=subscription.id,
        data={
            "subscription_id": subscription.id,
            "name": subscription.name,
            "types": list(subscription.types),
            "endpoint": _redacted(subscription.endpoint.url),
            "created_at": to_rfc3339(subscription.created_at),
        },
    )


def subscription_deleted(subscription_id: str, *, deleted_at: datetime) -> CloudEvent:
    return CloudEvent(
        type=SUBSCRIPTION_DELETED,
        source=SOURCE,
        subject=subscription_id,
        data={"subscription_id": subscription_id, "deleted_at": to_rfc3339(deleted_at)},
    )


def _redacted(url: str) -> str:
    """The endpoint without credentials or query (they may carry tokens)."""
    head, _, _ = url.partition("?")
    scheme, separator, rest = head.partition("://")
    if separator and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{separator}{rest}"
