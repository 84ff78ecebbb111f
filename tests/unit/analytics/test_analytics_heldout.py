"""Held-out evaluation by category on hand-made detector outputs."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from fleetmesh.analytics import nab
from fleetmesh.analytics.harness import CandidateRuns, SeriesRun
from fleetmesh.analytics.heldout import category_of, evaluate_held_out, in_categories

pytestmark = pytest.mark.unit

STANDARD = nab.DEFAULT_PROFILES[0]
LENGTH = 1000  # probation: 150 rows
WINDOW = (400, 449)
FILES = ("alpha/one.csv", "alpha/two.csv", "beta/one.csv", "beta/two.csv")


def candidate(params: dict[str, Any], flagged: dict[str, dict[int, float]]) -> CandidateRuns:
    """A setting whose output on each file category is the given {row: score}."""
    runs = []
    for data_file in FILES:
        scores = np.zeros(LENGTH)
        for row, score in flagged.get(category_of(data_file), {}).items():
            scores[row] = score
        runs.append(SeriesRun("fake", json.dumps(params), data_file, scores, (WINDOW,), 0.1))
    return CandidateRuns("fake", params, tuple(runs))


# Each setting detects one category perfectly and misses the other entirely.
ALPHA_EXPERT = candidate({"expert": "alpha"}, {"alpha": {400: 1.0}})
BETA_EXPERT = candidate({"expert": "beta"}, {"beta": {400: 1.0}})


def test_each_category_is_scored_by_the_setting_chosen_on_the_others() -> None:
    evaluation = evaluate_held_out([ALPHA_EXPERT, BETA_EXPERT])
    assert [fold.held_out for fold in evaluation.folds] == ["alpha", "beta"]
    alpha, beta = evaluation.folds
    assert (alpha.tuned_on, alpha.params) == (("beta",), {"expert": "beta"})
    assert (beta.tuned_on, beta.params) == (("alpha",), {"expert": "alpha"})
    assert alpha.tuning["standard"].normalized == pytest.approx(100.0)
    # Tuned on one category, each setting misses the other: held out, nothing is found,
    # although picking a setting on all files together would score 50.
    assert alpha.swept["standard"].normalized == 0.0
    assert beta.swept["standard"].normalized == 0.0
    assert evaluation.pooled_swept["standard"].normalized == 0.0
    assert evaluation.candidates == 2


def test_a_setting_good_everywhere_scores_well_held_out() -> None:
    late_alpha = candidate({"expert": "alpha, late"}, {"alpha": {440: 1.0}})
    late_beta = candidate({"expert": "beta, late"}, {"beta": {440: 1.0}})
    generalist = candidate({"expert": "both"}, {"alpha": {400: 1.0}, "beta": {400: 1.0}})
    evaluation = evaluate_held_out([late_alpha, late_beta, generalist])
    assert all(fold.params == {"expert": "both"} for fold in evaluation.folds)
    for profile in nab.DEFAULT_PROFILES:
        assert evaluation.pooled_swept[profile.name].normalized == pytest.approx(100.0)
        assert evaluation.pooled_carried[profile.name] == pytest.approx(100.0)


def test_carried_thresholds_come_from_the_tuning_categories() -> None:
    # Alpha detects at 0.9; beta detects only at 0.4 and has a false positive at 0.6.
    shifted = candidate({"scale": "shifted"}, {"alpha": {400: 0.9}, "beta": {200: 0.6, 400: 0.4}})
    beta = evaluate_held_out([shifted]).folds[1]
    assert beta.tuning["standard"].threshold == pytest.approx(0.9)
    # Swept on beta: threshold 0.4 detects both windows and pays both false positives.
    assert beta.swept["standard"].detected_windows == 2
    assert beta.swept["standard"].false_positives == 2
    # Carried from alpha: 0.9 finds nothing in beta.
    assert beta.carried["standard"].threshold == pytest.approx(0.9)
    assert beta.carried["standard"].detected_windows == 0
    assert beta.carried["standard"].normalized == 0.0
    assert beta.swept["standard"].normalized > beta.carried["standard"].normalized


def test_pooled_carried_adds_the_folds_raw_scores() -> None:
    late_in_beta = candidate({"late": True}, {"alpha": {400: 1.0}, "beta": {440: 1.0}})
    evaluation = evaluate_held_out([late_in_beta])
    raw = sum(fold.carried["standard"].raw_score for fold in evaluation.folds)
    assert evaluation.pooled_carried["standard"] == pytest.approx(nab.normalize(raw, 4, STANDARD))
    assert 50.0 < evaluation.pooled_carried["standard"] < 100.0


def test_ties_go_to_the_first_setting_of_the_grid() -> None:
    twin = candidate({"expert": "alpha twin"}, {"alpha": {400: 1.0}})
    evaluation = evaluate_held_out([twin, ALPHA_EXPERT, BETA_EXPERT])
    assert evaluation.folds[1].params == {"expert": "alpha twin"}


def test_one_category_or_no_setting_is_refused() -> None:
    single = CandidateRuns(
        "fake", {}, tuple(r for r in ALPHA_EXPERT.runs if r.data_file.startswith("alpha"))
    )
    with pytest.raises(ValueError, match="two categories"):
        evaluate_held_out([single])
    with pytest.raises(ValueError, match="no parameter setting"):
        evaluate_held_out([])


def test_category_helpers() -> None:
    corpus = [nab.LabelledSeries(name, np.zeros(3), ()) for name in FILES]
    assert category_of("realKnownCause/nyc_taxi.csv") == "realKnownCause"
    assert [s.name for s in in_categories(corpus, ["beta"])] == ["beta/one.csv", "beta/two.csv"]
