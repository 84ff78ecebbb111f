"""The distributed gateway's forwarder: which failures it retries elsewhere, and what it answers."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as StarletteRoute

from fleetmesh.gateway.proxy import Forwarder
from fleetmesh.gateway.routes import Route, RouteTable, routes_from_openapi

pytestmark = pytest.mark.unit

FIRST, SECOND = "http://first:1", "http://second:2"
TELEMETRY_PATH = "/api/v1/devices/d-1/telemetry"


class Picker:
    def candidates(self, service: str, *, key: str | None = None) -> list[str]:
        return [FIRST, SECOND]


PATHS = {
    "telemetry": {"/api/v1/devices/{device_id}/telemetry": {"post": {}}},
    "devices": {"/api/v1/devices": {"post": {}, "get": {}}},
}


def _service_routes(service: str) -> list[Route]:
    return routes_from_openapi(service, {"paths": PATHS[service]})


def _routes(*services: str) -> RouteTable:
    table = RouteTable()
    for service in services:
        table.replace(service, _service_routes(service))
    return table


def _first_dies_mid_request(asked: list[str]) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        asked.append(base)
        if base == FIRST:
            raise httpx.RemoteProtocolError("the instance died", request=request)
        return httpx.Response(202, json={"accepted": 1})

    return handle


def _gateway(forwarder: Forwarder) -> httpx.AsyncClient:
    async def endpoint(request: Request) -> Response:
        return await forwarder(request)

    methods = ["GET", "POST"]
    app = Starlette(routes=[StarletteRoute("/{path:path}", endpoint, methods=methods)])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


def _forwarder(table: RouteTable, asked: list[str]) -> Forwarder:
    upstream = httpx.AsyncClient(transport=httpx.MockTransport(_first_dies_mid_request(asked)))
    return Forwarder(table, Picker(), client=upstream, services=["telemetry", "devices"])


async def test_a_post_with_an_idempotency_key_is_sent_again_to_another_instance() -> None:
    asked: list[str] = []
    async with _gateway(_forwarder(_routes("telemetry", "devices"), asked)) as gateway:
        answer = await gateway.post(
            TELEMETRY_PATH, content=b"[]", headers={"Idempotency-Key": "01J0000000000000000000000A"}
        )
    assert answer.status_code == 202
    assert asked == [FIRST, SECOND]


async def test_a_post_without_a_key_that_failed_mid_request_is_a_502() -> None:
    asked: list[str] = []
    async with _gateway(_forwarder(_routes("telemetry", "devices"), asked)) as gateway:
        answer = await gateway.post(TELEMETRY_PATH, content=b"[]")
    assert answer.status_code == 502
    assert asked == [FIRST]


async def test_an_unknown_path_is_a_503_until_the_routes_of_every_service_are_known() -> None:
    table = _routes("telemetry")
    async with _gateway(_forwarder(table, [])) as gateway:
        early = await gateway.get("/api/v1/devices")
        table.replace("devices", _service_routes("devices"))
        known = await gateway.get("/api/v1/nothing-here")
    assert early.status_code == 503
    assert early.headers["Retry-After"] == "1"
    assert "devices" in early.json()["detail"]
    assert known.status_code == 404
