"""Compatibility of contract versions: each mode, each kind of change, transitivity."""

from __future__ import annotations

from typing import Any

import pytest

from fleetmesh.events.compatibility import (
    Incompatibility,
    check_new_version,
    schema_incompatibilities,
)
from fleetmesh.events.domain import CompatibilityMode, Contract, ContractConflict

pytestmark = pytest.mark.unit

EVENT_TYPE = "fleetmesh.devices.reading_taken.v1"
Mode = CompatibilityMode


def obj(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), **extra}


def contract(schema: Any, version: int = 1) -> Contract:
    return Contract(EVENT_TYPE, version, schema, "devices")


STRING = {"type": "string"}
INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}
CLOSED = {"additionalProperties": False}

# (name, old schema, new schema, backward compatible, forward compatible)
CHANGES: list[tuple[str, Any, Any, bool, bool]] = [
    ("identical", obj({"a": STRING}), obj({"a": STRING}), True, True),
    (
        "description only",
        obj({"a": STRING}),
        obj({"a": {**STRING, "description": "the a"}}, title="T"),
        True,
        True,
    ),
    (
        "add optional to open model",
        obj({"a": STRING}),
        obj({"a": STRING, "b": STRING}),
        False,
        True,
    ),
    (
        "add optional to closed model",
        obj({"a": STRING}, **CLOSED),
        obj({"a": STRING, "b": STRING}, **CLOSED),
        True,
        False,
    ),
    (
        "add required to closed model",
        obj({"a": STRING}, **CLOSED),
        obj({"a": STRING, "b": STRING}, ("b",), **CLOSED),
        False,
        False,
    ),
    (
        "add required to open model",
        obj({"a": STRING}),
        obj({"a": STRING, "b": STRING}, ("b",)),
        False,
        True,
    ),
    ("remove from open model", obj({"a": STRING, "b": STRING}), obj({"a": STRING}), True, False),
    (
        "remove from closed model",
        obj({"a": STRING, "b": STRING}, **CLOSED),
        obj({"a": STRING}, **CLOSED),
        False,
        True,
    ),
    ("optional becomes required", obj({"a": STRING}), obj({"a": STRING}, ("a",)), False, True),
    ("required becomes optional", obj({"a": STRING}, ("a",)), obj({"a": STRING}), True, False),
    ("number to string", obj({"t": NUMBER}), obj({"t": STRING}), False, False),
    ("integer widened to number", obj({"t": INTEGER}), obj({"t": NUMBER}), True, False),
    ("number narrowed to integer", obj({"t": NUMBER}), obj({"t": INTEGER}), False, True),
    (
        "string becomes nullable",
        obj({"a": STRING}),
        obj({"a": {"type": ["string", "null"]}}),
        True,
        False,
    ),
    ("enum value added", {"enum": ["on", "off"]}, {"enum": ["on", "off", "idle"]}, True, False),
    ("enum value removed", {"enum": ["on", "off"]}, {"enum": ["on"]}, False, True),
    ("enum added over string", STRING, {"type": "string", "enum": ["on"]}, False, True),
    ("content model closed", obj({"a": STRING}), obj({"a": STRING}, **CLOSED), False, True),
    ("content model opened", obj({"a": STRING}, **CLOSED), obj({"a": STRING}), True, False),
    (
        "nested type change",
        obj({"location": obj({"lat": NUMBER})}),
        obj({"location": obj({"lat": STRING})}),
        False,
        False,
    ),
    (
        "nested property added to closed model",
        obj({"location": obj({"lat": NUMBER}, **CLOSED)}),
        obj({"location": obj({"lat": NUMBER, "lon": NUMBER}, **CLOSED)}),
        True,
        False,
    ),
    (
        "array items widened",
        {"type": "array", "items": INTEGER},
        {"type": "array", "items": NUMBER},
        True,
        False,
    ),
    (
        "array items changed",
        {"type": "array", "items": INTEGER},
        {"type": "array", "items": STRING},
        False,
        False,
    ),
    (
        "property covered by partially open model",
        obj({}, additionalProperties=STRING),
        obj({"b": STRING}, additionalProperties=STRING),
        True,
        True,
    ),
    (
        "property not covered by partially open model",
        obj({}, additionalProperties=STRING),
        obj({"b": INTEGER}, additionalProperties=STRING),
        False,
        False,
    ),
    (
        "maxLength increased",
        {"type": "string", "maxLength": 5},
        {"type": "string", "maxLength": 9},
        True,
        False,
    ),
    (
        "minimum raised",
        {"type": "number", "minimum": 0},
        {"type": "number", "minimum": 1},
        False,
        True,
    ),
    ("pattern added", STRING, {"type": "string", "pattern": "^a"}, False, True),
    (
        "anyOf to type list",
        {"anyOf": [STRING, {"type": "null"}]},
        {"type": ["string", "null"]},
        True,
        True,
    ),
    ("anyOf alternative added", {"anyOf": [STRING]}, {"anyOf": [STRING, INTEGER]}, True, False),
]

