"""`fleetmesh bench <name>`: benchmarks, each figure beside the physical limit of the same run."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Annotated

import typer
from rich.console import Console

from fleetmesh.bench import BENCHES
from fleetmesh.bench.report import (
    Bench,
    BenchOptions,
    BenchReport,
    combine,
    progress_display,
    render_machine,
    render_table,
)

ALL = "all"

JsonOutput = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")
]
BenchDatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="postgresql://... to run the platform on PostgreSQL (default: SQLite in a temp dir).",
    ),
]
Quick = Annotated[bool, typer.Option("--quick", help="Small counts: a smoke run, not a figure.")]


def build_app(benches: Mapping[str, Bench]) -> typer.Typer:
    """A typer app with one command per benchmark, and `all`."""
    bench_app = typer.Typer(
        help="Benchmarks: figures beside the physical limits measured in the same run.",
        no_args_is_help=True,
    )
    for name, bench in benches.items():
        summary = (bench.__doc__ or f"The {name} benchmark.").strip().splitlines()[0]
        bench_app.command(name, help=summary)(_command(benches, [name], name))
    bench_app.command(ALL, help="Run every benchmark, one after the other.")(
        _command(benches, list(benches), ALL)
    )
    return bench_app


def _command(benches: Mapping[str, Bench], names: list[str], label: str) -> Callable[..., None]:
    def command(
        json_output: JsonOutput = False,
        database_url: BenchDatabaseUrl = None,
        quick: Quick = False,
    ) -> None:
        run_benches(
            benches, names, label, json_output=json_output, database_url=database_url, quick=quick
        )

    return command


def run_benches(
    benches: Mapping[str, Bench],
    names: list[str],
    label: str,
    *,
    json_output: bool,
    database_url: str | None,
    quick: bool,
) -> BenchReport:
    """Run the named benches (progress on stderr), print their report on stdout."""
    err = Console(stderr=True)
    try:
        with progress_display(err) as progress:
            options = BenchOptions(quick=quick, database_url=database_url, progress=progress)
            reports = asyncio.run(_run_all([benches[name] for name in names], options))
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None
    except Exception as error:
        err.print(f"[red]bench {label} failed:[/red] {error}")
        raise typer.Exit(1) from None
    report = reports[0] if len(reports) == 1 and label != ALL else combine(label, reports)
    if json_output:
        typer.echo(report.to_json())
    else:
        out = Console()
        if not out.is_terminal:
            out = Console(width=160)  # a file or a pipe: keep each row on one line
        out.print(render_table(report))
        out.print(render_machine(report.machine), style="dim")
    return report


async def _run_all(selected: list[Bench], options: BenchOptions) -> list[BenchReport]:
    return [await bench(options) for bench in selected]


app = build_app(BENCHES)
