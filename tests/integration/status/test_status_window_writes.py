"""One window mixing telemetry, timeouts and flags, written column-wise, reads back whole."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from fleetmesh.bootstrap import Platform
from fleetmesh.core.clock import to_rfc3339
from fleetmesh.core.envelope import subject_for_type
from fleetmesh.core.tables import outbox
from fleetmesh.status import contracts
from fleetmesh.status.domain import DeviceState, StatusCause, StatusReport
from fleetmesh.status.repository import (
    ConcurrentUpdate,
    SqlStatusRepository,
    StatusReader,
    TrackedDevice,
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
