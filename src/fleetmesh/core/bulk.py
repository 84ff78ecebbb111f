"""Executemany of thousands of rows, and reads of as many, without SQLAlchemy's per-row
parameter and result processing.

For a batch insert or update, SQLAlchemy processes every parameter of every
row in Python (several microseconds per row and statement, more than SQLite
takes to store it). A `DriverStatement` is a Core statement compiled once per
dialect; each row (a dict) becomes the driver's parameter tuple directly, with
the one conversion our column types make: `UtcDateTime` values in UTC, on
SQLite in the text form SQLAlchemy stores (`YYYY-MM-DD HH:MM:SS.ffffff`). Only
plain column types are accepted, so nothing else would need converting.
A `DriverQuery` reads rows the same way: tuples in the order of its columns,
`UtcDateTime` values read back as aware UTC datetimes, booleans as `bool`.

On SQLite, whose driver runs each connection in a thread that needs the GIL back
after every statement step, a batch takes few steps: thousands of rows per
insert or update statement, queued on that thread at once
(`sqlite_many_rows_at_once`), and a query's rows come back as one JSON row.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import msgspec
from sqlalchemy import BigInteger, Boolean, Float, Integer, LargeBinary, String
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from fleetmesh.core.sqltypes import UtcDateTime

RowToParameters = Callable[[dict[str, Any]], tuple[Any, ...]]
RowFromDriver = Callable[[Sequence[Any]], tuple[Any, ...]]

_PLAIN_TYPES = (String, Integer, BigInteger, Float, Boolean, LargeBinary)
_SQLITE_ROWS_PER_STATEMENT = 4000
_SQLITE_SMALL_STATEMENT = 250
_SQLITE_MAX_PARAMETERS = 32_000
"""SQLite allows 32,766 parameters per statement (since 3.32)."""


class DriverStatement:
    """A statement with named parameters, run once per row through the driver."""

    def __init__(self, statement: Any, parameters: Sequence[str]) -> None:
        self.statement = statement
        self.parameters = tuple(parameters)
        self._compiled: dict[str, tuple[str, RowToParameters]] = {}

    def for_dialect(self, dialect: Dialect) -> tuple[str, RowToParameters]:
        """The SQL text and the row converter of this dialect (compiled on first use)."""
        found = self._compiled.get(dialect.name)
        if found is None:
            compiled = self.statement.compile(dialect=dialect, column_keys=list(self.parameters))
            order = tuple(compiled.positiontup or ())
            if set(order) != set(self.parameters):
                raise ValueError(f"statement parameters {order} are not {self.parameters}")
            as_time = _remembering_last(sqlite_time if dialect.name == "sqlite" else utc_time)
            converters = [_converter(name, compiled.binds[name].type, as_time) for name in order]
            found = (compiled.string, _row_converter(list(zip(order, converters, strict=True))))
            self._compiled[dialect.name] = found
        return found


async def executemany(
    session: AsyncSession, statement: DriverStatement, rows: Sequence[dict[str, Any]]
) -> int:
    """Run the statement once per row in the session's transaction; the rows it changed
    (-1 when the driver does not tell)."""
    if not rows:
        return 0
    connection = await session.connection()
    sql, to_parameters = statement.for_dialect(connection.dialect)
    if connection.dialect.name == "sqlite":
        return await sqlite_many_rows(connection, sql, [to_parameters(r) for r in rows])
    result = await connection.exec_driver_sql(sql, [to_parameters(row) for row in rows])
    return _rowcount(result)


@dataclass(frozen=True, slots=True)
class ManyRows:
    """A one-row SQLite insert, upsert or update, and the rows to run it for. With
    ``returning``, the statement has a ``RETURNING`` clause whose rows are wanted."""

    sql: str
    rows: Sequence[Sequence[Any]]
    returning: bool = False


@dataclass(frozen=True, slots=True)
class OneStatement:
    """A SQLite statement run once with its parameters (e.g. an insert that takes its rows
    apart from one JSON parameter itself). With ``returning``, its rows are wanted: few,
    as the driver needs the GIL back after each (see `sqlite_many_rows_at_once`)."""

    sql: str
    parameters: Sequence[Any] | dict[str, Any]
    returning: bool = False


Write = ManyRows | OneStatement


async def sqlite_many_rows(
    connection: AsyncConnection, sql: str, rows: Sequence[Sequence[Any]]
) -> int:
    """Run a one-row SQLite insert, upsert or update for every row, thousands of rows per
    statement; the rows it changed (-1 when the driver does not tell). See
    `sqlite_many_rows_at_once`."""
    return cast(int, (await sqlite_many_rows_at_once(connection, [ManyRows(sql, rows)]))[0])


async def sqlite_many_rows_at_once(
    connection: AsyncConnection, writes: Sequence[Write]
) -> list[int | list[tuple[Any, ...]]]:
    """Run the writes in order, in the session's transaction, thousands of rows per
    statement; for each, the rows it changed (-1 when the driver does not tell) or, with
    ``returning``, the rows it returned. The rows of an update must each match other rows
    of the table (one statement matches them all against the table as it was before).

    SQLite's driver runs in a thread of its own and needs the GIL back after every
    statement step, which a busy event loop hands over only every switch interval (5 ms),
    so an executemany of thousands of rows could take seconds; a statement for thousands
    of rows takes one step. And every answer from that thread waits its turn in the event
    loop's queue, behind whatever else is ready (under HTTP ingest load, 20-90 ms), so
    every statement is queued on the thread before the first answer is awaited: one wait
    for all of them."""
    driver = await _driver_connection(connection)
    calls: list[tuple[int, asyncio.Future[Any]]] = []
    for position, write in enumerate(writes):
        for call in _driver_calls(driver, write):
            calls.append((position, asyncio.ensure_future(call)))
    answers: list[Any] = await asyncio.gather(
        *(future for _, future in calls), return_exceptions=True
    )
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    results: list[int | list[tuple[Any, ...]]] = [[] if write.returning else 0 for write in writes]
    for (position, _), answer in zip(calls, answers, strict=True):
        found = results[position]
        if isinstance(found, list):
            found.extend(tuple(row) for row in answer)
        else:
            rowcount = _rowcount(answer)
            results[position] = -1 if found < 0 or rowcount < 0 else found + rowcount
    return results


def _driver_calls(driver: Any, write: Write) -> list[Coroutine[Any, Any, Any]]:
    """The driver calls of one write: an executemany of its whole statements and one
    statement for the rest; with ``returning``, one call per statement."""
    if isinstance(write, OneStatement):
        run = driver.execute_fetchall if write.returning else driver.execute
        return [run(write.sql, write.parameters)]
    rows = write.rows
    if not rows:
        return []
    chunks: list[Sequence[Sequence[Any]]] = []
    start = 0
    for size in _statement_sizes(len(rows), len(rows[0])):
        chunks.append(rows[start : start + size])
        start += size
    if write.returning:
        return [
            driver.execute_fetchall(_many_rows_sql(write.sql, len(chunk)), _flat(chunk))
            for chunk in chunks
        ]
    calls = []
    for size, same in itertools.groupby(chunks, key=len):
        flat = [_flat(chunk) for chunk in same]
        if len(flat) == 1:
            calls.append(driver.execute(_many_rows_sql(write.sql, size), flat[0]))
        else:
            calls.append(driver.executemany(_many_rows_sql(write.sql, size), flat))
    return calls


async def sqlite_execute(
    connection: AsyncConnection, sql: str, parameters: Sequence[Any] | dict[str, Any]
) -> int:
    """Run one statement in the session's transaction with one call to the driver's thread
    (SQLAlchemy's own path takes three: cursor, execute, close); the rows it changed."""
    driver = await _driver_connection(connection)
    return _rowcount(await driver.execute(sql, parameters))


def _statement_sizes(rows: int, columns: int) -> list[int]:
    """Rows per statement: as many of the largest as fit, then of a smaller size, then the
    rest. Few sizes mean few statement texts, which SQLite's statement cache keeps
    compiled: a statement of thousands of rows takes milliseconds to compile, and a
    window of 2,000 status rows compiled afresh each time lengthened a burst's tail."""
    large = max(1, min(_SQLITE_ROWS_PER_STATEMENT, _SQLITE_MAX_PARAMETERS // columns))
    small = min(large, _SQLITE_SMALL_STATEMENT)
    sizes = [large] * (rows // large)
    rows %= large
    sizes += [small] * (rows // small)
    if rows % small:
        sizes.append(rows % small)
    return sizes


def _flat(rows: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
    return tuple([value for row in rows for value in row])


async def _driver_connection(connection: AsyncConnection) -> Any:
    """The aiosqlite connection under SQLAlchemy's, in the same transaction."""
    driver = (await connection.get_raw_connection()).driver_connection
    if driver is None:
        raise RuntimeError("no driver connection")
    return driver


@functools.lru_cache(maxsize=1024)
def _many_rows_sql(sql: str, rows: int) -> str:
    """`INSERT ... VALUES (?, ?) [ON CONFLICT ...] [RETURNING ...]` for many rows, or
    `UPDATE t SET a=? WHERE b = ?` as an update from a list of values (`UPDATE t SET
    a=v.column1 FROM (VALUES ...) AS v WHERE b = v.column2`; not a `WITH`, after which the
    driver reports no row count)."""
    count = sql.count("?")
    placeholders = "(" + ", ".join(["?"] * count) + ")"
    values = ", ".join([placeholders] * rows)
    row_values = f" VALUES {placeholders}"
    if sql.startswith("INSERT ") and sql.count(row_values) == 1:
        return sql.replace(row_values, f" VALUES {values}")
    if sql.startswith("UPDATE ") and sql.count(" WHERE ") == 1 and "'" not in sql:
        pieces = sql.split("?")
        named = "".join(f"{piece}v.column{index}" for index, piece in enumerate(pieces[:-1], 1))
        assignments, condition = (named + pieces[-1]).split(" WHERE ")
        return f"{assignments} FROM (VALUES {values}) AS v WHERE {condition}"
    raise ValueError(f"no many-rows form for {sql!r}")


def _rowcount(result: Any) -> int:
    rowcount = getattr(result, "rowcount", -1)
    return -1 if rowcount is None else int(rowcount)


class DriverQuery:
    """A select compiled once per dialect, its rows converted column by column."""

    def __init__(self, statement: Any, parameters: Sequence[str]) -> None:
        self.statement = statement
        self.parameters = tuple(parameters)
        self._compiled: dict[str, tuple[str, tuple[int, ...], RowFromDriver]] = {}

    def for_dialect(self, dialect: Dialect) -> tuple[str, tuple[int, ...], RowFromDriver]:
        """The SQL text, where each parameter goes, and the row converter of this dialect."""
        found = self._compiled.get(dialect.name)
        if found is None:
            compiled = self.statement.compile(dialect=dialect)
            order = tuple(compiled.positiontup or ())
            if set(order) != set(self.parameters):
                raise ValueError(f"query parameters {order} are not {self.parameters}")
            where = {name: index for index, name in enumerate(self.parameters)}
            places = tuple(where[name] for name in order)
            readers = [
                _reader(column.name, column.type, dialect.name)
                for column in self.statement.selected_columns
            ]
            sql = compiled.string
            if dialect.name == "sqlite":
                sql = _as_one_json_row(sql, [c.name for c in self.statement.selected_columns])
            found = (sql, places, _row_reader(readers))
            self._compiled[dialect.name] = found
        return found


def _as_one_json_row(sql: str, columns: list[str]) -> str:
    """On SQLite, all rows as one JSON array of arrays: one statement step, not one per
    row (see `sqlite_many_rows_at_once` for why steps are dear)."""
    if len(set(columns)) != len(columns) or any('"' in name for name in columns):
        raise ValueError(f"columns {columns} cannot be read by name")
    values = ", ".join(f'"{name}"' for name in columns)
    return f"SELECT json_group_array(json_array({values})) FROM ({sql})"


async def fetch(
    session: AsyncSession, query: DriverQuery, parameters: Sequence[Any]
) -> list[tuple[Any, ...]]:
    """The query's rows, its parameters given in the order it was declared with."""
    connection = await session.connection()
    sql, places, from_driver = query.for_dialect(connection.dialect)
    ordered = tuple([parameters[i] for i in places])
    if connection.dialect.name == "sqlite":
        # One call to the driver's thread; SQLAlchemy's own path takes four.
        driver = await _driver_connection(connection)
        [(found,)] = await driver.execute_fetchall(sql, ordered)
        return [from_driver(row) for row in msgspec.json.decode(found)]
    result = await connection.exec_driver_sql(sql, ordered)
    return [from_driver(row) for row in result.all()]


def utc_time(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is UTC:
        return moment
    if moment.tzinfo is None:
        raise ValueError("naive datetimes are ambiguous; pass an aware UTC datetime")
    return moment.astimezone(UTC)


def sqlite_time(moment: datetime | None) -> str | None:
    """What `UtcDateTime` stores on SQLite for this moment."""
    utc = utc_time(moment)
    if utc is None:
        return None
    # `isoformat` with a timespec, and `replace`, cost twice as much as this.
    text = utc.isoformat(" ")[:-6]  # without "+00:00"
    return text if utc.microsecond else text + ".000000"


def _read_sqlite_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text + "+00:00")


def _read_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _reader(name: str, column_type: Any, dialect: str) -> Callable[[Any], Any] | None:
    if isinstance(column_type, UtcDateTime):
        return _read_sqlite_time if dialect == "sqlite" else utc_time
    if isinstance(column_type, Boolean):
        return _read_bool
    if isinstance(column_type, _PLAIN_TYPES):
        return None
    raise TypeError(f"column {name!r}: {column_type!r} is not a plain column type")


def _row_reader(readers: list[Callable[[Any], Any] | None]) -> RowFromDriver:
    indexed = list(enumerate(readers))

    def from_driver(row: Sequence[Any]) -> tuple[Any, ...]:
        return tuple([row[i] if read is None else read(row[i]) for i, read in indexed])

    return from_driver


def _converter(
    name: str, column_type: Any, as_time: Callable[[datetime | None], Any]
) -> Callable[[Any], Any] | None:
    if isinstance(column_type, UtcDateTime):
        return as_time
    if isinstance(column_type, _PLAIN_TYPES):
        return None
    raise TypeError(f"parameter {name!r}: {column_type!r} is not a plain column type")


def _remembering_last(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`convert`, answering at once when given the same object again: a row's times are
    often one object (a transition's `since` and `last_update`), a batch's too (`created_at`)."""
    last: list[Any] = [None, None]

    def converted(value: Any) -> Any:
        if value is last[0] and value is not None:
            return last[1]
        result = convert(value)
        last[0], last[1] = value, result
        return result

    return converted


def _row_converter(
    pairs: list[tuple[str, Callable[[Any], Any] | None]],
) -> RowToParameters:
    def to_parameters(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(
            [row[name] if convert is None else convert(row[name]) for name, convert in pairs]
        )

    return to_parameters
