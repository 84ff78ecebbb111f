"""The SQLite connections the platform opens (WAL, a page cache for large stores, temporary
tables in memory), and the in-process writer lock of units of work."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from fleetmesh.core.database import Database
from fleetmesh.core.uow import SqlUnitOfWork

pytestmark = pytest.mark.integration


async def test_sqlite_connections_use_wal_and_a_64_mib_page_cache(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    try:
        async with database.session() as session:
            settings = [
                (await session.execute(text(f"PRAGMA {name}"))).scalar_one()
                for name in ("journal_mode", "synchronous", "cache_size", "temp_store")
            ]
    finally:
        await database.dispose()
    assert settings == ["wal", 1, -65536, 2]


async def test_a_unit_of_work_entered_to_lock_writes_later_holds_the_lock_only_from_then(
    tmp_path: Path,
) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    try:
        async with SqlUnitOfWork(database):  # another writer holds the lock meanwhile
            async with SqlUnitOfWork(database).lock_writes_later() as later:
                await later.session.execute(text("CREATE TEMP TABLE staged (n)"))
                await later.session.execute(text("INSERT INTO temp.staged VALUES (1)"))
                locking = asyncio.create_task(later.lock_writes())
                await asyncio.sleep(0.05)
                assert not locking.done()
                locking.cancel()
        assert not database.write_lock.locked()
        async with SqlUnitOfWork(database).lock_writes_later() as later:
            await later.lock_writes()
            assert database.write_lock.locked()
            await later.lock_writes()  # once is enough
        assert not database.write_lock.locked()
    finally:
        await database.dispose()


async def test_several_processes_on_one_file_lock_writes_on_enter(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}", shared_sqlite=True)
    try:
        async with SqlUnitOfWork(database).lock_writes_later():
            assert database.write_lock.locked()
    finally:
        await database.dispose()


async def test_a_committed_unit_of_work_unlocks_writes_before_returning_its_connection(
    tmp_path: Path,
) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    locked_at_close: list[bool] = []

    async def remember_lock_then_close(close: Any) -> None:
        locked_at_close.append(database.write_lock.locked())
        await close()

    try:
        for commit in (True, False):
            async with SqlUnitOfWork(database) as uow:
                await uow.session.execute(text("CREATE TABLE IF NOT EXISTS t (n)"))
                await uow.session.execute(text("INSERT INTO t VALUES (1)"))
                close = uow.session.close
                uow.session.close = lambda close=close: remember_lock_then_close(close)  # type: ignore[method-assign]
                if commit:
                    await uow.commit()
    finally:
        await database.dispose()
    assert locked_at_close == [False, True]
