"""RegistryClient against the real registry: watched cache, strategies, self-registration."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from fleetmesh.bootstrap import Platform
from fleetmesh.gateway.app import create_app
from fleetmesh.registry.client import RegistryClient
from fleetmesh.registry.domain import NoHealthyInstance, ProtectionThresholdReached
from support import admin_key

pytestmark = pytest.mark.integration


def client_of(platform: Platform, **options: object) -> RegistryClient:
    transport = httpx.ASGITransport(app=create_app(platform))
    return RegistryClient(
        "http://fleetmesh.test",
        admin_key(platform),
        transport=transport,
        **options,  # type: ignore[arg-type]
    )


async def register_ttl(registry: RegistryClient, service: str, instance_id: str, port: int) -> None:
    await registry.register_self(
        service,
        address="127.0.0.1",
        port=port,
        instance_id=instance_id,
        check={"kind": "ttl", "ttl": 30},
    )


async def test_self_registration_round_robin_and_consistent_hash_over_the_watched_cache(
    sqlite_platform: Platform,
) -> None:
    async with client_of(sqlite_platform) as registry:
        await register_ttl(registry, "orders", "o-1", 7201)
        await register_ttl(registry, "orders", "o-2", 7202)
        picked = [(await registry.pick("orders")).instance_id for _ in range(4)]
        assert picked == ["o-1", "o-2", "o-1", "o-2"]
        assert registry.candidates("orders")[0].startswith("http://127.0.0.1:720")

        index = registry.index("orders")
        await register_ttl(registry, "orders", "o-3", 7203)
        assert await registry.wait_for_change("orders", index, 5) > index
        assert {i.instance_id for i in registry.cached("orders")} == {"o-1", "o-2", "o-3"}

        await register_ttl(registry, "self", "me", 7501)
        renewed = await registry.heartbeat("self", "me")
        assert renewed["health"]["state"] == "passing"
        assert await registry.deregister("self", "me") is True
        assert await registry.deregister("self", "me") is False
        assert await registry.instances("self") == []

    async with client_of(sqlite_platform, strategy="consistent_hash") as hashing:
        owners = {key: (await hashing.pick("orders", key=key)).instance_id for key in "abcdefgh"}
        again = {key: (await hashing.pick("orders", key=key)).instance_id for key in "abcdefgh"}
        assert owners == again
        assert len(set(owners.values())) > 1


async def test_least_outstanding_counts_requests_in_flight(sqlite_platform: Platform) -> None:
    async with client_of(sqlite_platform, strategy="least_outstanding") as registry:
        await register_ttl(registry, "slow", "s-1", 7301)
        await register_ttl(registry, "slow", "s-2", 7302)
        async with registry.acquire("slow") as busy:
            for _ in range(3):
                other = await registry.pick("slow")
                assert other.instance_id != busy.instance_id
        async with registry.acquire("slow"), registry.acquire("slow") as second:
            assert second.instance_id in {"s-1", "s-2"}


async def test_protection_threshold_and_no_healthy_instance(sqlite_platform: Platform) -> None:
    async with client_of(sqlite_platform, protection_threshold=0.6) as registry:
        with pytest.raises(NoHealthyInstance):
            await registry.pick("nothing-here")
        await registry.register_self(
            "fragile",
            address="127.0.0.1",
            port=7401,
            instance_id="f-1",
            check={"kind": "ttl", "ttl": 30},
        )
        await registry.register_self(
            "fragile",
            address="127.0.0.1",
            port=7402,
            instance_id="f-2",
            check={"kind": "ttl", "ttl": 0.2},
        )
        assert (await registry.pick("fragile")).instance_id in {"f-1", "f-2"}
        await asyncio.sleep(0.4)  # f-2 misses its heartbeat: 1 of 2 healthy is below 60 %
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                await registry.pick("fragile")
            except ProtectionThresholdReached as reached:
                assert (reached.healthy, reached.total) == (1, 2)
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the protection threshold never tripped")
        assert registry.candidates("fragile") == []
