"""`fleetmesh up`: the whole platform in one process, with its own nats-server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
import uvicorn
from rich.console import Console
from rich.panel import Panel

from fleetmesh import __version__
from fleetmesh.bootstrap import Platform, bootstrap
from fleetmesh.cli.options import DEFAULT_DATA_DIR, DatabaseUrl, DataDir
from fleetmesh.core.heap import settle_heap
from fleetmesh.core.logging import configure_logging
from fleetmesh.core.ports import PortInUse
from fleetmesh.core.settings import Settings
from fleetmesh.gateway.app import create_app
from fleetmesh.telemetry.simulator import run_demo_fleet

console = Console(stderr=True)

AfterStart = Callable[[Platform], Coroutine[Any, Any, None]]


def up(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    host: Annotated[
        str, typer.Option(envvar="FLEETMESH_HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    http_port: Annotated[
        int | None, typer.Option(envvar="FLEETMESH_HTTP_PORT", help="HTTP port [default: 8080]")
    ] = None,
    nats_port: Annotated[
        int | None, typer.Option(envvar="FLEETMESH_NATS_PORT", help="NATS port [default: 4223]")
    ] = None,
    mqtt_port: Annotated[
        int | None, typer.Option(envvar="FLEETMESH_MQTT_PORT", help="MQTT port [default: 1883]")
    ] = None,
    nats: Annotated[
        str | None,
        typer.Option(envvar="FLEETMESH_NATS", help="External NATS servers (comma-separated)."),
    ] = None,
    database_url: DatabaseUrl = None,
    allow_private_webhooks: Annotated[
        bool,
        typer.Option(
            envvar="FLEETMESH_ALLOW_PRIVATE_WEBHOOKS",
            help="Let webhooks target loopback and private addresses.",
        ),
    ] = False,
    mqtt_bridge: Annotated[
        str | None,
        typer.Option(
            envvar="FLEETMESH_MQTT_BRIDGE",
            help="Also take telemetry from this MQTT broker: mqtt://[user:pass@]host:1883.",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(envvar="FLEETMESH_LOG_LEVEL")] = "INFO",
    log_json: Annotated[bool, typer.Option(envvar="FLEETMESH_LOG_JSON", help="JSON logs.")] = False,
    demo_devices: Annotated[
        int, typer.Option(min=0, max=1000, help="Also run this many simulated demo devices.")
    ] = 0,
    distributed: Annotated[
        bool,
        typer.Option(
            help="A 3-node NATS cluster and every context as separate processes, on loopback."
        ),
    ] = False,
    replicas: Annotated[
        int, typer.Option(min=1, max=8, help="With --distributed: processes per context.")
    ] = 1,
) -> None:
    """Run the whole platform here: API, console, MQTT and an embedded NATS JetStream."""
    configure_logging(log_level, json_output=log_json)
    settings = Settings(
        data_dir=data_dir,
        host=host,
        http_port=http_port,
        nats_port=nats_port,
        mqtt_port=mqtt_port,
        nats=nats,
        database_url=database_url,
        allow_private_webhooks=allow_private_webhooks,
        mqtt_bridge=mqtt_bridge,
        log_level=log_level,
        log_json=log_json,
    )
    if distributed:
        from fleetmesh.cli.distributed import run_distributed

        raise typer.Exit(run_distributed(settings, replicas=replicas))
    after_start = None
    if demo_devices:

        async def after_start(platform: Platform) -> None:
            assert platform.admin_key_path is not None
            await run_demo_fleet(
                platform.api_url,
                platform.admin_key_path.read_text().strip(),
                demo_devices,
                data_dir=settings.data_dir,
            )

    serve(settings, after_start=after_start)


def serve(settings: Settings, *, after_start: AfterStart | None = None) -> None:
    """Start the platform, print the banner, serve HTTP until Ctrl-C or SIGTERM."""
    try:
        platform = bootstrap(settings)
    except PortInUse as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    tasks: list[asyncio.Task[None]] = []

    async def announce(started: Platform) -> None:
        print_banner(started)
        if after_start is not None:
            tasks.append(asyncio.create_task(after_start(started)))

    async def stop_tasks(_: Platform) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    app = create_app(platform, manage_lifecycle=True, on_started=announce, on_stopping=stop_tasks)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=platform.ports.http,
        log_level="warning",
        lifespan="on",
        access_log=False,
        # Open SSE watch streams would otherwise hold the shutdown forever.
        timeout_graceful_shutdown=5,
    )
    QuietExitServer(config).run()


class QuietExitServer(uvicorn.Server):
    """Ctrl-C and SIGTERM end a clean, staged shutdown with exit code 0.

    uvicorn re-raises the signal once it has shut down, which would turn a
    clean stop into death by signal; fleetmesh has finished its own shutdown by
    then (the platform stops in the app's lifespan), so the signal is consumed.
    Once started, the heap is settled (`core.heap`): what the start built is frozen.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        settle_heap()


def print_banner(platform: Platform) -> None:
    settings = platform.settings
    key_path = platform.admin_key_path or settings.data_dir / "admin.key"
    key_note = "created now" if platform.admin_key_created else "from an earlier start"
    nats_line = ", ".join(platform.nats_urls)
    lines = [
        f"[bold]fleetmesh {__version__}[/bold] is up",
        "",
        f"  Console   {platform.api_url}/",
        f"  API       {platform.api_url}/api/v1   (docs {platform.api_url}/docs)",
        f"  MQTT      {platform.mqtt_url}"
        if platform.ports.mqtt
        else "  MQTT      (external NATS)",
        f"  NATS      {nats_line}",
        f"  Admin key {Path(key_path).resolve()}  ({key_note}, mode 0600)",
        f"  Data      {settings.data_dir.resolve()}",
        f"  Database  {_redact(settings.sqlalchemy_url)}",
        "",
        "Ctrl-C stops everything.",
    ]
    Console(stderr=True, width=max(console.width, 110)).print(Panel("\n".join(lines), expand=False))


def _redact(url: str) -> str:
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
