"""`fleetmesh simulate`: a simulated fleet against a running platform, over HTTP or MQTT."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleetmesh.cli.client import resolve_key
from fleetmesh.cli.options import DEFAULT_API, DEFAULT_DATA_DIR, ApiKey, ApiUrl, DataDir
from fleetmesh.telemetry.simulator import (
    MAX_RATE,
    Counters,
    ProvisioningError,
    SimulationConfig,
    SimulationReport,
    run_simulation,
)

err = Console(stderr=True)

CREDENTIALS_FILE = "simulator-credentials.json"
ANOMALIES_FILE = "simulator-anomalies.json"


def simulate(
    devices: Annotated[int, typer.Option(min=1, max=10_000, help="How many devices.")] = 10,
    rate: Annotated[
        float, typer.Option(min=0.01, max=MAX_RATE, help="Points per second per device.")
    ] = 4.0,
    duration: Annotated[float, typer.Option(min=0.5, help="Seconds to send for.")] = 30.0,
    mqtt: Annotated[
        bool, typer.Option("--mqtt/--http", help="Send over MQTT (QoS 1) or HTTP (default).")
    ] = False,
    anomalies: Annotated[
        bool, typer.Option("--anomalies", help="Inject spikes and level shifts, and record them.")
    ] = False,
    mqtt_url: Annotated[
        str | None,
        typer.Option(
            "--mqtt-url",
            envvar="FLEETMESH_MQTT_URL",
            help="The platform's MQTT listener [default: the API host, port 1883].",
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible values.")] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")
    ] = False,
    api: ApiUrl = DEFAULT_API,
    key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Register (or reuse) N simulated sensors and send telemetry; report what was stored."""
    config = SimulationConfig(
        api_url=api,
        admin_key=resolve_key(key, data_dir),
        devices=devices,
        rate=rate,
        duration_s=duration,
        transport="mqtt" if mqtt else "http",
        anomalies=anomalies,
        mqtt_url=mqtt_url,
        credentials_path=data_dir / CREDENTIALS_FILE,
        seed=seed,
    )
    try:
        report = asyncio.run(_run_with_progress(config))
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None
    except (ProvisioningError, OSError) as error:
        err.print(f"[red]simulate failed:[/red] {error}")
        raise typer.Exit(1) from None
    if report.anomalies:
        _write_anomalies(data_dir / ANOMALIES_FILE, report)
    if json_output:
        typer.echo(json.dumps(report.to_dict()))
    else:
        Console().print(render_report(report))
        if report.anomalies:
            err.print(f"{len(report.anomalies)} anomalies recorded in {data_dir / ANOMALIES_FILE}")
    if report.lost or not report.verified:
        raise typer.Exit(1)


async def _run_with_progress(config: SimulationConfig) -> SimulationReport:
    counters = Counters()
    duration = config.duration_s or 0.0
    progress = Progress(
        TextColumn(f"[bold]{config.transport}[/bold] {config.devices} devices"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"),
        console=err,
        transient=False,
    )
    with progress:
        task = progress.add_task("simulate", total=duration, stats="registering")
        run = asyncio.create_task(run_simulation(config, counters=counters))
        started: float | None = None
        while not run.done():
            if counters.messages and started is None:
                started = time.monotonic()
            elapsed = 0.0 if started is None else time.monotonic() - started
            stats = (
                f"sent {counters.sent}  accepted {counters.accepted}  "
                f"rejected {counters.rejected}  retries {counters.retries}"
            )
            if elapsed >= duration and started is not None:
                stats += "  verifying"
            progress.update(task, completed=min(elapsed, duration), stats=stats)
            await asyncio.wait({run}, timeout=0.2)
        progress.update(task, completed=duration)
        return await run


def render_report(report: SimulationReport) -> Table:
    table = Table(title=f"{report.devices} devices, {report.transport}")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("duration (s)", f"{report.duration_s:g}"),
        ("messages", str(report.messages)),
        ("points sent", str(report.sent)),
        ("accepted", str(report.accepted)),
        ("rejected", str(report.rejected)),
        ("stored (queried)", str(report.stored)),
        ("lost", f"[{'red' if report.lost else 'green'}]{report.lost}[/]"),
        ("duplicates", str(report.duplicates)),
        ("retries", str(report.retries)),
        ("pings answered", str(report.pings_answered)),
        ("anomalies injected", str(len(report.anomalies))),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _write_anomalies(path: Path, report: SimulationReport) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict()["anomalies"], indent=1))
