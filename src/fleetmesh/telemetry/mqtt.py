"""MQTT telemetry: what devices publish on `devices/<id>/telemetry`, into storage.

nats-server's MQTT listener turns a publish on topic `devices/<id>/telemetry`
(QoS 0 or 1) into a NATS message on `devices.<id>.telemetry`; the file-backed
stream `DEVICES_IN` captures it before the listener answers PUBACK, so a message
is durable once acknowledged to the device. A durable pull consumer
(`telemetry-mqtt`, explicit acks) takes up to `batch` messages per fetch and:

1. validates each with the `Ingestor` exactly as an HTTP body (`prepare`), with
   the device id taken from the subject (the auth callout only lets a device
   publish under its own `devices.<id>.>`, so the subject is proof of identity);
   devices side by side, each device's messages in stream order;
2. stores the accepted points of the whole fetch in one transaction through the
   writer's `BatchStore` (one `collected` event per device), without a second
   trip through the `TELEMETRY` stream: `DEVICES_IN` already holds them durably;
3. acks after the commit. The MQTT bridge (`bridge.py`) feeds the same stream.

Outcomes, per message:

* stored (all points accepted): ack;
* some points rejected, or the whole message refused (not JSON, too large, an
  unknown or deregistered device): a row in the quarantine, a message on
  `devices.<id>.errors` (MQTT `devices/<id>/errors`, best-effort, QoS 0), ack;
* `Overloaded`: nak with the advised delay, never dropped, however often;
* anything else (database or NATS trouble): nak with a growing delay; after
  `max_attempts` deliveries the message is quarantined with reason
  `processing_failed` (the dead letter, raw payload included) and acked. When
  the fetch's transaction fails, its messages are stored one by one, so a bad
  one is isolated and its neighbours are stored.

Idempotency: the stream sequence identifies a message. Its batch id is a
deterministic `msg_id` derived from it (and from the stream's creation time, so
a recreated stream does not reuse ids); the store claims it in
`telemetry_batches` in the same transaction as the points, so a message
redelivered after a crash between commit and ack is skipped, however the
fetches group it. The consumer also remembers the messages it finished, so a
message redelivered because its ack was lost is acked again without a second
look.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)

from fleetmesh.core.backbone import Backbone
from fleetmesh.core.clock import epoch_ms, to_rfc3339
from fleetmesh.core.errors import FleetmeshError, Overloaded
from fleetmesh.core.ids import ulid_of
from fleetmesh.core.logging import get_logger
from fleetmesh.core.module import Deps
from fleetmesh.core.pull import BatchPull
from fleetmesh.telemetry.consumers import PullLoop
from fleetmesh.telemetry.contracts import IngestMessage
from fleetmesh.telemetry.domain import Rejected
from fleetmesh.telemetry.quarantine import QuarantineEntry
from fleetmesh.telemetry.writer import Storing, store_isolating

log = get_logger(__name__)

DEVICES_IN_STREAM = "DEVICES_IN"
TELEMETRY_SUBJECTS = "devices.*.telemetry"
CONSUMER_NAME = "telemetry-mqtt"
SOURCE_HEADER = "Fleetmesh-Source"
SOURCE_MQTT = "mqtt"
DAY_S = 86_400
DEVICES_IN_MAX_AGE_S = 3 * DAY_S
DEVICES_IN_MAX_BYTES = 1024**3
DUPLICATE_WINDOW_S = 120.0
ACK_WAIT_S = 30.0
MAX_ATTEMPTS = 10
MAX_BACKOFF_S = 60.0
MAX_OVERLOAD_PAUSE_S = 5.0
REMEMBERED = 100_000
YIELD_EVERY = 16

POINTS_REJECTED = "points_rejected"
PROCESSING_FAILED = "processing_failed"
INVALID_DEVICE_ID = "invalid_device_id"

_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def devices_in_stream_config() -> StreamConfig:
    """`DEVICES_IN`: raw device telemetry as published, kept 3 days or 1 GiB, file storage."""
    return StreamConfig(
        name=DEVICES_IN_STREAM,
        description="What devices publish on MQTT devices/<id>/telemetry (and the bridge)",
        subjects=[TELEMETRY_SUBJECTS],
        storage=StorageType.FILE,
        max_age=DEVICES_IN_MAX_AGE_S,
        max_bytes=DEVICES_IN_MAX_BYTES,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_S,
    )


def device_id_of(subject: str) -> str | None:
    """`devices.<id>.telemetry` → `<id>`, or None if the subject is not one of those."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[0] != "devices" or parts[2] != "telemetry":
        return None
    return parts[1] if is_device_id(parts[1]) else None


