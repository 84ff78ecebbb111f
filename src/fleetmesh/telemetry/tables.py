"""Tables of the telemetry context, and the helpers every adapter shares.

Storage layout (see the migration ``telemetry_0001`` for what was measured):

* ``telemetry_points``: one row per point; ``ts`` is epoch milliseconds (BIGINT) so the same
  integer arithmetic buckets on SQLite and PostgreSQL. On SQLite the table is ``WITHOUT
  ROWID`` with the primary key ``(device_id, metric, ts, message_id)``: the table *is* the
  series index (one B-tree to update per row instead of table + index, and a one-device
  time-range read is a contiguous, covering range). On PostgreSQL it is a heap filled with
  ``COPY`` plus one B-tree ``(device_id, metric, ts)``, no unique constraint (uniqueness comes
  from ``telemetry_batches``, checked once per message, not once per row).
* ``telemetry_batches``: one row per stored message; its primary key makes the writer
  idempotent (a redelivered message is skipped).
* ``telemetry_latest``: the newest point per (device, metric), upserted by the writer.
* ``telemetry_rollups``: hourly aggregates of expired raw points, kept longer.
* ``telemetry_device_types`` / ``telemetry_devices``: the projection of the device registry,
  plus what telemetry owns per type (transforms, retention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Double,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.core.sqltypes import UtcDateTime
from fleetmesh.telemetry.contracts import WirePoint
from fleetmesh.telemetry.domain import HOUR_MS

metadata = MetaData()

telemetry_device_types = Table(
    "telemetry_device_types",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("telemetry_schema", JSON, nullable=False),
    Column("expected_interval_s", Float, nullable=True),
    Column("offline_timeout_s", Float, nullable=True),
    Column("transforms", JSON, nullable=True),
    Column("retention_days", Float, nullable=True),
    Column("rollup_days", Float, nullable=True),
    Column("updated_at", UtcDateTime(), nullable=False),
)

telemetry_devices = Table(
    "telemetry_devices",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("type_name", String(63), nullable=False),
    Column("active", Boolean, nullable=False),
    Column("registered_at", UtcDateTime(), nullable=True),
    Column("deregistered_at", UtcDateTime(), nullable=True),
    Index("ix_telemetry_devices_type_name", "type_name"),
)

telemetry_points = Table(
    "telemetry_points",
    metadata,
    Column("device_id", String(64), nullable=False),
    Column("metric", String(128), nullable=False),
    Column("ts", BigInteger, nullable=False),
    Column("value_num", Double, nullable=True),
    Column("value_text", Text, nullable=True),
    Column("value_bool", Boolean, nullable=True),
    Column("quality", Float, nullable=False),
    Column("message_id", String(64), nullable=False),
)

telemetry_batches = Table(
    "telemetry_batches",
    metadata,
    Column("message_id", String(64), primary_key=True),
    Column("device_id", String(64), nullable=False),
    Column("count", Integer, nullable=False),
    Column("first_ts", BigInteger, nullable=False),
    Column("last_ts", BigInteger, nullable=False),
    Column("stored_at", UtcDateTime(), nullable=False),
)

telemetry_latest = Table(
    "telemetry_latest",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("metric", String(128), primary_key=True),
    Column("ts", BigInteger, nullable=False),
    Column("value_num", Double, nullable=True),
    Column("value_text", Text, nullable=True),
    Column("value_bool", Boolean, nullable=True),
    Column("quality", Float, nullable=False),
    Column("message_id", String(64), nullable=False),
)

telemetry_rollups = Table(
    "telemetry_rollups",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("metric", String(128), primary_key=True),
    Column("bucket", BigInteger, primary_key=True),
    Column("count", BigInteger, nullable=False),
    Column("sum", Double, nullable=False),
    Column("min", Double, nullable=False),
    Column("max", Double, nullable=False),
    Column("last_ts", BigInteger, nullable=False),
    Column("last_value", Double, nullable=False),
)

POINT_COLUMNS: Final = (
    "device_id",
    "metric",
    "ts",
    "value_num",
    "value_text",
    "value_bool",
    "quality",
    "message_id",
)
SQLITE_INSERT_POINTS: Final = (
    f"INSERT INTO telemetry_points ({', '.join(POINT_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
SQLITE_STAGING_TABLE: Final = (
    f"CREATE TEMP TABLE IF NOT EXISTS telemetry_staged ({', '.join(POINT_COLUMNS)})"
)
_ANY_VALUE_COLUMNS: Final = """
    CASE WHEN json_type(p.value, '$[2]') IN ('integer', 'real')
        THEN json_extract(p.value, '$[2]') END,
    CASE WHEN json_type(p.value, '$[2]') = 'text' THEN json_extract(p.value, '$[2]') END,
    CASE json_type(p.value, '$[2]') WHEN 'true' THEN 1 WHEN 'false' THEN 0 END"""
_NUMBER_COLUMNS: Final = "json_extract(p.value, '$[2]'), NULL, NULL"


def _stage_points(value_columns: str) -> str:
    return f"""
