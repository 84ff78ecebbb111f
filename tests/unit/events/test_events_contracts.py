"""Event contracts, data validation against them, and the delivery retry policy."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetmesh.events.domain import (
    CompatibilityMode,
    Contract,
    InvalidContract,
    InvalidRetryPolicy,
    RetryPolicy,
    backoff_ceiling,
    delay_for,
    next_retry_delay,
    parse_builtin_type,
    validate_data,
)

pytestmark = pytest.mark.unit

READING_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["temp", "at"],
    "properties": {
        "temp": {"type": "number"},
        "at": {"type": "string", "format": "date-time"},
        "sensor": {"$ref": "#/$defs/sensor"},
    },
    "$defs": {"sensor": {"type": "string", "minLength": 3}},
}


def reading_contract(**overrides: Any) -> Contract:
    fields: dict[str, Any] = {
        "event_type": "fleetmesh.telemetry.reading_taken.v1",
        "version": 1,
        "schema": READING_SCHEMA,
        "publisher": "telemetry",
        "description": "A reading was taken",
    }
    fields.update(overrides)
    return Contract(**fields)


def contract_errors(**overrides: Any) -> dict[str, str]:
    with pytest.raises(InvalidContract) as caught:
        reading_contract(**overrides)
    return {error.field: error.message for error in caught.value.errors}


def test_a_valid_contract() -> None:
    contract = reading_contract(compatibility="FULL")

    assert contract.compatibility is CompatibilityMode.FULL
    assert contract.builtin is not None and contract.builtin.context == "telemetry"


def test_every_contract_problem_is_listed() -> None:
    errors = contract_errors(
        event_type="fleetmesh.telemetry",
        version=0,
        publisher=" ",
        compatibility="SOMETIMES",
        schema={"type": "temperature"},
    )

    assert set(errors) == {"event_type", "version", "publisher", "compatibility", "schema/type"}


@pytest.mark.parametrize(
    ("schema", "field"),
    [
        ({"type": "object", "required": "temp"}, "schema/required"),
        ({"minimum": "zero"}, "schema/minimum"),
        ({"pattern": "(unclosed"}, "schema/pattern"),
        ({"$schema": "http://json-schema.org/draft-07/schema#"}, "schema/$schema"),
        ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "schema/properties/a/$ref"),
        ({"properties": {"a": {"$ref": "https://example.com/a.json"}}}, "schema/properties/a/$ref"),
        ("not a schema", "schema"),
    ],
)
def test_schemas_must_be_valid_self_contained_draft_2020_12(schema: Any, field: str) -> None:
    assert field in contract_errors(schema=schema)


def test_boolean_schemas_are_allowed() -> None:
    assert validate_data(reading_contract(schema=True), {"anything": 1}) == []


def test_valid_data_has_no_errors() -> None:
    data = {"temp": 21.5, "at": "2024-05-01T10:00:00Z", "sensor": "abc"}

    assert validate_data(reading_contract(), data) == []


def test_every_data_error_is_listed_with_its_path() -> None:
    errors = validate_data(reading_contract(), {"temp": "hot", "at": "noon", "sensor": "x"})

    assert [(error.field, error.code) for error in errors] == [
        ("/at", "format"),
        ("/sensor", "minLength"),
        ("/temp", "type"),
    ]
    assert [error.message for error in validate_data(reading_contract(), {})] == [
        "'at' is a required property",
        "'temp' is a required property",
    ]


def test_validators_are_compiled_once_per_distinct_schema() -> None:
    from fleetmesh.events import domain

    first, second = reading_contract(), reading_contract(version=2)
    validate_data(first, {})
    hits_before = domain._compiled_validator.cache_info().hits
    validate_data(second, {})

    assert domain._compiled_validator.cache_info().hits == hits_before + 1


@pytest.mark.parametrize(
    ("event_type", "parts"),
    [
        ("fleetmesh.devices.registered.v1", ("devices", "registered", 1)),
        ("fleetmesh.status.went_offline.v12", ("status", "went_offline", 12)),
        ("fleetmesh.devices.registered.v0", None),
        ("fleetmesh.devices.registered", None),
        ("com.acme.door.opened", None),
    ],
)
def test_builtin_type_names(event_type: str, parts: tuple[str, str, int] | None) -> None:
    parsed = parse_builtin_type(event_type)

    assert (parsed and (parsed.context, parsed.name, parsed.major)) == parts
    if parsed is not None:
        assert str(parsed) == event_type


# --------------------------------------------------------------------------- retry policy

policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 50),
    base_delay=st.floats(0, 60),
    max_delay=st.floats(0, 3600),
    multiplier=st.floats(1, 10),
)


class FixedRandom:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


@given(policy=policies, attempt=st.integers(1, 10_000), seed=st.integers())
def test_delays_stay_within_zero_and_the_capped_exponential(
    policy: RetryPolicy, attempt: int, seed: int
) -> None:
    delay = delay_for(attempt, policy, random.Random(seed))
    ceiling = min(policy.base_delay, policy.max_delay)
    for _ in range(attempt - 1):
        if ceiling >= policy.max_delay:
            break
        ceiling = min(ceiling * policy.multiplier, policy.max_delay)

    assert 0 <= delay <= policy.max_delay
    assert delay <= ceiling * (1 + 1e-9)


@given(policy=policies, attempt=st.integers(1, 500))
def test_the_ceiling_never_shrinks_from_one_attempt_to_the_next(
    policy: RetryPolicy, attempt: int
) -> None:
    assert backoff_ceiling(attempt, policy) <= backoff_ceiling(attempt + 1, policy)


@given(policy=policies, attempts_made=st.integers(0, 100))
def test_retries_stop_after_max_attempts(policy: RetryPolicy, attempts_made: int) -> None:
    delay = next_retry_delay(max(attempts_made, 1), policy, random.Random(0))

    assert (delay is None) is (max(attempts_made, 1) >= policy.max_attempts)


def test_full_jitter_spans_the_whole_range() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay=1, max_delay=60, multiplier=2)

    assert delay_for(3, policy, FixedRandom(0.0)) == 0
    assert delay_for(3, policy, FixedRandom(0.5)) == 2
    assert delay_for(30, policy, FixedRandom(0.5)) == 30
    assert delay_for(10**6, policy, FixedRandom(0.999)) == pytest.approx(59.94)


def test_attempts_are_numbered_from_one() -> None:
    with pytest.raises(ValueError):
        delay_for(0, RetryPolicy(), random.Random(0))


def test_policy_settings_are_checked() -> None:
    with pytest.raises(InvalidRetryPolicy) as caught:
        RetryPolicy(max_attempts=0, base_delay=-1, max_delay=float("inf"), multiplier=0.5)

    fields = {error.field for error in caught.value.errors}
    assert fields == {"max_attempts", "base_delay", "max_delay", "multiplier"}
