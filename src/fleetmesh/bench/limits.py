"""Physical limits: the raw layers under fleetmesh, measured on this machine in this run.

A benchmark divides its figure by one of these, so a result reads as "how much
of what the hardware and the libraries allow" rather than a bare number that
means nothing on another machine. Each probe does the bare minimum:

- SQLite: `executemany` of prepared rows into a table of a fresh WAL database
  file (the platform's pragmas), committed every `batch` rows; "plain" has no
  index, "indexed" a unique index on the text key and one on the timestamp.
- PostgreSQL: `COPY` (asyncpg `copy_records_to_table`) into a temporary table.
- argon2: device-secret hashes with the devices context's own hasher
  parameters, on as many threads as the context hashes with.

The probes are synchronous (run them with `asyncio.to_thread`) except the
PostgreSQL one; row generation is outside the timed part.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

from fleetmesh.devices.credentials import CredentialHasher, new_secret

DEVICE_HASHER_THREADS = 2
"""Threads the devices context hashes secrets on (`CredentialHasher(workers=2)`)."""

SQLITE_BATCH = 1000
POSTGRES_BATCH = 10_000
PAYLOAD = "x" * 64

Row = tuple[str, float, float, str]
Progressed = Callable[[int], None]

_COLUMNS = ("key", "ts", "value", "payload")


def sample_rows(count: int) -> list[Row]:
    """Rows shaped like small records: an ordered text key, a timestamp, a value, a payload."""
    now = time.time()
    return [(f"key-{i:012d}", now + i * 0.001, float(i % 1000), PAYLOAD) for i in range(count)]


def sqlite_executemany_rows_per_s(
    rows: int,
    *,
    indexed: bool = False,
    batch: int = SQLITE_BATCH,
    directory: Path | None = None,
    on_progress: Progressed | None = None,
) -> float:
    """Rows/s that raw sqlite3 `executemany` writes into a WAL database file."""
    data = sample_rows(rows)
    with tempfile.TemporaryDirectory(prefix="fleetmesh-limit-", dir=directory) as tmp:
        connection = sqlite3.connect(Path(tmp) / "limit.db", isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(
                "CREATE TABLE rows (key TEXT NOT NULL, ts REAL NOT NULL,"
                " value REAL NOT NULL, payload TEXT NOT NULL)"
            )
            if indexed:
                connection.execute("CREATE UNIQUE INDEX rows_key ON rows (key)")
                connection.execute("CREATE INDEX rows_ts ON rows (ts)")
            insert = "INSERT INTO rows (key, ts, value, payload) VALUES (?, ?, ?, ?)"
            started = time.perf_counter()
            for chunk in _chunks(data, batch):
                connection.execute("BEGIN")
                connection.executemany(insert, chunk)
                connection.execute("COMMIT")
                if on_progress is not None:
                    on_progress(len(chunk))
            elapsed = time.perf_counter() - started
        finally:
            connection.close()
    return _rate(rows, elapsed)


def plain_postgres_url(database_url: str) -> str:
    """`postgresql+asyncpg://...` (or `postgres://`) as the plain URL asyncpg accepts."""
    scheme, separator, rest = database_url.partition("://")
    if not separator:
        return database_url
    return f"postgresql://{rest}" if scheme.startswith("postgres") else database_url


async def postgres_version(database_url: str) -> str:
    connection = await asyncpg.connect(plain_postgres_url(database_url), timeout=10)
    try:
        return str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()


async def postgres_copy_rows_per_s(
    database_url: str,
    rows: int,
    *,
    batch: int = POSTGRES_BATCH,
    on_progress: Progressed | None = None,
) -> float:
    """Rows/s that asyncpg `COPY` writes into a temporary table of this database."""
    data = sample_rows(rows)
    connection = await asyncpg.connect(plain_postgres_url(database_url), timeout=10)
    try:
        await connection.execute(
            "CREATE TEMP TABLE fleetmesh_bench_limit (key text NOT NULL,"
            " ts double precision NOT NULL, value double precision NOT NULL,"
            " payload text NOT NULL)"
        )
        started = time.perf_counter()
        for chunk in _chunks(data, batch):
            await connection.copy_records_to_table(
                "fleetmesh_bench_limit", records=chunk, columns=_COLUMNS
            )
            if on_progress is not None:
                on_progress(len(chunk))
        elapsed = time.perf_counter() - started
        await connection.execute("DROP TABLE fleetmesh_bench_limit")
    finally:
        await connection.close()
    return _rate(rows, elapsed)


def argon2_hashes_per_s(
    hashes: int,
    *,
    threads: int = DEVICE_HASHER_THREADS,
    on_progress: Progressed | None = None,
) -> float:
    """Device-secret hashes/s with the devices context's argon2 parameters on `threads`."""
    hasher = CredentialHasher(workers=1)
    secrets_ = [new_secret() for _ in range(hashes)]
    per_thread = -(-hashes // threads)
    parts = [secrets_[i : i + per_thread] for i in range(0, hashes, per_thread)]

    def work(part: list[str]) -> None:
        for index, secret in enumerate(part, start=1):
            hasher.hash_now(secret)
            if on_progress is not None and index % 20 == 0:
                on_progress(20)
        if on_progress is not None and len(part) % 20:
            on_progress(len(part) % 20)

    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2-limit") as pool:
            started = time.perf_counter()
            for finished in [pool.submit(work, part) for part in parts]:
                finished.result()
            elapsed = time.perf_counter() - started
    finally:
        hasher.close()
    return _rate(hashes, elapsed)


def _chunks(rows: Sequence[Row], size: int) -> list[Sequence[Row]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _rate(count: int, elapsed: float) -> float:
    return count / max(elapsed, 1e-9)
