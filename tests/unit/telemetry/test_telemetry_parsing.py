"""decode_points: body shapes, timestamps, per-item rejections, body-level errors."""

from __future__ import annotations

import json

import pytest

from fleetmesh.telemetry.domain import (
    MAX_BATCH_POINTS,
    BatchTooLarge,
    MalformedBatch,
    RawPoint,
    Rejected,
    RejectReason,
    decode_points,
)

pytestmark = pytest.mark.unit

NOW_MS = 1_760_000_000_000


def decode(
    body: object, max_points: int = MAX_BATCH_POINTS
) -> tuple[list[RawPoint], list[Rejected]]:
    parsed = decode_points(json.dumps(body).encode(), now_ms=NOW_MS, max_points=max_points)
    return parsed.points, parsed.rejected


def test_a_single_point_object() -> None:
    points, rejected = decode({"metric": "temp", "value": 21.5, "ts": 1_000, "unit": "degC"})

    assert points == [RawPoint(0, "temp", 21.5, 1_000, "degC")]
    assert rejected == []


def test_a_list_of_points_keeps_each_value_type() -> None:
    body = [
        {"metric": "a", "value": 1.5},
        {"metric": "b", "value": 2},
        {"metric": "c", "value": True},
        {"metric": "d", "value": "on"},
    ]

    points, _ = decode(body)

    assert [p.value for p in points] == [1.5, 2, True, "on"]
    assert [type(p.value) for p in points] == [float, int, bool, str]
    assert [p.index for p in points] == [0, 1, 2, 3]


def test_the_points_envelope() -> None:
    points, _ = decode({"points": [{"metric": "a", "value": 1}, {"metric": "b", "value": 2}]})

    assert [p.metric for p in points] == ["a", "b"]


def test_the_compact_form_gives_one_point_per_value_at_its_ts() -> None:
    points, _ = decode({"ts": 5_000, "values": {"temp": 21.5, "hum": 40}})

    assert points == [RawPoint(0, "temp", 21.5, 5_000), RawPoint(1, "hum", 40, 5_000)]


def test_a_list_of_compact_objects_is_flattened_in_order() -> None:
    body = [{"ts": 1, "values": {"a": 1, "b": 2}}, {"ts": 2, "values": {"a": 3}}]

    points, _ = decode(body)

    assert [(p.index, p.metric, p.ts_ms) for p in points] == [(0, "a", 1), (1, "b", 1), (2, "a", 2)]


def test_points_and_compact_objects_may_mix() -> None:
    points, _ = decode([{"metric": "a", "value": 1}, {"values": {"b": 2, "c": 3}}])

    assert [(p.index, p.metric) for p in points] == [(0, "a"), (1, "b"), (2, "c")]


def test_a_missing_ts_takes_server_time() -> None:
    points, _ = decode([{"metric": "a", "value": 1}, {"values": {"b": 2}}])

    assert {p.ts_ms for p in points} == {NOW_MS}


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2025-10-09T08:53:20Z", 1_760_000_000_000),
        ("2025-10-09T08:53:20.123Z", 1_760_000_000_123),
        ("2025-10-09T10:53:20.5+02:00", 1_760_000_000_500),
        (1_760_000_000_777, 1_760_000_000_777),
    ],
)
def test_ts_is_rfc3339_or_epoch_milliseconds(ts: object, expected: int) -> None:
    points, _ = decode({"metric": "a", "value": 1, "ts": ts})

    assert points[0].ts_ms == expected


@pytest.mark.parametrize(
    ("item", "field", "reason"),
    [
        ({"value": 1}, "metric", RejectReason.MISSING),
        ({"metric": 5, "value": 1}, "metric", RejectReason.WRONG_TYPE),
        ({"metric": "", "value": 1}, "metric", RejectReason.WRONG_TYPE),
        ({"metric": "x" * 129, "value": 1}, "metric", RejectReason.TOO_LONG),
        ({"metric": "a"}, "value", RejectReason.MISSING),
        ({"metric": "a", "value": None}, "value", RejectReason.WRONG_TYPE),
        ({"metric": "a", "value": [1]}, "value", RejectReason.WRONG_TYPE),
        ({"metric": "a", "value": {"x": 1}}, "value", RejectReason.WRONG_TYPE),
        ({"metric": "a", "value": 1, "ts": "yesterday"}, "ts", RejectReason.INVALID_TIMESTAMP),
        ({"metric": "a", "value": 1, "ts": "2025-10-09T08:53:20"}, "ts", "invalid_timestamp"),
        ({"metric": "a", "value": 1, "ts": 1.5}, "ts", RejectReason.INVALID_TIMESTAMP),
        ({"metric": "a", "value": 1, "ts": True}, "ts", RejectReason.INVALID_TIMESTAMP),
        ({"metric": "a", "value": 1, "unit": 3}, "unit", RejectReason.WRONG_TYPE),
        ({"metric": "a", "value": 1, "unit": "u" * 33}, "unit", RejectReason.TOO_LONG),
        (42, "", RejectReason.NOT_AN_OBJECT),
        ({"values": [1, 2]}, "values", RejectReason.WRONG_TYPE),
    ],
)
def test_a_malformed_item_is_rejected_alone(item: object, field: str, reason: str) -> None:
    body = [{"metric": "ok", "value": 1}, item, {"metric": "ok2", "value": 2}]

    points, rejected = decode(body)

    assert [(p.index, p.metric) for p in points] == [(0, "ok"), (2, "ok2")]
    assert len(rejected) == 1
    assert (rejected[0].index, rejected[0].field, rejected[0].reason) == (1, field, reason)
    assert rejected[0].message


