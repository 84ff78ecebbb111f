"""NATS inputs of the status context.

JetStream (durable pull consumers on `EVENTS`, explicit acks, redelivery with
backoff, then dead-lettering with the reason):

- `status-projection` on the device registry's `type_defined`,
  `registered` and `deregistered` events: the device projection. Idempotent:
  a registration seen twice changes nothing, a deregistration is final.
- `status-liveness` on `events.telemetry.collected.v1`: each event is evidence
  of life at its `received_at`, plus quality points for the health score. The
  reports are coalesced by the `ReportBatcher`; a message is acked once the
  window holding it is committed. Applying a report twice changes nothing; the
  quality sums are protected by a committed high-water mark of the stream
  sequence, so a redelivered event is not counted twice.

Core NATS subscriptions (queue group `status`, so replicas share them):

- `devices.*.status` (MQTT `devices/<id>/status`): `{"status": "online"|"offline"}`,
  with `"cause": "last_will"` for a last will. These are "now" signals: a
  message missed while the status service is down changes nothing the
  inactivity timeout and the MQTT reconciliation do not catch, so a core
  subscription is enough, and it leaves `devices.>` free for the JetStream
  stream that captures what devices publish (DEVICES_IN, owned by telemetry).
- `devices.*.responses.ping` (MQTT `devices/<id>/responses/ping`): answers to
  the health-check pings this service sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from fleetmesh.core.backbone import EVENTS_STREAM, Backbone
from fleetmesh.core.clock import Clock
from fleetmesh.core.logging import get_logger
from fleetmesh.core.tasks import stop_task
from fleetmesh.status import contracts
from fleetmesh.status.domain import DeviceState, StatusCause, StatusReport
from fleetmesh.status.liveness import ReportBatcher
from fleetmesh.status.service import FlushResult, StatusService

log = get_logger(__name__)

PROJECTION_CONSUMER = "status-projection"
LIVENESS_CONSUMER = "status-liveness"
QUEUE_GROUP = "status"
MAX_DELIVER = 10
BACKOFF_S = [1.0, 2.0, 5.0, 10.0, 30.0]
UNKNOWN_DEVICE_RETRY_S = 2.0
LIVENESS_START_BACK = timedelta(hours=1)
"""A new liveness consumer starts this far back: older telemetry cannot change a status."""


async def _ensure_consumer(backbone: Backbone, config: ConsumerConfig) -> Any:
    """Create the durable consumer on first start; bind to it afterwards."""
    name = str(config.durable_name)
    try:
        await backbone.js.consumer_info(EVENTS_STREAM, name)
    except NotFoundError:
        await backbone.js.add_consumer(EVENTS_STREAM, config)
    return await backbone.js.pull_subscribe_bind(durable=name, stream=EVENTS_STREAM)


async def _settle_failed(message: Any, reason: str) -> None:
    """Retry later, or dead-letter (terminate with the reason logged) after the last try."""
    delivered = int(message.metadata.num_delivered)
    if delivered >= MAX_DELIVER:
        log.error(
            "status_dead_letter",
            subject=message.subject,
            stream_seq=message.metadata.sequence.stream,
            deliveries=delivered,
            reason=reason,
        )
        await message.term()
        return
    await message.nak(delay=BACKOFF_S[min(delivered, len(BACKOFF_S)) - 1])


class _PullLoop:
    """Fetches batches from a durable consumer and hands them to `handle` until stopped."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        name: str,
        batch: int,
        config: Callable[[], ConsumerConfig],
        handle: Callable[[list[Any]], Awaitable[None]],
    ) -> None:
        self.backbone = backbone
        self.name = name
        self.batch = batch
        self.config = config
        self.handle = handle
        self._subscription: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._subscription = await _ensure_consumer(self.backbone, self.config())
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _run(self) -> None:
        while True:
            try:
                messages = await self._subscription.fetch(self.batch, timeout=1.0)
            except (NatsTimeoutError, TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("status_fetch_failed", consumer=self.name, error=repr(error))
                await asyncio.sleep(0.5)
                continue
            try:
                await self.handle(messages)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("status_batch_failed", consumer=self.name, error=repr(error))


class ProjectionConsumer:
    """Keeps the device projection: type timeouts, registrations, deregistrations."""

    def __init__(self, backbone: Backbone, service: StatusService) -> None:
        self.service = service
        self._loop = _PullLoop(
            backbone,
            name=PROJECTION_CONSUMER,
            batch=200,
            config=self._config,
            handle=self.handle,
        )

    async def start(self) -> None:
        await self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    def _config(self) -> ConsumerConfig:
        return ConsumerConfig(
            name=PROJECTION_CONSUMER,
            durable_name=PROJECTION_CONSUMER,
            filter_subjects=list(contracts.PROJECTION_SUBJECTS),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_deliver=MAX_DELIVER,
            max_ack_pending=5_000,
        )

    async def handle(self, messages: list[Any]) -> None:
        decoded: list[tuple[Any, contracts.ProjectionEvent]] = []
        for message in messages:
            try:
                event = contracts.decode_projection(message.data)
            except contracts.UnreadableEvent as error:
                log.error("status_dead_letter", subject=message.subject, reason=str(error))
                await message.term()
                continue
            if event is None:
                await message.ack()
            else:
                decoded.append((message, event))
        if not decoded:
            return
        try:
            await self.service.project([event for _, event in decoded])
        except Exception as error:
            log.warning("status_projection_batch_failed", error=repr(error), size=len(decoded))
        else:
            for message, _ in decoded:
                await message.ack()
            return
        for message, event in decoded:  # isolate the event that fails
            try:
                await self.service.project([event])
            except Exception as error:
                await _settle_failed(message, repr(error))
            else:
                await message.ack()


class LivenessConsumer:
    """Telemetry collected = the device is alive at `received_at`; plus quality points."""

    def __init__(
        self, backbone: Backbone, service: StatusService, batcher: ReportBatcher, clock: Clock
    ) -> None:
        self._loop = _PullLoop(
            backbone,
            name=LIVENESS_CONSUMER,
            batch=1_000,
            config=self._config,
            handle=self.handle,
        )
        self.service = service
        self.batcher = batcher
        self.clock = clock
        self._counted_up_to = 0
        self._acks: set[asyncio.Task[None]] = set()

    def _config(self) -> ConsumerConfig:
        return ConsumerConfig(
            name=LIVENESS_CONSUMER,
            durable_name=LIVENESS_CONSUMER,
            filter_subject=contracts.TELEMETRY_SUBJECT,
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=self.clock.now() - LIVENESS_START_BACK,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=60.0,
            max_deliver=MAX_DELIVER,
            max_ack_pending=20_000,
        )

    async def start(self) -> None:
        self._counted_up_to = await self.service.quality_offset(LIVENESS_CONSUMER)
        await self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        for task in list(self._acks):
            await stop_task(task)
        self._acks.clear()

    async def handle(self, messages: list[Any]) -> None:
        windows: dict[int, tuple[asyncio.Future[FlushResult], list[tuple[Any, str]]]] = {}
        for message in messages:
            try:
                collected = contracts.decode_collected(message.data)
            except contracts.UnreadableEvent as error:
                log.error("status_dead_letter", subject=message.subject, reason=str(error))
                await message.term()
                continue
            if collected is None:
                await message.ack()
                continue
            seq = int(message.metadata.sequence.stream)
            received_at = contracts.parse_time(collected.received_at)
            count_quality = seq > self._counted_up_to and collected.quality_mean is not None
            future = self.batcher.submit(
                collected.device_id,
                StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, received_at),
                quality=(received_at, collected.count, collected.quality_mean or 0.0)
                if count_quality
                else None,
                offset=(LIVENESS_CONSUMER, seq),
            )
            self._counted_up_to = max(self._counted_up_to, seq)
            windows.setdefault(id(future), (future, []))[1].append((message, collected.device_id))
        for future, held in windows.values():
            task = asyncio.create_task(self._settle(future, held))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

    async def _settle(
        self, future: asyncio.Future[FlushResult], held: list[tuple[Any, str]]
    ) -> None:
        result = await future
        for message, device_id in held:
            try:
                if device_id in result.failed:
                    await _settle_failed(message, "status write failed")
                elif device_id in result.unknown:
                    await self._unknown_device(message, device_id)
                else:
                    await message.ack()
            except Exception as error:  # the server redelivers after ack_wait
                log.warning("status_ack_failed", error=repr(error))

    @staticmethod
    async def _unknown_device(message: Any, device_id: str) -> None:
        """Its registration may not be projected yet: retry a few times, then drop."""
        if int(message.metadata.num_delivered) >= MAX_DELIVER:
            log.warning("status_telemetry_for_unknown_device", device_id=device_id)
            await message.term()
            return
        await message.nak(delay=UNKNOWN_DEVICE_RETRY_S)


