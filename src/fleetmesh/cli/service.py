"""`fleetmesh service run`: one context per process, against external NATS and a database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Annotated, Any

import typer
import uvicorn

from fleetmesh.bootstrap import CONTEXTS, Platform, bootstrap
from fleetmesh.cli.options import DEFAULT_DATA_DIR, DatabaseUrl, DataDir
from fleetmesh.cli.up import QuietExitServer
from fleetmesh.core.failover import FailoverTransport
from fleetmesh.core.logging import configure_logging, get_logger
from fleetmesh.core.ports import free_port
from fleetmesh.core.settings import Settings
from fleetmesh.gateway.app import create_app
from fleetmesh.gateway.service import create_gateway_app
from fleetmesh.registry.client import RegistryClient

app = typer.Typer(help="Run fleetmesh services one per process (distributed mode).")
log = get_logger(__name__)

GATEWAY = "gateway"
SELF_CHECK = {
    "kind": "http",
    "http_path": "/readyz",
    "interval": 1.0,
    "timeout": 0.5,
    "failures_before_critical": 2,
    "deregister_critical_after": 10,
}


def _urls(value: str | None) -> list[str]:
    return [url.strip() for url in (value or "").split(",") if url.strip()]


@app.command("run")
def run(
    context: Annotated[str, typer.Argument(help=f"One of: {', '.join([*CONTEXTS, GATEWAY])}.")],
    nats: Annotated[
        str, typer.Option(envvar="FLEETMESH_NATS", help="NATS servers, comma-separated.")
    ],
    registry: Annotated[
        str,
        typer.Option(envvar="FLEETMESH_REGISTRY", help="Registry instance URLs, comma-separated."),
    ],
    database_url: DatabaseUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    host: Annotated[str, typer.Option(envvar="FLEETMESH_HOST")] = "127.0.0.1",
    http_port: Annotated[
        int, typer.Option(envvar="FLEETMESH_HTTP_PORT", help="0: a free port.")
    ] = 0,
    replicas: Annotated[int, typer.Option(min=1, max=16, help="Start this many processes.")] = 1,
    log_level: Annotated[str, typer.Option(envvar="FLEETMESH_LOG_LEVEL")] = "INFO",
) -> None:
    """Run one context (or the gateway) as its own service, registered with the registry."""
    if context != GATEWAY and context not in CONTEXTS:
        raise typer.BadParameter(f"unknown context {context!r}", param_hint="CONTEXT")
    if replicas > 1:
        raise typer.Exit(_run_replicas(replicas))
    configure_logging(log_level)
    port = http_port or free_port(host)
    settings = Settings(
        data_dir=data_dir,
        host=host,
        http_port=port,
        nats=nats,
        database_url=database_url,
        log_level=log_level,
        registry=registry,
    )
    if context == GATEWAY:
        _serve_gateway(settings, port)
    else:
        _serve_context(settings, context, port)


def _run_replicas(replicas: int) -> int:
    """Supervise N copies of this command (each with --replicas 1), forwarding signals."""
    argv = list(sys.argv[1:])
    index = argv.index("--replicas")
    del argv[index : index + 2]
    children = [subprocess.Popen([sys.argv[0], *argv]) for _ in range(replicas)]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


def registry_client(settings: Settings) -> RegistryClient:
    urls = _urls(settings.registry)
    api_key = settings.api_key or os.environ.get("FLEETMESH_API_KEY", "")
    return RegistryClient(urls[0], api_key, transport=FailoverTransport(urls))


def _serve_context(settings: Settings, context: str, port: int) -> None:
    platform = bootstrap(settings, contexts=[context])
    # One id per endpoint: a process restarted on its port replaces its old registration
    # instead of leaving it behind, passing the health checks the new process answers.
    instance_id = f"{context}-{settings.host}-{port}"
    holder: dict[str, Any] = {}

    async def register(started: Platform) -> None:
        client = registry_client(started.settings)
        holder["client"] = client
        holder["task"] = asyncio.create_task(
            _register_until_done(client, context, instance_id, port, settings.host)
        )

    async def deregister(_: Platform) -> None:
        await _deregister(holder, context, instance_id)

    app = create_app(platform, manage_lifecycle=True, on_started=register, on_stopping=deregister)
    QuietExitServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
    ).run()


async def _register_until_done(
    client: RegistryClient, service: str, instance_id: str, port: int, host: str
) -> None:
    """Register (retrying while the registry itself is starting)."""
    delay = 0.2
    while True:
        try:
            await client.register_self(
                service, address=host, port=port, instance_id=instance_id, check=SELF_CHECK
            )
            log.info("registered_with_registry", service=service, instance=instance_id)
            return
        except Exception as error:
            log.info("registry_not_ready", error=repr(error), retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)


async def _deregister(holder: dict[str, Any], service: str, instance_id: str) -> None:
    task = holder.get("task")
    if task is not None:
        task.cancel()
    client = holder.get("client")
    if client is None:
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.deregister(service, instance_id), 3)
    await client.close()


def _serve_gateway(settings: Settings, port: int) -> None:
    client = registry_client(settings)
    services = list(CONTEXTS)

    @contextlib.asynccontextmanager
    async def lifecycle() -> AsyncIterator[None]:
        await asyncio.gather(
            *(client.watch(service, timeout=2) for service in services), return_exceptions=True
        )
        try:
            yield
        finally:
            await client.close()

    app = create_gateway_app(client, services, lifecycle=lifecycle)
    QuietExitServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
    ).run()
