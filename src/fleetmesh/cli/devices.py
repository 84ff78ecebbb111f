"""`fleetmesh devices`: the device registry, through the HTTP API."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fleetmesh.cli.client import api_client, check, resolve_key
from fleetmesh.cli.options import DEFAULT_API, DEFAULT_DATA_DIR, ApiKey, ApiUrl, DataDir

app = typer.Typer(help="Register, list, show, deregister and import devices.", no_args_is_help=True)
out = Console()
BULK_CHUNK = 1000


def _client(api: str, key: str | None, data_dir: Path) -> httpx.Client:
    return api_client(api, resolve_key(key, data_dir))


@app.command("register")
def register(
    device_type: Annotated[str, typer.Option("--type", help="Device type name.")],
    device_id: Annotated[str | None, typer.Option("--id", help="Id (generated if absent).")] = None,
    name: Annotated[str | None, typer.Option(help="Human-readable unique name.")] = None,
    api: ApiUrl = DEFAULT_API,
    key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Register one device and print its credentials (shown only once)."""
    body: dict[str, Any] = {"type": device_type}
    if device_id:
        body["id"] = device_id
    if name:
        body["name"] = name
    with _client(api, key, data_dir) as client:
        created = check(client.post("/api/v1/devices", json=body))
    out.print_json(data=created)


@app.command("list")
def list_devices(
    device_type: Annotated[str | None, typer.Option("--type")] = None,
    status: Annotated[str | None, typer.Option(help="registered or deregistered")] = None,
    name_prefix: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(help="How many at most.")] = 100,
    api: ApiUrl = DEFAULT_API,
    key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List devices with filters."""
    params = {"type": device_type, "status": status, "name_prefix": name_prefix}
    params = {k: v for k, v in params.items() if v}
    table = Table("id", "name", "type", "status", "registered")
    shown = 0
    cursor: str | None = None
    with _client(api, key, data_dir) as client:
        while shown < limit:
            page_params = {**params, "limit": min(1000, limit - shown)}
            if cursor:
                page_params["cursor"] = cursor
            page = check(client.get("/api/v1/devices", params=page_params))
            for device in page["items"]:
                table.add_row(
                    device["id"],
                    device["name"] or "",
                    device["type"],
                    device["status"],
                    device["registered_at"],
                )
                shown += 1
            cursor = page["next_cursor"]
            if not cursor:
                break
    out.print(table)


@app.command("show")
def show(
    device_id: Annotated[str, typer.Argument()],
    api: ApiUrl = DEFAULT_API,
    key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Show one device."""
    with _client(api, key, data_dir) as client:
        out.print_json(data=check(client.get(f"/api/v1/devices/{device_id}")))


@app.command("deregister")
def deregister(
    device_id: Annotated[str, typer.Argument()],
    api: ApiUrl = DEFAULT_API,
    key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Deregister a device: its credentials stop working, its record stays."""
    with _client(api, key, data_dir) as client:
        out.print_json(data=check(client.delete(f"/api/v1/devices/{device_id}")))


def read_devices_file(path: Path) -> list[dict[str, Any]]:
    """Devices from a JSON list (or {"devices": [...]}) or a CSV with a header row."""
    text = path.read_text()
    if path.suffix.lower() == ".json":
        loaded = json.loads(text)
        items = loaded.get("devices", []) if isinstance(loaded, dict) else loaded
        return [dict(item) for item in items]
    rows = []
    for row in csv.DictReader(text.splitlines()):
        item: dict[str, Any] = {k: v for k, v in row.items() if v not in (None, "")}
        for listed in ("capabilities",):
            if listed in item:
                item[listed] = [c.strip() for c in str(item[listed]).split(";") if c.strip()]
        if "metadata" in item:
            item["metadata"] = json.loads(item["metadata"])
        rows.append(item)
    return rows


@app.command("import")
def import_devices(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV or JSON file.")],
    credentials_out: Annotated[
        Path | None, typer.Option("--credentials-out", help="Write issued secrets here (0600).")
    ] = None,
    api: ApiUrl = DEFAULT_API,
    key: ApiKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Bulk-register devices from CSV (columns: type,id,name,capabilities) or JSON."""
    items = read_devices_file(file)
    created, failed, issued = 0, 0, []
    progress = Progress(
        TextColumn("[bold]importing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    )
    with _client(api, key, data_dir) as client, progress:
        task = progress.add_task("import", total=len(items))
        for start in range(0, len(items), BULK_CHUNK):
            chunk = items[start : start + BULK_CHUNK]
            result = check(client.post("/api/v1/devices:bulk", json={"devices": chunk}))
            created += result["created"]
            failed += result["failed"]
            for item in result["items"]:
                if item["status"] == "created":
                    issued.append(item["credentials"])
                else:
                    out.print(
                        f"[yellow]item {start + item['index']}[/yellow]: {item['error']['detail']}"
                    )
            progress.advance(task, len(chunk))
    if credentials_out is not None:
        credentials_out.touch(mode=0o600)
        credentials_out.write_text(json.dumps(issued, indent=2))
    out.print(f"created {created}, failed {failed}")
    if failed:
        raise typer.Exit(1)
