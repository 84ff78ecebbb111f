"""Use cases of the status context: the only place that commits.

Every write loads the devices' aggregates (locked on PostgreSQL), applies
reports through `DeviceStatus.apply`, writes the rows with a version check,
appends one history row per transition and emits
`fleetmesh.device.status_changed.v1` through the outbox in the same
transaction. Only after the commit are the in-memory timers (offline
deadlines, health-check times) moved to what was stored, so the store stays
the source of truth they can always be rebuilt from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.core.clock import Clock
from fleetmesh.core.database import Database
from fleetmesh.core.errors import Conflict, FieldError, NotFound, PreconditionFailed
from fleetmesh.core.ids import new_id
from fleetmesh.core.logging import get_logger
from fleetmesh.core.uow import SqlUnitOfWork
from fleetmesh.status import contracts
from fleetmesh.status.deadlines import next_check_delay
from fleetmesh.status.domain import (
    DeviceState,
    DeviceStatus,
    StatusCause,
    StatusChanged,
    StatusReport,
    seen_again,
    timed_out,
)
from fleetmesh.status.health import format_duration
from fleetmesh.status.options import StatusOptions
from fleetmesh.status.repository import (
    PENDING,
    ConcurrentUpdate,
    QualitySample,
    SqlStatusRepository,
    StatusReader,
    TrackedDevice,
    compile_window_statements,
    resolve_timeout,
)
from fleetmesh.status.set_writes import SeenRow

log = get_logger(__name__)

QUALITY_BUCKET = timedelta(hours=1)
QUALITY_SMOOTHING = 0.2
"""Weight of the newest window in `quality_recent` (an exponential moving average)."""


class StatusDeviceNotFound(NotFound):
    """The status context does not know this device (never registered, or not projected yet)."""


class DeviceDeregistered(Conflict):
    """A deregistered device's status is final."""


class StatusVersionMismatch(PreconditionFailed):
    """`If-Match` named another version than the current one."""


class Armed(NamedTuple):
    """An online device's offline deadline as stored, with what it was computed from: the
    row's version and the transition sequence (no MQTT connection was open), and the
    row's recent quality, so its telemetry can be written without reading the row."""

    deadline: datetime
    version: int
    sequence: int
    offline_timeout_s: float
    quality_recent: float | None


class Timers(Protocol):
    """Where the service reports each stored device, so deadlines follow the store."""

    def track(self, device: TrackedDevice) -> None:
        """Re-arm (or cancel) the device's offline deadline and health-check time."""

    def set_deadlines(
        self,
        device_id: str,
        deadline: datetime | None,
        next_check: datetime | None,
        armed: Armed | None = None,
    ) -> None:
        """Set both timers of a device directly (rebuild from the store)."""

    def armed(self, device_id: str, deadline: datetime) -> Armed | None:
        """The device's armed state, if this is the deadline it was armed with."""

    def armed_now(self, device_id: str) -> Armed | None:
        """The device's armed state, whatever its deadline."""


class StatusUnitOfWork(SqlUnitOfWork):
    repo: SqlStatusRepository

    def _open(self, session: AsyncSession) -> None:
        self.repo = SqlStatusRepository(session, self.database.engine.dialect.name)


