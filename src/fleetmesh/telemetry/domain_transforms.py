"""Declarative per-device-type transforms of telemetry points.

A device type carries a list of transforms, parsed into a ``TransformSpec`` by
``domain_transform_specs``.

Order of application (``transform_data`` does steps 1-4 before validation, ``derive_metrics``
does step 5 after it):

1. **rename** ``from`` → ``to``, one step (no chains, so two renames may swap names); every
   later step and the schema use the new name.
2. **scale** ``value * scale + offset`` on numeric values (device calibration, in the device's
   own unit).
3. **unit**: a point of this metric that carries no unit is taken to be in this unit (the
   compact form carries none).
4. **unit conversion** to the schema's unit, automatic: only a point whose unit differs from
   its metric's schema unit goes near pint. Same unit under another spelling (``°C``/``degC``)
   is just renamed; a real conversion lowers quality (``unit_converted``) and, for an integer
   metric, rounds. An unknown or incompatible unit, or a unit on a non-numeric value, rejects
   the point (field ``unit``). Conversion comes before validation so ranges are checked in the
   schema's unit.
5. **derive** a metric from an expression over the *accepted* values of the same timestamp
   (so a derived value never comes from a rejected input); an expression may use metrics
   derived before it in the list. The derived point is then validated like any other (its
   timestamp was checked on its inputs); its quality is the lowest of its inputs'
   (``degraded_input``). An evaluation failure (e.g. division by zero) is a rejection with field
   ``expression``. Expressions are checked when the spec is parsed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeGuard

import msgspec

from fleetmesh.telemetry.domain_expressions import EvaluationError, Evaluator
from fleetmesh.telemetry.domain_model import (
    Accepted,
    MetricSpec,
    MetricType,
    QualityReason,
    RawPoint,
    Rejected,
    RejectReason,
    Scalar,
    TelemetrySchema,
)
from fleetmesh.telemetry.domain_transform_specs import DeriveMetric, TransformSpec
from fleetmesh.telemetry.domain_units import UnitConversion, resolve_conversion

UNIT_CONVERTED_FACTOR: Final = 0.95


# --------------------------------------------------------------------------- applying


@dataclass(frozen=True, slots=True)
class TransformResult:
    points: list[RawPoint]
    rejected: list[Rejected]


def transform_data(
    points: Sequence[RawPoint], spec: TransformSpec, schema: TelemetrySchema
) -> TransformResult:
    """Apply steps 1-4 (rename, scale, default unit, unit conversion) to decoded points."""
    metrics = schema.metrics
    touched = spec.touched_metrics
    kept: list[RawPoint] = []
    rejected: list[Rejected] = []
    for point in points:
        if point.metric not in touched and (
            point.unit is None or not _needs_conversion(point, metrics)
        ):
            kept.append(point)
            continue
        outcome = _transform_point(point, spec, metrics)
        if isinstance(outcome, Rejected):
            rejected.append(outcome)
        else:
            kept.append(outcome)
    return TransformResult(kept, rejected)


def _needs_conversion(point: RawPoint, metrics: Mapping[str, MetricSpec]) -> bool:
    if point.unit is None:
        return False
    spec = metrics.get(point.metric)
    return spec is not None and spec.unit is not None and spec.unit != point.unit


def _transform_point(
    point: RawPoint, spec: TransformSpec, metrics: Mapping[str, MetricSpec]
) -> RawPoint | Rejected:
    metric = spec.renames.get(point.metric, point.metric)
    value = point.value
    scaling = spec.scalings.get(metric)
    if scaling is not None and _is_number(value):
        value = scaling.apply(value)
    unit = point.unit or spec.default_units.get(metric)
    moved = msgspec.structs.replace(point, metric=metric, value=value, unit=unit)
    return convert_unit(moved, metrics.get(metric))


def convert_unit(point: RawPoint, metric: MetricSpec | None) -> RawPoint | Rejected:
    """Step 4 for one point: convert its value to the schema unit of its metric."""
    if metric is None or metric.unit is None or point.unit is None or point.unit == metric.unit:
        return point
    conversion = resolve_conversion(point.unit, metric.unit)
    if not isinstance(conversion, UnitConversion):
        return _unit_rejection(point, conversion.reason, conversion.message)
    if conversion.is_identity:
        return msgspec.structs.replace(point, unit=metric.unit)
    if not _is_number(point.value):
        message = f"a {type(point.value).__name__} value cannot be given in {point.unit!r}"
        return _unit_rejection(point, RejectReason.UNIT_INCOMPATIBLE, message)
    return _converted(point, conversion, metric)


def _converted(point: RawPoint, conversion: UnitConversion, metric: MetricSpec) -> RawPoint:
    value: float | int = conversion.convert(float(point.value))
    if metric.type is MetricType.INTEGER and math.isfinite(value):
        value = round(value)
    return msgspec.structs.replace(
        point,
        value=value,
        unit=conversion.target,
        quality=point.quality * UNIT_CONVERTED_FACTOR,
        quality_reasons=(*point.quality_reasons, QualityReason.UNIT_CONVERTED),
    )


def _unit_rejection(point: RawPoint, reason: RejectReason, message: str) -> Rejected:
    return Rejected(point.index, point.metric, "unit", reason, message)


def _is_number(value: Scalar) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --------------------------------------------------------------------------- deriving


def derive_metrics(
    accepted: Sequence[Accepted],
    spec: TransformSpec,
    schema: TelemetrySchema,
    *,
    first_index: int,
) -> TransformResult:
    """Step 5: compute derived points from accepted ones, numbered from ``first_index``."""
    if not spec.derivations:
        return TransformResult([], [])
    deriver = _Deriver(spec, schema, first_index)
    for ts_ms, inputs in _group_inputs(accepted, spec.derivation_inputs).items():
        deriver.derive_at(ts_ms, inputs)
    return TransformResult(deriver.points, deriver.rejected)


def _group_inputs(
    accepted: Sequence[Accepted], wanted: frozenset[str]
) -> dict[int, dict[str, Accepted]]:
    groups: dict[int, dict[str, Accepted]] = {}
    for point in accepted:
        if point.metric in wanted and _is_number(point.value):
            groups.setdefault(point.ts_ms, {})[point.metric] = point
    return groups


class _Deriver:
    def __init__(self, spec: TransformSpec, schema: TelemetrySchema, first_index: int) -> None:
        self.derivations = spec.derivations
        self.metrics = schema.metrics
        self.evaluator = Evaluator()
        self.next_index = first_index
        self.points: list[RawPoint] = []
        self.rejected: list[Rejected] = []

    def derive_at(self, ts_ms: int, inputs: Mapping[str, Accepted]) -> None:
        values = {name: float(point.value) for name, point in inputs.items()}
        qualities = {name: point.quality for name, point in inputs.items()}
        for derivation in self.derivations:
            needed = derivation.expression.inputs
            if not needed <= values.keys():
                continue
            outcome = self._derive_one(derivation, ts_ms, values, qualities)
            if isinstance(outcome, RawPoint):
                self.points.append(outcome)
                values[derivation.metric] = float(outcome.value)
                qualities[derivation.metric] = outcome.quality
            else:
                self.rejected.append(outcome)

    def _derive_one(
        self,
        derivation: DeriveMetric,
        ts_ms: int,
        values: Mapping[str, float],
        qualities: Mapping[str, float],
    ) -> RawPoint | Rejected:
        index = self.next_index
        self.next_index += 1
        try:
            value = self.evaluator.evaluate(derivation.expression, values)
        except EvaluationError as exc:
            reason = RejectReason.DERIVATION_FAILED
            return Rejected(index, derivation.metric, "expression", reason, str(exc))
        quality = min(qualities[name] for name in derivation.expression.inputs)
        reasons = (QualityReason.DEGRADED_INPUT,) if quality < 1.0 else ()
        point = RawPoint(
            index, derivation.metric, value, ts_ms, derivation.unit, quality, reasons, derived=True
        )
        return convert_unit(point, self.metrics.get(derivation.metric))
