"""Transforms: spec parsing, rename, scale/offset, units (pint), derived metrics (simpleeval)."""

from __future__ import annotations

import pytest

from fleetmesh.telemetry.domain import (
    Accepted,
    DefaultUnit,
    DeriveMetric,
    EvaluationError,
    Expression,
    ExpressionError,
    InvalidTransform,
    QualityReason,
    RawPoint,
    Rejected,
    RejectReason,
    RenameMetric,
    ScaleOffset,
    TelemetrySchema,
    TransformSpec,
    UnitConversion,
    UnitProblem,
    derive_metrics,
    resolve_conversion,
    transform_data,
)
from fleetmesh.telemetry.domain_expressions import Evaluator

pytestmark = pytest.mark.unit

TS = 1_760_000_000_000


def spec_of(*transforms: dict[str, object]) -> TransformSpec:
    return TransformSpec.from_dicts(list(transforms))


def transform_one(
    raw: RawPoint, spec: TransformSpec, schema: TelemetrySchema
) -> RawPoint | Rejected:
    result = transform_data([raw], spec, schema)
    outcomes: list[RawPoint | Rejected] = [*result.points, *result.rejected]
    [outcome] = outcomes
    return outcome


# --------------------------------------------------------------------------- spec parsing


def test_every_kind_of_transform_is_parsed() -> None:
    spec = spec_of(
        {"type": "rename", "from": "t", "to": "temp"},
        {"type": "scale", "metric": "level", "scale": 0.1, "offset": -40},
        {"type": "unit", "metric": "temp", "unit": "degF"},
        {"type": "derive", "metric": "power", "expression": "voltage * current", "unit": "W"},
    )

    assert spec.renames == {"t": "temp"}
    assert spec.scalings == {"level": ScaleOffset("level", 0.1, -40.0)}
    assert spec.default_units == {"temp": "degF"}
    [derive] = spec.derivations
    assert (derive.metric, derive.unit, derive.expression.inputs) == (
        "power",
        "W",
        frozenset({"voltage", "current"}),
    )
    assert spec.touched_metrics == {"t", "level", "temp"}


def test_no_transforms_at_all() -> None:
    assert TransformSpec.from_dicts(None) == TransformSpec.from_dicts([]) == TransformSpec()


def test_scale_and_offset_default_to_identity() -> None:
    assert spec_of({"type": "scale", "metric": "x"}).scalings["x"] == ScaleOffset("x", 1.0, 0.0)


@pytest.mark.parametrize(
    ("transforms", "field"),
    [
        ({"type": "explode"}, "transforms[0].type"),
        ({"from": "a", "to": "b"}, "transforms[0].type"),
        ({"type": "rename", "from": "a"}, "transforms[0].to"),
        ({"type": "rename", "from": "a", "to": "b", "via": "c"}, "transforms[0].via"),
        ({"type": "rename", "from": "a", "to": 3}, "transforms[0].to"),
        ({"type": "rename", "from": "a", "to": "a"}, "transforms[0].to"),
        ({"type": "scale", "metric": "x", "scale": 0}, "transforms[0].scale"),
        ({"type": "scale", "metric": "x", "scale": "2"}, "transforms[0].scale"),
        ({"type": "scale", "metric": "x", "offset": float("nan")}, "transforms[0].offset"),
        ({"type": "unit", "metric": "x", "unit": "furlongs per bogus"}, "transforms[0].unit"),
        ({"type": "unit", "metric": "x", "unit": "m^9^9^9"}, "transforms[0].unit"),
        ({"type": "derive", "metric": "p", "expression": "a *"}, "transforms[0].expression"),
        ({"type": "derive", "metric": "p", "expression": "a.b"}, "transforms[0].expression"),
        ({"type": "derive", "metric": "p", "expression": "p + 1"}, "transforms[0].expression"),
        ({"type": "derive", "metric": "p", "expression": "2 + 2"}, "transforms[0].expression"),
        ({"type": "derive", "metric": "p", "expression": 5}, "transforms[0].expression"),
        ({"type": "derive", "metric": "p", "expression": "a", "unit": "zz"}, "transforms[0].unit"),
        ("rename a to b", "transforms[0]"),
    ],
)
def test_an_invalid_transform_names_its_field(transforms: object, field: str) -> None:
    with pytest.raises(InvalidTransform) as caught:
        TransformSpec.from_dicts([transforms])

    assert caught.value.field == field
    assert caught.value.status == 422


