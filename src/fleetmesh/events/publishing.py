"""Publishing events over HTTP: validate against the contract, store, and optionally wait.

Accepted forms: the structured mode (`application/cloudevents+json`), the
binary mode (`ce-*` headers, the body as data) and the batched mode
(`application/cloudevents-batch+json`, up to `MAX_BATCH` events, all valid or
none stored). Every event needs a contract for its type: an unknown type is a
422 on `type` (the event is the invalid input, not the URL). `fleetmesh.`
types are the platform's own and cannot be published over HTTP.

An event is stored in the `EVENTS` stream (`Nats-Msg-Id` = its id, so a
repeat within the stream's 2-minute window is recognised as a duplicate) before
the call returns. With `?ack=delivered` the call also waits (up to `timeout`)
for the outcome at every matching subscription: workers answer on a NATS inbox
named in a header of the stored message, so this works across replicas.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.js.api import PubAck

from fleetmesh.core.acks import MSG_ID_HEADER
from fleetmesh.core.backbone import Backbone
from fleetmesh.core.envelope import subject_for_type
from fleetmesh.core.errors import FieldError
from fleetmesh.events.cloudevents import (
    CloudEvent,
    parse_http,
    parse_structured,
    to_structured,
)
from fleetmesh.events.delivery import DEAD_LETTERED, DELIVERED, OUTCOME_HEADER, Outcome
from fleetmesh.events.domain import (
    Contract,
    InvalidCloudEvent,
    ValidationFailed,
    canonical_json,
    is_reserved_type,
    validate_data,
)
from fleetmesh.events.service import ContractCache
from fleetmesh.events.supervisor import Supervisor

BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
MAX_BATCH = 1000
STORE_TIMEOUT_S = 10.0
"""How long a publish waits for JetStream to store the event."""
MAX_ATTRIBUTE = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class InvalidEvent(ValidationFailed):
    """The event is well-formed CloudEvents but not acceptable here."""

    summary = "The event was refused."


@dataclass
class Published:
    event: CloudEvent
    sequence: int
    duplicate: bool
    matched: list[str]
    filtered: list[str]
    paused: list[str]


@dataclass
class DeliveryStatus:
    status: str = "pending"
    attempts: int = 0
    http_status: int | None = None
    error: str | None = None
    will_retry: bool | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value is not None}


@dataclass
class Waited:
    published: Published
    deliveries: dict[str, DeliveryStatus] = field(default_factory=dict)

    @property
    def all_delivered(self) -> bool:
        return all(s.status in (DELIVERED, "filtered") for s in self.deliveries.values())


def is_batch(headers: Mapping[str, str]) -> bool:
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    return content_type.split(";", 1)[0].strip().lower() == BATCH_CONTENT_TYPE


class EventPublisher:
    def __init__(
        self, *, backbone: Backbone, contracts: ContractCache, supervisor: Supervisor
    ) -> None:
        self.backbone = backbone
        self.contracts = contracts
        self.supervisor = supervisor

    async def parse_one(self, headers: Mapping[str, str], body: bytes) -> CloudEvent:
        """A valid event conforming to its contract, or a 422 listing every problem."""
        event = parse_http(headers, body)
        errors = await self._contract_errors(event, "")
        if errors:
            raise InvalidEvent(errors)
        return event

    async def parse_batch(self, body: bytes) -> list[CloudEvent]:
        try:
            documents = json.loads(body)
        except ValueError as error:
            raise InvalidCloudEvent([FieldError("", f"body is not valid JSON: {error}")]) from None
        if not isinstance(documents, list) or not 1 <= len(documents) <= MAX_BATCH:
            raise InvalidCloudEvent(
                [FieldError("", f"a batch is a JSON array of 1 to {MAX_BATCH} events")]
            )
        events: list[CloudEvent] = []
        errors: list[FieldError] = []
        for index, document in enumerate(documents):
            try:
                event = parse_structured(document)
            except ValidationFailed as error:
                errors += [_prefixed(f"{index}/", e) for e in error.errors]
                continue
            errors += await self._contract_errors(event, f"{index}/")
            events.append(event)
        if errors:
            raise InvalidEvent(errors)
        return events

    async def _contract_errors(self, event: CloudEvent, prefix: str) -> list[FieldError]:
        malformed = [
            FieldError(prefix + name, f"at most {MAX_ATTRIBUTE} characters here", "too_long")
            for name in ("id", "type")
            if len(getattr(event, name)) > MAX_ATTRIBUTE
        ]
        if _CONTROL.search(event.id):
            malformed.append(FieldError(prefix + "id", "must not contain control characters"))
        if malformed:
            return malformed
        if is_reserved_type(event.type):
            problem = "fleetmesh. types are published by the platform only"
            return [FieldError(prefix + "type", problem, "reserved")]
        contract = await self.contracts.latest(event.type)
        if contract is None:
            problem = "no contract is registered for this type (POST /api/v1/event-contracts)"
            return [FieldError(prefix + "type", problem, "unknown_type")]
        return [_prefixed(prefix + "data", error) for error in _data_errors(contract, event.data)]

    async def publish(self, event: CloudEvent, *, outcomes_to: str | None = None) -> Published:
        """Store the event in the EVENTS stream; returns once JetStream has it."""
        headers = {OUTCOME_HEADER: outcomes_to} if outcomes_to else None
        ack = await self.backbone.publish(
            subject_for_type(event.type),
            msgspec.json.encode(to_structured(event)),
            msg_id=event.id,
            headers=headers,
        )
        return self._published(event, ack)

    async def publish_many(self, events: list[CloudEvent]) -> list[Published]:
        """Store a batch: every event is sent at once, then every stream ack is awaited.

        One request per event would cost a timer and a wait each; the
        asynchronous publishes share one deadline.
        """
        js = self.backbone.js
        pending = [
            await js.publish_async(
                subject_for_type(event.type),
                msgspec.json.encode(to_structured(event)),
                headers={MSG_ID_HEADER: event.id},
            )
            for event in events
        ]
        async with asyncio.timeout(STORE_TIMEOUT_S):
            acks = await asyncio.gather(*pending)
        return [self._published(event, ack) for event, ack in zip(events, acks, strict=True)]

    def _published(self, event: CloudEvent, ack: PubAck) -> Published:
        match = self.supervisor.match(event)
        return Published(
            event=event,
            sequence=int(ack.seq),
            duplicate=bool(ack.duplicate),
            matched=[s.id for s in match.matched if s.is_active],
            filtered=[s.id for s in match.filtered],
            paused=[s.id for s in match.matched if not s.is_active],
        )

    async def publish_and_wait(self, event: CloudEvent, *, timeout: float) -> Waited:
        """Store the event, then wait for its outcome at every matching subscription."""
        nc = self.backbone.nc
        inbox = await nc.subscribe(nc.new_inbox())
        try:
            published = await self.publish(event, outcomes_to=inbox.subject)
            waited = Waited(published)
            for subscription_id in published.filtered:
                waited.deliveries[subscription_id] = DeliveryStatus("filtered")
            for subscription_id in published.paused:
                waited.deliveries[subscription_id] = DeliveryStatus(reason="subscription paused")
            waiting = set(published.matched)
            for subscription_id in waiting:
                waited.deliveries[subscription_id] = DeliveryStatus()
            if published.duplicate:
                for status in waited.deliveries.values():
                    status.reason = "duplicate event id: delivered when first published"
                return waited
            deadline = time.monotonic() + timeout
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    message = await inbox.next_msg(timeout=left)
                except Exception:
                    break
                outcome = msgspec.json.decode(message.data, type=Outcome)
                if outcome.subscription_id in waiting:
                    waited.deliveries[outcome.subscription_id] = _status(outcome)
                    if outcome.final:
                        waiting.discard(outcome.subscription_id)
            return waited
        finally:
            await inbox.unsubscribe()


def _status(outcome: Outcome) -> DeliveryStatus:
    if outcome.status == DELIVERED:
        return DeliveryStatus(DELIVERED, outcome.attempt, outcome.http_status)
    return DeliveryStatus(
        "failed",
        outcome.attempt,
        outcome.http_status,
        outcome.error,
        will_retry=outcome.status != DEAD_LETTERED,
    )


def _data_errors(contract: Contract, data: object) -> list[FieldError]:
    if isinstance(data, bytes) and canonical_json(contract.schema) not in ("true", "{}"):
        return [FieldError("", "binary data cannot satisfy a JSON Schema contract", "type")]
    if isinstance(data, bytes):
        return []
    return validate_data(contract, data)


def _prefixed(prefix: str, error: FieldError) -> FieldError:
    name = prefix + error.field if error.field else prefix.rstrip("/")
    return FieldError(name, error.message, error.code)
