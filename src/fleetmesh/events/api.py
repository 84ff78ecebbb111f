"""HTTP API of the event bus: the event store, read back."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from fleetmesh.core.auth import Role
from fleetmesh.core.errors import NotFound
from fleetmesh.core.http import decode_cursor, encode_cursor, require_role
from fleetmesh.events.store import EventQuery, EventStore


class EventPageOut(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: str | None


def create_router(*, store: EventStore) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["events"])
    viewer = Depends(require_role(Role.viewer))

    @router.get("/events", dependencies=[viewer])
    async def list_events(
        type: Annotated[str | None, Query(max_length=255, description="type, `*` wildcard")] = None,
        subject: Annotated[str | None, Query(max_length=255)] = None,
        source: Annotated[str | None, Query(max_length=255)] = None,
        after: Annotated[int, Query(ge=0, description="stream sequence to read after")] = 0,
        from_: Annotated[datetime | None, Query(alias="from")] = None,
        to: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> EventPageOut:
        position = decode_cursor(cursor) or {}
        page = await store.query(
            EventQuery(
                type_pattern=type,
                subject=subject,
                source=source,
                after_sequence=int(position.get("after", after)),
                time_from=from_,
                time_to=to,
                limit=limit,
            )
        )
        return EventPageOut(
            items=[{**item.event, "sequence": item.sequence} for item in page.items],
            next_cursor=encode_cursor({"after": page.next_sequence})
            if page.next_sequence
            else None,
        )

    @router.get("/events/{event_id}", dependencies=[viewer])
    async def get_event(event_id: str) -> dict[str, Any]:
        event = await store.get(event_id)
        if event is None:
            raise NotFound(f"Event {event_id!r} is not in the store.")
        return event

    return router
