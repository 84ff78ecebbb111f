"""A device whose credentials cannot be checked right now gets 503 + Retry-After, never 401."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from fleetmesh.bootstrap import Platform, bootstrap
from fleetmesh.core.device_auth import VerifyReply
from fleetmesh.devices.verify import VerifyResponder
from support import client_for, make_settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def telemetry_alone(tmp_path: Path) -> AsyncIterator[Platform]:
    """A telemetry process with no devices service anywhere to answer credential checks."""
    started = bootstrap(make_settings(tmp_path / "data"), contexts=["telemetry"])
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


async def test_device_auth_without_a_devices_service_is_a_503(telemetry_alone: Platform) -> None:
    async with client_for(telemetry_alone) as client:
        answer = await client.post(
            "/api/v1/devices/d-1/telemetry",
            json={"metric": "temp", "value": 1},
            auth=("d-1", "some-secret"),
        )
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "1"
    assert answer.headers["content-type"].startswith("application/problem+json")


class FailingQueries:
    async def verify_device(self, device_id: str, secret: str) -> bool:
        raise ConnectionError("the database is gone")


class Message:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.replies: list[bytes] = []

    async def respond(self, data: bytes) -> None:
        self.replies.append(data)


async def test_the_devices_service_says_unavailable_when_it_cannot_check() -> None:
    responder = VerifyResponder(backbone=None, queries=FailingQueries())  # type: ignore[arg-type]
    message = Message(b'{"device_id": "d-1", "secret": "s"}')

    await responder._answer(message)

    (reply,) = [msgspec.json.decode(data, type=VerifyReply) for data in message.replies]
    assert reply.unavailable and not reply.ok
