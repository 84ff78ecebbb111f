"""The deadline scheduler and the health-check backoff."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fleetmesh.status.deadlines import BackoffPolicy, DeadlineScheduler, next_check_delay

pytestmark = pytest.mark.unit

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class TestScheduler:
    def test_empty(self) -> None:
        scheduler = DeadlineScheduler()
        assert (len(scheduler), scheduler.next_at(), scheduler.pop_due(t(10**6))) == (0, None, [])

    def test_pops_what_is_due_earliest_first_and_keeps_the_rest(self) -> None:
        scheduler = DeadlineScheduler()
        for device, at in [("c", 30), ("a", 10), ("d", 40), ("b", 20)]:
            scheduler.set(device, t(at))
        assert scheduler.pop_due(t(30)) == [("a", t(10)), ("b", t(20)), ("c", t(30))]
        assert (len(scheduler), scheduler.next_at(), "d" in scheduler) == (1, t(40), True)

    def test_resetting_replaces_and_the_old_deadline_never_fires(self) -> None:
        scheduler = DeadlineScheduler()
        scheduler.set("a", t(10))
        scheduler.set("a", t(50))
        assert scheduler.get("a") == t(50)
        assert scheduler.pop_due(t(20)) == []
        assert scheduler.next_at() == t(50)
        assert scheduler.pop_due(t(60)) == [("a", t(50))]
        assert scheduler.pop_due(t(60)) == []

    def test_resetting_earlier_fires_once_at_the_new_time(self) -> None:
        scheduler = DeadlineScheduler()
        scheduler.set("a", t(50))
        scheduler.set("a", t(10))
        assert scheduler.pop_due(t(100)) == [("a", t(10))]

    def test_cancelled_deadline_never_fires(self) -> None:
        scheduler = DeadlineScheduler()
        scheduler.set("a", t(10))
        scheduler.set("b", t(20))
        assert scheduler.cancel("a") is True
        assert scheduler.cancel("a") is False
        assert scheduler.next_at() == t(20)
        assert scheduler.pop_due(t(100)) == [("b", t(20))]

    def test_same_instant_fires_in_the_order_set(self) -> None:
        scheduler = DeadlineScheduler()
        for device in ["x", "y", "z"]:
            scheduler.set(device, t(5))
        scheduler.set("x", t(5))
        assert [d for d, _ in scheduler.pop_due(t(5))] == ["y", "z", "x"]

    def test_limit_pops_the_earliest_and_leaves_the_rest_due(self) -> None:
        scheduler = DeadlineScheduler()
        for i in range(5):
            scheduler.set(f"d{i}", t(i))
        assert [d for d, _ in scheduler.pop_due(t(10), limit=2)] == ["d0", "d1"]
        assert [d for d, _ in scheduler.pop_due(t(10))] == ["d2", "d3", "d4"]

    def test_stale_entries_do_not_pile_up(self) -> None:
        scheduler = DeadlineScheduler()
        for i in range(50_000):
            scheduler.set(f"d{i % 10}", t(i))
        # White box: memory must stay O(live deadlines), not O(resets).
        assert len(scheduler._heap) <= 2 * 10 + 1024
        assert len(scheduler) == 10
        assert scheduler.next_at() == t(49_990)

    def test_cancelling_and_firing_never_rebuild_the_heap(self) -> None:
        """A silent fleet cancels and fires thousands of deadlines a second; a rebuild of
        the whole heap in between would hold the next ones back."""
        scheduler = DeadlineScheduler()
        for round_at in (3_600, 28):  # every deadline moved earlier: half the heap is stale
            for i in range(5_000):
                scheduler.set(f"d{i}", t(round_at + i / 1_000))
        heap = scheduler._heap  # white box: the same list, never replaced
        due = scheduler.pop_due(t(30))
        for device, _ in due:
            scheduler.cancel(device)
        for i in range(2_000, 4_000):
            scheduler.cancel(f"d{i}")
        assert scheduler._heap is heap
        assert len(due) == 2_001 and len(scheduler) == 1_000
        assert scheduler.next_at() == t(32)
        scheduler.set("d0", t(40))  # the next set rebuilds from the live entries
        assert len(scheduler._heap) == len(scheduler) == 1_001


def test_100_000_deadlines_set_reset_cancel_fire_once_in_order() -> None:
    rng = random.Random(20240101)
    scheduler = DeadlineScheduler()
    expected: dict[str, datetime] = {}
    devices = [f"device-{i:06d}" for i in range(100_000)]
    for device in devices:
        expected[device] = t(rng.randrange(0, 10_000))
        scheduler.set(device, expected[device])
    for device in rng.sample(devices, 50_000):
        expected[device] = t(rng.randrange(0, 10_000))
        scheduler.set(device, expected[device])
    for device in rng.sample(devices, 20_000):
        expected.pop(device, None)
        scheduler.cancel(device)
    assert len(scheduler) == len(expected)

    fired: list[tuple[str, datetime]] = []
    for now in range(0, 10_001, 250):
        due = scheduler.pop_due(t(now))
        assert all(at <= t(now) for _, at in due)
        next_at = scheduler.next_at()
        assert next_at is None or next_at > t(now)
        fired.extend(due)

    assert len(fired) == len({device for device, _ in fired}), "a deadline fired twice"
    assert dict(fired) == expected
    assert [at for _, at in fired] == sorted(expected.values())
    assert len(scheduler) == 0 and scheduler.next_at() is None


class SchedulerAgainstAModel(RuleBasedStateMachine):
    """Any mix of set, cancel and pop behaves like a plain dict of deadlines."""

    def __init__(self) -> None:
        super().__init__()
        self.scheduler = DeadlineScheduler()
        self.model: dict[str, tuple[datetime, int]] = {}
        self.now = 0
        self.sets = 0

    devices = st.sampled_from([f"d{i}" for i in range(8)])

    @rule(device=devices, offset=st.integers(min_value=-5, max_value=30))
    def set_deadline(self, device: str, offset: int) -> None:
        self.scheduler.set(device, t(self.now + offset))
        self.sets += 1
        self.model[device] = (t(self.now + offset), self.sets)

    @rule(device=devices)
    def cancel(self, device: str) -> None:
        assert self.scheduler.cancel(device) is (self.model.pop(device, None) is not None)

    @rule(step=st.integers(min_value=0, max_value=20), limit=st.none() | st.integers(0, 3))
    def advance_and_pop(self, step: int, limit: int | None) -> None:
        self.now += step
        due = sorted(
            (entry, device) for device, entry in self.model.items() if entry[0] <= t(self.now)
        )
        popped = self.scheduler.pop_due(t(self.now), limit)
        wanted = due if limit is None else due[:limit]
        assert popped == [(device, at) for (at, _), device in wanted]
        for device, _ in popped:
            del self.model[device]

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert len(self.scheduler) == len(self.model)
        assert self.scheduler.next_at() == min((at for at, _ in self.model.values()), default=None)
        for device, (at, _) in self.model.items():
            assert self.scheduler.get(device) == at


TestSchedulerAgainstAModel = SchedulerAgainstAModel.TestCase
TestSchedulerAgainstAModel.settings = settings(max_examples=150, stateful_step_count=40)


class TestBackoff:
    def test_default_starts_at_30s_doubling_up_to_one_hour(self) -> None:
        delays = [next_check_delay(attempt).total_seconds() for attempt in range(10)]
        assert delays == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]

    def test_huge_attempt_numbers_stay_at_the_maximum(self) -> None:
        assert next_check_delay(10**9) == timedelta(hours=1)

    def test_custom_policy(self) -> None:
        policy = BackoffPolicy(
            initial=timedelta(seconds=10), factor=3, maximum=timedelta(seconds=100)
        )
        assert [next_check_delay(a, policy).total_seconds() for a in range(4)] == [10, 30, 90, 100]

    def test_factor_one_is_a_constant_delay(self) -> None:
        policy = BackoffPolicy(factor=1.0)
        assert next_check_delay(10**6, policy) == timedelta(seconds=30)

    def test_delays_never_decrease_and_never_exceed_the_maximum(self) -> None:
        policy = BackoffPolicy(initial=timedelta(seconds=7), factor=1.7)
        delays = [next_check_delay(a, policy) for a in range(200)]
        assert delays == sorted(delays)
        assert max(delays) == policy.maximum

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"initial": timedelta(0)},
            {"factor": 0.5},
            {"factor": float("inf")},
            {"maximum": timedelta(seconds=10)},
        ],
    )
    def test_bad_policies_are_refused(self, kwargs: dict[str, object]) -> None:
        with pytest.raises(ValueError):
            BackoffPolicy(**kwargs)  # type: ignore[arg-type]

    def test_negative_attempt_is_refused(self) -> None:
        with pytest.raises(ValueError, match="attempt"):
            next_check_delay(-1)
