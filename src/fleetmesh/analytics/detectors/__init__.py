"""Streaming anomaly detectors and their registry."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fleetmesh.analytics.detectors.base import Detector
from fleetmesh.analytics.detectors.ewma import Ewma
from fleetmesh.analytics.detectors.fleetmesh_novelty import FleetmeshNovelty
from fleetmesh.analytics.detectors.isolation_forest import IsolationForestDetector
from fleetmesh.analytics.detectors.windowed_gaussian import WindowedGaussian

DETECTORS: dict[str, type[Detector]] = {
    detector.name: detector
    for detector in (WindowedGaussian, Ewma, IsolationForestDetector, FleetmeshNovelty)
}
ALIASES: dict[str, str] = {"best": FleetmeshNovelty.name}


def canonical_name(name: str) -> str:
    resolved = ALIASES.get(name, name)
    if resolved not in DETECTORS:
        known = ", ".join(sorted([*DETECTORS, *ALIASES, "all"]))
        raise KeyError(f"unknown detector {name!r}; known: {known}")
    return resolved


def resolve_detector_names(names: Iterable[str]) -> list[str]:
    """Expand "all" and aliases into unique registry names, keeping first-seen order."""
    resolved: list[str] = []
    for name in names:
        for candidate in DETECTORS if name == "all" else [canonical_name(name)]:
            if candidate not in resolved:
                resolved.append(candidate)
    return resolved


def create_detector(name: str, **params: Any) -> Detector:
    return DETECTORS[canonical_name(name)](**params)


def detector_from_state(state: dict[str, Any]) -> Detector:
    return DETECTORS[canonical_name(str(state["name"]))].from_state(state)


__all__ = [
    "ALIASES",
    "DETECTORS",
    "Detector",
    "canonical_name",
    "create_detector",
    "detector_from_state",
    "resolve_detector_names",
]
