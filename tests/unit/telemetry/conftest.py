"""Shared fixtures of the telemetry domain tests."""

from __future__ import annotations

import pytest

from fleetmesh.telemetry.domain import TelemetrySchema, ValidationPolicy

NOW_MS = 1_760_000_000_000


@pytest.fixture
def schema() -> TelemetrySchema:
    return TelemetrySchema.from_dict(
        {
            "temp": {"type": "number", "unit": "degC", "min": -40, "max": 85},
            "hum": {"type": "number", "unit": "percent", "min": 0, "max": 100},
            "count": {"type": "integer", "min": 0, "max": 1000},
            "door": {"type": "boolean"},
            "mode": {"type": "string"},
            "voltage": {"type": "number", "unit": "V"},
            "current": {"type": "number", "unit": "A"},
            "power": {"type": "number", "unit": "W", "min": 0},
        }
    )


@pytest.fixture
def policy() -> ValidationPolicy:
    return ValidationPolicy()
