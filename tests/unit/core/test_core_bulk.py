"""Driver statements store and read back what SQLAlchemy's own processing would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from fleetmesh.core.bulk import (
    DriverQuery,
    DriverStatement,
    ManyRows,
    OneStatement,
    _statement_sizes,
    executemany,
    fetch,
    sqlite_many_rows,
    sqlite_many_rows_at_once,
    sqlite_time,
    utc_time,
)
from fleetmesh.core.sqltypes import UtcDateTime

MOMENTS = [
    datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    datetime(2026, 1, 2, 6, 4, 5, 1, tzinfo=timezone(timedelta(hours=3))),
]


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_time_is_stored_on_sqlite_as_sqlalchemy_stores_it(moment: datetime) -> None:
    stored = sqlite.DATETIME().bind_processor(sqlite.dialect())
    assert stored is not None
    assert sqlite_time(moment) == stored(moment.astimezone(UTC))


def test_a_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        utc_time(datetime(2026, 1, 1))  # noqa: DTZ001


_table = Table(
    "things",
    MetaData(),
    Column("id", String(10), primary_key=True),
    Column("count", Integer, nullable=False),
    Column("at", UtcDateTime(), nullable=True),
)


def test_rows_become_driver_tuples_in_the_statement_order() -> None:
    statement = DriverStatement(insert(_table), ("at", "id", "count"))
    sql, to_parameters = statement.for_dialect(sqlite.dialect())
    assert sql == "INSERT INTO things (id, count, at) VALUES (?, ?, ?)"
    assert to_parameters({"id": "a", "count": 2, "at": MOMENTS[0]}) == (
        "a",
        2,
        "2026-01-02 03:04:05.678901",
    )
    assert to_parameters({"id": "b", "count": 0, "at": None}) == ("b", 0, None)


def test_a_query_reads_times_back_as_aware_utc() -> None:
    query = DriverQuery(select(_table).where(_table.c.count > bindparam("least")), ("least",))
    _sql, _places, from_driver = query.for_dialect(sqlite.dialect())
    row = from_driver(("a", 2, "2026-01-02 03:04:05.678901"))
    assert row == ("a", 2, MOMENTS[0])
    assert row[2].tzinfo is UTC


async def test_on_sqlite_batches_of_rows_are_stored_updated_and_read_back(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'bulk.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(_table.metadata.create_all)
    rows = [{"id": f"t{i:04d}", "count": i, "at": MOMENTS[i % 3]} for i in range(1_200)]
    bump = DriverStatement(
        update(_table)
        .where(_table.c.id == bindparam("b_id"))
        .where(_table.c.count == bindparam("b_count"))
        .values(count=bindparam("count")),
        ("count", "b_id", "b_count"),
    )
    query = DriverQuery(select(_table).where(_table.c.count >= bindparam("least")), ("least",))
    async with AsyncSession(engine) as session:
        assert (
            await executemany(session, DriverStatement(insert(_table), ("id", "count", "at")), rows)
            == 1_200
        )
        bumps = [
            {"b_id": r["id"], "b_count": r["count"], "count": r["count"] + 10_000} for r in rows
        ]
        assert await executemany(session, bump, bumps) == 1_200
        stale = [{"b_id": "t0001", "b_count": 1, "count": 0}]  # already moved: no row
        assert await executemany(session, bump, stale) == 0
        await session.commit()
        read = await fetch(session, query, (10_000,))
    await engine.dispose()
    assert len(read) == 1_200
    assert sorted(read)[1] == ("t0001", 10_001, MOMENTS[1])


_UPSERT = (
    "INSERT INTO things (id, count, at) VALUES (?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET count = excluded.count WHERE excluded.count > things.count"
)
_CLAIM = (
    "INSERT INTO things (id, count, at) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING RETURNING id"
)


async def test_on_sqlite_many_rows_upsert_and_claim_across_statements(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'bulk.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(_table.metadata.create_all)
    first = [(f"t{i:05d}", i, None) for i in range(9_000)]  # three statements of 4,000 rows
    again = [(f"t{i:05d}", i, None) for i in range(8_990, 9_010)]
    moves = [("t00001", 100, None), ("t00002", 0, None), ("t09500", 7, None)]
    async with AsyncSession(engine) as session:
        connection = await session.connection()
        claimed, reclaimed = await sqlite_many_rows_at_once(
            connection, [ManyRows(_CLAIM, first, True), ManyRows(_CLAIM, again, True)]
        )
        await sqlite_many_rows(connection, _UPSERT, moves)
        await session.commit()
        rows = await session.execute(select(_table.c.id, _table.c.count))
        counts = {row.id: row.count for row in rows}
    await engine.dispose()
    assert sorted(row[0] for row in claimed) == [row[0] for row in first]
    assert sorted(row[0] for row in reclaimed) == [f"t{i:05d}" for i in range(9_000, 9_010)]
    assert len(counts) == 9_011
    assert (counts["t00001"], counts["t00002"], counts["t09500"]) == (100, 2, 7)


async def test_on_sqlite_many_rows_belong_to_the_session_transaction(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'bulk.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(_table.metadata.create_all)
    async with AsyncSession(engine) as session:
        connection = await session.connection()
        await sqlite_many_rows(connection, _UPSERT, [("kept", 1, None)])
        await session.commit()
        connection = await session.connection()
        await sqlite_many_rows(connection, _UPSERT, [(f"r{i}", i, None) for i in range(5_000)])
        await session.rollback()
        count = await session.scalar(select(func.count()).select_from(_table))
    await engine.dispose()
    assert count == 1


async def test_on_sqlite_writes_at_once_run_in_order_and_a_failure_raises(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'bulk.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(_table.metadata.create_all)
    claims = [(f"t{i:05d}", i, None) for i in range(4_500)]  # two claim statements
    async with AsyncSession(engine) as session:
        connection = await session.connection()
        claimed, moved, again = await sqlite_many_rows_at_once(
            connection,
            [
                ManyRows(_CLAIM, claims, returning=True),
                ManyRows(_UPSERT, [("t00003", 50, None), ("t04400", 1, None)]),
                ManyRows(_CLAIM, [("t00003", 0, None), ("new", 0, None)], returning=True),
            ],
        )
        with pytest.raises(Exception, match="NOT NULL"):
            await sqlite_many_rows_at_once(connection, [ManyRows(_UPSERT, [("bad", None, None)])])
        await session.commit()
        count = await session.scalar(select(_table.c.count).where(_table.c.id == "t00003"))
    await engine.dispose()
    assert isinstance(claimed, list) and len(claimed) == 4_500
    assert moved == 1  # t04400 already counts more than 1
    assert again == [("new",)]
    assert count == 50


async def test_on_sqlite_one_statements_run_at_once_with_many_rows(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'bulk.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(_table.metadata.create_all)
    from_json = (
        "INSERT INTO things (id, count) SELECT json_extract(value, '$[0]'),"
        " json_extract(value, '$[1]') FROM json_each(:rows)"
    )
    async with AsyncSession(engine) as session:
        connection = await session.connection()
        inserted, counted, upserted = await sqlite_many_rows_at_once(
            connection,
            [
                OneStatement(from_json, {"rows": '[["a", 1], ["b", 2], ["c", 3]]'}),
                OneStatement("SELECT sum(count) FROM things WHERE id > ?", ("a",), True),
                ManyRows(_UPSERT, [("c", 30, None)]),
            ],
        )
        await session.commit()
        total = await session.scalar(select(func.sum(_table.c.count)))
    await engine.dispose()
    assert (inserted, counted, upserted) == (3, [(5,)], 1)
    assert total == 33


def test_statements_come_in_few_sizes_so_sqlite_keeps_them_compiled() -> None:
    assert _statement_sizes(9_000, 8) == [4_000, 4_000, 250, 250, 250, 250]
    assert _statement_sizes(2_137, 7) == [250] * 8 + [137]
    assert _statement_sizes(40, 2_000) == [16, 16, 8]
    assert sum(_statement_sizes(123_457, 3)) == 123_457
