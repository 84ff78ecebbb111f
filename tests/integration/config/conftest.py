"""Fixtures of the config tests: the app on a real HTTP port (for streaming responses)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import uvicorn

from fleetmesh.bootstrap import Platform
from fleetmesh.core.ports import free_port
from fleetmesh.gateway.app import create_app


@pytest.fixture
async def live_url(sqlite_platform: Platform) -> AsyncIterator[str]:
    """The platform's app served by uvicorn on a free loopback port (for streaming responses)."""
    port = free_port()
    config = uvicorn.Config(
        create_app(sqlite_platform),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
