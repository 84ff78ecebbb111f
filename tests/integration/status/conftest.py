"""Helpers for the status integration tests: a kit bound to a running platform."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from fleetmesh.bootstrap import Platform
from fleetmesh.core.clock import to_rfc3339, utcnow
from fleetmesh.core.envelope import CloudEvent
from fleetmesh.core.live_config import CONFIG_BUCKET, config_kv_key
from support import client_for

TELEMETRY_COLLECTED = "fleetmesh.telemetry.collected.v1"
STATUS_CHANGED = "fleetmesh.device.status_changed.v1"


async def eventually(
    probe: Callable[[], Awaitable[Any] | Any], *, timeout: float = 5.0, every: float = 0.05
) -> Any:
    """The first truthy result of `probe` within `timeout` seconds, else fail."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s; last result: {last!r}")


class StatusKit:
    """Drives a platform the way other contexts and devices would."""

    eventually = staticmethod(eventually)

    def __init__(self, platform: Platform, client: httpx.AsyncClient) -> None:
        self.platform = platform
        self.client = client
        self._config_version = 0

    async def define_type(
        self, name: str = "sensor", *, offline_timeout_s: float = 1.0, interval_s: float = 0.5
    ) -> None:
        body = {
            "name": name,
            "offline_timeout_s": offline_timeout_s,
            "expected_interval_s": interval_s,
        }
        response = await self.client.post("/api/v1/device-types", json=body)
        assert response.status_code == 201, response.text

    async def register(
        self, *device_ids: str, type_name: str = "sensor", **extra: Any
    ) -> dict[str, str]:
        devices = [{"type": type_name, "id": d, **extra} for d in device_ids]
        secrets: dict[str, str] = {}
        for start in range(0, len(devices), 1000):
            response = await self.client.post(
                "/api/v1/devices:bulk", json={"devices": devices[start : start + 1000]}
            )
            assert response.status_code == 201, response.text
            for item in response.json()["items"]:
                secrets[item["id"]] = item["credentials"]["secret"]
        await eventually(lambda: self._known(device_ids[-1]), timeout=15)
        return secrets

    async def announce(self, *device_ids: str, type_name: str = "sensor") -> None:
        """Publish `device.registered` events as the device registry does (no credentials:
        much faster than the registry API when a test needs a thousand devices)."""
        now = to_rfc3339(utcnow())
        events = [
            CloudEvent(
                type="fleetmesh.device.registered.v1",
                source="/fleetmesh/devices",
                subject=device_id,
                data={"device_id": device_id, "type": type_name, "registered_at": now},
            )
            for device_id in device_ids
        ]
        backbone = self.platform.backbone
        for start in range(0, len(events), 200):
            await asyncio.gather(
                *(
                    backbone.publish(e.nats_subject, e.to_json(), msg_id=e.id)
                    for e in events[start : start + 200]
                )
            )
        await eventually(lambda: self._known(device_ids[-1]), timeout=15)

    async def _known(self, device_id: str) -> bool:
        return (await self.client.get(f"/api/v1/devices/{device_id}/status")).status_code == 200

    async def telemetry(
        self,
        device_id: str,
        *,
        quality: float = 1.0,
        count: int = 1,
        received_at: datetime | None = None,
    ) -> None:
        """What the telemetry context publishes after storing a batch of points."""
        at = to_rfc3339(received_at or utcnow())
        event = CloudEvent(
            type=TELEMETRY_COLLECTED,
            source="/fleetmesh/telemetry",
            subject=device_id,
            data={
                "device_id": device_id,
                "count": count,
                "first_ts": at,
                "last_ts": at,
                "metrics": ["temp"],
                "received_at": at,
                "quality_mean": quality,
            },
        )
        await self.platform.backbone.publish(event.nats_subject, event.to_json(), msg_id=event.id)

    async def status(self, device_id: str, **params: str) -> dict[str, Any]:
        response = await self.client.get(f"/api/v1/devices/{device_id}/status", params=params)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def wait_status(
        self, device_id: str, status: str, *, timeout: float = 5.0
    ) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            body = await self.status(device_id)
            return body if body["status"] == status else None

        result: dict[str, Any] = await eventually(probe, timeout=timeout)
        return result

    async def history(self, device_id: str) -> list[dict[str, Any]]:
        response = await self.client.get(
            f"/api/v1/devices/{device_id}/status/history", params={"limit": "1000"}
        )
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    async def status_events(self, device_id: str | None = None) -> list[dict[str, Any]]:
        """status_changed events published to the EVENTS stream (through the outbox)."""
        params = {"type": STATUS_CHANGED, "limit": "1000"}
        if device_id is not None:
            params["subject"] = device_id
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page_params = params | ({"cursor": cursor} if cursor else {})
            body = (await self.client.get("/api/v1/events", params=page_params)).json()
            items += body["items"]
            cursor = body.get("next_cursor")
            if not cursor:
                return items

    async def committed_changes(self, device_id: str) -> list[tuple[datetime, dict[str, Any]]]:
        """(when it was committed, event) of the device's status_changed events, from the
        outbox: the commit time is when the platform decided, whatever a poller saw."""
        async with self.platform.database.session() as session:
            rows = await session.execute(
                text(
                    "SELECT created_at, payload FROM outbox "
                    "WHERE subject = 'events.device.status_changed.v1' ORDER BY seq"
                )
            )
            found = [(_aware(row.created_at), json.loads(bytes(row.payload))) for row in rows]
        return [(at, event) for at, event in found if event["subject"] == device_id]

    async def set_config(self, key: str, value: Any) -> None:
        """What the configuration center writes; waits until the platform sees it."""
        self._config_version += 1
        kv = await self.platform.backbone.js.key_value(CONFIG_BUCKET)
        document = {"version": self._config_version, "value": value}
        await kv.put(config_kv_key("status", key), json.dumps(document).encode())

        async def seen() -> bool:
            return bool(self.platform.live_config.get("status", key) == value)

        await eventually(seen)


def _aware(moment: Any) -> datetime:
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@pytest.fixture
async def kit(platform: Platform) -> AsyncIterator[StatusKit]:
    async with client_for(platform) as http:
        yield StatusKit(platform, http)


@pytest.fixture
async def sqlite_kit(sqlite_platform: Platform) -> AsyncIterator[StatusKit]:
    async with client_for(sqlite_platform) as http:
        yield StatusKit(sqlite_platform, http)


@pytest.fixture
def make_kit() -> Callable[[Platform, httpx.AsyncClient], StatusKit]:
    """For tests that start their own platforms (restarts)."""
    return StatusKit
