"""Fixtures of the registry tests: instances on loopback, and the app on a real HTTP port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import uvicorn

from fleetmesh.bootstrap import Platform
from fleetmesh.core.ports import free_port
from fleetmesh.gateway.app import create_app


class FakeInstance:
    """A service instance on loopback answering GET /health with `status`; `stop()` kills it."""

    def __init__(self) -> None:
        self.status = 200
        self.port = 0
        self.requests = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> FakeInstance:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            body = b"{}"
            head = (
                f"HTTP/1.1 {self.status} Status\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def fake_instance() -> AsyncIterator[FakeInstance]:
    instance = await FakeInstance().start()
    try:
        yield instance
    finally:
        await instance.stop()


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
