"""The writer: stores the TELEMETRY stream in the database, many messages per transaction.

A durable pull consumer (``telemetry-writer``, explicit ack, ``ack_wait`` 30 s,
``max_deliver`` 20 with nak back-off, then the dead-letter stream) fetches up to 1,000
messages at once and stores them in transactions of at most ``MAX_POINTS_PER_TRANSACTION``
points (``service.store_batches``: SQLite ``executemany`` / PostgreSQL ``COPY``). Messages
are acked after the commit; a message redelivered after a crash between commit and ack is
found in ``telemetry_batches`` and skipped, so rows are never duplicated. Under load the
batches grow on their own (everything pending is fetched at once), which is what keeps the
per-row cost low.

If a transaction fails, its messages are retried one by one, so a poison message is isolated
(nak'ed with back-off, eventually dead-lettered) and its neighbours are stored.

``StoredNotifier`` lets an ingest call wait until its points are queryable
(``?wait=stored``): an in-process future per message id, resolved after the commit, with a
fallback poll of ``telemetry_batches`` for when another process's writer stored it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Final, Protocol

import msgspec
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StreamConfig,
)

from fleetmesh.core.backbone import Backbone
from fleetmesh.core.clock import Clock
from fleetmesh.core.database import Database
from fleetmesh.core.logging import get_logger
from fleetmesh.core.pull import BatchPull
from fleetmesh.telemetry import contracts
from fleetmesh.telemetry.consumers import (
    MAX_DELIVER,
    PullLoop,
    dead_letter,
    retry_or_dead_letter,
)
from fleetmesh.telemetry.contracts import IngestMessage
from fleetmesh.telemetry.metrics import TelemetryMetrics
from fleetmesh.telemetry.repository import PointStore
from fleetmesh.telemetry.service import StoreResult, UnitOfWorkFactory, store_batches

log = get_logger(__name__)

WRITER_DURABLE: Final = "telemetry-writer"
MAX_MESSAGES_PER_FETCH: Final = 1_000
MAX_POINTS_PER_TRANSACTION: Final = 50_000
WRITER_CONCURRENCY: Final = 2
"""Fetches handled at once: the next one is decoded and staged while the database
writes the last (PostgreSQL writes both at once; SQLite one after the other)."""
ACK_WAIT_S: Final = 30.0
DAY_S: Final = 86_400
STREAM_MAX_AGE_S: Final = 7 * DAY_S
STREAM_MAX_BYTES: Final = 2 * 1024**3
DEAD_LETTER_MAX_AGE_S: Final = 30 * DAY_S


def telemetry_stream_config() -> StreamConfig:
    """Interest retention: a message lives until every consumer acked it (or 7 days).

    ``discard=new`` with a byte limit: when the writer is far behind, publishing fails (the
    API answers 503) instead of silently dropping old, unstored points.
    """
    return StreamConfig(
        name=contracts.TELEMETRY_STREAM,
        subjects=[contracts.INGEST_SUBJECT_PREFIX + ">"],
        retention=RetentionPolicy.INTEREST,
        discard=DiscardPolicy.NEW,
        max_age=STREAM_MAX_AGE_S,
        max_bytes=STREAM_MAX_BYTES,
        duplicate_window=120.0,
    )


def dead_letter_stream_config() -> StreamConfig:
    return StreamConfig(
        name=contracts.DEAD_LETTER_STREAM,
        subjects=[contracts.DEAD_LETTER_SUBJECT_PREFIX + ">"],
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=DEAD_LETTER_MAX_AGE_S,
        duplicate_window=120.0,
    )


def writer_consumer_config() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=WRITER_DURABLE,
        filter_subject=contracts.INGEST_SUBJECT_PREFIX + ">",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_S,
        max_deliver=MAX_DELIVER,
        max_ack_pending=20_000,
        max_waiting=512,
    )


class StoredNotifier:
    """Futures per message id, resolved once the writer committed that message."""

    def __init__(self, database: Database, *, poll_s: float = 0.25) -> None:
        self.database = database
        self.poll_s = poll_s
        self._futures: dict[str, asyncio.Future[None]] = {}

    def expect(self, message_id: str) -> asyncio.Future[None]:
        """Call before publishing, so a fast writer cannot resolve before anyone listens."""
        future = self._futures.get(message_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._futures[message_id] = future
        return future

    def forget(self, message_id: str) -> None:
        future = self._futures.pop(message_id, None)
        if future is not None and not future.done():
            future.cancel()

    def resolve(self, message_ids: list[str]) -> None:
        for message_id in message_ids:
            future = self._futures.pop(message_id, None)
            if future is not None and not future.done():
                future.set_result(None)

    async def wait(self, message_id: str, future: asyncio.Future[None], timeout: float) -> bool:
        """True once the message is stored; False if ``timeout`` passed first.

        ``future`` comes from ``expect``; between two looks at it, the table is polled (the
        writer of another process may have stored the message).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while not future.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(future), min(remaining, self.poll_s))
                    return True
                if await self._stored(message_id):
                    return True
            return not future.cancelled()
        finally:
            self.forget(message_id)

    async def _stored(self, message_id: str) -> bool:
        async with self.database.session() as session:
            return await PointStore(session).stored(message_id)


