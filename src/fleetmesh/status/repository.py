"""Tables of the status context and their SQLAlchemy adapters (SQLite and PostgreSQL).

- `status_device_types` / the type columns of `status_devices`: the projection
  of the device registry this context needs (type, timeouts, expected interval).
- `status_devices`: the current status of each device (one row, `version` for
  optimistic concurrency), its liveness (`last_seen`, open MQTT connection)
  and its health-check schedule (`check_attempt`, `next_check_at`): the store is
  the source of truth the in-memory timers are rebuilt from.
- `status_history`: one row per transition, keyed by `(device_id, sequence)`;
  sequence 0 is the registration.
- `status_health_checks`: every ping sent to an offline device and its outcome.
- `status_quality`: telemetry quality per device and hour (points, sum of scores).
- `status_offsets`: how far a consumer's side effects that are not idempotent
  by themselves (quality sums) have been committed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.core.bulk import (
    DriverQuery,
    DriverStatement,
    ManyRows,
    OneStatement,
    Write,
    executemany,
    fetch,
    sqlite_many_rows_at_once,
)
from fleetmesh.core.sqltypes import UtcDateTime
from fleetmesh.status import set_writes
from fleetmesh.status.domain import (
    MAX_OFFLINE_TIMEOUT_S,
    DeviceState,
    DeviceStatus,
    StatusChanged,
)
from fleetmesh.status.set_writes import SeenRow

metadata = MetaData()

status_device_types = Table(
    "status_device_types",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("offline_timeout_s", Float, nullable=True),
    Column("expected_interval_s", Float, nullable=True),
)

status_devices = Table(
    "status_devices",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("type_name", String(63), nullable=True),
    Column("status", String(20), nullable=False),
    Column("cause", String(20), nullable=False),
    Column("since", UtcDateTime(), nullable=False),
    Column("last_update", UtcDateTime(), nullable=False),
    Column("last_seen", UtcDateTime(), nullable=True),
    Column("sequence", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("timeout_override_s", Float, nullable=True),
    Column("mqtt_connected", Boolean, nullable=False),
    Column("check_attempt", Integer, nullable=False),
    Column("next_check_at", UtcDateTime(), nullable=True),
    Column("quality_recent", Float, nullable=True),
    Column("registered_at", UtcDateTime(), nullable=False),
    Index("ix_status_devices_status_since", "status", "since"),
    Index("ix_status_devices_type_status", "type_name", "status"),
    Index("ix_status_devices_status_quality", "status", "quality_recent"),
)

status_history = Table(
    "status_history",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("sequence", Integer, primary_key=True),
    Column("at", UtcDateTime(), nullable=False),
    Column("previous", String(20), nullable=True),
    Column("current", String(20), nullable=False),
    Column("cause", String(20), nullable=False),
    Column("detail", Text, nullable=False),
    Index("ix_status_history_at", "at"),
)

status_health_checks = Table(
    "status_health_checks",
    metadata,
    Column("command_id", String(26), primary_key=True),
    Column("device_id", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("sent_at", UtcDateTime(), nullable=False),
    Column("answered_at", UtcDateTime(), nullable=True),
    Column("outcome", String(10), nullable=False),
    Index("ix_status_health_checks_device_sent", "device_id", "sent_at"),
)

status_quality = Table(
    "status_quality",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("bucket", UtcDateTime(), primary_key=True),
    Column("points", BigInteger, nullable=False),
    Column("quality_sum", Float, nullable=False),
)

status_offsets = Table(
    "status_offsets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
)

REGISTRATION_CAUSE = "registered"
"""The `cause` of history row 0 (not a transition, so not a `StatusCause`)."""

PENDING, ANSWERED, FAILED = "pending", "answered", "failed"
_CHUNK = 500
_LOAD_CHUNK = 2_000
"""Ids per locked read: a whole window of the liveness engine in one round trip."""


class ConcurrentUpdate(RuntimeError):
    """A row changed under us (its version moved); the caller retries."""


@dataclass(eq=False)
class TrackedDevice:
    """A device's status aggregate with the columns around it."""

    status: DeviceStatus
    type_name: str | None
    cause: str
    registered_at: datetime
    timeout_override_s: float | None = None
    type_timeout_s: float | None = None
    expected_interval_s: float | None = None
    mqtt_connected: bool = False
    check_attempt: int = 0
    next_check_at: datetime | None = None
    quality_recent: float | None = None
    stored_version: int = 0
    extra_changed: bool = False
    """A column outside the aggregate changed (flag, schedule, quality, type)."""
    stored_row: dict[str, Any] | None = field(default=None, repr=False)
    """The row as last read or written, so a save writes only the columns that moved."""

    @property
    def device_id(self) -> str:
        return self.status.device_id

    @property
    def changed(self) -> bool:
        return self.extra_changed or self.status.version != self.stored_version