@pytest.mark.parametrize(
    ("first", "second", "field"),
    [
        (
            {"type": "rename", "from": "a", "to": "b"},
            {"type": "rename", "from": "a", "to": "c"},
            "from",
        ),
        ({"type": "scale", "metric": "a"}, {"type": "scale", "metric": "a"}, "metric"),
        (
            {"type": "unit", "metric": "a", "unit": "m"},
            {"type": "unit", "metric": "a", "unit": "s"},
            "metric",
        ),
        (
            {"type": "derive", "metric": "p", "expression": "a"},
            {"type": "derive", "metric": "p", "expression": "b"},
            "metric",
        ),
    ],
)
def test_conflicting_transforms_are_refused(
    first: dict[str, object], second: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidTransform) as caught:
        spec_of(first, second)

    assert caught.value.field == f"transforms[1].{field}"


def test_transforms_must_be_a_list() -> None:
    with pytest.raises(InvalidTransform, match="list"):
        TransformSpec.from_dicts({"type": "rename"})


def test_specs_can_be_built_from_dataclasses() -> None:
    spec = TransformSpec.of(
        [RenameMetric("t", "temp"), DefaultUnit("temp", "degF"), ScaleOffset("x", 2.0)]
    )

    assert spec.renames == {"t": "temp"} and spec.default_units == {"temp": "degF"}


# --------------------------------------------------------------------------- rename, scale


def test_rename(schema: TelemetrySchema) -> None:
    spec = spec_of({"type": "rename", "from": "t", "to": "temp"})

    assert transform_one(RawPoint(0, "t", 20.0, TS), spec, schema) == RawPoint(0, "temp", 20.0, TS)


def test_renames_are_one_step_so_they_can_swap(schema: TelemetrySchema) -> None:
    spec = spec_of(
        {"type": "rename", "from": "temp", "to": "hum"},
        {"type": "rename", "from": "hum", "to": "temp"},
    )

    result = transform_data(
        [RawPoint(0, "temp", 1.0, TS), RawPoint(1, "hum", 2.0, TS)], spec, schema
    )

    assert [(p.metric, p.value) for p in result.points] == [("hum", 1.0), ("temp", 2.0)]


def test_scale_and_offset(schema: TelemetrySchema) -> None:
    spec = spec_of({"type": "scale", "metric": "temp", "scale": 0.1, "offset": -40})

    outcome = transform_one(RawPoint(0, "temp", 650, TS), spec, schema)

    assert isinstance(outcome, RawPoint)
    assert outcome.value == pytest.approx(25.0)
    assert outcome.quality == 1.0


def test_scale_applies_after_rename_and_ignores_non_numbers(schema: TelemetrySchema) -> None:
    spec = spec_of(
        {"type": "rename", "from": "raw", "to": "temp"},
        {"type": "scale", "metric": "temp", "scale": 2},
    )

    points = transform_data(
        [RawPoint(0, "raw", 10, TS), RawPoint(1, "temp", "x", TS), RawPoint(2, "temp", True, TS)],
        spec,
        schema,
    ).points

    assert [p.value for p in points] == [20.0, "x", True]


def test_scale_offset_inverse_undoes_it() -> None:
    scaling = ScaleOffset("x", 0.5, 3.0)

    assert scaling.inverse().apply(scaling.apply(10.0)) == pytest.approx(10.0)


# --------------------------------------------------------------------------- units


def test_a_point_in_another_unit_is_converted_to_the_schema_unit(schema: TelemetrySchema) -> None:
    outcome = transform_one(RawPoint(0, "temp", 212.0, TS, "degF"), spec_of(), schema)

    assert isinstance(outcome, RawPoint)
    assert outcome.value == pytest.approx(100.0)
    assert outcome.unit == "degC"
    assert outcome.quality == pytest.approx(0.95)
    assert outcome.quality_reasons == (QualityReason.UNIT_CONVERTED,)


def test_the_same_unit_spelled_differently_is_not_a_conversion(schema: TelemetrySchema) -> None:
    outcome = transform_one(RawPoint(0, "temp", 20.0, TS, "°C"), spec_of(), schema)

    assert outcome == RawPoint(0, "temp", 20.0, TS, "degC")


