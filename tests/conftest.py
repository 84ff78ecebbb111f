"""Fixtures shared by every tier: real nats-server on free ports, real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest

from fleetmesh.bootstrap import Platform, bootstrap
from support import client_for, make_settings

T = TypeVar("T")
PG_ADMIN_URL = os.environ.get("FLEETMESH_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432")


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _pg_available() -> bool:
    async def probe() -> bool:
        try:
            connection = await asyncpg.connect(PG_ADMIN_URL + "/postgres", timeout=3)
        except (OSError, asyncpg.PostgresError):
            return False
        await connection.close()
        return True

    return _run(probe())


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of this test run, dropped at the end."""
    if not _pg_available():
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}")
    name = f"fleetmesh_test_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(PG_ADMIN_URL + "/postgres")
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    _run(admin(f'CREATE DATABASE "{name}"'))
    yield f"{PG_ADMIN_URL}/{name}"
    _run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def reset_pg_schema(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    finally:
        await connection.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """None (SQLite in the data dir) or a clean PostgreSQL database."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("pg_database")
    await reset_pg_schema(url)
    return url


@pytest.fixture
async def platform(tmp_path: Path, database_url: str | None) -> AsyncIterator[Platform]:
    """The whole embedded platform, on SQLite and on PostgreSQL."""
    started = bootstrap(make_settings(tmp_path / "data", database_url))
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture
async def sqlite_platform(tmp_path: Path) -> AsyncIterator[Platform]:
    """The whole embedded platform on SQLite only (for tests where the store does not matter)."""
    started = bootstrap(make_settings(tmp_path / "data"))
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the platform's API (in-process ASGI) with the admin key."""
    async with client_for(platform) as http:
        yield http


@pytest.fixture
async def sqlite_client(sqlite_platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(sqlite_platform) as http:
        yield http
