"""`fleetmesh bench`: one command per registered bench, JSON or a table, errors as exit codes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fleetmesh.bench.report import BenchOptions, BenchReport
from fleetmesh.cli.bench import build_app

pytestmark = pytest.mark.unit

seen: list[BenchOptions] = []


async def fake(options: BenchOptions) -> BenchReport:
    """A fake bench."""
    seen.append(options)
    report = BenchReport("fake", machine={"cpu_count": 2})
    report.add("things", 30.0, "things/s", limit_name="raw things/s", limit_value=60.0)
    return report


async def other(options: BenchOptions) -> BenchReport:
    """Another fake bench."""
    report = BenchReport("other", machine={"cpu_count": 2})
    report.add("stuff", 5.0, "MiB")
    return report


async def broken(options: BenchOptions) -> BenchReport:
    """A bench that fails."""
    raise RuntimeError("the platform did not start")


runner = CliRunner()
app = build_app({"fake": fake, "other": other, "broken": broken})


@pytest.fixture(autouse=True)
def _clear() -> None:
    seen.clear()


def test_json_is_one_object_on_stdout_and_options_reach_the_bench() -> None:
    result = runner.invoke(
        app, ["fake", "--json", "--quick", "--database-url", "postgresql://x@h/db"]
    )
    assert result.exit_code == 0, result.output
    decoded = json.loads(result.stdout)
    assert decoded["bench"] == "fake"
    assert decoded["results"][0]["ratio"] == pytest.approx(0.5)
    assert decoded["machine"] == {"cpu_count": 2}
    [options] = seen
    assert options.quick and options.database_url == "postgresql://x@h/db"


def test_the_default_output_is_a_table() -> None:
    result = runner.invoke(app, ["fake"])
    assert result.exit_code == 0, result.output
    assert "things/s" in result.stdout and "raw things/s" in result.stdout
    assert "0.5" in result.stdout
    assert not seen[0].quick and seen[0].database_url is None


def test_all_runs_every_bench_into_one_report() -> None:
    only_good = build_app({"fake": fake, "other": other})
    result = runner.invoke(only_good, ["all", "--json"])
    assert result.exit_code == 0, result.output
    decoded = json.loads(result.stdout)
    assert decoded["bench"] == "all"
    assert [r["name"] for r in decoded["results"]] == ["fake: things", "other: stuff"]


def test_a_failing_bench_exits_1_with_the_reason_and_prints_no_json() -> None:
    result = runner.invoke(app, ["broken", "--json"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "the platform did not start" in result.stderr


def test_every_bench_is_a_command_with_its_summary() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for text in ("fake", "A fake bench.", "other", "broken", "all"):
        assert text in result.stdout
