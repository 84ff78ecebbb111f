"""Run streaming detectors over a NAB-layout corpus and score them.

Layout: `<data_dir>/data/<category>/<file>.csv` (`timestamp,value`),
`<data_dir>/labels/combined_windows.json` and optionally
`<data_dir>/config/profiles.json`. Results are written the way NAB writes them:
`<out>/<detector>/<category>/<detector>_<file>.csv`.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fleetmesh.analytics import nab
from fleetmesh.analytics.detectors import create_detector, resolve_detector_names

ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class SeriesRun:
    """One detector's pass over one file."""

    detector: str
    params: str
    data_file: str
    scores: NDArray[np.float64]
    windows: tuple[tuple[int, int], ...]
    seconds: float


@dataclass(frozen=True)
class DetectorReport:
    """A detector's NAB scores per profile and its throughput."""

    detector: str
    scores: Mapping[str, nab.ProfileScore]
    points: int
    seconds: float

    @property
    def points_per_second(self) -> float:
        return self.points / self.seconds if self.seconds > 0 else float("inf")

    def normalized(self, profile: str) -> float:
        return self.scores[profile].normalized


@dataclass(frozen=True)
class CandidateRuns:
    """One parameter setting of a detector and its runs over every file."""

    detector: str
    params: dict[str, Any]
    runs: tuple[SeriesRun, ...]


@dataclass(frozen=True)
class _Task:
    detector: str
    # JSON text of the constructor keyword arguments: hashable and cheap to send to a worker.
    params: str
    data_dir: Path
    data_file: str
    windows: tuple[tuple[str, str], ...]
    out_dir: Path | None


def discover_data_files(data_dir: Path) -> list[str]:
    """Every CSV under `<data_dir>/data`, as `category/file.csv` label keys."""
    root = data_dir / "data"
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*.csv"))


@dataclass(frozen=True)
class SeriesFile:
    """A `timestamp,value` CSV, with the value text kept for faithful output."""

    timestamps: list[str]
    value_texts: list[str]

    @property
    def values(self) -> list[float]:
        return [float(text) for text in self.value_texts]


def read_series(path: Path) -> SeriesFile:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [(row["timestamp"], row["value"]) for row in csv.DictReader(handle)]
    return SeriesFile([ts for ts, _ in rows], [value for _, value in rows])


def epoch_seconds(timestamps: NDArray[np.datetime64]) -> list[float]:
    micros = timestamps.astype("datetime64[us]").astype(np.int64)
    return (micros.astype(np.float64) / 1e6).tolist()  # type: ignore[no-any-return]


def run_series(task: _Task) -> SeriesRun:
    """Stream one file through a fresh detector, one point at a time."""
    series = read_series(task.data_dir / "data" / task.data_file)
    timestamps = nab.parse_timestamps(series.timestamps)
    seconds_since_epoch = epoch_seconds(timestamps)
    values = series.values
    detector = create_detector(task.detector, **json.loads(task.params))
    update = detector.update
    started = time.perf_counter()
    scores = [update(ts, value) for ts, value in zip(seconds_since_epoch, values, strict=True)]
    elapsed = time.perf_counter() - started
    windows = nab.window_rows(timestamps, task.windows)
    if task.out_dir is not None:
        path = nab.result_file_path(task.out_dir / task.detector, task.detector, task.data_file)
        _write_result(path, series, scores, windows)
    return SeriesRun(task.detector, task.params, task.data_file, np.array(scores), windows, elapsed)


