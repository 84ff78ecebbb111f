"""The device registry over HTTP, on SQLite and PostgreSQL, with the real backbone."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest

pytestmark = pytest.mark.integration

THERMO = {
    "name": "thermo",
    "description": "A thermometer",
    "capabilities": ["temperature", "ping"],
    "telemetry_schema": {"temp": {"type": "number", "unit": "degC", "min": -40, "max": 85}},
    "offline_timeout_s": 60,
    "expected_interval_s": 10,
}


async def _events(client: httpx.AsyncClient, **params: str) -> list[dict[str, object]]:
    for _ in range(100):
        body = (await client.get("/api/v1/events", params=params)).json()
        if body["items"]:
            return list(body["items"])
        await asyncio.sleep(0.05)
    return []


async def test_register_list_deregister_and_read_lifecycle_events(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.post("/api/v1/device-types", json=THERMO)).status_code == 201
    created = await client.post(
        "/api/v1/devices", json={"type": "thermo", "id": "t-1", "name": "Lab"}
    )
    assert created.status_code == 201
    body = created.json()
    assert body["device"]["status"] == "registered"
    assert body["credentials"]["secret"]
    listed = (await client.get("/api/v1/devices")).json()
    assert [d["id"] for d in listed["items"]] == ["t-1"]
    gone = await client.delete("/api/v1/devices/t-1")
    assert gone.status_code == 200
    assert gone.json()["status"] == "deregistered"
    assert gone.json()["deregistered_at"]
    again = (await client.get("/api/v1/devices/t-1")).json()
    assert again["status"] == "deregistered"
    registered = await _events(client, type="fleetmesh.device.registered.v1")
    deregistered = await _events(client, type="fleetmesh.device.deregistered.v1")
    assert [e["subject"] for e in registered] == ["t-1"]
    assert [e["subject"] for e in deregistered] == ["t-1"]
    assert registered[0]["specversion"] == "1.0"
    assert "secret" not in str(registered[0]["data"])


async def test_secret_is_stored_as_argon2_hash_and_rotation_revokes_the_old_one(
    client: httpx.AsyncClient, platform: object
) -> None:
    await client.post("/api/v1/device-types", json=THERMO)
    created = (await client.post("/api/v1/devices", json={"type": "thermo", "id": "t-2"})).json()
    secret = created["credentials"]["secret"]
    from fleetmesh.bootstrap import Platform

    assert isinstance(platform, Platform)
    verifier = platform.provided("device_verifier")
    async with platform.database.session() as session:
        from sqlalchemy import text

        stored = (await session.execute(text("SELECT credential_hash FROM devices"))).scalar_one()
    assert stored.startswith("$argon2id$") and secret not in stored
    assert await verifier.verify_device("t-2", secret)  # type: ignore[union-attr]
    rotated = (await client.post("/api/v1/devices/t-2/credentials:rotate")).json()
    assert rotated["credentials"]["secret"] != secret
    assert not await verifier.verify_device("t-2", secret)  # type: ignore[union-attr]
    assert await verifier.verify_device("t-2", rotated["credentials"]["secret"])  # type: ignore[union-attr]
    await client.delete("/api/v1/devices/t-2")
    assert not await verifier.verify_device("t-2", rotated["credentials"]["secret"])  # type: ignore[union-attr]


async def test_bulk_registration_keeps_good_items_and_reports_bad_ones(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/api/v1/device-types", json=THERMO)
    await client.post("/api/v1/devices", json={"type": "thermo", "id": "taken"})
    items = [{"type": "thermo", "id": f"b-{i}"} for i in range(50)]
    items += [
        {"type": "thermo", "id": "taken"},
        {"type": "nope", "id": "b-x"},
        {"type": "thermo", "id": "bad id!"},
        {"type": "thermo", "id": "b-0"},
        {"type": "thermo", "id": "cap", "capabilities": ["flying"]},
    ]
    response = await client.post("/api/v1/devices:bulk", json={"devices": items})
    assert response.status_code == 207
    body = response.json()
    assert body["created"] == 50 and body["failed"] == 5
    failed = {
        item["index"]: item["error"]["status"]
        for item in body["items"]
        if item["status"] == "failed"
    }
    assert failed == {50: 409, 51: 404, 52: 422, 53: 409, 54: 422}
    assert all(i["credentials"]["secret"] for i in body["items"] if i["status"] == "created")
    page = (await client.get("/api/v1/devices", params={"limit": 1000})).json()
    assert len(page["items"]) == 51


async def test_listing_filters_and_cursor_pagination(client: httpx.AsyncClient) -> None:
    await client.post("/api/v1/device-types", json=THERMO)
    await client.post("/api/v1/device-types", json={**THERMO, "name": "meter"})
    devices = [{"type": "thermo", "id": f"d-{i:02}", "name": f"room-{i:02}"} for i in range(25)]
    devices.append({"type": "meter", "id": "m-1", "name": "garage"})
    await client.post("/api/v1/devices:bulk", json={"devices": devices})
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "10", "type": "thermo"} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/api/v1/devices", params=params)).json()
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [f"d-{i:02}" for i in range(25)]
    prefixed = (await client.get("/api/v1/devices", params={"name_prefix": "gar"})).json()
    assert [d["id"] for d in prefixed["items"]] == ["m-1"]
    await client.delete("/api/v1/devices/d-00")
    gone = (await client.get("/api/v1/devices", params={"status": "deregistered"})).json()
    assert [d["id"] for d in gone["items"]] == ["d-00"]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "field"),
    [
        (
            "post",
            "/api/v1/devices",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            422,
            "body",
        ),
        ("post", "/api/v1/devices", {"json": {"type": 7}}, 422, "type"),
        ("post", "/api/v1/devices", {"json": {"type": "thermo", "colour": "red"}}, 422, "colour"),
        ("post", "/api/v1/devices", {"json": {"type": "nope"}}, 404, None),
        ("post", "/api/v1/devices", {"json": {"type": "thermo", "id": "a b"}}, 422, "id"),
        (
            "post",
            "/api/v1/devices",
            {"json": {"type": "thermo", "metadata": {f"k{i}": "v" for i in range(100)}}},
            422,
            "metadata",
        ),
        ("post", "/api/v1/device-types", {"json": {"name": "Bad Name"}}, 422, "name"),
        ("get", "/api/v1/devices/unknown", {}, 404, None),
        ("delete", "/api/v1/devices/unknown", {}, 404, None),
        ("get", "/api/v1/devices", {"params": {"cursor": "!!"}}, 422, "cursor"),
        ("get", "/api/v1/devices", {"params": {"limit": "0"}}, 422, "query.limit"),
    ],
)
async def test_bad_input_gets_problem_json_never_5xx(
    sqlite_client: httpx.AsyncClient,
    method: str,
    path: str,
    kwargs: dict[str, object],
    status: int,
    field: str | None,
) -> None:
    await sqlite_client.post("/api/v1/device-types", json=THERMO)
    response = await getattr(sqlite_client, method)(path, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status and problem["type"] and problem["detail"]
    if field:
        assert field in [e["field"] for e in problem["errors"]]


async def test_duplicate_device_is_409(sqlite_client: httpx.AsyncClient) -> None:
    await sqlite_client.post("/api/v1/device-types", json=THERMO)
    assert (
        await sqlite_client.post("/api/v1/devices", json={"type": "thermo", "id": "x"})
    ).status_code == 201
    again = await sqlite_client.post("/api/v1/devices", json={"type": "thermo", "id": "x"})
    assert again.status_code == 409
    assert again.json()["type"].endswith("duplicate-device")
    type_again = await sqlite_client.post("/api/v1/device-types", json=THERMO)
    assert type_again.status_code == 409


async def test_oversized_body_is_413(sqlite_client: httpx.AsyncClient) -> None:
    big = b'{"type": "thermo", "name": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    response = await sqlite_client.post(
        "/api/v1/devices", content=big, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["status"] == 413


async def test_missing_invalid_and_insufficient_keys(
    sqlite_client: httpx.AsyncClient, sqlite_platform: object
) -> None:
    from fleetmesh.bootstrap import Platform
    from fleetmesh.core.auth import Role

    assert isinstance(sqlite_platform, Platform)
    anonymous = await sqlite_client.get("/api/v1/devices", headers={"Authorization": ""})
    assert anonymous.status_code == 401
    wrong = await sqlite_client.get(
        "/api/v1/devices", headers={"Authorization": "Bearer fm_nope_nope"}
    )
    assert wrong.status_code == 401
    _, viewer = await sqlite_platform.keys.create(role=Role.viewer, name="v")
    as_viewer = {"Authorization": f"Bearer {viewer}"}
    assert (await sqlite_client.get("/api/v1/devices", headers=as_viewer)).status_code == 200
    denied = await sqlite_client.post("/api/v1/device-types", json=THERMO, headers=as_viewer)
    assert denied.status_code == 403
    assert denied.json()["type"].endswith("forbidden")
    basic = "Basic " + base64.b64encode(b"nobody:secret").decode()
    assert (
        await sqlite_client.get("/api/v1/devices", headers={"Authorization": basic})
    ).status_code == 401


async def test_health_readiness_and_metrics_need_no_key(sqlite_client: httpx.AsyncClient) -> None:
    bare = {"Authorization": ""}
    assert (await sqlite_client.get("/healthz", headers=bare)).status_code == 200
    ready = await sqlite_client.get("/readyz", headers=bare)
    assert ready.status_code == 200 and ready.json()["checks"] == {
        "database": True,
        "nats": True,
        "started": True,
    }
    await sqlite_client.get("/api/v1/devices")
    metrics = (await sqlite_client.get("/metrics", headers=bare)).text
    assert "fleetmesh_http_requests_total" in metrics
    assert "fleetmesh_outbox_backlog" in metrics
    assert (await sqlite_client.get("/openapi.json", headers=bare)).json()["paths"][
        "/api/v1/devices"
    ]