EXPECTED_BY_MODE = {
    Mode.BACKWARD: lambda backward, forward: backward,
    Mode.BACKWARD_TRANSITIVE: lambda backward, forward: backward,
    Mode.FORWARD: lambda backward, forward: forward,
    Mode.FORWARD_TRANSITIVE: lambda backward, forward: forward,
    Mode.FULL: lambda backward, forward: backward and forward,
    Mode.FULL_TRANSITIVE: lambda backward, forward: backward and forward,
    Mode.NONE: lambda backward, forward: True,
}


@pytest.mark.parametrize("mode", list(Mode), ids=str)
@pytest.mark.parametrize(
    ("old", "new", "backward", "forward"),
    [case[1:] for case in CHANGES],
    ids=[case[0] for case in CHANGES],
)
def test_each_mode_accepts_exactly_the_compatible_changes(
    mode: Mode, old: Any, new: Any, backward: bool, forward: bool
) -> None:
    findings = check_new_version([contract(old)], contract(new, version=2), mode)

    assert (not findings) is EXPECTED_BY_MODE[mode](backward, forward), findings


@pytest.mark.parametrize(
    ("old", "new", "direction", "expected"),
    [
        (
            obj({"temp": NUMBER}),
            obj({"temp": STRING}),
            "backward",
            "/properties/temp: type changed from number to string",
        ),
        (
            obj({"temp": INTEGER}),
            obj({"temp": NUMBER}),
            "forward",
            "/properties/temp: type changed from integer to number",
        ),
        (
            obj({"a": STRING}),
            obj({"a": STRING, "b": STRING}),
            "backward",
            "/properties/b: property added to an open content model",
        ),
        (
            obj({"a": STRING, "b": STRING}, **CLOSED),
            obj({"a": STRING}, **CLOSED),
            "backward",
            "/properties/b: property removed from a closed content model",
        ),
        (
            obj({"a": STRING}, **CLOSED),
            obj({"a": STRING, "b": STRING}, **CLOSED),
            "forward",
            "/properties/b: property added, but the old content model is closed",
        ),
        (
            obj({"a": STRING}),
            obj({"a": STRING}, ("a",)),
            "backward",
            "/properties/a: property became required",
        ),
        (
            obj({"a": STRING}),
            obj({"a": STRING}, **CLOSED),
            "backward",
            "/additionalProperties: content model closed (additionalProperties: false)",
        ),
        (
            obj({"loc": obj({"lat": NUMBER})}),
            obj({"loc": obj({"lat": STRING})}),
            "backward",
            "/properties/loc/properties/lat: type changed from number to string",
        ),
        (
            {"type": "array", "items": INTEGER},
            {"type": "array", "items": STRING},
            "backward",
            "/items: type changed from integer to string",
        ),
        (
            {"enum": ["on", "off"]},
            {"enum": ["on"]},
            "backward",
            '(root): no longer accepts ["off"]',
        ),
        (
            {"type": "number", "minimum": 0},
            {"type": "number", "exclusiveMinimum": 0},
            "backward",
            "(root): minimum changed from >= 0 to > 0",
        ),
    ],
)
def test_findings_name_the_path_and_the_change(
    old: Any, new: Any, direction: Any, expected: str
) -> None:
    findings = schema_incompatibilities(old, new, direction)

    assert [str(finding) for finding in findings] == [expected]


