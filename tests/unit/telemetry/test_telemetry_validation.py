"""validate_batch: each rule, the quality score and its reasons; schema and policy parsing."""

from __future__ import annotations

import pytest

from fleetmesh.telemetry.domain import (
    DAY_MS,
    HOUR_MS,
    MINUTE_MS,
    Accepted,
    InvalidPolicy,
    InvalidSchema,
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
    validate_batch,
)

pytestmark = pytest.mark.unit

NOW_MS = 1_760_000_000_000


def point(metric: str, value: Scalar, ts_ms: int = NOW_MS, **kwargs: object) -> RawPoint:
    return RawPoint(0, metric, value, ts_ms, **kwargs)  # type: ignore[arg-type]


def check(
    raw: RawPoint, schema: TelemetrySchema, policy: ValidationPolicy | None = None
) -> Accepted | Rejected:
    [result] = validate_batch([raw], schema, policy or ValidationPolicy(), NOW_MS)
    return result


def accepted(raw: RawPoint, schema: TelemetrySchema, **policy: object) -> Accepted:
    result = check(raw, schema, ValidationPolicy(**policy))  # type: ignore[arg-type]
    assert isinstance(result, Accepted), result
    return result


def rejected(raw: RawPoint, schema: TelemetrySchema, **policy: object) -> Rejected:
    result = check(raw, schema, ValidationPolicy(**policy))  # type: ignore[arg-type]
    assert isinstance(result, Rejected), result
    return result


# --------------------------------------------------------------------------- known metric


def test_a_clean_point_is_accepted_with_full_quality(schema: TelemetrySchema) -> None:
    result = accepted(point("temp", 21.5), schema)

    assert result == Accepted(0, "temp", 21.5, NOW_MS, "degC", 1.0, ())


def test_an_unknown_metric_is_rejected_by_default(schema: TelemetrySchema) -> None:
    result = rejected(point("pressure", 1.0), schema)

    assert (result.field, result.reason) == ("metric", RejectReason.UNKNOWN_METRIC)


def test_an_unknown_metric_may_be_accepted_with_lowered_quality(schema: TelemetrySchema) -> None:
    result = accepted(point("pressure", 1013, unit="hPa"), schema, unknown_metric="accept")

    assert (result.value, result.unit, result.quality) == (1013, "hPa", 0.8)
    assert result.quality_reasons == (QualityReason.UNKNOWN_METRIC,)


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("metric", "value", "stored"),
    [
        ("temp", 21, 21.0),
        ("temp", 21.5, 21.5),
        ("count", 7, 7),
        ("count", 7.0, 7),
        ("door", True, True),
        ("mode", "eco", "eco"),
    ],
)
def test_values_of_the_right_type_are_normalised(
    schema: TelemetrySchema, metric: str, value: Scalar, stored: Scalar
) -> None:
    result = accepted(point(metric, value), schema)

    assert result.value == stored
    assert type(result.value) is type(stored)


@pytest.mark.parametrize(
    ("metric", "value", "reason"),
    [
        ("temp", True, RejectReason.WRONG_TYPE),
        ("temp", "21.5", RejectReason.WRONG_TYPE),
        ("temp", float("inf"), RejectReason.NOT_FINITE),
        ("temp", float("nan"), RejectReason.NOT_FINITE),
        ("count", 7.5, RejectReason.NOT_INTEGRAL),
        ("count", False, RejectReason.WRONG_TYPE),
        ("count", "7", RejectReason.WRONG_TYPE),
        ("door", 1, RejectReason.WRONG_TYPE),
        ("door", "true", RejectReason.WRONG_TYPE),
        ("mode", 3, RejectReason.WRONG_TYPE),
    ],
)
def test_values_of_the_wrong_type_are_rejected(
    schema: TelemetrySchema, metric: str, value: Scalar, reason: RejectReason
) -> None:
    result = rejected(point(metric, value), schema)

    assert (result.field, result.reason) == ("value", reason)


def test_an_integer_must_fit_in_64_bits() -> None:
    schema = TelemetrySchema({"n": MetricSpec(MetricType.INTEGER)})

    assert rejected(point("n", 2**63), schema).reason == RejectReason.OUT_OF_RANGE
    assert accepted(point("n", 2**63 - 1), schema).value == 2**63 - 1


def test_a_huge_integer_for_a_number_metric_is_not_finite() -> None:
    schema = TelemetrySchema({"x": MetricSpec(MetricType.NUMBER)})

    assert rejected(point("x", 10**400), schema).reason == RejectReason.NOT_FINITE


def test_a_string_longer_than_the_policy_allows_is_rejected(schema: TelemetrySchema) -> None:
    assert accepted(point("mode", "x" * 8), schema, max_string_length=8).value == "x" * 8
    assert rejected(point("mode", "x" * 9), schema, max_string_length=8).reason == "too_long"


# --------------------------------------------------------------------------- unit


