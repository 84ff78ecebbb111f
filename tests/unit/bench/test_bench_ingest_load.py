"""The ingest bench's load shapes and counting helpers (no platform started)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fleetmesh.bench.ingest_limits import commits
from fleetmesh.bench.ingest_load import (
    POINTS_PER_BATCH,
    POLL_MAX_S,
    POLL_MIN_S,
    SAMPLES_PER_BATCH,
    Throughput,
    batch_items,
    batch_rows,
    limit_rows,
    metric_value,
    next_poll_s,
    on_perf_counter,
    one_point,
    option_value,
)
from fleetmesh.bench.platform import BenchError
from fleetmesh.telemetry.simulator import DEVICE_TYPE_BODY
from fleetmesh.telemetry.tables import POINT_COLUMNS

pytestmark = pytest.mark.unit

START_MS = 1_800_000_000_000


def test_a_batch_is_a_thousand_points_of_the_simulated_sensor_within_its_ranges() -> None:
    items = batch_items(START_MS, 500, SAMPLES_PER_BATCH)
    schema = DEVICE_TYPE_BODY["telemetry_schema"]
    assert POINTS_PER_BATCH == 1000
    assert [item["ts"] for item in items] == list(range(START_MS + 500, START_MS + 750))
    for item in items:
        assert set(item["values"]) == set(schema)
        for metric, value in item["values"].items():
            assert schema[metric]["min"] <= value <= schema[metric]["max"], (metric, value)
        assert isinstance(item["values"]["fault"], int)


def test_a_batch_becomes_the_rows_the_writer_stores() -> None:
    items = batch_items(START_MS, 0, 3)
    rows = batch_rows("dev-1", "msg-1", items)
    assert len(rows) == 12
    assert all(len(row) == len(POINT_COLUMNS) for row in rows)
    first = dict(zip(POINT_COLUMNS, rows[0], strict=True))
    assert first == {
        "device_id": "dev-1",
        "metric": "temperature",
        "ts": START_MS,
        "value_num": 20.0,
        "value_text": None,
        "value_bool": None,
        "quality": 1.0,
        "message_id": "msg-1",
    }
    faults = [row for row in rows if row[1] == "fault"]
    assert [row[3] for row in faults] == [0.0, 0.0, 0.0]


def test_the_limit_rows_are_the_http_load_in_arrival_order() -> None:
    rows = limit_rows(["a", "b"], 3, START_MS)
    assert len(rows) == 2 * 3 * POINTS_PER_BATCH
    batches = [rows[i : i + POINTS_PER_BATCH] for i in range(0, len(rows), POINTS_PER_BATCH)]
    assert [batch[0][0] for batch in batches] == ["a", "b", "a", "b", "a", "b"]
    message_ids = {batch[0][7] for batch in batches}
    assert len(message_ids) == 6, "one message id per batch"
    assert all(len({row[7] for row in batch}) == 1 for batch in batches)
    per_series = Counter((row[0], row[1], row[2]) for row in rows)
    assert set(per_series.values()) == {1}, "no two points of a series share a timestamp"


def test_an_mqtt_message_is_one_point() -> None:
    assert json.loads(one_point(7, START_MS)) == {
        "metric": "temperature",
        "value": 27.0,
        "ts": START_MS + 7,
    }


def test_the_stored_counter_is_read_from_the_metrics_exposition() -> None:
    exposition = (
        "# TYPE fleetmesh_telemetry_points_stored_total counter\n"
        'fleetmesh_telemetry_points_accepted_total{source="http"} 5.0\n'
        "fleetmesh_telemetry_points_stored_total 1234.0\n"
        "fleetmesh_telemetry_points_stored_created 1.7e9\n"
    )
    assert metric_value(exposition, "fleetmesh_telemetry_points_stored_total") == 1234.0
    assert metric_value("", "fleetmesh_telemetry_points_stored_total") == 0.0


def test_the_last_commit_is_placed_on_the_perf_counter_scale() -> None:
    assert on_perf_counter(1_000.0, perf_now=50.0, unix_now=1_002.5) == 47.5
    assert on_perf_counter(1_003.0, perf_now=50.0, unix_now=1_002.5) == 50.0


def test_a_port_is_read_from_the_platform_command_line() -> None:
    command = ["python", "-m", "fleetmesh.cli", "up", "--mqtt-port", 1884, "--log-level", "INFO"]
    assert option_value(command, "--mqtt-port") == "1884"
    with pytest.raises(BenchError):
        option_value(command, "--nats-port")
    with pytest.raises(BenchError):
        option_value(["up", "--mqtt-port"], "--mqtt-port")


def test_the_counter_is_looked_at_often_only_near_the_end() -> None:
    assert next_poll_s(10_000, None) == POLL_MIN_S
    assert next_poll_s(10_000, 0.0) == POLL_MAX_S
    assert next_poll_s(100_000, 1_000.0) == POLL_MAX_S
    assert next_poll_s(2_000, 10_000.0) == pytest.approx(0.05)
    assert next_poll_s(4_000, 10_000.0) == pytest.approx(0.1)
    assert next_poll_s(10, 10_000.0) == POLL_MIN_S


def test_throughput_counts_stored_against_accepted() -> None:
    run = Throughput(
        sent=1000,
        accepted=900,
        stored=890,
        accepted_s=2.0,
        stored_s=3.0,
        platform_cpu_s=1.8,
        server_cpu_s=0.9,
        client_cpu_s=0.45,
    )
    assert run.rate == pytest.approx(300.0)
    assert run.accepted_rate == pytest.approx(450.0)
    assert (run.lost, run.duplicated) == (10, 0)
    assert run.cpu_ms_per(1) == pytest.approx((2.0, 1.0, 0.5))
    twice = Throughput(accepted=5, stored=7)
    assert (twice.lost, twice.duplicated) == (0, 2)
    assert Throughput().rate == 0.0 and Throughput().cpu_ms_per(1000) == (0.0, 0.0, 0.0)


def test_the_raw_limit_commits_in_chunks() -> None:
    rows = limit_rows(["a"], 3, START_MS)
    chunks = commits(rows, 1200)
    assert [len(chunk) for chunk in chunks] == [1200, 1200, 600]
    assert [row for chunk in chunks for row in chunk] == rows
