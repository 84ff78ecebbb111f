"""The AsyncAPI 3.0 document generated from contracts is valid and self-consistent.

``asyncapi-3.0.0.schema.json`` is the official AsyncAPI 3.0.0 JSON Schema, copied unchanged
from ``schemas/3.0.0-without-$id.json`` of the npm package ``@asyncapi/specs`` 6.11.1
(Apache-2.0; no PyPI package ships it).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from fleetmesh.events.asyncapi import ServerInfo, build_asyncapi
from fleetmesh.events.cloudevents import CloudEvent, to_structured
from fleetmesh.events.domain import Contract

pytestmark = pytest.mark.unit

SCHEMA_FILE = Path(__file__).with_name("asyncapi-3.0.0.schema.json")
DOCUMENT_URI = "urn:fleetmesh:asyncapi"

REGISTERED_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["serial"],
    "properties": {"serial": {"$ref": "#/$defs/serial"}, "model": {"type": "string"}},
    "$defs": {"serial": {"type": "string", "pattern": "^[A-Z0-9-]+$"}},
}
REGISTERED = Contract(
    "fleetmesh.devices.registered.v1", 1, REGISTERED_SCHEMA, "devices", "A device was registered."
)
REGISTERED_V2 = Contract(
    REGISTERED.event_type,
    2,
    {**REGISTERED_SCHEMA, "additionalProperties": True},
    "devices",
    "A device was registered (v2).",
)
DOOR_OPENED = Contract("com.acme.door opened", 1, True, "acme")
CONTRACTS = [REGISTERED, DOOR_OPENED, REGISTERED_V2]


@cache
def asyncapi_validator() -> Draft7Validator:
    return Draft7Validator(json.loads(SCHEMA_FILE.read_text()))


def document() -> dict[str, Any]:
    return build_asyncapi(CONTRACTS, ServerInfo(host="nats.fleetmesh.test:4222"))


def test_the_document_validates_against_the_official_asyncapi_3_schema() -> None:
    errors = [error.message for error in asyncapi_validator().iter_errors(document())]

    assert errors == []


def test_the_official_schema_does_reject_broken_documents() -> None:
    broken = document()
    broken["operations"]["send.com.acme.door_opened"]["action"] = "publish"
    del broken["servers"]["nats"]["protocol"]

    assert len(list(asyncapi_validator().iter_errors(broken))) == 2


def test_one_channel_message_and_send_operation_per_event_type() -> None:
    doc = document()
    key = "fleetmesh.devices.registered.v1"

    assert doc["asyncapi"] == "3.0.0"
    assert doc["servers"]["nats"]["host"] == "nats.fleetmesh.test:4222"
    assert sorted(doc["channels"]) == ["com.acme.door_opened", key]
    assert doc["channels"][key]["address"] == "events.devices.registered.v1"
    assert doc["channels"]["com.acme.door_opened"]["address"] == "events.com.acme.door_opened"
    assert doc["operations"][f"send.{key}"]["action"] == "send"
    message = doc["components"]["messages"][key]
    assert message["contentType"] == "application/cloudevents+json"
    assert message["x-fleetmesh-contract-version"] == 2
    assert message["summary"] == "A device was registered (v2)."


def resolve(doc: dict[str, Any], reference: str) -> Any:
    node: Any = doc
    for part in reference.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def references(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in references(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in references(item)]
    return []


def test_every_reference_resolves_inside_the_document() -> None:
    doc = document()

    refs = references(doc)

    assert (
        "#/components/schemas/fleetmesh.devices.registered.v1/properties/data/$defs/serial" in refs
    )
    for reference in refs:
        resolve(doc, reference)


def payload_validator(doc: dict[str, Any], key: str) -> Draft7Validator:
    registry: Registry[Any] = Registry().with_resource(
        DOCUMENT_URI, Resource.from_contents(doc, default_specification=DRAFT7)
    )
    return Draft7Validator(
        {"$ref": f"{DOCUMENT_URI}#/components/messages/{key}/payload"}, registry=registry
    )


def test_the_payload_schema_accepts_a_real_event_and_rejects_bad_data() -> None:
    validator = payload_validator(document(), "fleetmesh.devices.registered.v1")
    good = CloudEvent(
        id="1", source="/devices", type=REGISTERED.event_type, data={"serial": "SN-1"}
    )
    bad_data = CloudEvent(
        id="1", source="/devices", type=REGISTERED.event_type, data={"serial": "lower"}
    )
    wrong_type = CloudEvent(id="1", source="/devices", type="other", data={"serial": "SN-1"})

    assert validator.is_valid(to_structured(good))
    assert not validator.is_valid(to_structured(bad_data))
    assert not validator.is_valid(to_structured(wrong_type))


def test_the_embedded_data_schema_is_the_contract_schema_relocated() -> None:
    doc = document()
    key = "fleetmesh.devices.registered.v1"
    data_schema = doc["components"]["schemas"][key]["properties"]["data"]

    assert data_schema == {
        **{name: value for name, value in REGISTERED_V2.schema.items() if name != "$schema"},
        "properties": {
            "serial": {"$ref": f"#/components/schemas/{key}/properties/data/$defs/serial"},
            "model": {"type": "string"},
        },
    }


def test_no_contracts_still_make_a_valid_document() -> None:
    doc = build_asyncapi([], ServerInfo())

    assert list(asyncapi_validator().iter_errors(doc)) == []
    assert doc["channels"] == {} and doc["operations"] == {}
