"""How the events bench turns its measurements into results (no platform started)."""

from __future__ import annotations

import gc

import pytest

from fleetmesh.bench import events
from fleetmesh.bench.report import BenchReport, Result

pytestmark = pytest.mark.unit


def _results(figures: events.Figures) -> dict[str, Result]:
    report = BenchReport(events.NAME)
    events._fill(report, figures, raw_js=12_000.0, raw_http=1_500.0)
    names = [result.name for result in report.results]
    assert len(names) == len(set(names)), "result names are unique"
    return {result.name: result for result in report.results}


def test_each_fixed_rate_reports_latency_against_the_target_and_the_platform_cpu() -> None:
    figures = events.Figures(
        fixed={100: (100.0, 100.0, 1.5, 3.0), 500: (498.0, 500.0, 1.0, 4.0)},
        fixed_cpu={100: 20.0, 500: 48.0},
        batched=(9_000.0, 50.0, 90.0),
    )

    results = _results(figures)

    assert results["latency p99 at 500/s"].value == 4.0
    assert results["latency p99 at 500/s"].limit_value == events.TARGET_P99_MS
    assert results["platform process CPU at 100/s"].value == 20.0
    assert results["platform process CPU at 500/s"].value == 48.0
    assert results["delivered at 500/s offered (single events)"].limit_value == 500.0
    batched = results[f"delivered at saturation, batches of {events.BATCH} (vs target)"]
    assert batched.value == 9_000.0 and batched.limit_value == events.TARGET_RATE


async def test_the_bench_heap_is_frozen_only_while_measuring() -> None:
    gc.unfreeze()
    async with events._bench_heap_frozen():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
