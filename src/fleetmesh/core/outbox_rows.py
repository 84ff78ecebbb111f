"""Outbox rows inserted set-based: a transaction's events as one JSON array of
`[event_id, subject, payload]` that the database expands into rows, in order.

A burst of transitions emits thousands of events per transaction; one statement
for all of them takes their rows apart in C (SQLite's `json_each`, PostgreSQL's
`json_array_elements`) instead of converting each in Python, and costs one round
trip to the database instead of one per few hundred rows. On SQLite the statement goes
straight to the driver: one call to its thread instead of SQLAlchemy's three (see
`bulk.sqlite_many_rows_at_once` for why calls there are dear).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec
from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.core.bulk import sqlite_execute, sqlite_time
from fleetmesh.core.sqltypes import UtcDateTime

OutboxRow = tuple[str, str, bytes]
"""(event id, NATS subject, CloudEvent JSON)"""

_SQLITE = """
INSERT INTO outbox (event_id, subject, payload, created_at, attempts)
SELECT json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'),
    CAST(json_extract(j.value, '$[2]') AS BLOB), :created_at, 0
FROM json_each(:rows) AS j ORDER BY j.key
"""

_POSTGRES = """
INSERT INTO outbox (event_id, subject, payload, created_at, attempts)
SELECT j.e ->> 0, j.e ->> 1, convert_to(j.e ->> 2, 'UTF8'), :created_at, 0
FROM jsonb_array_elements(CAST(:rows AS jsonb)) WITH ORDINALITY AS j(e, n) ORDER BY j.n
"""

_POSTGRES_STATEMENT = text(_POSTGRES).bindparams(bindparam("created_at", type_=UtcDateTime()))

_encode = msgspec.json.Encoder().encode


async def insert_outbox_rows(
    session: AsyncSession, dialect: str, rows: Sequence[OutboxRow], created_at: datetime
) -> None:
    """Insert the events in the given order (their `seq` follows it), unpublished."""
    if not rows:
        return
    encoded = _encode(
        [[event_id, subject, payload.decode()] for event_id, subject, payload in rows]
    ).decode()
    if dialect == "sqlite":
        parameters = {"rows": encoded, "created_at": sqlite_time(created_at)}
        await sqlite_execute(await session.connection(), _SQLITE, parameters)
        return
    await session.execute(_POSTGRES_STATEMENT, {"rows": encoded, "created_at": created_at})
