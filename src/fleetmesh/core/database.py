"""The database engine: SQLite (WAL) in the data dir, or PostgreSQL.

Schemas are managed by Alembic. Each context keeps its migrations in
`fleetmesh/<context>/migrations/` as its own Alembic branch (labelled with
the context name), so a service can migrate just its own tables when it runs
on a database of its own, and the embedded platform upgrades every head.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

_MIGRATION_LOCK_ID = 0x46_4C_45_45_54  # "FLEET", one advisory lock for every replica


class Database:
    """An async engine and its session factory; `migrate()` brings the schema up to date."""

    def __init__(self, url: str, *, echo: bool = False, shared_sqlite: bool = False) -> None:
        self.url = url
        self.shared_sqlite = shared_sqlite
        self.engine: AsyncEngine = _create_engine(url, echo=echo, shared_sqlite=shared_sqlite)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._sqlite_write_lock = asyncio.Lock()

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def session(self) -> AsyncSession:
        return self.sessions()

    @property
    def write_lock(self) -> asyncio.Lock:
        """SQLite has one writer: serialising writers in-process avoids busy errors."""
        return self._sqlite_write_lock

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """Hold the single-writer lock on SQLite; PostgreSQL needs none."""
        if not self.is_sqlite:
            yield
            return
        async with self._sqlite_write_lock:
            yield

    async def migrate(self, branches: list[str] | None = None) -> None:
        """Apply every migration (or only these context branches) under a lock."""
        async with self.engine.connect() as connection:
            if self.is_postgres:
                await connection.execute(
                    text("SELECT pg_advisory_lock(:id)"), {"id": _MIGRATION_LOCK_ID}
                )
            try:
                await connection.run_sync(_upgrade, branches)
                await connection.commit()
            finally:
                if self.is_postgres:
                    await connection.execute(
                        text("SELECT pg_advisory_unlock(:id)"), {"id": _MIGRATION_LOCK_ID}
                    )
                    await connection.commit()

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    async def dispose(self) -> None:
        await self.engine.dispose()


def _create_engine(url: str, *, echo: bool, shared_sqlite: bool) -> AsyncEngine:
    if url.startswith("sqlite"):
        # A pool: opening an aiosqlite connection (a thread, the pragmas) costs ~2 ms,
        # more than most of the statements a session runs.
        engine = create_async_engine(
            url, echo=echo, connect_args={"timeout": 30}, pool_size=8, max_overflow=16
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        if shared_sqlite:
            _begin_immediate(engine)
        return engine
    return create_async_engine(url, echo=echo, pool_size=10, max_overflow=20, pool_pre_ping=True)


def _begin_immediate(engine: AsyncEngine) -> None:
    """Several processes on one SQLite file: take the write lock when a transaction begins.

    The in-process writer lock cannot serialise other processes, and a deferred
    transaction that reads and then writes fails at once when another process
    wrote in between; `BEGIN IMMEDIATE` waits (busy_timeout) instead.
    """

    def no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    def begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(engine.sync_engine, "connect", no_implicit_begin)
    event.listen(engine.sync_engine, "begin", begin)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Thousands of rows a transaction touch pages all over a 100,000-device store; the
    # default 2 MiB cache rereads them. Allocated as pages are read, so small stores stay small.
    cursor.execute("PRAGMA cache_size=-65536")
    # Temporary tables (the telemetry writer stages its points in one) stay in memory.
    cursor.execute("PRAGMA temp_store=MEMORY")
    cursor.close()


def migration_locations() -> list[Path]:
    """Every context's migration folder that exists in the installed package."""
    root = Path(str(resources.files("fleetmesh")))
    return sorted(path for path in root.glob("*/migrations/versions") if path.is_dir())


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    script_location = Path(str(resources.files("fleetmesh.core"))) / "migrations"
    config.set_main_option("script_location", str(script_location))
    config.set_main_option(
        "version_locations", " ".join(str(path) for path in migration_locations())
    )
    config.set_main_option("path_separator", "space")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection, branches: list[str] | None) -> None:
    logging.getLogger("alembic").setLevel(logging.WARNING)
    config = alembic_config(connection)
    for target in [f"{branch}@head" for branch in branches] if branches else ["heads"]:
        command.upgrade(config, target)
