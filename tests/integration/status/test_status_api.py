"""The status HTTP API: views, history pages, manual states, the fleet summary, errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fleetmesh.core.auth import Role
from fleetmesh.core.clock import from_rfc3339, to_rfc3339

pytestmark = pytest.mark.integration

Kit = Any  # the `kit` / `sqlite_kit` fixtures of conftest.py (a StatusKit)
PROBLEM = "application/problem+json"


async def _put(kit: Kit, device_id: str, status: str, **extra: Any) -> Any:
    response = await kit.client.put(
        f"/api/v1/devices/{device_id}/status", json={"status": status, **extra}
    )
    assert response.status_code == 200, response.text
    return response.json()


async def test_view_of_a_device_with_history_availability_and_health(kit: Kit) -> None:
    await kit.define_type(offline_timeout_s=60.0, interval_s=10.0)
    await kit.register("v-1", "v-2")
    fresh = await kit.status("v-2")
    assert fresh["health"]["score"] is None  # nothing known yet: no guess
    assert fresh["availability"]["percent"] is None
    assert all(c["included"] is False for c in fresh["health"]["components"])
    await kit.telemetry("v-1", quality=0.5, count=10)
    online = await kit.wait_status("v-1", "online")
    await asyncio.sleep(0.3)
    await _put(kit, "v-1", "offline", reason="unplugged")
    await asyncio.sleep(0.3)
    body = await kit.status("v-1", window="1h")
    assert body["status"] == "offline" and body["cause"] == "manual"
    assert body["uptime_s"] == 0 and body["type"] == "sensor"
    window = body["availability"]
    assert window["window"] == "1h"
    online_s, offline_s = window["online_s"], window["offline_s"]
    assert online_s >= 0.3 and offline_s >= 0.3  # each state lasted at least its sleep
    assert window["percent"] == pytest.approx(100 * online_s / (online_s + offline_s), abs=0.1)
    assert window["online_s"] + window["offline_s"] + window["excluded_s"] == pytest.approx(
        3600, abs=0.01
    )
    components = {c["name"]: c for c in body["health"]["components"]}
    assert components["data_quality"]["score"] == pytest.approx(50.0)
    assert "over 10 recent points" in components["data_quality"]["reason"]
    assert components["freshness"]["score"] == 100.0
    assert body["health"]["score"] is not None and body["health"]["reasons"]
    assert body["health"]["reasons"][0].startswith(("availability", "data_quality"))
    assert body["last_seen"] == online["last_seen"]
    again = await _put(kit, "v-1", "online")
    assert again["uptime_s"] >= 0 and again["offline_deadline"] is not None


async def test_history_pages_with_a_cursor_and_a_time_range(kit: Kit) -> None:
    await kit.define_type(offline_timeout_s=60.0)
    await kit.register("h-1")
    for state in ("online", "offline", "maintenance", "online", "offline"):
        await _put(kit, "h-1", state)
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        response = await kit.client.get("/api/v1/devices/h-1/status/history", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert [h["sequence"] for h in seen] == [0, 1, 2, 3, 4, 5]
    assert [h["previous"] for h in seen] == [
        None,
        "registered",
        "online",
        "offline",
        "maintenance",
        "online",
    ]
    start = from_rfc3339(seen[2]["at"])
    end = from_rfc3339(seen[4]["at"])
    ranged = await kit.client.get(
        "/api/v1/devices/h-1/status/history",
        params={"from": to_rfc3339(start), "to": to_rfc3339(end)},
    )
    assert [h["sequence"] for h in ranged.json()["items"]] == [
        h["sequence"] for h in seen if start <= from_rfc3339(h["at"]) < end
    ]
    assert ranged.json()["items"][0]["sequence"] == 2


async def test_fleet_summary_counts_ranks_and_lists_changes(kit: Kit) -> None:
    await kit.define_type("meter", offline_timeout_s=60.0)
    await kit.define_type("valve", offline_timeout_s=60.0)
    await kit.register("a-1", "a-2", "a-3", type_name="meter")
    await kit.register("b-1", "b-2", type_name="valve")
    for device_id in ("a-1", "a-2", "b-1"):
        await kit.telemetry(device_id, quality=0.9)
    await kit.telemetry("b-2", quality=0.1)
    await kit.wait_status("b-2", "online")
    await kit.wait_status("a-2", "online")
    await _put(kit, "a-2", "offline")
    await _put(kit, "b-1", "maintenance")
    response = await kit.client.get("/api/v1/fleet/status", params={"lowest": "3"})
    assert response.status_code == 200, response.text
    fleet = response.json()
    assert fleet["total"] == 5
    assert fleet["by_status"] == {
        "registered": 1,
        "online": 2,
        "offline": 1,
        "maintenance": 1,
        "deregistered": 0,
    }
    assert fleet["by_type"] == {
        "meter": {"registered": 1, "online": 1, "offline": 1},
        "valve": {"online": 1, "maintenance": 1},
    }
    lowest = [d["device_id"] for d in fleet["lowest_health"]]
    scores = [d["score"] for d in fleet["lowest_health"]]
    assert {"a-2", "b-2"} <= set(lowest)  # offline; poor data quality
    assert scores == sorted(scores) and len(lowest) == 3
    assert all(d["reasons"] for d in fleet["lowest_health"])
    recent = [(c["device_id"], c["current"]) for c in fleet["recently_changed"]]
    assert recent[:2] == [("b-1", "maintenance"), ("a-2", "offline")]
    assert all(c["sequence"] > 0 for c in fleet["recently_changed"])


async def test_errors_are_problem_json(sqlite_kit: Kit) -> None:
    kit = sqlite_kit
    await kit.define_type()
    await kit.register("e-1")
    cases = [
        ("get", "/api/v1/devices/nope/status", {}, 404),
        ("get", "/api/v1/devices/nope/status/history", {}, 404),
        ("put", "/api/v1/devices/nope/status", {"json": {"status": "online"}}, 404),
        ("get", "/api/v1/devices/e-1/status", {"params": {"window": "soon"}}, 422),
        ("get", "/api/v1/devices/e-1/status", {"params": {"window": "0s"}}, 422),
        ("get", "/api/v1/devices/e-1/status", {"params": {"window": "400d"}}, 422),
        ("get", "/api/v1/fleet/status", {"params": {"window": "-1h"}}, 422),
        ("put", "/api/v1/devices/e-1/status", {"json": {"status": "deregistered"}}, 422),
        ("put", "/api/v1/devices/e-1/status", {"json": {"status": "asleep"}}, 422),
        ("put", "/api/v1/devices/e-1/status", {"json": {"status": "online", "x": 1}}, 422),
        (
            "put",
            "/api/v1/devices/e-1/status",
            {"json": {"status": "online"}, "headers": {"If-Match": "yesterday"}},
            422,
        ),
        (
            "get",
            "/api/v1/devices/e-1/status/history",
            {"params": {"from": "2030-01-02T00:00:00Z", "to": "2030-01-01T00:00:00Z"}},
            422,
        ),
        ("get", "/api/v1/devices/e-1/status/history", {"params": {"cursor": "!!"}}, 422),
        ("get", "/api/v1/devices/e-1/status/history", {"params": {"limit": "0"}}, 422),
    ]
    for method, path, kwargs, status in cases:
        response = await kit.client.request(method.upper(), path, **kwargs)
        assert response.status_code == status, (path, kwargs, response.text)
        assert response.headers["content-type"].startswith(PROBLEM)
    _, viewer_key = await kit.platform.keys.create(role=Role.viewer, name="viewer")
    viewer = {"Authorization": f"Bearer {viewer_key}"}
    assert (await kit.client.get("/api/v1/devices/e-1/status", headers=viewer)).status_code == 200
    forbidden = await kit.client.put(
        "/api/v1/devices/e-1/status", json={"status": "online"}, headers=viewer
    )
    assert forbidden.status_code == 403
    anonymous = await kit.client.get(
        "/api/v1/fleet/status", headers={"Authorization": "Bearer nope"}
    )
    assert anonymous.status_code == 401