def test_a_bad_compact_ts_rejects_each_of_its_values() -> None:
    points, rejected = decode([{"ts": "soon", "values": {"a": 1, "b": 2}}, {"values": {"c": 3}}])

    assert [(r.index, r.metric, r.field) for r in rejected] == [(0, "a", "ts"), (1, "b", "ts")]
    assert [(p.index, p.metric) for p in points] == [(2, "c")]


def test_a_bad_compact_value_rejects_only_that_value() -> None:
    points, rejected = decode({"ts": 1, "values": {"a": 1, "b": None, "c": 3}})

    assert [p.metric for p in points] == ["a", "c"]
    assert [(r.index, r.metric, r.field) for r in rejected] == [(1, "b", "value")]


def test_items_merge_points_and_rejections_in_index_order() -> None:
    parsed = decode_points(
        b'[{"metric": "a", "value": 1}, 7, {"metric": "b", "value": 2}]', now_ms=0
    )

    assert [type(item).__name__ for item in parsed.items] == ["RawPoint", "Rejected", "RawPoint"]
    assert parsed.item_count == 3


def test_unknown_fields_of_a_point_are_ignored() -> None:
    points, _ = decode({"metric": "a", "value": 1, "quality": "great"})

    assert points == [RawPoint(0, "a", 1, NOW_MS)]


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b'{"metric": ', b"\xff\xfe", b'"a string"', b"42", b"null"],
)
def test_a_body_that_is_not_a_batch_raises(raw: bytes) -> None:
    with pytest.raises(MalformedBatch) as caught:
        decode_points(raw, now_ms=NOW_MS, max_points=10)

    assert caught.value.status == 400
    assert caught.value.detail


def test_an_envelope_whose_points_is_not_a_list_raises() -> None:
    with pytest.raises(MalformedBatch, match='"points" must be a list'):
        decode({"points": {"metric": "a"}})


@pytest.mark.parametrize("body", [[], {"points": []}])
def test_an_empty_batch_raises(body: object) -> None:
    with pytest.raises(MalformedBatch, match="no point"):
        decode(body)


def test_a_compact_object_without_values_is_a_rejected_item() -> None:
    points, rejected = decode({"ts": 1, "values": {}})

    assert points == []
    assert [(r.index, r.field) for r in rejected] == [(0, "values")]


def test_a_number_out_of_float_range_raises() -> None:
    with pytest.raises(MalformedBatch):
        decode_points(b'[{"metric": "a", "value": 1e999}]', now_ms=NOW_MS)


def test_more_points_than_the_limit_raises() -> None:
    body = [{"metric": "a", "value": i} for i in range(11)]

    with pytest.raises(BatchTooLarge) as caught:
        decode(body, max_points=10)

    assert (caught.value.count, caught.value.limit, caught.value.status) == (11, 10, 413)


def test_compact_values_count_towards_the_limit() -> None:
    body = {"values": {f"m{i}": i for i in range(11)}}

    with pytest.raises(BatchTooLarge):
        decode(body, max_points=10)
    assert len(decode(body, max_points=11)[0]) == 11


def test_the_limit_counts_malformed_items_too() -> None:
    with pytest.raises(BatchTooLarge):
        decode([{"metric": "a"}] * 3, max_points=2)


def test_the_default_limit_is_ten_thousand() -> None:
    assert MAX_BATCH_POINTS == 10_000
    with pytest.raises(BatchTooLarge):
        decode([{"metric": "a", "value": 1}] * 10_001)


def test_max_points_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_points"):
        decode_points(b"[]", now_ms=0, max_points=0)
