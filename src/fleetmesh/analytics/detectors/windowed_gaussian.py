"""Rolling z-score baseline, after NAB's "windowed Gaussian" detector."""

from __future__ import annotations

import math
from collections import deque

from fleetmesh.analytics.detectors.base import Detector, JsonDict, clamp_unit

SQRT2 = math.sqrt(2.0)


class WindowedGaussian(Detector):
    """Scores a point by its two-sided Gaussian tail under the last `window` values.

    The score is `erf(|z| / sqrt(2))`: 0 at the window mean, about 0.95 at two
    standard deviations. Sums are kept relative to the first value seen so that
    large offsets (bytes counters) do not cancel catastrophically, and they are
    recomputed from the window every `window` points to stop rounding drift.
    """

    name = "windowed_gaussian"
    tuning_grid = ({}, {"window": 1000}, {"window": 20000})

    def __init__(self, window: int = 6400, min_history: int = 2) -> None:
        if window < 2:
            raise ValueError("window must be at least 2")
        self._window = window
        self._min_history = max(2, min_history)
        self._values: deque[float] = deque()
        self._origin: float | None = None
        self._sum = 0.0
        self._sum_squares = 0.0
        self._since_refresh = 0

    @property
    def params(self) -> JsonDict:
        return {"window": self._window, "min_history": self._min_history}

    def _update(self, ts: float, value: float) -> float:  # noqa: ARG002 - interface
        score = self._score(value)
        self._learn(value)
        return score

    def _score(self, value: float) -> float:
        count = len(self._values)
        if count < self._min_history or self._origin is None:
            return 0.0
        mean = self._sum / count
        variance = max(self._sum_squares / count - mean * mean, 0.0)
        deviation = abs(value - self._origin - mean)
        if variance == 0.0:
            return 0.0 if deviation == 0.0 else 1.0
        return clamp_unit(math.erf(deviation / (math.sqrt(variance) * SQRT2)))

    def _learn(self, value: float) -> None:
        if self._origin is None:
            self._origin = value
        shifted = value - self._origin
        self._values.append(shifted)
        self._sum += shifted
        self._sum_squares += shifted * shifted
        if len(self._values) > self._window:
            dropped = self._values.popleft()
            self._sum -= dropped
            self._sum_squares -= dropped * dropped
        self._since_refresh += 1
        if self._since_refresh >= self._window:
            self._refresh_sums()

    def _refresh_sums(self) -> None:
        self._sum = math.fsum(self._values)
        self._sum_squares = math.fsum(v * v for v in self._values)
        self._since_refresh = 0

    def _export_state(self) -> JsonDict:
        return {
            "values": list(self._values),
            "origin": self._origin,
            "sum": self._sum,
            "sum_squares": self._sum_squares,
            "since_refresh": self._since_refresh,
        }

    def _import_state(self, state: JsonDict) -> None:
        self._values = deque(float(v) for v in state["values"])
        origin = state["origin"]
        self._origin = None if origin is None else float(origin)
        self._sum = float(state["sum"])
        self._sum_squares = float(state["sum_squares"])
        self._since_refresh = int(state["since_refresh"])
