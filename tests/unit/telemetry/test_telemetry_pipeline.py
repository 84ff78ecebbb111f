"""process_batch: decode → transform → validate → derive, end to end."""

from __future__ import annotations

import json

import pytest

from fleetmesh.telemetry.domain import (
    MalformedBatch,
    QualityReason,
    TelemetrySchema,
    TransformSpec,
    ValidationPolicy,
    process_batch,
)

pytestmark = pytest.mark.unit

NOW_MS = 1_760_000_000_000


def run(
    body: object,
    schema: TelemetrySchema,
    transforms: TransformSpec | None = None,
    policy: ValidationPolicy | None = None,
) -> tuple[list[tuple[int, str, object]], list[tuple[int, str, str]]]:
    outcome = process_batch(
        json.dumps(body).encode(),
        schema=schema,
        policy=policy or ValidationPolicy(),
        now_ms=NOW_MS,
        transforms=transforms or TransformSpec(),
    )
    accepted: list[tuple[int, str, object]] = [
        (a.index, a.metric, a.value) for a in outcome.accepted
    ]
    rejected = [(r.index, r.field, r.reason.value) for r in outcome.rejected]
    return accepted, rejected


def test_a_mixed_batch_reports_each_item_once_in_index_order(schema: TelemetrySchema) -> None:
    body = [
        {"metric": "temp", "value": 21.5},
        {"metric": "temp", "value": 150, "ts": NOW_MS - 1},
        "junk",
        {"metric": "hum", "value": 70, "unit": "W"},
        {"metric": "door", "value": True},
        {"metric": "ghost", "value": 1},
    ]

    accepted, rejected = run(body, schema)

    assert accepted == [(0, "temp", 21.5), (4, "door", True)]
    assert rejected == [
        (1, "value", "out_of_range"),
        (2, "", "not_an_object"),
        (3, "unit", "unit_incompatible"),
        (5, "metric", "unknown_metric"),
    ]


def test_units_are_converted_before_the_range_check(schema: TelemetrySchema) -> None:
    # 185 degF is 85 degC, the top of the range; 200 degF is 93.3 degC, within the margin
    accepted, rejected = run(
        [
            {"metric": "temp", "value": 185, "unit": "degF", "ts": NOW_MS},
            {"metric": "temp", "value": 200, "unit": "degF", "ts": NOW_MS - 1},
        ],
        schema,
    )

    assert [value for _, _, value in accepted] == [pytest.approx(85.0), pytest.approx(93.333, 1e-4)]
    assert rejected == []


def test_the_full_transform_chain(schema: TelemetrySchema) -> None:
    transforms = TransformSpec.from_dicts(
        [
            {"type": "rename", "from": "v", "to": "voltage"},
            {"type": "rename", "from": "i_ma", "to": "current"},
            {"type": "scale", "metric": "current", "scale": 0.001},
            {"type": "derive", "metric": "power", "expression": "voltage * current"},
        ]
    )

    accepted, rejected = run({"ts": NOW_MS, "values": {"v": 230, "i_ma": 2000}}, schema, transforms)

    assert accepted == [(0, "voltage", 230.0), (1, "current", 2.0), (2, "power", 460.0)]
    assert rejected == []


def test_derived_points_are_validated_and_numbered_after_the_items(
    schema: TelemetrySchema,
) -> None:
    transforms = TransformSpec.from_dicts(
        [{"type": "derive", "metric": "power", "expression": "voltage * current"}]
    )
    body = [
        {"ts": NOW_MS, "values": {"voltage": 230, "current": -2}},
        {"ts": NOW_MS - 1, "values": {"voltage": 230, "current": 1, "power": 5}},
    ]

    accepted, rejected = run(body, schema, transforms)

    assert (4, "power", 5.0) in accepted
    assert rejected == [(5, "value", "out_of_range"), (6, "ts", "duplicate")]


def test_a_derived_point_carries_its_inputs_quality(schema: TelemetrySchema) -> None:
    transforms = TransformSpec.from_dicts(
        [{"type": "derive", "metric": "power", "expression": "voltage * current"}]
    )
    body = {"ts": NOW_MS - 2 * 3_600_000, "values": {"voltage": 10, "current": 1}}

    outcome = process_batch(
        json.dumps(body).encode(),
        schema=schema,
        policy=ValidationPolicy(),
        now_ms=NOW_MS,
        transforms=transforms,
    )

    derived = outcome.accepted[-1]
    assert derived.derived and derived.metric == "power"
    assert derived.quality == pytest.approx(0.9)
    assert derived.quality_reasons == (QualityReason.DEGRADED_INPUT,)
    assert outcome.item_count == 2


def test_a_bad_body_raises(schema: TelemetrySchema) -> None:
    with pytest.raises(MalformedBatch):
        process_batch(b"{", schema=schema, policy=ValidationPolicy(), now_ms=NOW_MS)
