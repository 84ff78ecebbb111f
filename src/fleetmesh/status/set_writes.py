"""Status rows written set-based: a window's rows as one JSON array that the database
expands into its update (and, for timeouts, the history rows' insert).

When a whole fleet falls silent, thousands of timeouts a second come due; while it
reports, thousands of telemetry reports a second only move `last_seen`. Built one by
one (a dict per row, its times converted, then a parameter tuple), the rows cost more
Python than the rest of the window; as one JSON document they are encoded in C, and
SQLite or PostgreSQL takes them apart in C too, off the event loop. What is written is
still decided by the domain (`domain.timed_out`, `domain.seen_again`); the SQL only
maps their fields onto columns (on PostgreSQL as `jsonb`, parsed once rather at every
field). What transitions share (the states, the cause, the detail) is bound once per
statement, so the database reads five fields a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.core.bulk import sqlite_time
from fleetmesh.status.domain import StatusChanged

# Places in each row of the JSON arrays: timeouts, then telemetry seen.
_DEVICE, _SEQUENCE, _AT, _NEXT_CHECK, _VERSION = range(5)
_SEEN_DEVICE, _SEEN_AT, _SEEN_VERSION, _SEEN_QUALITY = range(4)

_encode = msgspec.json.Encoder().encode


class Shared(NamedTuple):
    """What a group of transitions has in common."""

    previous: str
    current: str
    cause: str
    detail: str


TimedOutRows = list[tuple[Shared, str]]
"""Groups of transitions: what they share, and their rows as a JSON array."""


def _sqlite(place: int) -> str:
    return f"json_extract(j.value, '$[{place}]')"


def _pg_text(place: int) -> str:
    return f"(j.e ->> {place})"


def _pg_time(place: int) -> str:
    return f"(CAST(j.e ->> {place} AS timestamp) AT TIME ZONE 'UTC')"


def _pg_int(place: int) -> str:
    return f"CAST(j.e ->> {place} AS integer)"


def _pg_float(place: int) -> str:
    return f"CAST(j.e ->> {place} AS double precision)"


_SQLITE_UPDATE = f"""
UPDATE status_devices SET
    status = :current, cause = :cause,
    since = {_sqlite(_AT)}, last_update = {_sqlite(_AT)},
    sequence = {_sqlite(_SEQUENCE)}, version = status_devices.version + 1,
    check_attempt = 0, next_check_at = {_sqlite(_NEXT_CHECK)}
FROM json_each(:rows) AS j
WHERE status_devices.device_id = {_sqlite(_DEVICE)}
    AND status_devices.version = {_sqlite(_VERSION)}
"""

_SQLITE_HISTORY = f"""
INSERT INTO status_history (device_id, sequence, at, previous, current, cause, detail)
SELECT {_sqlite(_DEVICE)}, {_sqlite(_SEQUENCE)}, {_sqlite(_AT)},
    :previous, :current, :cause, :detail
FROM json_each(:rows) AS j
"""

_PG_ROWS = "jsonb_array_elements(CAST(:rows AS jsonb)) AS j(e)"

_PG_UPDATE = f"""
UPDATE status_devices AS d SET
    status = :current, cause = :cause,
    since = {_pg_time(_AT)}, last_update = {_pg_time(_AT)},
    sequence = {_pg_int(_SEQUENCE)}, version = d.version + 1,
    check_attempt = 0, next_check_at = {_pg_time(_NEXT_CHECK)}
FROM {_PG_ROWS}
WHERE d.device_id = {_pg_text(_DEVICE)} AND d.version = {_pg_int(_VERSION)}
"""

_PG_HISTORY = f"""
INSERT INTO status_history (device_id, sequence, at, previous, current, cause, detail)
SELECT {_pg_text(_DEVICE)}, {_pg_int(_SEQUENCE)}, {_pg_time(_AT)},
    :previous, :current, :cause, :detail
FROM {_PG_ROWS}
"""

_SEEN_QUALITY_SET = "quality_recent = {quality},"

_SQLITE_SEEN = f"""
UPDATE status_devices SET
    last_seen = {_sqlite(_SEEN_AT)},
    last_update = max(status_devices.last_update, {_sqlite(_SEEN_AT)}),
    {{quality}}
    version = status_devices.version + 1
