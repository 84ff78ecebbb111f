from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetmesh.config.domain import (
    ConfigCache,
    ConfigChanged,
    ConfigEntry,
    ConfigRef,
    JsonValue,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 3, 1, tzinfo=UTC)
REF = ConfigRef(service="telemetry", key="retry")


@dataclass(frozen=True)
class Update:
    """A minimal change notification, as a client might receive it."""

    version: int
    value: JsonValue
    deleted: bool = False
    namespace: str = "default"
    service: str = "telemetry"
    key: str = "retry"


def seconds(n: float) -> datetime:
    return T0 + timedelta(seconds=n)


def test_a_newer_version_replaces_the_cached_one() -> None:
    cache = ConfigCache()

    assert cache.apply(Update(1, {"max": 1}), now=T0)
    assert cache.apply(Update(2, {"max": 2}), now=T0)

    assert cache.get(REF) == {"max": 2}
    assert cache.version_of(REF) == 2


def test_an_older_or_repeated_version_is_ignored() -> None:
    cache = ConfigCache()
    cache.apply(Update(3, "three"), now=T0)

    assert not cache.apply(Update(2, "two"), now=T0)
    assert not cache.apply(Update(3, "three again"), now=T0)
    assert cache.get(REF) == "three"


def test_a_deletion_is_kept_so_a_late_older_value_does_not_resurrect_it() -> None:
    cache = ConfigCache()
    cache.apply(Update(4, None, deleted=True), now=T0)

    cache.apply(Update(3, "old"), now=T0)

    assert cache.get(REF, default="fallback") == "fallback"
    cached = cache.lookup(REF)
    assert cached is not None and cached.deleted and cached.version == 4


def test_unknown_entries_fall_back_to_the_default() -> None:
    cache = ConfigCache()

    assert cache.get(REF) is None
    assert cache.get(REF, default=7) == 7
    assert cache.lookup(REF) is None
    assert cache.version_of(REF) == 0


def test_entries_are_kept_apart_by_namespace_service_and_key() -> None:
    cache = ConfigCache()
    cache.apply(Update(1, "default"), now=T0)
    cache.apply(Update(1, "prod", namespace="prod"), now=T0)
    cache.apply(Update(5, "other key", key="timeout"), now=T0)

    assert cache.get(REF) == "default"
    assert cache.get(ConfigRef(namespace="prod", service="telemetry", key="retry")) == "prod"
    assert cache.known_versions() == {
        REF: 1,
        ConfigRef(namespace="prod", service="telemetry", key="retry"): 1,
        ConfigRef(service="telemetry", key="timeout"): 5,
    }


def test_cached_values_are_copies() -> None:
    cache = ConfigCache()
    value: dict[str, JsonValue] = {"hosts": ["a"]}
    cache.apply(Update(1, value), now=T0)
    value["hosts"] = []

    read = cache.get(REF)
    assert read == {"hosts": ["a"]}
    assert isinstance(read, dict)
    read["hosts"] = "changed"
    assert cache.get(REF) == {"hosts": ["a"]}


def test_domain_events_can_be_applied_directly() -> None:
    entry = ConfigEntry(ref=REF)
    entry.set({"max": 1}, author="ana", now=T0)
    entry.set({"max": 2}, author="ana", now=T0)
    entry.delete(author="ana", now=T0)
    cache = ConfigCache()

    changes = [event for event in entry.events if isinstance(event, ConfigChanged)]
    applied = cache.apply_all(reversed(changes), now=T0)

    assert applied == 1
    assert cache.version_of(REF) == 3
    assert cache.get(REF) is None


# -- staleness -------------------------------------------------------------------


def test_a_cache_that_never_heard_from_the_center_is_stale() -> None:
    assert ConfigCache().is_stale(T0)


def test_the_cache_turns_stale_without_contact_but_keeps_serving_values() -> None:
    cache = ConfigCache(stale_after=30)
    cache.apply(Update(1, "value"), now=seconds(0))

    assert not cache.is_stale(seconds(30))
    assert cache.is_stale(seconds(31))
    assert cache.get(REF) == "value"


def test_any_contact_with_the_center_makes_the_cache_fresh_again() -> None:
    cache = ConfigCache(stale_after=30)
    cache.apply(Update(1, "value"), now=seconds(0))

    cache.mark_reachable(seconds(50))
    assert not cache.is_stale(seconds(60))

    cache.apply(Update(1, "duplicate"), now=seconds(90))
    assert not cache.is_stale(seconds(100))


def test_an_out_of_order_clock_does_not_move_the_last_contact_back() -> None:
    cache = ConfigCache(stale_after=30)
    cache.mark_reachable(seconds(100))
    cache.mark_reachable(seconds(10))

    assert cache.last_contact == seconds(100)


def test_stale_after_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ConfigCache(stale_after=0)


# -- ordering property -----------------------------------------------------------------


versions = st.lists(st.integers(min_value=1, max_value=1000), min_size=1, max_size=60, unique=True)


@given(versions=versions, data=st.data())
def test_any_order_of_updates_ends_at_the_highest_version(
    versions: list[int], data: st.DataObject
) -> None:
    updates = [Update(v, {"v": v}, deleted=v % 7 == 0) for v in versions]
    with_duplicates = updates + data.draw(st.lists(st.sampled_from(updates), max_size=20))
    shuffled = data.draw(st.permutations(with_duplicates))
    cache = ConfigCache()

    for update in shuffled:
        cache.apply(update, now=T0)

    newest = max(versions)
    assert cache.version_of(REF) == newest
    expected = None if newest % 7 == 0 else {"v": newest}
    assert cache.get(REF) == expected


@given(data=st.data(), versions=versions)
def test_the_result_does_not_depend_on_the_order(versions: list[int], data: st.DataObject) -> None:
    updates = [Update(v, v) for v in versions]
    first, second = ConfigCache(), ConfigCache()

    first.apply_all(data.draw(st.permutations(updates)), now=T0)
    second.apply_all(data.draw(st.permutations(updates)), now=T0)

    assert first.known_versions() == second.known_versions()
    assert first.get(REF) == second.get(REF)
