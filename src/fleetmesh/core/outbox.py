"""The outbox relay: publishes committed domain events to the EVENTS stream.

Each row is published with `Nats-Msg-Id` = the event id, in atomic batches of up
to 1,000 (one PubAck each, see `core.acks`), then marked sent. If the process
dies between publish and mark, the row is published again on the next run and
JetStream drops the duplicate (within the stream's duplicate window; a batch
holding one is refused whole and published again message by message). While
NATS is unreachable the relay backs off and retries; nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.core.acks import OrderedPublish
from fleetmesh.core.backbone import Backbone
from fleetmesh.core.clock import utcnow
from fleetmesh.core.database import Database
from fleetmesh.core.logging import get_logger
from fleetmesh.core.metrics import Metrics
from fleetmesh.core.tables import outbox
from fleetmesh.core.tasks import stop_task

log = get_logger(__name__)

BATCH_SIZE = 2_000
"""Events read per look at the outbox, published without waiting for each PubAck in turn.
On SQLite, marking them published waits for the writer lock, often behind a writer's
whole transaction: a big batch keeps the relay up with bursts of thousands of events."""
MAX_BACKOFF_S = 5.0
KEEP_PUBLISHED = timedelta(hours=1)


def unpublished_rows(database: Database) -> Select[tuple[int, str, str, bytes]]:
    """The relay's next batch: the oldest unpublished rows (on PostgreSQL, through their
    partial index, and only those no other relay holds)."""
    query = (
        select(outbox.c.seq, outbox.c.event_id, outbox.c.subject, outbox.c.payload)
        .where(outbox.c.published_at.is_(None))
        .order_by(outbox.c.seq)
        .limit(BATCH_SIZE)
    )
    if database.is_postgres:
        # Replicas share the outbox: each takes rows nobody else holds.
        query = query.with_for_update(skip_locked=True)
    return query


class OutboxRelay:
    """Background task publishing the outbox; `wake()` makes it look at once after a commit."""

    def __init__(
        self,
        database: Database,
        backbone: Backbone,
        metrics: Metrics,
        *,
        poll_seconds: float = 0.5,
    ) -> None:
        self.database = database
        self.backbone = backbone
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0

    def wake(self) -> None:
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    async def _run(self) -> None:
        cycles = 0
        while True:
            try:
                published = await self.publish_pending()
                self._failures = 0
                cycles += 1
                if cycles % 600 == 0:
                    await self.purge_published()
                if published >= BATCH_SIZE:
                    continue
                await self._sleep(self.poll_seconds)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._failures += 1
                delay = min(MAX_BACKOFF_S, 0.1 * 2**self._failures)
                log.warning("outbox_publish_failed", error=repr(error), retry_in_s=delay)
                await asyncio.sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()
        self._wakeup.clear()

    async def publish_pending(self) -> int:
        """Publish one batch of unpublished events; returns how many were published."""
        async with self.database.session() as session:
            rows = (await session.execute(unpublished_rows(self.database))).all()
            if not self.database.is_postgres:
                await session.commit()  # end the SQLite read snapshot before writing
            if not rows:
                self.metrics.outbox_backlog.set(0)
                return 0
            sent = await self._publish_in_order(rows)
            if sent:
                await self._mark_sent(session, sent)
        self.metrics.outbox_published.inc(len(sent))
        self.metrics.outbox_backlog.set(await self.backlog())
        return len(sent)

    async def _publish_in_order(self, rows: Sequence[Any]) -> list[int]:
        """Publish rows without waiting for each PubAck in turn; returns the seqs of the
        leading rows that were stored (after a failure, the rest are published again next
        time, and JetStream drops those it already has)."""
        outcomes = await self.backbone.publish_in_order(
            [OrderedPublish(subject, payload, event_id) for _, event_id, subject, payload in rows],
            atomic=True,
        )
        stored: list[int] = []
        for row, outcome in zip(rows, outcomes, strict=True):
            if outcome is not None:
                log.warning("outbox_publish_failed", event_id=row.event_id, error=repr(outcome))
                break
            stored.append(row.seq)
        return stored

    async def _mark_sent(self, session: AsyncSession, seqs: list[int]) -> None:
        """Mark the rows published. On SQLite the leading rows of a read are every unpublished
        row between the first and the last (its rowids only grow), so a range finds them
        without thousands of bound ids; on PostgreSQL a row of a transaction still open
        may lie between, so the ids are named."""
        if self.database.is_sqlite:
            where = [outbox.c.seq.between(seqs[0], seqs[-1]), outbox.c.published_at.is_(None)]
        else:
            where = [outbox.c.seq.in_(seqs)]
        statement = update(outbox).where(*where).values(published_at=utcnow())
        async with self.database.writing():
            await session.execute(statement)
            await session.commit()

    async def publish_pending_quietly(self) -> None:
        """Last attempt at shutdown; what fails stays in the outbox for the next start."""
        with contextlib.suppress(Exception):
            while await self.publish_pending() >= BATCH_SIZE:
                pass

    async def backlog(self) -> int:
        async with self.database.session() as session:
            count = await session.scalar(
                select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
            )
            return int(count or 0)

    async def purge_published(self) -> None:
        """Delete rows published more than an hour ago (well past the duplicate window)."""
        cutoff = utcnow() - KEEP_PUBLISHED
        async with self.database.writing(), self.database.session() as session:
            await session.execute(
                delete(outbox).where(
                    outbox.c.published_at.is_not(None), outbox.c.published_at < cutoff
                )
            )
            await session.commit()
