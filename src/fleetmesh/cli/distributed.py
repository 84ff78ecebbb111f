"""`fleetmesh up --distributed`: a real cluster on one machine.

Three `nats-server` processes with routes (streams and KV with three
replicas), then every context as separate OS processes (`--replicas` each),
registered with the registry, and the gateway in front; all on loopback.
A process that exits (a crash, a kill, a NATS node stopped from outside) is
started again on the same port, during the start as later.
Ctrl-C or SIGTERM stops them all, children first, NATS last.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from fleetmesh.bootstrap import CONTEXTS
from fleetmesh.core.auth import ApiKeyStore, Role
from fleetmesh.core.database import Database
from fleetmesh.core.nats_cluster import NatsCluster
from fleetmesh.core.nats_server import (
    SERVICE_USER,
    SYSTEM_USER,
    NatsSecrets,
    NatsServerError,
    die_with_parent,
)
from fleetmesh.core.ports import choose_port, free_port
from fleetmesh.core.settings import DEFAULT_HTTP_PORT, Settings

console = Console(stderr=True, width=140)
FLEETMESH = str(Path(sys.executable).with_name("fleetmesh"))
REGISTRY = "registry"
SERVICE_KEY_FILE = "service.key"
START_ATTEMPTS = 3


@dataclass
class Child:
    name: str
    url: str
    process: subprocess.Popen[bytes]


def run_distributed(settings: Settings, *, replicas: int) -> int:
    return asyncio.run(_run(settings, replicas))


async def _run(settings: Settings, replicas: int) -> int:
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    http_port = choose_port(settings.host, settings.http_port, DEFAULT_HTTP_PORT, what="HTTP")
    nats_secrets = NatsSecrets.load_or_create(data_dir / "nats" / "secrets.json")
    cluster = NatsCluster(
        data_dir=data_dir / "cluster", host=settings.host, nats_secrets=nats_secrets
    )
    await cluster.start()
    children: list[Child] = []
    try:
        service_key, admin_path = await _prepare_database(settings)
        env = _child_env(settings, cluster, nats_secrets, service_key)
        registry_ports = [free_port(settings.host) for _ in range(replicas)]
        env["FLEETMESH_REGISTRY"] = ",".join(f"http://{settings.host}:{p}" for p in registry_ports)
        for port in registry_ports:
            children.append(_spawn(REGISTRY, port, settings.host, env))
        await _wait_ready(children, env, timeout=60)
        for context in CONTEXTS:
            if context == REGISTRY:
                continue
            for _ in range(replicas):
                children.append(_spawn(context, free_port(settings.host), settings.host, env))
        children.append(_spawn("gateway", http_port, settings.host, env))
        await _wait_ready(children, env, timeout=90)
        _banner(settings, cluster, children, admin_path)
        return await _supervise(children, cluster, env)
    finally:
        await _stop_children(children)
        await cluster.stop()


async def _prepare_database(settings: Settings) -> tuple[str, Path]:
    """Migrate once, create the admin key file and the services' key before any child starts."""
    database = Database(settings.sqlalchemy_url, shared_sqlite=True)
    try:
        await database.migrate()
        keys = ApiKeyStore(database)
        admin_path = settings.data_dir / "admin.key"
        if not admin_path.exists():
            _, admin_key = await keys.create(role=Role.admin, name="initial admin")
            _write_secret(admin_path, admin_key)
        service_path = settings.data_dir / SERVICE_KEY_FILE
        if not service_path.exists():
            _, service_key = await keys.create(role=Role.admin, name="fleetmesh services")
            _write_secret(service_path, service_key)
        return service_path.read_text().strip(), admin_path
    finally:
        await database.dispose()


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")


def _child_env(
    settings: Settings, cluster: NatsCluster, nats_secrets: NatsSecrets, service_key: str
) -> dict[str, str]:
    env = {
        **os.environ,
        "FLEETMESH_NATS": ",".join(cluster.urls),
        "FLEETMESH_NATS_USER": SERVICE_USER,
        "FLEETMESH_NATS_PASSWORD": nats_secrets.service_password,
        "FLEETMESH_NATS_SYSTEM_USER": SYSTEM_USER,
        "FLEETMESH_NATS_SYSTEM_PASSWORD": nats_secrets.system_password,
        "FLEETMESH_NATS_REPLICAS": "3",
        "FLEETMESH_DATA_DIR": str(settings.data_dir.resolve()),
        "FLEETMESH_API_KEY": service_key,
        "FLEETMESH_CALLOUT_ISSUER_SEED": nats_secrets.callout_issuer_seed,
        "FLEETMESH_LOG_LEVEL": settings.log_level,
        "FLEETMESH_ALLOW_PRIVATE_WEBHOOKS": str(settings.allow_private_webhooks).lower(),
    }
    if settings.mqtt_bridge:
        env["FLEETMESH_MQTT_BRIDGE"] = settings.mqtt_bridge
    if settings.database_url:
        env["FLEETMESH_DATABASE_URL"] = settings.database_url
    else:
        env["FLEETMESH_SHARED_SQLITE"] = "true"
    return env


