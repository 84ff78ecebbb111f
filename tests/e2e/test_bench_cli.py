"""`fleetmesh bench registry` as a user runs it: one JSON report, positive figures, no orphans.

No timing is asserted: figures depend on the machine; `fleetmesh bench` is where they are read.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

pytestmark = pytest.mark.e2e

FLEETMESH = [sys.executable, "-m", "fleetmesh.cli"]
RESULT_KEYS = {"name", "value", "unit", "limit_name", "limit_value", "ratio"}
MACHINE_KEYS = {
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


def _processes_naming(text: str) -> list[int]:
    """PIDs whose command line mentions `text` (this test's temp dir): only our processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _run_bench(tmp_path: Path, *extra: str) -> dict[str, Any]:
    # The bench's temp dir (platform data, nats-server store) goes under tmp_path.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    completed = subprocess.run(
        [*FLEETMESH, "bench", "registry", "--quick", "--json", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert _processes_naming(str(tmp_path)) == [], "no platform or nats-server left behind"
    assert list(tmp_path.iterdir()) == [], "the bench's temp dirs are removed"
    report: dict[str, Any] = json.loads(completed.stdout)
    return report


def _check_shape(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    assert set(report) == {"bench", "results", "machine"}
    assert report["bench"] == "registry"
    assert set(report["machine"]) >= MACHINE_KEYS
    results = {item["name"]: item for item in report["results"]}
    assert len(results) == len(report["results"]), "result names are unique"
    for item in report["results"]:
        assert set(item) == RESULT_KEYS
        assert item["value"] > 0, item
        if item["limit_value"] is not None:
            assert item["limit_value"] > 0 and item["limit_name"]
            assert item["ratio"] == pytest.approx(item["value"] / item["limit_value"])
        else:
            assert item["ratio"] is None
    return results


def test_bench_registry_on_sqlite_reports_figures_beside_their_limits(tmp_path: Path) -> None:
    report = _run_bench(tmp_path)
    results = _check_shape(report)
    for name in (
        "single registrations, sequential",
        "single registrations, 16 in flight",
        "bulk registrations, 50 per call",
    ):
        assert results[name]["unit"] == "registrations/s"
        assert results[name]["limit_name"] == "argon2 hashes/s, 2 threads"
        vs_storage = results[f"{name} (vs storage)"]
        assert vs_storage["limit_name"] == "SQLite executemany rows/s (indexed)"
    assert results["idle RSS, nats-server"]["value"] > 0
    assert results["idle RSS, Python process"]["value"] > 0
    assert results["events published during the load"]["ratio"] >= 1.0
    assert report["machine"]["postgres"] is None
    assert report["machine"]["cpu_count"] >= 1


def test_bench_registry_on_postgresql_uses_copy_as_the_storage_limit(
    tmp_path: Path, pg_database: str
) -> None:
    # Twice: the second run meets a database that already has keys and devices.
    for _ in range(2):
        report = _run_bench(tmp_path, "--database-url", pg_database)
        results = _check_shape(report)
        storage = results["bulk registrations, 50 per call (vs storage)"]
        assert storage["limit_name"] == "PostgreSQL COPY rows/s"
        assert results["PostgreSQL COPY rows/s"]["value"] > 0
        assert report["machine"]["postgres"]
    assert asyncio.run(_bench_keys(pg_database)) == {"revoked"}, "its own key is revoked"


async def _bench_keys(url: str) -> set[str]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT revoked_at FROM api_keys WHERE name = 'fleetmesh bench'"
        )
    finally:
        await connection.close()
    return {"revoked" if row["revoked_at"] else "active" for row in rows}


def test_bench_help_lists_the_registry_bench() -> None:
    completed = subprocess.run(
        [*FLEETMESH, "bench", "--help"], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0
    assert "registry" in completed.stdout and "all" in completed.stdout
