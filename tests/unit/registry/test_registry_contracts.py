"""The registry's published KV document and keys."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fleetmesh.core.errors import InvalidInput
from fleetmesh.registry.api import parse_wait
from fleetmesh.registry.contracts import (
    heartbeat_key,
    instance_document,
    instance_from_document,
    kv_key,
    parse_kv_key,
)
from fleetmesh.registry.domain import CheckOutcome, HealthCheck, ServiceInstance

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "instance_id", ["api-1", "host.local:8080", "a..b.", "x_y-z", "10.0.0.1:80"]
)
def test_instance_ids_are_one_valid_kv_token_and_round_trip(instance_id: str) -> None:
    key = kv_key("api", instance_id)
    service, token = key.split(".", 1)
    assert service == "api" and "." not in token and ":" not in token
    assert parse_kv_key(key) == ("api", instance_id)
    assert parse_kv_key(heartbeat_key("api", instance_id)) is None


def test_the_document_round_trips_with_health_and_ignores_unknown_fields() -> None:
    instance = ServiceInstance(
        service="api",
        instance_id="i-1",
        address="10.0.0.1",
        port=8080,
        registered_at=T0,
        check=HealthCheck.http("/ready", interval=5, timeout=1, failures_before_critical=1),
        zone="eu-west",
        tags=("edge",),
        metadata={"rack": "r1"},
        weight=7,
    )
    instance.apply_check_result(CheckOutcome.FAILURE, T0)
    document = {**instance_document(instance, last_check_at=T0, output="HTTP 500"), "future": 1}
    again = instance_from_document(document)
    assert (again.state, again.critical_since, again.consecutive_failures) == (
        instance.state,
        T0,
        1,
    )
    assert (again.check, again.tags, again.metadata, again.weight) == (
        instance.check,
        ("edge",),
        {"rack": "r1"},
        7,
    )
    ttl = ServiceInstance(
        service="api",
        instance_id="t",
        address="h",
        port=1,
        registered_at=T0,
        check=HealthCheck.ttl_heartbeat(15),
    )
    assert instance_from_document(instance_document(ttl)).check == HealthCheck.ttl_heartbeat(15)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (None, 30.0),
        ("30s", 30.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1.5", 1.5),
        ("1h", None),
        ("20m", 300.0),
    ],
)
def test_wait_durations(text: str | None, seconds: float | None) -> None:
    if seconds is None:
        with pytest.raises(InvalidInput):
            parse_wait(text)
    else:
        assert parse_wait(text) == seconds
