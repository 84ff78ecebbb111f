"""Live settings, the SSE watch and the HTTP ConfigClient, against the real platform (SQLite)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx
import pytest

from fleetmesh.bootstrap import Platform
from fleetmesh.config.client import ConfigClient
from fleetmesh.gateway.app import create_app
from support import admin_key

pytestmark = pytest.mark.integration


async def wait_until(condition: Any, timeout: float = 10.0) -> float:
    """Seconds until `condition()` held; fails after `timeout` (a hang guard, not a speed check)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_the_log_level_changes_live_and_a_deletion_restores_it(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    root = logging.getLogger()
    original = root.level
    try:
        response = await sqlite_client.put(
            "/api/v1/config/platform/log_level", json={"value": "ERROR"}
        )
        assert response.status_code == 201
        await wait_until(lambda: root.level == logging.ERROR)
        await sqlite_client.put("/api/v1/config/platform/log_level", json={"value": "LOUD"})
        await asyncio.sleep(0.2)
        assert root.level == logging.ERROR  # an unknown level is ignored
        await sqlite_client.put("/api/v1/config/platform/log_level", json={"value": "warning"})
        await wait_until(lambda: root.level == logging.WARNING)
        await sqlite_client.delete("/api/v1/config/platform/log_level")
        assert sqlite_platform.settings.log_level == "INFO"
        await wait_until(lambda: root.level == logging.INFO)  # back to the configured level
    finally:
        root.setLevel(original)


async def _next_event(lines: Any) -> dict[str, str]:
    event: dict[str, str] = {}
    async for line in lines:
        if not line:
            if "data" in event:
                return event
            continue
        if not line.startswith(":"):
            field, _, value = line.partition(": ")
            event[field] = value
    raise AssertionError("the stream ended")


async def test_sse_watch_streams_every_new_version(
    sqlite_platform: Platform, live_url: str
) -> None:
    headers = {"Authorization": f"Bearer {admin_key(sqlite_platform)}"}
    url = "/api/v1/config/routing/retry"
    async with httpx.AsyncClient(base_url=live_url, headers=headers, timeout=10) as http:
        await http.put(url, json={"value": {"max_attempts": 3}})
        async with http.stream("GET", f"{url}/watch") as stream:
            lines = stream.aiter_lines()
            first = await asyncio.wait_for(_next_event(lines), 5)
            assert first["event"] == "change"
            assert (first["id"], json.loads(first["data"])["value"]) == ("1", {"max_attempts": 3})
            await http.put(url, json={"value": {"max_attempts": 4}})
            second = await asyncio.wait_for(_next_event(lines), 5)
            assert second["id"] == "2"
            await http.delete(url)
            third = await asyncio.wait_for(_next_event(lines), 5)
            assert json.loads(third["data"])["deleted"] is True


class Switch(httpx.AsyncBaseTransport):
    """An in-process transport that can be cut, as if the config center were unreachable."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.down = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("config center unreachable", request=request)
        return await self.inner.handle_async_request(request)


async def test_config_client_follows_changes_and_serves_last_values_when_cut_off(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    switch = Switch(httpx.ASGITransport(app=create_app(sqlite_platform)))
    config = ConfigClient(
        "http://fleetmesh.test", admin_key(sqlite_platform), transport=switch, wait_s=5
    )
    async with config:
        assert await config.get("billing", "currency", default="EUR") == "EUR"
        await sqlite_client.put("/api/v1/config/billing/currency", json={"value": "USD"})
        assert await config.get("billing", "currency") == "USD"

        seen: list[Any] = []
        config.on_change("billing", "currency", seen.append)
        assert await config.follow("billing", "currency") == "USD"
        await sqlite_client.put("/api/v1/config/billing/currency", json={"value": "CHF"})
        await wait_until(lambda: config.cached("billing", "currency") == "CHF")
        assert seen == ["CHF"]
        assert config.version("billing", "currency") == 2

        switch.down = True
        assert await config.get("billing", "currency") == "CHF"  # last known value
        assert not config.is_stale
        switch.down = False
        assert await config.set("billing", "currency", "GBP", comment="brexit") == 3
        assert await config.get("billing", "currency") == "GBP"
        with pytest.raises(Exception, match="412"):
            await config.set("billing", "currency", "JPY", expected_version=1)
