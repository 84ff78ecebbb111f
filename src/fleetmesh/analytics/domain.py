"""Pure domain of the analytics service: models, deployments, anomalies, evaluation metrics.

No I/O here: the service layer reads telemetry, runs detectors in a worker pool and
stores what these objects describe.

Evaluation (see `evaluate_scores`) reports two views of the same flags
(`score >= threshold`):

* point-wise: every point is labelled 0/1 (inside a window = 1); precision,
  recall and F1 over points;
* window-wise: a window is detected when at least one of its points is flagged;
  recall = detected windows / windows, precision = detected windows /
  (detected windows + flagged points outside every window), F1 of the two.

The NAB score uses `analytics.nab` with the standard profile: `nab_score` is NAB's
own definition (the best threshold for this series, found by the sweep) and
`nab_score_at_threshold` scores the model's fixed threshold with the same weights.
Both exclude NAB's probation period (the first 15% of the series, at most 750 rows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import numpy as np

from fleetmesh.analytics import nab
from fleetmesh.analytics.detectors import DETECTORS, canonical_name, create_detector
from fleetmesh.core.clock import to_rfc3339
from fleetmesh.core.errors import Conflict, FieldError, InvalidInput, NotFound

# Default alarm thresholds when a model is created without one (scores are in [0, 1]).
DEFAULT_THRESHOLDS: dict[str, float] = {
    "fleetmesh_novelty": 0.7,
    "windowed_gaussian": 0.99,
    "ewma": 0.99,
    "isolation_forest": 0.3,
}
FALLBACK_THRESHOLD = 0.7
MAX_NAME_LENGTH = 200
STANDARD_PROFILE = next(p for p in nab.DEFAULT_PROFILES if p.name == "standard")


class ModelNotFound(NotFound):
    problem = "model-not-found"


class ModelNotReady(Conflict):
    problem = "model-not-ready"


class AnalysisNotFound(NotFound):
    problem = "analysis-not-found"


class DeploymentNotFound(NotFound):
    problem = "deployment-not-found"


class TelemetryNotFound(NotFound):
    problem = "telemetry-not-found"


class InvalidAnalyticsInput(InvalidInput):
    pass


class ModelStatus(StrEnum):
    training = "training"
    ready = "ready"
    failed = "failed"


class DeploymentStatus(StrEnum):
    active = "active"
    undeployed = "undeployed"


class AnomalySource(StrEnum):
    streaming = "streaming"
    analysis = "analysis"


# --------------------------------------------------------------------------- time


def parse_ts(value: object, field_name: str = "ts") -> int:
    """Epoch milliseconds from epoch ms (number or digits) or an RFC 3339 string."""
    if isinstance(value, bool):
        raise _bad_ts(field_name, value)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise _bad_ts(field_name, value)
        return int(value)
    if isinstance(value, datetime):
        return to_ms(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise _bad_ts(field_name, value) from None
        return to_ms(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    raise _bad_ts(field_name, value)


def _bad_ts(field_name: str, value: object) -> InvalidAnalyticsInput:
    return InvalidAnalyticsInput(
        f"{field_name} must be epoch milliseconds or an RFC 3339 time, not {value!r}.",
        errors=[FieldError(field_name, "not a timestamp", "invalid_timestamp")],
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def to_ms(moment: datetime) -> int:
    """Epoch milliseconds, exactly (no float rounding); naive datetimes are taken as UTC."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return (aware - _EPOCH) // _MS


def from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


# --------------------------------------------------------------------------- algorithms


def resolve_algorithm(name: str, parameters: dict[str, Any]) -> str:
    """The registry name of the algorithm, after checking the parameters build a detector."""
    try:
        algorithm = canonical_name(name)
    except KeyError:
        known = ", ".join(sorted([*DETECTORS, "best"]))
        raise InvalidAnalyticsInput(
            f"Unknown algorithm {name!r}; known: {known}.",
            errors=[FieldError("algorithm", f"unknown algorithm {name!r}", "unknown")],
        ) from None
    try:
        create_detector(algorithm, **parameters)
    except (TypeError, ValueError) as error:
        raise InvalidAnalyticsInput(
            f"The parameters do not fit {algorithm}: {error}",
            errors=[FieldError("parameters", str(error), "invalid")],
        ) from None
    return algorithm