@dataclass(frozen=True, slots=True)
class QualitySample:
    device_id: str
    bucket: datetime
    points: int
    quality_sum: float


@dataclass(frozen=True, slots=True)
class HistoryRow:
    device_id: str
    sequence: int
    at: datetime
    previous: str | None
    current: str
    cause: str
    detail: str


@dataclass(frozen=True, slots=True)
class CheckCounts:
    answered: int = 0
    failed: int = 0


def resolve_timeout(
    override: float | None, type_timeout: float | None, default_timeout: float
) -> float:
    """The device's own timeout, else its type's, else the live default (at most a year)."""
    for candidate in (override, type_timeout):
        if candidate is not None and candidate > 0:
            return min(float(candidate), MAX_OFFLINE_TIMEOUT_S)
    return default_timeout


_TRACKED_COLUMNS = (
    *status_devices.c,
    status_device_types.c.offline_timeout_s.label("type_timeout_s"),
    status_device_types.c.expected_interval_s,
)
_JOINED = status_devices.outerjoin(
    status_device_types, status_device_types.c.name == status_devices.c.type_name
)


class _TrackedRow(NamedTuple):
    """A row of `_TRACKED_COLUMNS`, as `tracked_from_row` reads it."""

    device_id: str
    type_name: str | None
    status: str
    cause: str
    since: datetime
    last_update: datetime
    last_seen: datetime | None
    sequence: int
    version: int
    timeout_override_s: float | None
    mqtt_connected: bool
    check_attempt: int
    next_check_at: datetime | None
    quality_recent: float | None
    registered_at: datetime
    type_timeout_s: float | None
    expected_interval_s: float | None


def _padded_size(count: int) -> int:
    """Reads are compiled for powers of two ids (a handful of statements, not one per count)."""
    return 1 << max(0, count - 1).bit_length()


@functools.cache
def _locked_select(size: int) -> DriverQuery:
    """The tracked devices among `size` ids, locked for update (PostgreSQL; SQLite has
    one writer at a time)."""
    names = [f"id_{index}" for index in range(size)]
    statement = (
        select(*_TRACKED_COLUMNS)
        .select_from(_JOINED)
        .where(status_devices.c.device_id.in_([bindparam(name) for name in names]))
        .order_by(status_devices.c.device_id)
        .with_for_update(of=status_devices)
    )
    return DriverQuery(statement, names)


def compile_window_statements(dialect: Dialect) -> None:
    """Compile the statements of a full window ahead (a read of 2,048 ids takes tens of
    milliseconds to compile), so the first burst of timeouts does not wait for them."""
    _locked_select(_padded_size(_LOAD_CHUNK)).for_dialect(dialect)
    _HISTORY_INSERT.for_dialect(dialect)


