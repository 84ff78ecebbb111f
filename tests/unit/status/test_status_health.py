"""The health score: components, reasons, weights, and missing inputs."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetmesh.status.domain import DeviceState
from fleetmesh.status.health import (
    Attempts,
    DataQuality,
    HealthInputs,
    HealthPolicy,
    HealthWeights,
    format_duration,
    health_score,
)
from fleetmesh.status.uptime import Availability, availability

pytestmark = pytest.mark.unit

NOW = datetime(2024, 1, 2, tzinfo=UTC)
DAY = timedelta(days=1)


def seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def available(percent_online: float, maintenance: timedelta = timedelta(0)) -> Availability:
    counted = DAY - maintenance
    online = counted * (percent_online / 100)
    return Availability(
        start=NOW - DAY,
        end=NOW,
        online=online,
        offline=counted - online,
        maintenance=maintenance,
        excluded=timedelta(0),
    )


def perfect(**changes: object) -> HealthInputs:
    values: dict[str, object] = {
        "now": NOW,
        "availability": available(100),
        "last_seen": NOW - seconds(5),
        "expected_interval": seconds(30),
        "data_quality": DataQuality(mean=1.0, points=50),
        "commands": Attempts(failed=0, total=4),
        "health_checks": Attempts(),
    }
    values.update(changes)
    return HealthInputs(**values)  # type: ignore[arg-type]


def component(inputs: HealthInputs, name: str) -> tuple[float | None, str]:
    found = {c.name: c for c in health_score(inputs).components}[name]
    return found.score, found.reason


class TestOverall:
    def test_a_perfect_device_scores_100_with_nothing_to_explain(self) -> None:
        result = health_score(perfect())
        assert result.score == 100.0
        assert result.reasons == []

    def test_components_carry_their_documented_weights(self) -> None:
        weights = {c.name: c.weight for c in health_score(perfect()).components}
        assert weights == {
            "availability": 0.4,
            "freshness": 0.3,
            "data_quality": 0.2,
            "failures": 0.1,
        }

    def test_weighted_mean_of_the_components(self) -> None:
        inputs = perfect(
            availability=available(50),
            data_quality=DataQuality(mean=0.5, points=10),
            commands=Attempts(failed=1, total=4),
        )
        # 0.4 * 50 + 0.3 * 100 + 0.2 * 50 + 0.1 * 75
        assert health_score(inputs).score == 67.5

    def test_excluded_components_renormalise_the_weights(self) -> None:
        inputs = perfect(availability=available(50), data_quality=None, commands=Attempts())
        # (0.4 * 50 + 0.3 * 100) / 0.7
        assert health_score(inputs).score == 71.4

    def test_nothing_known_is_none_not_nan(self) -> None:
        result = health_score(HealthInputs(now=NOW))
        assert result.score is None
        assert len(result.reasons) == 4
        assert all("excluded" in reason for reason in result.reasons)

    def test_reasons_rank_what_pulls_the_score_down_then_what_is_excluded(self) -> None:
        inputs = perfect(
            availability=available(90),  # loses 0.4 * 10 = 4
            data_quality=DataQuality(mean=0.5, points=10),  # loses 0.2 * 50 = 10
            commands=Attempts(),
        )
        assert health_score(inputs).reasons == [
            "data_quality: mean quality 0.50 over 10 recent points",
            "availability: 90.0% online over the last 1d",
            "failures: excluded: no recent commands or health checks",
        ]

    def test_a_zero_weight_component_does_not_count(self) -> None:
        policy = HealthPolicy(weights=HealthWeights(availability=0.0))
        assert health_score(perfect(availability=available(0)), policy).score == 100.0

    @pytest.mark.parametrize(
        "weights",
        [
            {"availability": -0.1},
            {"freshness": math.nan},
            {"availability": 0, "freshness": 0, "data_quality": 0, "failures": 0},
        ],
    )
    def test_bad_weights_are_refused(self, weights: dict[str, float]) -> None:
        with pytest.raises(ValueError, match="weights"):
            HealthWeights(**weights)


class TestAvailabilityComponent:
    def test_percent_online_is_the_score(self) -> None:
        score, reason = component(perfect(availability=available(99.25)), "availability")
        assert score == pytest.approx(99.25)
        assert reason == "99.2% online over the last 1d"

    def test_maintenance_is_mentioned(self) -> None:
        _, reason = component(
            perfect(availability=available(100, maintenance=timedelta(hours=2))), "availability"
        )
        assert reason == "100.0% online over the last 1d (2h of maintenance not counted)"

    def test_nothing_counted_in_the_window_is_excluded(self) -> None:
        nothing = availability([(NOW, DeviceState.REGISTERED)], NOW, DAY)
        assert component(perfect(availability=nothing), "availability") == (
            None,
            "excluded: no online or offline time in the last 1d",
        )


class TestFreshness:
    def test_silence_longer_than_expected_lowers_the_score_and_says_so(self) -> None:
        score, reason = component(perfect(last_seen=NOW - seconds(192)), "freshness")
        assert reason == "no data for 3m12s, expected every 30s"
        assert score == pytest.approx(100 * (10 - 6.4) / 8.5)

    def test_within_one_and_a_half_intervals_is_fresh(self) -> None:
        assert component(perfect(last_seen=NOW - seconds(45)), "freshness") == (
            100.0,
            "last seen 45s ago, expected every 30s",
        )

    def test_ten_intervals_of_silence_scores_zero(self) -> None:
        assert component(perfect(last_seen=NOW - seconds(300)), "freshness")[0] == 0.0
        assert component(perfect(last_seen=NOW - DAY), "freshness")[0] == 0.0

    def test_a_last_seen_in_the_future_counts_as_just_seen(self) -> None:
        assert component(perfect(last_seen=NOW + seconds(5)), "freshness")[0] == 100.0

    def test_never_seen_is_excluded(self) -> None:
        assert component(perfect(last_seen=None), "freshness") == (None, "excluded: never seen")

    @pytest.mark.parametrize("interval", [None, timedelta(0)])
    def test_unknown_interval_is_excluded(self, interval: timedelta | None) -> None:
        assert component(perfect(expected_interval=interval), "freshness") == (
            None,
            "excluded: expected reporting interval unknown",
        )

    def test_thresholds_are_configurable(self) -> None:
        policy = HealthPolicy(fresh_within=1.0, stale_after=2.0)
        inputs = perfect(last_seen=NOW - seconds(45))
        freshness = {c.name: c for c in health_score(inputs, policy).components}["freshness"]
        assert freshness.score == 50.0
        with pytest.raises(ValueError):
            HealthPolicy(fresh_within=3.0, stale_after=2.0)


class TestDataQualityAndFailures:
    def test_no_recent_telemetry_is_excluded(self) -> None:
        assert component(perfect(data_quality=None), "data_quality") == (
            None,
            "excluded: no recent telemetry",
        )
        empty = DataQuality(mean=0.0, points=0)
        assert component(perfect(data_quality=empty), "data_quality")[0] is None

    def test_failure_rate_over_commands_and_health_checks(self) -> None:
        inputs = perfect(commands=Attempts(failed=2, total=10), health_checks=Attempts(1, 2))
        score, reason = component(inputs, "failures")
        assert score == 75.0
        assert reason == "2 of 10 commands failed, 1 of 2 health checks failed"

    @pytest.mark.parametrize("mean", [-0.1, 1.1, math.nan])
    def test_quality_outside_zero_one_is_refused(self, mean: float) -> None:
        with pytest.raises(ValueError, match="quality"):
            DataQuality(mean=mean, points=3)

    @pytest.mark.parametrize(("failed", "total"), [(-1, 3), (0, -1), (4, 3)])
    def test_impossible_counts_are_refused(self, failed: int, total: int) -> None:
        with pytest.raises(ValueError):
            Attempts(failed=failed, total=total)


@pytest.mark.parametrize(
    ("duration", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(milliseconds=250), "250ms"),
        (seconds(30), "30s"),
        (seconds(192), "3m12s"),
        (timedelta(hours=1), "1h"),
        (timedelta(days=2, hours=3, seconds=1.9), "2d3h1s"),
        (-seconds(5), "-5s"),
    ],
)
def test_format_duration(duration: timedelta, text: str) -> None:
    assert format_duration(duration) == text


optional_availability = st.none() | st.floats(min_value=0, max_value=100).map(available)
optional_quality = st.none() | st.builds(
    DataQuality, st.floats(min_value=0, max_value=1), st.integers(min_value=0, max_value=1000)
)
attempts = st.integers(min_value=0, max_value=50).flatmap(
    lambda total: st.builds(Attempts, st.integers(min_value=0, max_value=total), st.just(total))
)


@given(
    optional_availability,
    st.none() | st.integers(min_value=-100, max_value=10**7).map(lambda s: NOW - seconds(s)),
    st.none() | st.integers(min_value=0, max_value=10**5).map(seconds),
    optional_quality,
    attempts,
    attempts,
)
def test_the_score_is_always_none_or_within_0_and_100(
    avail: Availability | None,
    last_seen: datetime | None,
    interval: timedelta | None,
    quality: DataQuality | None,
    commands: Attempts,
    checks: Attempts,
) -> None:
    inputs = HealthInputs(NOW, avail, last_seen, interval, quality, commands, checks)
    result = health_score(inputs)
    assert result.score is None or 0.0 <= result.score <= 100.0
    for part in result.components:
        assert part.reason
        assert part.score is None or (math.isfinite(part.score) and 0 <= part.score <= 100)
