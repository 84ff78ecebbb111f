"""Fixtures of the event bus tests: real webhook receivers on loopback, and API helpers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

Behaviour = Callable[[int, "Request"], tuple[int, float]]
"""(request number from 0, request) -> (HTTP status to answer, seconds to wait before)."""

READING_TYPE = "com.acme.reading.taken"
READING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["temp"],
    "properties": {"temp": {"type": "number"}, "unit": {"type": "string"}},
}


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)
    status: int = 0


def always(status: int) -> Behaviour:
    return lambda _n, _r: (status, 0.0)


class WebhookReceiver:
    """A small HTTP/1.1 server (keep-alive) that records every request and how it answered."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests: list[Request] = []
        self._server: asyncio.Server | None = None
        self._counter = itertools.count()
        self._connections: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def delivered(self) -> list[Request]:
        """Requests answered 2xx (the answer was written)."""
        return [r for r in self.requests if 200 <= r.status < 300]

    async def start(self) -> WebhookReceiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                status, delay = self.behaviour(next(self._counter), request)
                if delay:
                    await asyncio.sleep(delay)
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok".encode())
                await writer.drain()
                request.status = status
                self.requests.append(request)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._connections.discard(writer)
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(method, path, headers, body)


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Awaitable[WebhookReceiver]]]:
    """`await receivers(behaviour)` starts a receiver; all are closed after the test."""
    started: list[WebhookReceiver] = []

    async def start(behaviour: Behaviour = always(200)) -> WebhookReceiver:
        receiver = await WebhookReceiver(behaviour).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.close()


class Bus:
    """Shortcuts over the event bus API."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self._ids = itertools.count(1)

    async def contract(
        self, event_type: str = READING_TYPE, schema: Any = None, **extra: Any
    ) -> dict[str, Any]:
        body = {"type": event_type, "schema": READING_SCHEMA if schema is None else schema}
        response = await self.client.post("/api/v1/event-contracts", json={**body, **extra})
        assert response.status_code in (200, 201), response.text
        return dict(response.json())

    async def subscribe(self, endpoint: str, **fields: Any) -> dict[str, Any]:
        body = {"endpoint": endpoint, "types": [READING_TYPE], **fields}
        response = await self.client.post("/api/v1/subscriptions", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def event(self, **overrides: Any) -> dict[str, Any]:
        event = {
            "specversion": "1.0",
            "id": f"evt-{time.time_ns()}-{next(self._ids)}",
            "source": "/sensors/lab",
            "type": READING_TYPE,
            "subject": "sensor-1",
            "data": {"temp": 21.5},
        }
        event.update(overrides)
        return event

    async def publish(self, event: dict[str, Any], **params: str) -> httpx.Response:
        return await self.client.post(
            "/api/v1/events",
            json=event,
            params=params,
            headers={"content-type": "application/cloudevents+json"},
        )

    async def deliveries(self, subscription_id: str, **params: Any) -> dict[str, Any]:
        response = await self.client.get(
            f"/api/v1/subscriptions/{subscription_id}/deliveries", params=params
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def dead_letters(self, subscription_id: str) -> list[dict[str, Any]]:
        response = await self.client.get(f"/api/v1/subscriptions/{subscription_id}/dead-letters")
        assert response.status_code == 200, response.text
        return list(response.json()["items"])


@pytest.fixture
def bus(client: httpx.AsyncClient) -> Bus:
    return Bus(client)


@pytest.fixture
def sqlite_bus(sqlite_client: httpx.AsyncClient) -> Bus:
    return Bus(sqlite_client)


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float = 10.0,
    every: float = 0.02,
) -> None:
    """Wait until `check()` is true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(every)


@pytest.fixture
def wait_until() -> Callable[..., Awaitable[None]]:
    return eventually
