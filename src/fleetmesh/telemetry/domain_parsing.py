"""Decoding a telemetry request body into points, fast, with per-item rejections.

Accepted body shapes:

* one point ``{"metric": "temp", "value": 21.5, "ts": ..., "unit": "degC"}``;
* a list of points;
* an envelope ``{"points": [...]}``;
* the compact form ``{"ts": ..., "values": {"temp": 21.5, "hum": 40}}``, or a list of them
  (lists and envelopes may mix points and compact objects).

``ts`` is an RFC 3339 string with an offset or integer epoch milliseconds; when absent the
server time ``now_ms`` is used. Items are flattened: a compact object contributes one item per
value, so ``index`` is the position in the flattened batch.

The common shapes (a list of well-formed points, bare or in an envelope; well-formed compact
objects, alone or in a list) are decoded by typed msgspec decoders that validate in C. If any
item is malformed, or a list mixes the two, the body is decoded again generically and checked
item by item, so a malformed item never rejects its neighbours.
A body that is not JSON, has the wrong overall shape, holds no point or more than
``max_points`` raises a ``TelemetryDomainError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Final

import msgspec

from fleetmesh.telemetry.domain_model import (
    BatchTooLarge,
    MalformedBatch,
    RawPoint,
    Rejected,
    RejectReason,
    Scalar,
)

MAX_BATCH_POINTS: Final = 10_000
"""Default limit of points per batch; callers pass the live-tunable value as ``max_points``."""

MAX_METRIC_NAME_LENGTH: Final = 128
MAX_UNIT_LENGTH: Final = 32

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)

_MetricName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_METRIC_NAME_LENGTH)]
_UnitName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_UNIT_LENGTH)]
_AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


class _WirePoint(msgspec.Struct, gc=False):
    metric: _MetricName
    value: bool | int | float | str
    ts: int | _AwareDatetime | None = None
    unit: _UnitName | None = None


class _WireEnvelope(msgspec.Struct):
    points: list[_WirePoint]


class _WireCompact(msgspec.Struct, gc=False):
    values: Annotated[dict[_MetricName, bool | int | float | str], msgspec.Meta(min_length=1)]
    ts: int | _AwareDatetime | None = None
    metric: msgspec.UnsetType = msgspec.UNSET
    """Never given: an object with a metric is a point (whose ``value`` is missing)."""


_TYPED_DECODER: Final = msgspec.json.Decoder(list[_WirePoint] | _WireEnvelope)
_COMPACT_DECODER: Final = msgspec.json.Decoder(list[_WireCompact] | _WireCompact)
_GENERIC_DECODER: Final = msgspec.json.Decoder()
_SHAPE_HINT: Final = (
    'expected a point object, a list of points, {"points": [...]}, or {"ts": ..., "values": {...}}'
)


@dataclass(frozen=True, slots=True)
class ParsedBatch:
    """Decoded points and per-item rejections; ``item_count`` counts both."""

    points: list[RawPoint]
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def item_count(self) -> int:
        return len(self.points) + len(self.rejected)

    @property
    def items(self) -> list[RawPoint | Rejected]:
        """Every item, in index order."""
        merged: list[RawPoint | Rejected] = [*self.points, *self.rejected]
        merged.sort(key=lambda item: item.index)
        return merged


def decode_points(raw: bytes, *, now_ms: int, max_points: int = MAX_BATCH_POINTS) -> ParsedBatch:
    """Decode a request body; see the module docstring for shapes and errors."""
    if max_points < 1:
        raise ValueError("max_points must be at least 1")
    try:
        wire = _TYPED_DECODER.decode(raw)
    except msgspec.ValidationError:
        return _decode_compact(raw, now_ms, max_points)
    except msgspec.DecodeError as exc:
        raise MalformedBatch(f"the body is not valid JSON: {exc}") from None
    wire_points = wire if isinstance(wire, list) else wire.points
    _check_count(len(wire_points), max_points)
    return ParsedBatch(points=[_from_wire(i, w, now_ms) for i, w in enumerate(wire_points)])


def _decode_compact(raw: bytes, now_ms: int, max_points: int) -> ParsedBatch:
    try:
        wire = _COMPACT_DECODER.decode(raw)
    except msgspec.ValidationError:
        return _decode_generic(raw, now_ms, max_points)
    objects = wire if isinstance(wire, list) else [wire]
    _check_count(sum(len(o.values) for o in objects), max_points)
    points: list[RawPoint] = []
    add = points.append
    for compact in objects:
        ts_ms = _wire_ts_ms(compact.ts, now_ms)
        for metric, value in compact.values.items():
            add(RawPoint(len(points), metric, value, ts_ms, None))
    return ParsedBatch(points=points)


def epoch_ms(moment: datetime) -> int:
    """Exact integer epoch milliseconds of an aware datetime (no float rounding)."""
    return (moment - _EPOCH) // _ONE_MS


def _from_wire(index: int, wire: _WirePoint, now_ms: int) -> RawPoint:
    return RawPoint(index, wire.metric, wire.value, _wire_ts_ms(wire.ts, now_ms), wire.unit)


def _wire_ts_ms(ts: int | datetime | None, now_ms: int) -> int:
    if ts is None:
        return now_ms
    if isinstance(ts, int):
        return ts
    return epoch_ms(ts)


def _check_count(count: int, max_points: int) -> None:
    if count > max_points:
        raise BatchTooLarge(count, max_points)
    if count == 0:
        raise MalformedBatch("the batch holds no point")


# --------------------------------------------------------------------------- generic path


def _decode_generic(raw: bytes, now_ms: int, max_points: int) -> ParsedBatch:
    try:
        body = _GENERIC_DECODER.decode(raw)
    except msgspec.DecodeError as exc:
        raise MalformedBatch(f"the body is not valid JSON: {exc}") from None
    items = _top_level_items(body)
    _check_count(sum(_point_count(item) for item in items), max_points)
    builder = _BatchBuilder(now_ms)
    for item in items:
        builder.add_item(item)
    return ParsedBatch(points=builder.points, rejected=builder.rejected)


def _top_level_items(body: object) -> list[object]:
    if isinstance(body, list):
        return body
    if not isinstance(body, dict):
        raise MalformedBatch(f"the body is a JSON {type(body).__name__}; {_SHAPE_HINT}")
    if "points" in body and "metric" not in body:
        points = body["points"]
        if not isinstance(points, list):
            raise MalformedBatch(f'"points" must be a list; {_SHAPE_HINT}')
        return points
    return [body]


def _is_compact(item: dict[str, object]) -> bool:
    return "values" in item and "metric" not in item


def _point_count(item: object) -> int:
    if isinstance(item, dict) and _is_compact(item):
        values = item["values"]
        return len(values) if isinstance(values, dict) and values else 1
    return 1


class _BatchBuilder:
    """Checks generic JSON items one by one, numbering the flattened items."""

    __slots__ = ("now_ms", "points", "rejected", "next_index")

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms
        self.points: list[RawPoint] = []
        self.rejected: list[Rejected] = []
        self.next_index = 0

    def add_item(self, item: object) -> None:
        if not isinstance(item, dict):
            message = f"the item is {_json_kind(item)}, not an object"
            self._reject(None, _Problem("", RejectReason.NOT_AN_OBJECT, message))
        elif _is_compact(item):
            self._add_compact(item)
        else:
            self._add_point(item)

    def _add_point(self, item: dict[str, object]) -> None:
        metric = _checked_metric(item.get("metric"))
        value = _checked_value(item.get("value", _ABSENT))
        unit = _checked_unit(item.get("unit"))
        ts_ms = self._ts_ms(item.get("ts"))
        if isinstance(metric, _Problem):
            self._reject(None, metric)
        elif isinstance(value, _Problem):
            self._reject(metric, value)
        elif isinstance(unit, _Problem):
            self._reject(metric, unit)
        elif isinstance(ts_ms, _Problem):
            self._reject(metric, ts_ms)
        else:
            self._add(metric, value, ts_ms, unit)

    def _add_compact(self, item: dict[str, object]) -> None:
        values = item["values"]
        if not isinstance(values, dict) or not values:
            message = '"values" must be a non-empty object of metric → value'
            self._reject(None, _Problem("values", RejectReason.WRONG_TYPE, message))
            return
        ts_ms = self._ts_ms(item.get("ts"))
        for raw_metric, raw_value in values.items():
            metric = _checked_metric(raw_metric)
            value = _checked_value(raw_value)
            if isinstance(metric, _Problem):
                self._reject(None, metric)
            elif isinstance(value, _Problem):
                self._reject(metric, value)
            elif isinstance(ts_ms, _Problem):
                self._reject(metric, ts_ms)
            else:
                self._add(metric, value, ts_ms, None)

    def _ts_ms(self, ts: object) -> int | _Problem:
        if ts is None:
            return self.now_ms
        if isinstance(ts, int) and not isinstance(ts, bool):
            return ts
        if isinstance(ts, str):
            try:
                return epoch_ms(msgspec.convert(ts, _AwareDatetime))
            except msgspec.ValidationError:
                pass
        message = "ts must be an RFC 3339 string with an offset or integer epoch milliseconds"
        return _Problem("ts", RejectReason.INVALID_TIMESTAMP, message)

    def _add(self, metric: str, value: Scalar, ts_ms: int, unit: str | None) -> None:
        self.points.append(RawPoint(self.next_index, metric, value, ts_ms, unit))
        self.next_index += 1

    def _reject(self, metric: str | None, problem: _Problem) -> None:
        field_name, reason, message = problem.field, problem.reason, problem.message
        self.rejected.append(Rejected(self.next_index, metric, field_name, reason, message))
        self.next_index += 1


class _Absent:
    __slots__ = ()


_ABSENT: Final = _Absent()


@dataclass(frozen=True, slots=True)
class _Problem:
    field: str
    reason: RejectReason
    message: str


def _checked_metric(metric: object) -> str | _Problem:
    if metric is None:
        return _Problem("metric", RejectReason.MISSING, "metric is required")
    if not isinstance(metric, str) or not metric:
        return _Problem("metric", RejectReason.WRONG_TYPE, "metric must be a non-empty string")
    if len(metric) > MAX_METRIC_NAME_LENGTH:
        message = f"metric is longer than {MAX_METRIC_NAME_LENGTH} characters"
        return _Problem("metric", RejectReason.TOO_LONG, message)
    return metric


def _checked_value(value: object) -> Scalar | _Problem:
    if value is _ABSENT:
        return _Problem("value", RejectReason.MISSING, "value is required")
    if isinstance(value, bool | int | float | str):
        return value
    message = f"value must be a number, a boolean or a string, not {_json_kind(value)}"
    return _Problem("value", RejectReason.WRONG_TYPE, message)


def _checked_unit(unit: object) -> str | None | _Problem:
    if unit is None:
        return None
    if not isinstance(unit, str) or not unit:
        return _Problem("unit", RejectReason.WRONG_TYPE, "unit must be a non-empty string")
    if len(unit) > MAX_UNIT_LENGTH:
        message = f"unit is longer than {MAX_UNIT_LENGTH} characters"
        return _Problem("unit", RejectReason.TOO_LONG, message)
    return unit


_JSON_KINDS: Final = (
    (bool, "a boolean"),
    (int | float, "a number"),
    (str, "a string"),
    (list, "a list"),
    (dict, "an object"),
)


def _json_kind(value: object) -> str:
    for python_type, kind in _JSON_KINDS:
        if isinstance(value, python_type):
            return kind
    return "null"
