from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetmesh.registry.balancing import (
    ConsistentHashBalancer,
    LeastOutstandingBalancer,
    LoadBalancer,
    MissingHashKey,
    RandomBalancer,
    RoundRobinBalancer,
    UnbalancedRelease,
    WeightedRandomBalancer,
    eligible_instances,
    stable_hash,
)
from fleetmesh.registry.domain import (
    CheckOutcome,
    HealthCheck,
    NoHealthyInstance,
    ProtectionThresholdReached,
    ServiceInstance,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def instance(instance_id: str, weight: int = 100, *, critical: bool = False) -> ServiceInstance:
    created = ServiceInstance(
        service="analytics",
        instance_id=instance_id,
        address="10.0.0.1",
        port=9000,
        registered_at=T0,
        weight=weight,
        check=HealthCheck.tcp(failures_before_critical=1),
    )
    if critical:
        created.apply_check_result(CheckOutcome.FAILURE, T0)
    return created


def instances(count: int) -> list[ServiceInstance]:
    return [instance(f"node-{index}") for index in range(count)]


def chi_square(counts: Counter[str], expected: dict[str, float]) -> float:
    return sum((counts[name] - share) ** 2 / share for name, share in expected.items())


# Critical values of the chi-square distribution at p = 0.001 by degrees of freedom.
CHI_SQUARE_P001 = {2: 13.82, 3: 16.27}


def all_strategies() -> list[LoadBalancer]:
    return [
        RoundRobinBalancer(),
        RandomBalancer(random.Random(1)),
        WeightedRandomBalancer(random.Random(2)),
        LeastOutstandingBalancer(),
        ConsistentHashBalancer(),
    ]


# -- round robin -------------------------------------------------------------


def test_round_robin_picks_each_instance_exactly_equally_often() -> None:
    pool = instances(3)
    balancer = RoundRobinBalancer()

    counts = Counter(balancer.pick(pool).instance_id for _ in range(3 * 1000))

    assert counts == {"node-0": 1000, "node-1": 1000, "node-2": 1000}


def test_round_robin_cycles_in_a_stable_order_whatever_the_list_order() -> None:
    pool = instances(3)
    balancer = RoundRobinBalancer()

    picks = [balancer.pick(random.Random(seed).sample(pool, 3)).instance_id for seed in range(6)]

    assert picks == ["node-0", "node-1", "node-2"] * 2


def test_round_robin_skips_critical_instances() -> None:
    pool = [instance("a"), instance("b", critical=True), instance("c")]
    balancer = RoundRobinBalancer()

    counts = Counter(balancer.pick(pool).instance_id for _ in range(100))

    assert counts == {"a": 50, "c": 50}


# -- random --------------------------------------------------------------------


def test_random_is_roughly_uniform() -> None:
    pool = instances(4)
    balancer = RandomBalancer(random.Random(42))
    picks = 40_000

    counts = Counter(balancer.pick(pool).instance_id for _ in range(picks))

    expected = {f"node-{index}": picks / 4 for index in range(4)}
    assert chi_square(counts, expected) < CHI_SQUARE_P001[3]


def test_random_is_reproducible_with_an_injected_generator() -> None:
    pool = instances(5)

    first, again = RandomBalancer(random.Random(7)), RandomBalancer(random.Random(7))

    assert [first.pick(pool) for _ in range(50)] == [again.pick(pool) for _ in range(50)]


# -- weighted random -----------------------------------------------------------


def test_weighted_random_picks_in_proportion_to_weights() -> None:
    pool = [instance("light", 100), instance("medium", 200), instance("heavy", 700)]
    balancer = WeightedRandomBalancer(random.Random(3))
    picks = 50_000

    counts = Counter(balancer.pick(pool).instance_id for _ in range(picks))

    assert counts["light"] / picks == pytest.approx(0.1, abs=0.01)
    assert counts["medium"] / picks == pytest.approx(0.2, abs=0.01)
    assert counts["heavy"] / picks == pytest.approx(0.7, abs=0.01)
    expected = {"light": picks * 0.1, "medium": picks * 0.2, "heavy": picks * 0.7}
    assert chi_square(counts, expected) < CHI_SQUARE_P001[2]


def test_weighted_random_never_picks_a_critical_instance_however_heavy() -> None:
    pool = [instance("a", 1), instance("b", 1000, critical=True)]
    balancer = WeightedRandomBalancer(random.Random(4))

    assert {balancer.pick(pool).instance_id for _ in range(200)} == {"a"}


# -- least outstanding requests ----------------------------------------------


def test_least_outstanding_always_picks_an_instance_with_the_fewest_requests() -> None:
    pool = instances(5)
    balancer = LeastOutstandingBalancer()
    rng = random.Random(5)
    in_flight: list[ServiceInstance] = []

    for _ in range(5000):
        if in_flight and rng.random() < 0.45:
            balancer.release(in_flight.pop(rng.randrange(len(in_flight))))
            continue
        chosen = balancer.pick(pool)
        assert balancer.outstanding(chosen) == min(balancer.outstanding(i) for i in pool)
        balancer.acquire(chosen)
        in_flight.append(chosen)


def test_least_outstanding_breaks_ties_round_robin() -> None:
    pool = instances(3)
    balancer = LeastOutstandingBalancer()
    balancer.acquire(pool[1])

    picks = [balancer.pick(pool).instance_id for _ in range(4)]

    assert picks == ["node-0", "node-2", "node-0", "node-2"]


def test_least_outstanding_spreads_requests_evenly_when_they_are_held() -> None:
    pool = instances(4)
    balancer = LeastOutstandingBalancer()

    for _ in range(400):
        balancer.acquire(balancer.pick(pool))

    assert [balancer.outstanding(i) for i in pool] == [100, 100, 100, 100]


def test_releasing_more_than_was_acquired_is_an_error() -> None:
    pool = instances(1)
    balancer = LeastOutstandingBalancer()
    balancer.acquire(pool[0])
    balancer.release(pool[0])

    with pytest.raises(UnbalancedRelease):
        balancer.release(pool[0])


# -- consistent hashing --------------------------------------------------------

KEYS = [f"device-{index}" for index in range(10_000)]


def owners(balancer: ConsistentHashBalancer, pool: list[ServiceInstance]) -> dict[str, str]:
    return {key: balancer.pick(pool, key).instance_id for key in KEYS}


def test_the_hash_is_stable_across_processes() -> None:
    # A fixed value: Python's hash() of a str changes with every process.
    assert stable_hash("device-42") == 0x8E9E5155E33CC7ED


def test_consistent_hashing_maps_a_key_to_the_same_instance_every_time() -> None:
    pool = instances(5)
    first = ConsistentHashBalancer()
    second = ConsistentHashBalancer()

    assert owners(first, pool) == owners(second, list(reversed(pool)))


def test_consistent_hashing_spreads_keys_roughly_evenly() -> None:
    shares = Counter(owners(ConsistentHashBalancer(), instances(5)).values())

    assert all(0.14 <= count / len(KEYS) <= 0.26 for count in shares.values())


def test_when_one_of_n_instances_leaves_only_its_keys_move() -> None:
    pool = instances(5)
    balancer = ConsistentHashBalancer()
    before = owners(balancer, pool)
    leaving = pool[2].instance_id

    after = owners(balancer, [i for i in pool if i.instance_id != leaving])

    moved = {key for key in KEYS if before[key] != after[key]}
    assert len(moved) / len(KEYS) <= 1 / 5 + 0.05
    assert all(before[key] == leaving for key in moved)
    assert moved == {key for key in KEYS if before[key] == leaving}


def test_a_critical_instance_loses_only_its_own_keys() -> None:
    pool = instances(5)
    balancer = ConsistentHashBalancer()
    before = owners(balancer, pool)
    pool[0].apply_check_result(CheckOutcome.FAILURE, T0)

    after = owners(balancer, pool)

    assert {key for key in KEYS if before[key] != after[key]} == {
        key for key in KEYS if before[key] == "node-0"
    }


def test_when_an_instance_joins_keys_only_move_to_it() -> None:
    pool = instances(4)
    balancer = ConsistentHashBalancer()
    before = owners(balancer, pool)

    after = owners(balancer, [*pool, instance("node-new")])

    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(after[key] == "node-new" for key in moved)
    assert len(moved) / len(KEYS) <= 1 / 5 + 0.05


def test_consistent_hashing_needs_a_key() -> None:
    with pytest.raises(MissingHashKey):
        ConsistentHashBalancer().pick(instances(2))


def test_virtual_nodes_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ConsistentHashBalancer(virtual_nodes=0)


# -- health, emptiness and protection threshold (every strategy) --------------


@pytest.mark.parametrize("balancer", all_strategies(), ids=lambda b: type(b).__name__)
def test_no_instance_at_all_is_no_healthy_instance(balancer: LoadBalancer) -> None:
    with pytest.raises(NoHealthyInstance):
        balancer.pick([], key="k")


@pytest.mark.parametrize("balancer", all_strategies(), ids=lambda b: type(b).__name__)
def test_only_critical_instances_is_no_healthy_instance(balancer: LoadBalancer) -> None:
    pool = [instance("a", critical=True), instance("b", critical=True)]

    with pytest.raises(NoHealthyInstance) as raised:
        balancer.pick(pool, key="k")

    assert raised.value.service == "analytics"


@given(health=st.lists(st.booleans(), min_size=1, max_size=8), key=st.text(max_size=8))
def test_no_strategy_ever_picks_a_critical_instance(health: list[bool], key: str) -> None:
    pool = [instance(f"n{index}", critical=not up) for index, up in enumerate(health)]
    for balancer in all_strategies():
        if any(health):
            assert balancer.pick(pool, key).is_healthy()
        else:
            with pytest.raises(NoHealthyInstance):
                balancer.pick(pool, key)


@pytest.mark.parametrize(
    "balancer",
    [
        RoundRobinBalancer(protection_threshold=0.5),
        RandomBalancer(protection_threshold=0.5),
        WeightedRandomBalancer(protection_threshold=0.5),
        LeastOutstandingBalancer(protection_threshold=0.5),
        ConsistentHashBalancer(protection_threshold=0.5),
    ],
    ids=lambda b: type(b).__name__,
)
def test_below_the_protection_threshold_picking_is_refused(balancer: LoadBalancer) -> None:
    pool = [instance("a"), instance("b", critical=True), instance("c", critical=True)]
    pool.append(instance("d", critical=True))

    with pytest.raises(ProtectionThresholdReached) as raised:
        balancer.pick(pool, key="k")

    assert (raised.value.healthy, raised.value.total, raised.value.threshold) == (1, 4, 0.5)
    assert "too few healthy instances" in str(raised.value)


def test_exactly_at_the_protection_threshold_picking_goes_on() -> None:
    pool = [
        instance("a"),
        instance("b"),
        instance("c", critical=True),
        instance("d", critical=True),
    ]

    chosen = RoundRobinBalancer(protection_threshold=0.5).pick(pool)

    assert chosen.instance_id in {"a", "b"}


def test_the_protection_threshold_is_off_by_default() -> None:
    pool = [instance("a"), *[instance(f"x{index}", critical=True) for index in range(9)]]

    assert RoundRobinBalancer().pick(pool).instance_id == "a"


@pytest.mark.parametrize("threshold", [-0.1, 1.1])
def test_the_protection_threshold_is_a_fraction(threshold: float) -> None:
    with pytest.raises(ValueError):
        RoundRobinBalancer(protection_threshold=threshold)


def test_expired_ttl_instances_are_not_picked_when_the_time_is_given() -> None:
    ttl = ServiceInstance(
        service="analytics",
        instance_id="ttl",
        address="10.0.0.2",
        port=9000,
        registered_at=T0,
        check=HealthCheck.ttl_heartbeat(ttl=10),
    )
    pool = [instance("active"), ttl]
    later = T0 + timedelta(seconds=11)

    assert [i.instance_id for i in eligible_instances(pool)] == ["active", "ttl"]
    assert [i.instance_id for i in eligible_instances(pool, now=later)] == ["active"]
    assert RoundRobinBalancer().pick(pool, now=later).instance_id == "active"
