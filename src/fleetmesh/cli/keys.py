"""`fleetmesh keys`: operator API keys, managed directly on the platform's database."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fleetmesh.cli.options import DEFAULT_DATA_DIR, DatabaseUrl, DataDir
from fleetmesh.core.auth import ApiKeyStore, Role
from fleetmesh.core.database import Database
from fleetmesh.core.errors import FleetmeshError
from fleetmesh.core.settings import Settings

app = typer.Typer(help="Create, list and revoke operator API keys.", no_args_is_help=True)
console = Console()


def _database(data_dir: DataDir, database_url: str | None) -> Database:
    settings = Settings(data_dir=data_dir, database_url=database_url)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Database(settings.sqlalchemy_url)


async def _with_store(data_dir: DataDir, database_url: str | None) -> tuple[Database, ApiKeyStore]:
    database = _database(data_dir, database_url)
    await database.migrate()
    return database, ApiKeyStore(database)


@app.command("create")
def create(
    role: Annotated[str, typer.Option(help="admin, operator or viewer")] = "viewer",
    name: Annotated[str, typer.Option(help="A label to recognise the key by.")] = "cli",
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a key; it is printed once and stored only as a hash."""
    try:
        parsed = Role.parse(role)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--role") from None

    async def run() -> None:
        database, store = await _with_store(data_dir, database_url)
        try:
            record, plaintext = await store.create(role=parsed, name=name)
        finally:
            await database.dispose()
        console.print(f"[bold]{plaintext}[/bold]")
        console.print(
            f"id {record.id}, role {record.role.name}: keep it safe, it is not shown again."
        )

    asyncio.run(run())


@app.command("list")
def list_keys(data_dir: DataDir = DEFAULT_DATA_DIR, database_url: DatabaseUrl = None) -> None:
    """List keys (never their secrets)."""

    async def run() -> None:
        database, store = await _with_store(data_dir, database_url)
        try:
            records = await store.list()
        finally:
            await database.dispose()
        table = Table("id", "name", "role", "prefix", "created", "revoked")
        for r in records:
            table.add_row(
                r.id, r.name, r.role.name, r.prefix, str(r.created_at), str(r.revoked_at or "")
            )
        console.print(table)

    asyncio.run(run())


@app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (see `keys list`).")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
) -> None:
    """Revoke a key; requests with it fail within seconds."""

    async def run() -> None:
        database, store = await _with_store(data_dir, database_url)
        try:
            await store.revoke(key_id)
        finally:
            await database.dispose()
        console.print(f"revoked {key_id}")

    try:
        asyncio.run(run())
    except FleetmeshError as error:
        console.print(f"[red]{error.detail}[/red]")
        raise typer.Exit(1) from None