def _spawn(name: str, port: int, host: str, env: dict[str, str]) -> Child:
    log_dir = Path(env["FLEETMESH_DATA_DIR"]) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / f"{name}-{port}.log").open("ab") as log_file:
        process = subprocess.Popen(
            [FLEETMESH, "service", "run", name, "--http-port", str(port), "--host", host],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
            start_new_session=True,
        )
    return Child(name, f"http://{host}:{port}", process)


def _respawn(child: Child, env: dict[str, str]) -> Child:
    host, port = child.url.removeprefix("http://").rsplit(":", 1)
    return _spawn(child.name, int(port), host, env)


async def _wait_ready(children: list[Child], env: dict[str, str], *, timeout: float) -> None:
    """Until every child answers its health check; one that exits is started again.

    On a busy machine a service can fail its start (a JetStream request timing out while
    the cluster is still settling); a few attempts are normal, a crash loop is not.
    """
    deadline = time.monotonic() + timeout
    ready: set[str] = set()
    starts: Counter[str] = Counter()
    async with httpx.AsyncClient(timeout=1) as client:
        while time.monotonic() < deadline:
            for index, child in enumerate(children):
                if child.url in ready:
                    continue
                if child.process.poll() is not None:
                    children[index] = _start_again(child, starts, env)
                elif await _answers(client, child):
                    ready.add(child.url)
            if len(ready) == len(children):
                return
            await asyncio.sleep(0.2)
    pending = [c.name for c in children if c.url not in ready]
    raise RuntimeError(f"not ready in {timeout}s: {pending}")


def _start_again(child: Child, starts: Counter[str], env: dict[str, str]) -> Child:
    starts[child.url] += 1
    if starts[child.url] >= START_ATTEMPTS:
        raise RuntimeError(
            f"{child.name} on {child.url} exited {starts[child.url]} times while starting "
            f"(last code {child.process.returncode}); see its log"
        )
    console.print(f"[yellow]{child.name} on {child.url} exited; starting again[/yellow]")
    return _respawn(child, env)


async def _answers(client: httpx.AsyncClient, child: Child) -> bool:
    try:
        return (await client.get(child.url + "/readyz")).status_code == 200
    except httpx.HTTPError:
        return False


def _banner(settings: Settings, cluster: NatsCluster, children: list[Child], admin: Path) -> None:
    gateway = next(c for c in children if c.name == "gateway")
    table = Table(title="fleetmesh (distributed) is up", show_lines=False)
    table.add_column("process")
    table.add_column("pid", justify="right")
    table.add_column("address")
    for index, node in enumerate(cluster.nodes):
        table.add_row(
            f"nats-server {index}", str(node.pid), f"{node.url}  {cluster.mqtt_urls[index]}"
        )
    for child in children:
        table.add_row(child.name, str(child.process.pid), child.url)
    console.print(table)
    console.print(f"Console and API  {gateway.url}/   (API {gateway.url}/api/v1)")
    console.print(f"Admin key        {admin.resolve()}  (mode 0600)")
    database = settings.database_url or str(settings.data_dir.resolve() / "fleetmesh.db")
    console.print(f"Database         {database.split('@')[-1]}")
    console.print("Ctrl-C stops everything.")


async def _supervise(children: list[Child], cluster: NatsCluster, env: dict[str, str]) -> int:
    """Until Ctrl-C or SIGTERM: start again any service process or NATS node that died."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        if stop.is_set():
            break
        await _restart_nats_nodes(cluster)
        for index, child in enumerate(children):
            if child.process.poll() is not None:
                console.print(f"[yellow]{child.name} on {child.url} died; restarting[/yellow]")
                children[index] = _respawn(child, env)
    return 0


async def _restart_nats_nodes(cluster: NatsCluster) -> None:
    for index in cluster.down_nodes():
        console.print(f"[yellow]nats-server {index} died; restarting[/yellow]")
        try:
            await cluster.start_node(index)
        except NatsServerError as error:  # tried again on the next round
            console.print(f"[red]nats-server {index} did not start again: {error}[/red]")


async def _stop_children(children: list[Child]) -> None:
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for child in children:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            await asyncio.get_running_loop().run_in_executor(None, child.process.wait, remaining)
        except subprocess.TimeoutExpired:
            child.process.kill()
