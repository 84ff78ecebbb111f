"""`fleetmesh analytics ...`: run the NAB harness from the command line."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleetmesh.analytics import nab as nab_scorer
from fleetmesh.analytics.detectors import ALIASES, DETECTORS, resolve_detector_names
from fleetmesh.analytics.harness import (
    CandidateRuns,
    DetectorReport,
    ProgressCallback,
    load_profiles,
    load_reference_results,
    run_grid,
    run_nab,
)
from fleetmesh.analytics.heldout import (
    HeldOutEvaluation,
    ProfileScores,
    evaluate_held_out,
    reference_by_category,
)

app = typer.Typer(help="Analytics: streaming anomaly detectors and the NAB benchmark.")

PROFILES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")
# Key of a reference detector's scores on the whole corpus, beside its per-category ones.
EVERY_FILE = "*"

# Published NAB scoreboard (standard, low FP, low FN) on the full 58-file corpus:
# NAB README scoreboard (numenta/NAB v1.1), as quoted in the dataset README.
PUBLISHED_FULL_CORPUS: dict[str, tuple[float, float, float]] = {
    "Perfect": (100.0, 100.0, 100.0),
    "ARTime": (74.9, 65.1, 80.4),
    "Numenta HTM": (70.5, 62.6, 75.2),
    "CAD OSE": (69.9, 67.0, 73.2),
    "earthgecko Skyline": (58.2, 46.2, 63.9),
    "KNN CAD": (58.0, 43.4, 64.8),
    "Relative Entropy": (54.6, 47.6, 58.8),
    "Random Cut Forest": (51.7, 38.4, 59.7),
    "Twitter ADVec": (47.1, 33.6, 53.5),
    "Windowed Gaussian": (39.6, 20.9, 47.4),
    "Etsy Skyline": (35.7, 27.1, 44.5),
    "Bayesian Changepoint": (17.7, 3.2, 32.2),
    "Random": (11.0, 1.2, 19.5),
    "Null": (0.0, 0.0, 0.0),
}

# The same detectors' published per-row outputs scored on the 24-series subset
# (realKnownCause + realAWSCloudwatch) of the NAB corpus, as its README reports them.
PUBLISHED_SUBSET: dict[str, tuple[float, float, float]] = {
    "ARTime": (67.7, 59.0, 73.7),
    "Numenta HTM": (66.5, 60.1, 71.6),
    "CAD OSE": (61.6, 56.2, 65.6),
    "KNN CAD": (54.7, 43.3, 61.0),
    "Random Cut Forest": (52.0, 40.1, 59.1),
    "Relative Entropy": (50.0, 42.2, 54.4),
    "earthgecko Skyline": (48.4, 38.4, 53.3),
    "Etsy Skyline": (34.1, 28.5, 39.1),
    "Twitter ADVec": (33.9, 23.9, 39.6),
    "Windowed Gaussian": (24.3, 6.8, 32.2),
    "Random": (18.4, 5.8, 30.9),
}


@app.callback()
def analytics() -> None:
    """Analytics: streaming anomaly detectors and the NAB benchmark."""


@app.command()
def nab(
    data: Annotated[
        Path,
        typer.Option(
            "--data", help="NAB corpus root (data/, labels/)", exists=True, file_okay=False
        ),
    ],
    detector: Annotated[
        list[str] | None,
        typer.Option(
            "--detector", "-d", help="detector name, 'best' or 'all'; repeat or comma-separate"
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="write NAB result files under this directory")
    ] = None,
    workers: Annotated[int, typer.Option(help="processes running files in parallel")] = 2,
) -> None:
    """Run detectors over a NAB corpus, score them, and compare with the scoreboard."""
    names = _checked_names(detector)
    console = Console()
    reports = _run_with_progress(console, data, names, out, workers)
    console.print(_subset_table(reports))
    console.print(_full_corpus_table())
    if out is not None:
        console.print(f"NAB result files written under {out}")


@app.command("nab-heldout")
def nab_heldout(
    data: Annotated[
        Path,
        typer.Option(
            "--data", help="NAB corpus root (data/, labels/)", exists=True, file_okay=False
        ),
    ],
    detector: Annotated[
        list[str] | None,
        typer.Option(
            "--detector", "-d", help="detector name, 'best' or 'all'; repeat or comma-separate"
        ),
    ] = None,
    grid: Annotated[
        Path | None,
        typer.Option(
            "--grid",
            help="JSON list of parameter objects to choose among (default: the detector's grid)",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="processes running files in parallel")] = 2,
) -> None:
    """Held-out NAB: choose parameters on all categories but one, score the one left out."""
    names = resolve_detector_names(_checked_names(detector))
    settings = _read_grid(grid) if grid is not None else None
    if settings is not None and len(names) != 1:
        raise typer.BadParameter("--grid needs exactly one detector")
    console = Console()
    profiles = load_profiles(data)
    references = _reference_scores(data, profiles)
    for name in names:
        candidates = settings if settings is not None else list(DETECTORS[name].tuning_grid)
        runs = _grid_with_progress(console, data, name, candidates, workers)
        evaluation = evaluate_held_out(runs, profiles)
        for table in _held_out_tables(evaluation, references):
            console.print(table)
        console.print(f"{name}: parameters chosen among {evaluation.candidates} settings")
        for fold in evaluation.folds:
            console.print(f"  {fold.held_out} held out: chose {json.dumps(fold.params)}")


def _reference_scores(
    data: Path, profiles: Sequence[nab_scorer.Profile]
) -> dict[str, dict[str, ProfileScores]]:
    """Published detectors' scores per category, and under `EVERY_FILE` on the whole corpus."""
    return {
        name: {
            **reference_by_category(corpus, profiles),
            EVERY_FILE: nab_scorer.score_corpus(corpus, profiles),
        }
        for name, corpus in load_reference_results(data).items()
    }


