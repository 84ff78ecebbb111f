"""Compatibility of JSON Schema contract versions, with schema-registry (Confluent) semantics.

Modes
    BACKWARD: readers using the new schema can read data written with the previous one, i.e.
    everything the old schema accepts, the new one accepts. FORWARD: everything the new
    schema accepts, the old one accepts. FULL: both. ``*_TRANSITIVE``: against every earlier
    version instead of only the latest. NONE: no check.

How a pair of schemas is compared
    One check asks whether a *reader* schema accepts everything a *writer* schema accepts
    (backward: writer = old, reader = new; forward: the other way round). It walks both
    schemas side by side and reports each place where the reader is stricter. Messages always
    describe the change from old to new, paths are JSON Pointers to the place in the schemas.

Rules followed (Confluent's JSON Schema rules where practical)
    * Types: a reader must accept every type the writer allows; ``integer`` -> ``number`` is a
      widening, ``number`` -> ``integer`` a narrowing. A missing ``type`` allows every type.
    * Content models: an object schema is *closed* with ``additionalProperties: false``,
      *partially open* with an ``additionalProperties`` schema or matching
      ``patternProperties``, otherwise *open* (``unevaluatedProperties`` stands in when
      ``additionalProperties`` is absent). Adding a property to an open model is not backward
      compatible (old data may already hold any value under that name); adding one to a
      closed model is; adding one to a partially open model is when its schema accepts what
      the open part accepted. Removing a property is the mirror image: fine for an open
      model, not for a closed one. Closing an open model is a narrowing.
    * ``required``: a property the reader requires but the writer does not is incompatible.
      Unlike Confluent, a ``default`` does not excuse it: ``validate_data`` does not fill in
      defaults, so the data would be rejected.
    * Enums and ``const``: when the writer allows a finite set of values, each value is
      validated against the reader schema (exact). A reader enum over an unrestricted writer
      is a narrowing.
    * Bounds (``minimum``/``exclusiveMinimum``, ``maximum``/``exclusiveMaximum``,
      ``min/maxLength``, ``min/maxItems``, ``min/maxProperties``) may only widen; a new
      ``multipleOf`` must divide the old one; ``uniqueItems`` may only be dropped.
    * Arrays: ``items`` and ``prefixItems`` are compared position by position.
    * ``allOf`` / ``anyOf`` / ``oneOf``: a writer's ``allOf`` is merged into it and each writer
      ``anyOf``/``oneOf`` alternative is compared on its own (shallow merges, which only ever
      widen the writer). Each reader ``allOf`` part must accept the writer; some reader
      ``anyOf``/``oneOf`` alternative must accept the writer (``oneOf`` exclusivity is not
      checked, as in Confluent).
    * Local ``$ref`` (``#/...``) are followed, recursion included. A ``$ref`` with sibling
      keywords is treated as ``allOf`` of the siblings and the target.
    * Not analysed (``pattern``, ``format``, ``not``, ``if``/``then``/``else``,
      ``contains``, ``propertyNames``, ``dependentRequired``/``dependentSchemas``,
      ``unevaluatedItems``, non-local ``$ref``): unchanged is fine, removed from the reader is a
      widening, added or changed counts as incompatible.
    * Annotations (``title``, ``description``, ``default``, ``examples``, ...) are ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

from jsonschema.protocols import Validator
from referencing.exceptions import Unresolvable

from fleetmesh.events.domain import (
    CompatibilityMode,
    Contract,
    ContractConflict,
    JsonSchema,
    canonical_json,
    json_pointer,
    schema_validator,
)

Direction = Literal["backward", "forward"]
Path = tuple[str | int, ...]

ALL_TYPES = frozenset({"array", "boolean", "integer", "null", "number", "object", "string"})
_ANNOTATIONS = frozenset(
    {
        "$anchor",
        "$comment",
        "$defs",
        "$dynamicAnchor",
        "$id",
        "$schema",
        "$vocabulary",
        "contentEncoding",
        "contentMediaType",
        "contentSchema",
        "default",
        "definitions",
        "deprecated",
        "description",
        "examples",
        "readOnly",
        "title",
        "writeOnly",
    }
)
_UNANALYSED: Mapping[str | None, tuple[str, ...]] = {
    None: ("not", "if", "then", "else", "$ref", "$dynamicRef"),
    "string": ("pattern", "format"),
    "array": ("contains", "minContains", "maxContains", "unevaluatedItems"),
    "object": ("propertyNames", "dependentRequired", "dependentSchemas"),
}
# (type family, inclusive keyword, exclusive keyword, whether it is a lower bound)
_BOUNDS: tuple[tuple[str, str, str | None, bool], ...] = (
    ("number", "minimum", "exclusiveMinimum", True),
    ("number", "maximum", "exclusiveMaximum", False),
    ("string", "minLength", None, True),
    ("string", "maxLength", None, False),
    ("array", "minItems", None, True),
    ("array", "maxItems", None, False),
    ("object", "minProperties", None, True),
    ("object", "maxProperties", None, False),
)
_UNIONS = ("anyOf", "oneOf")
_MAX_DEPTH = 256
_ABSENT = object()

Bound = tuple[float, bool]
Node = Mapping[str, Any]


@dataclass(frozen=True)
class Incompatibility:
    """One incompatible change: where (JSON Pointer into the schemas) and what."""

    path: str
    message: str
    version: int | None = None
    direction: Direction | None = None

    def __str__(self) -> str:
        return f"{self.path or '(root)'}: {self.message}"


def check_new_version(
    existing: Sequence[Contract], candidate: Contract, mode: CompatibilityMode
) -> list[Incompatibility]:
    """Every incompatibility of ``candidate`` with the existing versions under ``mode``.

    ``existing`` are the registered versions of the candidate's event type (any order).
    Raises :class:`ContractConflict` when one of them has another event type or the
    candidate's version is not above them all. An empty result means the version may be
    registered.
    """
    mode = CompatibilityMode(mode)
    previous = sorted(existing, key=lambda contract: contract.version)
    _ensure_fits(previous, candidate)
    targets = previous if mode.transitive else previous[-1:]
    findings: list[Incompatibility] = []
    for contract in targets:
        if mode.checks_backward:
            findings += _tagged(contract, candidate, "backward")
        if mode.checks_forward:
            findings += _tagged(contract, candidate, "forward")
    return findings


def _ensure_fits(previous: Sequence[Contract], candidate: Contract) -> None:
    for contract in previous:
        if contract.event_type != candidate.event_type:
            raise ContractConflict(
                f"Version {contract.version} belongs to {contract.event_type!r}, "
                f"not to {candidate.event_type!r}."
            )
    if previous and candidate.version <= previous[-1].version:
        raise ContractConflict(
            f"Version {candidate.version} must be above the latest version "
            f"{previous[-1].version} of {candidate.event_type!r}."
        )


def _tagged(old: Contract, new: Contract, direction: Direction) -> list[Incompatibility]:
    return [
        Incompatibility(finding.path, finding.message, old.version, direction)
        for finding in schema_incompatibilities(old.schema, new.schema, direction)
    ]


def schema_incompatibilities(
    old: JsonSchema, new: JsonSchema, direction: Direction
) -> list[Incompatibility]:
    """Incompatible changes from ``old`` to ``new`` in one direction (see module docstring)."""
    comparator = _Comparator(old, new, direction)
    writer, reader = (old, new) if direction == "backward" else (new, old)
    comparator.compare(writer, reader, ())
    unique = dict.fromkeys(comparator.findings)
    return [Incompatibility(json_pointer(path), message) for path, message in unique]


# --------------------------------------------------------------------------- the walk


class _Comparator:
    """Walks a writer and a reader schema together, collecting where the reader is stricter."""

    def __init__(self, old_root: JsonSchema, new_root: JsonSchema, direction: Direction) -> None:
        self.old_root, self.new_root = old_root, new_root
        self.direction = direction
        self.backward = direction == "backward"
        self.writer_root = old_root if self.backward else new_root
        self.reader_root = new_root if self.backward else old_root
        self.findings: list[tuple[Path, str]] = []
        self.active: set[tuple[int, int]] = set()
        self.inlined: dict[int, tuple[object, object]] = {}

    def trial(self, writer: object, reader: object) -> bool:
        """Whether the reader accepts the writer, without reporting anything."""
        probe = _Comparator(self.old_root, self.new_root, self.direction)
        probe.inlined = self.inlined
        probe.compare(writer, reader, ())
        return not probe.findings

    def report(self, path: Path, message: str) -> None:
        self.findings.append((path, message))

    def old_new(self, writer_value: object, reader_value: object) -> tuple[object, object]:
        return (writer_value, reader_value) if self.backward else (reader_value, writer_value)

    def compare(self, writer: object, reader: object, path: Path) -> None:
        if len(path) > _MAX_DEPTH:
            return
        writer = self.resolve(writer, self.writer_root)
        reader = self.resolve(reader, self.reader_root)
        key = (id(writer), id(reader))
        if key in self.active:
            return
        self.active.add(key)
        try:
            self.compare_resolved(writer, reader, path)
        finally:
            self.active.discard(key)

    def resolve(self, schema: object, root: object) -> object:
        """Follow local ``$ref``; a ``$ref`` with siblings becomes an ``allOf`` part."""
        for _ in range(_MAX_DEPTH):
            if not isinstance(schema, Mapping) or not isinstance(schema.get("$ref"), str):
                return schema
            target = _lookup(root, schema["$ref"])
            if target is _ABSENT:
                return schema
            siblings = {key: value for key, value in schema.items() if key != "$ref"}
            if not _is_assertion_free(siblings):
                return self.inline(schema, siblings, target)
            schema = target
        return schema

    def inline(self, schema: object, siblings: dict[str, Any], target: object) -> object:
        cached = self.inlined.get(id(schema))
        if cached is None or cached[0] is not schema:
            merged = {**siblings, "allOf": [*siblings.get("allOf", []), target]}
            cached = (schema, merged)
            self.inlined[id(schema)] = cached
        return cached[1]

    def compare_resolved(self, writer: object, reader: object, path: Path) -> None:
        if writer is False or _accepts_everything(reader):
            return
        if not isinstance(reader, Mapping):
            old, new = self.old_new(writer, reader)
            self.report(path, f"schema changed from {_label(old)} to {_label(new)}")
            return
        writer_schema: Node = writer if isinstance(writer, Mapping) else {}
        if _same(writer_schema, reader):
            return
        if "enum" in writer_schema or "const" in writer_schema:
            self.compare_values(writer_schema, reader, path)
            return
        flattened = _flatten_all_of(writer_schema, self.writer_root)
        union = next((keyword for keyword in _UNIONS if keyword in flattened), None)
        if union is not None:
            base = {key: value for key, value in flattened.items() if key != union}
            for branch in flattened[union]:
                branch = self.resolve(branch, self.writer_root)
                self.compare(_merge(base, branch), reader, path)
            return
        self.compare_keywords(flattened, reader, path)

    def compare_keywords(self, writer: Node, reader: Node, path: Path) -> None:
        types = self.compare_types(writer, reader, path)
        self.compare_enum(reader, path)
        self.compare_bounds(writer, reader, path, types)
        self.compare_unanalysed(writer, reader, path, types)
        if _family_active("number", types):
            self.compare_multiple_of(writer, reader, path)
        if "object" in types:
            self.compare_object(writer, reader, path)
        if "array" in types:
            self.compare_array(writer, reader, path)
        self.compare_reader_combinators(writer, reader, path)

    # ----------------------------------------------------------------------- keywords

    def compare_values(self, writer: Node, reader: Node, path: Path) -> None:
        values = [writer["const"]] if "const" in writer else list(writer["enum"])
        writer_validator = schema_validator(self.writer_root, writer)
        reader_validator = schema_validator(self.reader_root, reader)
        rejected = [
            value
            for value in values
            if _is_valid(writer_validator, value, True)
            and not _is_valid(reader_validator, value, False)
        ]
        if not rejected:
            return
        if self.backward:
            self.report(path, f"no longer accepts {_show(rejected)}")
        else:
            self.report(path, f"now allows {_show(rejected)}, which the old schema rejects")

    def compare_types(self, writer: Node, reader: Node, path: Path) -> frozenset[str]:
        writer_types = _declared_types(writer)
        reader_types = _declared_types(reader)
        rejected = {kind for kind in writer_types if not _accepts_type(reader_types, kind)}
        if rejected:
            old, new = self.old_new(writer.get("type"), reader.get("type"))
            self.report(path, f"type changed from {_type_label(old)} to {_type_label(new)}")
        return frozenset(writer_types - rejected)

    def compare_enum(self, reader: Node, path: Path) -> None:
        for keyword in ("enum", "const"):
            if keyword in reader:
                old, new = self.old_new(_ABSENT, reader[keyword])
                self.report(path, _keyword_change(keyword, old, new))

    def compare_bounds(
        self,
        writer: Node,
        reader: Node,
        path: Path,
        types: frozenset[str],
    ) -> None:
        for family, inclusive, exclusive, lower in _BOUNDS:
            if not _family_active(family, types):
                continue
            writer_bound = _bound(writer, inclusive, exclusive, lower)
            reader_bound = _bound(reader, inclusive, exclusive, lower)
            if _within(writer_bound, reader_bound, lower):
                continue
            old, new = self.old_new(writer_bound, reader_bound)
            old_label, new_label = _bound_label(old, lower), _bound_label(new, lower)
            self.report(path, f"{inclusive} changed from {old_label} to {new_label}")

    def compare_multiple_of(self, writer: Node, reader: Node, path: Path) -> None:
        divisor = reader.get("multipleOf")
        dividend = writer.get("multipleOf")
        if divisor is None or (dividend is not None and _is_multiple(dividend, divisor)):
            return
        old, new = self.old_new(writer.get("multipleOf", _ABSENT), divisor)
        self.report(path, _keyword_change("multipleOf", old, new))

    def compare_unanalysed(
        self,
        writer: Node,
        reader: Node,
        path: Path,
        types: frozenset[str],
    ) -> None:
        for family, keywords in _UNANALYSED.items():
            if family is not None and not _family_active(family, types):
                continue
            for keyword in keywords:
                if keyword not in reader or _same(writer.get(keyword, _ABSENT), reader[keyword]):
                    continue
                old, new = self.old_new(writer.get(keyword, _ABSENT), reader[keyword])
                change = _keyword_change(keyword, old, new)
                self.report(path, f"{change}; not analysed, so counted as incompatible")

    # ----------------------------------------------------------------------- objects

    def compare_object(self, writer: Node, reader: Node, path: Path) -> None:
        writer_properties = writer.get("properties", {})
        reader_properties = reader.get("properties", {})
        for name in sorted(writer_properties.keys() | reader_properties.keys()):
            where = (*path, "properties", name)
            if name in writer_properties and name in reader_properties:
                self.compare(writer_properties[name], reader_properties[name], where)
            elif name in writer_properties:
                self.compare_property_only_in_writer(name, writer_properties[name], reader, where)
            else:
                self.compare_property_only_in_reader(name, writer, reader_properties[name], where)
        self.compare_required(writer, reader, path)
        self.compare_pattern_properties(writer, reader, path)
        self.compare_additional_properties(writer, reader, path)

    def compare_property_only_in_writer(
        self, name: str, schema: object, reader: Node, where: Path
    ) -> None:
        governing = _governing_schema(reader, name)
        if governing is not False:
            self.compare(schema, governing, where)
        elif self.backward:
            self.report(where, "property removed from a closed content model")
        else:
            self.report(where, "property added, but the old content model is closed")

    def compare_property_only_in_reader(
        self, name: str, writer: Node, schema: object, where: Path
    ) -> None:
        governing = _governing_schema(writer, name)
        if governing is False:
            return
        if not _accepts_everything(governing) or _accepts_everything(schema):
            self.compare(governing, schema, where)
        elif self.backward:
            self.report(where, "property added to an open content model")
        else:
            self.report(where, "property removed from an open content model")

    def compare_required(self, writer: Node, reader: Node, path: Path) -> None:
        newly_required = set(reader.get("required", ())) - set(writer.get("required", ()))
        for name in sorted(newly_required):
            message = "property became required" if self.backward else "property no longer required"
            self.report((*path, "properties", name), message)

    def compare_pattern_properties(self, writer: Node, reader: Node, path: Path) -> None:
        writer_patterns = writer.get("patternProperties", {})
        reader_patterns = reader.get("patternProperties", {})
        for pattern in sorted(writer_patterns.keys() | reader_patterns.keys()):
            self.compare(
                writer_patterns.get(pattern, _additional(writer)),
                reader_patterns.get(pattern, _additional(reader)),
                (*path, "patternProperties", pattern),
            )

    def compare_additional_properties(self, writer: Node, reader: Node, path: Path) -> None:
        writer_additional, reader_additional = _additional(writer), _additional(reader)
        where = (*path, "additionalProperties")
        if reader_additional is not False or writer_additional is False:
            self.compare(writer_additional, reader_additional, where)
        elif self.backward:
            self.report(where, "content model closed (additionalProperties: false)")
        else:
            self.report(where, "content model opened, but the old one is closed")

    # ----------------------------------------------------------------------- arrays

    def compare_array(self, writer: Node, reader: Node, path: Path) -> None:
        writer_prefix = writer.get("prefixItems", [])
        reader_prefix = reader.get("prefixItems", [])
        writer_items, reader_items = writer.get("items", True), reader.get("items", True)
        for index in range(max(len(writer_prefix), len(reader_prefix))):
            self.compare(
                writer_prefix[index] if index < len(writer_prefix) else writer_items,
                reader_prefix[index] if index < len(reader_prefix) else reader_items,
                (*path, "prefixItems", index),
            )
        self.compare(writer_items, reader_items, (*path, "items"))
        if reader.get("uniqueItems") is True and writer.get("uniqueItems") is not True:
            old, new = self.old_new(writer.get("uniqueItems", _ABSENT), True)
            self.report(path, _keyword_change("uniqueItems", old, new))

    # ----------------------------------------------------------------------- combinators

    def compare_reader_combinators(self, writer: Node, reader: Node, path: Path) -> None:
        for index, part in enumerate(reader.get("allOf", ())):
            self.compare(writer, part, (*path, "allOf", index))
        pieces = _split_by_type(writer)
        for keyword in _UNIONS:
            if keyword in reader and not all(
                any(self.trial(piece, alternative) for alternative in reader[keyword])
                for piece in pieces
            ):
                side = "new" if self.backward else "old"
                other = "old" if self.backward else "new"
                self.report(
                    (*path, keyword),
                    f"no {keyword} alternative of the {side} schema accepts all {other} data",
                )


# --------------------------------------------------------------------------- helpers


def _is_valid(validator: Validator, value: Any, when_unresolvable: bool) -> bool:
    try:
        return validator.is_valid(value)
    except Unresolvable:
        return when_unresolvable


def _lookup(root: object, reference: str) -> object:
    if not reference.startswith("#") or (len(reference) > 1 and reference[1] != "/"):
        return _ABSENT
    node = root
    for raw in reference[2:].split("/") if len(reference) > 1 else ():
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _ABSENT
    return node


def _is_assertion_free(schema: Node) -> bool:
    return all(key in _ANNOTATIONS for key in schema)


def _accepts_everything(schema: object) -> bool:
    return schema is True or (isinstance(schema, Mapping) and _is_assertion_free(schema))


def _same(writer: object, reader: object) -> bool:
    if writer is _ABSENT:
        return False
    writer_text, reader_text = canonical_json(writer), canonical_json(reader)
    return writer_text == reader_text and '"$ref"' not in writer_text


def _flatten_all_of(schema: Node, root: object) -> Node:
    parts = schema.get("allOf")
    if not isinstance(parts, list):
        return schema
    merged: Node = {key: value for key, value in schema.items() if key != "allOf"}
    for part in parts:
        resolved = part
        for _ in range(_MAX_DEPTH):
            target = (
                _lookup(root, resolved["$ref"])
                if isinstance(resolved, Mapping) and isinstance(resolved.get("$ref"), str)
                else _ABSENT
            )
            if target is _ABSENT:
                break
            resolved = target
        if isinstance(resolved, Mapping):
            merged = _merge(merged, resolved)
    return merged


def _merge(base: Node, extra: object) -> Node:
    """Shallow conjunction; keeps the writer at least as wide as the real one."""
    if not isinstance(extra, Mapping):
        return base
    merged = {**base, **extra}
    for keyword in ("properties", "patternProperties"):
        if keyword in base and keyword in extra:
            merged[keyword] = {**base[keyword], **extra[keyword]}
    if "required" in base and "required" in extra:
        merged["required"] = sorted({*base["required"], *extra["required"]})
    return merged


def _split_by_type(schema: Node) -> list[Node]:
    """The writer as one piece per JSON type, so each can match its own alternative."""
    types = sorted(_declared_types(schema))
    if len(types) == 1:
        return [schema]
    return [{**schema, "type": kind} for kind in types]


def _declared_types(schema: Node) -> frozenset[str]:
    declared = schema.get("type")
    if declared is None:
        return ALL_TYPES
    return frozenset([declared] if isinstance(declared, str) else declared)


def _accepts_type(types: Iterable[str], kind: str) -> bool:
    types = set(types)
    return kind in types or (kind == "integer" and "number" in types)


def _family_active(family: str, types: frozenset[str]) -> bool:
    if family == "number":
        return bool(types & {"number", "integer"})
    return family in types


def _type_label(declared: object) -> str:
    if declared is None:
        return "any"
    if isinstance(declared, str):
        return declared
    kinds = [str(kind) for kind in declared] if isinstance(declared, list) else [str(declared)]
    return " or ".join(kinds) if kinds else "nothing"


def _label(schema: object) -> str:
    if isinstance(schema, bool):
        return "true (anything)" if schema else "false (nothing)"
    return "a schema"


def _show(value: object) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _keyword_change(keyword: str, old: object, new: object) -> str:
    if old is _ABSENT:
        return f"{keyword} added ({_show(new)})"
    if new is _ABSENT:
        return f"{keyword} removed (was {_show(old)})"
    return f"{keyword} changed from {_show(old)} to {_show(new)}"


def _bound(schema: Node, inclusive: str, exclusive: str | None, lower: bool) -> Bound | None:
    candidates: list[Bound] = []
    if isinstance(schema.get(inclusive), int | float):
        candidates.append((schema[inclusive], False))
    if exclusive is not None and isinstance(schema.get(exclusive), int | float):
        candidates.append((schema[exclusive], True))
    if not candidates:
        return None
    return max(candidates, key=lambda bound: (bound[0] if lower else -bound[0], bound[1]))


def _within(writer: Bound | None, reader: Bound | None, lower: bool) -> bool:
    if reader is None:
        return True
    if writer is None:
        return False
    (writer_value, writer_exclusive), (reader_value, reader_exclusive) = writer, reader
    if writer_value == reader_value:
        return writer_exclusive or not reader_exclusive
    return writer_value > reader_value if lower else writer_value < reader_value


def _bound_label(bound: object, lower: bool) -> str:
    if not isinstance(bound, tuple):
        return "none"
    value, exclusive = bound
    return f"{'>' if lower else '<'}{'' if exclusive else '='} {value}"


def _is_multiple(dividend: float, divisor: float) -> bool:
    if divisor == 0:
        return False
    quotient = dividend / divisor
    return abs(quotient - round(quotient)) < 1e-9


def _additional(schema: Node) -> object:
    return schema.get("additionalProperties", schema.get("unevaluatedProperties", True))


def _governing_schema(schema: Node, name: str) -> object:
    for pattern, subschema in schema.get("patternProperties", {}).items():
        if _pattern_matches(pattern, name):
            return subschema
    return _additional(schema)


def _pattern_matches(pattern: str, name: str) -> bool:
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return False
