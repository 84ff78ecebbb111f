"""How the ingest bench turns its measurements into results (no platform started)."""

from __future__ import annotations

import pytest

from fleetmesh.bench import BENCHES, events, ingest
from fleetmesh.bench.ingest import PIPE_LIMIT, HttpRound, Sizes, StoreRun, fill
from fleetmesh.bench.ingest_load import Throughput
from fleetmesh.bench.report import BenchOptions, BenchReport, Result

pytestmark = pytest.mark.unit

SIZES = Sizes.of(BenchOptions())
SQLITE_HTTP = "HTTP batch ingest, SQLite, 8 devices"
POSTGRES_HTTP = "HTTP batch ingest, PostgreSQL, 8 devices"
MEDIAN = "points/s accepted -> stored (median of 3 rounds)"


def _load(stored_s: float, stored: int = 80_000) -> Throughput:
    return Throughput(
        sent=80_000, accepted=80_000, stored=stored, accepted_s=1.0, stored_s=stored_s
    )


def _run(store: str, rate: float, limit: float) -> StoreRun:
    """Three rounds at 40,000 points/s against `limit`, and MQTT at `rate` msgs/s."""
    return StoreRun(
        store,
        rounds=[HttpRound(_load(2.0), limit) for _ in range(3)],
        latencies=[i / 1000 for i in range(1, 101)],
        mqtt=Throughput(sent=1000, accepted=1000, stored=998, accepted_s=0.5, stored_s=1000 / rate),
        pipe=2000.0,
    )


def _results(runs: list[StoreRun], skipped: str | None = None) -> dict[str, Result]:
    report = BenchReport("ingest")
    fill(report, runs, SIZES, skipped=skipped)
    names = [result.name for result in report.results]
    assert len(names) == len(set(names)), "result names are unique"
    return {result.name: result for result in report.results}


def test_each_store_is_set_against_its_raw_driver_and_mqtt_against_the_pipe() -> None:
    results = _results([_run("SQLite", 1000.0, 200_000.0), _run("PostgreSQL", 3000.0, 400_000.0)])

    sqlite = results[f"{SQLITE_HTTP}: {MEDIAN}"]
    assert sqlite.value == pytest.approx(40_000.0)
    assert sqlite.limit_name == (
        "raw SQLite executemany into telemetry_points rows/s (target ratio >= 0.6)"
    )
    assert sqlite.ratio == pytest.approx(0.2)
    postgres = results[f"{POSTGRES_HTTP}: {MEDIAN}"]
    assert postgres.limit_name == (
        "raw PostgreSQL COPY into telemetry_points rows/s (target ratio >= 0.5)"
    )
    assert postgres.ratio == pytest.approx(0.1)

    mqtt = results[
        "MQTT QoS 1 one-point messages, PostgreSQL, 20 devices: msgs/s published -> stored"
    ]
    assert mqtt.limit_name == f"{PIPE_LIMIT} (target ratio >= 1)"
    assert mqtt.ratio == pytest.approx(1.5)
    lost = "MQTT QoS 1 one-point messages, SQLite, 20 devices: points lost (PUBACKed - stored)"
    assert results[lost].value == 2.0
    assert results[f"{SQLITE_HTTP}: points lost (accepted - stored), all rounds"].value == 0
    assert results["HTTP ?wait=stored latency, SQLite, one sample, p50"].value == pytest.approx(
        51.0, abs=1.0
    )
    copy = "raw PostgreSQL COPY into telemetry_points rows/s, before the median round"
    assert results[copy].value == 400_000.0
    assert results[PIPE_LIMIT].value == 2000.0


def test_the_round_of_the_median_ratio_is_reported_beside_the_lowest_and_highest() -> None:
    run = StoreRun(
        "SQLite",
        rounds=[
            HttpRound(_load(2.0), 100_000.0),  # 40,000 / 100,000 = 0.4
            HttpRound(_load(1.0), 100_000.0),  # 0.8
            HttpRound(_load(1.0, stored=79_990), 160_000.0),  # 0.5, 10 points lost
        ],
    )
    results = _results([run])

    median = results[f"{SQLITE_HTTP}: {MEDIAN}"]
    assert (median.value, median.limit_value) == (80_000.0, 160_000.0)
    assert median.ratio == pytest.approx(0.5)
    assert results[f"{SQLITE_HTTP}: ratio to raw, lowest round"].value == pytest.approx(0.4)
    assert results[f"{SQLITE_HTTP}: ratio to raw, highest round"].value == pytest.approx(0.8)
    assert results[f"{SQLITE_HTTP}: points lost (accepted - stored), all rounds"].value == 10
    limit = "raw SQLite executemany into telemetry_points rows/s, before the median round"
    assert results[limit].value == 160_000.0


def test_without_postgresql_its_rows_say_why_they_were_skipped() -> None:
    results = _results([_run("SQLite", 1000.0, 200_000.0)], "unreachable")
    skipped = results["PostgreSQL: skipped (unreachable)"]
    assert skipped.unit == "skipped" and skipped.limit_value is None
    assert not [name for name in results if name.startswith("HTTP batch ingest, PostgreSQL")]
    assert not [name for name in results if name.startswith("raw PostgreSQL COPY")]


def test_quick_sizes_are_small() -> None:
    full, quick = Sizes.of(BenchOptions()), Sizes.of(BenchOptions(quick=True))
    assert quick.http_batches < full.http_batches
    assert quick.http_rounds < full.http_rounds
    assert quick.mqtt_devices * quick.mqtt_messages < full.mqtt_devices * full.mqtt_messages


def test_the_ingest_bench_is_registered_before_events() -> None:
    assert BENCHES["ingest"] is ingest.run
    names = list(BENCHES)
    assert names.index("ingest") < names.index(events.NAME)
