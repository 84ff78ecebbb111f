"""Uptime and availability: tricky histories by example, and everything against a brute force."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetmesh.status.domain import DeviceState
from fleetmesh.status.uptime import (
    StatusPoint,
    availability,
    normalize_history,
    state_spans,
    time_in_states,
    uptime,
)

pytestmark = pytest.mark.unit

T0 = datetime(2024, 1, 1, tzinfo=UTC)
REGISTERED, ONLINE, OFFLINE = DeviceState.REGISTERED, DeviceState.ONLINE, DeviceState.OFFLINE
MAINTENANCE, DEREGISTERED = DeviceState.MAINTENANCE, DeviceState.DEREGISTERED


def t(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def history(*points: tuple[int, DeviceState]) -> list[StatusPoint]:
    return [(t(ts), state) for ts, state in points]


class TestUptime:
    def test_empty_history_has_no_uptime(self) -> None:
        assert uptime([], t(100)) == s(0)

    def test_the_open_interval_counts_up_to_now(self) -> None:
        assert uptime(history((0, ONLINE)), t(100)) == s(100)

    def test_repeated_online_reports_are_not_counted_twice(self) -> None:
        points = history((0, ONLINE), (10, ONLINE), (20, ONLINE), (30, OFFLINE))
        assert uptime(points, t(100)) == s(30)

    def test_exact_duplicates_are_not_counted_twice(self) -> None:
        points = history((0, ONLINE), (0, ONLINE), (30, OFFLINE), (30, OFFLINE))
        assert uptime(points, t(100)) == s(30)

    def test_offline_before_any_online(self) -> None:
        points = history((0, OFFLINE), (10, ONLINE), (25, OFFLINE))
        assert uptime(points, t(100)) == s(15)

    def test_out_of_order_entries_are_sorted(self) -> None:
        points = history((40, ONLINE), (20, OFFLINE), (0, ONLINE), (10, ONLINE))
        assert uptime(points, t(50)) == s(30)

    def test_same_instant_the_later_entry_wins(self) -> None:
        assert uptime(history((0, ONLINE), (10, OFFLINE), (10, ONLINE)), t(30)) == s(30)
        assert uptime(history((0, ONLINE), (10, ONLINE), (10, OFFLINE)), t(30)) == s(10)

    def test_maintenance_is_not_uptime(self) -> None:
        points = history((0, ONLINE), (10, MAINTENANCE), (20, ONLINE))
        assert uptime(points, t(30)) == s(20)

    def test_nothing_counts_after_deregistration(self) -> None:
        points = history((0, ONLINE), (10, DEREGISTERED), (20, ONLINE))
        assert uptime(points, t(100)) == s(10)

    def test_entries_after_now_are_ignored(self) -> None:
        assert uptime(history((0, ONLINE), (50, OFFLINE), (60, ONLINE)), t(40)) == s(40)

    def test_since_clips_the_start(self) -> None:
        points = history((0, ONLINE), (50, OFFLINE), (60, ONLINE))
        assert uptime(points, t(100), since=t(45)) == s(45)

    def test_plain_strings_are_accepted_as_states(self) -> None:
        points = [(t(0), "online"), (t(10), "offline")]
        assert uptime(points, t(20)) == s(10)  # type: ignore[arg-type]

    def test_sub_second_precision_is_kept(self) -> None:
        points = [(t(0), ONLINE), (t(0) + timedelta(microseconds=1500), OFFLINE)]
        assert uptime(points, t(1)) == timedelta(microseconds=1500)


class TestAvailability:
    def test_nothing_known_is_none_not_zero(self) -> None:
        result = availability([], t(100), s(60))
        assert (result.ratio, result.percent, result.excluded) == (None, None, s(60))

    def test_always_online_is_100(self) -> None:
        assert availability(history((0, ONLINE)), t(100), s(60)).percent == 100.0

    def test_maintenance_is_out_of_the_denominator(self) -> None:
        points = history((0, ONLINE), (10, MAINTENANCE), (20, ONLINE), (30, OFFLINE))
        result = availability(points, t(40), s(40))
        assert (result.online, result.offline, result.maintenance) == (s(20), s(10), s(10))
        assert result.percent == pytest.approx(200 / 3)

    def test_time_before_registration_and_first_report_is_excluded(self) -> None:
        points = history((50, REGISTERED), (60, ONLINE), (90, OFFLINE))
        result = availability(points, t(100), s(100))
        assert (result.online, result.offline, result.excluded) == (s(30), s(10), s(60))
        assert result.percent == 75.0

    def test_time_after_deregistration_is_excluded(self) -> None:
        points = history((0, ONLINE), (10, OFFLINE), (20, DEREGISTERED), (25, ONLINE))
        result = availability(points, t(100), s(100))
        assert (result.online, result.offline, result.excluded) == (s(10), s(10), s(80))

    def test_the_window_clips_an_interval_that_started_before_it(self) -> None:
        points = history((0, OFFLINE), (90, ONLINE))
        result = availability(points, t(100), s(20))
        assert (result.start, result.online, result.offline) == (t(80), s(10), s(10))

    def test_offline_all_window_is_zero(self) -> None:
        assert availability(history((0, OFFLINE)), t(100), s(60)).percent == 0.0

    def test_window_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="window"):
            availability([], t(0), s(0))


class TestNormalize:
    def test_one_point_per_real_change_cut_at_deregistration(self) -> None:
        points = history(
            (30, OFFLINE),
            (0, ONLINE),
            (10, ONLINE),
            (30, OFFLINE),
            (40, DEREGISTERED),
            (50, ONLINE),
        )
        assert normalize_history(points) == history((0, ONLINE), (30, OFFLINE), (40, DEREGISTERED))

    def test_a_change_undone_at_the_same_instant_leaves_no_point(self) -> None:
        points = history((0, ONLINE), (10, OFFLINE), (10, ONLINE), (20, ONLINE))
        assert normalize_history(points) == history((0, ONLINE))

    def test_spans_are_half_open_and_clipped(self) -> None:
        spans = state_spans(history((0, ONLINE), (10, OFFLINE)), t(5), t(15))
        assert [(x.state, x.start, x.end) for x in spans] == [
            (ONLINE, t(5), t(10)),
            (OFFLINE, t(10), t(15)),
        ]


# Brute force: the state of each whole second, decided straight from the rules
# (with integer timestamps the state is constant over each [s, s + 1)).


def brute_state_at(points: Sequence[tuple[int, DeviceState]], second: int) -> DeviceState | None:
    if any(state is DEREGISTERED and ts <= second for ts, state in points):
        return DEREGISTERED
    candidates = [(ts, index) for index, (ts, _) in enumerate(points) if ts <= second]
    return points[max(candidates)[1]][1] if candidates else None


def brute_seconds(
    points: Sequence[tuple[int, DeviceState]], start: int, end: int
) -> dict[DeviceState | None, int]:
    counts: dict[DeviceState | None, int] = {}
    for second in range(start, end):
        state = brute_state_at(points, second)
        counts[state] = counts.get(state, 0) + 1
    return counts


raw_histories = st.lists(
    st.tuples(st.integers(min_value=0, max_value=120), st.sampled_from(list(DeviceState))),
    max_size=25,
)
nows = st.integers(min_value=0, max_value=150)


@settings(max_examples=400, deadline=None)
@given(raw_histories, nows)
def test_uptime_matches_brute_force(raw: list[tuple[int, DeviceState]], now: int) -> None:
    first = min((ts for ts, _ in raw), default=now)
    expected = brute_seconds(raw, first, now).get(ONLINE, 0)
    assert uptime(history(*raw), t(now)) == s(expected)


@settings(max_examples=400, deadline=None)
@given(raw_histories, nows, st.integers(min_value=1, max_value=150))
def test_availability_matches_brute_force(
    raw: list[tuple[int, DeviceState]], now: int, window: int
) -> None:
    counts = brute_seconds(raw, now - window, now)
    online, offline = counts.get(ONLINE, 0), counts.get(OFFLINE, 0)
    result = availability(history(*raw), t(now), s(window))
    assert (result.online, result.offline) == (s(online), s(offline))
    assert result.maintenance == s(counts.get(MAINTENANCE, 0))
    assert result.online + result.offline + result.maintenance + result.excluded == s(window)
    if online + offline == 0:
        assert result.percent is None
    else:
        assert result.percent == pytest.approx(100 * online / (online + offline))
        assert result.percent is not None and 0.0 <= result.percent <= 100.0


@settings(max_examples=200, deadline=None)
@given(raw_histories, nows, st.integers(min_value=-20, max_value=150))
def test_time_in_states_splits_the_interval_exactly(
    raw: list[tuple[int, DeviceState]], now: int, start: int
) -> None:
    times = time_in_states(history(*raw), t(start), t(now))
    counts = brute_seconds(raw, start, now)
    assert {state: times.of(state) for state in DeviceState} == {
        state: s(counts.get(state, 0)) for state in DeviceState
    }
    assert times.unknown == s(counts.get(None, 0))


@settings(max_examples=200, deadline=None)
@given(raw_histories, nows, st.randoms(use_true_random=False))
def test_shuffling_distinct_instants_changes_nothing(
    raw: list[tuple[int, DeviceState]], now: int, rnd: random.Random
) -> None:
    distinct = list({ts: (ts, state) for ts, state in raw}.values())
    shuffled = list(distinct)
    rnd.shuffle(shuffled)
    assert uptime(history(*shuffled), t(now)) == uptime(history(*distinct), t(now))
    assert normalize_history(history(*shuffled)) == normalize_history(history(*distinct))
