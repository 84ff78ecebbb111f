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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, Float, Integer, LargeBinary, String
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.core.sqltypes import UtcDateTime

RowToParameters = Callable[[dict[str, Any]], tuple[Any, ...]]
RowFromDriver = Callable[[Sequence[Any]], tuple[Any, ...]]

_PLAIN_TYPES = (String, Integer, BigInteger, Float, Boolean, LargeBinary)


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
            as_time = sqlite_time if dialect.name == "sqlite" else utc_time
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
    result = await connection.exec_driver_sql(sql, [to_parameters(row) for row in rows])
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
            places = tuple(self.parameters.index(name) for name in order)
            readers = [
                _reader(column.name, column.type, dialect.name)
                for column in self.statement.selected_columns
            ]
            found = (compiled.string, places, _row_reader(readers))
            self._compiled[dialect.name] = found
        return found


async def fetch(
    session: AsyncSession, query: DriverQuery, parameters: Sequence[Any]
) -> list[tuple[Any, ...]]:
    """The query's rows, its parameters given in the order it was declared with."""
    connection = await session.connection()
    sql, places, from_driver = query.for_dialect(connection.dialect)
    result = await connection.exec_driver_sql(sql, tuple([parameters[i] for i in places]))
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


def _row_converter(
    pairs: list[tuple[str, Callable[[Any], Any] | None]],
) -> RowToParameters:
    def to_parameters(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(
            [row[name] if convert is None else convert(row[name]) for name, convert in pairs]
        )

    return to_parameters
