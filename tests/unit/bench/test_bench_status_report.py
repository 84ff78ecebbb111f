"""How the status bench reads offline transitions and turns them into results (no platform)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from fleetmesh.bench import BENCHES, status
from fleetmesh.bench.platform import BenchError
from fleetmesh.bench.report import BenchReport
from fleetmesh.core.clock import to_rfc3339
from fleetmesh.status.service import FlushResult

pytestmark = pytest.mark.unit

DEADLINE = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def _row(
    device_id: str,
    current: str,
    *,
    committed_after_s: float,
    published_after_s: float | None = None,
) -> tuple[datetime, datetime | None, bytes]:
    event = {
        "type": "fleetmesh.device.status_changed.v1",
        "subject": device_id,
        "data": {
            "device_id": device_id,
            "previous": "online" if current == "offline" else "registered",
            "current": current,
            "cause": "timeout" if current == "offline" else "telemetry",
            "at": to_rfc3339(DEADLINE),
            "sequence": 2 if current == "offline" else 1,
        },
    }
    published = (
        None if published_after_s is None else DEADLINE + timedelta(seconds=published_after_s)
    )
    return DEADLINE + timedelta(seconds=committed_after_s), published, json.dumps(event).encode()


def test_the_delay_is_from_the_deadline_to_the_commit_and_to_the_publication() -> None:
    rows = [
        _row("a", "offline", committed_after_s=0.3, published_after_s=0.9),
        _row("b", "offline", committed_after_s=0.1, published_after_s=0.5),
    ]
    outcome = status.offline_outcome(rows, {"a", "b"})
    assert outcome.committed == pytest.approx([0.1, 0.3])
    assert outcome.published == pytest.approx([0.5, 0.9])
    assert (outcome.missing, outcome.repeated, outcome.unpublished) == (0, 0, 0)


def test_the_densest_second_of_deadlines_and_the_commit_rate_are_measured() -> None:
    rows = [_row(device, "offline", committed_after_s=0.5) for device in "abc"]
    later = _row("d", "offline", committed_after_s=0.5)
    event = json.loads(later[2])
    event["data"]["at"] = to_rfc3339(DEADLINE + timedelta(seconds=3))
    rows.append((DEADLINE + timedelta(seconds=3.5), None, json.dumps(event).encode()))

    outcome = status.offline_outcome(rows, set("abcd"))

    assert outcome.peak_due == 3  # a, b and c at the deadline; d three seconds later
    assert outcome.committed_per_s == pytest.approx(4 / 3.5)


def test_online_transitions_and_other_runs_devices_are_left_out() -> None:
    rows = [
        _row("a", "online", committed_after_s=5.0, published_after_s=5.0),
        _row("someone-else", "offline", committed_after_s=9.0, published_after_s=9.0),
        _row("a", "offline", committed_after_s=0.2, published_after_s=0.4),
    ]
    outcome = status.offline_outcome(rows, {"a"})
    assert outcome.committed == pytest.approx([0.2])
    assert outcome.published == pytest.approx([0.4])


def test_missing_repeated_and_unpublished_transitions_are_counted() -> None:
    rows = [
        _row("a", "offline", committed_after_s=0.2, published_after_s=0.4),
        _row("a", "offline", committed_after_s=0.7, published_after_s=0.8),
        _row("b", "offline", committed_after_s=0.1),
    ]
    outcome = status.offline_outcome(rows, {"a", "b", "c", "d"})
    assert (outcome.missing, outcome.repeated, outcome.unpublished) == (2, 1, 1)
    assert len(outcome.committed) == 3 and len(outcome.published) == 2


def test_the_silent_timeout_puts_the_earliest_deadline_a_margin_after_now() -> None:
    first = DEADLINE
    now = first + timedelta(seconds=12.3)
    timeout = status.silent_timeout(first, now, margin_s=5.0)
    assert timeout == 18.0
    assert first + timedelta(seconds=timeout) >= now + timedelta(seconds=5.0)


def test_the_better_storage_measurement_is_kept() -> None:
    before = status.Storage("PostgreSQL COPY rows/s", 100.0, "17.2")
    after = status.Storage("PostgreSQL COPY rows/s", 300.0)
    assert before.best(after) == status.Storage("PostgreSQL COPY rows/s", 300.0, "17.2")


def test_results_set_delays_against_the_tolerance_and_updates_against_storage() -> None:
    fleet = status.Fleet(
        size=10_000,
        updates_per_s=5_000.0,
        repeat_updates_per_s=25_000.0,
        stored_latencies=[i / 100 for i in range(1, 101)],
        timeout_s=12.0,
        rearm_s=0.25,
        offline=status.Offline(
            committed=[i / 1000 for i in range(1, 1001)],
            published=[1.5, 2.5],
            missing=1,
            repeated=2,
            unpublished=3,
        ),
    )
    report = BenchReport(status.NAME)
    status.fill(report, fleet, status.Storage("SQLite executemany rows/s (indexed)", 500_000.0))
    results = {r.name: r for r in report.results}
    worst = results["offline-detection delay max beyond the timeout, 10,000 devices"]
    assert worst.value == pytest.approx(1000.0)
    assert worst.unit == "ms" and worst.limit_value == 1000.0 and worst.ratio == pytest.approx(1.0)
    median = results["offline-detection delay p50 beyond the timeout, 10,000 devices"]
    assert median.value == pytest.approx(500.0, abs=1.0)
    published = results["offline event published, delay max beyond the timeout, 10,000 devices"]
    assert published.value == pytest.approx(2500.0)
    updates = results["status updates/s processed (report in -> stored), 10,000 devices"]
    assert updates.limit_name == "SQLite executemany rows/s (indexed)"
    assert updates.ratio == pytest.approx(0.01)
    again = "status updates/s processed, devices already online (report moves last_seen)"
    assert results[f"{again}, 10,000 devices"].ratio == pytest.approx(0.05)
    assert results["report -> stored latency p99, 10,000 devices"].value == pytest.approx(990.0)
    assert results["offline timeout used, 10,000 devices"].value == 12.0
    assert results["deadlines re-armed from the store, 10,000 devices"].value == 250.0
    assert results["offline transitions missing, 10,000 devices"].value == 1.0
    assert results["offline transitions repeated, 10,000 devices"].value == 2.0
    unpublished = "offline events unpublished 60 s after the last offline, 10,000 devices"
    assert results[unpublished].value == 3.0
    report.to_json()  # every figure is finite


def test_no_publication_delay_is_claimed_when_nothing_was_published() -> None:
    fleet = status.Fleet(
        size=100,
        offline=status.Offline(committed=[0.1] * 100, unpublished=100),
    )
    report = BenchReport(status.NAME)
    status.fill(report, fleet, status.Storage("SQLite executemany rows/s (indexed)", 1.0))
    names = [r.name for r in report.results]
    assert not [n for n in names if n.startswith("offline event published")]
    assert "offline events unpublished 60 s after the last offline, 100 devices" in names


def test_reports_the_status_context_did_not_store_fail_the_bench() -> None:
    status._check_stored([FlushResult(), FlushResult(changes=3)])
    with pytest.raises(BenchError, match="1 unknown devices, 2 failed"):
        status._check_stored(
            [FlushResult(unknown=frozenset({"x"})), FlushResult(failed=frozenset({"y", "z"}))]
        )


def test_the_bench_is_registered() -> None:
    assert BENCHES[status.NAME] is status.run
