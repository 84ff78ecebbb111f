"""The web console: one page that talks to the public API with the operator's key."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from fleetmesh import __version__

HERE = Path(__file__).parent
STATIC_PATH = "/console/static"


def mount_console(app: FastAPI) -> None:
    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"])
    )
    page = templates.get_template("console.html").render(static=STATIC_PATH, version=__version__)
    app.mount(STATIC_PATH, StaticFiles(directory=HERE / "static"), name="console-static")

    @app.get("/", include_in_schema=False)
    async def console() -> HTMLResponse:
        return HTMLResponse(page)