def test_a_default_unit_applies_to_points_without_a_unit(schema: TelemetrySchema) -> None:
    spec = spec_of({"type": "unit", "metric": "temp", "unit": "degF"})

    converted = transform_one(RawPoint(0, "temp", 32.0, TS), spec, schema)
    explicit = transform_one(RawPoint(1, "temp", 20.0, TS, "degC"), spec, schema)

    assert isinstance(converted, RawPoint) and converted.value == pytest.approx(0.0)
    assert explicit == RawPoint(1, "temp", 20.0, TS, "degC")


@pytest.mark.parametrize(
    ("unit", "value", "reason"),
    [
        ("W", 3.0, RejectReason.UNIT_INCOMPATIBLE),
        ("bogons", 3.0, RejectReason.UNIT_UNKNOWN),
        ("9^9^9", 3.0, RejectReason.UNIT_UNKNOWN),
        ("(m)", 3.0, RejectReason.UNIT_UNKNOWN),
        ("degF", "hot", RejectReason.UNIT_INCOMPATIBLE),
    ],
)
def test_a_unit_that_cannot_be_converted_is_a_rejection(
    schema: TelemetrySchema, unit: str, value: float | str, reason: RejectReason
) -> None:
    outcome = transform_one(RawPoint(4, "temp", value, TS, unit), spec_of(), schema)

    assert isinstance(outcome, Rejected)
    assert (outcome.index, outcome.metric, outcome.field, outcome.reason) == (
        4,
        "temp",
        "unit",
        reason,
    )


def test_an_integer_metric_is_rounded_after_conversion() -> None:
    schema = TelemetrySchema.from_dict({"t": {"type": "integer", "unit": "degC"}})

    outcome = transform_one(RawPoint(0, "t", 70, TS, "degF"), spec_of(), schema)

    assert isinstance(outcome, RawPoint) and outcome.value == 21


def test_points_needing_nothing_are_passed_through_untouched(schema: TelemetrySchema) -> None:
    points = [RawPoint(0, "temp", 1.0, TS), RawPoint(1, "hum", 2.0, TS, "percent")]

    result = transform_data(points, spec_of(), schema)

    assert all(a is b for a, b in zip(result.points, points, strict=True))


def test_an_unknown_metric_keeps_its_unit(schema: TelemetrySchema) -> None:
    outcome = transform_one(RawPoint(0, "pressure", 1.0, TS, "hPa"), spec_of(), schema)

    assert outcome == RawPoint(0, "pressure", 1.0, TS, "hPa")


def test_conversions_are_resolved_once_and_cached() -> None:
    first = resolve_conversion("degF", "degC")

    assert resolve_conversion("degF", "degC") is first
    assert isinstance(first, UnitConversion) and first.exact is None


def test_non_affine_conversions_use_pint_exactly() -> None:
    conversion = resolve_conversion("dBm", "mW")

    assert isinstance(conversion, UnitConversion) and conversion.exact is not None
    assert conversion.convert(20.0) == pytest.approx(100.0)


def test_an_unknown_unit_is_a_problem_not_an_exception() -> None:
    assert isinstance(resolve_conversion("m", "bogons"), UnitProblem)


# --------------------------------------------------------------------------- derive


def accepted(metric: str, value: float, ts: int = TS, quality: float = 1.0) -> Accepted:
    reasons = (QualityReason.LATE_ARRIVAL,) if quality < 1 else ()
    return Accepted(0, metric, value, ts, None, quality, reasons)


def test_a_derived_metric_is_computed_per_timestamp(schema: TelemetrySchema) -> None:
    spec = spec_of({"type": "derive", "metric": "power", "expression": "voltage * current"})
    inputs = [
        accepted("voltage", 230.0),
        accepted("current", 2.0),
        accepted("voltage", 100.0, TS + 1),
        accepted("current", 1.5, TS + 1),
        accepted("voltage", 5.0, TS + 2),
    ]

    result = derive_metrics(inputs, spec, schema, first_index=10)

    assert result.points == [
        RawPoint(10, "power", 460.0, TS, derived=True),
        RawPoint(11, "power", 150.0, TS + 1, derived=True),
    ]
    assert result.rejected == []


