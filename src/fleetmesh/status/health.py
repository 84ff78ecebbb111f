"""An explainable health score in [0, 100]. Pure functions.

The score is a weighted mean of components, each scored 0-100 with a reason a
person can read. Default weights (`HealthWeights`):

| component    | weight | 100 means                                | 0 means                     |
|--------------|--------|------------------------------------------|-----------------------------|
| availability | 0.4    | online all the counted time of window    | offline all of it           |
| freshness    | 0.3    | seen within 1.5x the expected interval   | silent for 10x the interval |
| data_quality | 0.2    | recent telemetry quality mean 1.0        | quality mean 0.0            |
| failures     | 0.1    | no recent command or health-check failed | every recent attempt failed |

Freshness falls linearly between the two thresholds (`HealthPolicy`).

A component whose input is missing (never seen, no telemetry yet, no
commands sent, nothing counted in the window) is excluded, says so in its
reason, and the remaining weights are renormalised. If every component is
excluded the score is None ("not enough data"), never NaN and never a guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from fleetmesh.status.uptime import Availability


@dataclass(frozen=True, slots=True)
class HealthWeights:
    availability: float = 0.4
    freshness: float = 0.3
    data_quality: float = 0.2
    failures: float = 0.1

    def __post_init__(self) -> None:
        weights = (self.availability, self.freshness, self.data_quality, self.failures)
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be finite, non-negative, not all zero: {weights}")


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    weights: HealthWeights = field(default_factory=HealthWeights)
    fresh_within: float = 1.5
    """Silence up to this many expected intervals still scores 100 (jitter, batching)."""
    stale_after: float = 10.0
    """Silence of this many expected intervals or more scores 0."""

    def __post_init__(self) -> None:
        if not 0 <= self.fresh_within < self.stale_after < math.inf:
            raise ValueError("need 0 <= fresh_within < stale_after < inf")


@dataclass(frozen=True, slots=True)
class DataQuality:
    """Mean telemetry quality score, in [0, 1], of the device's recent points."""

    mean: float
    points: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.mean <= 1.0:
            raise ValueError(f"quality mean must be in [0, 1], got {self.mean}")
        _require_count("points", self.points)


@dataclass(frozen=True, slots=True)
class Attempts:
    """How many recent attempts of one kind were made and how many of them failed."""

    failed: int = 0
    total: int = 0

    def __post_init__(self) -> None:
        _require_count("failed", self.failed)
        _require_count("total", self.total)
        if self.failed > self.total:
            raise ValueError(f"{self.failed} failures out of only {self.total} attempts")


@dataclass(frozen=True, slots=True)
class HealthInputs:
    """What the health score is computed from; None means "not known" and is excluded."""

    now: datetime
    availability: Availability | None = None
    last_seen: datetime | None = None
    expected_interval: timedelta | None = None
    data_quality: DataQuality | None = None
    commands: Attempts = field(default_factory=Attempts)
    health_checks: Attempts = field(default_factory=Attempts)


@dataclass(frozen=True, slots=True)
class HealthComponent:
    """One explained part of the score; `score` None means excluded."""

    name: str
    score: float | None
    weight: float
    reason: str

    @property
    def included(self) -> bool:
        return self.score is not None and self.weight > 0

    @property
    def points_lost(self) -> float:
        """Weighted shortfall from 100, to rank what pulls the score down."""
        return 0.0 if self.score is None else self.weight * (100.0 - self.score)


@dataclass(frozen=True, slots=True)
class HealthScore:
    score: float | None
    components: tuple[HealthComponent, ...]

    @property
    def reasons(self) -> list[str]:
        """What pulls the score down, worst first, then what was left out."""
        hurting = [c for c in self.components if c.included and c.points_lost > 0]
        hurting.sort(key=lambda c: c.points_lost, reverse=True)
        excluded = [c for c in self.components if c.score is None]
        return [f"{c.name}: {c.reason}" for c in [*hurting, *excluded]]


