"""The HTTP front of a process: the routers of its contexts, health, metrics and the console."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fleetmesh import __version__
from fleetmesh.bootstrap import Platform
from fleetmesh.core.auth import DeviceVerifier
from fleetmesh.core.device_auth import NatsDeviceVerifier
from fleetmesh.core.http import (
    AssumeJson,
    Authenticator,
    BodySizeLimit,
    install_error_handlers,
    install_metrics_middleware,
)
from fleetmesh.gateway.console import mount_console


def create_app(
    platform: Platform,
    *,
    manage_lifecycle: bool = False,
    on_started: Callable[[Platform], Awaitable[None]] | None = None,
    on_stopping: Callable[[Platform], Awaitable[None]] | None = None,
) -> FastAPI:
    """Build the ASGI app; with `manage_lifecycle` the app starts and stops the platform."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            await platform.start()
        _mount(app, platform)
        if on_started is not None:
            await on_started(platform)
        try:
            yield
        finally:
            if on_stopping is not None:
                await on_stopping(platform)
            if manage_lifecycle:
                await platform.stop()

    app = FastAPI(
        title="fleetmesh",
        version=__version__,
        description="Device registry, telemetry, status, analytics, event bus and governance.",
        lifespan=lifespan,
    )
    app.state.authenticator = Authenticator(platform.keys)
    platform.app = app
    install_error_handlers(app)
    install_metrics_middleware(app, platform.metrics)
    app.add_middleware(AssumeJson)
    app.add_middleware(BodySizeLimit, max_bytes=platform.settings.max_body_bytes)
    _add_health_routes(app, platform)
    mount_console(app)
    if platform.started:
        _mount(app, platform)
    return app


def _mount(app: FastAPI, platform: Platform) -> None:
    if getattr(app.state, "mounted", False):
        return
    for module in platform.modules:
        for router in module.routers:
            app.include_router(router)
    verifier = platform.provided("device_verifier")
    assert isinstance(app.state.authenticator, Authenticator)
    # Without the devices context in this process, ask the devices service over NATS.
    app.state.authenticator.devices = (
        _as_verifier(verifier) if verifier is not None else NatsDeviceVerifier(platform.backbone)
    )
    app.openapi_schema = None
    app.state.mounted = True


def _as_verifier(candidate: object) -> DeviceVerifier:
    if not hasattr(candidate, "verify_device"):
        raise TypeError("device_verifier must have verify_device()")
    return candidate


def _add_health_routes(app: FastAPI, platform: Platform) -> None:
    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        checks: dict[str, Any] = {
            "database": await platform.database.ping(),
            "nats": platform.backbone.connected and await platform.backbone.ping(),
            "started": platform.started,
        }
        ready = all(checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics", tags=["health"])
    async def metrics() -> Response:
        platform.metrics.outbox_backlog.set(await platform.relay.backlog())
        return Response(generate_latest(platform.metrics.registry), media_type=CONTENT_TYPE_LATEST)
