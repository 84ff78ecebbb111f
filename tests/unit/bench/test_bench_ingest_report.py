"""How the ingest bench turns its measurements into results (no platform started)."""

from __future__ import annotations

import pytest

from fleetmesh.bench import BENCHES, events, ingest
from fleetmesh.bench.ingest import PIPE_LIMIT, Ceilings, Sizes, StoreRun, fill
from fleetmesh.bench.ingest_load import Throughput
from fleetmesh.bench.report import BenchOptions, BenchReport, Result

pytestmark = pytest.mark.unit

SIZES = Sizes.of(BenchOptions())


def _run(store: str, rate: float) -> StoreRun:
    return StoreRun(
        store,
        http=Throughput(sent=80_000, accepted=80_000, stored=80_000, accepted_s=1.0, stored_s=2.0),
        latencies=[i / 1000 for i in range(1, 101)],
        mqtt=Throughput(sent=1000, accepted=1000, stored=998, accepted_s=0.5, stored_s=1000 / rate),
        pipe=2000.0,
    )


def _results(
    runs: list[StoreRun], ceilings: Ceilings, skipped: str | None = None
) -> dict[str, Result]:
    report = BenchReport("ingest")
    fill(report, runs, ceilings, SIZES, skipped=skipped)
    names = [result.name for result in report.results]
    assert len(names) == len(set(names)), "result names are unique"
    return {result.name: result for result in report.results}


def test_each_store_is_set_against_its_raw_driver_and_mqtt_against_the_pipe() -> None:
    ceilings = Ceilings(sqlite=200_000.0, postgres=400_000.0, pipe=2000.0)
    results = _results([_run("SQLite", 1000.0), _run("PostgreSQL", 3000.0)], ceilings)

    sqlite = results["HTTP batch ingest, SQLite, 8 devices: points/s accepted -> stored"]
    assert sqlite.value == pytest.approx(40_000.0)
    assert sqlite.limit_name == (
        "raw SQLite executemany into telemetry_points rows/s (target ratio >= 0.6)"
    )
    assert sqlite.ratio == pytest.approx(0.2)
    postgres = results["HTTP batch ingest, PostgreSQL, 8 devices: points/s accepted -> stored"]
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
    assert (
        results["HTTP batch ingest, SQLite, 8 devices: points lost (accepted - stored)"].value == 0
    )
    assert results["HTTP ?wait=stored latency, SQLite, one sample, p50"].value == pytest.approx(
        51.0, abs=1.0
    )
    assert results["raw PostgreSQL COPY into telemetry_points rows/s"].value == 400_000.0
    assert results[PIPE_LIMIT].value == 2000.0


def test_without_postgresql_its_rows_say_why_they_were_skipped() -> None:
    results = _results(
        [_run("SQLite", 1000.0)], Ceilings(sqlite=200_000.0, pipe=2000.0), "unreachable"
    )
    skipped = results["PostgreSQL: skipped (unreachable)"]
    assert skipped.unit == "skipped" and skipped.limit_value is None
    assert not [name for name in results if name.startswith("HTTP batch ingest, PostgreSQL")]
    assert "raw PostgreSQL COPY into telemetry_points rows/s" not in results


def test_the_better_of_two_limit_measurements_is_kept() -> None:
    best = Ceilings(sqlite=1.0, postgres=None, pipe=5.0).best(
        Ceilings(sqlite=3.0, postgres=7.0, pipe=2.0)
    )
    assert (best.sqlite, best.postgres, best.pipe) == (3.0, 7.0, 5.0)
    assert Ceilings().best(Ceilings()).postgres is None


def test_quick_sizes_are_small() -> None:
    full, quick = Sizes.of(BenchOptions()), Sizes.of(BenchOptions(quick=True))
    assert quick.http_batches < full.http_batches
    assert quick.mqtt_devices * quick.mqtt_messages < full.mqtt_devices * full.mqtt_messages


def test_the_ingest_bench_is_registered_before_events() -> None:
    assert BENCHES["ingest"] is ingest.run
    names = list(BENCHES)
    assert names.index("ingest") < names.index(events.NAME)
