"""A small client of the fleetmesh HTTP API for the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console

console = Console(stderr=True)


def resolve_key(key: str | None, data_dir: Path) -> str:
    if key:
        return key
    key_file = data_dir / "admin.key"
    if key_file.exists():
        return key_file.read_text().strip()
    console.print(
        f"[red]No API key:[/red] pass --key, set FLEETMESH_API_KEY, or run where {key_file} exists."
    )
    raise typer.Exit(2)


def api_client(api: str, key: str, *, timeout: float = 60.0) -> httpx.Client:
    return httpx.Client(
        base_url=api.rstrip("/"), headers={"Authorization": f"Bearer {key}"}, timeout=timeout
    )


def check(response: httpx.Response) -> Any:
    """The JSON body of a successful answer; a clear message and exit code otherwise."""
    if response.status_code < 400:
        return response.json() if response.content else None
    try:
        problem = response.json()
        message = problem.get("detail") or problem.get("title")
        for error in problem.get("errors", []):
            message += f"\n  {error.get('field')}: {error.get('message')}"
    except ValueError:
        message = response.text
    console.print(f"[red]{response.status_code}[/red] {message}")
    raise typer.Exit(1)
