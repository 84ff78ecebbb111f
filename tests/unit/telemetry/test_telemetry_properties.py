"""Property tests of the validator, the transforms and the decoder (hypothesis)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fleetmesh.telemetry.domain import (
    DAY_MS,
    HOUR_MS,
    MINUTE_MS,
    Accepted,
    MetricSpec,
    MetricType,
    RawPoint,
    Rejected,
    Scalar,
    ScaleOffset,
    TelemetryDomainError,
    TelemetrySchema,
    TransformSpec,
    UnknownMetricPolicy,
    ValidationPolicy,
    decode_points,
    transform_data,
    validate_batch,
)
from fleetmesh.telemetry.domain_parsing import _decode_generic

pytestmark = pytest.mark.unit

NOW_MS = 1_760_000_000_000
METRIC_NAMES = ["a", "b", "c", "d", "e"]

finite_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
scalars: st.SearchStrategy[Scalar] = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)


@st.composite
def metric_specs(draw: st.DrawFn) -> MetricSpec:
    metric_type = draw(st.sampled_from(MetricType))
    if metric_type not in (MetricType.NUMBER, MetricType.INTEGER):
        return MetricSpec(metric_type)
    low = draw(st.none() | finite_floats)
    high = draw(st.none() | finite_floats)
    if low is not None and high is not None and low > high:
        low, high = high, low
    return MetricSpec(metric_type, draw(st.none() | st.just("m")), low, high)


def schemas(min_size: int = 0) -> st.SearchStrategy[TelemetrySchema]:
    metrics = st.dictionaries(st.sampled_from(METRIC_NAMES[:4]), metric_specs(), min_size=min_size)
    return metrics.map(TelemetrySchema)


policies = st.builds(
    ValidationPolicy,
    max_future_skew_ms=st.integers(0, HOUR_MS),
    max_past_age_ms=st.integers(0, 30 * DAY_MS),
    unknown_metric=st.sampled_from(UnknownMetricPolicy),
    clock_skew_grace_ms=st.integers(0, MINUTE_MS),
    late_arrival_after_ms=st.integers(0, DAY_MS),
    range_margin_ratio=st.floats(0, 1),
)


@st.composite
def raw_points(draw: st.DrawFn) -> list[RawPoint]:
    items = draw(
        st.lists(
            st.tuples(
                st.sampled_from(METRIC_NAMES),
                scalars,
                st.integers(NOW_MS - 40 * DAY_MS, NOW_MS + 2 * HOUR_MS),
                st.sampled_from([None, "m", "s"]),
                st.floats(0, 1),
            ),
            max_size=30,
        )
    )
    return [
        RawPoint(i, metric, value, ts, unit, quality)
        for i, (metric, value, ts, unit, quality) in enumerate(items)
    ]


# --------------------------------------------------------------------------- validator


@given(raw_points(), schemas(), policies)
def test_every_point_yields_exactly_one_result_at_its_index(
    points: list[RawPoint], schema: TelemetrySchema, policy: ValidationPolicy
) -> None:
    results = validate_batch(points, schema, policy, NOW_MS)

    assert [r.index for r in results] == [p.index for p in points]
    assert all(isinstance(r, Accepted | Rejected) for r in results)


@given(raw_points(), schemas(), policies)
def test_quality_is_always_within_zero_and_one(
    points: list[RawPoint], schema: TelemetrySchema, policy: ValidationPolicy
) -> None:
    for result in validate_batch(points, schema, policy, NOW_MS):
        if isinstance(result, Accepted):
            assert 0.0 <= result.quality <= 1.0
            assert (result.quality < 1.0) or not result.quality_reasons


@given(raw_points(), schemas(), policies)
def test_nothing_accepted_violates_the_schema(
    points: list[RawPoint], schema: TelemetrySchema, policy: ValidationPolicy
) -> None:
    accepted = [
        r for r in validate_batch(points, schema, policy, NOW_MS) if isinstance(r, Accepted)
    ]

    keys = [(a.metric, a.ts_ms) for a in accepted]
    assert len(keys) == len(set(keys))
    for result in accepted:
        assert NOW_MS - policy.max_past_age_ms <= result.ts_ms
        assert result.ts_ms <= NOW_MS + policy.max_future_skew_ms
        spec = schema.metrics.get(result.metric)
        if spec is None:
            assert policy.unknown_metric is UnknownMetricPolicy.ACCEPT
            continue
        assert_conforms(result, spec, policy)


def assert_conforms(result: Accepted, spec: MetricSpec, policy: ValidationPolicy) -> None:
    expected_type = {
        MetricType.NUMBER: float,
        MetricType.INTEGER: int,
        MetricType.BOOLEAN: bool,
        MetricType.STRING: str,
    }[spec.type]
    assert type(result.value) is expected_type
    if spec.unit is not None:
        assert result.unit == spec.unit
    if isinstance(result.value, float):
        assert math.isfinite(result.value)
    if isinstance(result.value, int | float) and spec.is_numeric:
        value = float(result.value)
        width = (
            spec.max - spec.min
            if spec.min is not None and spec.max is not None
            else abs(spec.min if spec.min is not None else spec.max or 0.0)
        )
        margin = policy.range_margin_ratio * width + 1e-9
        if spec.min is not None:
            assert value >= spec.min - margin
        if spec.max is not None:
            assert value <= spec.max + margin


@st.composite
def valid_batches(draw: st.DrawFn) -> tuple[TelemetrySchema, list[RawPoint]]:
    schema = draw(schemas(min_size=1))
    names = sorted(schema.metrics)
    points = []
    used: set[tuple[str, int]] = set()
    for index in range(draw(st.integers(1, 20))):
        name = draw(st.sampled_from(names))
        ts = draw(st.integers(NOW_MS - HOUR_MS, NOW_MS + 1_000))
        assume((name, ts) not in used)
        used.add((name, ts))
        value = draw(valid_value(schema.metrics[name]))
        points.append(
            RawPoint(
                index, name, value, ts, draw(st.sampled_from([None, schema.metrics[name].unit]))
            )
        )
    return schema, points


def valid_value(spec: MetricSpec) -> st.SearchStrategy[Scalar]:
    if spec.type is MetricType.BOOLEAN:
        return st.booleans()
    if spec.type is MetricType.STRING:
        return st.text(max_size=50)
    low = spec.min if spec.min is not None else -1e9
    high = spec.max if spec.max is not None else 1e9
    if spec.type is MetricType.INTEGER:
        assume(math.ceil(low) <= math.floor(high))
        return st.integers(math.ceil(low), math.floor(high))
    return st.floats(low, high)


@given(valid_batches())
def test_valid_points_within_range_are_always_accepted_at_full_quality(
    batch: tuple[TelemetrySchema, list[RawPoint]],
) -> None:
    schema, points = batch

    results = validate_batch(points, schema, ValidationPolicy(), NOW_MS)

    assert all(isinstance(r, Accepted) and r.quality == 1.0 for r in results), results


# --------------------------------------------------------------------------- transforms


@given(
    st.lists(finite_floats, min_size=1, max_size=20),
    st.floats(0.001, 1000) | st.floats(-1000, -0.001),
    finite_floats,
)
def test_scale_offset_then_its_inverse_round_trips(
    values: list[float], scale: float, offset: float
) -> None:
    schema = TelemetrySchema({"x": MetricSpec(MetricType.NUMBER)})
    scaling = ScaleOffset("x", scale, offset)
    forward, backward = TransformSpec.of([scaling]), TransformSpec.of([scaling.inverse()])
    points = [RawPoint(i, "x", v, NOW_MS) for i, v in enumerate(values)]

    there = transform_data(points, forward, schema).points
    back = transform_data(there, backward, schema).points

    for original, restored in zip(points, back, strict=True):
        tolerance = 1e-9 * (1 + abs(offset) / abs(scale) + abs(float(original.value)))
        assert float(restored.value) == pytest.approx(original.value, abs=tolerance)


@settings(deadline=None)  # the first call builds pint's registry
@given(st.lists(st.floats(-500, 1e4), min_size=1, max_size=20))
def test_fahrenheit_to_celsius_and_back_round_trips(values: list[float]) -> None:
    in_celsius = TelemetrySchema({"t": MetricSpec(MetricType.NUMBER, unit="degC")})
    in_fahrenheit = TelemetrySchema({"t": MetricSpec(MetricType.NUMBER, unit="degF")})
    points = [RawPoint(i, "t", v, NOW_MS, "degF") for i, v in enumerate(values)]

    celsius = transform_data(points, TransformSpec(), in_celsius).points
    fahrenheit = transform_data(celsius, TransformSpec(), in_fahrenheit).points

    assert [p.unit for p in celsius] == ["degC"] * len(values)
    for original, restored in zip(points, fahrenheit, strict=True):
        assert float(restored.value) == pytest.approx(original.value, rel=1e-9, abs=1e-9)
        assert restored.unit == "degF"


@given(raw_points(), schemas())
def test_transforms_keep_every_point_once(points: list[RawPoint], schema: TelemetrySchema) -> None:
    spec = TransformSpec.from_dicts(
        [{"type": "rename", "from": "a", "to": "b"}, {"type": "scale", "metric": "c", "scale": 2}]
    )

    result = transform_data(points, spec, schema)

    indices = sorted([p.index for p in result.points] + [r.index for r in result.rejected])
    assert indices == [p.index for p in points]


# --------------------------------------------------------------------------- decoder

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["metric", "value", "ts", "unit", "values", "points"]),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@given(st.lists(json_values, max_size=10) | json_values)
def test_the_decoder_accounts_for_every_item_or_raises_a_domain_error(body: object) -> None:
    try:
        parsed = decode_points(json.dumps(body).encode(), now_ms=NOW_MS, max_points=50)
    except TelemetryDomainError:
        return

    indices = sorted(item.index for item in parsed.items)
    assert indices == list(range(parsed.item_count))


scalars = (
    st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5)
)
timestamps = st.integers(0, 2**40) | st.sampled_from(["2026-01-02T03:04:05.5+02:00", "noon"])
well_formed_compact = st.fixed_dictionaries(
    {"values": st.dictionaries(st.text(min_size=1, max_size=4), scalars, min_size=1, max_size=4)},
    optional={"ts": timestamps, "unit": st.just("degC")},
)
any_compact = st.fixed_dictionaries(
    {"values": st.dictionaries(st.text(max_size=4), scalars | json_values, max_size=4)},
    optional={"ts": st.none() | timestamps, "metric": st.none() | st.just("m")},
)
compact_objects = well_formed_compact | well_formed_compact | any_compact


@given(st.lists(compact_objects, max_size=6) | compact_objects)
def test_compact_bodies_decode_as_the_item_by_item_path_decodes_them(body: object) -> None:
    raw = json.dumps(body).encode()
    try:
        expected = _decode_generic(raw, NOW_MS, 50)
    except TelemetryDomainError as error:
        with pytest.raises(type(error)):
            decode_points(raw, now_ms=NOW_MS, max_points=50)
        return

    parsed = decode_points(raw, now_ms=NOW_MS, max_points=50)

    assert parsed.points == expected.points
    assert parsed.rejected == expected.rejected