Handler = Callable[[Any], Awaitable[None]]


class DeviceMessages:
    """Status messages and ping answers that devices publish over MQTT."""

    def __init__(self, backbone: Backbone, batcher: ReportBatcher, clock: Clock) -> None:
        self.backbone = backbone
        self.batcher = batcher
        self.clock = clock
        self._subscriptions: list[Any] = []

    async def start(self) -> None:
        for subject, handler in (
            (contracts.DEVICE_STATUS_SUBJECTS, self._on_status),
            (contracts.PING_RESPONSE_SUBJECTS, self._on_ping_answer),
        ):
            self._subscriptions.append(
                await self.backbone.nc.subscribe(subject, queue=QUEUE_GROUP, cb=handler)
            )

    async def stop(self) -> None:
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _on_status(self, message: Any) -> None:
        self.status_message(message.subject, message.data)

    async def _on_ping_answer(self, message: Any) -> None:
        self.ping_answer(message.subject, message.data)

    def status_message(self, subject: str, data: bytes) -> None:
        """`{"status": "online"}` is a sign of life; `"offline"` (a last will when
        `"cause": "last_will"`) takes the device offline at once."""
        now = self.clock.now()
        try:
            device_id = contracts.device_of_subject(subject)
            message = contracts.decode_status_message(data)
        except ValueError as error:
            log.info("status_message_ignored", subject=subject, reason=str(error))
            return
        if message.status == "online":
            report = StatusReport(
                DeviceState.ONLINE, StatusCause.MQTT_CONNECT, now, detail="device reported online"
            )
        elif message.cause == "last_will":
            report = StatusReport(
                DeviceState.OFFLINE, StatusCause.LAST_WILL, now, detail="last will"
            )
        else:
            report = StatusReport(
                DeviceState.OFFLINE,
                StatusCause.MQTT_DISCONNECT,
                now,
                detail="device reported offline",
            )
        self.batcher.submit(device_id, report)

    def ping_answer(self, subject: str, data: bytes) -> None:
        now = self.clock.now()
        try:
            device_id = contracts.device_of_subject(subject)
            answer = contracts.decode_ping_answer(data)
        except ValueError as error:
            log.info("status_ping_answer_ignored", subject=subject, reason=str(error))
            return
        self.batcher.submit(device_id, answer=(answer.command_id, now))
