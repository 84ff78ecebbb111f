"""The NAB harness and CLI on a tiny synthetic corpus laid out like NAB."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fleetmesh.analytics import nab
from fleetmesh.analytics.cli import app
from fleetmesh.analytics.harness import (
    discover_data_files,
    labelled_series,
    load_reference_results,
    run_grid,
    run_nab,
)

pytestmark = pytest.mark.unit

ROWS = 400


def write_series(path: Path, spike_at: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    values = 10 + rng.normal(0, 0.5, ROWS)
    values[spike_at] = 30.0
    stamps = [
        str(np.datetime64("2015-03-01T00:00") + np.timedelta64(5 * i, "m")) for i in range(ROWS)
    ]
    timestamps = [stamp.replace("T", " ") for stamp in stamps]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value"])
        writer.writerows(zip(timestamps, [f"{v:.4f}" for v in values], strict=True))
    return timestamps


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    labels: dict[str, list[list[str]]] = {}
    for category, name, spike, seed in [("alpha", "a.csv", 250, 1), ("beta", "b.csv", 300, 2)]:
        stamps = write_series(tmp_path / "data" / category / name, spike, seed)
        labels[f"{category}/{name}"] = [[stamps[spike - 20], stamps[spike + 20]]]
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "combined_windows.json").write_text(json.dumps(labels))
    return tmp_path


def test_discovers_csvs_as_label_keys(corpus: Path) -> None:
    assert discover_data_files(corpus) == ["alpha/a.csv", "beta/b.csv"]


def test_run_nab_scores_and_writes_nab_result_files(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    progress: list[tuple[int, int]] = []
    reports = run_nab(
        corpus, ["best", "windowed_gaussian"], out, lambda d, t, _: progress.append((d, t)), 1
    )
    assert [r.detector for r in reports] == ["fleetmesh_novelty", "windowed_gaussian"]
    assert progress[-1] == (4, 4)
    best = reports[0]
    assert best.points == 2 * ROWS
    assert best.normalized("standard") > 90.0
    assert math.isfinite(best.points_per_second)

    written = out / "fleetmesh_novelty" / "alpha" / "fleetmesh_novelty_a.csv"
    with written.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["timestamp", "value", "anomaly_score", "label"]
    assert len(rows) == ROWS
    assert [i for i, row in enumerate(rows) if row["label"] == "1"] == list(range(230, 271))

    rescored = nab.score_result_dir(
        out / "fleetmesh_novelty", "fleetmesh_novelty", corpus / "labels" / "combined_windows.json"
    )
    assert rescored["standard"].normalized == pytest.approx(best.normalized("standard"))


def test_process_pool_gives_the_same_scores(corpus: Path) -> None:
    inline = run_nab(corpus, ["ewma"], workers=1)[0]
    pooled = run_nab(corpus, ["ewma"], workers=2)[0]
    assert pooled.scores == inline.scores


def test_cli_prints_our_scores_beside_the_scoreboard(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-results"
    result = CliRunner().invoke(
        app, ["nab", "--data", str(corpus), "-d", "ewma,best", "--out", str(out), "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    for expected in ("ewma", "fleetmesh_novelty", "ARTime", "Numenta HTM", "full 58-file"):
        assert expected in result.output
    assert (out / "ewma" / "beta" / "ewma_b.csv").is_file()


def test_cli_refuses_unknown_detectors(corpus: Path) -> None:
    result = CliRunner().invoke(app, ["nab", "--data", str(corpus), "-d", "nope"])
    assert result.exit_code != 0
    assert "unknown detector" in result.output


def test_run_grid_runs_every_distinct_setting_over_every_file(corpus: Path) -> None:
    grid = [{}, {"alpha": 0.2}, {}]
    candidates = run_grid(corpus, "ewma", grid, workers=1)
    assert [c.params for c in candidates] == [{}, {"alpha": 0.2}]
    assert all(c.detector == "ewma" for c in candidates)
    defaults, faster = candidates
    assert [r.data_file for r in defaults.runs] == ["alpha/a.csv", "beta/b.csv"]
    assert defaults.runs[0].params == "{}"
    report = run_nab(corpus, ["ewma"], workers=1)[0]
    assert nab.score_corpus(labelled_series(defaults.runs)) == report.scores
    assert not np.array_equal(defaults.runs[0].scores, faster.runs[0].scores)


def write_reference(corpus: Path, detector: str, data_file: str, flagged: int) -> None:
    """A published-style result file flagging one row (its window's first: a perfect score)."""
    category, _, name = data_file.partition("/")
    rows = list(csv.DictReader((corpus / "data" / data_file).open()))
    path = corpus / "reference_results" / detector / category / f"{detector}_{name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value", "anomaly_score", "label"])
        for i, row in enumerate(rows):
            writer.writerow([row["timestamp"], row["value"], 1.0 if i == flagged else 0.0, 0])


def test_reference_results_are_loaded_per_detector(corpus: Path) -> None:
    assert load_reference_results(corpus) == {}
    write_reference(corpus, "oracle", "alpha/a.csv", 230)
    write_reference(corpus, "oracle", "beta/b.csv", 280)
    references = load_reference_results(corpus)
    assert list(references) == ["oracle"]
    assert nab.score_corpus(references["oracle"])["standard"].normalized == pytest.approx(100.0)


def test_cli_held_out_reports_both_folds_beside_published_outputs(
    corpus: Path, tmp_path: Path
) -> None:
    write_reference(corpus, "oracle", "alpha/a.csv", 230)
    write_reference(corpus, "oracle", "beta/b.csv", 280)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{}, {"alpha": 0.2}]))
    result = CliRunner().invoke(
        app,
        ["nab-heldout", "--data", str(corpus), "-d", "ewma", "--grid", str(grid)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    for expected in (
        "alpha held out",
        "ewma on beta (tuning)",
        "beta held out",
        "ewma on alpha (tuning)",
        "thresholds carried",
        "oracle (published outputs)",
        "Every file, each held out",
        "ewma: parameters chosen among 2 settings",
        "alpha held out: chose",
    ):
        assert expected in result.output


def test_cli_held_out_uses_each_detectors_own_grid(corpus: Path) -> None:
    result = CliRunner().invoke(
        app, ["nab-heldout", "--data", str(corpus), "-d", "windowed_gaussian", "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "windowed_gaussian: parameters chosen among 3 settings" in result.output


@pytest.mark.parametrize(
    ("grid", "detectors", "message"),
    [
        ('{"alpha": 0.2}', "ewma", "non-empty JSON list"),
        ("[]", "ewma", "non-empty JSON list"),
        ("[{", "ewma", "not JSON"),
        ("[{}]", "ewma,best", "exactly one detector"),
    ],
)
def test_cli_held_out_refuses_bad_grids(
    corpus: Path, tmp_path: Path, grid: str, detectors: str, message: str
) -> None:
    path = tmp_path / "grid.json"
    path.write_text(grid)
    result = CliRunner().invoke(
        app,
        ["nab-heldout", "--data", str(corpus), "-d", detectors, "--grid", str(path)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code != 0
    assert message in result.output
