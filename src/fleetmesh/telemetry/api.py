"""HTTP API of the telemetry context; request and response shapes live here, at the edge.

``POST /api/v1/devices/{id}/telemetry`` reads the body raw (the domain decodes it with
msgspec; pydantic is not on the hot path) and answers with one result per item:

* 202 Accepted: every item accepted (durable in the TELEMETRY stream);
* 207 Multi-Status: some accepted, some rejected;
* 422 (problem+json): none accepted; the per-item results are in the problem's ``items``.

``?wait=stored`` answers only once the points are queryable (``"stored": true``), or after
10 s with ``"stored": false`` (still durable, just not written yet).

Retries: a client that sends ``Idempotency-Key: <a ULID made for the batch>`` may resend the
same body with the same key after a 502/503, a timeout or a lost connection; the points are
stored once, and every answer carries the same ``message_id`` and point ids.

Times in queries are RFC 3339 or epoch milliseconds; in answers, RFC 3339 with milliseconds.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal

import msgspec
from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from fleetmesh.core.auth import DevicePrincipal, Operator, Role
from fleetmesh.core.clock import Clock
from fleetmesh.core.errors import FieldError, Forbidden, InvalidInput
from fleetmesh.core.http import (
    PROBLEM_JSON,
    decode_cursor,
    encode_cursor,
    require_device_or_role,
    require_role,
)
from fleetmesh.telemetry.contracts import ms_to_rfc3339
from fleetmesh.telemetry.domain import DAY_MS, HOUR_MS, MINUTE_MS, SECOND_MS, QualityReason
from fleetmesh.telemetry.ingest import (
    Ingestor,
    IngestReport,
    IngestSettings,
    message_id_for_client_key,
)
from fleetmesh.telemetry.projection import DeviceDirectory, TypeProfile
from fleetmesh.telemetry.reads import PointQuery
from fleetmesh.telemetry.service import (
    AGGREGATES,
    TelemetryQueries,
    UnitOfWorkFactory,
    set_retention,
    set_transforms,
)
from fleetmesh.telemetry.tables import Value

MAX_POINTS_PAGE: Final = 10_000
MAX_BUCKETS: Final = 10_000
DEFAULT_AGG_WINDOW_MS: Final = DAY_MS
_UNITS_MS: Final = {"ms": 1, "s": SECOND_MS, "m": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS}
_INTERVAL: Final = re.compile(r"^(\d{1,9})(ms|s|m|h|d)$")
_SPACE_OFFSET: Final = re.compile(r" (\d{2}:\d{2})$")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ENCODER: Final = msgspec.json.Encoder()

DeviceId = Annotated[str, Path(max_length=64)]
Writer = Annotated[Operator | DevicePrincipal, Depends(require_device_or_role(Role.operator))]
Reader = Annotated[Operator | DevicePrincipal, Depends(require_device_or_role(Role.viewer))]


# --------------------------------------------------------------------------- POST telemetry


class AcceptedItem(msgspec.Struct, gc=False):
    index: int
    id: str
    quality: float
    quality_reasons: tuple[QualityReason, ...]
    status: str = "accepted"


class RejectedItem(msgspec.Struct, gc=False):
    index: int
    field: str
    reason: str
    message: str
    status: str = "rejected"


def render_report(report: IngestReport) -> tuple[int, dict[str, Any]]:
    """The status code and body of an ingest answer."""
    prefix = f"{report.message_id}:"
    items: list[AcceptedItem | RejectedItem] = [
        AcceptedItem(a.index, f"{prefix}{a.index}", a.quality, a.quality_reasons)
        for a in report.accepted
    ]
    if report.rejected:
        items.extend(
            RejectedItem(r.index, r.field, str(r.reason), r.message) for r in report.rejected
        )
        items.sort(key=lambda item: item.index)
    body: dict[str, Any] = {
        "message_id": report.message_id if report.published else None,
        "accepted": len(report.accepted),
        "rejected": len(report.rejected),
        "stored": report.stored,
        "items": items,
    }
    if not report.accepted:
        return 422, {
            "type": "https://fleetmesh.dev/problems/telemetry-rejected",
            "title": "No point accepted",
            "status": 422,
            "detail": f"All {len(report.rejected)} items were rejected; see items.",
            **body,
        }
    return (207 if report.rejected else 202), body


_POST_OPENAPI: Final[dict[str, Any]] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "description": (
                        "A point {metric, value, ts?, unit?}, a list of points, "
                        '{"points": [...]}, or the compact form {"ts": ..., "values": '
                        "{metric: value}} (or a list of those). ts: RFC 3339 or epoch ms."
                    ),
                    "oneOf": [{"type": "object"}, {"type": "array", "items": {"type": "object"}}],
                }
            }
        },
    },
    "responses": {
        "202": {"description": "Every item accepted"},
        "207": {"description": "Some items accepted, some rejected"},
        "422": {"description": "No item accepted (problem+json with per-item results)"},
    },
}


# --------------------------------------------------------------------------- schemas


class RetentionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    days: float | None = Field(default=None, description="Raw points are kept this many days.")
    rollup_days: float | None = Field(
        default=None, description="Hourly roll-ups of expired points are kept this many days."
    )


class RetentionOut(BaseModel):
    device_type: str
    days: float | None
    rollup_days: float | None
    effective_days: float


class TransformsOut(BaseModel):
    device_type: str
    transforms: list[dict[str, Any]]


# --------------------------------------------------------------------------- parsing


def parse_time(value: str | None, field: str) -> int | None:
    """Epoch milliseconds from RFC 3339 or an integer of epoch milliseconds."""
    if value is None or value == "":
        return None
    text = value.strip()
    if re.fullmatch(r"-?\d{1,16}", text):
        return int(text)
    text = _SPACE_OFFSET.sub(r"+\1", text)  # an unencoded "+" in a query string is a space
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            f"{field} must be RFC 3339 or epoch milliseconds.",
            errors=[FieldError(field, f"cannot read {value!r} as a time", "invalid_time")],
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def parse_interval(value: str) -> int:
    match = _INTERVAL.match(value.strip())
    if match is None or int(match.group(1)) == 0:
        raise InvalidInput(
            "interval must be a positive number with a unit: ms, s, m, h or d (e.g. 1m).",
            errors=[FieldError("interval", f"cannot read {value!r}", "invalid_interval")],
        )
    return int(match.group(1)) * _UNITS_MS[match.group(2)]


def _typed(value: Value, metric_type: str | None) -> Value:
    if metric_type == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _own_device(principal: Operator | DevicePrincipal, device_id: str) -> None:
    if isinstance(principal, DevicePrincipal) and principal.device_id != device_id:
        raise Forbidden("A device may only send or read its own telemetry.")


# --------------------------------------------------------------------------- router


def create_router(
    *,
    ingestor: Ingestor,
    queries: TelemetryQueries,
    directory: DeviceDirectory,
    uow_factory: UnitOfWorkFactory,
    settings: IngestSettings,
    clock: Clock,
) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["telemetry"])
    operator = Depends(require_role(Role.operator))
    viewer = Depends(require_role(Role.viewer))

    def now_ms() -> int:
        return (clock.now() - _EPOCH) // timedelta(milliseconds=1)

    @router.post(
        "/devices/{device_id}/telemetry",
        status_code=202,
        openapi_extra=_POST_OPENAPI,
        response_class=Response,
    )
    async def post_telemetry(
        device_id: DeviceId,
        request: Request,
        principal: Writer,
        wait: Literal["stored"] | None = None,
        idempotency_key: Annotated[str | None, Header(max_length=64)] = None,
    ) -> Response:
        """Ingest one point or a batch; per-item results (202 / 207 / 422)."""
        _own_device(principal, device_id)
        raw = await request.body()
        msg_id = None
        if idempotency_key is not None:
            msg_id = message_id_for_client_key(device_id, idempotency_key, raw)
        report = await ingestor.ingest(
            device_id, raw, source="http", wait_stored=wait == "stored", msg_id=msg_id
        )
        status, body = render_report(report)
        media_type = PROBLEM_JSON if status == 422 else "application/json"
        return Response(_ENCODER.encode(body), status_code=status, media_type=media_type)

    @router.get("/devices/{device_id}/telemetry")
    async def get_telemetry(
        device_id: DeviceId,
        principal: Reader,
        metric: Annotated[str | None, Query(max_length=128)] = None,
        from_: Annotated[str | None, Query(alias="from")] = None,
        to: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_POINTS_PAGE)] = 1000,
        cursor: str | None = None,
        agg: str | None = None,
        interval: str | None = None,
    ) -> Response:
        """Raw points (paginated), or downsampled buckets with ``agg`` and ``interval``."""
        _own_device(principal, device_id)
        _, profile = await directory.require_device(
            device_id, wait_s=settings.projection_wait_s, active=False
        )
        from_ms, to_ms = parse_time(from_, "from"), parse_time(to, "to")
        if from_ms is not None and to_ms is not None and from_ms >= to_ms:
            raise InvalidInput(
                "from must be before to.", errors=[FieldError("from", "not before to", "range")]
            )
        if agg is not None or interval is not None:
            body = await _aggregate(device_id, profile, metric, agg, interval, from_ms, to_ms)
        else:
            body = await _points(device_id, profile, metric, from_ms, to_ms, limit, cursor)
        return Response(_ENCODER.encode(body), media_type="application/json")

    async def _aggregate(
        device_id: str,
        profile: TypeProfile,
        metric: str | None,
        agg: str | None,
        interval: str | None,
        from_ms: int | None,
        to_ms: int | None,
    ) -> dict[str, Any]:
        if agg is None or agg not in AGGREGATES:
            raise InvalidInput(
                f"agg must be one of {', '.join(AGGREGATES)}.",
                errors=[FieldError("agg", f"unknown aggregate {agg!r}", "unknown")],
            )
        if not metric:
            raise InvalidInput(
                "An aggregated query needs a metric.",
                errors=[FieldError("metric", "required with agg", "missing")],
            )
        interval_text = interval or "1m"
        interval_ms = parse_interval(interval_text)
        metric_type = await queries.metric_type(device_id, profile, metric)
        end = to_ms if to_ms is not None else now_ms() + HOUR_MS
        start = from_ms if from_ms is not None else end - DEFAULT_AGG_WINDOW_MS
        if (end - start) // interval_ms > MAX_BUCKETS:
            raise InvalidInput(
                f"At most {MAX_BUCKETS} buckets per query; use a longer interval.",
                errors=[FieldError("interval", "too many buckets for the range", "too_many")],
            )
        buckets = await queries.aggregate(
            device_id,
            metric,
            agg=agg,
            interval_ms=interval_ms,
            from_ms=start,
            to_ms=end,
            metric_type=metric_type,
        )
        return {
            "metric": metric,
            "agg": agg,
            "interval": interval_text,
            "from": ms_to_rfc3339(start),
            "to": ms_to_rfc3339(end),
            "buckets": [
                {"start": ms_to_rfc3339(b.start), "value": b.value, "count": b.count}
                for b in buckets
            ],
        }

    async def _points(
        device_id: str,
        profile: TypeProfile,
        metric: str | None,
        from_ms: int | None,
        to_ms: int | None,
        limit: int,
        cursor: str | None,
    ) -> dict[str, Any]:
        if metric:
            await queries.metric_type(device_id, profile, metric)
        position = decode_cursor(cursor)
        after = None
        if position is not None:
            try:
                after = (int(position["ts"]), str(position["m"]), str(position["id"]))
            except (KeyError, TypeError, ValueError):
                raise InvalidInput(
                    "The cursor is not one this API issued.",
                    errors=[FieldError("cursor", "invalid cursor")],
                ) from None
        rows = await queries.points(
            PointQuery(device_id, metric or None, from_ms, to_ms, limit + 1, after)
        )
        page = rows[:limit]
        next_cursor = None
        if len(rows) > limit:
            last = page[-1]
            next_cursor = encode_cursor({"ts": last.ts, "m": last.metric, "id": last.message_id})
        return {
            "items": [
                {
                    "ts": ms_to_rfc3339(row.ts),
                    "metric": row.metric,
                    "value": _typed(row.value, profile.metric_type(row.metric)),
                    "quality": row.quality,
                }
                for row in page
            ],
            "next_cursor": next_cursor,
        }

    @router.get("/devices/{device_id}/telemetry/latest")
    async def get_latest(
        device_id: DeviceId,
        principal: Reader,
    ) -> Response:
        """The newest value of every metric of the device."""
        _own_device(principal, device_id)
        _, profile = await directory.require_device(
            device_id, wait_s=settings.projection_wait_s, active=False
        )
        rows = await queries.latest(device_id)
        body = {
            "device_id": device_id,
            "metrics": {
                row.metric: {
                    "ts": ms_to_rfc3339(row.ts),
                    "value": _typed(row.value, profile.metric_type(row.metric)),
                    "quality": row.quality,
                }
                for row in rows
            },
        }
        return Response(_ENCODER.encode(body), media_type="application/json")

    @router.put("/device-types/{name}/transforms", dependencies=[operator])
    async def put_transforms(
        name: Annotated[str, Path(max_length=63)],
        body: Annotated[Any, Body(description="A list of transform objects.")],
    ) -> TransformsOut:
        """Replace the device type's transforms (rename, scale, unit, derive)."""
        transforms = body.get("transforms") if isinstance(body, dict) else body
        profile = await set_transforms(
            name,
            transforms,
            uow=uow_factory(),
            directory=directory,
            wait_s=settings.projection_wait_s,
        )
        return TransformsOut(device_type=name, transforms=profile.transforms_raw)

    @router.get("/device-types/{name}/transforms", dependencies=[viewer])
    async def get_transforms(name: Annotated[str, Path(max_length=63)]) -> TransformsOut:
        profile = await directory.require_type(name, wait_s=settings.projection_wait_s)
        return TransformsOut(device_type=name, transforms=profile.transforms_raw)

    def retention_out(profile: TypeProfile) -> RetentionOut:
        default = settings.live_config.get("telemetry", "retention_days", 30)
        return RetentionOut(
            device_type=profile.name,
            days=profile.retention_days,
            rollup_days=profile.rollup_days,
            effective_days=float(profile.retention_days or default),
        )

    @router.put("/device-types/{name}/retention", dependencies=[operator])
    async def put_retention(
        name: Annotated[str, Path(max_length=63)], body: RetentionIn
    ) -> RetentionOut:
        """How long raw points (and hourly roll-ups) of this type are kept."""
        profile = await set_retention(
            name,
            body.days,
            body.rollup_days,
            uow=uow_factory(),
            directory=directory,
            wait_s=settings.projection_wait_s,
        )
        return retention_out(profile)

    @router.get("/device-types/{name}/retention", dependencies=[viewer])
    async def get_retention(name: Annotated[str, Path(max_length=63)]) -> RetentionOut:
        return retention_out(await directory.require_type(name, wait_s=settings.projection_wait_s))

    return router
