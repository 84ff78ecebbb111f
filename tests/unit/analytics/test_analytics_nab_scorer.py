"""The NAB scorer against hand-computed cases, a brute-force sweep and published numbers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetmesh.analytics import nab

pytestmark = pytest.mark.unit

STANDARD, LOW_FP, LOW_FN = nab.DEFAULT_PROFILES
LENGTH = 1000  # probation = floor(0.15 * 1000) = 150 rows
WINDOW = (400, 449)  # width 50


def series(
    flagged: dict[int, float], windows: tuple[tuple[int, int], ...] = (WINDOW,)
) -> nab.LabelledSeries:
    scores = np.zeros(LENGTH)
    for row, score in flagged.items():
        scores[row] = score
    return nab.LabelledSeries("synthetic.csv", scores, windows)


def normalized(corpus: list[nab.LabelledSeries], profile: nab.Profile) -> float:
    return nab.sweep_threshold(corpus, profile).normalized


def test_scaled_sigmoid_matches_the_readme_values() -> None:
    values = nab.scaled_sigmoid(np.array([-1.0, 0.0, 3.0, 3.5]))
    assert values[0] == pytest.approx(0.98661, abs=1e-5)
    assert values[1] == 0.0
    assert values[2] == pytest.approx(2 / (1 + math.exp(15)) - 1)
    assert values[3] == -1.0


def test_probation_is_fifteen_percent_capped_at_750_rows() -> None:
    assert nab.probation_rows(1000) == 150
    assert nab.probation_rows(4032) == 604
    assert nab.probation_rows(22695) == 750


@pytest.mark.parametrize("profile", nab.DEFAULT_PROFILES, ids=lambda p: p.name)
def test_perfect_detector_scores_100(profile: nab.Profile) -> None:
    corpus = [series({400: 1.0, 700: 1.0}, windows=(WINDOW, (700, 749)))]
    assert normalized(corpus, profile) == pytest.approx(100.0)


@pytest.mark.parametrize("profile", nab.DEFAULT_PROFILES, ids=lambda p: p.name)
def test_null_detector_scores_0(profile: nab.Profile) -> None:
    score = nab.sweep_threshold([series({})], profile)
    assert score.normalized == 0.0
    assert score.detected_windows == 0


def test_detection_late_in_the_window_earns_the_sigmoid_weight() -> None:
    # Row 437 of window [400, 449]: y = -(449 - 437 + 1) / 50 = -0.26,
    # A(-0.26) = 2 / (1 + e^-1.3) - 1 = 0.571670, weight = 0.571670 / 0.986614 = 0.579426,
    # normalized = 100 * (0.579426 + 1) / (1 + 1) = 78.9713.
    assert normalized([series({437: 1.0})], STANDARD) == pytest.approx(78.9713, abs=1e-3)


def test_an_early_detection_scores_more_than_a_late_one() -> None:
    early = normalized([series({405: 1.0})], STANDARD)
    late = normalized([series({440: 1.0})], STANDARD)
    assert 100.0 > early > late > 50.0


def test_only_the_earliest_detection_of_a_window_counts() -> None:
    assert normalized([series({400: 1.0, 420: 1.0, 449: 1.0})], STANDARD) == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("profile", "expected"),
    [(STANDARD, 94.5), (LOW_FP, 89.0), (LOW_FN, 100 * (1 - 0.11 + 2) / 3)],
    ids=["standard", "low_fp", "low_fn"],
)
def test_a_false_positive_before_any_window_costs_fp_weight(
    profile: nab.Profile, expected: float
) -> None:
    # Same score as the true positive, so no threshold can separate them.
    corpus = [series({400: 1.0, 200: 1.0})]
    assert normalized(corpus, profile) == pytest.approx(expected)


def test_a_false_positive_just_after_a_window_costs_little() -> None:
    # Row 452: y = (452 - 449) / (50 - 1) = 0.061224, A(y) = 2 / (1 + e^0.306122) - 1 = -0.151877.
    raw = nab.sweep_threshold([series({400: 1.0, 452: 1.0})], STANDARD).raw_score
    assert raw == pytest.approx(1.0 - 0.11 * 0.151877, abs=1e-6)


def test_detections_during_probation_are_ignored() -> None:
    assert normalized([series({100: 1.0, 400: 1.0})], STANDARD) == pytest.approx(100.0)


def test_the_threshold_is_shared_by_the_whole_corpus() -> None:
    # File a needs threshold <= 0.4 to detect, which admits file b's FP at 0.5.
    a = series({400: 0.4})
    b = series({200: 0.5, 430: 0.3})
    score = nab.sweep_threshold([a, b], STANDARD)
    assert score.threshold == pytest.approx(0.3)
    assert score.detected_windows == 2
    assert score.false_positives == 1


def test_window_rows_map_timestamps_to_inclusive_rows() -> None:
    timestamps = nab.parse_timestamps(f"2014-01-01 00:{m:02d}:00" for m in range(10))
    rows = nab.window_rows(timestamps, [("2014-01-01 00:02:00.000000", "2014-01-01 00:05:00")])
    assert rows == ((2, 5),)


def brute_force_raw(corpus: list[nab.LabelledSeries], profile: nab.Profile) -> float:
    """Rescore the corpus at every distinct score, straight from the README rules."""
    best = -profile.fn_weight * sum(len(s.windows) for s in corpus)
    for threshold in {float(v) for s in corpus for v in s.scores}:
        total = 0.0
        for s in corpus:
            weights, window_of_row = nab.row_weights(len(s.scores), s.windows, profile)
            probation = nab.probation_rows(len(s.scores))
            detected = [i for i in range(probation, len(s.scores)) if s.scores[i] >= threshold]
            for index in range(len(s.windows)):
                hits = [weights[i] for i in detected if window_of_row[i] == index]
                total += max(hits) if hits else -profile.fn_weight
            total += sum(weights[i] for i in detected if window_of_row[i] < 0)
        best = max(best, total)
    return best


@st.composite
def small_corpora(draw: st.DrawFn) -> list[nab.LabelledSeries]:
    corpus = []
    for index in range(draw(st.integers(1, 3))):
        length = draw(st.integers(20, 80))
        levels = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])
        scores = np.array(draw(st.lists(levels, min_size=length, max_size=length)))
        starts = sorted(draw(st.sets(st.integers(0, length - 6), max_size=2)))
        windows: list[tuple[int, int]] = []
        for start in starts:
            if not windows or start > windows[-1][1] + 1:
                windows.append((start, min(start + draw(st.integers(0, 5)), length - 1)))
        corpus.append(nab.LabelledSeries(f"f{index}.csv", scores, tuple(windows)))
    return corpus


@settings(max_examples=60, deadline=None)
@given(corpus=small_corpora(), profile=st.sampled_from(nab.DEFAULT_PROFILES))
def test_the_sorted_sweep_equals_rescoring_at_every_threshold(
    corpus: list[nab.LabelledSeries], profile: nab.Profile
) -> None:
    swept = nab.sweep_threshold(corpus, profile).raw_score
    assert swept == pytest.approx(brute_force_raw(corpus, profile), abs=1e-9)


def test_profiles_file_matches_the_defaults(nab_dir: Path) -> None:
    assert nab.load_profiles(nab_dir / "config" / "profiles.json") == nab.DEFAULT_PROFILES


@pytest.mark.parametrize(
    ("detector", "expected"),
    [("numenta", (66.5, 60.1, 71.6)), ("windowedGaussian", (24.3, 6.8, 32.2))],
)
def test_published_results_reproduce_the_readme_subset_scores(
    nab_dir: Path, detector: str, expected: tuple[float, float, float]
) -> None:
    results = nab_dir / "reference_results" / detector
    scores = nab.score_result_dir(results, detector, nab_dir / "labels" / "combined_windows.json")
    got = tuple(scores[profile.name].normalized for profile in nab.DEFAULT_PROFILES)
    assert got == pytest.approx(expected, abs=0.1)


@settings(max_examples=40, deadline=None)
@given(corpus=small_corpora(), profile=st.sampled_from(nab.DEFAULT_PROFILES))
def test_scoring_at_the_swept_threshold_reproduces_the_sweep(
    corpus: list[nab.LabelledSeries], profile: nab.Profile
) -> None:
    swept = nab.sweep_threshold(corpus, profile)
    fixed = nab.score_at_threshold(corpus, profile, swept.threshold)
    assert fixed.raw_score == pytest.approx(swept.raw_score, abs=1e-9)
    assert (fixed.detected_windows, fixed.false_positives) == (
        swept.detected_windows,
        swept.false_positives,
    )


def test_a_given_threshold_is_scored_as_it_is_not_as_the_best_one() -> None:
    corpus = [series({400: 0.4}), series({200: 0.5, 430: 0.3})]
    # 0.45 admits only file b's false positive: both windows missed.
    fixed = nab.score_at_threshold(corpus, STANDARD, 0.45)
    assert (fixed.detected_windows, fixed.false_positives) == (0, 1)
    assert fixed.raw_score == pytest.approx(-2.0 - 0.11)
    assert fixed.threshold == 0.45
    nothing = nab.score_at_threshold(corpus, STANDARD, math.inf)
    assert nothing.normalized == 0.0
    assert nab.sweep_threshold(corpus, STANDARD).raw_score > fixed.raw_score
