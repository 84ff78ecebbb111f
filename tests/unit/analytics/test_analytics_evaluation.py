"""Evaluation metrics, timestamps and labels of the analytics domain (pure)."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import numpy as np
import pytest

from fleetmesh.analytics import nab
from fleetmesh.analytics.domain import (
    Deployment,
    DeploymentStatus,
    InvalidAnalyticsInput,
    evaluate_scores,
    nab_score_at_threshold,
    parse_ts,
    resolve_algorithm,
    score_summary,
    window_rows_from_times,
    windows_from_labels,
)

pytestmark = pytest.mark.unit


def test_timestamps_are_epoch_ms_or_rfc3339() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    ms = int(moment.timestamp() * 1000)
    assert parse_ts(ms) == ms
    assert parse_ts(str(ms)) == ms
    assert parse_ts(float(ms)) == ms
    assert parse_ts("2026-01-02T03:04:05.678Z") == ms
    assert parse_ts("2026-01-02T04:04:05.678+01:00") == ms
    assert parse_ts(moment) == ms
    for bad in ("yesterday", True, None, math.nan, [1]):
        with pytest.raises(InvalidAnalyticsInput):
            parse_ts(bad)


def test_labels_become_windows_and_times_become_rows() -> None:
    assert windows_from_labels([0, 1, 1, 0, 0, 1]) == [(1, 2), (5, 5)]
    assert windows_from_labels([1, 1]) == [(0, 1)]
    assert windows_from_labels([0, 0]) == []
    times = [0, 10, 20, 30, 40]
    assert window_rows_from_times(times, [(5, 25), (40, 100), (41, 50)]) == [(1, 2), (4, 4)]


def test_window_and_point_metrics() -> None:
    scores = [0.0] * 100
    scores[20] = 0.9  # inside window 1
    scores[60] = 0.95  # false positive
    windows = [(18, 25), (70, 75)]  # window 2 missed
    result = evaluate_scores(scores, windows, threshold=0.5)
    window = result["windowwise"]
    assert (window["detected_windows"], window["missed_windows"]) == (1, 1)
    assert window["false_positives"] == 1
    assert window["precision"] == pytest.approx(0.5)
    assert window["recall"] == pytest.approx(0.5)
    assert window["f1"] == pytest.approx(0.5)
    point = result["pointwise"]
    assert (point["true_positives"], point["false_positives"]) == (1, 1)
    assert point["false_negatives"] == 13
    assert point["recall"] == pytest.approx(1 / 14)
    assert result["recall"] == window["recall"]
    assert result["nab_score"] == result["nab"]["score"]


def test_a_perfect_early_detection_scores_close_to_100_and_nothing_scores_0() -> None:
    scores = np.zeros(1000)
    scores[500] = 1.0
    windows = [(500, 540)]
    perfect = evaluate_scores(scores.tolist(), windows, threshold=0.5)
    assert perfect["nab_score"] > 99
    assert perfect["nab"]["score_at_threshold"] == pytest.approx(perfect["nab_score"])
    silent = evaluate_scores([0.0] * 1000, windows, threshold=0.5)
    assert silent["nab_score"] == 0.0
    assert silent["recall"] == 0.0
    assert silent["precision"] == 0.0


def test_fixed_threshold_nab_score_matches_the_sweep_at_its_best_threshold() -> None:
    rng = random.Random(3)
    scores = np.array([rng.random() ** 8 for _ in range(2000)])
    windows = [(400, 450), (1200, 1260), (1800, 1850)]
    scores[410] = scores[1230] = 0.99
    swept = nab.sweep_threshold(
        [nab.LabelledSeries("s", scores, tuple(windows))], nab.DEFAULT_PROFILES[0]
    )
    fixed = nab_score_at_threshold(scores, windows, swept.threshold)
    assert fixed == pytest.approx(swept.normalized)
    assert nab_score_at_threshold(scores, windows, 0.999) <= swept.normalized


def test_score_summary() -> None:
    summary = score_summary([0.1, 0.2, 0.9, 0.95], 0.9)
    assert summary["points"] == 4
    assert summary["flagged"] == 2
    assert summary["max"] == pytest.approx(0.95)
    assert score_summary([], 0.5) == {"points": 0, "flagged": 0, "threshold": 0.5}


def test_algorithms_resolve_and_bad_parameters_are_refused() -> None:
    assert resolve_algorithm("best", {}) == "fleetmesh_novelty"
    assert resolve_algorithm("ewma", {"alpha": 0.1}) == "ewma"
    with pytest.raises(InvalidAnalyticsInput) as unknown:
        resolve_algorithm("magic", {})
    assert unknown.value.errors[0].field == "algorithm"
    with pytest.raises(InvalidAnalyticsInput) as bad:
        resolve_algorithm("best", {"no_such_parameter": 1})
    assert bad.value.errors[0].field == "parameters"


def test_deployment_selectors() -> None:
    now = datetime.now(UTC)
    by_id = Deployment("d", "m", "temp", ("a", "b"), None, DeploymentStatus.active, now)
    by_type = Deployment("e", "m", "temp", None, "thermo", DeploymentStatus.active, now)
    assert by_id.matches("a", None) and not by_id.matches("c", "thermo")
    assert by_type.needs_device_type and not by_id.needs_device_type
    assert by_type.matches("c", "thermo") and not by_type.matches("c", None)
    again = Deployment("f", "m", "temp", ("b", "a"), None, DeploymentStatus.active, now)
    assert by_id.same_selector(again) and not by_id.same_selector(by_type)
    by_id.status = DeploymentStatus.undeployed
    assert not by_id.matches("a", None)
