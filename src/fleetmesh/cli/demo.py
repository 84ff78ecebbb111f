"""The demo fleet `make run` starts: a few simulated devices in the platform's own process."""

from __future__ import annotations

import asyncio

import httpx

from fleetmesh.bootstrap import Platform
from fleetmesh.core.logging import get_logger

log = get_logger(__name__)

DEMO_TYPE = {
    "name": "demo-sensor",
    "description": "Simulated environment sensor (make run)",
    "capabilities": ["ping"],
    "telemetry_schema": {
        "temperature": {"type": "number", "unit": "degC", "min": -40, "max": 85},
        "humidity": {"type": "number", "unit": "percent", "min": 0, "max": 100},
        "battery": {"type": "number", "unit": "percent", "min": 0, "max": 100},
    },
    "offline_timeout_s": 30,
    "expected_interval_s": 2,
}


async def register_demo_fleet(platform: Platform, count: int) -> list[tuple[str, str]]:
    """Register the demo type and devices (reusing ids); returns (id, secret) of new ones."""
    assert platform.admin_key_path is not None
    key = platform.admin_key_path.read_text().strip()
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=platform.api_url, headers=headers, timeout=30) as api:
        await api.post("/api/v1/device-types", json=DEMO_TYPE)
        wanted = [{"type": DEMO_TYPE["name"], "id": f"demo-{i:03}"} for i in range(count)]
        answer = (await api.post("/api/v1/devices:bulk", json={"devices": wanted})).json()
    created = [
        (item["id"], item["credentials"]["secret"])
        for item in answer.get("items", [])
        if item["status"] == "created"
    ]
    log.info("demo_fleet_registered", devices=count, new=len(created))
    return created


async def run_demo(platform: Platform, count: int) -> None:
    """Register the demo fleet once the HTTP server answers."""
    for _ in range(50):
        try:
            await register_demo_fleet(platform, count)
            return
        except httpx.HTTPError:
            await asyncio.sleep(0.2)