def test_a_unit_other_than_the_schema_one_is_rejected(schema: TelemetrySchema) -> None:
    result = rejected(point("temp", 70.0, unit="degF"), schema)

    assert (result.field, result.reason) == ("unit", RejectReason.UNIT_MISMATCH)


def test_the_schema_unit_is_stored_when_a_point_has_none(schema: TelemetrySchema) -> None:
    assert accepted(point("temp", 20.0), schema).unit == "degC"
    assert accepted(point("temp", 20.0, unit="degC"), schema).unit == "degC"


# --------------------------------------------------------------------------- range


@pytest.mark.parametrize("value", [-40.0, 0.0, 85.0])
def test_values_within_the_range_keep_full_quality(schema: TelemetrySchema, value: float) -> None:
    assert accepted(point("temp", value), schema).quality == 1.0


@pytest.mark.parametrize(("value", "quality"), [(91.25, 0.75), (97.5, 0.5), (-46.25, 0.75)])
def test_values_within_the_margin_are_accepted_with_lowered_quality(
    schema: TelemetrySchema, value: float, quality: float
) -> None:
    # range 125 wide, margin 12.5: 6.25 outside lowers by a quarter, 12.5 by half
    result = accepted(point("temp", value), schema)

    assert result.quality == pytest.approx(quality)
    assert result.quality_reasons == (QualityReason.RANGE_MARGIN,)


@pytest.mark.parametrize("value", [97.6, -52.6, 1e9])
def test_values_beyond_the_margin_are_rejected(schema: TelemetrySchema, value: float) -> None:
    result = rejected(point("temp", value), schema)

    assert (result.field, result.reason) == ("value", RejectReason.OUT_OF_RANGE)
    assert "margin" in result.message


def test_a_one_sided_bound_has_a_margin_relative_to_the_bound() -> None:
    schema = TelemetrySchema({"p": MetricSpec(MetricType.NUMBER, max=200.0)})

    assert accepted(point("p", 210.0), schema).quality == pytest.approx(0.75)
    assert rejected(point("p", 221.0), schema).reason == RejectReason.OUT_OF_RANGE
    assert accepted(point("p", -1e12), schema).quality == 1.0


def test_a_bound_at_zero_has_no_margin(schema: TelemetrySchema) -> None:
    schema = TelemetrySchema({"p": MetricSpec(MetricType.NUMBER, min=0.0)})

    assert rejected(point("p", -0.001), schema).reason == RejectReason.OUT_OF_RANGE


def test_a_zero_margin_ratio_makes_bounds_hard(schema: TelemetrySchema) -> None:
    result = rejected(point("temp", 85.5), schema, range_margin_ratio=0.0)

    assert result.reason == RejectReason.OUT_OF_RANGE


def test_an_integer_metric_is_range_checked(schema: TelemetrySchema) -> None:
    assert rejected(point("count", -200), schema).reason == RejectReason.OUT_OF_RANGE
    assert accepted(point("count", 1050), schema).quality == pytest.approx(0.75)


# --------------------------------------------------------------------------- timestamps


def test_a_ts_far_in_the_future_is_rejected(schema: TelemetrySchema) -> None:
    result = rejected(point("temp", 1.0, NOW_MS + 5 * MINUTE_MS + 1), schema)

    assert (result.field, result.reason) == ("ts", RejectReason.TS_IN_FUTURE)


def test_a_ts_slightly_in_the_future_lowers_quality(schema: TelemetrySchema) -> None:
    at_limit = accepted(point("temp", 1.0, NOW_MS + 5 * MINUTE_MS), schema)
    halfway = accepted(point("temp", 1.0, NOW_MS + 150_000), schema)

    assert at_limit.quality == pytest.approx(0.7)
    assert halfway.quality == pytest.approx(0.85)
    assert halfway.quality_reasons == (QualityReason.CLOCK_SKEW,)


def test_a_ts_within_the_grace_keeps_full_quality(schema: TelemetrySchema) -> None:
    assert accepted(point("temp", 1.0, NOW_MS + 1_000), schema).quality == 1.0


def test_a_ts_too_old_is_rejected(schema: TelemetrySchema) -> None:
    result = rejected(point("temp", 1.0, NOW_MS - 7 * DAY_MS - 1), schema)

    assert (result.field, result.reason) == ("ts", RejectReason.TS_TOO_OLD)