def test_a_derived_metric_inherits_the_lowest_input_quality(schema: TelemetrySchema) -> None:
    spec = spec_of({"type": "derive", "metric": "power", "expression": "voltage * current"})
    inputs = [accepted("voltage", 2.0, quality=0.9), accepted("current", 3.0, quality=0.5)]

    [derived] = derive_metrics(inputs, spec, schema, first_index=2).points

    assert (derived.quality, derived.quality_reasons) == (0.5, (QualityReason.DEGRADED_INPUT,))


def test_a_derived_metric_may_use_an_earlier_one(schema: TelemetrySchema) -> None:
    spec = spec_of(
        {"type": "derive", "metric": "temp_f", "expression": "temp * 1.8 + 32"},
        {"type": "derive", "metric": "heat", "expression": "temp_f - 32 + hum / 10"},
    )

    points = derive_metrics(
        [accepted("temp", 20.0), accepted("hum", 50.0)], spec, schema, first_index=2
    ).points

    assert [(p.metric, p.value) for p in points] == [("temp_f", 68.0), ("heat", 41.0)]


def test_a_derived_value_is_converted_to_the_schema_unit(schema: TelemetrySchema) -> None:
    spec = spec_of(
        {
            "type": "derive",
            "metric": "power",
            "expression": "voltage * current / 1000",
            "unit": "kW",
        }
    )

    [derived] = derive_metrics(
        [accepted("voltage", 230.0), accepted("current", 2.0)], spec, schema, first_index=2
    ).points

    assert derived.value == pytest.approx(460.0)
    assert derived.unit == "W"


def test_a_failing_derivation_is_a_rejection(schema: TelemetrySchema) -> None:
    spec = spec_of({"type": "derive", "metric": "power", "expression": "voltage / current"})

    result = derive_metrics(
        [accepted("voltage", 1.0), accepted("current", 0.0)], spec, schema, first_index=7
    )

    assert result.points == []
    [rejection] = result.rejected
    assert (rejection.index, rejection.field, rejection.reason) == (
        7,
        "expression",
        "derivation_failed",
    )


def test_non_numeric_inputs_do_not_feed_derivations(schema: TelemetrySchema) -> None:
    spec = spec_of({"type": "derive", "metric": "power", "expression": "voltage * 2"})
    flag = Accepted(0, "voltage", True, TS, None, 1.0)

    assert derive_metrics([flag], spec, schema, first_index=1).points == []


# --------------------------------------------------------------------------- expressions


@pytest.mark.parametrize(
    ("source", "values", "expected"),
    [
        ("temp * 1.8 + 32", {"temp": 100.0}, 212.0),
        ("sqrt(a ** 2 + b ** 2)", {"a": 3.0, "b": 4.0}, 5.0),
        ("max(a, b) - min(a, b)", {"a": 3.0, "b": 4.0}, 1.0),
        ("a if a > 0 else -a", {"a": -2.0}, 2.0),
        ("round(a)", {"a": 2.6}, 3.0),
    ],
)
def test_expressions_evaluate(source: str, values: dict[str, float], expected: float) -> None:
    assert Evaluator().evaluate(Expression.parse(source), values) == pytest.approx(expected)


@pytest.mark.parametrize(
    "source",
    [
        "__import__('os').system('true')",
        "open('x')",
        "a.__class__",
        "a[0]",
        "[a for a in b]",
        "lambda: 1",
        "'text'",
        "True",
        "f(a)",
        "min(a, key=b)",
        "_secret + 1",
        "",
        "x" * 600,
    ],
)
def test_unsafe_or_invalid_expressions_are_refused(source: str) -> None:
    with pytest.raises(ExpressionError):
        Expression.parse(source)


@pytest.mark.parametrize(
    "source", ["a / 0", "4000000 ** 4000000", "log(-a)", "a > 1", "10.0 ** 400"]
)
def test_evaluation_failures_raise_evaluation_error(source: str) -> None:
    with pytest.raises(EvaluationError):
        Evaluator().evaluate(Expression.parse(source), {"a": 2.0})


def test_deriving_uses_derive_metric_dataclasses_too(schema: TelemetrySchema) -> None:
    spec = TransformSpec.of([DeriveMetric("power", Expression.parse("voltage * 2"))])

    [derived] = derive_metrics([accepted("voltage", 3.0)], spec, schema, first_index=1).points

    assert derived.value == 6.0
