"""NATS consumers of the telemetry context, and what they share.

Both consumers are durable JetStream pull consumers with explicit acks. A message whose
handling fails is nak'ed with an exponential delay (``redelivery_delay``); once it has been
delivered ``MAX_DELIVER`` times it is dead-lettered to ``TELEMETRY_DLQ`` with its reason,
then acked. A message that cannot be decoded at all is dead-lettered at once. Nothing is
dropped silently.

``fetch_available`` works around long-polling pulls: a pull for N messages waits for all N
or for its expiry, so a lone message would wait for the whole expiry. It waits for the first
message alone, then drains whatever else is there within ``drain_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any, Final

import msgspec
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from fleetmesh.core.backbone import EVENTS_STREAM, Backbone
from fleetmesh.core.clock import from_rfc3339, utcnow
from fleetmesh.core.logging import get_logger
from fleetmesh.telemetry import contracts
from fleetmesh.telemetry.service import (
    DeviceDeregistered,
    DeviceRegistered,
    DeviceTypeDefined,
    ProjectionChange,
)

log = get_logger(__name__)

MAX_DELIVER: Final = 20
MAX_REDELIVERY_DELAY_S: Final = 60.0
PROJECTION_DURABLE: Final = "telemetry-projection"


def redelivery_delay(num_delivered: int) -> float:
    """0.5 s, 1 s, 2 s ... capped at a minute."""
    return float(min(MAX_REDELIVERY_DELAY_S, 0.25 * 2 ** max(1, num_delivered)))


async def fetch_available(
    subscription: Any, *, max_messages: int, wait_s: float, drain_s: float
) -> list[Msg]:
    """Wait up to ``wait_s`` for one message, then take what else is ready (up to the max)."""
    try:
        first: list[Msg] = await subscription.fetch(1, timeout=wait_s)
    except TimeoutError:
        return []
    if max_messages <= 1:
        return first
    try:
        rest: list[Msg] = await subscription.fetch(max_messages - 1, timeout=drain_s)
    except TimeoutError:
        rest = []
    return first + rest


async def dead_letter(backbone: Backbone, message: Msg, reason: str, *, key: str) -> None:
    """Move a message to TELEMETRY_DLQ with its reason, then ack it here."""
    metadata = message.metadata
    headers = {
        contracts.DEAD_REASON_HEADER: reason[:1000],
        "Fleetmesh-Original-Subject": message.subject,
        "Fleetmesh-Original-Stream": metadata.stream,
        "Fleetmesh-Deliveries": str(metadata.num_delivered),
    }
    msg_id = f"dead-{metadata.stream}-{metadata.sequence.stream}"
    await backbone.publish(
        contracts.dead_letter_subject(key), message.data, msg_id=msg_id, headers=headers
    )
    await message.ack()
    log.error("telemetry_dead_lettered", subject=message.subject, reason=reason, key=key)


async def retry_or_dead_letter(
    backbone: Backbone, message: Msg, error: BaseException, *, key: str
) -> None:
    """Nak with a growing delay; dead-letter once the deliveries are used up."""
    delivered = message.metadata.num_delivered
    if delivered >= MAX_DELIVER:
        await dead_letter(backbone, message, f"failed {delivered} times: {error!r}", key=key)
        return
    delay = redelivery_delay(delivered)
    log.warning("telemetry_message_retry", subject=message.subject, error=repr(error), delay=delay)
    await message.nak(delay=delay)


class PullLoop:
    """Runs ``handle(batch)`` over a durable pull subscription until stopped.

    With ``concurrency`` above one, the next batch is fetched (and handled) while earlier
    ones are still being handled, up to that many at once.
    ``stop()`` lets the current fetch and batches finish (so no message is stranded in a dead
    pull request until its ack wait runs out), then unsubscribes.
    """

    def __init__(
        self,
        *,
        name: str,
        subscribe: Callable[[], Awaitable[Any]],
        handle: Callable[[list[Msg]], Coroutine[Any, Any, None]],
        max_messages: Callable[[], int],
        wait_s: float = 0.5,
        drain_s: float = 0.02,
        concurrency: int = 1,
    ) -> None:
        self.name = name
        self.concurrency = concurrency
        self._subscribe = subscribe
        self._handle = handle
        self._max_messages = max_messages
        self.wait_s = wait_s
        self.drain_s = drain_s
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.subscription: Any = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self.running:
            return
        self._stopping = False
        self.subscription = await self._subscribe()
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self, timeout: float = 10.0) -> None:
        task, self._task = self._task, None
        self._stopping = True
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        subscription, self.subscription = self.subscription, None
        if subscription is not None:
            await _release_pending(subscription)
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _run(self) -> None:
        failures = 0
        handling: set[asyncio.Task[None]] = set()
        try:
            while not self._stopping:
                try:
                    await _at_most(handling, self.concurrency - 1)
                    batch = await fetch_available(
                        self.subscription,
                        max_messages=self._max_messages(),
                        wait_s=self.wait_s,
                        drain_s=self.drain_s,
                    )
                    if batch:
                        handling.add(asyncio.create_task(self._handle(batch)))
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    failures += 1
                    delay = min(5.0, 0.1 * 2**failures)
                    log.warning("telemetry_consumer_failed", consumer=self.name, error=repr(error))
                    await asyncio.sleep(delay)
        except asyncio.CancelledError:
            for task in handling:
                task.cancel()
            raise
        finally:  # stopping lets the batches in hand finish
            await asyncio.gather(*handling, return_exceptions=True)


async def _at_most(tasks: set[asyncio.Task[None]], count: int) -> None:
    """Wait until at most ``count`` of the tasks are running (finished ones leave the set);
    raises a finished one's error."""
    while len(tasks) > count:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        tasks.difference_update(done)
        errors = [e for t in done if not t.cancelled() and (e := t.exception()) is not None]
        if errors:
            raise errors[0]


