"""Transform specs of a device type: checked dataclasses parsed from the device type's JSON.

``TransformSpec.from_dicts`` parses a list such as::

    [{"type": "rename", "from": "t", "to": "temp"},
     {"type": "scale", "metric": "raw_level", "scale": 0.1, "offset": -40},
     {"type": "unit", "metric": "temp", "unit": "degF"},
     {"type": "derive", "metric": "power", "expression": "voltage * current", "unit": "W"}]

Every problem raises ``InvalidTransform`` naming the field (``transforms[2].expression``):
unknown or missing fields, a zero or non-finite scale, an unknown unit, an expression that does
not parse or uses anything beyond arithmetic over metric names, a derived metric that uses
itself or a metric derived later, and conflicts (a metric renamed, scaled, given a unit or
derived twice). How and in which order transforms apply: see ``domain_transforms``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from fleetmesh.telemetry.domain_expressions import Expression, ExpressionError
from fleetmesh.telemetry.domain_model import InvalidTransform
from fleetmesh.telemetry.domain_units import unit_problem

# --------------------------------------------------------------------------- transform specs


@dataclass(frozen=True, slots=True)
class RenameMetric:
    source: str
    target: str


@dataclass(frozen=True, slots=True)
class ScaleOffset:
    metric: str
    scale: float = 1.0
    offset: float = 0.0

    def apply(self, value: float) -> float:
        return value * self.scale + self.offset

    def inverse(self) -> ScaleOffset:
        """The transform that undoes this one (``scale`` is never zero)."""
        return ScaleOffset(self.metric, 1.0 / self.scale, -self.offset / self.scale)


@dataclass(frozen=True, slots=True)
class DefaultUnit:
    metric: str
    unit: str


@dataclass(frozen=True, slots=True)
class DeriveMetric:
    metric: str
    expression: Expression
    unit: str | None = None


Transform = RenameMetric | ScaleOffset | DefaultUnit | DeriveMetric


@dataclass(frozen=True, slots=True)
class TransformSpec:
    """The checked transforms of one device type; build with ``of`` or ``from_dicts``."""

    renames: Mapping[str, str] = field(default_factory=dict)
    scalings: Mapping[str, ScaleOffset] = field(default_factory=dict)
    default_units: Mapping[str, str] = field(default_factory=dict)
    derivations: tuple[DeriveMetric, ...] = ()
    touched_metrics: frozenset[str] = frozenset()
    derivation_inputs: frozenset[str] = frozenset()

    @classmethod
    def of(cls, transforms: Iterable[Transform]) -> TransformSpec:
        """Check and assemble transforms; errors name the offending ``transforms[i].field``."""
        builder = _SpecBuilder()
        for position, transform in enumerate(transforms):
            builder.add(position, transform)
        return builder.build()

    @classmethod
    def from_dicts(cls, raw: object) -> TransformSpec:
        """Parse the JSON list of a device type (``None`` means no transform)."""
        if raw is None:
            return EMPTY_TRANSFORMS
        if not isinstance(raw, list):
            raise InvalidTransform("transforms", "must be a list of transform objects")
        return cls.of(_transform_from_dict(position, item) for position, item in enumerate(raw))


class _SpecBuilder:
    def __init__(self) -> None:
        self.renames: dict[str, str] = {}
        self.scalings: dict[str, ScaleOffset] = {}
        self.default_units: dict[str, str] = {}
        self.derivations: list[DeriveMetric] = []

    def add(self, position: int, transform: Transform) -> None:
        where = f"transforms[{position}]"
        if isinstance(transform, RenameMetric):
            self._add_rename(where, transform)
        elif isinstance(transform, ScaleOffset):
            self._add_scaling(where, transform)
        elif isinstance(transform, DefaultUnit):
            self._add_default_unit(where, transform)
        else:
            self._add_derivation(where, transform)

    def build(self) -> TransformSpec:
        inputs = frozenset().union(*(d.expression.inputs for d in self.derivations))
        return TransformSpec(
            renames=self.renames,
            scalings=self.scalings,
            default_units=self.default_units,
            derivations=tuple(self.derivations),
            touched_metrics=frozenset({*self.renames, *self.scalings, *self.default_units}),
            derivation_inputs=inputs,
        )

    def _add_rename(self, where: str, rename: RenameMetric) -> None:
        _check_name(f"{where}.from", rename.source)
        _check_name(f"{where}.to", rename.target)
        if rename.source in self.renames:
            raise InvalidTransform(f"{where}.from", f"{rename.source!r} is already renamed")
        if rename.source == rename.target:
            raise InvalidTransform(f"{where}.to", "renames a metric to itself")
        self.renames[rename.source] = rename.target

    def _add_scaling(self, where: str, scaling: ScaleOffset) -> None:
        _check_name(f"{where}.metric", scaling.metric)
        if _finite(f"{where}.scale", scaling.scale) == 0:
            raise InvalidTransform(f"{where}.scale", "must not be zero")
        if scaling.metric in self.scalings:
            raise InvalidTransform(f"{where}.metric", f"{scaling.metric!r} is already scaled")
        _finite(f"{where}.offset", scaling.offset)
        self.scalings[scaling.metric] = scaling

    def _add_default_unit(self, where: str, default: DefaultUnit) -> None:
        _check_name(f"{where}.metric", default.metric)
        _check_unit(f"{where}.unit", default.unit)
        if default.metric in self.default_units:
            raise InvalidTransform(f"{where}.metric", f"{default.metric!r} already has a unit")
        self.default_units[default.metric] = default.unit

    def _add_derivation(self, where: str, derive: DeriveMetric) -> None:
        _check_name(f"{where}.metric", derive.metric)
        if derive.unit is not None:
            _check_unit(f"{where}.unit", derive.unit)
        derived = {d.metric for d in self.derivations}
        if derive.metric in derived:
            raise InvalidTransform(f"{where}.metric", f"{derive.metric!r} is already derived")
        if derive.metric in derive.expression.inputs:
            raise InvalidTransform(f"{where}.expression", "must not use the metric it derives")
        if not derive.expression.inputs:
            raise InvalidTransform(f"{where}.expression", "must use at least one metric")
        self.derivations.append(derive)


def _check_name(where: str, name: object) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidTransform(where, "must be a non-empty metric name")


def _finite(where: str, number: object) -> float:
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise InvalidTransform(where, "must be a number")
    if not math.isfinite(number):
        raise InvalidTransform(where, "must be finite")
    return float(number)


def _check_unit(where: str, unit: object) -> None:
    if not isinstance(unit, str) or not unit:
        raise InvalidTransform(where, "must be a non-empty unit")
    problem = unit_problem(unit)
    if problem is not None:
        raise InvalidTransform(where, problem.message)


# --------------------------------------------------------------------------- parsing dicts

_FIELDS: Final[Mapping[str, tuple[frozenset[str], frozenset[str]]]] = {
    # type → (required fields, optional fields), "type" excluded
    "rename": (frozenset({"from", "to"}), frozenset()),
    "scale": (frozenset({"metric"}), frozenset({"scale", "offset"})),
    "unit": (frozenset({"metric", "unit"}), frozenset()),
    "derive": (frozenset({"metric", "expression"}), frozenset({"unit"})),
}


def _transform_from_dict(position: int, raw: object) -> Transform:
    where = f"transforms[{position}]"
    if not isinstance(raw, Mapping):
        raise InvalidTransform(where, "must be an object")
    kind = str(raw.get("type"))
    if kind not in _FIELDS:
        raise InvalidTransform(f"{where}.type", f"must be one of {', '.join(_FIELDS)}")
    _check_fields(where, raw, *_FIELDS[kind])
    if kind == "rename":
        return RenameMetric(_text(where, raw, "from"), _text(where, raw, "to"))
    if kind == "scale":
        scale = _number(where, raw, "scale", 1.0)
        return ScaleOffset(_text(where, raw, "metric"), scale, _number(where, raw, "offset", 0.0))
    if kind == "unit":
        return DefaultUnit(_text(where, raw, "metric"), _text(where, raw, "unit"))
    unit = _text(where, raw, "unit") if raw.get("unit") is not None else None
    expression = _expression(where, _text(where, raw, "expression"))
    return DeriveMetric(_text(where, raw, "metric"), expression, unit)


def _text(where: str, raw: Mapping[str, object], key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidTransform(f"{where}.{key}", "must be a non-empty string")
    return value


def _number(where: str, raw: Mapping[str, object], key: str, default: float) -> float:
    return _finite(f"{where}.{key}", raw.get(key, default))


def _check_fields(
    where: str, raw: Mapping[str, object], required: frozenset[str], optional: frozenset[str]
) -> None:
    missing = sorted(required - raw.keys())
    if missing:
        raise InvalidTransform(f"{where}.{missing[0]}", "is required")
    unknown = sorted(raw.keys() - required - optional - {"type"})
    if unknown:
        raise InvalidTransform(f"{where}.{unknown[0]}", "is not a field of this transform")


def _expression(where: str, source: str) -> Expression:
    try:
        return Expression.parse(source)
    except ExpressionError as exc:
        raise InvalidTransform(f"{where}.expression", str(exc)) from None


EMPTY_TRANSFORMS: Final = TransformSpec()
