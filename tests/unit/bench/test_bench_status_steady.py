"""The status bench's steady fleet: spread report times, silent devices, its figures."""

from __future__ import annotations

from collections import Counter

import pytest

from fleetmesh.bench import status
from fleetmesh.bench.report import BenchReport

pytestmark = pytest.mark.unit

DEVICES = [f"d-{i:03d}" for i in range(200)]
PERIOD_S = 4.0


def _sent_until(plan: status.SteadyPlan, end_s: float, tick_s: float = 0.05) -> list[str]:
    """What the bench sends ticking through the plan, as `_report_steadily` does."""
    sent: list[str] = []
    elapsed = -1.0
    steps = int(end_s / tick_s)
    for step in range(steps + 1):
        now = step * tick_s
        sent += plan.due(elapsed, now)
        elapsed = now
    return sent


def test_each_reporting_device_reports_once_per_period_at_a_spread_phase() -> None:
    plan = status.steady_plan(DEVICES, PERIOD_S)
    counts = Counter(_sent_until(plan, 3 * PERIOD_S))
    reporting = [d for d in DEVICES if d not in plan.silent_at]
    assert {counts[d] for d in reporting} == {3}
    offsets = [offset for offset, _ in plan.offsets]
    assert min(offsets) < PERIOD_S / 4 and max(offsets) > 3 * PERIOD_S / 4  # spread


def test_a_silent_device_reports_first_then_stops_at_its_time() -> None:
    plan = status.steady_plan(DEVICES, PERIOD_S)
    assert len(plan.silent_at) == round(len(DEVICES) * status.SILENT_SHARE)
    offset_of = {device_id: offset for offset, device_id in plan.offsets}
    counts = Counter(_sent_until(plan, plan.end_s))
    for device_id, silent_at in plan.silent_at.items():
        assert PERIOD_S <= silent_at < 2 * PERIOD_S
        expected = 1 + (offset_of[device_id] + PERIOD_S < silent_at)
        assert counts[device_id] == expected
    assert plan.end_s >= 2 * PERIOD_S + 2 * PERIOD_S  # the last silent deadline has passed


def test_the_plan_is_the_same_for_the_same_fleet() -> None:
    assert status.steady_plan(DEVICES, PERIOD_S) == status.steady_plan(DEVICES, PERIOD_S)


def test_the_steady_figures_sit_beside_the_worst_case() -> None:
    fleet = status.Fleet(
        size=200,
        offline=status.Offline(committed=[0.1] * 200),
        steady=status.Steady(
            period_s=PERIOD_S,
            timeout_s=2 * PERIOD_S,
            silent=20,
            offline=status.Offline(committed=[i / 100 for i in range(1, 21)], missing=1),
            false_offline=2,
            reports=600,
        ),
    )
    report = BenchReport(status.NAME)
    status.fill(report, fleet, status.Storage("SQLite executemany rows/s (indexed)", 1.0))
    results = {r.name: r for r in report.results}
    label = "steady fleet, 200 devices"
    worst = results[f"offline-detection delay max beyond the timeout, {label}"]
    assert worst.value == pytest.approx(200.0) and worst.limit_value == 1000.0
    assert results[f"offline-detection delay p50 beyond the timeout, {label}"].value == (
        pytest.approx(100.0, abs=10.0)
    )
    assert results[f"offline transitions missing, {label}"].value == 1.0
    assert results[f"offline transitions of devices still reporting, {label}"].value == 2.0
    assert results[f"offline timeout used, {label}"].value == 2 * PERIOD_S
    assert "offline-detection delay max beyond the timeout, 200 devices" in results
    report.to_json()
