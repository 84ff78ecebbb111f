"""The simulated sensor's values, anomaly records and the credentials file."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from fleetmesh.telemetry.simulator import (
    DEVICE_TYPE_BODY,
    CredentialsFile,
    SensorModel,
    _report_counts,
)

pytestmark = pytest.mark.unit

HOUR_MS = 3_600_000
MIDNIGHT_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def _model(seed: int = 1, **options: object) -> SensorModel:
    model = SensorModel("sim-0000", random.Random(seed), start_ms=MIDNIGHT_MS, **options)  # type: ignore[arg-type]
    model.phase_s = 0.0
    model.fault_probability = 0.0
    return model


def test_temperature_follows_a_daily_cycle_warmest_in_the_afternoon() -> None:
    model = _model()
    by_hour = {hour: [] for hour in (3, 15)}  # type: dict[int, list[float]]
    for day in range(3):
        for hour in (3, 15):
            start = MIDNIGHT_MS + day * 24 * HOUR_MS + hour * HOUR_MS
            for minute in range(30):
                by_hour[hour].append(float(model.sample(start + minute * 60_000)["temperature"]))
    assert statistics.mean(by_hour[15]) - statistics.mean(by_hour[3]) > 4.0


def test_values_stay_within_the_device_type_schema() -> None:
    schema = DEVICE_TYPE_BODY["telemetry_schema"]
    model = _model(seed=7, anomalies=True, horizon_s=3600)
    model.fault_probability = 0.01
    for step in range(20_000):
        for metric, value in model.sample(MIDNIGHT_MS + step * 1000).items():
            assert metric in schema
            assert schema[metric].get("min", value) <= value <= schema[metric].get("max", value)


def test_the_battery_drains_slowly() -> None:
    model = _model()
    first = model.sample(MIDNIGHT_MS)["battery"]
    later = model.sample(MIDNIGHT_MS + 2 * HOUR_MS)["battery"]
    assert 0.5 <= first - later <= 3.5


def test_faults_report_a_code_and_drop_the_sensor_readings() -> None:
    model = _model()
    model.fault_probability = 1.0
    values = model.sample(MIDNIGHT_MS)
    assert values["fault"] != 0
    assert "temperature" not in values and "humidity" not in values
    model.fault_probability = 0.0
    model.fault_left = 0
    assert model.sample(MIDNIGHT_MS + 1000)["fault"] == 0


def test_injected_anomalies_are_recorded_where_the_values_show_them() -> None:
    model = _model(seed=3, anomalies=True, horizon_s=600)
    quiet = _model(seed=3, anomalies=False, horizon_s=600)
    shifted: list[int] = []
    for step in range(1200):
        ts = MIDNIGHT_MS + step * 1000
        with_anomaly = float(model.sample(ts)["temperature"])
        without = float(quiet.sample(ts)["temperature"])
        if abs(with_anomaly - without) > 3:
            shifted.append(ts)
    assert model.anomalies, "no anomaly in 20 minutes of a 10-minute horizon"
    for ts in shifted:
        assert any(a.start_ms <= ts <= a.end_ms for a in model.anomalies)
    for anomaly in model.anomalies:
        assert anomaly.kind in ("spike", "level_shift")
        assert anomaly.start_ms in shifted


def test_no_anomalies_unless_asked() -> None:
    model = _model(seed=3, anomalies=False, horizon_s=60)
    for step in range(600):
        model.sample(MIDNIGHT_MS + step * 1000)
    assert model.anomalies == []


def test_the_credentials_file_is_private_and_belongs_to_one_api(tmp_path: Path) -> None:
    path = tmp_path / "simulator-credentials.json"
    CredentialsFile(path, "http://127.0.0.1:8080/").save({"sim-0000": "s3cret"})
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert CredentialsFile(path, "http://127.0.0.1:8080").load() == {"sim-0000": "s3cret"}
    assert CredentialsFile(path, "http://other:8080").load() == {}
    assert CredentialsFile(tmp_path / "absent.json", "http://x").load() == {}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"accepted": 7, "rejected": [{"index": 1}]}, (7, 1)),
        ({"accepted": [1, 2], "rejected": []}, (2, 0)),
        ({"rejected": 2}, (8, 2)),
        ({}, (10, 0)),
    ],
)
def test_ingest_answers_are_counted_whatever_their_shape(
    body: dict[str, object], expected: tuple[int, int]
) -> None:
    assert _report_counts(json.dumps(body).encode(), 10) == expected