def _checked_names(detector: list[str] | None) -> list[str]:
    names = _split_names(detector or ["best"])
    unknown = [n for n in names if n != "all" and n not in DETECTORS and n not in ALIASES]
    if unknown:
        known = ", ".join(sorted([*DETECTORS, *ALIASES, "all"]))
        raise typer.BadParameter(f"unknown detector(s) {', '.join(unknown)}; known: {known}")
    return names


def _read_grid(path: Path) -> list[dict[str, Any]]:
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise typer.BadParameter(f"--grid is not JSON: {error}") from error
    if not (isinstance(settings, list) and settings and all(isinstance(p, dict) for p in settings)):
        raise typer.BadParameter("--grid must hold a non-empty JSON list of objects")
    return settings


def _split_names(values: Sequence[str]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _run_with_progress(
    console: Console, data: Path, names: list[str], out: Path | None, workers: int
) -> list[DetectorReport]:
    with _progress(console) as report:
        return run_nab(data, names, out, progress=report, workers=workers)


def _grid_with_progress(
    console: Console, data: Path, name: str, grid: list[dict[str, Any]], workers: int
) -> list[CandidateRuns]:
    with _progress(console) as report:
        return run_grid(data, name, grid, progress=report, workers=workers)


@contextmanager
def _progress(console: Console) -> Iterator[ProgressCallback]:
    columns = (
        TextColumn("[bold]NAB[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("starting", total=None)

        def report(done: int, total: int, label: str) -> None:
            progress.update(task, completed=done, total=total, description=label)

        yield report


def _held_out_tables(
    evaluation: HeldOutEvaluation, references: dict[str, dict[str, ProfileScores]]
) -> list[Table]:
    """One table per fold, then the pooled held-out figures."""
    name = evaluation.detector
    tables = []
    for fold in evaluation.folds:
        tuned_on = " + ".join(fold.tuned_on)
        table = _scores_table(f"{fold.held_out} held out")
        table.add_row(f"{name} on {tuned_on} (tuning)", *_cells(fold.tuning))
        table.add_row(f"{name}, threshold swept", *_cells(fold.swept), style="bold green")
        table.add_row(f"{name}, thresholds carried", *_cells(fold.carried))
        for reference, by_category in references.items():
            if fold.held_out in by_category:
                cells = _cells(by_category[fold.held_out])
                table.add_row(f"{reference} (published outputs)", *cells)
        tables.append(table)
    pooled = _scores_table("Every file, each held out")
    pooled.add_row(f"{name}, threshold swept", *_cells(evaluation.pooled_swept), style="bold green")
    carried = [f"{evaluation.pooled_carried[profile]:.1f}" for profile in PROFILES]
    pooled.add_row(f"{name}, thresholds carried", *carried)
    for reference, by_category in references.items():
        pooled.add_row(f"{reference} (published outputs)", *_cells(by_category[EVERY_FILE]))
    tables.append(pooled)
    return tables


def _scores_table(title: str) -> Table:
    table = Table(title=title)
    table.add_column("", no_wrap=True)
    for column in ("standard", "low FP", "low FN"):
        table.add_column(column, justify="right", no_wrap=True)
    return table


def _cells(scores: ProfileScores) -> list[str]:
    return [f"{scores[profile].normalized:.1f}" for profile in PROFILES]


def _subset_table(reports: Sequence[DetectorReport]) -> Table:
    table = Table(title="NAB scores: this run beside the published results on the 24-file subset")
    for column in ("detector", "standard", "low FP", "low FN", "points/s", "source"):
        text = column in ("detector", "source")
        table.add_column(column, justify="left" if text else "right", no_wrap=True)
    rows: list[tuple[str, tuple[float, float, float], str, str]] = [
        (
            r.detector,
            (r.normalized(PROFILES[0]), r.normalized(PROFILES[1]), r.normalized(PROFILES[2])),
            f"{r.points_per_second:,.0f}",
            "this run",
        )
        for r in reports
    ]
    rows += [(name, s, "", "published") for name, s in PUBLISHED_SUBSET.items()]
    for name, scores, speed, source in sorted(rows, key=lambda row: -row[1][0]):
        style = "bold green" if source == "this run" else None
        table.add_row(name, *(f"{s:.1f}" for s in scores), speed, source, style=style)
    return table


def _full_corpus_table() -> Table:
    table = Table(title="Published NAB scoreboard on the full 58-file corpus (for reference)")
    for column in ("detector", "standard", "low FP", "low FN"):
        table.add_column(column, justify="left" if column == "detector" else "right")
    for name, scores in PUBLISHED_FULL_CORPUS.items():
        table.add_row(name, *(f"{s:.1f}" for s in scores))
    return table
