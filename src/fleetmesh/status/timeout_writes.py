"""Inactivity timeouts written set-based: a window's transitions as one JSON array that
the database expands into the status rows' update and the history rows' insert.

When a whole fleet falls silent, thousands of timeouts a second come due. Built one
by one (a dict per row, its times converted, then a parameter tuple), the rows cost
more Python than the rest of the transition; as one JSON document they are encoded
in C, and SQLite or PostgreSQL takes them apart in C too, off the event loop. The
transitions themselves are still decided by the domain (`domain.timed_out`); the SQL
only maps their fields onto columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.core.bulk import sqlite_time
from fleetmesh.status.domain import StatusChanged

# Places in each row of the JSON array.
_DEVICE, _SEQUENCE, _AT, _NEXT_CHECK, _VERSION, _DETAIL, _PREVIOUS, _CURRENT, _CAUSE = range(9)

_encode = msgspec.json.Encoder().encode


def _sqlite(place: int) -> str:
    return f"json_extract(j.value, '$[{place}]')"


def _pg_text(place: int) -> str:
    return f"(j.e ->> {place})"


def _pg_time(place: int) -> str:
    return f"(CAST(j.e ->> {place} AS timestamp) AT TIME ZONE 'UTC')"


def _pg_int(place: int) -> str:
    return f"CAST(j.e ->> {place} AS integer)"


_SQLITE_UPDATE = f"""
UPDATE status_devices SET
    status = {_sqlite(_CURRENT)}, cause = {_sqlite(_CAUSE)},
    since = {_sqlite(_AT)}, last_update = {_sqlite(_AT)},
    sequence = {_sqlite(_SEQUENCE)}, version = status_devices.version + 1,
    check_attempt = 0, next_check_at = {_sqlite(_NEXT_CHECK)}
FROM json_each(:rows) AS j
WHERE status_devices.device_id = {_sqlite(_DEVICE)}
    AND status_devices.version = {_sqlite(_VERSION)}
"""

_SQLITE_HISTORY = f"""
INSERT INTO status_history (device_id, sequence, at, previous, current, cause, detail)
SELECT {_sqlite(_DEVICE)}, {_sqlite(_SEQUENCE)}, {_sqlite(_AT)}, {_sqlite(_PREVIOUS)},
    {_sqlite(_CURRENT)}, {_sqlite(_CAUSE)}, {_sqlite(_DETAIL)}
FROM json_each(:rows) AS j
"""

_PG_ROWS = "json_array_elements(CAST(:rows AS json)) AS j(e)"

_PG_UPDATE = f"""
UPDATE status_devices AS d SET
    status = {_pg_text(_CURRENT)}, cause = {_pg_text(_CAUSE)},
    since = {_pg_time(_AT)}, last_update = {_pg_time(_AT)},
    sequence = {_pg_int(_SEQUENCE)}, version = d.version + 1,
    check_attempt = 0, next_check_at = {_pg_time(_NEXT_CHECK)}
FROM {_PG_ROWS}
WHERE d.device_id = {_pg_text(_DEVICE)} AND d.version = {_pg_int(_VERSION)}
"""

_PG_HISTORY = f"""
INSERT INTO status_history (device_id, sequence, at, previous, current, cause, detail)
SELECT {_pg_text(_DEVICE)}, {_pg_int(_SEQUENCE)}, {_pg_time(_AT)}, {_pg_text(_PREVIOUS)},
    {_pg_text(_CURRENT)}, {_pg_text(_CAUSE)}, {_pg_text(_DETAIL)}
FROM {_PG_ROWS}
"""

_STATEMENTS = {
    "sqlite": (text(_SQLITE_UPDATE), text(_SQLITE_HISTORY)),
    "postgresql": (text(_PG_UPDATE), text(_PG_HISTORY)),
}


def encoded_rows(devices: Sequence[tuple[StatusChanged, int, datetime]]) -> str:
    """The JSON array of (transition, version it was decided on, first health check);
    times in UTC as `YYYY-MM-DD HH:MM:SS.ffffff`, what SQLite stores and PostgreSQL reads."""
    return _encode(
        [
            [
                change.device_id,
                change.sequence,
                sqlite_time(change.at),
                sqlite_time(next_check),
                version,
                change.detail,
                change.previous.value,
                change.current.value,
                change.cause.value,
            ]
            for change, version, next_check in devices
        ]
    ).decode()


async def update_status_rows(session: AsyncSession, dialect: str, rows: str) -> int:
    """Take the devices of `encoded_rows` offline where their row is still at the version
    given; returns how many rows were updated."""
    updated = await session.execute(_STATEMENTS[dialect][0], {"rows": rows})
    return int(getattr(updated, "rowcount", -1))


async def insert_history(session: AsyncSession, dialect: str, rows: str) -> None:
    """The history rows of the transitions of `encoded_rows`."""
    await session.execute(_STATEMENTS[dialect][1], {"rows": rows})
