"""Benchmarks: `fleetmesh bench <name>`, each figure beside a physical limit of the same run.

A benchmark is an async function `(BenchOptions) -> BenchReport`; registering
one is a line in `BENCHES` (the CLI makes a `fleetmesh bench <name>` command of
every entry, and `fleetmesh bench all` runs them in this order):

    BENCHES["ingest"] = ingest.run
"""

from __future__ import annotations

from fleetmesh.bench import events, governance, ingest, registry, status
from fleetmesh.bench.report import Bench, BenchOptions, BenchReport, Result

BENCHES: dict[str, Bench] = {
    registry.NAME: registry.run,
    ingest.NAME: ingest.run,
    events.NAME: events.run,
    status.NAME: status.run,
    governance.NAME: governance.run,
}

__all__ = ["BENCHES", "Bench", "BenchOptions", "BenchReport", "Result"]
