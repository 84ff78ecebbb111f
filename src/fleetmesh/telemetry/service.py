"""Use cases of the telemetry context: the only place that commits.

* projection: ``apply_projection_changes`` (from the registry's events);
* storage: ``store_batches`` (the writer), idempotent by message id;
* per device type: ``set_transforms``, ``set_retention``;
* retention: ``expire_series``, ``expire_rollups``, ``forget_batches``;
* reads: ``TelemetryQueries``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.core.database import Database
from fleetmesh.core.envelope import CloudEvent
from fleetmesh.core.errors import FieldError, InvalidInput
from fleetmesh.core.uow import SqlUnitOfWork
from fleetmesh.telemetry import contracts
from fleetmesh.telemetry.contracts import IngestMessage, WirePoint
from fleetmesh.telemetry.domain import HOUR_MS, TransformSpec
from fleetmesh.telemetry.projection import DeviceDirectory, TypeProfile
from fleetmesh.telemetry.reads import BucketRead, PointQuery, PointRead, RollupRead, TelemetryReads
from fleetmesh.telemetry.repository import (
    BatchSpan,
    LatestRow,
    PointStore,
    ProjectionRepository,
    RetentionStore,
    Series,
)
from fleetmesh.telemetry.tables import Value, point_row

MAX_RETENTION_DAYS: Final = 36_500.0
AGGREGATES: Final = ("avg", "min", "max", "sum", "count", "last")
NUMERIC_ONLY: Final = frozenset({"avg", "min", "max", "sum"})


class TelemetryUnitOfWork(SqlUnitOfWork):
    projection: ProjectionRepository
    points: PointStore
    retention: RetentionStore

    def _open(self, session: AsyncSession) -> None:
        self.projection = ProjectionRepository(session)
        self.points = PointStore(session)
        self.retention = RetentionStore(session)


UnitOfWorkFactory = Callable[[], TelemetryUnitOfWork]


# --------------------------------------------------------------------------- projection


@dataclass(frozen=True, slots=True)
class DeviceTypeDefined:
    name: str
    telemetry_schema: dict[str, Any]
    expected_interval_s: float | None
    offline_timeout_s: float | None


@dataclass(frozen=True, slots=True)
class DeviceRegistered:
    device_id: str
    type_name: str
    at: datetime


@dataclass(frozen=True, slots=True)
class DeviceDeregistered:
    device_id: str
    type_name: str | None
    at: datetime


ProjectionChange = DeviceTypeDefined | DeviceRegistered | DeviceDeregistered


async def apply_projection_changes(
    changes: Sequence[ProjectionChange],
    *,
    uow: TelemetryUnitOfWork,
    directory: DeviceDirectory,
    now: datetime,
) -> None:
    """Apply registry events in one transaction; every change is idempotent and commutes."""
    types: set[str] = set()
    devices: set[str] = set()
    async with uow:
        for change in changes:
            if isinstance(change, DeviceTypeDefined):
                await uow.projection.upsert_type(
                    change.name,
                    change.telemetry_schema,
                    expected_interval_s=change.expected_interval_s,
                    offline_timeout_s=change.offline_timeout_s,
                    now=now,
                )
                types.add(change.name)
            elif isinstance(change, DeviceRegistered):
                await uow.projection.add_device(change.device_id, change.type_name, change.at)
                devices.add(change.device_id)
            else:
                await uow.projection.deactivate_device(
                    change.device_id, change.type_name, change.at
                )
                devices.add(change.device_id)
        await uow.commit()
    await directory.changed(types=types, devices=devices)


async def set_transforms(
    type_name: str,
    transforms: object,
    *,
    uow: TelemetryUnitOfWork,
    directory: DeviceDirectory,
    wait_s: float,
) -> TypeProfile:
    """Replace a device type's transforms (422 naming the field when one is invalid)."""
    TransformSpec.from_dicts(transforms)
    await directory.require_type(type_name, wait_s=wait_s)
    stored = list(transforms) if isinstance(transforms, list) else []
    async with uow:
        await uow.projection.set_transforms(type_name, stored)
        await uow.commit()
    await directory.changed(types=[type_name])
    return await directory.require_type(type_name, wait_s=0)