class Storing(Protocol):
    """`BatchStore`, as `store_isolating` uses it."""

    async def store(self, messages: Sequence[IngestMessage]) -> object:
        """Store the messages in one transaction (those stored before are skipped)."""


async def store_isolating(
    store: Storing, messages: Sequence[IngestMessage]
) -> dict[str, Exception]:
    """Store in one transaction; if that fails, each message alone, so one that cannot be
    stored does not hold back the others. Returns the failures by message id."""
    try:
        await store.store(messages)
        return {}
    except Exception as error:
        log.warning("telemetry_store_failed", messages=len(messages), error=repr(error))
    failures: dict[str, Exception] = {}
    for message in messages:
        try:
            await store.store([message])
        except Exception as error:
            failures[message.id] = error
    return failures


class BatchStore:
    """Stores accepted batches in one transaction and tells whoever waits for them."""

    def __init__(
        self,
        *,
        uow_factory: UnitOfWorkFactory,
        notifier: StoredNotifier,
        clock: Clock,
        metrics: TelemetryMetrics,
    ) -> None:
        self.uow_factory = uow_factory
        self.notifier = notifier
        self.clock = clock
        self.metrics = metrics

    async def store(self, messages: Sequence[IngestMessage]) -> StoreResult:
        started = time.perf_counter()
        result = await store_batches(messages, uow=self.uow_factory(), now=self.clock.now())
        self.metrics.store_seconds.observe(time.perf_counter() - started)
        self.metrics.points_stored.inc(result.points)
        if result.points:
            self.metrics.last_stored.set_to_current_time()
        self.metrics.batches_stored.inc(len(result.stored))
        self.metrics.batches_duplicate.inc(len(result.duplicates))
        self.notifier.resolve(result.stored + result.duplicates)
        return result


class TelemetryWriter:
    """The durable consumer of the TELEMETRY stream; see the module docstring."""

    def __init__(self, *, backbone: Backbone, store: BatchStore) -> None:
        self.backbone = backbone
        self.batches = store
        self.loop = PullLoop(
            name="telemetry-writer",
            subscribe=self._subscribe,
            handle=self.handle,
            max_messages=lambda: MAX_MESSAGES_PER_FETCH,
            drain_s=0.02,
            concurrency=WRITER_CONCURRENCY,
        )

    @property
    def running(self) -> bool:
        return self.loop.running

    async def start(self) -> None:
        await self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()

    async def _subscribe(self) -> BatchPull:
        backbone = self.backbone
        return await BatchPull.subscribe(
            backbone.nc, backbone.js, contracts.TELEMETRY_STREAM, writer_consumer_config()
        )

    async def handle(self, messages: list[Msg]) -> None:
        decoded: list[tuple[Msg, IngestMessage]] = []
        for message in messages:
            try:
                decoded.append((message, contracts.decode_message(message.data)))
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                reason = f"not a telemetry ingest message: {error}"
                await dead_letter(self.backbone, message, reason, key=_device_of(message))
        for group in _transactions(decoded):
            failures = await store_isolating(self.batches, [batch for _, batch in group])
            for message, batch in group:
                failure = failures.get(batch.id)
                if failure is None:
                    await message.ack()
                else:
                    await retry_or_dead_letter(self.backbone, message, failure, key=batch.device_id)


def _transactions(
    decoded: list[tuple[Msg, IngestMessage]],
) -> Iterator[list[tuple[Msg, IngestMessage]]]:
    group: list[tuple[Msg, IngestMessage]] = []
    points = 0
    for item in decoded:
        size = len(item[1].points)
        if group and points + size > MAX_POINTS_PER_TRANSACTION:
            yield group
            group, points = [], 0
        group.append(item)
        points += size
    if group:
        yield group


def _device_of(message: Msg) -> str:
    return message.subject.removeprefix(contracts.INGEST_SUBJECT_PREFIX)
