"""What a benchmark hands back: results beside their physical limits, and the machine.

A `Result` is one measured figure; when it has a limit (the same work done by
the raw layer underneath, measured in the same run) its `ratio` says how much
of that ceiling fleetmesh reaches. A `BenchReport` renders as a rich table for
people and as one JSON object for comparing runs over time.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from fleetmesh.core.nats_server import NatsServerError, nats_server_binary


@dataclass(frozen=True, slots=True)
class Result:
    """One measured figure, with the physical limit it is compared to (if any)."""

    name: str
    value: float
    unit: str
    limit_name: str | None = None
    limit_value: float | None = None

    @property
    def ratio(self) -> float | None:
        """value / limit_value; None without a usable (positive, finite) limit."""
        return ratio(self.value, self.limit_value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "limit_name": self.limit_name,
            "limit_value": self.limit_value,
            "ratio": self.ratio,
        }


def ratio(value: float, limit: float | None) -> float | None:
    if limit is None or not math.isfinite(limit) or limit <= 0 or not math.isfinite(value):
        return None
    return value / limit


@dataclass(slots=True)
class BenchReport:
    """The results of one benchmark run and the machine it ran on."""

    bench: str
    results: list[Result] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    def add(
        self,
        name: str,
        value: float,
        unit: str,
        *,
        limit_name: str | None = None,
        limit_value: float | None = None,
    ) -> Result:
        result = Result(name, value, unit, limit_name, limit_value)
        self.results.append(result)
        return result

    def to_dict(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "results": [result.to_dict() for result in self.results],
            "machine": self.machine,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)


def combine(bench: str, reports: list[BenchReport]) -> BenchReport:
    """One report of several benches (`fleetmesh bench all`): names become `<bench>: <name>`."""
    combined = BenchReport(bench)
    for report in reports:
        for result in report.results:
            combined.results.append(
                Result(
                    f"{report.bench}: {result.name}",
                    result.value,
                    result.unit,
                    result.limit_name,
                    result.limit_value,
                )
            )
        combined.machine.update({k: v for k, v in report.machine.items() if v is not None})
    return combined


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What every benchmark is run with."""

    quick: bool = False
    database_url: str | None = None
    progress: Progress | None = None

    def pick(self, full: int, quick: int) -> int:
        """A count: the full one, or the small one with `--quick`."""
        return quick if self.quick else full

    def step(self, description: str, total: int | None = None) -> Step:
        """A progress line on stderr (a bar when `total` is known)."""
        return Step(self.progress, description, total)


Bench = Callable[[BenchOptions], Awaitable[BenchReport]]


class Step:
    """One progress line; a no-op without a progress display."""

    def __init__(self, progress: Progress | None, description: str, total: int | None) -> None:
        self._progress = progress
        self._total = total
        self._task = progress.add_task(description, total=total) if progress else None

    def advance(self, amount: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, amount)

    def done(self) -> None:
        if self._progress is not None and self._task is not None:
            if self._total is None:
                self._progress.update(self._task, total=1, completed=1)
            self._progress.stop_task(self._task)

    def __enter__(self) -> Step:
        return self

    def __exit__(self, *_: object) -> None:
        self.done()


def progress_display(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def render_table(report: BenchReport) -> Table:
    table = Table(title=f"fleetmesh bench {report.bench}", title_justify="left")
    table.add_column("name")
    table.add_column("value", justify="right")
    table.add_column("unit")
    table.add_column("limit")
    table.add_column("limit value", justify="right")
    table.add_column("ratio", justify="right")
    for result in report.results:
        share = result.ratio
        table.add_row(
            result.name,
            format_number(result.value),
            result.unit,
            result.limit_name or "",
            format_number(result.limit_value) if result.limit_value is not None else "",
            f"{share:.3g}" if share is not None else "",
        )
    return table


def render_machine(machine: dict[str, Any]) -> str:
    return "  ".join(f"{key}={value}" for key, value in machine.items() if value is not None)


def format_number(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:,.2f}"
    return f"{value:.3g}"


def machine_info(*, postgres_version: str | None = None) -> dict[str, Any]:
    """The machine a run happened on, so figures of different runs can be compared."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_bytes": _memory_bytes(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nats_server": nats_server_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgres": postgres_version,
        "git_commit": git_commit(),
        "load_average": _load_average(),
    }


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews the figures."""
    try:
        return [round(load, 2) for load in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def nats_server_version() -> str | None:
    try:
        binary = nats_server_binary()
    except NatsServerError:
        return None
    output = _run([str(binary), "--version"])
    return output.split()[-1].lstrip("v") if output else None


def git_commit() -> str | None:
    """The commit of the fleetmesh source tree, when it runs from a git checkout."""
    return _run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"])


def _run(command: list[str]) -> str | None:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    output = completed.stdout.strip()
    return output if completed.returncode == 0 and output else None
