"""The streaming anomaly-detector interface.

A detector sees a series one point at a time and never looks ahead. The
primitive is `update(ts, value)`: it first scores the point against what has
been learnt so far, then learns from it, and returns the score in [0, 1].
Non-finite values are ignored (score 0, nothing learnt).
Scoring and learning are one step because several detectors keep
post-processing state (alarm spacing, adaptive thresholds) that depends on the
scores they have emitted; `learn_one` is `update` with the score discarded.

State is exported as plain JSON-compatible data (dicts, lists, numbers,
strings, booleans, None) so it can be stored anywhere; it is never pickled.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self

JsonDict = dict[str, Any]


class Detector(ABC):
    """A streaming anomaly detector: one `update` per point, in time order."""

    name: ClassVar[str]
    # The parameter settings that held-out evaluation chooses among (`analytics.heldout`);
    # the defaults come first, so they win ties.
    tuning_grid: ClassVar[tuple[JsonDict, ...]] = ({},)

    @property
    @abstractmethod
    def params(self) -> JsonDict:
        """The constructor keyword arguments that rebuild this detector."""

    def update(self, ts: float, value: float) -> float:
        """Score the point against the past, learn it, and return the score in [0, 1]."""
        if not (math.isfinite(value) and math.isfinite(ts)):
            return 0.0
        return clamp_unit(self._update(ts, value))

    @abstractmethod
    def _update(self, ts: float, value: float) -> float:
        """`update` for a finite point; may return slightly outside [0, 1]."""

    @abstractmethod
    def _export_state(self) -> JsonDict:
        """The learnt state, as JSON-compatible data."""

    @abstractmethod
    def _import_state(self, state: JsonDict) -> None:
        """Restore what `_export_state` produced."""

    def learn_one(self, ts: float, value: float) -> None:
        self.update(ts, value)

    def get_state(self) -> JsonDict:
        return {"name": self.name, "params": self.params, "state": self._export_state()}

    @classmethod
    def from_state(cls, state: JsonDict) -> Self:
        if state.get("name") != cls.name:
            raise ValueError(f"state of detector {state.get('name')!r}, not {cls.name!r}")
        detector = cls(**state["params"])
        detector._import_state(state["state"])
        return detector


def clamp_unit(score: float) -> float:
    """Force a score into [0, 1]; NaN (from degenerate input) counts as no anomaly."""
    if score != score:
        return 0.0
    return 0.0 if score < 0.0 else 1.0 if score > 1.0 else score


class AlarmSpacer:
    """One alert per event: after an alarm, stay quiet for `rest` points.

    An alarm is a score of at least `alarm_score`. During the quiet period an
    alarm whose odds `s / (1 - s)` are `escalation` times the last alarm's
    still gets through (and restarts the period), so an early weak precursor
    cannot hide the main event. Odds, not scores, because scores saturate
    near 1. `rest=0` turns spacing off.
    """

    def __init__(self, rest: int, alarm_score: float, escalation: float) -> None:
        self.rest = max(rest, 0)
        self.alarm_score = alarm_score
        self.escalation = escalation
        self.since_alarm = self.rest + 1
        self.last_alarm = 0.0

    def filter(self, score: float) -> float:
        self.since_alarm += 1
        if self.since_alarm <= self.rest:
            if _odds(score) > _odds(self.last_alarm) * self.escalation:
                return self._raise(score)
            return 0.0
        if score >= self.alarm_score:
            return self._raise(score)
        return score

    def _raise(self, score: float) -> float:
        self.since_alarm = 0
        self.last_alarm = score
        return score

    def export(self) -> JsonDict:
        return {"since_alarm": self.since_alarm, "last_alarm": self.last_alarm}

    def restore(self, state: JsonDict) -> None:
        self.since_alarm = int(state["since_alarm"])
        self.last_alarm = float(state["last_alarm"])


def _odds(score: float) -> float:
    return math.inf if score >= 1.0 else score / (1.0 - score)