def is_device_id(text: str) -> bool:
    """A device id as the registry allows it (and so a single NATS/MQTT topic level)."""
    return bool(_DEVICE_ID.fullmatch(text))


def errors_subject(device_id: str) -> str:
    """Where a device hears about its refused messages (MQTT `devices/<id>/errors`)."""
    return f"devices.{device_id}.errors"


def telemetry_subject(device_id: str) -> str:
    return f"devices.{device_id}.telemetry"


# --------------------------------------------------------------------------- ports


class IngestReportLike(Protocol):
    """What the consumer reads of an ingest report."""

    @property
    def accepted(self) -> Sequence[object]:
        """The accepted points."""

    @property
    def rejected(self) -> Sequence[Rejected]:
        """The rejected points, each with its reason."""


class PreparedLike(Protocol):
    """`fleetmesh.telemetry.ingest.Prepared`: the report and the message to store, if any."""

    @property
    def report(self) -> IngestReportLike:
        """Per point: accepted or rejected."""

    @property
    def message(self) -> IngestMessage | None:
        """The accepted points, or None when none was accepted."""


class IngestorLike(Protocol):
    """`fleetmesh.telemetry.ingest.Ingestor`, as far as this consumer uses it."""

    def prepare(
        self,
        device_id: str,
        raw: bytes,
        *,
        source: str,
        received_at_ms: int | None = None,
        msg_id: str | None = None,
    ) -> Awaitable[PreparedLike]:
        """Decode and validate a device's telemetry body, without storing it."""


class Quarantine(Protocol):
    async def add(self, entry: QuarantineEntry) -> str:
        """Keep a refused message once per `message_key`; returns the row's id."""


class ErrorChannel(Protocol):
    async def notify(self, device_id: str, body: bytes) -> None:
        """Tell a device why its message was refused (best-effort)."""


class NatsErrorChannel:
    """Publishes on `devices.<id>.errors` with core NATS: best-effort, QoS 0 on MQTT.

    The quarantine row is the durable record; this message is a courtesy to a
    device that is connected and subscribed at that moment.
    """

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    async def notify(self, device_id: str, body: bytes) -> None:
        await self.backbone.nc.publish(errors_subject(device_id), body)


# --------------------------------------------------------------------------- handling


