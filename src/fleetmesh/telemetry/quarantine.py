"""The telemetry quarantine: device messages that were refused, kept with why and when.

A message from a device that cannot be ingested as a whole (not JSON, too many
points, an unknown or deregistered device, a handler that kept failing), or
whose points were partly rejected, is kept here with its raw payload, the
reason, the time it was received and its `DEVICES_IN` stream sequence. Rows are
written once per message (`message_key` is unique), so a redelivered message
does not quarantine twice. Operators read them at
`GET /api/v1/devices/{id}/telemetry/rejections`; a device may read its own.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import RowMapping
from sqlalchemy.sql.dml import Insert

from fleetmesh.core.auth import DevicePrincipal, Operator, Role
from fleetmesh.core.clock import Clock, SystemClock
from fleetmesh.core.database import Database
from fleetmesh.core.errors import Forbidden
from fleetmesh.core.http import decode_cursor, encode_cursor, require_device_or_role
from fleetmesh.core.ids import new_id
from fleetmesh.core.sqltypes import UtcDateTime

MAX_STORED_PAYLOAD = 256 * 1024
"""Larger payloads are kept truncated (`payload_size` says how large they were)."""

metadata = MetaData()

telemetry_quarantine = Table(
    "telemetry_quarantine",
    metadata,
    Column("id", String(26), primary_key=True),
    Column("message_key", String(128), nullable=False, unique=True),
    Column("device_id", String(64), nullable=False),
    Column("source", String(32), nullable=False),
    Column("sequence", BigInteger, nullable=True),
    Column("reason", String(64), nullable=False),
    Column("detail", Text, nullable=False),
    Column("errors", JSON, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("payload_size", Integer, nullable=False),
    Column("received_at", UtcDateTime(), nullable=False),
    Column("quarantined_at", UtcDateTime(), nullable=False),
    Index("ix_telemetry_quarantine_device_id", "device_id", "id"),
)


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    """What to keep about a refused message."""

    message_key: str
    device_id: str
    source: str
    sequence: int | None
    reason: str
    detail: str
    payload: bytes
    received_at: datetime
    errors: Sequence[Mapping[str, Any]] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class QuarantineRecord:
    """A quarantined message as stored."""

    id: str
    device_id: str
    source: str
    sequence: int | None
    reason: str
    detail: str
    errors: list[dict[str, Any]]
    payload: bytes
    payload_size: int
    received_at: datetime
    quarantined_at: datetime


@dataclass(frozen=True, slots=True)
class QuarantinePage:
    items: list[QuarantineRecord]
    next_before: str | None


class QuarantineStore:
    """Writes and reads `telemetry_quarantine` (SQLite or PostgreSQL)."""

    def __init__(self, database: Database, *, clock: Clock | None = None) -> None:
        self.database = database
        self.clock = clock or SystemClock()

    async def add(self, entry: QuarantineEntry) -> str:
        """Keep a refused message; a second call for the same `message_key` changes nothing.

        Returns the id of the new row, or of the row already kept for that message.
        """
        row_id = new_id()
        values = {
            "id": row_id,
            "message_key": entry.message_key,
            "device_id": entry.device_id[:64],
            "source": entry.source[:32],
            "sequence": entry.sequence,
            "reason": entry.reason[:64],
            "detail": entry.detail,
            "errors": [dict(error) for error in entry.errors],
            "payload": entry.payload[:MAX_STORED_PAYLOAD],
            "payload_size": len(entry.payload),
            "received_at": entry.received_at,
            "quarantined_at": self.clock.now(),
        }
        async with self.database.writing(), self.database.session() as session:
            await session.execute(self._insert_once().values(values))
            kept = await session.scalar(
                select(telemetry_quarantine.c.id).where(
                    telemetry_quarantine.c.message_key == entry.message_key
                )
            )
            await session.commit()
        return str(kept or row_id)

    def _insert_once(self) -> Insert:
        if self.database.is_postgres:
            return postgresql.insert(telemetry_quarantine).on_conflict_do_nothing(
                index_elements=["message_key"]
            )
        return sqlite.insert(telemetry_quarantine).on_conflict_do_nothing(
            index_elements=["message_key"]
        )

    async def page(
        self, device_id: str, *, limit: int = 100, before: str | None = None
    ) -> QuarantinePage:
        """A device's quarantined messages, newest first."""
        query = select(telemetry_quarantine).where(telemetry_quarantine.c.device_id == device_id)
        if before is not None:
            query = query.where(telemetry_quarantine.c.id < before)
        query = query.order_by(telemetry_quarantine.c.id.desc()).limit(limit + 1)
        async with self.database.session() as session:
            rows = (await session.execute(query)).all()
        items = [_record(row._mapping) for row in rows[:limit]]
        next_before = items[-1].id if len(rows) > limit else None
        return QuarantinePage(items, next_before)


