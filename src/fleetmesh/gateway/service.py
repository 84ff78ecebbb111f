"""The gateway as its own process: console, health, and the proxy to every service."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fleetmesh import __version__
from fleetmesh.core.logging import get_logger
from fleetmesh.gateway.console import mount_console
from fleetmesh.gateway.proxy import Forwarder, InstancePicker
from fleetmesh.gateway.routes import RouteTable, routes_from_openapi

log = get_logger(__name__)

REFRESH_SECONDS = 2.0
PROXIED_PREFIXES = ("/api/", "/asyncapi.json")


class RouteRefresher:
    """Keeps the route table in step with the services that have healthy instances."""

    def __init__(self, routes: RouteTable, picker: InstancePicker, services: list[str]) -> None:
        self.routes = routes
        self.picker = picker
        self.services = services
        self._known: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def refresh_once(self, client: httpx.AsyncClient) -> None:
        for service in self.services:
            candidates = self.picker.candidates(service)
            if not candidates or self._known.get(service) in candidates:
                continue
            try:
                document = (await client.get(candidates[0] + "/openapi.json")).json()
            except (httpx.HTTPError, ValueError) as error:
                log.warning("openapi_fetch_failed", service=service, error=repr(error))
                continue
            self.routes.replace(service, routes_from_openapi(service, document))
            self._known[service] = candidates[0]

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                await self.refresh_once(client)
                await asyncio.sleep(REFRESH_SECONDS)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="gateway-routes")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def create_gateway_app(picker: InstancePicker, services: list[str], *, lifecycle: Any) -> FastAPI:
    """`lifecycle` starts/stops the picker's discovery (an async context manager factory)."""
    routes = RouteTable()
    forwarder = Forwarder(routes, picker, services=services)
    refresher = RouteRefresher(routes, picker, services)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with lifecycle():
            refresher.start()
            try:
                yield
            finally:
                await refresher.stop()
                await forwarder.client.aclose()

    app = FastAPI(title="fleetmesh gateway", version=__version__, lifespan=lifespan)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "routes_from": routes.services}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        """200 once the routes of every service are known (until then, requests may get 503)."""
        missing = forwarder.missing_services()
        body = {"status": "not ready" if missing else "ready", "routes_missing": missing}
        return JSONResponse(body, status_code=503 if missing else 200)

    mount_console(app)

    @app.api_route(
        "/{path:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        include_in_schema=False,
    )
    async def proxy(request: Request, path: str) -> Response:  # noqa: ARG001
        return await forwarder(request)

    return app
