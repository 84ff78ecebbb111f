"""SQL adapters of the telemetry context's write side: projection, points, retention."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, NamedTuple, cast

import msgspec
from sqlalchemy import (
    bindparam,
    case,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.core.bulk import (
    DriverStatement,
    ManyRows,
    OneStatement,
    sqlite_many_rows_at_once,
)
from fleetmesh.core.sqltypes import UtcDateTime
from fleetmesh.telemetry.contracts import IngestMessage
from fleetmesh.telemetry.tables import (
    POINT_COLUMNS,
    ROLLUP_BUCKET_MS,
    SQLITE_CLEAR_STAGED,
    SQLITE_INSERT_STAGED_POINTS,
    SQLITE_STAGE_NUMBERS,
    SQLITE_STAGE_POINTS,
    SQLITE_STAGING_TABLE,
    chunks,
    dialect_of,
    insert_for,
    point_row,
    rowcount,
    telemetry_batches,
    telemetry_device_types,
    telemetry_devices,
    telemetry_latest,
    telemetry_points,
    telemetry_rollups,
)

# --------------------------------------------------------------------------- projection


@dataclass(frozen=True, slots=True)
class TypeRow:
    name: str
    telemetry_schema: dict[str, Any]
    transforms: list[dict[str, Any]] | None
    retention_days: float | None
    rollup_days: float | None


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device_id: str
    type_name: str
    active: bool


class ProjectionRepository:
    """Device types and devices as telemetry knows them, inside one transaction."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def upsert_type(
        self,
        name: str,
        telemetry_schema: dict[str, Any],
        *,
        expected_interval_s: float | None,
        offline_timeout_s: float | None,
        now: datetime,
    ) -> None:
        """Take the registry's definition; keep what telemetry owns (transforms, retention)."""
        values = {
            "name": name,
            "telemetry_schema": telemetry_schema,
            "expected_interval_s": expected_interval_s,
            "offline_timeout_s": offline_timeout_s,
            "updated_at": now,
        }
        statement = insert_for(self.session)(telemetry_device_types).values(**values)
        statement = statement.on_conflict_do_update(
            index_elements=["name"],
            set_={k: statement.excluded[k] for k in values if k != "name"},
        )
        await self.session.execute(statement)

    async def add_device(self, device_id: str, type_name: str, registered_at: datetime) -> None:
        """Idempotent; never re-activates a device whose deregistration was seen first."""
        statement = insert_for(self.session)(telemetry_devices).values(
            device_id=device_id,
            type_name=type_name,
            active=True,
            registered_at=registered_at,
            deregistered_at=None,
        )
        await self.session.execute(statement.on_conflict_do_nothing(index_elements=["device_id"]))

    async def deactivate_device(
        self, device_id: str, type_name: str | None, deregistered_at: datetime
    ) -> None:
        statement = insert_for(self.session)(telemetry_devices).values(
            device_id=device_id,
            type_name=type_name or "",
            active=False,
            registered_at=None,
            deregistered_at=deregistered_at,
        )
        statement = statement.on_conflict_do_update(
            index_elements=["device_id"],
            set_={"active": False, "deregistered_at": deregistered_at},
        )
        await self.session.execute(statement)

    async def set_transforms(self, name: str, transforms: list[dict[str, Any]]) -> bool:
        result = await self.session.execute(
            update(telemetry_device_types)
            .where(telemetry_device_types.c.name == name)
            .values(transforms=transforms)
        )
        return rowcount(result) > 0

    async def set_retention(self, name: str, days: float | None, rollup_days: float | None) -> bool:
        result = await self.session.execute(
            update(telemetry_device_types)
            .where(telemetry_device_types.c.name == name)
            .values(retention_days=days, rollup_days=rollup_days)
        )
        return rowcount(result) > 0

    async def all_types(self) -> list[TypeRow]:
        rows = (await self.session.execute(select(telemetry_device_types))).all()
        return [_type_row(row) for row in rows]

    async def types_named(self, names: Sequence[str]) -> list[TypeRow]:
        found: list[TypeRow] = []
        t = telemetry_device_types
        for chunk in chunks(names, 500):
            rows = await self.session.execute(select(t).where(t.c.name.in_(chunk)))
            found.extend(_type_row(row) for row in rows)
        return found

    async def all_devices(self) -> list[DeviceRow]:
        d = telemetry_devices
        rows = await self.session.execute(select(d.c.device_id, d.c.type_name, d.c.active))
        return [DeviceRow(r.device_id, r.type_name, bool(r.active)) for r in rows]

    async def devices_with_ids(self, device_ids: Sequence[str]) -> list[DeviceRow]:
        found: list[DeviceRow] = []
        d = telemetry_devices
        for chunk in chunks(device_ids, 500):
            rows = await self.session.execute(
                select(d.c.device_id, d.c.type_name, d.c.active).where(d.c.device_id.in_(chunk))
            )
            found.extend(DeviceRow(r.device_id, r.type_name, bool(r.active)) for r in rows)
        return found


