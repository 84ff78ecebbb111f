"""HTTP API of device status; request and response schemas live here, at the edge."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from fleetmesh.core.auth import Role
from fleetmesh.core.errors import FieldError, InvalidInput
from fleetmesh.core.http import decode_cursor, encode_cursor, require_role
from fleetmesh.status.domain import DeviceState
from fleetmesh.status.health import HealthComponent, format_duration
from fleetmesh.status.queries import FleetSummary, StatusQueries, StatusView
from fleetmesh.status.repository import HistoryRow
from fleetmesh.status.service import StatusService

Strict = ConfigDict(extra="forbid")
MAX_WINDOW = timedelta(days=366)
_WINDOW = re.compile(r"(\d+)([wdhms])")
_UNITS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}


def parse_window(text: str) -> timedelta:
    """`24h`, `7d`, `1h30m`, `90s`, `2w`: a positive duration of at most 366 days."""
    compact = text.strip().lower()
    parts = _WINDOW.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise InvalidInput(
            f"window {text!r} is not a duration like 24h, 7d, 1h30m or 90s.",
            errors=[FieldError("window", "expected a duration like 24h, 7d, 1h30m", "invalid")],
        )
    window = timedelta(seconds=sum(int(n) * _UNITS[u] for n, u in parts))
    if not timedelta(0) < window <= MAX_WINDOW:
        raise InvalidInput(
            f"window must be positive and at most 366d, got {text!r}.",
            errors=[FieldError("window", "must be in (0, 366d]", "out_of_range")],
        )
    return window


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _if_match(value: str | None) -> int | None:
    if value is None or value.strip() == "*":
        return None
    text = value.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise InvalidInput(
            "If-Match must be the ETag of the status (its version).",
            errors=[FieldError("If-Match", 'expected a version ETag like "3"', "invalid")],
        )
    return int(text)


class ComponentOut(BaseModel):
    name: str
    score: float | None
    weight: float
    included: bool
    reason: str

    @classmethod
    def of(cls, component: HealthComponent) -> ComponentOut:
        return cls(
            name=component.name,
            score=None if component.score is None else round(component.score, 1),
            weight=component.weight,
            included=component.included,
            reason=component.reason,
        )


class HealthOut(BaseModel):
    score: float | None = Field(description="0-100; null when there is not enough data")
    components: list[ComponentOut]
    reasons: list[str] = Field(description="What pulls the score down, worst first")


class AvailabilityOut(BaseModel):
    window: str
    start: datetime
    end: datetime
    percent: float | None = Field(description="online / (online + offline); null if neither")
    online_s: float
    offline_s: float
    maintenance_s: float
    excluded_s: float


class HealthChecksOut(BaseModel):
    answered: int
    failed: int
    attempt: int = Field(description="Pings sent since the device went offline")
    next_at: datetime | None


class StatusOut(BaseModel):
    device_id: str
    type: str | None
    status: DeviceState
    cause: str = Field(description="Cause of the last transition")
    since: datetime
    last_update: datetime
    last_seen: datetime | None
    sequence: int
    version: int
    offline_timeout_s: float
    offline_deadline: datetime | None
    mqtt_connected: bool
    uptime_s: float = Field(description="Seconds online without a break (0 unless online)")
    availability: AvailabilityOut
    health: HealthOut
    health_checks: HealthChecksOut

    @classmethod
    def of(cls, view: StatusView) -> StatusOut:
        device = view.device
        status = device.status
        window = view.availability
        return cls(
            device_id=device.device_id,
            type=device.type_name,
            status=status.status,
            cause=device.cause,
            since=status.since,
            last_update=status.last_update,
            last_seen=status.last_seen,
            sequence=status.sequence,
            version=status.version,
            offline_timeout_s=status.offline_timeout_s,
            offline_deadline=status.deadline(),
            mqtt_connected=device.mqtt_connected,
            uptime_s=view.uptime.total_seconds(),
            availability=AvailabilityOut(
                window=format_duration(view.window),
                start=window.start,
                end=window.end,
                percent=None if window.percent is None else round(window.percent, 3),
                online_s=window.online.total_seconds(),
                offline_s=window.offline.total_seconds(),
                maintenance_s=window.maintenance.total_seconds(),
                excluded_s=window.excluded.total_seconds(),
            ),
            health=HealthOut(
                score=view.health.score,
                components=[ComponentOut.of(c) for c in view.health.components],
                reasons=view.health.reasons,
            ),
            health_checks=HealthChecksOut(
                answered=view.checks.answered,
                failed=view.checks.failed,
                attempt=device.check_attempt,
                next_at=device.next_check_at,
            ),
        )


class StatusIn(BaseModel):
    model_config = Strict
    status: Literal["online", "offline", "maintenance"]
    reason: str = Field(default="", max_length=500)


class HistoryItem(BaseModel):
    device_id: str
    sequence: int
    at: datetime
    previous: str | None
    current: str
    cause: str
    detail: str

    @classmethod
    def of(cls, row: HistoryRow) -> HistoryItem:
        return cls(
            device_id=row.device_id,
            sequence=row.sequence,
            at=row.at,
            previous=row.previous,
            current=row.current,
            cause=row.cause,
            detail=row.detail,
        )


class HistoryPage(BaseModel):
    items: list[HistoryItem]
    next_cursor: str | None


class LowHealthOut(BaseModel):
    device_id: str
    type: str | None
    status: DeviceState
    score: float | None
    reasons: list[str]


class FleetOut(BaseModel):
    at: datetime
    total: int
    by_status: dict[str, int]
    by_type: dict[str, dict[str, int]]
    lowest_health: list[LowHealthOut]
    recently_changed: list[HistoryItem]

    @classmethod
    def of(cls, fleet: FleetSummary) -> FleetOut:
        return cls(
            at=fleet.now,
            total=fleet.total,
            by_status={state.value: fleet.by_status.get(state.value, 0) for state in DeviceState},
            by_type=fleet.by_type,
            lowest_health=[
                LowHealthOut(
                    device_id=v.device.device_id,
                    type=v.device.type_name,
                    status=v.device.status.status,
                    score=v.health.score,
                    reasons=v.health.reasons,
                )
                for v in fleet.lowest_health
            ],
            recently_changed=[HistoryItem.of(row) for row in fleet.recently_changed],
        )


def create_router(*, service: StatusService, queries: StatusQueries) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["status"])
    viewer = Depends(require_role(Role.viewer))
    operator = Depends(require_role(Role.operator))

    @router.get("/devices/{device_id}/status", dependencies=[viewer])
    async def get_status(
        device_id: str, response: Response, window: Annotated[str, Query(max_length=32)] = "24h"
    ) -> StatusOut:
        view = await queries.view(device_id, parse_window(window))
        response.headers["ETag"] = f'"{view.device.status.version}"'
        return StatusOut.of(view)

    @router.put("/devices/{device_id}/status", dependencies=[operator])
    async def put_status(
        device_id: str,
        body: StatusIn,
        response: Response,
        if_match: Annotated[str | None, Header()] = None,
    ) -> StatusOut:
        await service.set_manual(
            device_id,
            DeviceState(body.status),
            reason=body.reason,
            expected_version=_if_match(if_match),
        )
        view = await queries.view(device_id, timedelta(hours=24))
        response.headers["ETag"] = f'"{view.device.status.version}"'
        return StatusOut.of(view)

    @router.get("/devices/{device_id}/status/history", dependencies=[viewer])
    async def get_history(
        device_id: str,
        start: Annotated[datetime | None, Query(alias="from")] = None,
        end: Annotated[datetime | None, Query(alias="to")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> HistoryPage:
        start, end = _aware(start), _aware(end)
        if start is not None and end is not None and end <= start:
            raise InvalidInput(
                "`to` must be after `from`.",
                errors=[FieldError("to", "must be after from", "invalid_range")],
            )
        position = decode_cursor(cursor) or {}
        after = position.get("after", -1)
        if not isinstance(after, int):
            raise InvalidInput(
                "The cursor is not one this API issued.",
                errors=[FieldError("cursor", "invalid cursor")],
            )
        rows = await queries.history(
            device_id, start=start, end=end, after_sequence=after, limit=limit + 1
        )
        page = rows[:limit]
        next_cursor = encode_cursor({"after": page[-1].sequence}) if len(rows) > limit else None
        return HistoryPage(items=[HistoryItem.of(r) for r in page], next_cursor=next_cursor)

    @router.get("/fleet/status", dependencies=[viewer])
    async def get_fleet_status(
        window: Annotated[str, Query(max_length=32)] = "24h",
        lowest: Annotated[int, Query(ge=0, le=100)] = 10,
        recent: Annotated[int, Query(ge=0, le=100)] = 20,
    ) -> FleetOut:
        fleet = await queries.fleet(window=parse_window(window), lowest=lowest, recent=recent)
        return FleetOut.of(fleet)

    return router
