from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleetmesh.core.errors import FieldError
from fleetmesh.registry.domain import (
    CheckKindMismatch,
    CheckOutcome,
    HealthCheck,
    HealthState,
    InstanceHealthChanged,
    InvalidInstance,
    ServiceInstance,
    healthy_fraction,
    outcome_of_http_status,
    select_instances,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def seconds(n: float) -> datetime:
    return T0 + timedelta(seconds=n)


def make_instance(**overrides: Any) -> ServiceInstance:
    fields: dict[str, Any] = {
        "service": "telemetry-ingest",
        "instance_id": "ingest-1",
        "address": "10.0.0.1",
        "port": 8080,
        "registered_at": T0,
    }
    fields.update(overrides)
    return ServiceInstance(**fields)


def failing_fields(**overrides: Any) -> set[str]:
    with pytest.raises(InvalidInstance) as raised:
        make_instance(**overrides)
    return {error.field for error in raised.value.errors}


# -- validation ---------------------------------------------------------


def test_a_valid_instance_gets_sensible_defaults() -> None:
    instance = make_instance(tags=["edge", "v2"], metadata={"rack": "r1"})

    assert instance.weight == 100
    assert instance.state is HealthState.PASSING
    assert instance.tags == ("edge", "v2")
    assert instance.check == HealthCheck.tcp()
    assert instance.qualified_id == "telemetry-ingest/ingest-1"


@pytest.mark.parametrize("name", ["a", "telemetry", "device-registry", "s3", "a" + "b" * 62])
def test_service_names_that_match_the_format_are_accepted(name: str) -> None:
    assert make_instance(service=name).service == name


@pytest.mark.parametrize("name", ["", "1svc", "-svc", "Svc", "svc_x", "svc.x", "a" + "b" * 63])
def test_service_names_that_break_the_format_are_rejected(name: str) -> None:
    assert failing_fields(service=name) == {"service"}


@pytest.mark.parametrize("address", ["10.0.0.1", "::1", "ingest.internal", "localhost", "a-b.c."])
def test_addresses_may_be_ips_or_host_names(address: str) -> None:
    assert make_instance(address=address).address == address


@pytest.mark.parametrize("address", ["", "bad host", "-x.example", "a..b", "x" * 64 + ".com"])
def test_malformed_addresses_are_rejected(address: str) -> None:
    assert failing_fields(address=address) == {"address"}


@pytest.mark.parametrize("port", [0, -1, 65536, True])
def test_ports_outside_the_range_are_rejected(port: int) -> None:
    assert failing_fields(port=port) == {"port"}


@pytest.mark.parametrize("weight", [0, 1001, -5])
def test_weights_outside_1_to_1000_are_rejected(weight: int) -> None:
    assert failing_fields(weight=weight) == {"weight"}


def test_validation_reports_every_failing_field_at_once() -> None:
    with pytest.raises(InvalidInstance) as raised:
        make_instance(
            service="Bad_Name",
            instance_id="",
            port=70000,
            weight=0,
            zone="EU WEST",
            tags=["ok", "not ok"],
            metadata={"k": "v" * 600},
            check=HealthCheck.http("health", interval=2.0, timeout=5.0),
        )

    assert {error.field for error in raised.value.errors} == {
        "service",
        "instance_id",
        "port",
        "weight",
        "zone",
        "tags.1",
        "metadata.k",
        "check.interval",
        "check.http_path",
    }
    assert FieldError("check.interval", "must be greater than the timeout") in raised.value.errors
    assert "port: must be between 1 and 65535" in str(raised.value)


def test_metadata_is_size_limited() -> None:
    too_many = {f"k{i}": "v" for i in range(65)}
    too_big = {f"k{i}": "v" * 500 for i in range(10)}

    assert failing_fields(metadata=too_many) == {"metadata"}
    assert failing_fields(metadata=too_big) == {"metadata"}


def test_repeated_tags_are_rejected() -> None:
    assert failing_fields(tags=["edge", "edge"]) == {"tags"}


@pytest.mark.parametrize(
    ("check", "fields"),
    [
        (HealthCheck.tcp(interval=1.0, timeout=1.0), {"check.interval"}),
        (HealthCheck.tcp(timeout=0), {"check.timeout"}),
        (HealthCheck.tcp(failures_before_critical=0), {"check.failures_before_critical"}),
        (HealthCheck.tcp(deregister_critical_after=0), {"check.deregister_critical_after"}),
        (HealthCheck.ttl_heartbeat(ttl=0), {"check.interval"}),
        (HealthCheck.http(""), {"check.http_path"}),
    ],
)
def test_health_check_specs_are_validated(check: HealthCheck, fields: set[str]) -> None:
    assert failing_fields(check=check) == fields


def test_a_ttl_check_needs_no_timeout() -> None:
    instance = make_instance(check=HealthCheck.ttl_heartbeat(ttl=15))

    assert instance.check.timeout == 0
    assert instance.last_heartbeat == T0


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, CheckOutcome.SUCCESS), (204, CheckOutcome.SUCCESS), (299, CheckOutcome.SUCCESS)]
    + [(status, CheckOutcome.FAILURE) for status in (199, 301, 404, 500, 503)],
)
def test_http_checks_expect_a_2xx_status(status: int, outcome: CheckOutcome) -> None:
    assert outcome_of_http_status(status) is outcome


