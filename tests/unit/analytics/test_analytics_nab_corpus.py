"""The best detector on the real NAB corpus (runs when FLEETMESH_NAB_DIR is set).

The figures compared with are published ones for the same files (see the corpus
README): ARTime's on the whole subset, and Numenta HTM's own per-row outputs
(reference_results/numenta) category by category.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetmesh.analytics import nab
from fleetmesh.analytics.harness import labelled_series, load_reference_results, run_grid
from fleetmesh.analytics.heldout import in_categories

pytestmark = pytest.mark.unit

PROFILES = [profile.name for profile in nab.DEFAULT_PROFILES]
ARTIME_ON_THE_SUBSET = dict(zip(PROFILES, (67.7, 59.0, 73.7), strict=True))
CATEGORIES = ("realAWSCloudwatch", "realKnownCause")


@pytest.fixture(scope="module")
def best_corpus(nab_dir: Path) -> list[nab.LabelledSeries]:
    (defaults,) = run_grid(nab_dir, "best", [{}], workers=2)
    return labelled_series(defaults.runs)


def test_best_detector_beats_the_published_artime_on_the_subset(
    best_corpus: list[nab.LabelledSeries],
) -> None:
    scores = nab.score_corpus(best_corpus)
    for profile in PROFILES:
        assert scores[profile].normalized > ARTIME_ON_THE_SUBSET[profile], profile


@pytest.mark.parametrize("category", CATEGORIES)
def test_best_detector_beats_numenta_htm_category_by_category(
    nab_dir: Path, best_corpus: list[nab.LabelledSeries], category: str
) -> None:
    htm = nab.score_corpus(in_categories(load_reference_results(nab_dir)["numenta"], [category]))
    ours = nab.score_corpus(in_categories(best_corpus, [category]))
    for profile in PROFILES:
        assert ours[profile].normalized > htm[profile].normalized, profile