class SqlStatusRepository:
    """Writes and locked reads inside one unit of work."""

    def __init__(self, session: AsyncSession, dialect: str) -> None:
        self.session = session
        self.dialect = dialect

    # ------------------------------------------------------------ devices

    async def load(
        self, device_ids: Iterable[str], *, default_timeout_s: float
    ) -> dict[str, TrackedDevice]:
        """The tracked devices among these ids, locked for update on PostgreSQL."""
        found: dict[str, TrackedDevice] = {}
        for chunk in _chunks(sorted(set(device_ids)), _LOAD_CHUNK):
            size = _padded_size(len(chunk))
            padded = [*chunk, *[chunk[-1]] * (size - len(chunk))]  # repeats match nothing new
            for values in await fetch(self.session, _locked_select(size), padded):
                tracked = tracked_from_row(_TrackedRow(*values), default_timeout_s)
                found[tracked.device_id] = tracked
        return found

    async def save_timed_out(self, devices: Sequence[tuple[StatusChanged, int, datetime]]) -> None:
        """Write devices an inactivity timeout took offline, with their history rows:
        (the transition, the row version it was decided on, the first health check).
        Raises `ConcurrentUpdate`, writing nothing the caller may keep, if any row is no
        longer at that version."""
        if not devices:
            return
        rows = set_writes.encoded_rows(devices)
        written = await set_writes.update_status_rows(self.session, self.dialect, rows)
        _require_all_written(len(devices), written)
        await set_writes.insert_history(self.session, self.dialect, rows)

    async def insert_many(self, new_devices: Sequence[TrackedDevice]) -> None:
        """Store newly registered devices with their history row 0 (the registration)."""
        if not new_devices:
            return
        await self.session.execute(insert(status_devices), [_device_row(d) for d in new_devices])
        await self.session.execute(
            insert(status_history),
            [
                {
                    "device_id": d.device_id,
                    "sequence": 0,
                    "at": d.registered_at,
                    "previous": None,
                    "current": DeviceState.REGISTERED.value,
                    "cause": REGISTRATION_CAUSE,
                    "detail": "",
                }
                for d in new_devices
            ],
        )
        for tracked in new_devices:
            tracked.stored_version = tracked.status.version
            tracked.stored_row = _device_row(tracked)
            tracked.extra_changed = False

    async def save_many(self, devices: Sequence[TrackedDevice]) -> None:
        """Write the changed columns of the changed devices, each only if its version is
        the one loaded (else `ConcurrentUpdate`). Devices that changed the same columns
        share one statement, and a row that only moved `last_seen` leaves the status
        indexes alone."""
        await self.save_window(devices, (), (), None)

    async def add_history(self, changes: Sequence[StatusChanged]) -> None:
        await self.save_window((), changes, (), None)

    async def add_quality(self, samples: Sequence[QualitySample]) -> None:
        await self.save_window((), (), samples, None)

    async def raise_offset(self, name: str, seq: int) -> None:
        await self.save_window((), (), (), (name, seq))

    async def save_window(
        self,
        devices: Sequence[TrackedDevice],
        changes: Sequence[StatusChanged],
        samples: Sequence[QualitySample],
        offset: tuple[str, int] | None,
        seen: Sequence[SeenRow] = (),
    ) -> None:
        """What a window of reports writes: the devices (as `save_many`), their history
        rows, quality samples, the consumer's offset and the devices whose telemetry only
        moved `last_seen` (each only if its row is at the version given, else
        `ConcurrentUpdate`); on SQLite in one call to the driver's thread (see
        `core.bulk.sqlite_many_rows_at_once`)."""
        updates = _DeviceUpdates.of(devices)
        writes = [*updates.writes, _Writes(_HISTORY_INSERT, [_history_row(c) for c in changes])]
        quality = _Writes(_QUALITY_UPSERT[self.dialect], _quality_rows(samples), many_values=True)
        writes.append(quality)
        if offset is not None:
            name, seq = offset
            writes.append(_Writes(_OFFSET_UPSERT[self.dialect], [{"name": name, "seq": seq}]))
        statements = set_writes.seen_statements(self.dialect, seen)
        counts = await self._write(writes, statements)
        updates.saved(counts[: len(updates.writes)])
        seen_counts = counts[len(writes) :]
        _require_all_written(len(seen), -1 if min(seen_counts, default=0) < 0 else sum(seen_counts))

    async def _write(
        self, writes: Sequence[_Writes], statements: Sequence[tuple[str, dict[str, Any]]] = ()
    ) -> list[int]:
        """Run the writes, then the statements, in order; the rows each changed (-1 when
        the driver does not tell)."""
        if self.dialect != "sqlite":
            counts = [await self._write_postgres(write) for write in writes]
            for sql, parameters in statements:
                result = await self.session.execute(text(sql), parameters)
                counts.append(int(getattr(result, "rowcount", -1)))
            return counts
        connection = await self.session.connection()
        many: list[Write] = []
        for write in writes:
            sql, to_parameters = write.statement.for_dialect(connection.dialect)
            many.append(ManyRows(sql, [to_parameters(row) for row in write.rows]))
        many += [OneStatement(sql, parameters) for sql, parameters in statements]
        return cast(list[int], await sqlite_many_rows_at_once(connection, many))

    async def _write_postgres(self, write: _Writes) -> int:
        if not (write.many_values and write.rows):
            return await executemany(self.session, write.statement, write.rows)
        await self.session.execute(write.statement.statement, write.rows)
        return -1

    async def upsert_type(
        self, name: str, offline_timeout_s: float | None, expected_interval_s: float | None
    ) -> bool:
        """Store a device type; True if its timeout changed (online devices need new deadlines)."""
        current = (
            await self.session.execute(
                select(status_device_types).where(status_device_types.c.name == name)
            )
        ).first()
        values = {
            "offline_timeout_s": offline_timeout_s,
            "expected_interval_s": expected_interval_s,
        }
        if current is None:
            await self.session.execute(insert(status_device_types).values(name=name, **values))
            return True
        if (current.offline_timeout_s, current.expected_interval_s) == (
            offline_timeout_s,
            expected_interval_s,
        ):
            return False
        await self.session.execute(
            update(status_device_types).where(status_device_types.c.name == name).values(**values)
        )
        return bool(current.offline_timeout_s != offline_timeout_s)

    # ------------------------------------------------------------ quality and offsets

    async def get_offset(self, name: str) -> int:
        seq = await self.session.scalar(
            select(status_offsets.c.seq).where(status_offsets.c.name == name)
        )
        return int(seq or 0)

    # ------------------------------------------------------------ health checks

    async def add_checks(self, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            await self.session.execute(insert(status_health_checks), list(rows))

    async def fail_pending_checks(self, device_ids: Sequence[str]) -> None:
        for chunk in _chunks(device_ids):
            await self.session.execute(
                update(status_health_checks)
                .where(status_health_checks.c.device_id.in_(chunk))
                .where(status_health_checks.c.outcome == PENDING)
                .values(outcome=FAILED)
            )

    async def answer_checks(
        self, answers: Sequence[tuple[str, str, datetime]]
    ) -> set[tuple[str, str]]:
        """Mark `(device_id, command_id, at)` answers; returns the ones that were our pings."""
        if not answers:
            return set()
        command_ids = [command_id for _, command_id, _ in answers]
        known: set[tuple[str, str]] = set()
        for chunk in _chunks(command_ids):
            rows = await self.session.execute(
                select(status_health_checks.c.device_id, status_health_checks.c.command_id).where(
                    status_health_checks.c.command_id.in_(chunk)
                )
            )
            known.update((row.device_id, row.command_id) for row in rows)
        matched = [(d, c, at) for d, c, at in answers if (d, c) in known]
        if matched:
            await self.session.execute(
                update(status_health_checks)
                .where(status_health_checks.c.command_id == bindparam("b_command_id"))
                .where(status_health_checks.c.answered_at.is_(None))
                .values(answered_at=bindparam("answered_at"), outcome=ANSWERED),
                [{"b_command_id": c, "answered_at": at} for _, c, at in matched],
            )
        return {(d, c) for d, c, _ in matched}


class StatusReader:
    """Read-only queries (no locks): timers rebuild, API views, fleet aggregates."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, device_id: str, *, default_timeout_s: float) -> TrackedDevice | None:
        row = (
            await self.session.execute(
                select(*_TRACKED_COLUMNS)
                .select_from(_JOINED)
                .where(status_devices.c.device_id == device_id)
            )
        ).first()
        return tracked_from_row(row, default_timeout_s) if row else None

    async def get_many(
        self, device_ids: Sequence[str], *, default_timeout_s: float
    ) -> list[TrackedDevice]:
        found: list[TrackedDevice] = []
        for chunk in _chunks(device_ids):
            rows = await self.session.execute(
                select(*_TRACKED_COLUMNS)
                .select_from(_JOINED)
                .where(status_devices.c.device_id.in_(chunk))
            )
            found.extend(tracked_from_row(row, default_timeout_s) for row in rows)
        return found

    async def timer_rows(
        self, *, type_name: str | None = None, default_only: bool = False
    ) -> list[Any]:
        """Online devices (for deadlines) and offline ones with a health check due."""
        statement = (
            select(
                status_devices.c.device_id,
                status_devices.c.status,
                status_devices.c.since,
                status_devices.c.last_seen,
                status_devices.c.timeout_override_s,
                status_devices.c.next_check_at,
                status_devices.c.version,
                status_devices.c.sequence,
                status_devices.c.mqtt_connected,
                status_devices.c.quality_recent,
                status_device_types.c.offline_timeout_s.label("type_timeout_s"),
            )
            .select_from(_JOINED)
            .where(
                or_(
                    status_devices.c.status == DeviceState.ONLINE.value,
                    and_(
                        status_devices.c.status == DeviceState.OFFLINE.value,
                        status_devices.c.next_check_at.is_not(None),
                    ),
                )
            )
        )
        if type_name is not None:
            statement = statement.where(status_devices.c.type_name == type_name)
        if default_only:
            statement = statement.where(
                status_devices.c.timeout_override_s.is_(None),
                status_device_types.c.offline_timeout_s.is_(None),
            )
        return list((await self.session.execute(statement)).all())

    async def mqtt_connected_ids(self) -> set[str]:
        rows = await self.session.execute(
            select(status_devices.c.device_id).where(status_devices.c.mqtt_connected.is_(True))
        )
        return {row.device_id for row in rows}

    async def history(
        self,
        device_id: str,
        *,
        start: datetime | None,
        end: datetime | None,
        after_sequence: int,
        limit: int,
    ) -> list[HistoryRow]:
        statement = (
            select(status_history)
            .where(status_history.c.device_id == device_id)
            .where(status_history.c.sequence > after_sequence)
            .order_by(status_history.c.sequence)
            .limit(limit)
        )
        if start is not None:
            statement = statement.where(status_history.c.at >= start)
        if end is not None:
            statement = statement.where(status_history.c.at < end)
        return [HistoryRow(**row._mapping) for row in await self.session.execute(statement)]

    async def history_points(
        self, device_ids: Sequence[str], start: datetime
    ) -> dict[str, list[tuple[datetime, str]]]:
        """Each device's transitions from `start` on, plus the one in force at `start`."""
        points: dict[str, list[tuple[datetime, str]]] = {d: [] for d in device_ids}
        h = status_history.c
        for chunk in _chunks(device_ids):
            latest_before = (
                select(h.device_id, func.max(h.sequence).label("sequence"))
                .where(h.device_id.in_(chunk))
                .where(h.at < start)
                .group_by(h.device_id)
                .subquery()
            )
            in_force = await self.session.execute(
                select(h.device_id, h.at, h.current).join(
                    latest_before,
                    and_(
                        latest_before.c.device_id == h.device_id,
                        latest_before.c.sequence == h.sequence,
                    ),
                )
            )
            for row in in_force:
                points[row.device_id].append((row.at, row.current))
            later = await self.session.execute(
                select(h.device_id, h.at, h.current)
                .where(h.device_id.in_(chunk))
                .where(h.at >= start)
                .order_by(h.device_id, h.sequence)
            )
            for row in later:
                points[row.device_id].append((row.at, row.current))
        return points

    async def quality(
        self, device_ids: Sequence[str], since_bucket: datetime
    ) -> dict[str, tuple[int, float]]:
        found: dict[str, tuple[int, float]] = {}
        for chunk in _chunks(device_ids):
            rows = await self.session.execute(
                select(
                    status_quality.c.device_id,
                    func.sum(status_quality.c.points).label("points"),
                    func.sum(status_quality.c.quality_sum).label("quality_sum"),
                )
                .where(status_quality.c.device_id.in_(chunk))
                .where(status_quality.c.bucket >= since_bucket)
                .group_by(status_quality.c.device_id)
            )
            for row in rows:
                found[row.device_id] = (int(row.points or 0), float(row.quality_sum or 0.0))
        return found

    async def checks(
        self, device_ids: Sequence[str], since: datetime, unanswered_before: datetime
    ) -> dict[str, CheckCounts]:
        """Answered and failed pings since `since`; a pending ping sent before
        `unanswered_before` (its reply time is over) counts as failed."""
        counts: dict[str, list[int]] = {}
        for chunk in _chunks(device_ids):
            rows = await self.session.execute(
                select(
                    status_health_checks.c.device_id,
                    status_health_checks.c.outcome,
                    status_health_checks.c.sent_at,
                )
                .where(status_health_checks.c.device_id.in_(chunk))
                .where(status_health_checks.c.sent_at >= since)
            )
            for row in rows:
                entry = counts.setdefault(row.device_id, [0, 0])
                if row.outcome == ANSWERED:
                    entry[0] += 1
                elif row.outcome == FAILED or row.sent_at < unanswered_before:
                    entry[1] += 1
        return {d: CheckCounts(a, f) for d, (a, f) in counts.items()}

    async def counts_by_status(self) -> dict[str, int]:
        rows = await self.session.execute(
            select(status_devices.c.status, func.count()).group_by(status_devices.c.status)
        )
        return {str(status): int(count) for status, count in rows}

    async def counts_by_type(self) -> dict[str, dict[str, int]]:
        rows = await self.session.execute(
            select(status_devices.c.type_name, status_devices.c.status, func.count()).group_by(
                status_devices.c.type_name, status_devices.c.status
            )
        )
        found: dict[str, dict[str, int]] = {}
        for type_name, status, count in rows:
            found.setdefault(type_name or "", {})[str(status)] = int(count)
        return found

    async def recent_changes(self, limit: int) -> list[HistoryRow]:
        rows = await self.session.execute(
            select(status_history)
            .where(status_history.c.sequence > 0)
            .order_by(status_history.c.at.desc(), status_history.c.device_id)
            .limit(limit)
        )
        return [HistoryRow(**row._mapping) for row in rows]

    async def health_candidates(self, *, offline: int, low_quality: int) -> list[str]:
        """Devices likely to have the lowest health: offline the longest, worst quality."""
        longest_offline = await self.session.execute(
            select(status_devices.c.device_id)
            .where(status_devices.c.status == DeviceState.OFFLINE.value)
            .order_by(status_devices.c.since)
            .limit(offline)
        )
        worst_quality = await self.session.execute(
            select(status_devices.c.device_id)
            .where(status_devices.c.status == DeviceState.ONLINE.value)
            .where(status_devices.c.quality_recent.is_not(None))
            .order_by(status_devices.c.quality_recent)
            .limit(low_quality)
        )
        ids = [row.device_id for row in longest_offline]
        ids += [row.device_id for row in worst_quality if row.device_id not in ids]
        return ids


def tracked_from_row(row: Any, default_timeout_s: float) -> TrackedDevice:
    timeout = resolve_timeout(row.timeout_override_s, row.type_timeout_s, default_timeout_s)
    status = DeviceStatus(
        device_id=row.device_id,
        status=row.status,
        since=row.since,
        last_update=row.last_update,
        offline_timeout_s=timeout,
        last_seen=row.last_seen,
        sequence=row.sequence,
        version=row.version,
    )
    tracked = TrackedDevice(
        status=status,
        type_name=row.type_name,
        cause=row.cause,
        registered_at=row.registered_at,
        timeout_override_s=row.timeout_override_s,
        type_timeout_s=row.type_timeout_s,
        expected_interval_s=row.expected_interval_s,
        mqtt_connected=bool(row.mqtt_connected),
        check_attempt=int(row.check_attempt),
        next_check_at=row.next_check_at,
        quality_recent=row.quality_recent,
        stored_version=int(row.version),
    )
    tracked.stored_row = _device_row(tracked)
    return tracked


def _device_row(tracked: TrackedDevice) -> dict[str, Any]:
    status = tracked.status
    return {
        "device_id": status.device_id,
        "type_name": tracked.type_name,
        "status": status.status.value,
        "cause": tracked.cause,
        "since": status.since,
        "last_update": status.last_update,
        "last_seen": status.last_seen,
        "sequence": status.sequence,
        "version": status.version,
        "timeout_override_s": tracked.timeout_override_s,
        "mqtt_connected": tracked.mqtt_connected,
        "check_attempt": tracked.check_attempt,
        "next_check_at": tracked.next_check_at,
        "quality_recent": tracked.quality_recent,
        "registered_at": tracked.registered_at,
    }


@dataclass(frozen=True, slots=True)
class _Writes:
    statement: DriverStatement
    rows: list[dict[str, Any]]
    many_values: bool = False
    """On PostgreSQL, one statement for many rows (SQLAlchemy's many-values insert), not
    one execution per row (the driver's executemany)."""


@dataclass(frozen=True, slots=True)
class _DeviceUpdates:
    """The versioned updates of the devices that changed, by the columns they changed."""

    changed: list[TrackedDevice]
    rows: list[dict[str, Any]]
    writes: list[_Writes]

    @classmethod
    def of(cls, devices: Sequence[TrackedDevice]) -> _DeviceUpdates:
        changed = [d for d in devices if d.changed]
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        rows: list[dict[str, Any]] = []
        for tracked in changed:
            if tracked.status.version == tracked.stored_version:
                tracked.status.version += 1  # every write moves the version
            row = _device_row(tracked)
            columns = _changed_columns(row, tracked.stored_row)
            params = {name: row[name] for name in columns}
            params["b_device_id"] = tracked.device_id
            params["b_version"] = tracked.stored_version
            groups.setdefault(columns, []).append(params)
            rows.append(row)
        writes = [_Writes(_versioned_update(columns), batch) for columns, batch in groups.items()]
        return cls(changed, rows, writes)

    def saved(self, counts: Sequence[int]) -> None:
        """Raise `ConcurrentUpdate` unless every row was written; else remember them."""
        if all(count >= 0 for count in counts) and sum(counts) != len(self.changed):
            missing = len(self.changed) - sum(counts)
            raise ConcurrentUpdate(f"{missing} status rows changed concurrently")
        for tracked, row in zip(self.changed, self.rows, strict=True):
            tracked.stored_version = tracked.status.version
            tracked.stored_row = row
            tracked.extra_changed = False


def _history_row(change: StatusChanged) -> dict[str, Any]:
    return {
        "device_id": change.device_id,
        "sequence": change.sequence,
        "at": change.at,
        "previous": change.previous.value,
        "current": change.current.value,
        "cause": change.cause.value,
        "detail": change.detail,
    }


def _quality_rows(samples: Sequence[QualitySample]) -> list[dict[str, Any]]:
    """One row per device and bucket (one statement matches each row once)."""
    merged: dict[tuple[str, datetime], list[float]] = {}
    for sample in samples:
        entry = merged.setdefault((sample.device_id, sample.bucket), [0, 0.0])
        entry[0] += sample.points
        entry[1] += sample.quality_sum
    return [
        {"device_id": d, "bucket": b, "points": int(p), "quality_sum": s}
        for (d, b), (p, s) in merged.items()
    ]


def _quality_upsert(insert_into: Any) -> DriverStatement:
    statement = insert_into(status_quality)
    statement = statement.on_conflict_do_update(
        index_elements=["device_id", "bucket"],
        set_={
            "points": status_quality.c.points + statement.excluded.points,
            "quality_sum": status_quality.c.quality_sum + statement.excluded.quality_sum,
        },
    )
    return DriverStatement(statement, ("device_id", "bucket", "points", "quality_sum"))


def _offset_upsert(insert_into: Any, greatest: Any) -> DriverStatement:
    statement = insert_into(status_offsets)
    statement = statement.on_conflict_do_update(
        index_elements=["name"],
        set_={"seq": greatest(status_offsets.c.seq, statement.excluded.seq)},
    )
    return DriverStatement(statement, ("name", "seq"))


_QUALITY_UPSERT = {
    "sqlite": _quality_upsert(sqlite.insert),
    "postgresql": _quality_upsert(postgresql.insert),
}
_OFFSET_UPSERT = {
    "sqlite": _offset_upsert(sqlite.insert, func.max),
    "postgresql": _offset_upsert(postgresql.insert, func.greatest),
}


@functools.lru_cache(maxsize=256)
def _versioned_update(columns: tuple[str, ...]) -> DriverStatement:
    """Set these columns of one status row, if its version is still the one loaded."""
    statement = (
        update(status_devices)
        .where(status_devices.c.device_id == bindparam("b_device_id"))
        .where(status_devices.c.version == bindparam("b_version"))
        .values({name: bindparam(name) for name in columns})
    )
    return DriverStatement(statement, (*columns, "b_device_id", "b_version"))


_HISTORY_INSERT = DriverStatement(
    insert(status_history), tuple(column.name for column in status_history.c)
)

_FIXED_COLUMNS = frozenset({"device_id", "registered_at"})
_UPDATABLE_COLUMNS = tuple(c.name for c in status_devices.c if c.name not in _FIXED_COLUMNS)


def _changed_columns(row: dict[str, Any], stored: dict[str, Any] | None) -> tuple[str, ...]:
    """The columns of `row` that differ from the stored row (all when it is unknown)."""
    if stored is None:
        return _UPDATABLE_COLUMNS
    return tuple([name for name in _UPDATABLE_COLUMNS if row[name] != stored[name]])


def _require_all_written(expected: int, written: int) -> None:
    """`ConcurrentUpdate` unless a versioned update changed every row it was given (a row
    not at its version is left alone); `written` -1 when the driver does not tell."""
    if 0 <= written != expected:
        raise ConcurrentUpdate(f"{expected - written} status rows changed concurrently")


def _chunks(items: Sequence[str], size: int = _CHUNK) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