def health_score(inputs: HealthInputs, policy: HealthPolicy | None = None) -> HealthScore:
    """Score a device's health from its inputs; see the module docstring for the rules."""
    policy = policy or HealthPolicy()
    weights = policy.weights
    components = (
        availability_component(inputs.availability, weights.availability),
        freshness_component(inputs, weights.freshness, policy),
        data_quality_component(inputs.data_quality, weights.data_quality),
        failures_component(inputs.commands, inputs.health_checks, weights.failures),
    )
    return HealthScore(_weighted_mean(components), components)


def _weighted_mean(components: tuple[HealthComponent, ...]) -> float | None:
    included = [(c.score, c.weight) for c in components if c.included and c.score is not None]
    total_weight = sum(weight for _, weight in included)
    if total_weight <= 0:
        return None
    return round(sum(score * weight for score, weight in included) / total_weight, 1)


def availability_component(availability: Availability | None, weight: float) -> HealthComponent:
    name = "availability"
    if availability is None:
        return HealthComponent(name, None, weight, "excluded: availability not computed")
    window = format_duration(availability.window)
    percent = availability.percent
    if percent is None:
        reason = f"excluded: no online or offline time in the last {window}"
        return HealthComponent(name, None, weight, reason)
    reason = f"{percent:.1f}% online over the last {window}"
    if availability.maintenance > timedelta(0):
        reason += f" ({format_duration(availability.maintenance)} of maintenance not counted)"
    return HealthComponent(name, percent, weight, reason)


def freshness_component(
    inputs: HealthInputs, weight: float, policy: HealthPolicy
) -> HealthComponent:
    name = "freshness"
    interval = inputs.expected_interval
    if interval is None or interval <= timedelta(0):
        return HealthComponent(name, None, weight, "excluded: expected reporting interval unknown")
    if inputs.last_seen is None:
        return HealthComponent(name, None, weight, "excluded: never seen")
    silence = max(inputs.now - inputs.last_seen, timedelta(0))
    score = _freshness_score(silence / interval, policy)
    expected = f"expected every {format_duration(interval)}"
    if score == 100.0:
        reason = f"last seen {format_duration(silence)} ago, {expected}"
    else:
        reason = f"no data for {format_duration(silence)}, {expected}"
    return HealthComponent(name, score, weight, reason)


def _freshness_score(intervals_silent: float, policy: HealthPolicy) -> float:
    if intervals_silent <= policy.fresh_within:
        return 100.0
    if intervals_silent >= policy.stale_after:
        return 0.0
    span = policy.stale_after - policy.fresh_within
    return 100.0 * (policy.stale_after - intervals_silent) / span


def data_quality_component(quality: DataQuality | None, weight: float) -> HealthComponent:
    name = "data_quality"
    if quality is None or quality.points == 0:
        return HealthComponent(name, None, weight, "excluded: no recent telemetry")
    reason = f"mean quality {quality.mean:.2f} over {quality.points} recent points"
    return HealthComponent(name, 100.0 * quality.mean, weight, reason)


def failures_component(
    commands: Attempts, health_checks: Attempts, weight: float
) -> HealthComponent:
    name = "failures"
    total = commands.total + health_checks.total
    if total == 0:
        return HealthComponent(name, None, weight, "excluded: no recent commands or health checks")
    failed = commands.failed + health_checks.failed
    kinds = (("commands", commands), ("health checks", health_checks))
    reason = ", ".join(f"{a.failed} of {a.total} {kind} failed" for kind, a in kinds if a.total)
    return HealthComponent(name, 100.0 * (total - failed) / total, weight, reason)


def format_duration(duration: timedelta) -> str:
    """A short human duration: 3m12s, 30s, 1h, 2d3h. Whole seconds; under 1 s in ms."""
    if duration < timedelta(0):
        return "-" + format_duration(-duration)
    if duration < timedelta(seconds=1):
        milliseconds = duration // timedelta(milliseconds=1)
        return f"{milliseconds}ms" if milliseconds else "0s"
    seconds = duration // timedelta(seconds=1)
    parts = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _require_count(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