def default_threshold(algorithm: str) -> float:
    return DEFAULT_THRESHOLDS.get(algorithm, FALLBACK_THRESHOLD)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class SeriesRef:
    """A stored time range of one device's metric (inclusive bounds, epoch ms)."""

    device_id: str
    metric: str
    start_ms: int
    end_ms: int

    def validate(self, prefix: str = "") -> None:
        if self.start_ms > self.end_ms:
            raise InvalidAnalyticsInput(
                "`from` is after `to`.",
                errors=[FieldError(f"{prefix}from", "after `to`", "invalid_range")],
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "metric": self.metric,
            "from": to_rfc3339(from_ms(self.start_ms)),
            "to": to_rfc3339(from_ms(self.end_ms)),
        }


@dataclass
class Model:
    """A trained (or training) detector: its recipe, its data, its fitted state."""

    id: str
    name: str
    version: int
    algorithm: str
    parameters: dict[str, Any]
    threshold: float
    training: SeriesRef
    status: ModelStatus
    created_at: datetime
    updated_at: datetime
    progress: float = 0.0
    error: str | None = None
    training_points: int = 0
    training_summary: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    fitted_state: dict[str, Any] | None = None
    completed_at: datetime | None = None

    def require_ready(self) -> dict[str, Any]:
        if self.status is not ModelStatus.ready or self.fitted_state is None:
            raise ModelNotReady(
                f"Model {self.id} is {self.status.value}; it must be ready.",
                extra={"model_status": self.status.value},
            )
        return self.fitted_state


@dataclass
class Deployment:
    """A model attached to devices (by id or by type) for one metric."""

    id: str
    model_id: str
    metric: str
    device_ids: tuple[str, ...] | None
    device_type: str | None
    status: DeploymentStatus
    created_at: datetime
    undeployed_at: datetime | None = None

    @property
    def needs_device_type(self) -> bool:
        return self.device_ids is None

    def matches(self, device_id: str, device_type: str | None) -> bool:
        if self.status is not DeploymentStatus.active:
            return False
        if self.device_ids is not None:
            return device_id in self.device_ids
        return device_type is not None and device_type == self.device_type

    def same_selector(self, other: Deployment) -> bool:
        return (
            self.model_id == other.model_id
            and self.metric == other.metric
            and self.device_type == other.device_type
            and (sorted(self.device_ids) if self.device_ids is not None else None)
            == (sorted(other.device_ids) if other.device_ids is not None else None)
        )


@dataclass(frozen=True, slots=True)
class Anomaly:
    id: str
    device_id: str
    metric: str
    ts: datetime
    value: float
    score: float
    threshold: float
    model_id: str
    source: AnomalySource
    detected_at: datetime
    deployment_id: str | None = None
    analysis_id: str | None = None

    @property
    def source_key(self) -> str:
        """Anomalies are unique per (source key, device, metric, ts)."""
        if self.deployment_id is not None:
            return f"deployment:{self.deployment_id}"
        return f"analysis:{self.analysis_id}"


@dataclass
class Analysis:
    id: str
    model_id: str
    input: dict[str, Any]
    summary: dict[str, Any]
    anomalies: list[dict[str, Any]]
    created_at: datetime
    timing: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- scoring results


def flagged_indices(scores: Sequence[float], threshold: float) -> list[int]:
    return [i for i, score in enumerate(scores) if score >= threshold]


def score_summary(scores: Sequence[float], threshold: float) -> dict[str, Any]:
    """Count, flags and the distribution of scores."""
    if not scores:
        return {"points": 0, "flagged": 0, "threshold": threshold}
    array = np.asarray(scores, dtype=np.float64)
    flagged = int(np.count_nonzero(array >= threshold))
    return {
        "points": len(scores),
        "flagged": flagged,
        "flagged_rate": flagged / len(scores),
        "threshold": threshold,
        "max": float(array.max()),
        "mean": float(array.mean()),
        "p50": float(np.quantile(array, 0.5)),
        "p95": float(np.quantile(array, 0.95)),
        "p99": float(np.quantile(array, 0.99)),
    }


