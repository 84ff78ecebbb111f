"""The SQLite connections the platform opens: WAL, and a page cache for large stores."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from fleetmesh.core.database import Database

pytestmark = pytest.mark.integration


async def test_sqlite_connections_use_wal_and_a_64_mib_page_cache(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    try:
        async with database.session() as session:
            settings = [
                (await session.execute(text(f"PRAGMA {name}"))).scalar_one()
                for name in ("journal_mode", "synchronous", "cache_size")
            ]
    finally:
        await database.dispose()
    assert settings == ["wal", 1, -65536]