def _type_row(row: Any) -> TypeRow:
    return TypeRow(
        name=row.name,
        telemetry_schema=dict(row.telemetry_schema or {}),
        transforms=list(row.transforms) if row.transforms is not None else None,
        retention_days=row.retention_days,
        rollup_days=row.rollup_days,
    )


# --------------------------------------------------------------------------- the writer's side


class LatestRow(NamedTuple):
    """The newest point of a (device, metric), in ``POINT_COLUMNS`` order."""

    device_id: str
    metric: str
    ts: int
    value_num: float | None
    value_text: str | None
    value_bool: bool | None
    quality: float
    message_id: str


def _record_batches(insert: Any) -> Any:
    """A batch's id, recorded once."""
    return insert(telemetry_batches).on_conflict_do_nothing(index_elements=["message_id"])


def _latest_upsert(insert: Any) -> Any:
    """The newest point of each (device, metric); an older one never replaces it."""
    statement = insert(telemetry_latest)
    return statement.on_conflict_do_update(
        index_elements=["device_id", "metric"],
        set_={name: statement.excluded[name] for name in POINT_COLUMNS[2:]},
        where=statement.excluded.ts >= telemetry_latest.c.ts,
    )


_BATCH_COLUMNS = ("message_id", "device_id", "count", "first_ts", "last_ts", "stored_at")
_SQLITE_RECORD = DriverStatement(_record_batches(sqlite.insert), _BATCH_COLUMNS)
_SQLITE_STORED_BEFORE = (
    "SELECT json_group_array(message_id) FROM telemetry_batches"
    " WHERE message_id IN (SELECT value FROM json_each(:ids))"
)
"""One row, however many ids: the driver needs the GIL back after every row it steps
through, which a busy event loop hands over only every switch interval."""
_SQLITE_LATEST = DriverStatement(_latest_upsert(sqlite.insert), POINT_COLUMNS)
_POSTGRES_CLAIM = text(
    """
INSERT INTO telemetry_batches (message_id, device_id, count, first_ts, last_ts, stored_at)
SELECT j.e ->> 0, j.e ->> 1, CAST(j.e ->> 2 AS integer), CAST(j.e ->> 3 AS bigint),
    CAST(j.e ->> 4 AS bigint), :stored_at
FROM jsonb_array_elements(CAST(:rows AS jsonb)) AS j(e)
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id
"""
).bindparams(bindparam("stored_at", type_=UtcDateTime()))
"""The batches' ids, recorded once, from one JSON parameter (PostgreSQL takes the rows
apart): what returns was not stored before."""


class BatchSpan(NamedTuple):
    """A stored message as ``telemetry_batches`` records it (besides when)."""

    message_id: str
    device_id: str
    points: int
    first_ts: int
    last_ts: int


def _batch_rows(batches: Sequence[BatchSpan], stored_at: datetime) -> list[dict[str, Any]]:
    """The ``telemetry_batches`` rows of the messages."""
    return [
        {
            "message_id": b.message_id,
            "device_id": b.device_id,
            "count": b.points,
            "first_ts": b.first_ts,
            "last_ts": b.last_ts,
            "stored_at": stored_at,
        }
        for b in batches
    ]


_encode: Final = msgspec.json.Encoder().encode


def _points_json(messages: Sequence[IngestMessage]) -> str:
    """What ``SQLITE_STAGE_POINTS`` takes apart: ``[[device_id, message_id,
    points], ...]``, encoded in C."""
    return _encode([(m.device_id, m.id, m.points) for m in messages]).decode()