WITH m AS MATERIALIZED (
    SELECT json_extract(value, '$[0]') AS device_id, json_extract(value, '$[1]') AS message_id,
        json_extract(value, '$[2]') AS points
    FROM json_each(:messages)
)
INSERT INTO temp.telemetry_staged ({", ".join(POINT_COLUMNS)})
SELECT m.device_id, json_extract(p.value, '$[1]'),
    CASE WHEN typeof(json_extract(p.value, '$[3]')) = 'integer'
        THEN json_extract(p.value, '$[3]') END,
    {value_columns},
    json_extract(p.value, '$[4]'), m.message_id
FROM m, json_each(m.points) AS p
"""


SQLITE_STAGE_POINTS: Final = _stage_points(_ANY_VALUE_COLUMNS)
"""The points of many messages from one JSON parameter, ``[[device_id, message_id,
[WirePoint, ...]], ...]``, taken apart by SQLite into a temporary table of the connection.

Why: the driver binds every parameter of a many-row insert while holding the GIL that the
event loop needs (under HTTP load, the writer held it in 30 % of the samples), and
SQLite takes rows apart from JSON in one statement step, beside the event loop. A
temporary table is the connection's own, so this runs before the writer lock is taken;
under it, ``SQLITE_INSERT_STAGED_POINTS`` copies the rows about three times as fast as a
many-row insert of the same rows. ``MATERIALIZED`` (SQLite 3.35) keeps the messages' ids
from being extracted again for every point. A timestamp that is not a 64-bit integer
becomes NULL, which ``telemetry_points`` refuses."""
SQLITE_STAGE_NUMBERS: Final = _stage_points(_NUMBER_COLUMNS)
"""``SQLITE_STAGE_POINTS`` for messages whose values are all numbers (not booleans): a
third less work for SQLite, which then need not ask each value's JSON type."""
SQLITE_INSERT_STAGED_POINTS: Final = (
    f"INSERT INTO telemetry_points ({', '.join(POINT_COLUMNS)})"
    f" SELECT {', '.join(POINT_COLUMNS)} FROM temp.telemetry_staged WHERE true"
    " ON CONFLICT DO NOTHING"
)
"""Written before the claim is known: a redelivered batch's rows are there already, and only
a uniqueness conflict is skipped (``OR IGNORE`` would also drop a row that breaks NOT NULL).
(``WHERE true`` tells SQLite's parser that ``ON CONFLICT`` is the upsert clause.)"""
SQLITE_CLEAR_STAGED: Final = "DELETE FROM temp.telemetry_staged"
ROLLUP_BUCKET_MS: Final = HOUR_MS

PointRow = tuple[str, str, int, float | None, str | None, bool | None, float, str]
Value = bool | int | float | str | None


def point_row(device_id: str, message_id: str, point: WirePoint) -> PointRow:
    """The row of one point; the value goes to the column of its type."""
    value = point.value
    if value is True or value is False:
        return (device_id, point.metric, point.ts_ms, None, None, value, point.quality, message_id)
    if isinstance(value, str):
        return (device_id, point.metric, point.ts_ms, None, value, None, point.quality, message_id)
    num = float(value)
    return (device_id, point.metric, point.ts_ms, num, None, None, point.quality, message_id)


def row_value(value_num: float | None, value_text: str | None, value_bool: Any) -> Value:
    if value_bool is not None:
        return bool(value_bool)
    if value_text is not None:
        return value_text
    return value_num


def dialect_of(session: AsyncSession) -> str:
    return str(session.get_bind().dialect.name)


def insert_for(session: AsyncSession) -> Any:
    return postgresql.insert if dialect_of(session) == "postgresql" else sqlite.insert


def chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)
