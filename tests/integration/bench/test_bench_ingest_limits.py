"""The ingest bench's raw ceilings write the load's rows into the platform's own table layout."""

from __future__ import annotations

from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from fleetmesh.bench import ingest_limits
from fleetmesh.bench.ingest_limits import (
    DEFAULT_POSTGRES,
    postgres_rows_per_s,
    postgres_target,
    sqlite_rows_per_s,
)
from fleetmesh.bench.ingest_load import limit_rows
from fleetmesh.core.ports import free_port

pytestmark = pytest.mark.integration

START_MS = 1_800_000_000_000


async def test_sqlite_takes_the_rows_into_a_migrated_points_table(tmp_path: Path) -> None:
    rows = limit_rows(["bench-a", "bench-b"], 2, START_MS)
    progressed: list[int] = []
    rate = await sqlite_rows_per_s(rows, directory=tmp_path, on_progress=progressed.append)
    assert rate > 0
    assert sum(progressed) == len(rows) == 4000
    assert list(tmp_path.iterdir()) == [], "the limit's database file is removed"


async def _tables_like(url: str, pattern: str) -> list[str]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE $1", pattern
        )
    finally:
        await connection.close()
    return [row["tablename"] for row in rows]


async def test_postgresql_copies_into_a_copy_of_the_points_table_then_drops_it(
    pg_database: str,
) -> None:
    rows = limit_rows(["bench-a"], 2, START_MS)
    progressed: list[int] = []
    rate = await postgres_rows_per_s(pg_database, rows, on_progress=progressed.append)
    assert rate > 0 and sum(progressed) == 2000
    assert await _tables_like(pg_database, "telemetry_points") == ["telemetry_points"]
    assert await _tables_like(pg_database, "fleetmesh_bench_points_%") == []


async def _databases_named(name: str) -> int:
    connection = await asyncpg.connect(f"{DEFAULT_POSTGRES}/postgres")
    try:
        return int(
            await connection.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name)
        )
    finally:
        await connection.close()


async def test_without_a_url_the_bench_uses_a_database_of_its_own_and_drops_it() -> None:
    async with postgres_target(None) as target:
        assert target.url is not None and target.skipped_reason is None
        name = target.url.rsplit("/", 1)[1]
        assert name.startswith("fleetmesh_bench_")
        assert await _databases_named(name) == 1
    assert await _databases_named(name) == 0
    async with postgres_target("postgresql://somewhere/given") as given:
        assert given.url == "postgresql://somewhere/given"


async def test_an_unreachable_server_makes_the_postgresql_part_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}"
    monkeypatch.setattr(ingest_limits, "DEFAULT_POSTGRES", nowhere)
    async with postgres_target(None) as target:
        assert target.url is None
        assert target.skipped_reason is not None and nowhere in target.skipped_reason