class PointStore:
    """Stores batches of points in the unit of work's transaction, as fast as the driver allows."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @property
    def dialect(self) -> str:
        return dialect_of(self.session)

    async def stage(
        self, numbers_only: Sequence[IngestMessage], other: Sequence[IngestMessage]
    ) -> None:
        """What can be done before the writer lock: on SQLite, the points go into the
        connection's temporary table (see ``tables.SQLITE_STAGE_POINTS``), which
        ``claim_and_write`` copies; ``numbers_only`` are the messages whose values are all
        numbers (``tables.SQLITE_STAGE_NUMBERS``). PostgreSQL needs no lock."""
        if self.dialect != "sqlite":
            return
        statements = [OneStatement(SQLITE_STAGING_TABLE, ())]
        for sql, messages in ((SQLITE_STAGE_NUMBERS, numbers_only), (SQLITE_STAGE_POINTS, other)):
            if messages:
                statements.append(OneStatement(sql, {"messages": _points_json(messages)}))
        connection = await self.session.connection()
        await sqlite_many_rows_at_once(connection, statements)

    async def claim_and_write(
        self,
        messages: Sequence[IngestMessage],
        batches: Sequence[BatchSpan],
        latest: Sequence[LatestRow],
        stored_at: datetime,
    ) -> set[str]:
        """Record the messages as stored and write their points and latest values; returns
        the ids that were not stored before.

        Unless every message is returned, the writes are not to be kept: the caller rolls
        back and stores the returned ones alone. On PostgreSQL the claim runs first (a
        concurrent writer holding the same id makes it wait until the other commits, then
        skip it) and nothing is written after a partial one. On SQLite, whose writers take
        turns, the claim, the copy of the points ``stage`` put aside and the latest values
        go to the driver's thread together (see ``core.bulk.sqlite_many_rows_at_once``).
        """
        if not messages:
            return set()
        if self.dialect != "sqlite":
            claimed = await self._claim(batches, stored_at)
            if len(claimed) == len(messages):
                await self._copy_points(messages)
                await self._upsert_latest(latest)
            return claimed
        connection = await self.session.connection()
        record_sql, record_row = _SQLITE_RECORD.for_dialect(connection.dialect)
        latest_sql, latest_row = _SQLITE_LATEST.for_dialect(connection.dialect)
        ids = [m.id for m in messages]
        stored_before, *_ = await sqlite_many_rows_at_once(
            connection,
            [
                OneStatement(_SQLITE_STORED_BEFORE, {"ids": _encode(ids).decode()}, True),
                ManyRows(record_sql, [record_row(r) for r in _batch_rows(batches, stored_at)]),
                OneStatement(SQLITE_INSERT_STAGED_POINTS, ()),
                OneStatement(SQLITE_CLEAR_STAGED, ()),
                ManyRows(latest_sql, [latest_row(r._asdict()) for r in latest]),
            ],
        )
        [(found,)] = cast(list[tuple[str]], stored_before)
        return set(ids).difference(msgspec.json.decode(found))

    async def _claim(self, batches: Sequence[BatchSpan], stored_at: datetime) -> set[str]:
        rows = [list(batch) for batch in batches]
        parameters = {"rows": _encode(rows).decode(), "stored_at": stored_at}
        result = await self.session.execute(_POSTGRES_CLAIM, parameters)
        return set(result.scalars())

    async def _copy_points(self, messages: Sequence[IngestMessage]) -> None:
        """PostgreSQL binary ``COPY``."""
        rows = [point_row(m.device_id, m.id, point) for m in messages for point in m.points]
        if not rows:
            return
        connection = await self.session.connection()
        raw = (await connection.get_raw_connection()).driver_connection
        if raw is None:
            raise RuntimeError("no driver connection")
        await raw.copy_records_to_table(
            "telemetry_points", records=rows, columns=list(POINT_COLUMNS)
        )

    async def _upsert_latest(self, rows: Sequence[LatestRow]) -> None:
        """The newest point of each (device, metric); an older one never replaces it."""
        if not rows:
            return
        statement = _latest_upsert(postgresql.insert)  # one statement for all the rows
        await self.session.execute(statement, [row._asdict() for row in rows])

    async def stored(self, message_id: str) -> bool:
        found = await self.session.scalar(
            select(telemetry_batches.c.message_id).where(
                telemetry_batches.c.message_id == message_id
            )
        )
        return found is not None


# --------------------------------------------------------------------------- retention


@dataclass(frozen=True, slots=True)
class Series:
    device_id: str
    metric: str


class RetentionStore:
    """Bounded deletes of expired rows, with optional hourly roll-ups, in one transaction."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def series_of(self, device_ids: Sequence[str] | None) -> list[Series]:
        """Every (device, metric) that has data; ``None`` means every device."""
        statement = select(telemetry_latest.c.device_id, telemetry_latest.c.metric)
        if device_ids is not None:
            statement = statement.where(telemetry_latest.c.device_id.in_(device_ids))
        rows = await self.session.execute(statement.order_by("device_id", "metric"))
        return [Series(r.device_id, r.metric) for r in rows]

    async def batch_threshold(self, series: Series, cutoff_ms: int, batch_rows: int) -> int | None:
        """The newest ts of the oldest ``batch_rows`` expired rows, or None if there are none.

        Deleting ``ts <= threshold`` removes at least ``batch_rows`` rows (a few more when
        timestamps tie), an index range on every store, with neither rowid nor ctid.
        """
        p = telemetry_points
        base = (
            select(p.c.ts)
            .where(p.c.device_id == series.device_id, p.c.metric == series.metric)
            .where(p.c.ts < cutoff_ms)
            .order_by(p.c.ts)
        )
        threshold = await self.session.scalar(base.offset(batch_rows - 1).limit(1))
        if threshold is not None:
            return int(threshold)
        newest = await self.session.scalar(
            select(func.max(p.c.ts)).where(
                p.c.device_id == series.device_id,
                p.c.metric == series.metric,
                p.c.ts < cutoff_ms,
            )
        )
        return int(newest) if newest is not None else None

    async def roll_up(self, series: Series, up_to_ms: int) -> None:
        """Fold the numeric rows with ``ts <= up_to_ms`` into hourly roll-ups (merging)."""
        p = telemetry_points
        sql = text(
            "SELECT (ts / :iv) * :iv AS bucket, COUNT(*) AS n, SUM(value_num) AS s,"
            " MIN(value_num) AS lo, MAX(value_num) AS hi, MAX(ts) AS last_ts"
            " FROM telemetry_points WHERE device_id = :d AND metric = :m AND ts <= :t"
            " AND value_num IS NOT NULL GROUP BY (ts / :iv) * :iv"
        )
        params = {"iv": ROLLUP_BUCKET_MS, "d": series.device_id, "m": series.metric, "t": up_to_ms}
        groups = (await self.session.execute(sql, params)).all()
        if not groups:
            return
        values: list[dict[str, Any]] = []
        for g in groups:
            last_value = await self.session.scalar(
                select(p.c.value_num)
                .where(p.c.device_id == series.device_id, p.c.metric == series.metric)
                .where(p.c.ts == g.last_ts, p.c.value_num.is_not(None))
                .limit(1)
            )
            values.append(
                {
                    "device_id": series.device_id,
                    "metric": series.metric,
                    "bucket": int(g.bucket),
                    "count": int(g.n),
                    "sum": float(g.s),
                    "min": float(g.lo),
                    "max": float(g.hi),
                    "last_ts": int(g.last_ts),
                    "last_value": float(last_value if last_value is not None else 0.0),
                }
            )
        r = telemetry_rollups
        statement = insert_for(self.session)(r)
        excluded = statement.excluded
        statement = statement.on_conflict_do_update(
            index_elements=["device_id", "metric", "bucket"],
            set_={
                "count": r.c.count + excluded["count"],
                "sum": r.c.sum + excluded["sum"],
                "min": _least(r.c.min, excluded["min"]),
                "max": _greatest(r.c.max, excluded["max"]),
                "last_ts": _greatest(r.c.last_ts, excluded["last_ts"]),
                "last_value": _newer(
                    r.c.last_ts, excluded["last_ts"], r.c.last_value, excluded["last_value"]
                ),
            },
        )
        await self.session.execute(statement, values)

    async def delete_points(self, series: Series, up_to_ms: int) -> int:
        p = telemetry_points
        result = await self.session.execute(
            delete(p)
            .where(p.c.device_id == series.device_id, p.c.metric == series.metric)
            .where(p.c.ts <= up_to_ms)
        )
        return rowcount(result)

    async def delete_rollups(self, series: Series, before_ms: int) -> int:
        r = telemetry_rollups
        result = await self.session.execute(
            delete(r)
            .where(r.c.device_id == series.device_id, r.c.metric == series.metric)
            .where(r.c.bucket < before_ms)
        )
        return rowcount(result)

    async def delete_batches(self, before_message_id: str, limit: int) -> int:
        """Forget processed message ids older than the redelivery horizon (ULIDs sort by time)."""
        b = telemetry_batches
        oldest = (
            select(b.c.message_id)
            .where(b.c.message_id < before_message_id)
            .order_by(b.c.message_id)
            .limit(limit)
        )
        ids = list((await self.session.execute(oldest)).scalars())
        if not ids:
            return 0
        result = await self.session.execute(delete(b).where(b.c.message_id.in_(ids)))
        return rowcount(result)


def _least(a: Any, b: Any) -> Any:
    return case((b < a, b), else_=a)


def _greatest(a: Any, b: Any) -> Any:
    return case((b > a, b), else_=a)


def _newer(ts_a: Any, ts_b: Any, value_a: Any, value_b: Any) -> Any:
    return case((ts_b >= ts_a, value_b), else_=value_a)
