"""Raw storage ceilings of the ingest bench: the telemetry points table, no fleetmesh code.

The rows are the ones the HTTP load makes the writer store (`ingest_load.limit_rows`),
written into a table of exactly the platform's layout:

- SQLite: a fresh WAL file (the platform's pragmas) migrated by the telemetry context's
  own migrations, so `telemetry_points` is the same `WITHOUT ROWID` table with the primary
  key `(device_id, metric, ts, message_id)`; stdlib sqlite3 `executemany`.
- PostgreSQL: a table `LIKE telemetry_points INCLUDING ALL` (the heap and its series
  index) in the bench's database, filled with asyncpg `COPY`, dropped afterwards.

Both commit every `ROWS_PER_COMMIT` rows: ten of the load's batches per transaction,
about what the writer groups under load. Only the writes are timed.

Without `--database-url`, the bench runs PostgreSQL on a database of its own on the
machine's server (`DEFAULT_POSTGRES`), dropped at the end, or skips it if the server
cannot be reached.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

from fleetmesh.bench.limits import plain_postgres_url
from fleetmesh.core.database import Database
from fleetmesh.core.settings import to_async_url
from fleetmesh.telemetry.tables import POINT_COLUMNS, SQLITE_INSERT_POINTS, PointRow

ROWS_PER_COMMIT = 10_000
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432"
TELEMETRY_BRANCH = "telemetry"
"""The Alembic branch of the telemetry context's tables."""

Progressed = Callable[[int], None]


def commits(rows: Sequence[PointRow], size: int = ROWS_PER_COMMIT) -> list[Sequence[PointRow]]:
    """The rows cut into transactions of at most `size`."""
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def rate(count: int, elapsed_s: float) -> float:
    return count / max(elapsed_s, 1e-9)


async def sqlite_rows_per_s(
    rows: Sequence[PointRow], *, directory: Path | None = None, on_progress: Progressed
) -> float:
    """Rows/s that sqlite3 `executemany` writes into a fresh `telemetry_points`."""
    with tempfile.TemporaryDirectory(prefix="fleetmesh-limit-", dir=directory) as tmp:
        path = Path(tmp) / "limit.db"
        database = Database(f"sqlite+aiosqlite:///{path}")
        try:
            await database.migrate([TELEMETRY_BRANCH])
        finally:
            await database.dispose()
        return await asyncio.to_thread(_sqlite_executemany, path, rows, on_progress)


def _sqlite_executemany(path: Path, rows: Sequence[PointRow], on_progress: Progressed) -> float:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        started = time.perf_counter()
        for chunk in commits(rows):
            connection.execute("BEGIN")
            connection.executemany(SQLITE_INSERT_POINTS, chunk)
            connection.execute("COMMIT")
            on_progress(len(chunk))
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
    return rate(len(rows), elapsed)


async def postgres_rows_per_s(
    database_url: str, rows: Sequence[PointRow], *, on_progress: Progressed
) -> float:
    """Rows/s that asyncpg `COPY` writes into a copy of `telemetry_points` (then dropped)."""
    database = Database(to_async_url(database_url))
    try:
        await database.migrate([TELEMETRY_BRANCH])
    finally:
        await database.dispose()
    table = f"fleetmesh_bench_points_{secrets.token_hex(4)}"
    connection = await asyncpg.connect(plain_postgres_url(database_url), timeout=10)
    try:
        await connection.execute(f"CREATE TABLE {table} (LIKE telemetry_points INCLUDING ALL)")
        try:
            started = time.perf_counter()
            for chunk in commits(rows):
                await connection.copy_records_to_table(
                    table, records=chunk, columns=list(POINT_COLUMNS)
                )
                on_progress(len(chunk))
            elapsed = time.perf_counter() - started
        finally:
            await connection.execute(f"DROP TABLE {table}")
    finally:
        await connection.close()
    return rate(len(rows), elapsed)


@dataclass(frozen=True, slots=True)
class PostgresTarget:
    """The PostgreSQL database the bench uses, or why it has none."""

    url: str | None
    skipped_reason: str | None = None


@asynccontextmanager
async def postgres_target(database_url: str | None) -> AsyncIterator[PostgresTarget]:
    """The given database; else a new one on `DEFAULT_POSTGRES`, dropped on exit."""
    if database_url:
        yield PostgresTarget(database_url)
        return
    name = f"fleetmesh_bench_{secrets.token_hex(5)}"
    try:
        await _admin(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        yield PostgresTarget(None, f"PostgreSQL unreachable at {DEFAULT_POSTGRES}: {error}")
        return
    try:
        yield PostgresTarget(f"{DEFAULT_POSTGRES}/{name}")
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(f"{DEFAULT_POSTGRES}/postgres", timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()