async def set_retention(
    type_name: str,
    days: float | None,
    rollup_days: float | None,
    *,
    uow: TelemetryUnitOfWork,
    directory: DeviceDirectory,
    wait_s: float,
) -> TypeProfile:
    """Set how long a type's raw points (and their hourly roll-ups) are kept."""
    errors = _retention_errors(days, rollup_days)
    if errors:
        raise InvalidInput("The retention is not valid.", errors=errors)
    await directory.require_type(type_name, wait_s=wait_s)
    async with uow:
        await uow.projection.set_retention(type_name, days, rollup_days)
        await uow.commit()
    await directory.changed(types=[type_name])
    return await directory.require_type(type_name, wait_s=0)


def _retention_errors(days: float | None, rollup_days: float | None) -> list[FieldError]:
    errors: list[FieldError] = []
    if days is not None and not 0 < days <= MAX_RETENTION_DAYS:
        errors.append(FieldError("days", f"must be in (0, {MAX_RETENTION_DAYS:g}]", "range"))
    if rollup_days is not None:
        if not 0 < rollup_days <= MAX_RETENTION_DAYS:
            errors.append(
                FieldError("rollup_days", f"must be in (0, {MAX_RETENTION_DAYS:g}]", "range")
            )
        elif days is not None and rollup_days < days:
            errors.append(FieldError("rollup_days", "must be at least days", "range"))
    return errors


# --------------------------------------------------------------------------- storage


@dataclass(frozen=True, slots=True)
class StoreResult:
    stored: list[str]
    """Message ids stored by this call."""
    duplicates: list[str]
    """Message ids stored before (a redelivery); skipped."""
    points: int


async def store_batches(
    messages: Sequence[IngestMessage], *, uow: TelemetryUnitOfWork, now: datetime
) -> StoreResult:
    """Store accepted batches in one transaction; a message stored before is skipped.

    The message ids go to ``telemetry_batches`` first, in the same transaction as the points,
    the latest values and one ``fleetmesh.telemetry.collected.v1`` event per device: a
    device whose batches were stored together (many one-point MQTT messages) is announced
    once, for all of them. The latest values are found before the transaction begins, and
    the points staged before the write lock is taken (on SQLite, in a temporary table of
    the transaction's connection); under it they are written with the claim, as if every
    message were new. When one was stored before (a redelivery), the transaction is rolled
    back and the others are staged and stored alone.
    """
    unique: dict[str, IngestMessage] = {}
    for message in messages:
        if message.points:
            unique.setdefault(message.id, message)
    if not unique:
        return StoreResult([], [], 0)
    plan = _StorePlan.of(list(unique.values()))
    async with uow.lock_writes_later():
        await uow.points.stage(plan.numbers_only, plan.other)
        await uow.lock_writes()
        while True:
            claimed = await uow.points.claim_and_write(
                plan.messages, plan.batches, plan.latest_rows, now
            )
            if len(claimed) == len(plan.messages):
                break
            await uow.rollback()  # some were stored before: store the others alone
            plan = _StorePlan.of([m for m in plan.messages if m.id in claimed])
            await uow.points.stage(plan.numbers_only, plan.other)
        for event in plan.events:
            uow.emit(event)
        await uow.commit()
    return StoreResult(
        stored=[m.id for m in plan.messages],
        duplicates=[key for key in unique if key not in claimed],
        points=plan.points,
    )