def _write_result(
    path: Path,
    series: SeriesFile,
    scores: Sequence[float],
    windows: Sequence[tuple[int, int]],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.zeros(len(scores), dtype=np.int64)
    for first, last in windows:
        labels[first : last + 1] = 1
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value", "anomaly_score", "label"])
        rows = zip(series.timestamps, series.value_texts, scores, labels.tolist(), strict=True)
        for timestamp, value, score, label in rows:
            # repr keeps every digit, so rescoring the file reproduces the in-memory result.
            writer.writerow([timestamp, value, repr(score), label])


def run_nab(
    data_dir: Path,
    detectors: Sequence[str],
    out_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    workers: int = 2,
) -> list[DetectorReport]:
    """Run `detectors` (names, aliases, or "all") over the corpus and score them."""
    names = resolve_detector_names(detectors)
    labels = nab.load_label_windows(data_dir / "labels" / "combined_windows.json")
    profiles = load_profiles(data_dir)
    tasks = [
        _Task(name, "{}", data_dir, data_file, tuple(labels.get(data_file, [])), out_dir)
        for name in names
        for data_file in discover_data_files(data_dir)
    ]
    runs = _run_tasks(tasks, progress, workers)
    return [_report(name, [r for r in runs if r.detector == name], profiles) for name in names]


def run_grid(
    data_dir: Path,
    detector: str,
    grid: Sequence[Mapping[str, Any]],
    progress: ProgressCallback | None = None,
    workers: int = 2,
) -> list[CandidateRuns]:
    """Run every parameter setting of `grid` over the whole corpus (for held-out tuning)."""
    name = resolve_detector_names([detector])[0]
    labels = nab.load_label_windows(data_dir / "labels" / "combined_windows.json")
    settings = [json.dumps(dict(params), sort_keys=True) for params in grid]
    tasks = [
        _Task(name, params, data_dir, data_file, tuple(labels.get(data_file, [])), None)
        for params in dict.fromkeys(settings)
        for data_file in discover_data_files(data_dir)
    ]
    runs = _run_tasks(tasks, progress, workers)
    return [
        CandidateRuns(
            name,
            json.loads(params),
            tuple(sorted((r for r in runs if r.params == params), key=lambda r: r.data_file)),
        )
        for params in dict.fromkeys(settings)
    ]


def load_reference_results(data_dir: Path) -> dict[str, list[nab.LabelledSeries]]:
    """Published per-row outputs under `<data_dir>/reference_results/<detector>/`, by detector."""
    root = data_dir / "reference_results"
    if not root.is_dir():
        return {}
    labels = nab.load_label_windows(data_dir / "labels" / "combined_windows.json")
    return {
        folder.name: nab.load_result_corpus(folder, folder.name, labels)
        for folder in sorted(root.iterdir())
        if folder.is_dir()
    }


def load_profiles(data_dir: Path) -> tuple[nab.Profile, ...]:
    path = data_dir / "config" / "profiles.json"
    return nab.load_profiles(path) if path.exists() else nab.DEFAULT_PROFILES


def _run_tasks(
    tasks: Sequence[_Task], progress: ProgressCallback | None, workers: int
) -> list[SeriesRun]:
    report = progress or _ignore_progress
    total = len(tasks)
    report(0, total, "")
    if workers <= 1 or total <= 1:
        runs = []
        for done, task in enumerate(tasks, start=1):
            runs.append(run_series(task))
            report(done, total, f"{task.detector} {task.data_file}")
        return runs
    with ProcessPoolExecutor(max_workers=workers) as pool:
        # Longest files first keeps both workers busy until the end.
        ordered = sorted(tasks, key=_task_size, reverse=True)
        futures: dict[Future[SeriesRun], _Task] = {pool.submit(run_series, t): t for t in ordered}
        runs = []
        for done, future in enumerate(as_completed(futures), start=1):
            runs.append(future.result())
            task = futures[future]
            report(done, total, f"{task.detector} {task.data_file}")
    return runs


def _task_size(task: _Task) -> int:
    return (task.data_dir / "data" / task.data_file).stat().st_size


def _ignore_progress(done: int, total: int, label: str) -> None:  # noqa: ARG001 - callback shape
    return None


def _report(
    name: str, runs: Sequence[SeriesRun], profiles: Sequence[nab.Profile]
) -> DetectorReport:
    ordered = sorted(runs, key=lambda run: run.data_file)
    corpus = labelled_series(ordered)
    return DetectorReport(
        detector=name,
        scores=nab.score_corpus(corpus, profiles),
        points=sum(len(run.scores) for run in ordered),
        seconds=sum(run.seconds for run in ordered),
    )


def labelled_series(runs: Sequence[SeriesRun]) -> list[nab.LabelledSeries]:
    return [nab.LabelledSeries(run.data_file, run.scores, run.windows) for run in runs]