async def _release_pending(subscription: Any) -> None:
    """Nak what the server delivered after the last fetch returned, so it is redelivered now.

    A pull that times out on the client can still receive a message the server sent at the
    last moment; it waits in the subscription's queue for the next fetch. Dropping the
    subscription with it would leave that message unacknowledged until its ack wait.
    """
    with contextlib.suppress(Exception):
        for _ in range(int(subscription.pending_msgs) + 1):
            if subscription.pending_msgs <= 0:
                return
            for message in await subscription.fetch(1, timeout=0.05):
                await message.nak()


# --------------------------------------------------------------------------- the projection


class UnusableEvent(ValueError):
    """A device event this context cannot read (missing or malformed fields)."""


class _Envelope(msgspec.Struct):
    type: str
    data: Any = None
    time: str | None = None


def parse_device_event(payload: bytes) -> ProjectionChange | None:
    """The projection change an event asks for; None for device events telemetry ignores."""
    try:
        event = msgspec.json.decode(payload, type=_Envelope)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise UnusableEvent(f"not a CloudEvent: {error}") from None
    data = event.data if isinstance(event.data, dict) else {}
    try:
        if event.type == contracts.DEVICE_TYPE_DEFINED:
            schema = data.get("telemetry_schema") or {}
            if not isinstance(schema, dict):
                raise UnusableEvent("telemetry_schema is not an object")
            return DeviceTypeDefined(
                name=str(data["name"]),
                telemetry_schema=schema,
                expected_interval_s=_number(data.get("expected_interval_s")),
                offline_timeout_s=_number(data.get("offline_timeout_s")),
            )
        if event.type == contracts.DEVICE_REGISTERED:
            return DeviceRegistered(
                device_id=str(data["device_id"]),
                type_name=str(data["type"]),
                at=_time(data.get("registered_at") or event.time),
            )
        if event.type == contracts.DEVICE_DEREGISTERED:
            type_name = data.get("type")
            return DeviceDeregistered(
                device_id=str(data["device_id"]),
                type_name=str(type_name) if type_name else None,
                at=_time(data.get("deregistered_at") or event.time),
            )
    except KeyError as error:
        raise UnusableEvent(f"{event.type} without {error}") from None
    return None


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _time(value: object) -> datetime:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return from_rfc3339(value)
    return utcnow()


ApplyChanges = Callable[[list[ProjectionChange]], Awaitable[None]]


class ProjectionConsumer:
    """Applies the registry's device events to telemetry's projection (durable, idempotent)."""

    def __init__(self, backbone: Backbone, apply: ApplyChanges) -> None:
        self.backbone = backbone
        self.apply = apply
        self.loop = PullLoop(
            name="telemetry-projection",
            subscribe=self._subscribe,
            handle=self.handle,
            max_messages=lambda: 500,
            drain_s=0.01,
        )

    async def start(self) -> None:
        await self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()

    async def _subscribe(self) -> Any:
        config = ConsumerConfig(
            durable_name=PROJECTION_DURABLE,
            filter_subject=contracts.DEVICE_EVENTS_FILTER,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_deliver=MAX_DELIVER,
            max_ack_pending=5_000,
        )
        return await self.backbone.js.pull_subscribe(
            contracts.DEVICE_EVENTS_FILTER,
            durable=PROJECTION_DURABLE,
            stream=EVENTS_STREAM,
            config=config,
        )

    async def handle(self, messages: list[Msg]) -> None:
        pending: list[tuple[Msg, ProjectionChange]] = []
        for message in messages:
            try:
                change = parse_device_event(message.data)
            except UnusableEvent as error:
                await dead_letter(self.backbone, message, str(error), key="_projection")
                continue
            if change is None:
                await message.ack()
            else:
                pending.append((message, change))
        if not pending:
            return
        try:
            await self.apply([change for _, change in pending])
        except Exception as error:
            log.warning("telemetry_projection_batch_failed", error=repr(error))
            await self._one_by_one(pending)
            return
        for message, _ in pending:
            await message.ack()

    async def _one_by_one(self, pending: list[tuple[Msg, ProjectionChange]]) -> None:
        for message, change in pending:
            try:
                await self.apply([change])
            except Exception as error:
                await retry_or_dead_letter(self.backbone, message, error, key="_projection")
                continue
            await message.ack()
