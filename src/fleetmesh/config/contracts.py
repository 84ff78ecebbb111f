"""What the configuration center publishes: its event and its KV mirror.

Event `fleetmesh.config.changed.v1` (through the outbox, subject
`<namespace>/<service>/<key>`): every new version, set, rollback or deletion.

KV bucket `config` (the contract `fleetmesh.core.live_config` reads): key
`<namespace>.<service>.<key>`, value `{"version": N, "value": <json>}` for the
current version. A deletion is a KV delete marker whose payload is
`{"version": N, "deleted": true}`, so a reader sees a deletion (LiveConfig
drops the value) and the mirror can still tell its version. The mirror only
ever moves an entry forward: an older version never replaces a newer one.
"""

from __future__ import annotations

import json
from typing import Any

from fleetmesh.config.domain import ChangeKind, ConfigChanged
from fleetmesh.core.clock import to_rfc3339
from fleetmesh.core.envelope import CloudEvent

SOURCE = "/fleetmesh/config"
CONFIG_CHANGED = "fleetmesh.config.changed.v1"

_STRING = {"type": "string"}

SCHEMAS: dict[str, dict[str, Any]] = {
    CONFIG_CHANGED: {
        "type": "object",
        "required": ["namespace", "service", "key", "version", "kind", "deleted", "author", "at"],
        "properties": {
            "namespace": _STRING,
            "service": _STRING,
            "key": _STRING,
            "version": {"type": "integer", "minimum": 1},
            "kind": {"type": "string", "enum": [kind.value for kind in ChangeKind]},
            "value": {},
            "deleted": {"type": "boolean"},
            "author": _STRING,
            "at": {"type": "string", "format": "date-time"},
            "comment": _STRING,
        },
    },
}


def changed(change: ConfigChanged) -> CloudEvent:
    return CloudEvent(
        type=CONFIG_CHANGED,
        source=SOURCE,
        subject=f"{change.namespace}/{change.service}/{change.key}",
        data={
            "namespace": change.namespace,
            "service": change.service,
            "key": change.key,
            "version": change.version,
            "kind": change.kind.value,
            "value": change.value,
            "deleted": change.deleted,
            "author": change.author,
            "at": to_rfc3339(change.at),
            "comment": change.comment,
        },
    )


def kv_value(version: int, value_json: str) -> bytes:
    """The KV document of a current value (the JSON text is embedded as is)."""
    return b'{"version":%d,"value":%s}' % (version, value_json.encode())


def kv_tombstone(version: int) -> bytes:
    return json.dumps({"version": version, "deleted": True}).encode()


def kv_version(payload: bytes | None) -> int:
    """The version a KV document or delete marker carries (0 if none)."""
    if not payload:
        return 0
    try:
        return int(json.loads(payload)["version"])
    except (ValueError, KeyError, TypeError):
        return 0
