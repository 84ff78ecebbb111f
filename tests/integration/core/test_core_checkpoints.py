"""WAL checkpoints run in the background, not inside the platform's commits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text

from fleetmesh.core.checkpoints import SAFETY_NET_PAGES
from fleetmesh.core.database import Database

pytestmark = pytest.mark.integration


async def _write_rows(database: Database, count: int) -> None:
    async with database.session() as session:
        await session.execute(text("CREATE TABLE IF NOT EXISTS t (n INTEGER, pad TEXT)"))
        await session.execute(
            text("INSERT INTO t VALUES (:n, :pad)"),
            [{"n": n, "pad": "x" * 200} for n in range(count)],
        )
        await session.commit()


def _wal_pages(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size // 4096 if wal.exists() else 0


async def test_commits_leave_the_wal_to_the_checkpointer_which_copies_it(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    database = Database(f"sqlite+aiosqlite:///{path}")
    try:
        async with database.session() as session:
            settings = [
                (await session.execute(text(f"PRAGMA {name}"))).scalar_one()
                for name in ("cache_size", "wal_autocheckpoint", "journal_mode")
            ]
        assert settings == [-65536, SAFETY_NET_PAGES, "wal"]
        await _write_rows(database, 20_000)  # about 1,500 pages: past SQLite's default 1,000
        assert database.checkpointer is not None
        busy, frames, copied = await asyncio.to_thread(database.checkpointer.checkpoint)
        assert (busy, copied) == (0, frames) and frames > 1_000
        assert _wal_pages(path) >= frames
    finally:
        await database.dispose()


async def test_the_started_checkpointer_runs_until_disposed(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    assert database.checkpointer is not None
    database.checkpointer.interval_s = 0.05
    database.start_checkpoints()
    await _write_rows(database, 100)
    for _ in range(100):
        if database.checkpointer.checkpoints >= 2:
            break
        await asyncio.sleep(0.05)
    await database.dispose()
    done = database.checkpointer.checkpoints
    assert done >= 2
    await asyncio.sleep(0.2)
    assert database.checkpointer.checkpoints == done


def test_postgresql_has_no_checkpointer() -> None:
    assert Database("postgresql+asyncpg://postgres@127.0.0.1:5432/test").checkpointer is None
