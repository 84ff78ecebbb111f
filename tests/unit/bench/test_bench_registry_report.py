"""How the registry bench turns its measurements into results (no platform started)."""

from __future__ import annotations

import pytest

from fleetmesh.bench import BENCHES, registry
from fleetmesh.bench.platform import percentile
from fleetmesh.bench.report import BenchOptions, BenchReport

pytestmark = pytest.mark.unit


def _measured(postgres_copy: float | None = None) -> BenchReport:
    load = registry._Load(
        startup_s=2.0,
        idle_rss=(200 * registry.MIB, 20 * registry.MIB),
        loaded_rss=(230 * registry.MIB, 22 * registry.MIB),
        sequential=50.0,
        sequential_latencies=tuple(i / 1000 for i in range(1, 101)),
        concurrent=80.0,
        bulk=400.0,
        registered=11_500,
        expected_events=11_501,
        published=11_501.0,
    )
    ceilings = registry._Limits(
        argon2=800.0,
        sqlite_plain=900_000.0,
        sqlite_indexed=600_000.0,
        postgres_copy=postgres_copy,
    )
    report = BenchReport("registry")
    registry._fill(report, load, ceilings, BenchOptions())
    return report


def test_each_registration_figure_is_set_against_argon2_and_storage() -> None:
    results = {r.name: r for r in _measured().results}
    bulk = results["bulk registrations, 1,000 per call"]
    assert bulk.limit_name == "argon2 hashes/s, 2 threads"
    assert bulk.ratio == pytest.approx(0.5)
    storage = results["bulk registrations, 1,000 per call (vs storage)"]
    assert storage.limit_name == "SQLite executemany rows/s (indexed)"
    assert storage.ratio == pytest.approx(400 / 600_000)
    assert results["single registrations, 16 in flight"].ratio == pytest.approx(0.1)
    assert results["events published during the load"].ratio == pytest.approx(1.0)
    assert results["idle RSS, platform + nats-server"].value == pytest.approx(220.0)
    assert results["single registration latency p50"].value == pytest.approx(51.0, abs=1.0)
    assert results["single registration latency p99"].value == pytest.approx(99.0, abs=1.0)
    assert "PostgreSQL COPY rows/s" not in results


def test_on_postgres_the_storage_limit_is_copy() -> None:
    results = {r.name: r for r in _measured(postgres_copy=200_000.0).results}
    storage = results["single registrations, sequential (vs storage)"]
    assert storage.limit_name == "PostgreSQL COPY rows/s"
    assert storage.ratio == pytest.approx(50 / 200_000)
    assert results["PostgreSQL COPY rows/s"].value == 200_000.0


def test_the_outbox_counter_is_read_from_the_metrics_exposition() -> None:
    exposition = (
        "# HELP fleetmesh_outbox_published_total Domain events published\n"
        "fleetmesh_outbox_published_total 1234.0\n"
        "fleetmesh_outbox_published_created 1.7e9\n"
    )
    assert registry._metric(exposition, "fleetmesh_outbox_published_total") == 1234.0
    assert registry._metric("", "fleetmesh_outbox_published_total") == 0.0


def test_percentiles_of_sorted_latencies() -> None:
    ordered = [float(i) for i in range(1, 11)]
    assert percentile(ordered, 0.0) == 1.0
    assert percentile(ordered, 1.0) == 10.0
    assert percentile([], 0.5) == 0.0


def test_the_registry_bench_is_registered() -> None:
    assert BENCHES["registry"] is registry.run


def test_the_better_of_two_limit_measurements_is_kept() -> None:
    before = registry._Limits(argon2=300.0, sqlite_plain=9.0, sqlite_indexed=5.0)
    after = registry._Limits(
        argon2=600.0, sqlite_plain=8.0, sqlite_indexed=6.0, postgres_copy=7.0, postgres_version="15"
    )
    best = before.best(after)
    assert (best.argon2, best.sqlite_plain, best.sqlite_indexed) == (600.0, 9.0, 6.0)
    assert best.postgres_copy == 7.0 and best.postgres_version == "15"
    assert before.best(before).postgres_copy is None
