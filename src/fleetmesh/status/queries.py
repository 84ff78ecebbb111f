"""Read side of the status context: device views, history, the fleet summary.

A device view computes availability and the health score from the stored
history, quality sums and health checks of the requested window (a handful of
indexed queries per device). The fleet summary uses SQL aggregates for its
counts and computes the exact health score only for a small candidate set
chosen by SQL (offline the longest, worst recent telemetry quality): the
devices that can have the lowest scores. Its cost does not grow with the
fleet beyond the aggregates themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from fleetmesh.core.clock import Clock
from fleetmesh.core.database import Database
from fleetmesh.status.domain import DeviceState
from fleetmesh.status.health import (
    Attempts,
    DataQuality,
    HealthInputs,
    HealthScore,
    health_score,
)
from fleetmesh.status.options import StatusOptions
from fleetmesh.status.repository import CheckCounts, HistoryRow, StatusReader, TrackedDevice
from fleetmesh.status.service import StatusDeviceNotFound, quality_bucket
from fleetmesh.status.uptime import Availability, StatusPoint, availability

LOWEST_CANDIDATES_OFFLINE = 25
LOWEST_CANDIDATES_QUALITY = 15


@dataclass(frozen=True, slots=True)
class StatusView:
    device: TrackedDevice
    now: datetime
    window: timedelta
    availability: Availability
    health: HealthScore
    checks: CheckCounts

    @property
    def uptime(self) -> timedelta:
        """How long the device has been online without a break (0 unless online)."""
        status = self.device.status
        if status.status is not DeviceState.ONLINE:
            return timedelta(0)
        return max(self.now - status.since, timedelta(0))


@dataclass(frozen=True, slots=True)
class FleetSummary:
    now: datetime
    total: int
    by_status: dict[str, int]
    by_type: dict[str, dict[str, int]]
    lowest_health: list[StatusView] = field(default_factory=list)
    recently_changed: list[HistoryRow] = field(default_factory=list)


class StatusQueries:
    def __init__(self, database: Database, *, clock: Clock, options: StatusOptions) -> None:
        self.database = database
        self.clock = clock
        self.options = options

    async def view(self, device_id: str, window: timedelta) -> StatusView:
        views = await self.views([device_id], window)
        if not views:
            raise StatusDeviceNotFound(f"Device {device_id!r} is not known to the status service.")
        return views[0]

    async def views(self, device_ids: Sequence[str], window: timedelta) -> list[StatusView]:
        now = self.clock.now()
        start = now - window
        unanswered_before = now - self.options.reply_timeout()
        async with self.database.session() as session:
            reader = StatusReader(session)
            devices = await reader.get_many(
                list(device_ids), default_timeout_s=self.options.offline_timeout_s()
            )
            ids = [d.device_id for d in devices]
            points = await reader.history_points(ids, start)
            quality = await reader.quality(ids, quality_bucket(start))
            checks = await reader.checks(ids, start, unanswered_before)
        views = []
        for device in devices:
            device_checks = checks.get(device.device_id, CheckCounts())
            history: list[StatusPoint] = [
                (at, DeviceState(state)) for at, state in points[device.device_id]
            ]
            device_availability = availability(history, now, window)
            points_count, quality_sum = quality.get(device.device_id, (0, 0.0))
            data_quality = (
                DataQuality(min(1.0, max(0.0, quality_sum / points_count)), points_count)
                if points_count
                else None
            )
            interval = device.expected_interval_s
            inputs = HealthInputs(
                now=now,
                availability=device_availability,
                last_seen=device.status.last_seen,
                expected_interval=timedelta(seconds=interval) if interval else None,
                data_quality=data_quality,
                health_checks=Attempts(
                    failed=device_checks.failed,
                    total=device_checks.failed + device_checks.answered,
                ),
            )
            views.append(
                StatusView(
                    device=device,
                    now=now,
                    window=window,
                    availability=device_availability,
                    health=health_score(inputs),
                    checks=device_checks,
                )
            )
        order = {device_id: i for i, device_id in enumerate(device_ids)}
        views.sort(key=lambda v: order[v.device.device_id])
        return views

    async def history(
        self,
        device_id: str,
        *,
        start: datetime | None,
        end: datetime | None,
        after_sequence: int,
        limit: int,
    ) -> list[HistoryRow]:
        async with self.database.session() as session:
            reader = StatusReader(session)
            rows = await reader.history(
                device_id, start=start, end=end, after_sequence=after_sequence, limit=limit
            )
            if not rows and not await reader.get_many(
                [device_id], default_timeout_s=self.options.offline_timeout_s()
            ):
                raise StatusDeviceNotFound(
                    f"Device {device_id!r} is not known to the status service."
                )
        return rows

    async def fleet(self, *, window: timedelta, lowest: int, recent: int) -> FleetSummary:
        async with self.database.session() as session:
            reader = StatusReader(session)
            by_status = await reader.counts_by_status()
            by_type = await reader.counts_by_type()
            recently_changed = await reader.recent_changes(recent)
            candidates = await reader.health_candidates(
                offline=max(lowest, LOWEST_CANDIDATES_OFFLINE),
                low_quality=max(lowest, LOWEST_CANDIDATES_QUALITY),
            )
        views = await self.views(candidates, window) if lowest and candidates else []
        scored = [v for v in views if v.health.score is not None]
        scored.sort(key=lambda v: (v.health.score, v.device.device_id))
        return FleetSummary(
            now=self.clock.now(),
            total=sum(by_status.values()),
            by_status=by_status,
            by_type=by_type,
            lowest_health=scored[:lowest],
            recently_changed=recently_changed,
        )
