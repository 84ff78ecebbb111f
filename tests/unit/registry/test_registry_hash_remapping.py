"""Consistent hashing moves about 1/N of the keys when any one of N instances leaves."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fleetmesh.registry.balancing import ConsistentHashBalancer
from fleetmesh.registry.domain import HealthCheck, ServiceInstance

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)
KEYS = [f"device-{index}" for index in range(4000)]
SLACK = 1.25
"""Moved share <= SLACK / N: the ring's 160 virtual nodes per instance keep shares near 1/N."""


def pool(size: int) -> list[ServiceInstance]:
    return [
        ServiceInstance(
            service="ingest",
            instance_id=f"node-{index}",
            address="10.0.0.1",
            port=9000 + index,
            registered_at=T0,
            check=HealthCheck.tcp(),
        )
        for index in range(size)
    ]


def owners(balancer: ConsistentHashBalancer, instances: list[ServiceInstance]) -> dict[str, str]:
    return {key: balancer.pick(instances, key).instance_id for key in KEYS}


@pytest.mark.parametrize("size", [2, 3, 10, 20])
def test_any_one_of_n_leaving_moves_only_its_own_keys_about_one_nth(size: int) -> None:
    instances = pool(size)
    balancer = ConsistentHashBalancer()
    before = owners(balancer, instances)

    for leaving in instances:
        after = owners(balancer, [i for i in instances if i is not leaving])

        moved = {key for key in KEYS if before[key] != after[key]}
        assert moved == {key for key in KEYS if before[key] == leaving.instance_id}
        assert len(moved) / len(KEYS) <= SLACK / size
