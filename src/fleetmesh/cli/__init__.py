"""The `fleetmesh` command line."""

from __future__ import annotations

import typer

from fleetmesh import __version__
from fleetmesh.analytics import cli as analytics_cli
from fleetmesh.cli import bench, devices, governance, keys, service, simulate, up
from fleetmesh.core.logging import configure_logging

app = typer.Typer(
    name="fleetmesh",
    help="fleetmesh: an IoT platform. `fleetmesh up` runs it all on this machine.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.command("up")(up.up)
app.add_typer(keys.app, name="keys")
app.add_typer(devices.app, name="devices")
app.add_typer(service.app, name="service")
app.add_typer(governance.services_app, name="services")
app.add_typer(governance.config_app, name="config")
app.command("simulate")(simulate.simulate)
app.add_typer(bench.app, name="bench")
app.add_typer(analytics_cli.app, name="analytics", help="Anomaly detection tools (NAB harness).")


@app.command()
def version() -> None:
    """Print the fleetmesh version."""
    typer.echo(f"fleetmesh {__version__}")


def main() -> None:
    # Logs go to stderr from the start: stdout carries results (`--json`, tables).
    configure_logging("WARNING")
    app(prog_name="fleetmesh")