def _record(row: RowMapping) -> QuarantineRecord:
    return QuarantineRecord(
        id=row["id"],
        device_id=row["device_id"],
        source=row["source"],
        sequence=row["sequence"],
        reason=row["reason"],
        detail=row["detail"],
        errors=list(row["errors"] or []),
        payload=bytes(row["payload"]),
        payload_size=row["payload_size"],
        received_at=row["received_at"],
        quarantined_at=row["quarantined_at"],
    )


# --------------------------------------------------------------------------- HTTP


class RejectionOut(BaseModel):
    id: str
    device_id: str
    source: str = Field(description="`mqtt` (embedded listener) or `mqtt-bridge`")
    sequence: int | None = Field(description="The message's sequence in the DEVICES_IN stream")
    reason: str = Field(description="A stable code, e.g. `malformed-telemetry`, `points_rejected`")
    detail: str
    errors: list[dict[str, Any]]
    payload: str
    payload_encoding: str = Field(description="`utf-8`, or `base64` for binary payloads")
    payload_size: int
    payload_truncated: bool
    received_at: datetime
    quarantined_at: datetime

    @classmethod
    def of(cls, record: QuarantineRecord) -> RejectionOut:
        try:
            payload, encoding = record.payload.decode(), "utf-8"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(record.payload).decode(), "base64"
        return cls(
            id=record.id,
            device_id=record.device_id,
            source=record.source,
            sequence=record.sequence,
            reason=record.reason,
            detail=record.detail,
            errors=record.errors,
            payload=payload,
            payload_encoding=encoding,
            payload_size=record.payload_size,
            payload_truncated=record.payload_size > len(record.payload),
            received_at=record.received_at,
            quarantined_at=record.quarantined_at,
        )


class RejectionPage(BaseModel):
    items: list[RejectionOut]
    next_cursor: str | None


ViewerOrDevice = Annotated[Operator | DevicePrincipal, Depends(require_device_or_role(Role.viewer))]


def create_router(*, store: QuarantineStore) -> APIRouter:
    """`GET /api/v1/devices/{id}/telemetry/rejections`: viewers, or the device itself."""
    router = APIRouter(prefix="/api/v1", tags=["telemetry"])

    @router.get("/devices/{device_id}/telemetry/rejections")
    async def list_rejections(
        device_id: str,
        principal: ViewerOrDevice,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> RejectionPage:
        """Messages of this device that were refused, newest first."""
        if isinstance(principal, DevicePrincipal) and principal.device_id != device_id:
            raise Forbidden("A device can only read its own rejections.")
        position = decode_cursor(cursor) or {}
        before = position.get("before")
        page = await store.page(
            device_id, limit=limit, before=before if isinstance(before, str) else None
        )
        next_cursor = encode_cursor({"before": page.next_before}) if page.next_before else None
        return RejectionPage(
            items=[RejectionOut.of(record) for record in page.items], next_cursor=next_cursor
        )

    return router
