"""The gateway's route table built from OpenAPI documents."""

from __future__ import annotations

import pytest

from fleetmesh.gateway.routes import RouteTable, routes_from_openapi

pytestmark = pytest.mark.unit


def _doc(*paths: tuple[str, str]) -> dict[str, object]:
    document: dict[str, dict[str, object]] = {}
    for path, method in paths:
        document.setdefault(path, {})[method] = {}
    return {"paths": document}


def test_the_most_specific_template_owns_the_path() -> None:
    table = RouteTable()
    table.replace(
        "devices",
        routes_from_openapi(
            "devices",
            _doc(
                ("/api/v1/devices", "get"),
                ("/api/v1/devices/{device_id}", "get"),
                ("/api/v1/devices/{device_id}:deregister", "post"),
            ),
        ),
    )
    table.replace(
        "telemetry",
        routes_from_openapi("telemetry", _doc(("/api/v1/devices/{device_id}/telemetry", "post"))),
    )
    table.replace("status", routes_from_openapi("status", _doc(("/api/v1/fleet/status", "get"))))
    assert table.owner("GET", "/api/v1/devices") == "devices"
    assert table.owner("GET", "/api/v1/devices/t-1") == "devices"
    assert table.owner("POST", "/api/v1/devices/t-1:deregister") == "devices"
    assert table.owner("POST", "/api/v1/devices/t-1/telemetry") == "telemetry"
    assert table.owner("GET", "/api/v1/fleet/status") == "status"
    assert table.owner("GET", "/api/v1/nothing") is None
    assert table.owner("DELETE", "/api/v1/fleet/status") is None