@dataclass
class DeviceInput:
    """What one coalescing window holds for one device."""

    reports: list[StatusReport] = field(default_factory=list)
    first_telemetry: StatusReport | None = None
    last_telemetry: StatusReport | None = None
    mqtt_connected: bool | None = None
    quality: dict[datetime, list[float]] = field(default_factory=dict)
    """bucket -> [points, sum of quality scores]"""
    answers: list[tuple[str, datetime]] = field(default_factory=list)
    """Ping answers: (command id, received at)."""
    timeout_at: datetime | None = None
    """An offline deadline that fell due, kept as its time: most of a silent fleet's
    windows need no `StatusReport` of it (see `timeout_only`)."""

    def add(self, report: StatusReport) -> None:
        """Telemetry collapses to its earliest and latest report: the earliest makes the
        transition at the right time, the latest moves `last_seen`; the rest add nothing."""
        if report.cause is not StatusCause.TELEMETRY:
            self.reports.append(report)
            return
        if self.first_telemetry is None or report.observed_at < self.first_telemetry.observed_at:
            self.first_telemetry = report
        if self.last_telemetry is None or report.observed_at > self.last_telemetry.observed_at:
            self.last_telemetry = report

    def add_timeout(self, at: datetime) -> None:
        """The device's offline deadline `at` fell due."""
        if self.timeout_at is None:
            self.timeout_at = at
        else:
            self.reports.append(_timeout_report(at))

    def add_quality(self, at: datetime, points: int, mean: float) -> None:
        bucket = quality_bucket(at)
        entry = self.quality.setdefault(bucket, [0, 0.0])
        entry[0] += points
        entry[1] += points * mean

    def merge(self, newer: DeviceInput) -> None:
        """Take in input that arrived later for the same device."""
        self.reports += newer.reports
        for telemetry in (newer.first_telemetry, newer.last_telemetry):
            if telemetry is not None:
                self.add(telemetry)
        if newer.mqtt_connected is not None:
            self.mqtt_connected = newer.mqtt_connected
        for bucket, (points, total) in newer.quality.items():
            entry = self.quality.setdefault(bucket, [0, 0.0])
            entry[0] += points
            entry[1] += total
        self.answers += newer.answers
        if newer.timeout_at is not None:
            self.add_timeout(newer.timeout_at)

    def timeout_only(self) -> tuple[datetime, str] | None:
        """The inactivity timeout (its time and detail), if that is all this window holds
        for the device."""
        if self.first_telemetry or self.mqtt_connected is not None or self.quality:
            return None
        if self.answers:
            return None
        if self.timeout_at is not None:
            return None if self.reports else (self.timeout_at, "")
        if len(self.reports) != 1 or self.reports[0].cause is not StatusCause.TIMEOUT:
            return None
        return self.reports[0].observed_at, self.reports[0].detail

    def telemetry_only(self) -> tuple[datetime, datetime] | None:
        """When the earliest and the latest telemetry report were observed, if telemetry
        (with its quality) is all this window holds for the device."""
        first, last = self.first_telemetry, self.last_telemetry
        if first is None or last is None or self.reports or self.answers:
            return None
        if self.mqtt_connected is not None or self.timeout_at is not None:
            return None
        return first.observed_at, last.observed_at

    def ordered_reports(self) -> list[StatusReport]:
        reports = list(self.reports)
        if self.timeout_at is not None:
            reports.append(_timeout_report(self.timeout_at))
        for telemetry in (self.first_telemetry, self.last_telemetry):
            if telemetry is not None and telemetry not in reports:
                reports.append(telemetry)
        return sorted(reports, key=lambda r: r.observed_at)


def _quality_samples(device_id: str, item: DeviceInput) -> list[QualitySample]:
    return [
        QualitySample(device_id, bucket, int(points), total)
        for bucket, (points, total) in item.quality.items()
        if points > 0
    ]


def smoothed_quality(previous: float | None, samples: Iterable[QualitySample]) -> float | None:
    """The recent quality after these samples: an exponential moving average of the
    windows' mean quality, rounded to two places (unchanged without points)."""
    points = total = 0.0
    for sample in samples:
        points += sample.points
        total += sample.quality_sum
    if not points:
        return previous
    mean = total / points
    smoothed = (
        mean if previous is None else (1 - QUALITY_SMOOTHING) * previous + QUALITY_SMOOTHING * mean
    )
    return round(min(1.0, max(0.0, smoothed)), 2)


def _timeout_report(at: datetime) -> StatusReport:
    """The report of an offline deadline that fell due at `at`."""
    return StatusReport(DeviceState.OFFLINE, StatusCause.TIMEOUT, at)


@dataclass(frozen=True, slots=True)
class FlushResult:
    unknown: frozenset[str] = frozenset()
    """Devices the status context does not know (yet): their messages are retried."""
    failed: frozenset[str] = frozenset()
    """Devices whose input could not be written; their messages are retried."""
    changes: int = 0


@dataclass
class TimedOut:
    """Devices an inactivity timeout took offline, and when each is first checked."""

    changes: list[StatusChanged] = field(default_factory=list)
    next_checks: dict[str, datetime] = field(default_factory=dict)