# -- active check state machine ----------------------------------------


def test_one_failure_is_a_warning() -> None:
    instance = make_instance()

    assert instance.apply_check_result(CheckOutcome.FAILURE, seconds(10)) is HealthState.WARNING
    assert instance.critical_since is None


def test_consecutive_failures_up_to_the_threshold_make_an_instance_critical() -> None:
    instance = make_instance(check=HealthCheck.tcp(failures_before_critical=3))

    states = [
        instance.apply_check_result(outcome, seconds(10 * step))
        for step, outcome in enumerate(
            [CheckOutcome.FAILURE, CheckOutcome.TIMEOUT, CheckOutcome.FAILURE], start=1
        )
    ]

    assert states == [HealthState.WARNING, HealthState.WARNING, HealthState.CRITICAL]
    assert instance.critical_since == seconds(30)


def test_critical_since_is_kept_while_failures_continue() -> None:
    instance = make_instance(check=HealthCheck.tcp(failures_before_critical=1))
    instance.apply_check_result(CheckOutcome.FAILURE, seconds(10))
    instance.apply_check_result(CheckOutcome.TIMEOUT, seconds(20))

    assert instance.state is HealthState.CRITICAL
    assert instance.critical_since == seconds(10)


def test_one_success_makes_an_instance_passing_again_and_resets_the_count() -> None:
    instance = make_instance(check=HealthCheck.tcp(failures_before_critical=2))
    instance.apply_check_result(CheckOutcome.FAILURE, seconds(10))
    instance.apply_check_result(CheckOutcome.FAILURE, seconds(20))

    assert instance.apply_check_result(CheckOutcome.SUCCESS, seconds(30)) is HealthState.PASSING
    assert instance.critical_since is None
    assert instance.consecutive_failures == 0
    assert instance.apply_check_result(CheckOutcome.FAILURE, seconds(40)) is HealthState.WARNING


def test_failures_that_are_not_consecutive_never_reach_critical() -> None:
    instance = make_instance(check=HealthCheck.tcp(failures_before_critical=2))
    for step in range(10):
        outcome = CheckOutcome.FAILURE if step % 2 == 0 else CheckOutcome.SUCCESS
        instance.apply_check_result(outcome, seconds(step))

        assert instance.state is not HealthState.CRITICAL


def test_deregistration_is_due_once_critical_for_long_enough() -> None:
    check = HealthCheck.tcp(failures_before_critical=1, deregister_critical_after=60)
    instance = make_instance(check=check)
    assert not instance.should_deregister(seconds(1000))

    instance.apply_check_result(CheckOutcome.FAILURE, seconds(100))

    assert not instance.should_deregister(seconds(159))
    assert instance.should_deregister(seconds(160))


def test_a_warning_instance_is_never_deregistered() -> None:
    instance = make_instance()
    instance.apply_check_result(CheckOutcome.FAILURE, seconds(1))

    assert not instance.should_deregister(seconds(100_000))


def test_state_changes_are_recorded_as_events_and_repeats_are_not() -> None:
    instance = make_instance(check=HealthCheck.tcp(failures_before_critical=2))
    for step, outcome in enumerate(
        [CheckOutcome.SUCCESS, CheckOutcome.FAILURE, CheckOutcome.FAILURE, CheckOutcome.FAILURE]
    ):
        instance.apply_check_result(outcome, seconds(step))
    instance.apply_check_result(CheckOutcome.SUCCESS, seconds(9))

    assert [(event.previous, event.current, event.at) for event in instance.events] == [
        (HealthState.PASSING, HealthState.WARNING, seconds(1)),
        (HealthState.WARNING, HealthState.CRITICAL, seconds(2)),
        (HealthState.CRITICAL, HealthState.PASSING, seconds(9)),
    ]
    assert isinstance(instance.events[0], InstanceHealthChanged)
    assert instance.events[0].instance_id == "ingest-1"


