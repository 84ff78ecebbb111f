"""AsyncAPI 3.0 document of the event bus, generated from the event contracts.

Layout of the document:

* one server (NATS) from :class:`ServerInfo`;
* one channel per event type, addressed by the NATS subject the type travels on
  (:func:`fleetmesh.core.envelope.subject_for_type`, e.g. ``events.devices.registered.v1``);
* one message per event type: the CloudEvents structured-mode envelope
  (``application/cloudevents+json``) whose ``data`` is the contract schema, kept under
  ``components/schemas``; the message carries the contract's version, publisher and
  compatibility mode as ``x-fleetmesh-*`` extensions;
* one ``send`` operation per event type.

When several versions of a contract are given, the latest describes the type. Payload schemas
are AsyncAPI Schema Objects (a JSON Schema draft-07 superset): the contract's ``$schema`` and
``$id`` are dropped and its local ``$ref`` are rewritten to point into the document; keywords
new in Draft 2020-12 (``prefixItems``, ``$defs`` ...) are passed through unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fleetmesh.core.envelope import EVENTS_SUBJECT_PREFIX, subject_for_type
from fleetmesh.events.cloudevents import SPEC_VERSION, STRUCTURED_CONTENT_TYPE
from fleetmesh.events.domain import Contract, JsonSchema

ASYNCAPI_VERSION = "3.0.0"
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9._-]")
_NON_SCHEMA_VALUES = frozenset({"enum", "const", "default", "examples"})
_DROPPED_KEYWORDS = ("$schema", "$id")


@dataclass(frozen=True)
class ServerInfo:
    """What the document says about the API and the NATS server carrying it."""

    title: str = "fleetmesh event bus"
    version: str = "1.0.0"
    host: str = "localhost:4222"
    description: str = "Integration events of the fleetmesh platform, as CloudEvents over NATS."
    server_name: str = "nats"
    protocol: str = "nats"


def build_asyncapi(contracts: Iterable[Contract], server_info: ServerInfo) -> dict[str, Any]:
    """An AsyncAPI 3.0 document describing every event type of the given contracts."""
    latest = _latest_versions(contracts)
    keys = _unique_keys(sorted(latest))
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for event_type in sorted(latest):
        contract, key = latest[event_type], keys[event_type]
        schemas[key] = _envelope_schema(contract, f"#/components/schemas/{key}/properties/data")
        messages[key] = _message(contract, key)
        channels[key] = _channel(contract, key)
        operations[f"send.{key}"] = _operation(contract, key)
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": _info(server_info),
        "defaultContentType": STRUCTURED_CONTENT_TYPE,
        "servers": {server_info.server_name: _server(server_info)},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def _latest_versions(contracts: Iterable[Contract]) -> dict[str, Contract]:
    latest: dict[str, Contract] = {}
    for contract in contracts:
        known = latest.get(contract.event_type)
        if known is None or contract.version > known.version:
            latest[contract.event_type] = contract
    return latest


def _unique_keys(event_types: Iterable[str]) -> dict[str, str]:
    """Component keys (``[A-Za-z0-9._-]+``) for event types, distinct even after escaping."""
    keys: dict[str, str] = {}
    taken: set[str] = set()
    for event_type in event_types:
        base = _UNSAFE_KEY.sub("_", event_type)
        key, counter = base, 1
        while key in taken:
            counter += 1
            key = f"{base}_{counter}"
        keys[event_type] = key
        taken.add(key)
    return keys


def _info(server_info: ServerInfo) -> dict[str, Any]:
    info = {"title": server_info.title, "version": server_info.version}
    if server_info.description:
        info["description"] = server_info.description
    return info


def _server(server_info: ServerInfo) -> dict[str, Any]:
    return {
        "host": server_info.host,
        "protocol": server_info.protocol,
        "description": f"NATS subjects under {EVENTS_SUBJECT_PREFIX}>",
    }


def _channel(contract: Contract, key: str) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "address": subject_for_type(contract.event_type),
        "title": contract.event_type,
        "messages": {key: {"$ref": f"#/components/messages/{key}"}},
    }
    if contract.description:
        channel["description"] = contract.description
    return channel


def _operation(contract: Contract, key: str) -> dict[str, Any]:
    return {
        "action": "send",
        "channel": {"$ref": f"#/channels/{key}"},
        "messages": [{"$ref": f"#/channels/{key}/messages/{key}"}],
        "summary": f"{contract.publisher} publishes {contract.event_type}",
    }


def _message(contract: Contract, key: str) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": contract.event_type,
        "title": contract.event_type,
        "contentType": STRUCTURED_CONTENT_TYPE,
        "payload": {"$ref": f"#/components/schemas/{key}"},
        "x-fleetmesh-contract-version": contract.version,
        "x-fleetmesh-publisher": contract.publisher,
        "x-fleetmesh-compatibility": contract.compatibility.value,
    }
    builtin = contract.builtin
    if builtin is not None:
        message["tags"] = [{"name": builtin.context}]
    if contract.description:
        message["summary"] = contract.description
    return message


def _envelope_schema(contract: Contract, data_location: str) -> dict[str, Any]:
    string = {"type": "string", "minLength": 1}
    return {
        "type": "object",
        "description": f"CloudEvents {SPEC_VERSION} envelope of {contract.event_type}",
        "required": ["specversion", "id", "source", "type"],
        "properties": {
            "specversion": {"type": "string", "const": SPEC_VERSION},
            "id": string,
            "source": {**string, "format": "uri-reference"},
            "type": {"type": "string", "const": contract.event_type},
            "time": {"type": "string", "format": "date-time"},
            "subject": string,
            "datacontenttype": string,
            "dataschema": {"type": "string", "format": "uri"},
            "correlationid": string,
            "causationid": string,
            "data": _embedded(contract.schema, data_location),
        },
    }


def _embedded(schema: JsonSchema, location: str) -> Any:
    """The contract schema, made to live at ``location`` inside the document."""
    if isinstance(schema, bool):
        return schema
    trimmed = {key: value for key, value in schema.items() if key not in _DROPPED_KEYWORDS}
    return _rewrite_references(trimmed, location)


def _rewrite_references(node: Any, location: str) -> Any:
    if isinstance(node, Mapping):
        return {key: _rewrite_value(key, value, location) for key, value in node.items()}
    if isinstance(node, list):
        return [_rewrite_references(item, location) for item in node]
    return node


def _rewrite_value(key: str, value: Any, location: str) -> Any:
    if key == "$ref" and isinstance(value, str) and value.startswith("#"):
        return location + value[1:]
    if key in _NON_SCHEMA_VALUES:
        return value
    return _rewrite_references(value, location)