@dataclass(frozen=True, slots=True)
class _StorePlan:
    """What storing these messages writes besides their points, from one pass over them:
    the batch records, the latest values and one ``collected`` event per device; and
    which messages hold numbers only (SQLite stages those with less work)."""

    messages: list[IngestMessage]
    points: int
    batches: list[BatchSpan]
    latest_rows: list[LatestRow]
    events: list[CloudEvent]
    numbers_only: list[IngestMessage]
    other: list[IngestMessage]

    @classmethod
    def of(cls, messages: list[IngestMessage]) -> _StorePlan:
        latest: dict[tuple[str, str], tuple[IngestMessage, WirePoint]] = {}
        devices: dict[str, _DeviceTotals] = {}
        batches: list[BatchSpan] = []
        numbers_only: list[IngestMessage] = []
        other: list[IngestMessage] = []
        for message in messages:
            device_id = message.device_id
            totals = devices.get(device_id)
            if totals is None:
                totals = devices[device_id] = _DeviceTotals(message)
            first = last = message.points[0].ts_ms
            quality = totals.quality
            numbers = True
            for point in message.points:
                ts = point.ts_ms
                if ts < first:
                    first = ts
                elif ts > last:
                    last = ts
                quality += point.quality
                if numbers and type(point.value) not in _NUMBER_TYPES:
                    numbers = False
                key = (device_id, point.metric)
                current = latest.get(key)
                if current is None or ts >= current[1].ts_ms:
                    latest[key] = (message, point)
            totals.add(message, first, last, quality)
            batches.append(BatchSpan(message.id, device_id, len(message.points), first, last))
            (numbers_only if numbers else other).append(message)
        for device_id, metric in latest:
            devices[device_id].metrics.append(metric)
        # In key order: two PostgreSQL writers upserting the same keys lock them in one
        # order, so neither waits for a row the other waits on.
        latest_rows = [
            LatestRow(*point_row(message.device_id, message.id, point))
            for _, (message, point) in sorted(latest.items(), key=lambda item: item[0])
        ]
        events = [totals.collected() for totals in devices.values()]
        points = sum(batch.points for batch in batches)
        return cls(messages, points, batches, latest_rows, events, numbers_only, other)


_NUMBER_TYPES: Final = frozenset((int, float))
"""Exact types: a bool is an int to ``isinstance``, but not a number to store."""


class _DeviceTotals:
    """One device's batches of a transaction, as its ``collected`` event tells them;
    ``message_id`` is the first batch's."""

    def __init__(self, first: IngestMessage) -> None:
        self.device_id = first.device_id
        self.message_id = first.id
        self.count = 0
        self.first_ts = first.points[0].ts_ms
        self.last_ts = self.first_ts
        self.received_at_ms = first.received_at_ms
        self.quality = 0.0
        """The points' qualities summed in order (as ``sum`` over them would)."""
        self.metrics: list[str] = []

    def add(self, message: IngestMessage, first_ts: int, last_ts: int, quality: float) -> None:
        self.count += len(message.points)
        self.first_ts = min(self.first_ts, first_ts)
        self.last_ts = max(self.last_ts, last_ts)
        self.received_at_ms = max(self.received_at_ms, message.received_at_ms)
        self.quality = quality

    def collected(self) -> CloudEvent:
        return contracts.collected(
            device_id=self.device_id,
            message_id=self.message_id,
            count=self.count,
            first_ts_ms=self.first_ts,
            last_ts_ms=self.last_ts,
            metrics=sorted(self.metrics),
            received_at_ms=self.received_at_ms,
            quality_mean=self.quality / self.count,
        )


# --------------------------------------------------------------------------- retention


async def expire_series(
    series: Series,
    *,
    cutoff_ms: int,
    batch_rows: int,
    roll_up: bool,
    uow: TelemetryUnitOfWork,
) -> int:
    """Delete (after rolling up, if asked) at most about ``batch_rows`` expired rows."""
    async with uow:
        threshold = await uow.retention.batch_threshold(series, cutoff_ms, batch_rows)
        if threshold is None:
            return 0
        if roll_up:
            await uow.retention.roll_up(series, threshold)
        deleted = await uow.retention.delete_points(series, threshold)
        await uow.commit()
    return deleted


async def expire_rollups(series: Series, *, before_ms: int, uow: TelemetryUnitOfWork) -> int:
    async with uow:
        deleted = await uow.retention.delete_rollups(series, before_ms)
        await uow.commit()
    return deleted


async def forget_batches(before_message_id: str, *, limit: int, uow: TelemetryUnitOfWork) -> int:
    async with uow:
        deleted = await uow.retention.delete_batches(before_message_id, limit)
        await uow.commit()
    return deleted


async def series_to_expire(database: Database, device_ids: Sequence[str] | None) -> list[Series]:
    async with database.session() as session:
        return await RetentionStore(session).series_of(device_ids)


# --------------------------------------------------------------------------- reads


@dataclass(frozen=True, slots=True)
class Bucket:
    start: int
    value: Value
    count: int


