"""Other processes authenticate devices through the devices service over NATS."""

from __future__ import annotations

import httpx
import pytest

from fleetmesh.bootstrap import Platform
from fleetmesh.core.device_auth import NatsDeviceVerifier

pytestmark = pytest.mark.integration


async def test_nats_verifier_asks_the_devices_service(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    await sqlite_client.post("/api/v1/device-types", json={"name": "thermo"})
    created = (
        await sqlite_client.post("/api/v1/devices", json={"type": "thermo", "id": "v-1"})
    ).json()
    secret = created["credentials"]["secret"]
    verifier = NatsDeviceVerifier(sqlite_platform.backbone)
    assert await verifier.verify_device("v-1", secret)
    assert not await verifier.verify_device("v-1", "wrong")
    assert not await verifier.verify_device("nobody", secret)
    await sqlite_client.delete("/api/v1/devices/v-1")
    assert not await NatsDeviceVerifier(sqlite_platform.backbone).verify_device("v-1", secret)