class Verdict(StrEnum):
    ACK = "ack"
    NAK = "nak"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    delay_s: float = 0.0
    outcome: str = "stored"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One `DEVICES_IN` message, as the handler needs it."""

    subject: str
    payload: bytes
    sequence: int
    num_delivered: int
    received_at_ms: int
    message_key: str
    source: str = SOURCE_MQTT

    @property
    def msg_id(self) -> str:
        """The ingest message id of this message: a ULID, the same on every delivery.

        Its time part is when the stream stored the message, its random part a
        hash of the message key, so the ingestor's per-message idempotency
        (`Nats-Msg-Id`, the writer's batch table) recognises a redelivery.
        """
        digest = hashlib.sha256(self.message_key.encode()).digest()
        return ulid_of(max(0, self.received_at_ms), digest)


@dataclass
class _Refusal:
    reason: str
    detail: str
    errors: list[dict[str, Any]] = field(default_factory=list)
    accepted: int = 0
    rejected: int | None = None


class _Remembered:
    """The keys of recently finished messages (bounded, oldest forgotten first)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._keys: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def add(self, key: str) -> None:
        self._keys[key] = None
        if len(self._keys) > self.size:
            self._keys.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Validated:
    """A message whose accepted points wait to be stored (with the fetch's others)."""

    delivery: Delivery
    device_id: str
    message: IngestMessage
    refusal: _Refusal | None
    """Set when some of its points were rejected: quarantined once the rest is stored."""


class TelemetryMessageHandler:
    """Decides what becomes of one message: validate, store, quarantine, notify, ack or nak.

    `validate` settles what needs no storage (a duplicate, a refusal, a failure) and
    hands the rest on as `Validated`; once the consumer stored those (or failed to),
    `settle` quarantines their rejected points and acks them, or retries them.
    """

    def __init__(
        self,
        ingestor: IngestorLike,
        quarantine: Quarantine,
        errors: ErrorChannel,
        *,
        max_attempts: int = MAX_ATTEMPTS,
        remembered: int = REMEMBERED,
    ) -> None:
        self.ingestor = ingestor
        self.quarantine = quarantine
        self.errors = errors
        self.max_attempts = max_attempts
        self._done = _Remembered(remembered)

    async def validate(self, delivery: Delivery) -> Decision | Validated:
        if delivery.message_key in self._done:
            return Decision(Verdict.ACK, outcome="duplicate")
        device_id = device_id_of(delivery.subject)
        if device_id is None:
            token = delivery.subject.split(".")[1] if delivery.subject.count(".") == 2 else "?"
            refusal = _Refusal(INVALID_DEVICE_ID, f"{delivery.subject!r} names no valid device")
            return await self._refuse(delivery, token, refusal)
        prepared = await self._prepare(device_id, delivery)
        if isinstance(prepared, Decision):
            return prepared
        rejected = _points_rejected(prepared.report) if prepared.report.rejected else None
        if prepared.message is not None:
            return Validated(delivery, device_id, prepared.message, rejected)
        if rejected is not None:
            return await self._refuse(delivery, device_id, rejected)
        self._done.add(delivery.message_key)
        return Decision(Verdict.ACK, outcome="empty")

    async def _prepare(self, device_id: str, delivery: Delivery) -> Decision | PreparedLike:
        try:
            return await self.ingestor.prepare(
                device_id,
                delivery.payload,
                source=delivery.source,
                received_at_ms=delivery.received_at_ms,
                msg_id=delivery.msg_id,
            )
        except Overloaded as error:
            return Decision(Verdict.NAK, max(1.0, float(error.retry_after_s)), "overloaded")
        except FleetmeshError as error:
            if not 400 <= error.status < 500:
                return await self._failed(device_id, delivery, error)
            refusal = _Refusal(
                error.problem, error.detail, [e.as_dict() for e in error.errors], 0, None
            )
            return await self._refuse(delivery, device_id, refusal)
        except Exception as error:
            return await self._failed(device_id, delivery, error)

    async def settle(self, validated: Validated, error: Exception | None) -> Decision:
        """After the store: ack (quarantining rejected points), or retry if it failed."""
        if error is not None:
            return await self._failed(validated.device_id, validated.delivery, error)
        if validated.refusal is not None:
            return await self._refuse(validated.delivery, validated.device_id, validated.refusal)
        self._done.add(validated.delivery.message_key)
        return Decision(Verdict.ACK)

    async def _failed(self, device_id: str, delivery: Delivery, error: Exception) -> Decision:
        if delivery.num_delivered < self.max_attempts:
            log.warning(
                "mqtt_telemetry_retry",
                device_id=device_id,
                sequence=delivery.sequence,
                attempt=delivery.num_delivered,
                error=repr(error),
            )
            return Decision(Verdict.NAK, backoff_s(delivery.num_delivered), "retry")
        log.error(
            "mqtt_telemetry_dead_letter",
            device_id=device_id,
            sequence=delivery.sequence,
            error=repr(error),
        )
        refusal = _Refusal(
            PROCESSING_FAILED,
            f"failed {delivery.num_delivered} times, last: {type(error).__name__}: {error}",
        )
        return await self._refuse(delivery, device_id, refusal)

    async def _refuse(self, delivery: Delivery, device_id: str, refusal: _Refusal) -> Decision:
        received_at = datetime.fromtimestamp(delivery.received_at_ms / 1000, UTC)
        quarantine_id = await self.quarantine.add(
            QuarantineEntry(
                message_key=delivery.message_key,
                device_id=device_id,
                source=delivery.source,
                sequence=delivery.sequence,
                reason=refusal.reason,
                detail=refusal.detail,
                payload=delivery.payload,
                received_at=received_at,
                errors=refusal.errors,
            )
        )
        if is_device_id(device_id):
            body = {
                "type": "telemetry.rejected",
                "device_id": device_id,
                "sequence": delivery.sequence,
                "reason": refusal.reason,
                "detail": refusal.detail,
                "accepted": refusal.accepted,
                "rejected": refusal.rejected,
                "errors": refusal.errors,
                "quarantine_id": quarantine_id,
                "received_at": to_rfc3339(received_at),
            }
            try:
                await self.errors.notify(device_id, json.dumps(body).encode())
            except Exception as error:
                log.warning("mqtt_error_notify_failed", device_id=device_id, error=repr(error))
        self._done.add(delivery.message_key)
        outcome = "partly_rejected" if refusal.reason == POINTS_REJECTED else "quarantined"
        return Decision(Verdict.ACK, outcome=outcome)


def _points_rejected(report: IngestReportLike) -> _Refusal:
    return _Refusal(
        POINTS_REJECTED,
        f"{len(report.rejected)} of {len(report.rejected) + len(report.accepted)}"
        " points were rejected",
        [_rejection(item) for item in report.rejected],
        len(report.accepted),
        len(report.rejected),
    )


def _rejection(item: Rejected) -> dict[str, Any]:
    return {
        "index": item.index,
        "metric": item.metric,
        "field": item.field,
        "reason": str(item.reason),
        "message": item.message,
    }


def backoff_s(attempt: int) -> float:
    """1, 2, 4, ... seconds, at most a minute."""
    return float(min(MAX_BACKOFF_S, 2 ** max(0, attempt - 1)))


# --------------------------------------------------------------------------- consumer


class JetStreamMessage(Protocol):
    """The parts of a nats-py JetStream message the consumer uses."""

    subject: str
    data: bytes
    headers: dict[str, str] | None

    @property
    def metadata(self) -> Any:
        """Stream sequence, delivery count and store time."""

    async def ack(self) -> None:
        """Acknowledge."""

    async def nak(self, delay: float | None = None) -> None:
        """Ask for a redelivery, after `delay` seconds."""


def delivery_of(message: JetStreamMessage, *, stream_epoch_ms: int) -> Delivery:
    """A JetStream message as the handler sees it."""
    meta = message.metadata
    sequence = int(meta.sequence.stream)
    stored_at = meta.timestamp
    received_at_ms = (
        int(stored_at.timestamp() * 1000) if isinstance(stored_at, datetime) else epoch_ms()
    )
    headers = message.headers or {}
    return Delivery(
        subject=message.subject,
        payload=bytes(message.data),
        sequence=sequence,
        num_delivered=int(meta.num_delivered),
        received_at_ms=received_at_ms,
        message_key=f"{DEVICES_IN_STREAM}-{stream_epoch_ms}-{sequence}",
        source=headers.get(SOURCE_HEADER, SOURCE_MQTT)[:32],
    )


class MqttTelemetryConsumer:
    """The durable pull consumer of `DEVICES_IN`; build one per process, `start()`/`stop()`."""

    def __init__(
        self,
        deps: Deps,
        ingestor: IngestorLike,
        store: Storing,
        quarantine: Quarantine,
        *,
        batch: int = 1_000,
        max_attempts: int = MAX_ATTEMPTS,
        errors: ErrorChannel | None = None,
    ) -> None:
        self.backbone = deps.backbone
        self.batch = batch
        self.store = store
        self.handler = TelemetryMessageHandler(
            ingestor,
            quarantine,
            errors or NatsErrorChannel(deps.backbone),
            max_attempts=max_attempts,
        )
        self.outcomes: dict[str, int] = {}
        self._stream_epoch_ms = 0
        self._completing: asyncio.Task[None] | None = None
        self.loop = PullLoop(
            name="telemetry-mqtt-consumer",
            subscribe=self._subscribe,
            handle=self._handle,
            max_messages=lambda: self.batch,
        )

    async def start(self) -> None:
        await self.backbone.ensure_stream(devices_in_stream_config())
        info = await self.backbone.js.stream_info(DEVICES_IN_STREAM)
        self._stream_epoch_ms = _epoch_ms_of(getattr(info, "created", None))
        await self.loop.start()
        log.info("mqtt_telemetry_consumer_started", stream=DEVICES_IN_STREAM)

    async def stop(self, *, timeout: float = 10.0) -> None:
        """Finish the fetch in hand and its store, then stop (the rest is redelivered)."""
        await self.loop.stop(timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._finish_previous(), timeout)

    async def _subscribe(self) -> BatchPull:
        config = ConsumerConfig(
            durable_name=CONSUMER_NAME,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ACK_WAIT_S,
            max_deliver=-1,
            max_ack_pending=10_000,
            filter_subject=TELEMETRY_SUBJECTS,
        )
        return await BatchPull.subscribe(
            self.backbone.nc, self.backbone.js, DEVICES_IN_STREAM, config
        )

    async def _handle(self, messages: list[Any]) -> None:
        """Validate a fetch while the previous one is being stored, then store it."""
        checked = await self.validate(messages)
        await self._finish_previous()  # one transaction at a time, in stream order
        self._completing = asyncio.create_task(self.complete(checked))
        pause = _overload_pause(checked)
        if pause:
            # Overloaded downstream: the batch was naked with a delay; fetching
            # again at once would only pull the next messages into the same wall.
            await asyncio.sleep(pause)

    async def _finish_previous(self) -> None:
        task, self._completing = self._completing, None
        if task is None:
            return
        try:
            await task
        except Exception as error:  # settled messages stay unacked: redelivered later
            log.warning("mqtt_telemetry_store_task_failed", error=repr(error))

    async def process(self, messages: Sequence[JetStreamMessage]) -> float:
        """Validate a fetch, store it, settle it; the pause before the next fetch (0 unless
        overloaded)."""
        checked = await self.validate(messages)
        await self.complete(checked)
        return _overload_pause(checked)

    async def validate(self, messages: Sequence[JetStreamMessage]) -> list[Checked]:
        """Devices side by side, each device's messages in stream order."""
        by_device: dict[str, list[JetStreamMessage]] = {}
        for message in messages:
            by_device.setdefault(message.subject, []).append(message)
        groups = await asyncio.gather(
            *(self._validate_in_order(group) for group in by_device.values())
        )
        return [item for group in groups for item in group]

    async def complete(self, checked: list[Checked]) -> None:
        """Store the accepted points of a fetch in one transaction, then ack or nak each."""
        failures = await self._store([v for _, v in checked if isinstance(v, Validated)])
        for message, verdict in checked:
            await self._settle(message, verdict, failures)

    async def _validate_in_order(self, messages: list[JetStreamMessage]) -> list[Checked]:
        checked: list[Checked] = []
        for message in messages:
            checked.append((message, await self._validate(message)))
            if len(checked) % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let the previous fetch's store make progress
        return checked

    async def _validate(self, message: JetStreamMessage) -> Decision | Validated:
        try:
            delivery = delivery_of(message, stream_epoch_ms=self._stream_epoch_ms)
            return await self.handler.validate(delivery)
        except Exception as error:
            # The quarantine itself failed (database down): try again later.
            log.warning("mqtt_telemetry_handling_failed", error=repr(error))
            return Decision(Verdict.NAK, 2.0, "retry")

    async def _store(self, pending: list[Validated]) -> dict[str, Exception]:
        """The failures by message id (see `store_isolating`)."""
        if not pending:
            return {}
        return await store_isolating(self.store, [v.message for v in pending])

    async def _settle(
        self,
        message: JetStreamMessage,
        checked: Decision | Validated,
        failures: dict[str, Exception],
    ) -> Decision:
        if isinstance(checked, Validated):
            decision = await self._settled(checked, failures.get(checked.message.id))
        else:
            decision = checked
        self.outcomes[decision.outcome] = self.outcomes.get(decision.outcome, 0) + 1
        try:
            if decision.verdict is Verdict.ACK:
                await message.ack()
            else:
                await message.nak(delay=decision.delay_s)
        except Exception as error:
            log.warning("mqtt_telemetry_ack_failed", error=repr(error))
        return decision

    async def _settled(self, validated: Validated, error: Exception | None) -> Decision:
        try:
            return await self.handler.settle(validated, error)
        except Exception as failure:
            log.warning("mqtt_telemetry_handling_failed", error=repr(failure))
            return Decision(Verdict.NAK, 2.0, "retry")


Checked = tuple[JetStreamMessage, Decision | Validated]
"""A fetched message and what validation made of it."""


def _overload_pause(checked: list[Checked]) -> float:
    delays = [
        v.delay_s for _, v in checked if isinstance(v, Decision) and v.outcome == "overloaded"
    ]
    return min(max(delays), MAX_OVERLOAD_PAUSE_S) if delays else 0.0


def _epoch_ms_of(created: object) -> int:
    return int(created.timestamp() * 1000) if isinstance(created, datetime) else 0