# --------------------------------------------------------------------------- evaluation


def windows_from_labels(labels: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous runs of 1 as inclusive row ranges."""
    windows: list[tuple[int, int]] = []
    start: int | None = None
    for index, label in enumerate(labels):
        if label and start is None:
            start = index
        elif not label and start is not None:
            windows.append((start, index - 1))
            start = None
    if start is not None:
        windows.append((start, len(labels) - 1))
    return windows


def window_rows_from_times(
    timestamps_ms: Sequence[int], windows_ms: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Inclusive row ranges of the (sorted) points inside each time window; empty ones dropped."""
    times = np.asarray(timestamps_ms, dtype=np.int64)
    rows: list[tuple[int, int]] = []
    for start, end in windows_ms:
        first = int(np.searchsorted(times, start, side="left"))
        last = int(np.searchsorted(times, end, side="right")) - 1
        if first <= last:
            rows.append((first, last))
    return rows


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def evaluate_scores(
    scores: Sequence[float], windows: Sequence[tuple[int, int]], threshold: float
) -> dict[str, Any]:
    """Point-wise and window-wise precision/recall/F1 and the NAB standard score."""
    length = len(scores)
    array = np.asarray(scores, dtype=np.float64)
    flags = array >= threshold
    labels = np.zeros(length, dtype=bool)
    for first, last in windows:
        labels[first : last + 1] = True
    tp = int(np.count_nonzero(flags & labels))
    fp = int(np.count_nonzero(flags & ~labels))
    fn = int(np.count_nonzero(~flags & labels))
    point_precision, point_recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    detected = sum(1 for first, last in windows if bool(flags[first : last + 1].any()))
    window_precision = _ratio(detected, detected + fp)
    window_recall = _ratio(detected, len(windows))
    swept = nab.sweep_threshold(
        [nab.LabelledSeries("validation", array, tuple(sorted(windows)))], STANDARD_PROFILE
    )
    return {
        "points": length,
        "windows": len(windows),
        "threshold": threshold,
        "pointwise": {
            "true_positives": tp,
            "false_positives": fp,
            "false_negatives": fn,
            "precision": point_precision,
            "recall": point_recall,
            "f1": _f1(point_precision, point_recall),
        },
        "windowwise": {
            "detected_windows": detected,
            "missed_windows": len(windows) - detected,
            "false_positives": fp,
            "precision": window_precision,
            "recall": window_recall,
            "f1": _f1(window_precision, window_recall),
        },
        "precision": window_precision,
        "recall": window_recall,
        "f1": _f1(window_precision, window_recall),
        "nab": {
            "profile": STANDARD_PROFILE.name,
            "score": swept.normalized,
            "raw_score": swept.raw_score,
            "best_threshold": swept.threshold if math.isfinite(swept.threshold) else None,
            "detected_windows": swept.detected_windows,
            "false_positives": swept.false_positives,
            "score_at_threshold": nab_score_at_threshold(array, windows, threshold),
        },
        "nab_score": swept.normalized,
    }


def nab_score_at_threshold(
    scores: np.ndarray[Any, np.dtype[np.float64]],
    windows: Sequence[tuple[int, int]],
    threshold: float,
    profile: nab.Profile = STANDARD_PROFILE,
) -> float:
    """NAB's normalised score of one fixed threshold (probation rows excluded)."""
    length = len(scores)
    weights, window_of_row = nab.row_weights(length, sorted(windows), profile)
    start = nab.probation_rows(length)
    flags = scores[start:] >= threshold
    row_weights = weights[start:]
    row_windows = window_of_row[start:]
    outside = row_windows == nab.OUTSIDE_WINDOWS
    raw = float(row_weights[flags & outside].sum())
    for index in range(len(windows)):
        in_window = flags & (row_windows == index)
        raw += float(row_weights[in_window].max()) if in_window.any() else -profile.fn_weight
    return nab.normalize(raw, len(windows), profile)
