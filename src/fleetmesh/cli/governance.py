"""`fleetmesh services` and `fleetmesh config`: service governance, through the HTTP API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from fleetmesh.cli.client import api_client, check, resolve_key
from fleetmesh.cli.options import DEFAULT_API, DEFAULT_DATA_DIR, ApiKey, ApiUrl, DataDir

out = Console()
err = Console(stderr=True)

services_app = typer.Typer(
    help="Registered service instances and their health. Without a command: list them.",
    invoke_without_command=True,
)
config_app = typer.Typer(
    help="Versioned configuration: get, set, history, rollback, watch.", no_args_is_help=True
)

Namespace = Annotated[
    str, typer.Option("--namespace", "-n", help="Configuration namespace (environment).")
]
WATCH_WAIT = "30s"


def _client(api: str, key: str | None, data_dir: Path, *, timeout: float = 60.0) -> httpx.Client:
    return api_client(api, resolve_key(key, data_dir), timeout=timeout)


# -- services ------------------------------------------------------------------


def _instances_table(instances: list[dict[str, Any]]) -> Table:
    table = Table("service", "instance", "address", "health", "zone", "version", "tags")
    colours = {"passing": "green", "warning": "yellow", "critical": "red"}
    for item in instances:
        state = item["health"]["state"]
        table.add_row(
            item["service"],
            item["instance_id"],
            f"{item['address']}:{item['port']}",
            f"[{colours.get(state, 'white')}]{state}[/]",
            item["zone"],
            item["version"],
            ",".join(item["tags"]),
        )
    return table


def _list_instances(client: httpx.Client, service: str | None) -> list[dict[str, Any]]:
    if service:
        names = [service]
    else:
        names = [s["name"] for s in check(client.get("/api/v1/services"))["services"]]
    instances: list[dict[str, Any]] = []
    for name in names:
        found = check(client.get(f"/api/v1/services/{name}/instances", params={"healthy": False}))
        instances.extend(found["instances"])
    return instances


@services_app.callback()
def services(
    ctx: typer.Context,
    api: ApiUrl = DEFAULT_API,
    key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List every instance of every service with its health."""
    if ctx.invoked_subcommand is not None:
        return
    with _client(api, key, data_dir) as client:
        out.print(_instances_table(_list_instances(client, None)))