class TelemetryQueries:
    """Read side: raw points, downsampled buckets, latest values."""

    def __init__(self, database: Database, directory: DeviceDirectory) -> None:
        self.database = database
        self.directory = directory

    async def metric_type(self, device_id: str, profile: TypeProfile, metric: str) -> str | None:
        """The schema type of a metric; 422 when the device never had such a metric."""
        declared = profile.metric_type(metric)
        if declared is not None:
            return declared
        async with self.database.session() as session:
            known = await TelemetryReads(session).known_metrics(device_id)
        if metric not in known:
            raise InvalidInput(
                f"Device {device_id!r} has no metric {metric!r}.",
                errors=[FieldError("metric", f"unknown metric {metric!r}", "unknown")],
            )
        return None

    async def points(self, query: PointQuery) -> list[PointRead]:
        async with self.database.session() as session:
            return await TelemetryReads(session).points(query)

    async def latest(self, device_id: str) -> list[PointRead]:
        async with self.database.session() as session:
            return await TelemetryReads(session).latest(device_id)

    async def aggregate(
        self,
        device_id: str,
        metric: str,
        *,
        agg: str,
        interval_ms: int,
        from_ms: int,
        to_ms: int,
        metric_type: str | None,
    ) -> list[Bucket]:
        """Buckets from raw points, merged with hourly roll-ups when the interval allows."""
        numeric = metric_type in ("number", "integer") or metric_type is None
        if agg in NUMERIC_ONLY and not numeric:
            raise InvalidInput(
                f"{agg} needs a numeric metric; {metric!r} is a {metric_type}.",
                errors=[FieldError("agg", f"{agg} is not defined for {metric_type}", "invalid")],
            )
        async with self.database.session() as session:
            reads = TelemetryReads(session)
            raw = await reads.buckets(device_id, metric, agg, interval_ms, from_ms, to_ms)
            rollups: list[RollupRead] = []
            if numeric and interval_ms % HOUR_MS == 0:
                rollups = await reads.rollups(device_id, metric, from_ms, to_ms)
        merged = _merge(raw, rollups, agg, interval_ms)
        return [Bucket(b.start, _typed(b.value, agg, metric_type), b.count) for b in merged]


def _typed(value: Value, agg: str, metric_type: str | None) -> Value:
    if value is None or isinstance(value, bool | str):
        return value
    if agg == "count" or (metric_type == "integer" and agg != "avg"):
        return int(value)
    return value


def _merge(
    raw: list[BucketRead], rollups: list[RollupRead], agg: str, interval_ms: int
) -> list[BucketRead]:
    """Fold hourly roll-ups into raw buckets (raw rows are always newer within a bucket)."""
    if not rollups:
        return raw
    buckets: dict[int, BucketRead] = {b.start: b for b in raw}
    folded: dict[int, RollupRead] = {}
    for rollup in rollups:
        start = rollup.bucket - rollup.bucket % interval_ms
        seen = folded.get(start)
        folded[start] = rollup if seen is None else _fold(seen, rollup)
    for start, rollup in folded.items():
        buckets[start] = _combine(buckets.get(start), rollup, agg, start)
    return [buckets[start] for start in sorted(buckets)]


def _fold(a: RollupRead, b: RollupRead) -> RollupRead:
    newer = b if b.last_ts >= a.last_ts else a
    return RollupRead(
        a.bucket,
        a.count + b.count,
        a.sum + b.sum,
        min(a.min, b.min),
        max(a.max, b.max),
        newer.last_ts,
        newer.last_value,
    )


def _combine(raw: BucketRead | None, rollup: RollupRead, agg: str, start: int) -> BucketRead:
    from_rollup: dict[str, float] = {
        "count": float(rollup.count),
        "sum": rollup.sum,
        "min": rollup.min,
        "max": rollup.max,
        "avg": rollup.sum / rollup.count if rollup.count else 0.0,
        "last": rollup.last_value,
    }
    if raw is None or raw.value is None or isinstance(raw.value, bool | str):
        return BucketRead(start, from_rollup[agg], rollup.count)
    value = float(raw.value)
    count = raw.count + rollup.count
    combined = {
        "count": float(count),
        "sum": value + rollup.sum,
        "min": min(value, rollup.min),
        "max": max(value, rollup.max),
        "avg": (value * raw.count + rollup.sum) / count if count else 0.0,
        "last": value,
    }[agg]
    return BucketRead(start, combined, count)