def test_an_active_check_takes_no_heartbeat() -> None:
    with pytest.raises(CheckKindMismatch):
        make_instance().heartbeat(seconds(1))


# -- TTL state machine --------------------------------------------------


def ttl_instance(ttl: float = 30, deregister_after: float = 60) -> ServiceInstance:
    check = HealthCheck.ttl_heartbeat(ttl=ttl, deregister_critical_after=deregister_after)
    return make_instance(check=check)


def test_a_ttl_instance_expires_when_no_heartbeat_arrives_in_time() -> None:
    instance = ttl_instance(ttl=30)

    assert not instance.expired(seconds(30))
    assert instance.expired(seconds(30.001))
    assert instance.health_at(seconds(31)) is HealthState.CRITICAL
    assert instance.state is HealthState.PASSING, "health_at does not mutate"


def test_a_heartbeat_resets_the_ttl() -> None:
    instance = ttl_instance(ttl=30)

    instance.heartbeat(seconds(25))

    assert not instance.expired(seconds(50))
    assert instance.expired(seconds(56))


def test_checking_an_expired_ttl_marks_it_critical_since_the_expiry() -> None:
    instance = ttl_instance(ttl=30)

    assert instance.check_ttl(seconds(20)) is HealthState.PASSING
    assert instance.check_ttl(seconds(45)) is HealthState.CRITICAL
    assert instance.critical_since == seconds(30)
    assert instance.events[-1].reason == "TTL expired"


def test_a_heartbeat_brings_a_critical_ttl_instance_back() -> None:
    instance = ttl_instance(ttl=30)
    instance.check_ttl(seconds(100))

    assert instance.heartbeat(seconds(101)) is HealthState.PASSING
    assert instance.critical_since is None
    assert not instance.expired(seconds(120))


def test_ttl_deregistration_counts_from_the_expiry_even_if_never_checked() -> None:
    instance = ttl_instance(ttl=30, deregister_after=60)

    assert not instance.should_deregister(seconds(89))
    assert instance.should_deregister(seconds(90))


def test_a_ttl_check_takes_no_probe_results() -> None:
    with pytest.raises(CheckKindMismatch):
        ttl_instance().apply_check_result(CheckOutcome.SUCCESS, seconds(1))


# -- discovery ------------------------------------------------------------


def fleet() -> list[ServiceInstance]:
    passing = make_instance(instance_id="a", zone="eu-west", tags=["edge"])
    warning = make_instance(instance_id="b", zone="eu-west", tags=["core"])
    warning.apply_check_result(CheckOutcome.FAILURE, seconds(1))
    critical = make_instance(
        instance_id="c",
        zone="eu-west",
        tags=["edge"],
        check=HealthCheck.tcp(failures_before_critical=1),
    )
    critical.apply_check_result(CheckOutcome.FAILURE, seconds(1))
    other_zone = make_instance(instance_id="d", zone="us-east", tags=["edge"])
    return [passing, warning, critical, other_zone]


def ids(instances: list[ServiceInstance]) -> list[str]:
    return [instance.instance_id for instance in instances]


def test_discovery_never_returns_critical_instances_but_keeps_warning_ones() -> None:
    assert ids(select_instances(fleet())) == ["a", "b", "d"]


def test_discovery_can_include_unhealthy_instances() -> None:
    assert ids(select_instances(fleet(), healthy_only=False)) == ["a", "b", "c", "d"]


def test_discovery_filters_by_tag_and_zone() -> None:
    instances = fleet()

    assert ids(select_instances(instances, tag="edge")) == ["a", "d"]
    assert ids(select_instances(instances, zone="eu-west")) == ["a", "b"]
    assert ids(select_instances(instances, tag="edge", zone="eu-west")) == ["a"]
    assert ids(select_instances(instances, healthy_only=False, tag="edge", zone="eu-west")) == [
        "a",
        "c",
    ]


def test_discovery_treats_expired_ttl_instances_as_critical_when_given_the_time() -> None:
    instance = ttl_instance(ttl=30)

    assert select_instances([instance]) == [instance]
    assert select_instances([instance], now=seconds(31)) == []


def test_healthy_fraction() -> None:
    assert healthy_fraction(fleet()) == 0.75
    assert healthy_fraction([]) == 0.0
