"""Driver statements store and read back what SQLAlchemy's own processing would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, insert, select
from sqlalchemy.dialects import sqlite

from fleetmesh.core.bulk import DriverQuery, DriverStatement, sqlite_time, utc_time
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
