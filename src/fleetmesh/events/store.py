"""The event store: reads the EVENTS stream back, by type, subject, source, time and sequence.

The stream is the store (no second copy): a query makes a short-lived
consumer filtered on the subjects of the requested types, starting at a
sequence or a time, and reads forward. Filters JetStream cannot apply
(CloudEvents `subject`, `source`, an end time) are applied while reading,
within a bounded scan, and the cursor says where to continue.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from fleetmesh.core.backbone import EVENTS_STREAM, Backbone
from fleetmesh.core.clock import from_rfc3339
from fleetmesh.events.filters import TypePattern, subject_filter

MAX_SCAN = 20_000
FETCH_BATCH = 500


@dataclass(frozen=True, slots=True)
class EventQuery:
    type_pattern: str | None = None
    subject: str | None = None
    source: str | None = None
    after_sequence: int = 0
    time_from: datetime | None = None
    time_to: datetime | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class StoredEvent:
    sequence: int
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class EventPage:
    items: list[StoredEvent]
    next_sequence: int | None


class EventStore:
    """Queries over the EVENTS stream."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    async def query(self, query: EventQuery) -> EventPage:
        pattern = TypePattern.parse(query.type_pattern) if query.type_pattern else None
        subjects = subject_filter(query.type_pattern) if query.type_pattern else "events.>"
        config = ConsumerConfig(
            filter_subject=subjects,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=5.0,
            **_start(query),
        )
        subscription = await self.backbone.js.pull_subscribe(
            subjects, stream=EVENTS_STREAM, config=config
        )
        try:
            return await self._read(subscription, query, pattern)
        finally:
            with contextlib.suppress(Exception):
                info = await subscription.consumer_info()
                await self.backbone.js.delete_consumer(EVENTS_STREAM, info.name)
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _read(
        self, subscription: Any, query: EventQuery, pattern: TypePattern | None
    ) -> EventPage:
        info = await subscription.consumer_info()
        pending = int(info.num_pending)
        items: list[StoredEvent] = []
        scanned = 0
        last_sequence = query.after_sequence
        while pending > 0 and scanned < MAX_SCAN and len(items) < query.limit:
            try:
                messages = await subscription.fetch(min(FETCH_BATCH, pending), timeout=2)
            except NatsTimeoutError:
                break
            for message in messages:
                scanned += 1
                pending = int(message.metadata.num_pending)
                last_sequence = int(message.metadata.sequence.stream)
                event = msgspec.json.decode(message.data)
                if _matches(event, query, pattern):
                    items.append(StoredEvent(last_sequence, event))
                    if len(items) >= query.limit:
                        break
                if query.time_to and _time(event) and _time(event) > query.time_to:  # type: ignore[operator]
                    pending = 0
                    break
        more = pending > 0 and (len(items) >= query.limit or scanned >= MAX_SCAN)
        return EventPage(items, last_sequence if more else None)

    async def get(self, event_id: str) -> dict[str, Any] | None:
        """One event by id (scans; ids are ULIDs, so this is for single lookups)."""
        after = 0
        while True:
            page = await self.query(EventQuery(after_sequence=after, limit=FETCH_BATCH))
            for item in page.items:
                if item.event.get("id") == event_id:
                    return item.event
            if page.next_sequence is None:
                return None
            after = page.next_sequence

    async def last_sequence(self) -> int:
        try:
            info = await self.backbone.js.stream_info(EVENTS_STREAM)
        except NotFoundError:
            return 0
        return int(info.state.last_seq)


def _start(query: EventQuery) -> dict[str, Any]:
    if query.after_sequence:
        return {
            "deliver_policy": DeliverPolicy.BY_START_SEQUENCE,
            "opt_start_seq": query.after_sequence + 1,
        }
    if query.time_from:
        return {
            "deliver_policy": DeliverPolicy.BY_START_TIME,
            "opt_start_time": query.time_from.isoformat(),
        }
    return {"deliver_policy": DeliverPolicy.ALL}


def _time(event: dict[str, Any]) -> datetime | None:
    raw = event.get("time")
    return from_rfc3339(raw) if isinstance(raw, str) else None


def _matches(event: dict[str, Any], query: EventQuery, pattern: TypePattern | None) -> bool:
    if pattern is not None and not pattern.matches(str(event.get("type", ""))):
        return False
    if query.subject is not None and event.get("subject") != query.subject:
        return False
    if query.source is not None and event.get("source") != query.source:
        return False
    moment = _time(event)
    if query.time_from and moment and moment < query.time_from:
        return False
    return not (query.time_to and moment and moment > query.time_to)
