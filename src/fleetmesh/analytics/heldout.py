"""Held-out evaluation by category: a detector's parameters are chosen without the files scored.

NAB has no training split, so a detector tuned on the corpus is scored on the very
files it was tuned on. Here the categories (`realAWSCloudwatch`, `realKnownCause`,
...) take turns: for each category, the parameter setting with the best mean
normalised score over the profiles on the *other* categories is chosen, and then
scored on the held-out category in two ways:

* swept: the threshold is swept on the held-out files, as NAB does for any corpus,
  which is how published detectors are scored on the same files;
* carried: each profile's threshold found on the tuning categories is applied
  unchanged, so nothing at all was chosen with the held-out labels.

The tuning objective is the mean normalised score of the profiles; of equal
settings the first in the grid wins (detectors list their defaults first). The
pooled figures put every fold's held-out output together: each file is scored
by the setting chosen without its own category (one threshold swept over all of
them; for "carried", the folds' raw scores are added up and normalised).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleetmesh.analytics import nab
from fleetmesh.analytics.harness import CandidateRuns, labelled_series

ProfileScores = Mapping[str, nab.ProfileScore]


@dataclass(frozen=True)
class Fold:
    """One category held out: the setting chosen on the others, and how it scores on it."""

    held_out: str
    tuned_on: tuple[str, ...]
    setting: int  # index of the chosen setting in the grid
    params: dict[str, Any]
    tuning: ProfileScores
    swept: ProfileScores
    carried: ProfileScores


@dataclass(frozen=True)
class HeldOutEvaluation:
    detector: str
    candidates: int
    folds: tuple[Fold, ...]
    pooled_swept: ProfileScores
    pooled_carried: Mapping[str, float]


def category_of(data_file: str) -> str:
    """`realKnownCause/nyc_taxi.csv` -> `realKnownCause`."""
    return data_file.partition("/")[0]


def categories(corpus: Sequence[nab.LabelledSeries]) -> list[str]:
    return sorted({category_of(series.name) for series in corpus})


def in_categories(
    corpus: Sequence[nab.LabelledSeries], wanted: Sequence[str]
) -> list[nab.LabelledSeries]:
    return [series for series in corpus if category_of(series.name) in wanted]


def mean_normalized(scores: ProfileScores) -> float:
    """The tuning objective: every profile counts the same."""
    return sum(score.normalized for score in scores.values()) / len(scores)


def evaluate_held_out(
    grid: Sequence[CandidateRuns], profiles: Sequence[nab.Profile] = nab.DEFAULT_PROFILES
) -> HeldOutEvaluation:
    """Leave-one-category-out over the runs of every setting of a detector's grid."""
    if not grid:
        raise ValueError("the grid has no parameter setting")
    corpora = [labelled_series(candidate.runs) for candidate in grid]
    names = categories(corpora[0])
    if len(names) < 2:
        raise ValueError("held-out evaluation needs files in at least two categories")
    folds = tuple(_fold(grid, corpora, held_out, names, profiles) for held_out in names)
    pooled = [
        series for fold in folds for series in in_categories(corpora[fold.setting], [fold.held_out])
    ]
    return HeldOutEvaluation(
        detector=grid[0].detector,
        candidates=len(grid),
        folds=folds,
        pooled_swept=nab.score_corpus(pooled, profiles),
        pooled_carried={profile.name: _pooled_carried(folds, profile) for profile in profiles},
    )


def _fold(
    grid: Sequence[CandidateRuns],
    corpora: Sequence[Sequence[nab.LabelledSeries]],
    held_out: str,
    names: Sequence[str],
    profiles: Sequence[nab.Profile],
) -> Fold:
    tuned_on = tuple(name for name in names if name != held_out)
    tuning = [nab.score_corpus(in_categories(corpus, tuned_on), profiles) for corpus in corpora]
    # max() keeps the first of equal settings, so a grid that starts with the defaults prefers them.
    best = max(range(len(grid)), key=lambda index: mean_normalized(tuning[index]))
    test = in_categories(corpora[best], [held_out])
    return Fold(
        held_out=held_out,
        tuned_on=tuned_on,
        setting=best,
        params=grid[best].params,
        tuning=tuning[best],
        swept=nab.score_corpus(test, profiles),
        carried={
            profile.name: nab.score_at_threshold(
                test, profile, tuning[best][profile.name].threshold
            )
            for profile in profiles
        },
    )


def _pooled_carried(folds: Sequence[Fold], profile: nab.Profile) -> float:
    scores = [fold.carried[profile.name] for fold in folds]
    raw = sum(score.raw_score for score in scores)
    windows = sum(score.detected_windows + score.missed_windows for score in scores)
    return nab.normalize(raw, windows, profile)


def reference_by_category(
    corpus: Sequence[nab.LabelledSeries], profiles: Sequence[nab.Profile] = nab.DEFAULT_PROFILES
) -> dict[str, ProfileScores]:
    """A published detector's scores per category (threshold swept within each)."""
    return {
        name: nab.score_corpus(in_categories(corpus, [name]), profiles)
        for name in categories(corpus)
    }
