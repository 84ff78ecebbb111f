"""Streaming detectors: score range, no look-ahead, JSON state round-trips, behaviour."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetmesh.analytics.detectors import (
    ALIASES,
    DETECTORS,
    Detector,
    canonical_name,
    create_detector,
    detector_from_state,
    resolve_detector_names,
)
from fleetmesh.analytics.detectors.base import AlarmSpacer
from fleetmesh.analytics.detectors.fleetmesh_novelty import (
    FleetmeshNovelty,
    SupportMemory,
    TailCalibrator,
)

pytestmark = pytest.mark.unit

FIVE_MINUTES = 300.0
# Small settings so the forest refits several times within a short test series.
FAST_PARAMS: dict[str, dict[str, int]] = {
    "isolation_forest": {"train_size": 150, "min_train": 60, "refit_every": 80, "n_estimators": 8}
}


def make(name: str) -> Detector:
    return create_detector(name, **FAST_PARAMS.get(name, {}))


def telemetry(length: int = 1200, seed: int = 7) -> tuple[list[float], list[float]]:
    """Daily-periodic 5-minute telemetry with noise, a spike and a level shift."""
    rng = np.random.default_rng(seed)
    index = np.arange(length)
    values = 50 + 10 * np.sin(2 * np.pi * index / 288) + rng.normal(0, 1, length)
    values[length * 7 // 12] += 40
    values[length * 3 // 4 :] += 15
    timestamps = 1.4e9 + FIVE_MINUTES * index
    return timestamps.tolist(), values.tolist()


def run(detector: Detector, timestamps: Sequence[float], values: Sequence[float]) -> list[float]:
    return [detector.update(ts, value) for ts, value in zip(timestamps, values, strict=True)]


all_detectors = pytest.mark.parametrize("name", sorted(DETECTORS))


@all_detectors
def test_scores_lie_in_the_unit_interval(name: str) -> None:
    scores = run(make(name), *telemetry())
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert max(scores) > 0.0


@all_detectors
def test_future_points_do_not_change_past_scores(name: str) -> None:
    timestamps, values = telemetry()
    cut = 800
    rng = np.random.default_rng(1)
    altered = values[:cut] + (rng.permutation(values[cut:]) * 3.0 - 20.0).tolist()
    original = run(make(name), timestamps, values)
    changed = run(make(name), timestamps, altered)
    assert changed[:cut] == original[:cut]


@all_detectors
def test_state_round_trip_mid_stream_gives_identical_scores(name: str) -> None:
    timestamps, values = telemetry()
    uninterrupted = run(make(name), timestamps, values)
    for cut in (350, 750):
        first = make(name)
        head = run(first, timestamps[:cut], values[:cut])
        stored = json.dumps(first.get_state(), allow_nan=False)
        restored = detector_from_state(json.loads(stored))
        tail = run(restored, timestamps[cut:], values[cut:])
        assert head + tail == uninterrupted


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("fleetmesh_novelty", {"memory": 64, "warmup": 20}),
        ("windowed_gaussian", {"window": 50}),
    ],
)
def test_round_trip_survives_memory_thinning(name: str, params: dict[str, int]) -> None:
    timestamps, values = telemetry()
    uninterrupted = run(create_detector(name, **params), timestamps, values)
    first = create_detector(name, **params)
    head = run(first, timestamps[:777], values[:777])
    restored = detector_from_state(json.loads(json.dumps(first.get_state())))
    assert head + run(restored, timestamps[777:], values[777:]) == uninterrupted


def test_learn_one_is_update_without_the_score() -> None:
    timestamps, values = telemetry(300)
    learner, scorer = make("ewma"), make("ewma")
    for ts, value in zip(timestamps, values, strict=True):
        learner.learn_one(ts, value)
        scorer.update(ts, value)
    assert learner.get_state() == scorer.get_state()


@all_detectors
def test_state_holds_plain_json_types_only(name: str) -> None:
    detector = make(name)
    run(detector, *telemetry(400))
    state = detector.get_state()

    def plain(node: object) -> bool:
        if isinstance(node, dict):
            return all(isinstance(k, str) and plain(v) for k, v in node.items())
        if isinstance(node, list):
            return all(plain(v) for v in node)
        return node is None or type(node) in (bool, int, float, str)

    assert plain(state)
    assert state["name"] == name


@all_detectors
def test_state_of_another_detector_is_rejected(name: str) -> None:
    other = next(n for n in sorted(DETECTORS) if n != name)
    with pytest.raises(ValueError, match="state of detector"):
        DETECTORS[name].from_state(make(other).get_state())


@all_detectors
def test_non_finite_values_score_zero_and_are_not_learnt(name: str) -> None:
    timestamps, values = telemetry(500)
    clean = run(make(name), timestamps, values)
    detector = make(name)
    assert detector.update(timestamps[0] - 1, math.nan) == 0.0
    assert detector.update(timestamps[0] - 1, math.inf) == 0.0
    assert run(detector, timestamps, values) == clean


@all_detectors
def test_params_rebuild_an_equivalent_detector(name: str) -> None:
    detector = make(name)
    rebuilt = DETECTORS[name](**json.loads(json.dumps(detector.params)))
    timestamps, values = telemetry(400)
    assert run(rebuilt, timestamps, values) == run(make(name), timestamps, values)


finite_values = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=300,
)
cheap_detectors = st.sampled_from(["windowed_gaussian", "ewma", "fleetmesh_novelty"])


@settings(max_examples=40, deadline=None)
@given(name=cheap_detectors, values=finite_values)
def test_any_finite_series_scores_within_unit_interval(name: str, values: list[float]) -> None:
    timestamps = [1.4e9 + 60.0 * i for i in range(len(values))]
    assert all(0.0 <= s <= 1.0 for s in run(make(name), timestamps, values))


@settings(max_examples=30, deadline=None)
@given(name=cheap_detectors, values=finite_values, data=st.data())
def test_any_split_point_round_trips(name: str, values: list[float], data: st.DataObject) -> None:
    timestamps = [1.4e9 + 60.0 * i for i in range(len(values))]
    cut = data.draw(st.integers(0, len(values)))
    first = make(name)
    head = run(first, timestamps[:cut], values[:cut])
    restored = detector_from_state(json.loads(json.dumps(first.get_state())))
    assert head + run(restored, timestamps[cut:], values[cut:]) == run(
        make(name), timestamps, values
    )


def test_best_alias_names_fleetmesh_novelty() -> None:
    assert canonical_name("best") == FleetmeshNovelty.name
    assert ALIASES["best"] in DETECTORS


def test_all_expands_to_every_detector_once() -> None:
    assert resolve_detector_names(["best", "all"]) == [
        FleetmeshNovelty.name,
        *[n for n in DETECTORS if n != FleetmeshNovelty.name],
    ]


def test_unknown_detector_names_are_refused() -> None:
    with pytest.raises(KeyError, match="unknown detector"):
        create_detector("no_such_detector")


def noisy_baseline(length: int, seed: int = 3) -> list[float]:
    values: list[float] = (20 + np.random.default_rng(seed).normal(0, 1, length)).tolist()
    return values


def test_novelty_flags_a_spike_to_a_new_level() -> None:
    values = noisy_baseline(1500)
    values[1200] = 45.0
    scores = run(FleetmeshNovelty(), [60.0 * i for i in range(1500)], values)
    assert scores[1200] > 0.9
    assert max(scores[300:1200]) < scores[1200]


def test_novelty_stops_alarming_on_a_repeating_spike() -> None:
    values = noisy_baseline(3000)
    spikes = range(400, 3000, 250)
    for start in spikes:
        values[start] = 45.0
    scores = run(FleetmeshNovelty(), [60.0 * i for i in range(3000)], values)
    assert scores[400] > 0.9
    assert max(scores[start] for start in spikes[1:]) < 0.2
    # New extremes of the noise may stand out a little, never like the first spike.
    assert max(scores[1500:]) < 0.5 * scores[400]


def test_novelty_flags_an_unusual_day_in_a_weekly_pattern() -> None:
    slots_per_day = 48
    days = 70
    hours = np.arange(days * slots_per_day) / 2
    daily = 10 + 8 * np.sin(2 * np.pi * hours / 24) + np.where(hours % 168 >= 120, -4.0, 0.0)
    noise = np.random.default_rng(5).normal(0, 0.3, len(hours))
    values = (daily + noise).tolist()
    holiday = range(60 * slots_per_day, 61 * slots_per_day)
    for i in holiday:
        values[i] = 10 + 0.2 * (values[i] - 10)  # a flat day: every value is ordinary
    timestamps = (1.4e9 + 1800.0 * np.arange(len(values))).tolist()
    scores = run(FleetmeshNovelty(), timestamps, values)
    # The weekly channel needs three weeks of slots, then a week of residuals.
    settled = scores[45 * slots_per_day : holiday.start]
    assert max(scores[holiday.start : holiday.stop]) > max(0.5, 2 * max(settled))


def test_support_memory_keeps_extremes_when_thinning() -> None:
    memory = SupportMemory(capacity=50)
    for value in np.random.default_rng(0).normal(0, 1, 1000).tolist() + [-10.0, 10.0]:
        memory.add(value)
    assert len(memory) <= 50
    assert memory.values[0] == -10.0
    assert memory.values[-1] == 10.0
    assert memory.gap_fraction(10.0) == 0.0


def test_alarm_spacer_quiets_repeats_but_passes_stronger_alarms() -> None:
    spacer = AlarmSpacer(rest=3, alarm_score=0.5, escalation=1.5)
    # Odds: 0.6 -> 1.5; 0.65 -> 1.86 < 1.5 * 1.5; 0.95 -> 19 passes; 0.9 -> 9 < 28.5.
    outputs = [spacer.filter(s) for s in (0.6, 0.65, 0.95, 0.9, 0.2, 0.1, 0.1, 0.7, 1.0, 1.0)]
    assert outputs == [0.6, 0.0, 0.95, 0.0, 0.0, 0.0, 0.1, 0.7, 1.0, 0.0]


def calibrator_with_history(history: Sequence[float], lower: float, upper: float) -> TailCalibrator:
    calibrator = TailCalibrator(lower, upper, warmup=1, capacity=10_000)
    for statistic in history:
        calibrator.history.add(statistic)
    return calibrator


def test_calibration_scale_is_the_geometric_mean_of_two_quantiles() -> None:
    history = [float(i) for i in range(1, 1001)]  # quantile q is about 1000 q
    calibrator = calibrator_with_history(history, lower=0.9, upper=0.999)
    lower, upper = calibrator.history.quantile(0.9), calibrator.history.quantile(0.999)
    assert (lower, upper) == (901.0, 1000.0)
    assert calibrator.ratio(300.0) == pytest.approx(300.0 / math.sqrt(lower * upper))


def test_equal_quantiles_calibrate_on_that_quantile_alone() -> None:
    calibrator = calibrator_with_history([float(i) for i in range(1, 1001)], 0.99, 0.99)
    assert calibrator.history.quantile(0.99) == 991.0
    assert calibrator.ratio(495.5) == pytest.approx(0.5)


def test_a_mostly_zero_history_is_calibrated_on_the_upper_quantile() -> None:
    # A counter repeating a few exact values: 99.5% of novelties are 0.
    history = [0.0] * 995 + [0.5, 1.0, 2.0, 4.0, 8.0]
    calibrator = calibrator_with_history(history, lower=0.99, upper=0.999)
    assert calibrator.ratio(2.0) == pytest.approx(2.0 / calibrator.history.quantile(0.999))
    assert calibrator_with_history([0.0] * 1000, 0.99, 0.999).ratio(1e-9) > 1.0


def test_lower_quantile_above_quantile_is_refused() -> None:
    with pytest.raises(ValueError, match="lower_quantile"):
        FleetmeshNovelty(quantile=0.99, lower_quantile=0.999)


def test_a_state_saved_before_lower_quantile_keeps_its_calibration() -> None:
    timestamps, values = telemetry()
    single = {"lower_quantile": 0.999, "warmup": 20}
    uninterrupted = run(FleetmeshNovelty(**single), timestamps, values)
    first = FleetmeshNovelty(**single)
    head = run(first, timestamps[:600], values[:600])
    state = first.get_state()
    del state["params"]["lower_quantile"]  # as stored by earlier versions
    restored = detector_from_state(json.loads(json.dumps(state)))
    assert restored.params["lower_quantile"] == restored.params["quantile"]
    assert head + run(restored, timestamps[600:], values[600:]) == uninterrupted
    assert run(FleetmeshNovelty(warmup=20), timestamps, values) != uninterrupted


@all_detectors
def test_tuning_grid_starts_with_the_defaults_and_builds_detectors(name: str) -> None:
    grid = DETECTORS[name].tuning_grid
    assert grid[0] == {}
    assert len({json.dumps(params, sort_keys=True) for params in grid}) == len(grid)
    defaults = DETECTORS[name]().params
    for params in grid:
        assert set(params) <= set(defaults)
        built = DETECTORS[name](**json.loads(json.dumps(params)))
        assert {**defaults, **params} == {**defaults, **built.params}