def test_a_ts_in_epoch_seconds_gets_a_hint(schema: TelemetrySchema) -> None:
    assert "epoch seconds" in rejected(point("temp", 1.0, NOW_MS // 1000), schema).message


def test_a_late_point_is_accepted_with_lowered_quality(schema: TelemetrySchema) -> None:
    result = accepted(point("temp", 1.0, NOW_MS - HOUR_MS - 1), schema)

    assert (result.quality, result.quality_reasons) == (0.9, (QualityReason.LATE_ARRIVAL,))
    assert accepted(point("temp", 1.0, NOW_MS - HOUR_MS), schema).quality == 1.0


def test_the_time_window_is_configurable(schema: TelemetrySchema) -> None:
    old = point("temp", 1.0, NOW_MS - 2 * DAY_MS)

    assert rejected(old, schema, max_past_age_ms=DAY_MS).reason == RejectReason.TS_TOO_OLD
    ahead = point("temp", 1.0, NOW_MS + 10 * MINUTE_MS)
    assert accepted(ahead, schema, max_future_skew_ms=HOUR_MS).quality_reasons == ("clock_skew",)


def test_a_derived_point_skips_timestamp_checks(schema: TelemetrySchema) -> None:
    result = accepted(point("power", 5.0, NOW_MS - 2 * HOUR_MS, derived=True), schema)

    assert (result.quality, result.derived) == (1.0, True)


# --------------------------------------------------------------------------- duplicates


def test_the_later_duplicate_is_rejected(schema: TelemetrySchema) -> None:
    points = [
        RawPoint(0, "temp", 1.0, NOW_MS),
        RawPoint(1, "hum", 1.0, NOW_MS),
        RawPoint(2, "temp", 2.0, NOW_MS),
        RawPoint(3, "temp", 3.0, NOW_MS - 1),
    ]

    results = validate_batch(points, schema, ValidationPolicy(), NOW_MS)

    assert [type(r).__name__ for r in results] == ["Accepted", "Accepted", "Rejected", "Accepted"]
    duplicate = results[2]
    assert isinstance(duplicate, Rejected)
    assert (duplicate.index, duplicate.field, duplicate.reason) == (2, "ts", "duplicate")


def test_a_rejected_point_does_not_shadow_a_later_valid_one(schema: TelemetrySchema) -> None:
    points = [RawPoint(0, "temp", "bad", NOW_MS), RawPoint(1, "temp", 2.0, NOW_MS)]

    results = validate_batch(points, schema, ValidationPolicy(), NOW_MS)

    assert isinstance(results[1], Accepted)


def test_already_accepted_keys_count_as_duplicates(schema: TelemetrySchema) -> None:
    [result] = validate_batch(
        [RawPoint(9, "temp", 1.0, NOW_MS)],
        schema,
        ValidationPolicy(),
        NOW_MS,
        already_accepted=[("temp", NOW_MS)],
    )

    assert isinstance(result, Rejected) and result.reason == RejectReason.DUPLICATE


# --------------------------------------------------------------------------- quality


def test_penalties_multiply_and_are_all_listed(schema: TelemetrySchema) -> None:
    raw = point(
        "temp",
        91.25,
        NOW_MS - 2 * HOUR_MS,
        quality=0.95,
        quality_reasons=(QualityReason.UNIT_CONVERTED,),
    )

    result = accepted(raw, schema)

    assert result.quality == pytest.approx(0.95 * 0.75 * 0.9)
    assert result.quality_reasons == ("unit_converted", "range_margin", "late_arrival")


def test_results_keep_input_order_and_indices(schema: TelemetrySchema) -> None:
    points = [RawPoint(i, "temp" if i % 2 else "nope", float(i), NOW_MS + i) for i in range(6)]

    results = validate_batch(points, schema, ValidationPolicy(), NOW_MS)

    assert [r.index for r in results] == list(range(6))


# --------------------------------------------------------------------------- schema & policy


def test_a_schema_is_parsed_from_the_devices_dict() -> None:
    schema = TelemetrySchema.from_dict({"t": {"type": "integer", "unit": "s", "min": 0, "max": 9}})

    assert schema.metrics["t"] == MetricSpec(MetricType.INTEGER, "s", 0.0, 9.0)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"t": {"type": "float"}}, "t.type"),
        ({"t": {}}, "t.type"),
        ({"t": "number"}, "t"),
        ({"t": {"type": "number", "min": "0"}}, "t.min"),
        ({"t": {"type": "number", "max": True}}, "t.max"),
        ({"t": {"type": "number", "unit": ""}}, "t.unit"),
        ({"t": {"type": "number", "min": 5, "max": 1}}, "t.min"),
        ({"t": {"type": "boolean", "min": 0}}, "t.min"),
        ({"t": {"type": "number", "scale": 2}}, "t.scale"),
        ({"": {"type": "number"}}, "''"),
    ],
)
def test_an_invalid_schema_names_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSchema) as caught:
        TelemetrySchema.from_dict(raw)

    assert caught.value.field == field
    assert caught.value.status == 422
    assert caught.value.errors[0].field == field


def test_the_default_policy() -> None:
    policy = ValidationPolicy()

    assert (policy.max_future_skew_ms, policy.max_past_age_ms) == (5 * MINUTE_MS, 7 * DAY_MS)
    assert policy.unknown_metric is UnknownMetricPolicy.REJECT


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_future_skew_ms": -1},
        {"max_past_age_ms": 1.5},
        {"range_margin_ratio": 2},
        {"max_string_length": True},
        {"unknown_metric": "ignore"},
    ],
)
def test_an_invalid_policy_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidPolicy):
        ValidationPolicy(**kwargs)  # type: ignore[arg-type]
