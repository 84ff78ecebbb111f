"""The Numenta Anomaly Benchmark (NAB v1.0) scorer.

The rules (probation, scaled sigmoid, window weights, corpus-wide threshold
sweep, normalisation) follow the NAB paper and the dataset README. The sweep is
done in one pass over the corpus sorted by score, not by rescoring per threshold.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

PROBATION_FRACTION = 0.15
MAX_PROBATION_ROWS = 750
OUTSIDE_WINDOWS = -1


@dataclass(frozen=True)
class Profile:
    """Weights of one NAB application profile."""

    name: str
    tp_weight: float
    fn_weight: float
    fp_weight: float


DEFAULT_PROFILES: tuple[Profile, ...] = (
    Profile("standard", tp_weight=1.0, fn_weight=1.0, fp_weight=0.11),
    Profile("reward_low_FP_rate", tp_weight=1.0, fn_weight=1.0, fp_weight=0.22),
    Profile("reward_low_FN_rate", tp_weight=1.0, fn_weight=2.0, fp_weight=0.11),
)


@dataclass(frozen=True)
class LabelledSeries:
    """One file's anomaly scores beside its anomaly windows (inclusive row ranges)."""

    name: str
    scores: FloatArray
    windows: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ProfileScore:
    """The outcome of the threshold sweep for one profile over a corpus."""

    profile: str
    threshold: float
    raw_score: float
    normalized: float
    detected_windows: int
    missed_windows: int
    false_positives: int


def load_profiles(path: Path) -> tuple[Profile, ...]:
    """Read NAB's `config/profiles.json`."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    return tuple(
        Profile(
            name=name,
            tp_weight=float(body["CostMatrix"]["tpWeight"]),
            fn_weight=float(body["CostMatrix"]["fnWeight"]),
            fp_weight=float(body["CostMatrix"]["fpWeight"]),
        )
        for name, body in raw.items()
    )


def load_label_windows(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Read `labels/combined_windows.json`: relative file path -> [(start, end)]."""
    raw: dict[str, list[list[str]]] = json.loads(path.read_text(encoding="utf-8"))
    return {name: [(start, end) for start, end in windows] for name, windows in raw.items()}


def parse_timestamps(values: Iterable[str]) -> NDArray[np.datetime64]:
    return np.array(list(values), dtype="datetime64[us]")


def window_rows(
    timestamps: NDArray[np.datetime64], windows: Sequence[tuple[str, str]]
) -> tuple[tuple[int, int], ...]:
    """Convert timestamp windows to inclusive row ranges of a sorted timestamp column."""
    rows = []
    for start, end in windows:
        first = int(np.searchsorted(timestamps, np.datetime64(start, "us"), side="left"))
        last = int(np.searchsorted(timestamps, np.datetime64(end, "us"), side="right")) - 1
        if first <= last:
            rows.append((first, last))
    return tuple(rows)


def probation_rows(length: int) -> int:
    return min(math.floor(PROBATION_FRACTION * length), MAX_PROBATION_ROWS)


def scaled_sigmoid(position: FloatArray) -> FloatArray:
    """NAB's A(y): 2 / (1 + e^(5y)) - 1, clamped to -1 beyond y = 3."""
    clipped = np.minimum(position, 3.0)
    values: FloatArray = 2.0 / (1.0 + np.exp(5.0 * clipped)) - 1.0
    return np.where(position > 3.0, -1.0, values)


def row_weights(
    length: int, windows: Sequence[tuple[int, int]], profile: Profile
) -> tuple[FloatArray, IntArray]:
    """The weight each row earns if flagged, and the index of its window (or -1)."""
    weights = np.full(length, -profile.fp_weight)
    window_of_row = np.full(length, OUTSIDE_WINDOWS, dtype=np.int64)
    max_tp = float(scaled_sigmoid(np.array([-1.0]))[0])
    rows = np.arange(length, dtype=np.float64)
    for index, (first, last) in enumerate(sorted(windows)):
        width = last - first + 1
        inside = slice(first, last + 1)
        position = -(last - rows[inside] + 1) / width
        weights[inside] = scaled_sigmoid(position) * profile.tp_weight / max_tp
        window_of_row[inside] = index
        following = slice(last + 1, length)
        # A one-row window has no tail: NAB divides by (width - 1).
        distance = (rows[following] - last) / max(width - 1, 1)
        weights[following] = scaled_sigmoid(distance) * profile.fp_weight
    return weights, window_of_row


