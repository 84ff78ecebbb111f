"""Helpers for tests of every tier (importable as `support`)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

import httpx

from fleetmesh.bootstrap import Platform
from fleetmesh.core.ports import free_port
from fleetmesh.core.settings import Settings
from fleetmesh.gateway.app import create_app


def make_settings(data_dir: Path, database_url: str | None = None, **extra: object) -> Settings:
    return Settings(
        data_dir=data_dir,
        http_port=free_port(),
        nats_port=0,  # picked at start: one taken meanwhile is replaced by another
        mqtt_port=0,
        database_url=database_url,
        outbox_poll_seconds=0.05,
        allow_private_webhooks=True,
        **extra,  # type: ignore[arg-type]
    )


def admin_key(platform: Platform) -> str:
    assert platform.admin_key_path is not None
    return platform.admin_key_path.read_text().strip()


def client_for(platform: Platform) -> httpx.AsyncClient:
    app = create_app(platform)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://fleetmesh.test",
        headers={"Authorization": f"Bearer {admin_key(platform)}"},
    )


async def known_to_telemetry(
    client: httpx.AsyncClient, device_id: str, *, timeout_s: float = 30.0
) -> None:
    """Wait until the telemetry context learnt of the device's registration (from an event;
    a post before then waits a little and may still be answered 404 on a busy machine)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (await client.get(f"/api/v1/devices/{device_id}/telemetry/latest")).status_code == 404:
        assert asyncio.get_running_loop().time() < deadline, f"telemetry never saw {device_id}"
        await asyncio.sleep(0.05)


class Restartable(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def restart_repeatedly(
    component: Restartable, *, every_s: float, down_s: float, times: int = 3
) -> None:
    """Stop and start the component `times` times while other work goes on."""
    for _ in range(times):
        await asyncio.sleep(every_s)
        await component.stop()
        await asyncio.sleep(down_s)
        await component.start()
