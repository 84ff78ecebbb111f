"""Exponentially weighted baseline with an optional time-of-day season."""

from __future__ import annotations

import math

from fleetmesh.analytics.detectors.base import Detector, JsonDict, clamp_unit

SQRT2 = math.sqrt(2.0)


class Ewma(Detector):
    """Additive Holt-Winters-style level + seasonal profile; scores the residual's z.

    The season is indexed by wall-clock time (`ts` modulo `season_seconds`, cut
    into `season_slots` slots), so irregular sampling does not break it. Set
    `season_seconds` to 0 for a plain EWMA. The residual variance is itself an
    EWMA, and the score is the two-sided Gaussian tail `erf(|z| / sqrt(2))`.
    """

    name = "ewma"
    tuning_grid = ({}, {"alpha": 0.02}, {"alpha": 0.1}, {"season_seconds": 0.0})

    def __init__(
        self,
        alpha: float = 0.05,
        variance_alpha: float = 0.01,
        season_seconds: float = 86400.0,
        season_slots: int = 24,
        season_alpha: float = 0.1,
        warmup: int = 50,
    ) -> None:
        for label, rate in (("alpha", alpha), ("variance_alpha", variance_alpha)):
            if not 0.0 < rate <= 1.0:
                raise ValueError(f"{label} must be in (0, 1]")
        self._alpha = alpha
        self._variance_alpha = variance_alpha
        self._season_seconds = max(season_seconds, 0.0)
        self._season_slots = max(season_slots, 1)
        self._season_alpha = season_alpha
        self._warmup = warmup
        self._level: float | None = None
        self._variance = 0.0
        self._seasonal = [0.0] * self._season_slots
        self._count = 0

    @property
    def params(self) -> JsonDict:
        return {
            "alpha": self._alpha,
            "variance_alpha": self._variance_alpha,
            "season_seconds": self._season_seconds,
            "season_slots": self._season_slots,
            "season_alpha": self._season_alpha,
            "warmup": self._warmup,
        }

    def _update(self, ts: float, value: float) -> float:
        slot = self._slot(ts)
        if self._level is None:
            self._level = value
        residual = value - self._level - self._seasonal[slot]
        score = self._score(residual)
        self._learn(slot, value, residual)
        return score

    def _slot(self, ts: float) -> int:
        if self._season_seconds <= 0.0:
            return 0
        phase = (ts % self._season_seconds) / self._season_seconds
        return min(int(phase * self._season_slots), self._season_slots - 1)

    def _score(self, residual: float) -> float:
        if self._count < self._warmup:
            return 0.0
        if self._variance <= 0.0:
            return 0.0 if residual == 0.0 else 1.0
        return clamp_unit(math.erf(abs(residual) / (math.sqrt(self._variance) * SQRT2)))

    def _learn(self, slot: int, value: float, residual: float) -> None:
        level = self._level if self._level is not None else value
        seasonal = self._seasonal[slot] if self._season_seconds > 0.0 else 0.0
        level += self._alpha * (value - seasonal - level)
        if self._season_seconds > 0.0:
            self._seasonal[slot] += self._season_alpha * (value - level - seasonal)
        self._level = level
        self._variance += self._variance_alpha * (residual * residual - self._variance)
        self._count += 1

    def _export_state(self) -> JsonDict:
        return {
            "level": self._level,
            "variance": self._variance,
            "seasonal": list(self._seasonal),
            "count": self._count,
        }

    def _import_state(self, state: JsonDict) -> None:
        level = state["level"]
        self._level = None if level is None else float(level)
        self._variance = float(state["variance"])
        self._seasonal = [float(v) for v in state["seasonal"]]
        self._count = int(state["count"])
