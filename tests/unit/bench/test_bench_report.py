"""The benchmark report: ratios, the JSON shape runs are compared by, the table."""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from fleetmesh.bench.report import (
    BenchOptions,
    BenchReport,
    Result,
    combine,
    format_number,
    machine_info,
    ratio,
    render_table,
)

pytestmark = pytest.mark.unit

RESULT_KEYS = {"name", "value", "unit", "limit_name", "limit_value", "ratio"}


def test_ratio_is_the_value_over_its_limit() -> None:
    result = Result("bulk", 250.0, "registrations/s", "argon2 hashes/s", 1000.0)
    assert result.ratio == pytest.approx(0.25)


@pytest.mark.parametrize("limit", [None, 0.0, -3.0, math.inf, math.nan])
def test_there_is_no_ratio_without_a_usable_limit(limit: float | None) -> None:
    assert ratio(10.0, limit) is None
    assert Result("x", 10.0, "u", "limit", limit).ratio is None


def test_a_ratio_can_exceed_one() -> None:
    assert ratio(3.0, 2.0) == pytest.approx(1.5)


def test_json_has_the_documented_shape() -> None:
    report = BenchReport("registry", machine={"cpu_count": 2, "postgres": None})
    report.add("single", 40.0, "registrations/s", limit_name="argon2", limit_value=800.0)
    report.add("idle RSS", 210.5, "MiB")

    decoded = json.loads(report.to_json())

    assert set(decoded) == {"bench", "results", "machine"}
    assert decoded["bench"] == "registry"
    assert decoded["machine"] == {"cpu_count": 2, "postgres": None}
    assert [set(item) for item in decoded["results"]] == [RESULT_KEYS, RESULT_KEYS]
    first, second = decoded["results"]
    assert first == {
        "name": "single",
        "value": 40.0,
        "unit": "registrations/s",
        "limit_name": "argon2",
        "limit_value": 800.0,
        "ratio": pytest.approx(0.05),
    }
    assert second["limit_name"] is None and second["ratio"] is None


def test_json_refuses_a_non_finite_value() -> None:
    report = BenchReport("x")
    report.add("broken", math.inf, "1/s")
    with pytest.raises(ValueError):
        report.to_json()


def test_combine_prefixes_each_result_with_its_bench_and_merges_machines() -> None:
    first = BenchReport("registry", machine={"cpu_count": 2, "postgres": None})
    first.add("bulk", 100.0, "registrations/s", limit_name="argon2", limit_value=400.0)
    second = BenchReport("ingest", machine={"cpu_count": 2, "postgres": "16.4"})
    second.add("points", 5000.0, "points/s")

    combined = combine("all", [first, second])

    assert combined.bench == "all"
    assert [r.name for r in combined.results] == ["registry: bulk", "ingest: points"]
    assert combined.results[0].ratio == pytest.approx(0.25)
    assert combined.machine == {"cpu_count": 2, "postgres": "16.4"}


def test_the_table_shows_every_result_with_its_limit_and_ratio() -> None:
    report = BenchReport("registry")
    report.add("single", 40.0, "registrations/s", limit_name="argon2", limit_value=800.0)
    report.add("idle RSS", 210.5, "MiB")
    console = Console(record=True, width=200)
    console.print(render_table(report))
    text = console.export_text()
    assert "fleetmesh bench registry" in text
    for cell in ("single", "40.00", "registrations/s", "argon2", "800", "0.05", "idle RSS"):
        assert cell in text


@pytest.mark.parametrize(
    ("value", "shown"),
    [(123456.7, "123,457"), (42.123, "42.12"), (0.01234, "0.0123"), (0.0, "0.0")],
)
def test_numbers_are_formatted_for_reading(value: float, shown: str) -> None:
    assert format_number(value) == shown


def test_machine_info_names_the_machine() -> None:
    machine = machine_info(postgres_version="16.4")
    assert set(machine) >= {
        "cpu_count",
        "cpu_model",
        "memory_bytes",
        "python",
        "platform",
        "nats_server",
        "sqlite",
        "postgres",
        "git_commit",
    }
    assert machine["postgres"] == "16.4"
    assert machine["cpu_count"] >= 1
    assert machine["sqlite"].count(".") == 2
    assert machine["nats_server"] and machine["nats_server"][0].isdigit()
    json.dumps(machine)


def test_options_pick_the_quick_count_with_quick() -> None:
    assert BenchOptions().pick(500, 20) == 500
    assert BenchOptions(quick=True).pick(500, 20) == 20


def test_steps_without_a_progress_display_do_nothing() -> None:
    with BenchOptions().step("work", 3) as step:
        step.advance()