def test_findings_of_a_version_check_carry_version_and_direction() -> None:
    findings = check_new_version(
        [contract(obj({"t": NUMBER}))], contract(obj({"t": STRING}), 2), Mode.FULL
    )

    assert findings == [
        Incompatibility("/properties/t", "type changed from number to string", 1, "backward"),
        Incompatibility("/properties/t", "type changed from number to string", 1, "forward"),
    ]


def test_every_incompatible_change_is_listed() -> None:
    old = obj({"a": STRING, "b": NUMBER, "c": STRING}, **CLOSED)
    new = obj({"a": INTEGER, "b": NUMBER}, ("b",), **CLOSED)

    paths = [finding.path for finding in schema_incompatibilities(old, new, "backward")]

    assert paths == ["/properties/a", "/properties/c", "/properties/b"]


@pytest.mark.parametrize(
    ("versions", "candidate", "mode"),
    [
        # v2 was registered without checks; v3 fits v2 but not v1.
        ([STRING, INTEGER], NUMBER, Mode.BACKWARD),
        ([STRING, NUMBER], INTEGER, Mode.FORWARD),
        ([STRING, INTEGER], INTEGER, Mode.FULL),
    ],
)
def test_transitive_modes_check_every_earlier_version(
    versions: list[Any], candidate: Any, mode: Mode
) -> None:
    existing = [contract(obj({"x": schema}), index + 1) for index, schema in enumerate(versions)]
    new = contract(obj({"x": candidate}), len(versions) + 1)
    transitive = Mode(f"{mode.value}_TRANSITIVE")

    assert check_new_version(existing, new, mode) == []
    findings = check_new_version(existing, new, transitive)
    assert findings
    assert {finding.version for finding in findings} == {1}


def test_the_first_version_is_always_compatible() -> None:
    assert check_new_version([], contract(obj({"a": STRING})), Mode.FULL_TRANSITIVE) == []


def test_a_candidate_must_be_newer_than_every_existing_version() -> None:
    with pytest.raises(ContractConflict):
        check_new_version([contract(STRING, 3)], contract(STRING, 2), Mode.BACKWARD)


def test_a_candidate_must_have_the_same_event_type() -> None:
    other = Contract("fleetmesh.devices.other.v1", 1, STRING, "devices")
    with pytest.raises(ContractConflict):
        check_new_version([other], contract(STRING, 2), Mode.BACKWARD)


def test_recursive_references_are_followed() -> None:
    def tree(value_type: str) -> dict[str, Any]:
        node = obj(
            {"value": {"type": value_type}, "children": {"type": "array", "items": {"$ref": "#"}}}
        )
        return node

    assert schema_incompatibilities(tree("integer"), tree("number"), "backward") == []
    findings = schema_incompatibilities(tree("integer"), tree("string"), "backward")
    assert [finding.path for finding in findings] == ["/properties/value"]


def test_definitions_are_compared_through_references() -> None:
    def schema(serial: dict[str, Any]) -> dict[str, Any]:
        return {**obj({"serial": {"$ref": "#/$defs/serial"}}), "$defs": {"serial": serial}}

    findings = schema_incompatibilities(
        schema({"type": "string"}), schema({"type": "string", "maxLength": 4}), "backward"
    )

    assert [str(finding) for finding in findings] == [
        "/properties/serial: maxLength changed from none to <= 4"
    ]


def test_boolean_schemas() -> None:
    assert schema_incompatibilities(STRING, True, "backward") == []
    assert schema_incompatibilities(False, STRING, "backward") == []
    assert [str(f) for f in schema_incompatibilities(True, False, "backward")] == [
        "(root): schema changed from true (anything) to false (nothing)"
    ]