@dataclass(frozen=True)
class _SweepEvents:
    """Score-sorted rows with the change in raw score each adds when it becomes a detection."""

    scores: FloatArray
    deltas: FloatArray
    is_false_positive: NDArray[np.bool_]
    first_in_window: NDArray[np.bool_]


def _window_increments(
    scores: FloatArray, weights: FloatArray, window_ids: IntArray, fn_weight: float
) -> FloatArray:
    """Raw-score increment of each in-window row when rows are admitted by falling score.

    A window is worth the weight of its best detection (or -fn_weight): as the
    threshold falls, the row that raises the window's running best adds the rise.
    """
    order = np.lexsort((-scores, window_ids))
    sorted_ids = window_ids[order]
    sorted_weights = weights[order]
    increments = np.empty_like(sorted_weights)
    group_starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    group_ends = np.r_[group_starts[1:], len(sorted_ids)]
    for start, end in zip(group_starts, group_ends, strict=True):
        best = np.maximum.accumulate(sorted_weights[start:end])
        increments[start:end] = np.diff(best, prepend=-fn_weight)
    deltas = np.empty_like(increments)
    deltas[order] = increments
    return deltas


def _sweep_events(corpus: Sequence[LabelledSeries], profile: Profile) -> tuple[_SweepEvents, int]:
    scores_parts, weight_parts, id_parts = [], [], []
    window_count = 0
    for series in corpus:
        weights, window_of_row = row_weights(len(series.scores), series.windows, profile)
        scored = slice(probation_rows(len(series.scores)), None)
        ids = window_of_row[scored]
        scores_parts.append(np.asarray(series.scores, dtype=np.float64)[scored])
        weight_parts.append(weights[scored])
        id_parts.append(np.where(ids == OUTSIDE_WINDOWS, OUTSIDE_WINDOWS, ids + window_count))
        window_count += len(series.windows)
    scores = np.concatenate(scores_parts) if scores_parts else np.empty(0)
    weights = np.concatenate(weight_parts) if weight_parts else np.empty(0)
    ids = np.concatenate(id_parts) if id_parts else np.empty(0, dtype=np.int64)
    outside = ids == OUTSIDE_WINDOWS
    deltas = weights.copy()
    inside = ~outside
    deltas[inside] = _window_increments(
        scores[inside], weights[inside], ids[inside], profile.fn_weight
    )
    first_in_window = np.zeros_like(outside)
    first_in_window[inside] = _first_detection_marks(scores[inside], ids[inside])
    order = np.argsort(-scores, kind="stable")
    events = _SweepEvents(scores[order], deltas[order], outside[order], first_in_window[order])
    return events, window_count


def _first_detection_marks(scores: FloatArray, window_ids: IntArray) -> NDArray[np.bool_]:
    """Mark the highest-scoring row of each window: it turns a miss into a detection."""
    marks = np.zeros(len(scores), dtype=bool)
    if len(scores) == 0:
        return marks
    order = np.lexsort((-scores, window_ids))
    sorted_ids = window_ids[order]
    leaders = order[np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]]
    marks[leaders] = True
    return marks


