"""Read-side queries of the telemetry context: raw points, buckets, roll-ups, latest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    and_,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.telemetry.tables import (
    ROLLUP_BUCKET_MS,
    Value,
    row_value,
    telemetry_latest,
    telemetry_points,
    telemetry_rollups,
)

# --------------------------------------------------------------------------- reads


@dataclass(frozen=True, slots=True)
class PointRead:
    ts: int
    metric: str
    value: Value
    quality: float
    message_id: str


@dataclass(frozen=True, slots=True)
class PointQuery:
    device_id: str
    metric: str | None
    from_ms: int | None
    to_ms: int | None
    limit: int
    after: tuple[int, str, str] | None = None
    """Keyset position: (ts, metric, message_id) of the last row of the previous page."""


@dataclass(frozen=True, slots=True)
class BucketRead:
    start: int
    value: Value
    count: int


@dataclass(frozen=True, slots=True)
class RollupRead:
    bucket: int
    count: int
    sum: float
    min: float
    max: float
    last_ts: int
    last_value: float


class TelemetryReads:
    """Read-only queries over one session."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def points(self, query: PointQuery) -> list[PointRead]:
        p = telemetry_points
        statement = select(
            p.c.ts,
            p.c.metric,
            p.c.value_num,
            p.c.value_text,
            p.c.value_bool,
            p.c.quality,
            p.c.message_id,
        ).where(p.c.device_id == query.device_id)
        if query.metric is not None:
            statement = statement.where(p.c.metric == query.metric)
        if query.from_ms is not None:
            statement = statement.where(p.c.ts >= query.from_ms)
        if query.to_ms is not None:
            statement = statement.where(p.c.ts < query.to_ms)
        if query.after is not None:
            ts, metric, message_id = query.after
            statement = statement.where(p.c.ts >= ts)  # index-friendly bound, then the tie-break
            if query.metric is not None:
                statement = statement.where(
                    or_(p.c.ts > ts, and_(p.c.ts == ts, p.c.message_id > message_id))
                )
            else:
                statement = statement.where(
                    or_(
                        p.c.ts > ts,
                        and_(
                            p.c.ts == ts,
                            tuple_(p.c.metric, p.c.message_id) > tuple_(metric, message_id),
                        ),
                    )
                )
        if query.metric is not None:
            statement = statement.order_by(p.c.ts, p.c.message_id)
        else:
            statement = statement.order_by(p.c.ts, p.c.metric, p.c.message_id)
        rows = await self.session.execute(statement.limit(query.limit))
        return [
            PointRead(
                r.ts,
                r.metric,
                row_value(r.value_num, r.value_text, r.value_bool),
                r.quality,
                r.message_id,
            )
            for r in rows
        ]

    async def buckets(
        self, device_id: str, metric: str, agg: str, interval_ms: int, from_ms: int, to_ms: int
    ) -> list[BucketRead]:
        """Downsampled buckets; the bucket is ``(ts / interval) * interval`` (integer division)."""
        params = {"d": device_id, "m": metric, "lo": from_ms, "hi": to_ms, "iv": interval_ms}
        where = "device_id = :d AND metric = :m AND ts >= :lo AND ts < :hi"
        if agg == "last":
            sql = (
                "SELECT bucket, value_num, value_text, value_bool, n FROM ("
                " SELECT (ts / :iv) * :iv AS bucket, value_num, value_text, value_bool,"
                " ROW_NUMBER() OVER"
                " (PARTITION BY ts / :iv ORDER BY ts DESC, message_id DESC) AS rn,"
                " COUNT(*) OVER (PARTITION BY ts / :iv) AS n"
                f" FROM telemetry_points WHERE {where}) ranked"
                " WHERE rn = 1 ORDER BY bucket"
            )
            rows = await self.session.execute(text(sql), params)
            return [
                BucketRead(
                    int(r.bucket), row_value(r.value_num, r.value_text, r.value_bool), int(r.n)
                )
                for r in rows
            ]
        function = {"avg": "AVG", "min": "MIN", "max": "MAX", "sum": "SUM", "count": "COUNT"}[agg]
        argument = "*" if agg == "count" else "value_num"
        sql = (
            f"SELECT (ts / :iv) * :iv AS bucket, {function}({argument}) AS value, COUNT(*) AS n"
            f" FROM telemetry_points WHERE {where} GROUP BY (ts / :iv) * :iv ORDER BY bucket"
        )
        rows = await self.session.execute(text(sql), params)
        return [
            BucketRead(int(r.bucket), _number(r.value, integral=agg == "count"), int(r.n))
            for r in rows
        ]

    async def rollups(
        self, device_id: str, metric: str, from_ms: int, to_ms: int
    ) -> list[RollupRead]:
        r = telemetry_rollups
        rows = await self.session.execute(
            select(r)
            .where(r.c.device_id == device_id, r.c.metric == metric)
            .where(r.c.bucket >= from_ms - from_ms % ROLLUP_BUCKET_MS, r.c.bucket < to_ms)
            .order_by(r.c.bucket)
        )
        return [
            RollupRead(
                int(x["bucket"]),
                int(x["count"]),
                float(x["sum"]),
                float(x["min"]),
                float(x["max"]),
                int(x["last_ts"]),
                float(x["last_value"]),
            )
            for x in rows.mappings()
        ]

    async def latest(self, device_id: str) -> list[PointRead]:
        t = telemetry_latest
        rows = await self.session.execute(
            select(t).where(t.c.device_id == device_id).order_by(t.c.metric)
        )
        return [
            PointRead(
                r.ts,
                r.metric,
                row_value(r.value_num, r.value_text, r.value_bool),
                r.quality,
                r.message_id,
            )
            for r in rows
        ]

    async def known_metrics(self, device_id: str) -> set[str]:
        rows = await self.session.execute(
            select(telemetry_latest.c.metric).where(telemetry_latest.c.device_id == device_id)
        )
        return set(rows.scalars())


def _number(value: Any, *, integral: bool) -> Value:
    if value is None:
        return None
    return int(value) if integral else float(value)