@dataclass
class SeenAgain:
    """Online devices whose telemetry only moved `last_seen`: their rows, quality samples,
    and how each is armed once written."""

    rows: list[SeenRow] = field(default_factory=list)
    samples: list[QualitySample] = field(default_factory=list)
    armed: dict[str, Armed] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PingToSend:
    device_id: str
    command_id: str
    sent_at: datetime


def quality_bucket(at: datetime) -> datetime:
    moment = at.astimezone(UTC)
    return moment.replace(minute=0, second=0, microsecond=0)


class StatusService:
    """The write side of the status context."""

    def __init__(
        self,
        database: Database,
        *,
        clock: Clock,
        on_commit: Callable[[], None],
        options: StatusOptions,
        timers: Timers,
    ) -> None:
        self.database = database
        self.clock = clock
        self.on_commit = on_commit
        self.options = options
        self.timers = timers

    def prepare(self) -> None:
        """Compile the statements of a full window before the first one is written."""
        compile_window_statements(self.database.engine.dialect)

    def _uow(self) -> StatusUnitOfWork:
        return StatusUnitOfWork(self.database, on_commit=self.on_commit)

    # ------------------------------------------------------------------ liveness

    async def apply_inputs(
        self, inputs: dict[str, DeviceInput], *, offset: tuple[str, int] | None = None
    ) -> FlushResult:
        """Apply one window of automatic reports in one transaction."""
        try:
            return await self._apply_window(inputs, offset, short_ways=True)
        except ConcurrentUpdate:
            # An armed device's row changed in a write its timers did not see (another
            # process, an operator's call committing meanwhile): the general way reads
            # every device.
            return await self._apply_window(inputs, offset, short_ways=False)

    async def _apply_window(
        self,
        inputs: dict[str, DeviceInput],
        offset: tuple[str, int] | None,
        *,
        short_ways: bool,
    ) -> FlushResult:
        default_timeout = self.options.offline_timeout_s()
        policy_delay = self._first_check_delay()
        async with self._uow() as uow:
            silenced, seen = TimedOut(), SeenAgain()
            if short_ways:
                silenced = await self._time_out(uow, inputs, policy_delay)
                seen = self._seen_again(inputs)
            rest = {
                d: item
                for d, item in inputs.items()
                if d not in silenced.next_checks and d not in seen.armed
            }
            tracked = await uow.repo.load(rest, default_timeout_s=default_timeout)
            answers = [
                (device_id, command_id, at)
                for device_id, item in rest.items()
                if device_id in tracked
                for command_id, at in item.answers
            ]
            ours = await uow.repo.answer_checks(answers)
            changes: list[StatusChanged] = []
            samples: list[QualitySample] = []
            for device_id, item in rest.items():
                device = tracked.get(device_id)
                if device is None:
                    continue
                if item.mqtt_connected is not None and item.mqtt_connected != device.mqtt_connected:
                    device.mqtt_connected = item.mqtt_connected
                    device.extra_changed = True
                reports = item.ordered_reports()
                reports += [
                    StatusReport(
                        DeviceState.ONLINE,
                        StatusCause.HEALTH_CHECK,
                        at,
                        detail=f"answered ping {command_id}",
                    )
                    for command_id, at in item.answers
                    if (device_id, command_id) in ours
                ]
                reports.sort(key=lambda r: r.observed_at)
                changes += self._apply(device, reports, policy_delay)
                samples += self._record_quality(device, item)
            await uow.repo.save_window(
                list(tracked.values()), changes, samples + seen.samples, offset, seen.rows
            )
            _emit(uow, changes)
            await uow.commit()
        for device_id, next_check in silenced.next_checks.items():
            self.timers.set_deadlines(device_id, None, next_check)
        for device_id, armed in seen.armed.items():
            self.timers.set_deadlines(device_id, armed.deadline, None, armed)
        for device in tracked.values():
            self.timers.track(device)
        return FlushResult(
            unknown=frozenset(set(rest) - set(tracked)),
            changes=len(silenced.changes) + len(changes),
        )

    async def _time_out(
        self, uow: StatusUnitOfWork, inputs: dict[str, DeviceInput], first_check: timedelta
    ) -> TimedOut:
        """Inactivity timeouts of silent devices, without reading them: when a whole fleet
        falls silent, these are thousands a second. A timeout at the deadline a device was
        armed with after its last write (online, no MQTT connection open) is `timed_out`,
        written under the version it was armed at; any other goes the general way. Their
        events are emitted first in the window, encoded while the database writes the rows."""
        done = TimedOut()
        rows: list[tuple[StatusChanged, int, datetime]] = []
        for device_id, item in inputs.items():
            timeout = item.timeout_only()
            armed = None if timeout is None else self.timers.armed(device_id, timeout[0])
            if timeout is None or armed is None:
                continue
            detail = _timeout_detail(timeout[1], armed.offline_timeout_s)
            change = timed_out(device_id, armed.sequence, armed.deadline, detail)
            next_check = change.at + first_check
            done.changes.append(change)
            done.next_checks[device_id] = next_check
            rows.append((change, armed.version, next_check))
        writing = asyncio.ensure_future(uow.repo.save_timed_out(rows))
        try:
            await asyncio.sleep(0)  # the task runs up to the database's thread, then this goes on
            _emit(uow, done.changes)
        finally:
            await writing
        return done

    def _seen_again(self, inputs: dict[str, DeviceInput]) -> SeenAgain:
        """Telemetry of online devices, without reading them: a running fleet sends
        thousands of reports a second, and most only move `last_seen` (`seen_again`).
        Telemetry alone (with its quality) of a device armed after its last write, later
        than the sign of life its deadline counts from, is written under the version it
        was armed at; any other goes the general way."""
        seen = SeenAgain()
        for device_id, item in inputs.items():
            reported = item.telemetry_only()
            armed = None if reported is None else self.timers.armed_now(device_id)
            if reported is None or armed is None:
                continue
            deadline = seen_again(armed.deadline, armed.offline_timeout_s, *reported)
            if deadline is None:
                continue
            samples = _quality_samples(device_id, item)
            quality = smoothed_quality(armed.quality_recent, samples)
            moved = None if quality == armed.quality_recent else quality
            seen.rows.append(SeenRow(device_id, reported[1], armed.version, moved))
            seen.samples += samples
            seen.armed[device_id] = armed._replace(
                deadline=deadline, version=armed.version + 1, quality_recent=quality
            )
        return seen

    def _apply(
        self, device: TrackedDevice, reports: Iterable[StatusReport], first_check: timedelta
    ) -> list[StatusChanged]:
        changes: list[StatusChanged] = []
        for report in reports:
            change = device.status.apply(self._interpret(device, report))
            if change is not None:
                changes.append(change)
                device.cause = change.cause.value
        if changes:
            _reschedule_checks(device, changes, first_check)
        return changes

    @staticmethod
    def _interpret(device: TrackedDevice, report: StatusReport) -> StatusReport:
        """An open MQTT connection is itself a sign of life: the server's keepalive
        drops dead ones ("Read Error"), so the inactivity timeout of a connected
        device re-arms instead of taking it offline."""
        if report.cause is not StatusCause.TIMEOUT:
            return report
        if device.mqtt_connected:
            return StatusReport(
                DeviceState.ONLINE,
                StatusCause.MQTT_CONNECT,
                report.observed_at,
                detail="MQTT connection still open",
            )
        if report.detail:
            return report
        detail = _silence_detail(device.status.offline_timeout_s)
        return StatusReport(report.state, report.cause, report.observed_at, detail=detail)

    @staticmethod
    def _record_quality(device: TrackedDevice, item: DeviceInput) -> list[QualitySample]:
        samples = _quality_samples(device.device_id, item)
        smoothed = smoothed_quality(device.quality_recent, samples)
        if smoothed != device.quality_recent:
            device.quality_recent = smoothed
            device.extra_changed = True
        return samples

    def _first_check_delay(self) -> timedelta:
        return next_check_delay(0, self.options.backoff())

    async def quality_offset(self, name: str) -> int:
        async with self.database.session() as session:
            return await SqlStatusRepository(session, self.database.engine.dialect.name).get_offset(
                name
            )

    # ------------------------------------------------------------------ projection

    async def project(self, events: list[contracts.ProjectionEvent]) -> None:
        """Apply device registry events in order, in one transaction (idempotent)."""
        default_timeout = self.options.offline_timeout_s()
        first_check = self._first_check_delay()
        retimed: set[str] = set()
        device_ids = [e.device_id for e in events if not isinstance(e, contracts.TypeDefined)]
        async with self._uow() as uow:
            known = await uow.repo.load(device_ids, default_timeout_s=default_timeout)
            created: dict[str, TrackedDevice] = {}
            changes: list[StatusChanged] = []
            for event in events:
                if isinstance(event, contracts.TypeDefined):
                    if await uow.repo.upsert_type(
                        event.name, event.offline_timeout_s, event.expected_interval_s
                    ):
                        retimed.add(event.name)
                elif isinstance(event, contracts.Registered):
                    self._registered(event, known, created, default_timeout)
                else:
                    device = known.get(event.device_id) or created.get(event.device_id)
                    if device is None:
                        log.info("status_deregistered_unknown_device", device_id=event.device_id)
                        continue
                    report = StatusReport(
                        DeviceState.DEREGISTERED,
                        StatusCause.DEREGISTERED,
                        contracts.parse_time(event.deregistered_at),
                    )
                    changes += self._apply(device, [report], first_check)
            await uow.repo.insert_many(list(created.values()))
            await uow.repo.save_many(list(known.values()))
            await uow.repo.add_history(changes)
            _emit(uow, changes)
            await uow.commit()
        for device in [*known.values(), *created.values()]:
            self.timers.track(device)
        for type_name in sorted(retimed):
            await self.rebuild_timers(type_name=type_name)

    @staticmethod
    def _registered(
        event: contracts.Registered,
        known: dict[str, TrackedDevice],
        created: dict[str, TrackedDevice],
        default_timeout: float,
    ) -> None:
        existing = known.get(event.device_id) or created.get(event.device_id)
        if existing is not None:
            if (existing.type_name, existing.timeout_override_s) != (
                event.type,
                event.offline_timeout_s,
            ):
                existing.type_name = event.type
                existing.timeout_override_s = event.offline_timeout_s
                existing.extra_changed = True
            return
        at = contracts.parse_time(event.registered_at)
        status = DeviceStatus.register(
            event.device_id,
            at=at,
            offline_timeout_s=resolve_timeout(event.offline_timeout_s, None, default_timeout),
        )
        created[event.device_id] = TrackedDevice(
            status=status,
            type_name=event.type,
            cause=DeviceState.REGISTERED.value,
            registered_at=at,
            timeout_override_s=event.offline_timeout_s,
        )

    # ------------------------------------------------------------------ operators

    async def set_manual(
        self,
        device_id: str,
        state: DeviceState,
        *,
        reason: str = "",
        expected_version: int | None = None,
    ) -> TrackedDevice:
        """An operator sets online, offline or maintenance; returns the stored device."""
        async with self._uow() as uow:
            found = await uow.repo.load([device_id], default_timeout_s=self._default_timeout())
            device = found.get(device_id)
            if device is None:
                raise StatusDeviceNotFound(
                    f"Device {device_id!r} is not known to the status service."
                )
            if expected_version is not None and expected_version != device.status.version:
                raise StatusVersionMismatch(
                    f"The status is at version {device.status.version}, not {expected_version}.",
                    extra={"current_version": device.status.version},
                )
            if device.status.status is DeviceState.DEREGISTERED:
                raise DeviceDeregistered(
                    f"Device {device_id!r} is deregistered; its status can no longer change.",
                    errors=[FieldError("status", "device is deregistered", "deregistered")],
                )
            report = StatusReport(
                state, StatusCause.MANUAL, self.clock.now(), detail=reason or "set by an operator"
            )
            changes = self._apply(device, [report], self._first_check_delay())
            await uow.repo.save_many([device])
            await uow.repo.add_history(changes)
            _emit(uow, changes)
            await uow.commit()
        self.timers.track(device)
        return device

    # ------------------------------------------------------------------ health checks

    async def take_due_checks(self, due: list[tuple[str, datetime]]) -> list[PingToSend]:
        """Record a ping for each due offline device and schedule its next one (backoff)."""
        now = self.clock.now()
        policy = self.options.backoff()
        async with self._uow() as uow:
            found = await uow.repo.load(
                [device_id for device_id, _ in due], default_timeout_s=self._default_timeout()
            )
            pings: list[PingToSend] = []
            rows: list[dict[str, Any]] = []
            for device in found.values():
                if device.status.status is not DeviceState.OFFLINE or device.next_check_at is None:
                    continue
                if device.next_check_at > now + timedelta(milliseconds=50):
                    continue  # a stale timer; `track` below re-arms the stored time
                ping = PingToSend(device.device_id, new_id(), now)
                rows.append(
                    {
                        "command_id": ping.command_id,
                        "device_id": ping.device_id,
                        "attempt": device.check_attempt,
                        "sent_at": now,
                        "answered_at": None,
                        "outcome": PENDING,
                    }
                )
                device.check_attempt += 1
                device.next_check_at = now + next_check_delay(device.check_attempt, policy)
                device.extra_changed = True
                pings.append(ping)
            await uow.repo.fail_pending_checks([p.device_id for p in pings])
            await uow.repo.add_checks(rows)
            await uow.repo.save_many(list(found.values()))
            await uow.commit()
        for device in found.values():
            self.timers.track(device)
        return pings

    # ------------------------------------------------------------------ recovery

    async def rebuild_timers(
        self, *, type_name: str | None = None, default_only: bool = False
    ) -> int:
        """Arm deadlines and checks from the stored state (at start, or after a timeout
        change): online devices from `max(since, last_seen) + timeout`, offline ones at
        their stored `next_check_at`. Returns how many devices were armed."""
        default_timeout = self._default_timeout()
        async with self.database.session() as session:
            rows = await StatusReader(session).timer_rows(
                type_name=type_name, default_only=default_only
            )
        for row in rows:
            deadline: datetime | None = None
            next_check: datetime | None = None
            armed: Armed | None = None
            if row.status == DeviceState.ONLINE.value:
                timeout = resolve_timeout(
                    row.timeout_override_s, row.type_timeout_s, default_timeout
                )
                latest = row.since if row.last_seen is None else max(row.since, row.last_seen)
                deadline = latest + timedelta(seconds=timeout)
                if not row.mqtt_connected:
                    armed = Armed(deadline, row.version, row.sequence, timeout, row.quality_recent)
            else:
                next_check = row.next_check_at
            self.timers.set_deadlines(row.device_id, deadline, next_check, armed)
        return len(rows)

    async def mqtt_connected_ids(self) -> set[str]:
        async with self.database.session() as session:
            return await StatusReader(session).mqtt_connected_ids()

    def _default_timeout(self) -> float:
        return self.options.offline_timeout_s()


def _emit(uow: StatusUnitOfWork, changes: list[StatusChanged]) -> None:
    for change in changes:
        event_id, payload = contracts.encoded_status_changed(change)
        uow.emit_encoded(event_id, contracts.STATUS_CHANGED_SUBJECT, payload)


def _timeout_detail(detail: str, offline_timeout_s: float) -> str:
    """Why a timeout took the device offline: what its report says, else how long it was
    silent."""
    return detail or _silence_detail(offline_timeout_s)


@lru_cache(maxsize=256)
def _silence_detail(offline_timeout_s: float) -> str:
    return f"no sign of life for {format_duration(timedelta(seconds=offline_timeout_s))}"


def _reschedule_checks(
    device: TrackedDevice, changes: list[StatusChanged], first_check: timedelta
) -> None:
    """Offline (again): first ping after the backoff's initial delay; otherwise none."""
    if device.status.status is DeviceState.OFFLINE:
        if any(c.current is DeviceState.OFFLINE for c in changes):
            device.check_attempt = 0
            device.next_check_at = device.status.since + first_check
            device.extra_changed = True
    elif device.next_check_at is not None or device.check_attempt:
        device.check_attempt = 0
        device.next_check_at = None
        device.extra_changed = True
