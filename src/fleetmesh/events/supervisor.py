"""Runs one delivery worker per active subscription, and replays and redrives.

The subscriptions table is the truth: `sync()` reads it and starts or stops
workers to match, at start, after every change made here, when another
process announces a change on `eventbus.control.subscriptions`, and every 30 s.
Replicas of the events service each run a worker per subscription on the same
durable consumer, so JetStream spreads the deliveries between them.

Replay (`:replay`) creates a temporary consumer over the subscription's
subjects from a stream sequence or a time up to the stream's last sequence at
the time of the request, and runs a worker on it with the same delivery rules;
the consumer is deleted when every replayed event has an outcome (and by
JetStream after an hour of inactivity if the process stops first: replays are
not resumed after a restart; ask again). Redrive re-sends dead letters from
their stored payload with the subscription's retry policy (in process).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from fleetmesh.core.backbone import EVENTS_STREAM, Backbone
from fleetmesh.core.clock import Clock
from fleetmesh.core.database import Database
from fleetmesh.core.errors import Conflict
from fleetmesh.core.ids import new_id
from fleetmesh.core.logging import get_logger
from fleetmesh.events.cloudevents import CloudEvent
from fleetmesh.events.delivery import (
    ACK_WAIT_S,
    DELIVERED,
    FAILED,
    Attempt,
    DeliveryRecorder,
    NatsSender,
    Sender,
    SubscriptionWorker,
    WebhookSender,
    decode_stored,
    new_ssl_context,
)
from fleetmesh.events.domain import RetryPolicy, delay_for
from fleetmesh.events.guard import HostGuard
from fleetmesh.events.repository import DeadLetter, DeliveryLogWriter, DeliveryRecord
from fleetmesh.events.service import (
    EventBusQueries,
    UnitOfWorkFactory,
    purge_delivery_log,
    record_deliveries,
    resolve_dead_letter,
)
from fleetmesh.events.subscription import Subscription, SubscriptionNotFound, consumer_name

log = get_logger(__name__)

CONTROL_SUBJECT = "eventbus.control.subscriptions"
RESYNC_EVERY_S = 30.0
PURGE_EVERY_S = 600.0
REPLAY_INACTIVE_S = 3600.0
REPLAY_POLL_S = 0.25


def minimal_subject_filters(filters: tuple[str, ...]) -> list[str]:
    """Filters JetStream accepts together: none covered by another, none overlapping.

    A filter covered by another is dropped; if two remaining ones still overlap
    (`events.*.a.v1` and `events.device.>`), the consumer reads `events.>` and
    the worker's type match does the filtering.
    """
    kept: list[str] = []
    for candidate in dict.fromkeys(filters):
        if any(_covers(other, candidate) for other in filters if other != candidate):
            continue
        kept.append(candidate)
    for index, first in enumerate(kept):
        for second in kept[index + 1 :]:
            if _overlap(first.split("."), second.split(".")):
                return ["events.>"]
    return kept


def _covers(general: str, specific: str) -> bool:
    """Whether every subject matched by `specific` is matched by `general`."""
    outer, inner = general.split("."), specific.split(".")
    for index, token in enumerate(outer):
        if token == ">":
            return len(inner) > index
        if index >= len(inner):
            return False
        if token != "*" and (inner[index] in ("*", ">") or inner[index] != token):
            return False
    return len(inner) == len(outer)


def _overlap(first: list[str], second: list[str]) -> bool:
    for index in range(max(len(first), len(second))):
        a = first[index] if index < len(first) else None
        b = second[index] if index < len(second) else None
        if a == ">" or b == ">":
            return a is not None and b is not None
        if a is None or b is None:
            return False
        if a != b and "*" not in (a, b):
            return False
    return True


def consumer_config(
    subscription: Subscription,
    *,
    name: str,
    deliver: dict[str, Any],
    inactive_threshold: float | None = None,
) -> ConsumerConfig:
    filters = minimal_subject_filters(subscription.matcher.subject_filters)
    return ConsumerConfig(
        name=name,
        durable_name=None if inactive_threshold else name,
        description=f"fleetmesh subscription {subscription.id}",
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_S,
        max_deliver=-1,
        max_ack_pending=subscription.options.max_ack_pending,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
        inactive_threshold=inactive_threshold,
        **deliver,
    )


@dataclass
class Match:
    """The subscriptions an event goes to, and those whose filters turned it away."""

    matched: list[Subscription] = field(default_factory=list)
    filtered: list[Subscription] = field(default_factory=list)


@dataclass
class Replay:
    id: str
    subscription_id: str
    from_sequence: int | None
    from_time: datetime | None
    to_sequence: int
    status: str = "running"


class Supervisor:
    """The delivery engine of a process (implements the use cases' `DeliveryControl`)."""

    def __init__(
        self,
        *,
        backbone: Backbone,
        database: Database,
        uow_factory: UnitOfWorkFactory,
        queries: EventBusQueries,
        guard: HostGuard,
        clock: Clock,
        policy: Callable[[], RetryPolicy],
    ) -> None:
        self.backbone = backbone
        self.uow_factory = uow_factory
        self.queries = queries
        self.guard = guard
        self.clock = clock
        self.default_policy = policy
        self.recorder = DeliveryRecorder(DeliveryLogWriter(database))
        self.subscriptions: dict[str, Subscription] = {}
        self._workers: dict[str, SubscriptionWorker] = {}
        self._senders: dict[str, Sender] = {}
        self._replays: dict[str, tuple[Replay, asyncio.Task[None]]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()
        self._control: Any = None
        self._ssl = new_ssl_context()
        self._rng = random.Random()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.recorder.start()
        await self.sync()
        self._control = await self.backbone.nc.subscribe(CONTROL_SUBJECT, cb=self._on_control)
        self._spawn(self._housekeeping())

    async def stop(self) -> None:
        if self._control is not None:
            with contextlib.suppress(Exception):
                await self._control.unsubscribe()
        for task in list(self._background):
            task.cancel()
        for _, task in list(self._replays.values()):
            task.cancel()
        tasks = [*self._background, *(task for _, task in self._replays.values())]
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        async with self._lock:
            await asyncio.gather(*(worker.stop() for worker in self._workers.values()))
            self._workers.clear()
        await self.recorder.stop()
        for sender in self._senders.values():
            with contextlib.suppress(Exception):
                await sender.aclose()
        self._senders.clear()

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _on_control(self, _message: Any) -> None:
        self._spawn(self.sync())

    async def _housekeeping(self) -> None:
        elapsed = 0.0
        while True:
            await asyncio.sleep(RESYNC_EVERY_S)
            elapsed += RESYNC_EVERY_S
            try:
                await self.sync()
                if elapsed >= PURGE_EVERY_S:
                    elapsed = 0.0
                    await purge_delivery_log(uow=self.uow_factory(), clock=self.clock)
            except Exception as error:
                log.warning("event_bus_housekeeping_failed", error=repr(error))

    # ------------------------------------------------------------------ DeliveryControl

    async def prepare(self, subscription: Subscription) -> None:
        config = consumer_config(
            subscription,
            name=subscription.consumer_name,
            deliver={"deliver_policy": DeliverPolicy.NEW},
        )
        await self.backbone.js.add_consumer(EVENTS_STREAM, config)

    async def discard(self, subscription_id: str) -> None:
        for replay, task in list(self._replays.values()):
            if replay.subscription_id == subscription_id:
                task.cancel()
        async with self._lock:
            await self._stop_worker(subscription_id)
        with contextlib.suppress(NotFoundError):
            await self.backbone.js.delete_consumer(EVENTS_STREAM, consumer_name(subscription_id))

    async def changed(self) -> None:
        await self.sync()
        with contextlib.suppress(Exception):
            await self.backbone.nc.publish(CONTROL_SUBJECT, b"")

    async def sync(self) -> None:
        """Start and stop workers to match the subscriptions table."""
        async with self._lock:
            found = {s.id: s for s in await self.queries.subscriptions()}
            self.subscriptions = found
            for subscription_id, worker in list(self._workers.items()):
                current = found.get(subscription_id)
                if current is None or not current.is_active or worker.gone:
                    await self._stop_worker(subscription_id, keep_sender=current is not None)
            for subscription in found.values():
                if subscription.is_active and subscription.id not in self._workers:
                    await self._start_worker(subscription)
            for subscription_id in list(self._senders):
                if subscription_id not in found:
                    with contextlib.suppress(Exception):
                        await self._senders.pop(subscription_id).aclose()

    async def _start_worker(self, subscription: Subscription) -> None:
        try:
            await self._ensure_consumer(subscription)
        except Exception as error:
            log.warning("delivery_consumer_failed", subscription=subscription.id, error=repr(error))
            return
        worker = SubscriptionWorker(
            subscription,
            consumer=subscription.consumer_name,
            backbone=self.backbone,
            recorder=self.recorder,
            sender=self.sender_for(subscription),
            policy=self.policy_for(subscription),
            clock=self.clock,
            rng=self._rng,
        )
        await worker.start()
        self._workers[subscription.id] = worker

    async def _stop_worker(self, subscription_id: str, *, keep_sender: bool = False) -> None:
        worker = self._workers.pop(subscription_id, None)
        if worker is not None:
            await worker.stop()
        if not keep_sender and subscription_id in self._senders:
            with contextlib.suppress(Exception):
                await self._senders.pop(subscription_id).aclose()

    async def _ensure_consumer(self, subscription: Subscription) -> None:
        try:
            await self.backbone.js.consumer_info(EVENTS_STREAM, subscription.consumer_name)
        except NotFoundError:
            log.warning("delivery_consumer_recreated", subscription=subscription.id)
            await self.prepare(subscription)

    def sender_for(self, subscription: Subscription) -> Sender:
        sender = self._senders.get(subscription.id)
        if sender is None:
            if subscription.endpoint.is_nats:
                sender = NatsSender(subscription, backbone=self.backbone)
            else:
                sender = WebhookSender(subscription, guard=self.guard, ssl_context=self._ssl)
            self._senders[subscription.id] = sender
        return sender

    def policy_for(self, subscription: Subscription) -> Callable[[], RetryPolicy]:
        own = subscription.options.retry
        if own is not None:
            return lambda: own
        return self.default_policy

    # ------------------------------------------------------------------ matching

    def match(self, event: CloudEvent) -> Match:
        """Which subscriptions (active or paused) the event goes to."""
        found = Match()
        for subscription in self.subscriptions.values():
            matcher = subscription.matcher
            patterns = matcher.type_patterns
            if patterns and not any(pattern.matches(event.type) for pattern in patterns):
                continue
            if matcher.filter.matches(event):
                found.matched.append(subscription)
            else:
                found.filtered.append(subscription)
        return found

    # ------------------------------------------------------------------ stats

    async def consumer_state(self, subscription_id: str) -> tuple[int, int] | None:
        """(lag, pending acks) of the subscription's consumer, None when it is missing."""
        try:
            info = await self.backbone.js.consumer_info(
                EVENTS_STREAM, consumer_name(subscription_id)
            )
        except NotFoundError:
            return None
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)

    # ------------------------------------------------------------------ replay

    async def replay(
        self, subscription_id: str, *, from_sequence: int | None, from_time: datetime | None
    ) -> Replay:
        subscription = await self.queries.subscription(subscription_id)
        if not subscription.is_active:
            raise Conflict("The subscription is paused; resume it before replaying.")
        info = await self.backbone.js.stream_info(EVENTS_STREAM)
        replay = Replay(
            id=new_id(),
            subscription_id=subscription_id,
            from_sequence=from_sequence,
            from_time=from_time,
            to_sequence=int(info.state.last_seq),
        )
        if from_sequence is not None:
            deliver: dict[str, Any] = {
                "deliver_policy": DeliverPolicy.BY_START_SEQUENCE,
                "opt_start_seq": max(1, from_sequence),
            }
        else:
            assert from_time is not None
            deliver = {
                "deliver_policy": DeliverPolicy.BY_START_TIME,
                "opt_start_time": from_time.isoformat(),
            }
        name = f"rp_{replay.id}"
        config = consumer_config(
            subscription, name=name, deliver=deliver, inactive_threshold=REPLAY_INACTIVE_S
        )
        await self.backbone.js.add_consumer(EVENTS_STREAM, config)
        worker = SubscriptionWorker(
            subscription,
            consumer=name,
            backbone=self.backbone,
            recorder=self.recorder,
            sender=self.sender_for(subscription),
            policy=self.policy_for(subscription),
            clock=self.clock,
            end_sequence=replay.to_sequence,
            rng=self._rng,
        )
        await worker.start()
        task = asyncio.create_task(self._watch_replay(replay, worker, name))
        self._replays[replay.id] = (replay, task)
        task.add_done_callback(lambda _: self._replays.pop(replay.id, None))
        return replay

    async def _watch_replay(self, replay: Replay, worker: SubscriptionWorker, name: str) -> None:
        try:
            while True:
                await asyncio.sleep(REPLAY_POLL_S)
                info = await self.backbone.js.consumer_info(EVENTS_STREAM, name)
                delivered = int(info.delivered.stream_seq or 0) if info.delivered else 0
                caught_up = not info.num_pending or delivered >= replay.to_sequence
                if caught_up and not info.num_ack_pending:
                    replay.status = "done"
                    return
        finally:
            await worker.stop()
            with contextlib.suppress(Exception):
                await self.backbone.js.delete_consumer(EVENTS_STREAM, name)
            log.info("replay_finished", replay=replay.id, status=replay.status)

    # ------------------------------------------------------------------ dead letters

    async def redrive(self, subscription_id: str) -> int:
        """Re-send every dead letter of the subscription in the background; how many."""
        subscription = await self.queries.subscription(subscription_id)
        letters = await self.queries.dead_letters(subscription_id, status="dead", limit=10_000)
        if letters:
            self._spawn(self._redrive(subscription, letters))
        return len(letters)

    async def _redrive(self, subscription: Subscription, letters: list[DeadLetter]) -> None:
        policy = self.policy_for(subscription)()
        for letter in letters:
            try:
                await self.redeliver(subscription, letter, max_attempts=policy.max_attempts)
            except Exception as error:
                log.warning("redrive_failed", letter=letter.id, error=repr(error))

    async def redeliver(
        self, subscription: Subscription, letter: DeadLetter, *, max_attempts: int
    ) -> Attempt:
        """Send a dead letter again (up to `max_attempts` tries); the letter records the result."""
        if subscription.id not in self.subscriptions:
            raise SubscriptionNotFound(f"Subscription {subscription.id!r} does not exist.")
        event = decode_stored(letter.payload)
        if isinstance(event, str):
            return Attempt(False, None, event)
        sender = self.sender_for(subscription)
        policy = self.policy_for(subscription)()
        attempts = letter.attempts
        attempt = Attempt(False)
        for tries in range(1, max_attempts + 1):
            attempt = await sender.send([event])
            attempts += 1
            record = DeliveryRecord(
                subscription_id=subscription.id,
                event_id=event.id,
                event_type=event.type,
                sequence=letter.sequence,
                attempt=attempts,
                status=DELIVERED if attempt.ok else FAILED,
                http_status=attempt.http_status,
                latency_ms=attempt.latency_ms,
                error=attempt.error,
                created_at=self.clock.now(),
            )
            await record_deliveries([record], [], uow=self.uow_factory())
            if attempt.ok or tries == max_attempts:
                break
            await asyncio.sleep(delay_for(tries, policy, self._rng))
        await resolve_dead_letter(
            letter,
            delivered=attempt.ok,
            attempts=attempts,
            last_status=attempt.http_status,
            error=attempt.error or "",
            uow=self.uow_factory(),
            clock=self.clock,
        )
        return attempt