@services_app.command("list")
def list_services(
    service: Annotated[str | None, typer.Argument(help="Only this service.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    api: ApiUrl = DEFAULT_API,
    key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List instances (critical ones included) with their health."""
    with _client(api, key, data_dir) as client:
        instances = _list_instances(client, service)
    if as_json:
        out.print_json(data=instances)
    else:
        out.print(_instances_table(instances))


@services_app.command("deregister")
def deregister(
    service: Annotated[str, typer.Argument()],
    instance_id: Annotated[str, typer.Argument()],
    api: ApiUrl = DEFAULT_API,
    key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Remove an instance from the registry now."""
    with _client(api, key, data_dir) as client:
        out.print_json(
            data=check(client.delete(f"/api/v1/services/{service}/instances/{instance_id}"))
        )


# -- config --------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    """JSON if it parses (`42`, `true`, `{"a": 1}`), else the text itself (`WARNING`)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@config_app.command("get")
def config_get(
    service: Annotated[str, typer.Argument()],
    key: Annotated[str, typer.Argument()],
    namespace: Namespace = "default",
    api: ApiUrl = DEFAULT_API,
    api_key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Print the current value (JSON) and its version."""
    with _client(api, api_key, data_dir) as client:
        entry = check(
            client.get(f"/api/v1/config/{service}/{key}", params={"namespace": namespace})
        )
    out.print_json(data=entry["value"])
    err.print(f"version {entry['version']} by {entry['author']} at {entry['at']}")


@config_app.command("set")
def config_set(
    service: Annotated[str, typer.Argument()],
    key: Annotated[str, typer.Argument()],
    value: Annotated[str, typer.Argument(help="JSON, or plain text for a string.")],
    comment: Annotated[str, typer.Option("--comment", "-m")] = "",
    schema: Annotated[
        Path | None, typer.Option("--schema", exists=True, dir_okay=False, help="JSON Schema file.")
    ] = None,
    if_match: Annotated[
        int | None, typer.Option("--if-match", help="Only if the current version is this.")
    ] = None,
    namespace: Namespace = "default",
    api: ApiUrl = DEFAULT_API,
    api_key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Set a value: a new version."""
    body: dict[str, Any] = {"value": _parse_value(value), "comment": comment}
    if schema is not None:
        body["schema"] = json.loads(schema.read_text())
    headers = {"If-Match": str(if_match)} if if_match is not None else {}
    with _client(api, api_key, data_dir) as client:
        entry = check(
            client.put(
                f"/api/v1/config/{service}/{key}",
                params={"namespace": namespace},
                json=body,
                headers=headers,
            )
        )
    out.print(f"{namespace}/{service}/{key} is now version {entry['version']}")


@config_app.command("history")
def config_history(
    service: Annotated[str, typer.Argument()],
    key: Annotated[str, typer.Argument()],
    limit: Annotated[int, typer.Option(help="How many versions at most.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    namespace: Namespace = "default",
    api: ApiUrl = DEFAULT_API,
    api_key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Versions, newest first."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    with _client(api, api_key, data_dir) as client:
        while len(items) < limit:
            params: dict[str, Any] = {
                "namespace": namespace,
                "limit": min(1000, limit - len(items)),
            }
            if cursor:
                params["cursor"] = cursor
            page = check(client.get(f"/api/v1/config/{service}/{key}/history", params=params))
            items.extend(page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                break
    if as_json:
        out.print_json(data=items)
        return
    table = Table("version", "kind", "value", "author", "at", "comment")
    for item in items:
        value = "(deleted)" if item["deleted"] else json.dumps(item["value"])
        table.add_row(
            str(item["version"]), item["kind"], value, item["author"], item["at"], item["comment"]
        )
    out.print(table)


@config_app.command("rollback")
def config_rollback(
    service: Annotated[str, typer.Argument()],
    key: Annotated[str, typer.Argument()],
    version: Annotated[int, typer.Argument(help="The version whose value to restore.")],
    reason: Annotated[str, typer.Option("--reason", "-m")] = "",
    namespace: Namespace = "default",
    api: ApiUrl = DEFAULT_API,
    api_key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Restore an earlier version's value as a new version."""
    with _client(api, api_key, data_dir) as client:
        entry = check(
            client.post(
                f"/api/v1/config/{service}/{key}:rollback",
                params={"namespace": namespace},
                json={"version": version, "reason": reason},
            )
        )
    out.print(f"{namespace}/{service}/{key} is now version {entry['version']} ({entry['comment']})")


@config_app.command("watch")
def config_watch(
    service: Annotated[str, typer.Argument()],
    key: Annotated[str, typer.Argument()],
    count: Annotated[
        int, typer.Option(help="Stop after this many changes (0: until interrupted).")
    ] = 0,
    namespace: Namespace = "default",
    api: ApiUrl = DEFAULT_API,
    api_key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Print the value now and at every change (long poll), one JSON line each."""
    index = 0
    seen = 0
    with _client(api, api_key, data_dir, timeout=90.0) as client:
        while count == 0 or seen < count:
            params: dict[str, str | int] = {
                "namespace": namespace,
                "index": index,
                "wait": WATCH_WAIT,
            }
            response = client.get(f"/api/v1/config/{service}/{key}", params=params)
            new_index = int(response.headers.get("X-Fleetmesh-Index", index))
            if response.status_code not in (200, 404):
                check(response)
            if new_index == index:
                continue
            index = new_index
            seen += 1
            body = response.json()
            line = {"version": index, "deleted": response.status_code == 404}
            if response.status_code == 200:
                line["value"] = body["value"]
            out.print(json.dumps(line), highlight=False, soft_wrap=True)
