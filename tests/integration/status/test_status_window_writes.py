"""One window mixing telemetry, timeouts and flags, written column-wise, reads back whole."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.bootstrap import Platform
from fleetmesh.core.clock import to_rfc3339
from fleetmesh.core.envelope import subject_for_type
from fleetmesh.core.tables import outbox
from fleetmesh.status import contracts
from fleetmesh.status.domain import DeviceState, StatusCause, StatusReport, timed_out
from fleetmesh.status.repository import (
    ConcurrentUpdate,
    SqlStatusRepository,
    StatusReader,
    TrackedDevice,
    status_devices,
)
from fleetmesh.status.service import DeviceInput, StatusService

pytestmark = pytest.mark.integration

TIMEOUT_S = 3600.0


def _input(report: StatusReport, *, mqtt_connected: bool | None = None) -> DeviceInput:
    item = DeviceInput()
    item.add(report)
    item.mqtt_connected = mqtt_connected
    if report.cause is StatusCause.TELEMETRY:
        item.add_quality(report.observed_at, 1, 0.5)
    return item


async def _stored(platform: Platform, device_ids: list[str]) -> dict[str, TrackedDevice]:
    async with platform.database.session() as session:
        found = await StatusReader(session).get_many(device_ids, default_timeout_s=TIMEOUT_S)
    return {d.device_id: d for d in found}


async def test_a_mixed_window_stores_every_changed_column_and_one_event_per_change(
    platform: Platform,
) -> None:
    service = platform.provided("status_service")
    assert isinstance(service, StatusService)
    devices = ["chatty", "silent", "flagged"]
    now = service.clock.now()
    await service.project([contracts.TypeDefined("window-type", TIMEOUT_S)])
    await service.project(
        [contracts.Registered(d, to_rfc3339(now), "window-type") for d in devices]
    )
    online = StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, now + timedelta(seconds=1))
    await service.apply_inputs({d: _input(online) for d in devices})

    later = now + timedelta(seconds=5)
    overdue = now + timedelta(seconds=1 + TIMEOUT_S)
    result = await service.apply_inputs(
        {
            "chatty": _input(StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, later)),
            "silent": _input(StatusReport(DeviceState.OFFLINE, StatusCause.TIMEOUT, overdue)),
            "flagged": _input(
                StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, later), mqtt_connected=True
            ),
        }
    )

    assert result.changes == 1
    stored = await _stored(platform, devices)
    chatty, silent, flagged = stored["chatty"], stored["silent"], stored["flagged"]
    assert (chatty.status.status, chatty.status.last_seen) == (DeviceState.ONLINE, later)
    assert chatty.status.since == online.observed_at and chatty.status.sequence == 1
    assert chatty.type_name == "window-type" and chatty.quality_recent is not None
    assert (silent.status.status, silent.status.since, silent.cause) == (
        DeviceState.OFFLINE,
        overdue,
        StatusCause.TIMEOUT.value,
    )
    assert silent.status.sequence == 2 and silent.next_check_at is not None
    assert flagged.mqtt_connected and flagged.status.last_seen == later
    assert [d.status.version for d in (chatty, silent, flagged)] == [
        d.stored_version for d in (chatty, silent, flagged)
    ]
    async with platform.database.session() as session:
        subjects = (await session.execute(select(outbox.c.subject))).scalars().all()
    status_events = [s for s in subjects if s == subject_for_type(contracts.STATUS_CHANGED)]
    assert len(status_events) == 4  # three online, one offline; telemetry alone emits none


async def test_a_row_changed_since_it_was_loaded_is_not_overwritten(platform: Platform) -> None:
    service = platform.provided("status_service")
    assert isinstance(service, StatusService)
    now = service.clock.now()
    await service.project([contracts.Registered("raced", to_rfc3339(now), None)])
    dialect = platform.database.engine.dialect.name
    async with platform.database.session() as session:
        repo = SqlStatusRepository(session, dialect)
        stale = (await repo.load(["raced"], default_timeout_s=TIMEOUT_S))["raced"]
    seen = now + timedelta(seconds=1)
    await service.apply_inputs(
        {"raced": _input(StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, seen))}
    )
    stale.mqtt_connected = True
    stale.extra_changed = True
    async with platform.database.session() as session:
        with pytest.raises(ConcurrentUpdate):
            await SqlStatusRepository(session, dialect).save_many([stale])
        await session.rollback()
    stored = (await _stored(platform, ["raced"]))["raced"]
    assert stored.status.status is DeviceState.ONLINE and not stored.mqtt_connected


async def test_timeouts_take_only_silent_devices_offline(platform: Platform) -> None:
    service = platform.provided("status_service")
    assert isinstance(service, StatusService)
    devices = ["quiet", "connected", "revived", "gone"]
    now = service.clock.now()
    await service.project([contracts.TypeDefined("silence-type", TIMEOUT_S)])
    await service.project(
        [contracts.Registered(d, to_rfc3339(now), "silence-type") for d in devices]
    )
    seen = now + timedelta(seconds=1)
    await service.apply_inputs(
        {
            d: _input(
                StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, seen),
                mqtt_connected=d == "connected",
            )
            for d in devices
        }
    )
    revived_at = seen + timedelta(seconds=60)
    await service.apply_inputs(
        {"revived": _input(StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, revived_at))}
    )
    await service.set_manual("gone", DeviceState.OFFLINE, reason="unplugged")

    due = seen + timedelta(seconds=TIMEOUT_S)
    timeout = StatusReport(DeviceState.OFFLINE, StatusCause.TIMEOUT, due)
    result = await service.apply_inputs({d: _input(timeout) for d in [*devices, "ghost"]})

    assert (result.changes, result.unknown) == (1, frozenset({"ghost"}))
    stored = await _stored(platform, devices)
    quiet = stored["quiet"]
    assert (quiet.status.status, quiet.status.since, quiet.cause) == (
        DeviceState.OFFLINE,
        due,
        StatusCause.TIMEOUT.value,
    )
    assert quiet.status.sequence == 2 and quiet.check_attempt == 0
    assert quiet.next_check_at == due + service._first_check_delay()
    assert service.timers.checks.get("quiet") == quiet.next_check_at  # type: ignore[attr-defined]
    assert "quiet" not in service.timers.offline  # type: ignore[attr-defined]
    connected = stored["connected"]
    assert connected.status.status is DeviceState.ONLINE and connected.status.last_seen == due
    assert stored["revived"].status.status is DeviceState.ONLINE
    assert stored["revived"].status.sequence == 1
    assert (stored["gone"].status.status, stored["gone"].status.sequence) == (
        DeviceState.OFFLINE,
        2,
    )
    async with platform.database.session() as session:
        history = await StatusReader(session).history(
            "quiet", start=None, end=None, after_sequence=0, limit=10
        )
    assert [(h.sequence, h.current, h.cause) for h in history][-1] == (2, "offline", "timeout")
    assert history[-1].detail == "no sign of life for 1h"


async def _armed_online(platform: Platform, device_id: str) -> tuple[StatusService, datetime]:
    """A device registered and seen once, and the deadline its timers were armed with."""
    service = platform.provided("status_service")
    assert isinstance(service, StatusService)
    now = service.clock.now()
    await service.project([contracts.Registered(device_id, to_rfc3339(now), None)])
    seen = now + timedelta(seconds=1)
    online = StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, seen)
    await service.apply_inputs({device_id: _input(online)})
    return service, seen + timedelta(seconds=service.options.offline_timeout_s())


async def test_a_timeout_armed_before_a_write_it_did_not_see_goes_the_general_way(
    platform: Platform,
) -> None:
    service, due = await _armed_online(platform, "raced-silence")
    armed = service.timers.armed("raced-silence", due)
    assert armed is not None and armed.sequence == 1
    async with platform.database.session() as session:  # another writer opens a connection
        await session.execute(
            update(status_devices)
            .where(status_devices.c.device_id == "raced-silence")
            .values(mqtt_connected=True, version=status_devices.c.version + 1)
        )
        await session.commit()
    async with platform.database.session() as session:
        change = timed_out("raced-silence", armed.sequence, due, "silent")
        with pytest.raises(ConcurrentUpdate):
            await SqlStatusRepository(
                session, platform.database.engine.dialect.name
            ).save_timed_out([(change, armed.version, due)])
        await session.rollback()

    timeout = StatusReport(DeviceState.OFFLINE, StatusCause.TIMEOUT, due)
    result = await service.apply_inputs({"raced-silence": _input(timeout)})

    stored = (await _stored(platform, ["raced-silence"]))["raced-silence"]
    assert result.changes == 0  # its open connection keeps it online
    assert stored.status.status is DeviceState.ONLINE and stored.status.last_seen == due


async def test_timers_rebuilt_from_the_store_arm_the_short_way(platform: Platform) -> None:
    service, due = await _armed_online(platform, "rebuilt")
    armed = service.timers.armed("rebuilt", due)
    assert armed is not None
    service.timers.set_deadlines("rebuilt", None, None)  # forgotten, as after a restart

    await service.rebuild_timers()

    assert service.timers.armed("rebuilt", due) == armed


async def _rows(session: AsyncSession, devices: list[str]) -> dict[str, dict[str, Any]]:
    """The stored status rows of these devices, by id."""
    found = await session.execute(
        select(status_devices).where(status_devices.c.device_id.in_(devices))
    )
    return {row.device_id: row._asdict() for row in found}


async def _online_twins(
    platform: Platform, type_name: str, devices: list[str]
) -> tuple[StatusService, datetime]:
    """Devices of a type registered and seen once (at an odd microsecond), and when."""
    service = platform.provided("status_service")
    assert isinstance(service, StatusService)
    now = service.clock.now()
    await service.project([contracts.TypeDefined(type_name, TIMEOUT_S)])
    await service.project([contracts.Registered(d, to_rfc3339(now), type_name) for d in devices])
    seen = now + timedelta(seconds=1, microseconds=123_457)
    await service.apply_inputs(
        {d: _input(StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, seen)) for d in devices}
    )
    return service, seen


async def test_a_timeout_written_set_based_stores_what_the_general_way_stores(
    platform: Platform,
) -> None:
    devices = ["short-way", "general-way"]
    service, seen = await _online_twins(platform, "twin-type", devices)
    due = seen + timedelta(seconds=TIMEOUT_S)
    timeout = StatusReport(DeviceState.OFFLINE, StatusCause.TIMEOUT, due)

    short = await service._apply_window({"short-way": _input(timeout)}, None, short_ways=True)
    general = await service._apply_window({"general-way": _input(timeout)}, None, short_ways=False)

    assert short.changes == general.changes == 1
    async with platform.database.session() as session:
        rows = await _rows(session, devices)
        reader = StatusReader(session)
        histories = [
            await reader.history(d, start=None, end=None, after_sequence=0, limit=10)
            for d in devices
        ]
    short_row, general_row = (rows[d] | {"device_id": None} for d in devices)
    assert short_row == general_row
    assert short_row["status"] == "offline" and short_row["since"] == due
    short_history, general_history = (
        [(h.sequence, h.at, h.previous, h.current, h.cause, h.detail) for h in history]
        for history in histories
    )
    assert short_history == general_history
    assert short_history[-1] == (2, due, "online", "offline", "timeout", "no sign of life for 1h")


async def test_timeouts_of_different_lengths_in_one_window_keep_their_own_detail(
    platform: Platform,
) -> None:
    service = platform.provided("status_service")
    assert isinstance(service, StatusService)
    now = service.clock.now()
    kinds = {"hourly": 3600.0, "minutely": 60.0}
    for name, timeout_s in kinds.items():
        await service.project([contracts.TypeDefined(name, timeout_s)])
        await service.project([contracts.Registered(f"{name}-device", to_rfc3339(now), name)])
    seen = now + timedelta(seconds=1)
    online = StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, seen)
    await service.apply_inputs({f"{name}-device": _input(online) for name in kinds})

    result = await service.apply_inputs(
        {
            f"{name}-device": _input(
                StatusReport(
                    DeviceState.OFFLINE, StatusCause.TIMEOUT, seen + timedelta(seconds=timeout_s)
                )
            )
            for name, timeout_s in kinds.items()
        }
    )

    assert result.changes == 2
    async with platform.database.session() as session:
        reader = StatusReader(session)
        last = {
            name: (
                await reader.history(
                    f"{name}-device", start=None, end=None, after_sequence=0, limit=10
                )
            )[-1]
            for name in kinds
        }
    assert {name: (h.current, h.at, h.detail) for name, h in last.items()} == {
        "hourly": ("offline", seen + timedelta(hours=1), "no sign of life for 1h"),
        "minutely": ("offline", seen + timedelta(minutes=1), "no sign of life for 1m"),
    }


async def test_telemetry_written_set_based_stores_what_the_general_way_stores(
    platform: Platform,
) -> None:
    devices = ["short-seen", "general-seen"]
    service, first = await _online_twins(platform, "seen-type", devices)
    later = first + timedelta(seconds=30, microseconds=5)

    def again() -> DeviceInput:
        item = DeviceInput()
        for moment in (later - timedelta(seconds=2), later):
            item.add(StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, moment))
            item.add_quality(moment, 4, 0.25)
        return item

    armed_before = service.timers.armed_now("short-seen")  # type: ignore[attr-defined]
    short = await service._apply_window({"short-seen": again()}, None, short_ways=True)
    general = await service._apply_window({"general-seen": again()}, None, short_ways=False)

    assert short.changes == general.changes == 0
    async with platform.database.session() as session:
        rows = await _rows(session, devices)
        quality = await StatusReader(session).quality(devices, first - timedelta(hours=2))
    short_row, general_row = (rows[d] | {"device_id": None, "version": None} for d in devices)
    assert short_row == general_row
    assert short_row["last_seen"] == later and short_row["quality_recent"] == 0.45
    assert rows["short-seen"]["version"] == armed_before.version + 1
    assert quality["short-seen"] == quality["general-seen"]
    deadline = later + timedelta(seconds=TIMEOUT_S)
    armed = service.timers.armed("short-seen", deadline)
    assert armed == armed_before._replace(
        deadline=deadline, version=armed_before.version + 1, quality_recent=0.45
    )
    assert service.timers.offline.get("short-seen") == deadline  # type: ignore[attr-defined]


async def test_telemetry_raced_by_a_write_it_did_not_see_goes_the_general_way(
    platform: Platform,
) -> None:
    service, due = await _armed_online(platform, "raced-seen")
    armed = service.timers.armed_now("raced-seen")  # type: ignore[attr-defined]
    assert armed is not None and armed.deadline == due
    async with platform.database.session() as session:  # an operator's call elsewhere
        await session.execute(
            update(status_devices)
            .where(status_devices.c.device_id == "raced-seen")
            .values(status=DeviceState.MAINTENANCE.value, version=status_devices.c.version + 1)
        )
        await session.commit()
    later = due - timedelta(seconds=10)
    telemetry = StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, later)

    result = await service.apply_inputs({"raced-seen": _input(telemetry)})

    stored = (await _stored(platform, ["raced-seen"]))["raced-seen"]
    assert result.changes == 0 and result.failed == frozenset()
    assert stored.status.status is DeviceState.MAINTENANCE and stored.status.last_seen == later
    assert stored.status.version == armed.version + 2  # the operator's write, then this one
    assert service.timers.armed_now("raced-seen") is None  # type: ignore[attr-defined]


async def test_telemetry_older_than_the_last_sign_of_life_goes_the_general_way(
    platform: Platform,
) -> None:
    service, due = await _armed_online(platform, "late-seen")
    armed = service.timers.armed_now("late-seen")  # type: ignore[attr-defined]
    assert armed is not None
    seen_at = due - timedelta(seconds=service.options.offline_timeout_s())
    late = StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, seen_at - timedelta(seconds=1))

    await service.apply_inputs({"late-seen": _input(late)})

    stored = (await _stored(platform, ["late-seen"]))["late-seen"]
    assert stored.status.last_seen == seen_at  # never moved back
    assert service.timers.armed("late-seen", due) is not None
