"""Options shared by several commands; each also reads `FLEETMESH_<NAME>`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DataDir = Annotated[
    Path,
    typer.Option("--data-dir", envvar="FLEETMESH_DATA_DIR", help="Where fleetmesh keeps its data."),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="FLEETMESH_DATABASE_URL",
        help="postgresql://... to use PostgreSQL instead of SQLite in the data dir.",
    ),
]
ApiUrl = Annotated[
    str,
    typer.Option("--api", envvar="FLEETMESH_API_URL", help="The fleetmesh HTTP API to talk to."),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--key",
        envvar="FLEETMESH_API_KEY",
        help="Operator API key (default: the admin key file in the data dir).",
    ),
]
DEFAULT_DATA_DIR = Path(".fleetmesh")
DEFAULT_API = "http://127.0.0.1:8080"
