"""Validation of points against a device type's telemetry schema, with a quality score.

``validate_batch`` returns exactly one result per input point, in input order, carrying the
point's index. Checks, in order; the first failure rejects (field at fault in brackets):

1. **known metric** [metric] ``unknown_metric``, unless the policy accepts unknown metrics:
   then the point is accepted as sent (type and range unchecked) with ``unknown_metric``.
2. **type** [value] ``wrong_type``: a number metric takes an int or a float (a bool is not a
   number) and stores a float; an integer metric takes an int or an integral float
   (``not_integral`` otherwise) within int64 (``out_of_range``) and stores an int; a boolean
   metric takes a bool; a string metric a string of at most ``max_string_length``
   (``too_long``). Non-finite numbers are ``not_finite``.
3. **unit** [unit] ``unit_mismatch``: after transforms a point's unit is its metric's schema
   unit, or none (run ``transform_data`` first to convert).
4. **range** [value]: inside ``[min, max]`` is fine; outside by at most the margin
   (``range_margin_ratio`` x (max - min), or x |bound| when only one bound is set) is accepted
   with ``range_margin``; farther is ``out_of_range``.
5. **timestamp** [ts] (skipped for derived points, whose inputs were checked): later than
   ``now + max_future_skew`` is ``ts_in_future``; older than ``now - max_past_age`` is
   ``ts_too_old``; later than ``now + clock_skew_grace`` lowers quality (``clock_skew``);
   older than ``now - late_arrival_after`` lowers quality (``late_arrival``).
6. **duplicate** [ts] ``duplicate``: same metric and ts as a point already accepted in the
   batch (the earlier one wins; a rejected point does not count).

Quality scoring: a point starts from the quality its transforms left (1.0 when untouched) and
is multiplied by one factor per lowering reason, each in [0.5, 1], so the score stays in
[0, 1]; ``quality_reasons`` lists the codes in the order they were applied.

=================  =============================================  ============
reason             factor                                         range
=================  =============================================  ============
range_margin       1 - 0.5 x (distance outside bound / margin)    [0.5, 1)
clock_skew         1 - 0.3 x (ms ahead of now / max_future_skew)  [0.7, 1)
late_arrival       0.9                                            0.9
unknown_metric     0.8                                            0.8
unit_converted     0.95 (applied by the unit conversion)          0.95
degraded_input     lowest quality among a derived point's inputs  [0, 1)
=================  =============================================  ============
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, cast

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
    UnknownMetricPolicy,
    ValidationPolicy,
)

RANGE_MARGIN_MAX_PENALTY: Final = 0.5
CLOCK_SKEW_MAX_PENALTY: Final = 0.3
LATE_ARRIVAL_FACTOR: Final = 0.9
UNKNOWN_METRIC_FACTOR: Final = 0.8
_LATE: Final = QualityReason.LATE_ARRIVAL

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


@dataclass(frozen=True, slots=True)
class _Fault:
    field: str
    reason: RejectReason
    message: str


_Normaliser = Callable[[Scalar, ValidationPolicy], "Scalar | _Fault"]


def validate_batch(
    points: Sequence[RawPoint],
    schema: TelemetrySchema,
    policy: ValidationPolicy,
    now_ms: int,
    *,
    already_accepted: Iterable[tuple[str, int]] = (),
) -> list[Accepted | Rejected]:
    """Validate and score points; ``already_accepted`` holds (metric, ts) keys stored before."""
    check = _Checker(schema, policy, now_ms).check
    seen = set(already_accepted)
    results: list[Accepted | Rejected] = []
    for point in points:
        result = check(point)
        if type(result) is Accepted:
            key = (result.metric, result.ts_ms)
            if key in seen:
                result = _duplicate(point)
            else:
                seen.add(key)
        results.append(result)
    return results


def _duplicate(point: RawPoint) -> Rejected:
    message = f"{point.metric} already has a value at ts {point.ts_ms} in this batch"
    return Rejected(point.index, point.metric, "ts", RejectReason.DUPLICATE, message)


# --------------------------------------------------------------------------- per metric rule


@dataclass(frozen=True, slots=True)
class _MetricRule:
    """A schema entry with its range limits precomputed for a policy."""

    spec: MetricSpec
    normalise: _Normaliser
    unit: str | None
    has_bounds: bool
    lower_margin: float
    upper_margin: float
    low: float
    """``spec.min``, or -inf: a value within [low, high] needs no range check."""
    high: float

    @classmethod
    def of(cls, spec: MetricSpec, policy: ValidationPolicy) -> _MetricRule:
        ratio = policy.range_margin_ratio
        low, high = spec.min, spec.max
        if low is not None and high is not None:
            lower_margin = upper_margin = ratio * (high - low)
        else:
            lower_margin = ratio * abs(low) if low is not None else 0.0
            upper_margin = ratio * abs(high) if high is not None else 0.0
        has_bounds = low is not None or high is not None
        return cls(
            spec,
            _NORMALISERS[spec.type],
            spec.unit,
            has_bounds,
            lower_margin,
            upper_margin,
            low if low is not None else -math.inf,
            high if high is not None else math.inf,
        )

    def range_penalty(self, value: float) -> float | _Fault:
        """1.0 inside the range, a factor within the margin, a fault beyond it."""
        low, high = self.spec.min, self.spec.max
        if low is not None and value < low:
            return _margin_factor(low - value, self.lower_margin, f"below min {low}")
        if high is not None and value > high:
            return _margin_factor(value - high, self.upper_margin, f"above max {high}")
        return 1.0


def _margin_factor(distance: float, margin: float, where: str) -> float | _Fault:
    if distance > margin:
        message = f"value is {where} by {distance:g}, more than the margin of {margin:g}"
        return _Fault("value", RejectReason.OUT_OF_RANGE, message)
    return 1.0 - RANGE_MARGIN_MAX_PENALTY * distance / margin


# --------------------------------------------------------------------------- value types


def _number(value: Scalar, _: ValidationPolicy) -> Scalar | _Fault:
    if type(value) is float:
        return value if math.isfinite(value) else _not_finite()
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            return _not_finite()
    return _wrong_type(value, "a number")


def _integer(value: Scalar, _: ValidationPolicy) -> Scalar | _Fault:
    if type(value) is float:
        if not math.isfinite(value):
            return _not_finite()
        if not value.is_integer():
            return _Fault("value", RejectReason.NOT_INTEGRAL, f"{value} is not an integer")
        value = int(value)
    if type(value) is not int:
        return _wrong_type(value, "an integer")
    if not _INT64_MIN <= value <= _INT64_MAX:
        return _Fault("value", RejectReason.OUT_OF_RANGE, "value does not fit in 64 bits")
    return value


def _boolean(value: Scalar, _: ValidationPolicy) -> Scalar | _Fault:
    return value if type(value) is bool else _wrong_type(value, "a boolean")


def _string(value: Scalar, policy: ValidationPolicy) -> Scalar | _Fault:
    if type(value) is not str:
        return _wrong_type(value, "a string")
    if len(value) > policy.max_string_length:
        message = f"value is longer than {policy.max_string_length} characters"
        return _Fault("value", RejectReason.TOO_LONG, message)
    return value


_NORMALISERS: Final[Mapping[MetricType, _Normaliser]] = {
    MetricType.NUMBER: _number,
    MetricType.INTEGER: _integer,
    MetricType.BOOLEAN: _boolean,
    MetricType.STRING: _string,
}

_KINDS: Final = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _wrong_type(value: Scalar, expected: str) -> _Fault:
    given = _KINDS.get(type(value), type(value).__name__)
    return _Fault("value", RejectReason.WRONG_TYPE, f"value must be {expected}, not {given}")


def _not_finite() -> _Fault:
    return _Fault("value", RejectReason.NOT_FINITE, "value must be a finite number")


# --------------------------------------------------------------------------- the checker


_RULES_KEPT: Final = 256
_KeptRules = tuple[TelemetrySchema, ValidationPolicy, dict[str, "_MetricRule"]]
_rules_cache: dict[tuple[int, int], _KeptRules] = {}


def _rules_of(schema: TelemetrySchema, policy: ValidationPolicy) -> dict[str, _MetricRule]:
    """The rules of a schema under a policy, computed once per pair of those objects (a
    one-point MQTT message would otherwise spend a tenth of its validation on them)."""
    key = (id(schema), id(policy))
    kept = _rules_cache.get(key)
    if kept is not None and kept[0] is schema and kept[1] is policy:
        return kept[2]
    rules = {name: _MetricRule.of(spec, policy) for name, spec in schema.metrics.items()}
    if len(_rules_cache) >= _RULES_KEPT:
        _rules_cache.clear()
    _rules_cache[key] = (schema, policy, rules)
    return rules


class _Checker:
    """Checks one point at a time against limits computed once per batch."""

    __slots__ = (
        "rules",
        "policy",
        "now_ms",
        "future_limit",
        "past_limit",
        "skew_grace_limit",
        "late_limit",
    )

    def __init__(self, schema: TelemetrySchema, policy: ValidationPolicy, now_ms: int) -> None:
        self.rules = _rules_of(schema, policy)
        self.policy = policy
        self.now_ms = now_ms
        self.future_limit = now_ms + policy.max_future_skew_ms
        self.past_limit = now_ms - policy.max_past_age_ms
        self.skew_grace_limit = now_ms + policy.clock_skew_grace_ms
        self.late_limit = now_ms - policy.late_arrival_after_ms

    def check(self, point: RawPoint) -> Accepted | Rejected:
        rule = self.rules.get(point.metric)
        if rule is None:
            return self._unknown(point)
        value = rule.normalise(point.value, self.policy)
        if isinstance(value, _Fault):
            return _reject(point, value)
        unit = rule.unit
        if point.unit is not None and unit is not None and point.unit != unit:
            return _reject(point, _unit_mismatch(point.unit, unit))
        quality, reasons = point.quality, point.quality_reasons
        # Bounds exist only on numeric metrics, whose normalised values are numbers (not
        # `cast` here: a function call per point).
        if rule.has_bounds and not rule.low <= value <= rule.high:  # type: ignore[operator]
            factor = rule.range_penalty(cast(float, value))
            if isinstance(factor, _Fault):
                return _reject(point, factor)
            quality, reasons = quality * factor, (*reasons, QualityReason.RANGE_MARGIN)
        ts_ms = point.ts_ms
        if not point.derived and not self.late_limit <= ts_ms <= self.skew_grace_limit:
            # A late point, every point of a backfill, is scored here without a call.
            if self.past_limit <= ts_ms < self.late_limit:
                quality, reasons = quality * LATE_ARRIVAL_FACTOR, (*reasons, _LATE)
            else:
                scored = self._score_timestamp(ts_ms, quality, reasons)
                if isinstance(scored, _Fault):
                    return _reject(point, scored)
                quality, reasons = scored
        return Accepted(
            point.index,
            point.metric,
            value,
            ts_ms,
            unit if unit is not None else point.unit,
            quality,
            reasons,
            point.derived,
        )

    def _score_timestamp(
        self, ts_ms: int, quality: float, reasons: tuple[QualityReason, ...]
    ) -> tuple[float, tuple[QualityReason, ...]] | _Fault:
        if ts_ms > self.future_limit:
            return self._future_fault(ts_ms)
        if ts_ms > self.skew_grace_limit:
            ahead = (ts_ms - self.now_ms) / max(self.policy.max_future_skew_ms, 1)
            factor = 1.0 - CLOCK_SKEW_MAX_PENALTY * min(ahead, 1.0)
            return quality * factor, (*reasons, QualityReason.CLOCK_SKEW)
        if ts_ms < self.past_limit:
            return self._past_fault(ts_ms)
        if ts_ms < self.late_limit:
            return quality * LATE_ARRIVAL_FACTOR, (*reasons, QualityReason.LATE_ARRIVAL)
        return quality, reasons

    def _future_fault(self, ts_ms: int) -> _Fault:
        ahead_s = (ts_ms - self.now_ms) / 1000
        message = f"ts is {ahead_s:.0f} s ahead of server time, more than the allowed skew"
        return _Fault("ts", RejectReason.TS_IN_FUTURE, message)

    def _past_fault(self, ts_ms: int) -> _Fault:
        message = "ts is older than the maximum accepted age"
        if 0 < ts_ms < self.now_ms // 100:
            message += " (it looks like epoch seconds; ts must be epoch milliseconds)"
        return _Fault("ts", RejectReason.TS_TOO_OLD, message)

    def _unknown(self, point: RawPoint) -> Accepted | Rejected:
        if self.policy.unknown_metric is not UnknownMetricPolicy.ACCEPT:
            message = f"{point.metric!r} is not a metric of this device type"
            return _reject(point, _Fault("metric", RejectReason.UNKNOWN_METRIC, message))
        if isinstance(point.value, float) and not math.isfinite(point.value):
            return _reject(point, _not_finite())
        scored = self._score_timestamp(
            point.ts_ms,
            point.quality * UNKNOWN_METRIC_FACTOR,
            (*point.quality_reasons, QualityReason.UNKNOWN_METRIC),
        )
        if isinstance(scored, _Fault):
            return _reject(point, scored)
        quality, reasons = scored
        return Accepted(
            point.index, point.metric, point.value, point.ts_ms, point.unit, quality, reasons
        )


def _unit_mismatch(given: str, expected: str) -> _Fault:
    message = f"unit {given!r} is not the schema's {expected!r}; convert it first"
    return _Fault("unit", RejectReason.UNIT_MISMATCH, message)


def _reject(point: RawPoint, fault: _Fault) -> Rejected:
    return Rejected(point.index, point.metric, fault.field, fault.reason, fault.message)