def sweep_threshold(corpus: Sequence[LabelledSeries], profile: Profile) -> ProfileScore:
    """Find the single threshold maximising the corpus raw score for `profile`."""
    events, window_count = _sweep_events(corpus, profile)
    null_score = -profile.fn_weight * window_count
    if len(events.scores) == 0:
        return _profile_score(profile, math.inf, null_score, window_count, 0, 0)
    totals = null_score + np.cumsum(events.deltas)
    # A threshold admits every row scoring >= it, so only the last row of a tie counts.
    last_of_value = np.r_[events.scores[1:] != events.scores[:-1], True]
    candidates = np.flatnonzero(last_of_value)
    best = candidates[int(np.argmax(totals[candidates]))]
    if totals[best] <= null_score:
        return _profile_score(profile, math.inf, null_score, window_count, 0, 0)
    detected = int(np.count_nonzero(events.first_in_window[: best + 1]))
    false_positives = int(np.count_nonzero(events.is_false_positive[: best + 1]))
    threshold = float(events.scores[best])
    raw = float(totals[best])
    return _profile_score(profile, threshold, raw, window_count, detected, false_positives)


def score_at_threshold(
    corpus: Sequence[LabelledSeries], profile: Profile, threshold: float
) -> ProfileScore:
    """Score the corpus at a given threshold (one chosen elsewhere) instead of sweeping."""
    events, window_count = _sweep_events(corpus, profile)
    admitted = int(np.count_nonzero(events.scores >= threshold))
    raw = -profile.fn_weight * window_count + float(events.deltas[:admitted].sum())
    detected = int(np.count_nonzero(events.first_in_window[:admitted]))
    false_positives = int(np.count_nonzero(events.is_false_positive[:admitted]))
    return _profile_score(profile, threshold, raw, window_count, detected, false_positives)


def _profile_score(
    profile: Profile,
    threshold: float,
    raw: float,
    window_count: int,
    detected: int,
    false_positives: int,
) -> ProfileScore:
    return ProfileScore(
        profile=profile.name,
        threshold=threshold,
        raw_score=raw,
        normalized=normalize(raw, window_count, profile),
        detected_windows=detected,
        missed_windows=window_count - detected,
        false_positives=false_positives,
    )


def normalize(raw: float, window_count: int, profile: Profile) -> float:
    """100 for a perfect detector, 0 for the null detector."""
    perfect = profile.tp_weight * window_count
    null = -profile.fn_weight * window_count
    if perfect == null:
        return 0.0
    return 100.0 * (raw - null) / (perfect - null)


def score_corpus(
    corpus: Sequence[LabelledSeries], profiles: Iterable[Profile] = DEFAULT_PROFILES
) -> dict[str, ProfileScore]:
    return {profile.name: sweep_threshold(corpus, profile) for profile in profiles}


def read_result_file(path: Path) -> tuple[NDArray[np.datetime64], FloatArray]:
    """Read the timestamp and anomaly_score columns of a NAB result CSV."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = [(row["timestamp"], float(row["anomaly_score"])) for row in reader]
    timestamps = parse_timestamps(timestamp for timestamp, _ in rows)
    return timestamps, np.array([score for _, score in rows], dtype=np.float64)


def result_file_path(results_dir: Path, detector: str, data_file: str) -> Path:
    """`<results>/<category>/<detector>_<file>.csv` for label key `<category>/<file>.csv`."""
    category, _, file_name = data_file.rpartition("/")
    return results_dir / category / f"{detector}_{file_name}"


def load_result_corpus(
    results_dir: Path, detector: str, labels: Mapping[str, Sequence[tuple[str, str]]]
) -> list[LabelledSeries]:
    """Pair each labelled file with the detector's result file under `results_dir`."""
    corpus = []
    for data_file, windows in sorted(labels.items()):
        path = result_file_path(results_dir, detector, data_file)
        if not path.exists():
            continue
        timestamps, scores = read_result_file(path)
        corpus.append(LabelledSeries(data_file, scores, window_rows(timestamps, windows)))
    return corpus


def score_result_dir(
    results_dir: Path,
    detector: str,
    labels_path: Path,
    profiles: Iterable[Profile] = DEFAULT_PROFILES,
) -> dict[str, ProfileScore]:
    """Score a NAB results directory (`<results_dir>/<category>/<detector>_<file>.csv`)."""
    labels = load_label_windows(labels_path)
    return score_corpus(load_result_corpus(results_dir, detector, labels), profiles)
