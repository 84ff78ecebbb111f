"""The unit of work: one transaction, its repositories, and the events it will publish.

Use cases are the only callers of `commit()`. Events added with `emit()` are
written to the outbox table inside the same transaction as the state change
(transactional outbox), so a crash after the commit loses no event: the relay
publishes them later.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Self

from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.core.clock import utcnow
from fleetmesh.core.database import Database
from fleetmesh.core.envelope import CloudEvent
from fleetmesh.core.outbox_rows import OutboxRow, insert_outbox_rows


class SqlUnitOfWork:
    """A transaction on the database; subclasses attach their repositories in `_open`."""

    def __init__(self, database: Database, *, on_commit: Callable[[], None] | None = None) -> None:
        self.database = database
        self._on_commit = on_commit
        self._pending: list[OutboxRow] = []
        """Outbox rows of the events emitted, stamped with one `created_at` at commit."""
        self._session: AsyncSession | None = None
        self._lock_held = False
        self._lock_on_enter = True

    @property
    def session(self) -> AsyncSession:
        if self._session is None:
            raise RuntimeError("unit of work used outside `async with`")
        return self._session

    async def __aenter__(self) -> Self:
        # Several processes on one SQLite file begin with the file's write lock (`BEGIN
        # IMMEDIATE`): taking the in-process lock later could wait for a writer that waits
        # for the file.
        if self._lock_on_enter or self.database.shared_sqlite:
            await self.lock_writes()
        self._session = self.database.session()
        self._open(self._session)
        return self

    def lock_writes_later(self) -> Self:
        """Enter without the writer lock; the use case calls `lock_writes` itself, after
        work that writes no shared table (on SQLite, into a temporary table), so that work
        runs beside other writers."""
        self._lock_on_enter = False
        return self

    async def lock_writes(self) -> None:
        """On SQLite, wait for the in-process writer lock, held until the unit of work
        ends: one writer at a time, as a SQLite transaction that reads, then writes after
        another writer committed, fails at once instead of waiting. PostgreSQL needs none."""
        if self.database.is_sqlite and not self._lock_held:
            await self.database.write_lock.acquire()
            self._lock_held = True

    def _open(self, session: AsyncSession) -> None:
        """Attach repositories to the session (subclasses)."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._session is not None:
                if not self._session.in_transaction():
                    # Committed, nothing left to undo: the next writer need not wait for
                    # the connection's return to the pool (a rollback on the driver's thread).
                    self._unlock_writes()
                with contextlib.suppress(Exception):
                    await self._session.rollback()
                await self._session.close()
        finally:
            self._session = None
            self._pending.clear()
            self._unlock_writes()

    def _unlock_writes(self) -> None:
        if self._lock_held:
            self._lock_held = False
            self.database.write_lock.release()

    def emit(self, event: CloudEvent) -> None:
        """Publish this event if, and only if, the transaction commits."""
        self._pending.append((event.id, event.nats_subject, event.to_json()))

    def emit_encoded(self, event_id: str, subject: str, payload: bytes) -> None:
        """`emit` for an event already encoded as its CloudEvent JSON (a hot path's own
        encoder, which must give the bytes `CloudEvent.to_json` would)."""
        self._pending.append((event_id, subject, payload))

    async def commit(self) -> None:
        if self._pending:
            # Once the rows are built: no row is stamped before its event.
            await insert_outbox_rows(
                self.session, self.database.engine.dialect.name, self._pending, utcnow()
            )
            self._pending.clear()
        await self.session.commit()
        if self._on_commit is not None:
            self._on_commit()

    async def rollback(self) -> None:
        self._pending.clear()
        await self.session.rollback()
