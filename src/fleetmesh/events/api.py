"""HTTP API of the event bus: the event store, publishing, contracts, subscriptions.

Request and response schemas live here, at the edge. `GET /asyncapi.json`
(the AsyncAPI 3.0 document of every contract) needs no key, like
`/openapi.json`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleetmesh.core.auth import Operator, Role
from fleetmesh.core.clock import Clock
from fleetmesh.core.errors import FieldError, InvalidInput, NotFound
from fleetmesh.core.http import decode_cursor, encode_cursor, require_role
from fleetmesh.events.asyncapi import ServerInfo, build_asyncapi
from fleetmesh.events.domain import CompatibilityMode, RetryPolicy
from fleetmesh.events.guard import HostGuard
from fleetmesh.events.publishing import EventPublisher, Published, is_batch
from fleetmesh.events.repository import ContractRecord, DeadLetter, DeliveryRecord
from fleetmesh.events.service import (
    ContractCache,
    CreateSubscription,
    EventBusQueries,
    RegisterContract,
    UnitOfWorkFactory,
    create_subscription,
    delete_subscription,
    register_contract,
    set_subscription_status,
)
from fleetmesh.events.store import EventQuery, EventStore
from fleetmesh.events.subscription import (
    DeliveryOptions,
    Subscription,
    SubscriptionStatus,
    retry_policy_dict,
)
from fleetmesh.events.supervisor import Replay, Supervisor

Strict = ConfigDict(extra="forbid")
MAX_WAIT_S = 30.0
_DURATION = re.compile(r"(?P<amount>\d+(?:\.\d+)?)(?P<unit>ms|s)?")


class EventPageOut(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: str | None


class ContractIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: str = Field(min_length=1, max_length=255, description="the event type")
    json_schema: dict[str, Any] | bool = Field(alias="schema")
    version: int | None = Field(default=None, ge=1, description="default: latest + 1")
    description: str = Field(default="", max_length=2000)
    compatibility: CompatibilityMode | None = Field(
        default=None, description="default: the mode of the latest version, else BACKWARD"
    )
    publisher: str | None = Field(default=None, max_length=200)


class ContractOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    type: str
    version: int
    json_schema: dict[str, Any] | bool = Field(serialization_alias="schema")
    publisher: str
    description: str
    compatibility: CompatibilityMode
    builtin: bool
    created_at: datetime

    @classmethod
    def of(cls, record: ContractRecord) -> ContractOut:
        contract = record.contract
        schema = contract.schema if isinstance(contract.schema, bool) else dict(contract.schema)
        return cls(
            type=contract.event_type,
            version=contract.version,
            json_schema=schema,
            publisher=contract.publisher,
            description=contract.description,
            compatibility=contract.compatibility,
            builtin=record.builtin,
            created_at=record.created_at,
        )


class ContractPage(BaseModel):
    items: list[ContractOut]
    next_cursor: str | None


class RetryIn(BaseModel):
    model_config = Strict
    max_attempts: int = Field(default=8, ge=1, le=100)
    base_delay: float = Field(default=1.0, ge=0, le=3600)
    max_delay: float = Field(default=300.0, ge=0, le=86_400)
    multiplier: float = Field(default=2.0, ge=1, le=10)


class DeliveryIn(BaseModel):
    model_config = Strict
    timeout_s: float = Field(default=10.0, gt=0, le=60)
    retry: RetryIn | None = Field(default=None, description="null: the live default policy")
    ordered: bool = Field(default=False, description="one at a time, in stream order")
    batch_size: int = Field(default=1, ge=1, le=500)
    max_in_flight: int = Field(default=8, ge=1, le=256)

    def to_domain(self) -> DeliveryOptions:
        retry = RetryPolicy(**self.retry.model_dump()) if self.retry else None
        return DeliveryOptions(
            timeout_s=self.timeout_s,
            retry=retry,
            ordered=self.ordered,
            batch_size=self.batch_size,
            max_in_flight=self.max_in_flight,
        )


class SubscriptionIn(BaseModel):
    model_config = Strict
    endpoint: str = Field(max_length=2048, description="http(s) URL or nats:<subject>")
    types: list[str] = Field(default_factory=list, max_length=50, description="[] = every type")
    filters: list[Any] = Field(default_factory=list, max_length=50)
    name: str | None = Field(default=None, max_length=200)
    secret: str | None = Field(default=None, max_length=200, description="whsec_<base64>")
    delivery: DeliveryIn = Field(default_factory=DeliveryIn)


class SubscriptionOut(BaseModel):
    id: str
    name: str | None
    endpoint: str
    types: list[str]
    filters: list[Any]
    delivery: dict[str, Any]
    status: SubscriptionStatus
    created_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def of(cls, subscription: Subscription) -> SubscriptionOut:
        options = subscription.options
        return cls(
            id=subscription.id,
            name=subscription.name,
            endpoint=subscription.endpoint.url,
            types=list(subscription.types),
            filters=subscription.filters,
            delivery={
                "timeout_s": options.timeout_s,
                "retry": retry_policy_dict(options.retry) if options.retry else None,
                "ordered": options.ordered,
                "batch_size": options.batch_size,
                "max_in_flight": options.max_in_flight,
            },
            status=subscription.status,
            created_at=subscription.created_at,
            updated_at=subscription.updated_at,
        )


class CreatedSubscription(SubscriptionOut):
    secret: str = Field(description="Shown once: verify the webhook-signature header with it.")


class SubscriptionPage(BaseModel):
    items: list[SubscriptionOut]
    next_cursor: str | None


class DeliveryOut(BaseModel):
    id: int | None
    event_id: str
    event_type: str
    sequence: int
    attempt: int
    status: str
    http_status: int | None
    latency_ms: float | None
    error: str | None
    time: datetime

    @classmethod
    def of(cls, record: DeliveryRecord) -> DeliveryOut:
        return cls(
            id=record.id,
            event_id=record.event_id,
            event_type=record.event_type,
            sequence=record.sequence,
            attempt=record.attempt,
            status=record.status,
            http_status=record.http_status,
            latency_ms=record.latency_ms,
            error=record.error,
            time=record.created_at,
        )


class DeliveryStats(BaseModel):
    success_rate: float | None = Field(description="delivered / all attempts that ended")
    delivered: int
    failed: int = Field(description="failed attempts (retried or dead-lettered)")
    dead_lettered: int
    pending: int = Field(description="events handed out and not yet settled (incl. retries)")
    lag: int = Field(description="stored events not yet handed out")


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None
    stats: DeliveryStats


class DeadLetterOut(BaseModel):
    id: str
    subscription_id: str
    event_id: str
    event_type: str
    sequence: int
    last_status: int | None
    error: str
    attempts: int
    status: str
    time: datetime
    resolved_at: datetime | None

    @classmethod
    def of(cls, letter: DeadLetter) -> DeadLetterOut:
        return cls(
            id=letter.id,
            subscription_id=letter.subscription_id,
            event_id=letter.event_id,
            event_type=letter.event_type,
            sequence=letter.sequence,
            last_status=letter.last_status,
            error=letter.error,
            attempts=letter.attempts,
            status=letter.status,
            time=letter.created_at,
            resolved_at=letter.resolved_at,
        )


class DeadLetterPage(BaseModel):
    items: list[DeadLetterOut]
    next_cursor: str | None


class ReplayIn(BaseModel):
    model_config = Strict
    from_sequence: int | None = Field(default=None, ge=1)
    from_time: datetime | None = None

    @model_validator(mode="after")
    def one_start(self) -> ReplayIn:
        if (self.from_sequence is None) == (self.from_time is None):
            raise ValueError("give exactly one of from_sequence and from_time")
        if self.from_time is not None and self.from_time.tzinfo is None:
            raise ValueError("from_time needs a UTC offset")
        return self


class ReplayOut(BaseModel):
    replay_id: str
    subscription_id: str
    from_sequence: int | None
    from_time: datetime | None
    to_sequence: int
    status: str

    @classmethod
    def of(cls, replay: Replay) -> ReplayOut:
        return cls(
            replay_id=replay.id,
            subscription_id=replay.subscription_id,
            from_sequence=replay.from_sequence,
            from_time=replay.from_time,
            to_sequence=replay.to_sequence,
            status=replay.status,
        )


def parse_wait(ack: str | None, timeout: str | None) -> float | None:
    """Seconds to wait for deliveries (`?ack=delivered&timeout=5s`), or None."""
    if ack is None or ack == "stored":
        if timeout is not None and ack is None:
            raise InvalidInput(
                "timeout needs ack=delivered.",
                errors=[FieldError("timeout", "only with ack=delivered")],
            )
        return None
    if ack != "delivered":
        raise InvalidInput(
            "ack is 'stored' (default) or 'delivered'.",
            errors=[FieldError("ack", "must be stored or delivered", "enum")],
        )
    match = _DURATION.fullmatch(timeout or "5s")
    seconds = None
    if match is not None:
        amount = float(match["amount"])
        seconds = amount / 1000 if match["unit"] == "ms" else amount
    if seconds is None or not 0 < seconds <= MAX_WAIT_S:
        raise InvalidInput(
            f"timeout is a duration up to {MAX_WAIT_S:g}s, like 5s or 500ms.",
            errors=[FieldError("timeout", "invalid duration")],
        )
    return seconds


def _published_body(published: Published) -> dict[str, Any]:
    body: dict[str, Any] = {
        "status": "stored",
        "id": published.event.id,
        "sequence": published.sequence,
    }
    if published.duplicate:
        body["duplicate"] = True
    if published.matched or published.paused:
        body["matched"] = published.matched + published.paused
    else:
        body["no_subscribers"] = True
    return body


def create_router(
    *,
    store: EventStore,
    queries: EventBusQueries,
    uow_factory: UnitOfWorkFactory,
    clock: Clock,
    publisher: EventPublisher,
    supervisor: Supervisor,
    guard: HostGuard,
    contract_cache: ContractCache,
    reserved_roots: Callable[[], frozenset[str]],
    server_info: Callable[[], ServerInfo],
) -> APIRouter:
    router = APIRouter(tags=["events"])
    viewer = Depends(require_role(Role.viewer))
    operator_role = require_role(Role.operator)
    operator = Depends(operator_role)

    # ---------------------------------------------------------------- event store

    @router.get("/api/v1/events", dependencies=[viewer])
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

    @router.get("/api/v1/events/{event_id}", dependencies=[viewer])
    async def get_event(event_id: str) -> dict[str, Any]:
        event = await store.get(event_id)
        if event is None:
            raise NotFound(f"Event {event_id!r} is not in the store.")
        return event

    @router.post(
        "/api/v1/events",
        dependencies=[operator],
        status_code=202,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/cloudevents+json": {"schema": {"type": "object"}},
                    "application/cloudevents-batch+json": {"schema": {"type": "array"}},
                    "application/json": {"description": "binary mode: ce-* headers + data"},
                },
            }
        },
    )
    async def publish_event(
        request: Request,
        ack: Annotated[str | None, Query(description="stored (default) or delivered")] = None,
        timeout: Annotated[str | None, Query(description="with ack=delivered: 5s, 500ms")] = None,
    ) -> Response:
        """Store a CloudEvent (structured, binary or batched mode) after checking its contract."""
        wait = parse_wait(ack, timeout)
        body = await request.body()
        headers = dict(request.headers)
        if is_batch(headers):
            if wait is not None:
                raise InvalidInput(
                    "ack=delivered takes one event, not a batch.",
                    errors=[FieldError("ack", "not with a batch")],
                )
            events = await publisher.parse_batch(body)
            stored = await publisher.publish_many(events)
            items = [_published_body(published) for published in stored]
            return JSONResponse({"status": "stored", "count": len(items), "items": items}, 202)
        event = await publisher.parse_one(headers, body)
        if wait is None:
            return JSONResponse(_published_body(await publisher.publish(event)), 202)
        waited = await publisher.publish_and_wait(event, timeout=wait)
        result = _published_body(waited.published)
        result["deliveries"] = {key: s.as_dict() for key, s in waited.deliveries.items()}
        delivered = sum(1 for s in waited.deliveries.values() if s.status == "delivered")
        expected = sum(1 for s in waited.deliveries.values() if s.status != "filtered")
        result["summary"] = {"delivered": delivered, "of": expected}
        return JSONResponse(result, 200 if waited.all_delivered else 207)

    # ---------------------------------------------------------------- contracts

    @router.post("/api/v1/event-contracts", status_code=201)
    async def create_contract(
        body: ContractIn,
        response: Response,
        principal: Operator = operator,
    ) -> ContractOut:
        """Register a contract version; 409 with the incompatibilities if it breaks its mode."""
        command = RegisterContract(
            event_type=body.type,
            schema=body.json_schema,
            publisher=body.publisher or principal.name,
            version=body.version,
            description=body.description,
            compatibility=body.compatibility,
        )
        result = await register_contract(
            command, uow=uow_factory(), clock=clock, roots=reserved_roots()
        )
        contract_cache.put(result.record.contract)
        if not result.created:
            response.status_code = 200
        version = result.record.contract.version
        response.headers["Location"] = f"/api/v1/event-contracts/{body.type}/versions/{version}"
        return ContractOut.of(result.record)

    @router.get("/api/v1/event-contracts", dependencies=[viewer])
    async def list_contracts(
        type: Annotated[str | None, Query(max_length=255)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> ContractPage:
        position = decode_cursor(cursor)
        after = (str(position["type"]), int(position["version"])) if position else None
        found = await queries.contracts(event_type=type, after=after, limit=limit + 1)
        page = found[:limit]
        next_cursor = None
        if len(found) > limit:
            last = page[-1].contract
            next_cursor = encode_cursor({"type": last.event_type, "version": last.version})
        return ContractPage(items=[ContractOut.of(r) for r in page], next_cursor=next_cursor)

    @router.get(
        "/api/v1/event-contracts/{event_type:path}/versions/{version}", dependencies=[viewer]
    )
    async def get_contract(event_type: str, version: str) -> ContractOut:
        """One version of a contract (`latest` for the latest one)."""
        if version != "latest" and not version.isdigit():
            raise InvalidInput(
                "The version is a number or 'latest'.",
                errors=[FieldError("version", "a number or latest")],
            )
        number = None if version == "latest" else int(version)
        return ContractOut.of(await queries.contract(event_type, number))

    @router.get("/asyncapi.json", tags=["events"])
    async def asyncapi() -> dict[str, Any]:
        """The AsyncAPI 3.0 document of every event contract."""
        records = await queries.all_contracts()
        return build_asyncapi([r.contract for r in records], server_info())

    # ---------------------------------------------------------------- subscriptions

    @router.post("/api/v1/subscriptions", status_code=201, dependencies=[operator])
    async def create(body: SubscriptionIn, response: Response) -> CreatedSubscription:
        """Subscribe an endpoint to event types; the secret is shown only in this answer."""
        command = CreateSubscription(
            endpoint=body.endpoint,
            types=tuple(body.types),
            filters=body.filters,
            name=body.name,
            secret=body.secret,
            options=body.delivery.to_domain(),
        )
        subscription = await create_subscription(
            command, uow=uow_factory(), clock=clock, guard=guard, control=supervisor
        )
        response.headers["Location"] = f"/api/v1/subscriptions/{subscription.id}"
        out = SubscriptionOut.of(subscription)
        return CreatedSubscription(**out.model_dump(), secret=subscription.secret)

    @router.get("/api/v1/subscriptions", dependencies=[viewer])
    async def list_subscriptions(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100, cursor: str | None = None
    ) -> SubscriptionPage:
        position = decode_cursor(cursor) or {}
        found = await queries.subscriptions(after=position.get("after"), limit=limit + 1)
        page = found[:limit]
        next_cursor = encode_cursor({"after": page[-1].id}) if len(found) > limit else None
        return SubscriptionPage(
            items=[SubscriptionOut.of(s) for s in page], next_cursor=next_cursor
        )

    @router.get("/api/v1/subscriptions/{subscription_id}", dependencies=[viewer])
    async def get_subscription(subscription_id: str) -> SubscriptionOut:
        return SubscriptionOut.of(await queries.subscription(subscription_id))

    @router.post("/api/v1/subscriptions/{subscription_id}:pause", dependencies=[operator])
    async def pause(subscription_id: str) -> SubscriptionOut:
        subscription = await set_subscription_status(
            subscription_id,
            SubscriptionStatus.PAUSED,
            uow=uow_factory(),
            clock=clock,
            control=supervisor,
        )
        return SubscriptionOut.of(subscription)

    @router.post("/api/v1/subscriptions/{subscription_id}:resume", dependencies=[operator])
    async def resume(subscription_id: str) -> SubscriptionOut:
        subscription = await set_subscription_status(
            subscription_id,
            SubscriptionStatus.ACTIVE,
            uow=uow_factory(),
            clock=clock,
            control=supervisor,
        )
        return SubscriptionOut.of(subscription)

    @router.delete(
        "/api/v1/subscriptions/{subscription_id}", status_code=204, dependencies=[operator]
    )
    async def delete(subscription_id: str) -> Response:
        await delete_subscription(
            subscription_id, uow=uow_factory(), clock=clock, control=supervisor
        )
        return Response(status_code=204)

    @router.get("/api/v1/subscriptions/{subscription_id}/deliveries", dependencies=[viewer])
    async def deliveries(
        subscription_id: str,
        status: Annotated[str | None, Query(max_length=16)] = None,
        event_id: Annotated[str | None, Query(max_length=255)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> DeliveryPage:
        """The delivery log, newest first, with the subscription's delivery statistics."""
        await queries.subscription(subscription_id)
        position = decode_cursor(cursor) or {}
        found = await queries.deliveries(
            subscription_id,
            status=status,
            event_id=event_id,
            before=position.get("before"),
            limit=limit + 1,
        )
        page = found[:limit]
        next_cursor = encode_cursor({"before": page[-1].id}) if len(found) > limit else None
        return DeliveryPage(
            items=[DeliveryOut.of(r) for r in page],
            next_cursor=next_cursor,
            stats=await _stats(subscription_id),
        )

    async def _stats(subscription_id: str) -> DeliveryStats:
        counts = await queries.delivery_counts(subscription_id)
        delivered = counts.get("delivered", 0)
        dead = counts.get("dead_lettered", 0)
        failed = counts.get("failed", 0) + dead
        state = await supervisor.consumer_state(subscription_id) or (0, 0)
        ended = delivered + failed
        return DeliveryStats(
            success_rate=round(delivered / ended, 4) if ended else None,
            delivered=delivered,
            failed=failed,
            dead_lettered=dead,
            pending=state[1],
            lag=state[0],
        )

    @router.post(
        "/api/v1/subscriptions/{subscription_id}:replay",
        status_code=202,
        dependencies=[operator],
    )
    async def replay(subscription_id: str, body: ReplayIn) -> ReplayOut:
        """Deliver the stored events from a sequence or a time again (a temporary consumer)."""
        started = await supervisor.replay(
            subscription_id, from_sequence=body.from_sequence, from_time=body.from_time
        )
        return ReplayOut.of(started)

    @router.get("/api/v1/subscriptions/{subscription_id}/dead-letters", dependencies=[viewer])
    async def dead_letters(
        subscription_id: str,
        status: Annotated[str | None, Query(pattern="^(dead|redelivered)$")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> DeadLetterPage:
        await queries.subscription(subscription_id)
        position = decode_cursor(cursor) or {}
        found = await queries.dead_letters(
            subscription_id, status=status, after=position.get("after"), limit=limit + 1
        )
        page = found[:limit]
        next_cursor = encode_cursor({"after": page[-1].id}) if len(found) > limit else None
        return DeadLetterPage(items=[DeadLetterOut.of(d) for d in page], next_cursor=next_cursor)

    @router.post(
        "/api/v1/subscriptions/{subscription_id}/dead-letters:redrive",
        status_code=202,
        dependencies=[operator],
    )
    async def redrive(subscription_id: str) -> dict[str, Any]:
        """Re-send every dead letter of the subscription (in the background, with retries)."""
        count = await supervisor.redrive(subscription_id)
        return {"status": "redriving", "dead_letters": count}

    @router.post(
        "/api/v1/subscriptions/{subscription_id}/dead-letters/{letter_id}:replay",
        dependencies=[operator],
    )
    async def replay_letter(subscription_id: str, letter_id: str) -> DeadLetterOut:
        """Send one dead letter again now (one attempt); answers the letter as it is after."""
        subscription = await queries.subscription(subscription_id)
        letter = await queries.dead_letter(subscription_id, letter_id)
        await supervisor.redeliver(subscription, letter, max_attempts=1)
        return DeadLetterOut.of(await queries.dead_letter(subscription_id, letter_id))

    return router
