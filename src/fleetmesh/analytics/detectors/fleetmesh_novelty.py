"""fleetmesh's own detector: calibrated novelty of values and of seasonal residuals.

Three ideas, each kept deliberately simple:

1. Novelty, not deviation. A point is surprising when it lands where the
   series has never been: the gap between the value and its nearest past
   value, as a fraction of the range seen so far. Periodic spikes, plateaus
   and multi-modal signals therefore stop being anomalous once seen, while a
   new level, a higher spike or a drop to a new low are caught at once.
2. Self-calibration. Each novelty is divided by the tail scale of the
   novelties this stream has produced so far, so a dense sensor and a bursty
   counter give comparable scores and one threshold fits every stream. The
   scale is the geometric mean of two high quantiles (99% and 99.9%): a single
   extreme quantile rests on a handful of past values in a short stream, and
   the score then swings with which few values those happen to be.
3. Context. When a daily or weekly profile explains the series better than
   its overall median (checked online), a second channel scores the novelty
   of the smoothed residual against the same time slot of previous periods;
   this finds days that are unusual in shape although every value is ordinary.

Alarm spacing then keeps one alert per event: after an alarm the detector is
quiet for `rest` points unless a clearly stronger one comes (`escalation` times
the novelty ratio of the last alarm).
The score is `r / (1 + r)` for the calibrated novelty ratio `r`.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any, Self

from fleetmesh.analytics.detectors.base import AlarmSpacer, Detector, JsonDict

DAY_SECONDS = 86400.0
WEEK_SECONDS = 7 * DAY_SECONDS
# Novelty after a perfectly constant history has no scale to compare with; it
# is reported as this ratio, well above any alarm level.
RATIO_WITHOUT_PRECEDENT = 10.0
# One-minute samples over a week; finer sampling switches a seasonal channel off.
MAX_SEASON_SLOTS = 20160
INTERVAL_SAMPLE_SIZE = 101


class SupportMemory:
    """Past values kept sorted; when full it forgets points from crowded places.

    Thinning drops half of the interior points, those closest to their left
    neighbour, so extremes and isolated values (what novelty is measured
    against) survive indefinitely while memory stays bounded.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 4)
        self.values: list[float] = []

    def __len__(self) -> int:
        return len(self.values)

    def add(self, value: float) -> None:
        bisect.insort(self.values, value)
        if len(self.values) > self.capacity:
            self._thin()

    def _thin(self) -> None:
        values = self.values
        interior = range(1, len(values) - 1)
        crowded = sorted(interior, key=lambda i: (values[i] - values[i - 1], i))
        dropped = set(crowded[: len(values) // 2])
        self.values = [v for i, v in enumerate(values) if i not in dropped]

    def gap_fraction(self, value: float) -> float:
        """Distance to the nearest remembered value, as a fraction of their range."""
        values = self.values
        if len(values) < 2:
            return 0.0
        index = bisect.bisect_left(values, value)
        below = value - values[index - 1] if index > 0 else math.inf
        above = values[index] - value if index < len(values) else math.inf
        gap = min(below, above)
        span = values[-1] - values[0]
        if span <= 0.0:
            return 0.0 if gap == 0.0 else 1.0
        return gap / span


class UniformSample:
    """A sorted, evenly thinned sample of everything seen, for quantiles.

    When full, every other element is dropped and from then on only every
    `stride`-th arrival is kept, so the sample stays uniform over all history.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 2)
        self.values: list[float] = []
        self.stride = 1
        self.count = 0

    def __len__(self) -> int:
        return len(self.values)

    def add(self, value: float) -> None:
        self.count += 1
        if self.count % self.stride:
            return
        bisect.insort(self.values, value)
        if len(self.values) > self.capacity:
            self.values = self.values[::2]
            self.stride *= 2

    def quantile(self, q: float) -> float:
        return self.values[min(len(self.values) - 1, int(q * len(self.values)))]

    def export(self) -> JsonDict:
        return {"values": list(self.values), "stride": self.stride, "count": self.count}

    def restore(self, state: JsonDict) -> None:
        self.values = [float(v) for v in state["values"]]
        self.stride = int(state["stride"])
        self.count = int(state["count"])


class TailCalibrator:
    """Expresses a statistic as a multiple of the tail scale of its own past.

    The scale is the geometric mean of the `lower` and `upper` quantiles of the
    past statistics. A stream whose statistic is mostly exactly zero (a counter
    that keeps repeating the same few values) has a zero lower quantile; the
    upper one alone is the scale then.
    """

    def __init__(self, lower: float, upper: float, warmup: int, capacity: int) -> None:
        self.lower = lower
        self.upper = upper
        self.warmup = warmup
        self.history = UniformSample(capacity)

    def ratio(self, statistic: float) -> float:
        if len(self.history) < self.warmup:
            return 0.0
        reference = self._scale()
        if reference > 0.0:
            return statistic / reference
        return RATIO_WITHOUT_PRECEDENT if statistic > 0.0 else 0.0

    def _scale(self) -> float:
        upper = self.history.quantile(self.upper)
        lower = self.history.quantile(self.lower)
        return math.sqrt(lower * upper) if lower > 0.0 else upper


class SeasonalChannel:
    """Novelty of the smoothed residual against the same slot of earlier periods.

    Slots come from wall-clock time and the median sampling interval. The
    channel only speaks while its seasonal residuals have stayed, in total,
    below `gate` times the deviations from the overall median, i.e. while the
    season explains the series; and only after a full period of such residuals.
    """

    def __init__(
        self, period: float, depth: int, smoothing: int, gate: float, calibration: TailCalibrator
    ) -> None:
        self.period = period
        self.depth = depth
        self.gate = gate
        self.calibration = calibration
        self.slots: dict[int, deque[float]] = {}
        self.recent: deque[float] = deque(maxlen=smoothing)
        self.intervals = UniformSample(INTERVAL_SAMPLE_SIZE)
        self.residual_memory = SupportMemory(calibration.history.capacity)
        self.last_ts: float | None = None
        self.residual_total = 0.0
        self.deviation_total = 0.0
        self.compared = 0
        self.active = 0

    def update(self, ts: float, value: float, median: float) -> float:
        """Score then learn one point; returns the calibrated novelty ratio."""
        slot_count, slot = self._locate(ts)
        if slot_count == 0:
            return 0.0
        past = self.slots.get(slot)
        ratio = 0.0
        if past is not None and len(past) >= self.depth:
            ratio = self._score_residual(value - _median(past), value - median, slot_count)
        if past is None:
            past = self.slots[slot] = deque(maxlen=self.depth)
        past.append(value)
        return ratio

    def _locate(self, ts: float) -> tuple[int, int]:
        if self.last_ts is not None and ts > self.last_ts:
            self.intervals.add(ts - self.last_ts)
        self.last_ts = ts
        if not len(self.intervals):
            return 0, 0
        interval = self.intervals.quantile(0.5)
        slot_count = round(self.period / interval)
        if slot_count < 2 or slot_count > MAX_SEASON_SLOTS:
            return 0, 0
        return slot_count, round((ts % self.period) / interval) % slot_count

    def _score_residual(self, residual: float, deviation: float, slot_count: int) -> float:
        self.recent.append(residual)
        self.residual_total += abs(residual)
        self.deviation_total += abs(deviation)
        self.compared += 1
        warming_up = len(self.recent) < (self.recent.maxlen or 1) or self.compared <= slot_count
        season_explains = self.residual_total < self.gate * self.deviation_total
        if warming_up or not season_explains:
            return 0.0
        smoothed = abs(sum(self.recent) / len(self.recent))
        self.active += 1
        ratio = 0.0
        if self.active > slot_count:
            novelty = self.residual_memory.gap_fraction(smoothed)
            ratio = self.calibration.ratio(novelty)
            self.calibration.history.add(novelty)
        self.residual_memory.add(smoothed)
        return ratio

    def export(self) -> JsonDict:
        return {
            "slots": [[slot, list(values)] for slot, values in sorted(self.slots.items())],
            "recent": list(self.recent),
            "intervals": self.intervals.export(),
            "residual_memory": list(self.residual_memory.values),
            "calibration": self.calibration.history.export(),
            "last_ts": self.last_ts,
            "residual_total": self.residual_total,
            "deviation_total": self.deviation_total,
            "compared": self.compared,
            "active": self.active,
        }

    def restore(self, state: JsonDict) -> None:
        self.slots = {
            int(slot): deque((float(v) for v in values), maxlen=self.depth)
            for slot, values in state["slots"]
        }
        self.recent.clear()
        self.recent.extend(float(v) for v in state["recent"])
        self.intervals.restore(state["intervals"])
        self.residual_memory.values = [float(v) for v in state["residual_memory"]]
        self.calibration.history.restore(state["calibration"])
        self.last_ts = None if state["last_ts"] is None else float(state["last_ts"])
        self.residual_total = float(state["residual_total"])
        self.deviation_total = float(state["deviation_total"])
        self.compared = int(state["compared"])
        self.active = int(state["active"])


def _median(values: deque[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


class FleetmeshNovelty(Detector):
    """Calibrated value novelty + seasonal-residual novelty, with alarm spacing.

    `quantile` and `lower_quantile` set the calibration scale (their geometric
    mean); `lower_quantile=quantile` calibrates on the one quantile.
    """

    name = "fleetmesh_novelty"
    # The defaults, then one step either side of the main knobs, in signature order;
    # lower_quantile=0.999 is the single-quantile calibration of earlier versions.
    tuning_grid = (
        {},
        {"quantile": 0.998},
        {"quantile": 0.9995},
        {"lower_quantile": 0.98},
        {"lower_quantile": 0.995},
        {"lower_quantile": 0.999},
        {"season_gate": 0.3},
        {"rest": 100},
        {"rest": 300},
    )

    def __init__(
        self,
        memory: int = 10000,
        quantile: float = 0.999,
        lower_quantile: float = 0.99,
        warmup: int = 100,
        periods: list[float] | tuple[float, ...] = (WEEK_SECONDS, DAY_SECONDS),
        season_depth: int = 3,
        season_smoothing: int = 6,
        season_gate: float = 0.5,
        rest: int = 200,
        alarm_ratio: float = 0.25,
        escalation: float = 2.0,
    ) -> None:
        if not 0.0 < lower_quantile <= quantile <= 1.0 or memory < 4 or warmup < 1:
            raise ValueError(
                "need 0 < lower_quantile <= quantile <= 1, memory >= 4 and warmup >= 1"
            )
        self._settings: JsonDict = {
            "memory": memory,
            "quantile": quantile,
            "lower_quantile": lower_quantile,
            "warmup": warmup,
            "periods": [float(p) for p in periods],
            "season_depth": season_depth,
            "season_smoothing": season_smoothing,
            "season_gate": season_gate,
            "rest": rest,
            "alarm_ratio": alarm_ratio,
            "escalation": escalation,
        }
        self._values = SupportMemory(memory)
        self._value_sample = UniformSample(memory)
        self._calibration = TailCalibrator(lower_quantile, quantile, warmup, memory)
        self._seasons = [
            SeasonalChannel(
                period,
                max(season_depth, 1),
                max(season_smoothing, 1),
                season_gate,
                TailCalibrator(lower_quantile, quantile, warmup, memory),
            )
            for period in self._settings["periods"]
        ]
        self._spacer = AlarmSpacer(rest, alarm_ratio / (1.0 + alarm_ratio), escalation)

    @property
    def params(self) -> JsonDict:
        return dict(self._settings)

    @classmethod
    def from_state(cls, state: JsonDict) -> Self:
        # A state saved before `lower_quantile` existed was calibrated on `quantile` alone.
        params = state.get("params")
        if isinstance(params, dict) and "lower_quantile" not in params and "quantile" in params:
            state = {**state, "params": {**params, "lower_quantile": params["quantile"]}}
        return super().from_state(state)

    def _update(self, ts: float, value: float) -> float:
        ratio = self._value_ratio(value)
        median = self._value_sample.quantile(0.5) if len(self._value_sample) else value
        for season in self._seasons:
            ratio = max(ratio, season.update(ts, value, median))
        self._values.add(value)
        self._value_sample.add(value)
        return self._spacer.filter(ratio / (1.0 + ratio))

    def _value_ratio(self, value: float) -> float:
        if len(self._values) < self._calibration.warmup:
            return 0.0
        novelty = self._values.gap_fraction(value)
        ratio = self._calibration.ratio(novelty)
        self._calibration.history.add(novelty)
        return ratio

    def _export_state(self) -> JsonDict:
        return {
            "values": list(self._values.values),
            "value_sample": self._value_sample.export(),
            "calibration": self._calibration.history.export(),
            "seasons": [season.export() for season in self._seasons],
            "spacer": self._spacer.export(),
        }

    def _import_state(self, state: JsonDict) -> None:
        self._values.values = [float(v) for v in state["values"]]
        self._value_sample.restore(state["value_sample"])
        self._calibration.history.restore(state["calibration"])
        seasons: list[Any] = state["seasons"]
        for season, season_state in zip(self._seasons, seasons, strict=True):
            season.restore(season_state)
        self._spacer.restore(state["spacer"])