FROM json_each(:rows) AS j
WHERE status_devices.device_id = {_sqlite(_SEEN_DEVICE)}
    AND status_devices.version = {_sqlite(_SEEN_VERSION)}
"""

_PG_SEEN = f"""
UPDATE status_devices AS d SET
    last_seen = {_pg_time(_SEEN_AT)},
    last_update = GREATEST(d.last_update, {_pg_time(_SEEN_AT)}),
    {{quality}}
    version = d.version + 1
FROM {_PG_ROWS}
WHERE d.device_id = {_pg_text(_SEEN_DEVICE)} AND d.version = {_pg_int(_SEEN_VERSION)}
"""

_SEEN_STATEMENTS = {
    # (rows whose recent quality stays, rows whose recent quality moves)
    "sqlite": (
        _SQLITE_SEEN.format(quality=""),
        _SQLITE_SEEN.format(quality=_SEEN_QUALITY_SET.format(quality=_sqlite(_SEEN_QUALITY))),
    ),
    "postgresql": (
        _PG_SEEN.format(quality=""),
        _PG_SEEN.format(quality=_SEEN_QUALITY_SET.format(quality=_pg_float(_SEEN_QUALITY))),
    ),
}

_STATEMENTS = {
    "sqlite": (text(_SQLITE_UPDATE), text(_SQLITE_HISTORY)),
    "postgresql": (text(_PG_UPDATE), text(_PG_HISTORY)),
}


def encoded_rows(devices: Sequence[tuple[StatusChanged, int, datetime]]) -> TimedOutRows:
    """(transition, version it was decided on, first health check), grouped by what the
    transitions share; times in UTC as `YYYY-MM-DD HH:MM:SS.ffffff`, what SQLite stores
    and PostgreSQL reads."""
    groups: dict[Shared, list[list[object]]] = {}
    for change, version, next_check in devices:
        shared = Shared(
            change.previous.value, change.current.value, change.cause.value, change.detail
        )
        row = [
            change.device_id,
            change.sequence,
            sqlite_time(change.at),
            sqlite_time(next_check),
            version,
        ]
        group = groups.get(shared)
        if group is None:
            groups[shared] = [row]
        else:
            group.append(row)
    return [(shared, _encode(rows).decode()) for shared, rows in groups.items()]


async def update_status_rows(session: AsyncSession, dialect: str, groups: TimedOutRows) -> int:
    """Take the devices of `encoded_rows` offline where their row is still at the version
    given; returns how many rows were updated (-1 when the driver does not tell)."""
    counts = []
    for shared, rows in groups:
        parameters = {"rows": rows, "current": shared.current, "cause": shared.cause}
        result = await session.execute(_STATEMENTS[dialect][0], parameters)
        counts.append(int(getattr(result, "rowcount", -1)))
    return -1 if any(count < 0 for count in counts) else sum(counts)


async def insert_history(session: AsyncSession, dialect: str, groups: TimedOutRows) -> None:
    """The history rows of the transitions of `encoded_rows`."""
    for shared, rows in groups:
        await session.execute(_STATEMENTS[dialect][1], {"rows": rows, **shared._asdict()})


class SeenRow(NamedTuple):
    """Telemetry of an online device that only moves its `last_seen` (`domain.seen_again`),
    written if its row is still at `version`; `quality_recent` is the row's new recent
    quality when it moves, else None."""

    device_id: str
    seen_at: datetime
    version: int
    quality_recent: float | None


def seen_statements(dialect: str, rows: Sequence[SeenRow]) -> list[tuple[str, dict[str, str]]]:
    """The updates of these rows: (SQL, parameters), one for the rows whose recent quality
    stays (the quality index is left alone) and one for the others; none when empty."""
    groups: tuple[list[list[object]], list[list[object]]] = ([], [])
    for row in rows:
        encoded: list[object] = [
            row.device_id,
            sqlite_time(row.seen_at),
            row.version,
            row.quality_recent,
        ]
        groups[row.quality_recent is not None].append(encoded)
    return [
        (sql, {"rows": _encode(group).decode()})
        for sql, group in zip(_SEEN_STATEMENTS[dialect], groups, strict=True)
        if group
    ]
