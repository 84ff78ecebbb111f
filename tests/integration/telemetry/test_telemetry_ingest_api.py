"""Telemetry over HTTP on the real platform: ingest, per-item results, auth, queries, transforms."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import httpx
import pytest

from fleetmesh.bootstrap import Platform
from fleetmesh.core.auth import Role

pytestmark = pytest.mark.integration

MINUTE_MS = 60_000

SENSOR = {
    "name": "sensor",
    "telemetry_schema": {
        "temp": {"type": "number", "unit": "degC", "min": -40, "max": 85},
        "hum": {"type": "number", "min": 0, "max": 100},
        "count": {"type": "integer"},
        "door": {"type": "boolean"},
        "mode": {"type": "string"},
    },
    "offline_timeout_s": 60,
    "expected_interval_s": 10,
}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def register(client: httpx.AsyncClient, device_id: str) -> dict[str, Any]:
    if (await client.get("/api/v1/device-types/sensor")).status_code == 404:
        assert (await client.post("/api/v1/device-types", json=SENSOR)).status_code == 201
    created = await client.post("/api/v1/devices", json={"type": "sensor", "id": device_id})
    assert created.status_code == 201, created.text
    credentials: dict[str, Any] = created.json()["credentials"]
    return credentials


async def post(
    client: httpx.AsyncClient, device_id: str, body: object, **params: str
) -> httpx.Response:
    return await client.post(
        f"/api/v1/devices/{device_id}/telemetry",
        content=json.dumps(body),
        params={"wait": "stored", **params},
    )


async def points(client: httpx.AsyncClient, device_id: str, **params: Any) -> list[dict[str, Any]]:
    answer = await client.get(f"/api/v1/devices/{device_id}/telemetry", params=params)
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


async def test_single_batch_and_compact_ingest_store_good_points_and_report_bad_ones(
    client: httpx.AsyncClient,
) -> None:
    await register(client, "s-1")
    at = now_ms() - 5_000

    single = await post(client, "s-1", {"metric": "temp", "value": 21.5, "ts": at})
    assert single.status_code == 202, single.text
    body = single.json()
    assert body["accepted"] == 1 and body["rejected"] == 0 and body["stored"] is True
    assert body["items"] == [
        {
            "index": 0,
            "id": f"{body['message_id']}:0",
            "quality": 1.0,
            "quality_reasons": [],
            "status": "accepted",
        }
    ]

    mixed = await post(
        client,
        "s-1",
        [
            {"metric": "temp", "value": 22.5, "ts": at + 1},
            {"metric": "temp", "value": 500, "ts": at + 2},  # out of range
            {"metric": "nope", "value": 1, "ts": at + 3},  # unknown metric
            {"metric": "door", "value": True, "ts": at + 4},
            {"metric": "count", "value": "many", "ts": at + 5},  # wrong type
            {"metric": "mode", "value": "eco", "ts": at + 6},
            {"metric": "count", "value": 7, "ts": at + 7},
        ],
    )
    assert mixed.status_code == 207, mixed.text
    result = mixed.json()
    assert (result["accepted"], result["rejected"]) == (4, 3)
    statuses = [(item["index"], item["status"]) for item in result["items"]]
    assert statuses == [
        (0, "accepted"),
        (1, "rejected"),
        (2, "rejected"),
        (3, "accepted"),
        (4, "rejected"),
        (5, "accepted"),
        (6, "accepted"),
    ]
    rejected = {item["index"]: item for item in result["items"] if item["status"] == "rejected"}
    assert rejected[1]["reason"] == "out_of_range" and rejected[1]["field"] == "value"
    assert rejected[2]["reason"] == "unknown_metric"
    assert rejected[4]["reason"] == "wrong_type"

    compact = await post(client, "s-1", {"ts": at + 10, "values": {"temp": 23.0, "hum": 40}})
    assert compact.status_code == 202, compact.text
    assert compact.json()["accepted"] == 2

    stored = await points(client, "s-1")
    assert [(p["metric"], p["value"]) for p in stored] == [
        ("temp", 21.5),
        ("temp", 22.5),
        ("door", True),
        ("mode", "eco"),
        ("count", 7),
        ("hum", 40.0),
        ("temp", 23.0),
    ]
    assert all(p["ts"].endswith("Z") for p in stored)

    none = await post(client, "s-1", [{"metric": "temp", "value": "hot"}, {"metric": "x"}])
    assert none.status_code == 422
    assert none.headers["content-type"] == "application/problem+json"
    problem = none.json()
    assert problem["accepted"] == 0 and problem["rejected"] == 2 and problem["message_id"] is None
    assert [item["status"] for item in problem["items"]] == ["rejected", "rejected"]

    malformed = await post(client, "s-1", "not a batch")
    assert malformed.status_code == 400
    assert malformed.json()["type"].endswith("/malformed-telemetry")


async def test_the_time_of_the_last_store_is_exported_for_monitoring(
    client: httpx.AsyncClient,
) -> None:
    await register(client, "s-clock")
    before = time.time()
    answer = await post(client, "s-clock", {"metric": "temp", "value": 20.0, "ts": now_ms()})
    assert answer.status_code == 202 and answer.json()["stored"] is True
    after = time.time()

    metrics = (await client.get("/metrics")).text
    name = "fleetmesh_telemetry_last_stored_timestamp_seconds "
    line = next(line for line in metrics.splitlines() if line.startswith(name))
    assert before <= float(line.removeprefix(name)) <= after


async def test_device_writes_only_its_own_telemetry_and_viewer_keys_cannot_write(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    own = await register(sqlite_client, "d-own")
    await register(sqlite_client, "d-other")
    basic = {"Authorization": own["http_basic"]}
    point = json.dumps({"metric": "temp", "value": 20.0})

    mine = await sqlite_client.post("/api/v1/devices/d-own/telemetry", content=point, headers=basic)
    assert mine.status_code == 202, mine.text
    other = await sqlite_client.post(
        "/api/v1/devices/d-other/telemetry",
        content=point,
        headers=basic,
        params={"wait": "stored"},  # were it accepted, it would be queryable below
    )
    assert other.status_code == 403
    assert other.headers["content-type"] == "application/problem+json"
    assert await points(sqlite_client, "d-other") == [], "nothing stored under the other id"
    wrong_secret = base64.b64encode(b"d-own:not-the-secret").decode()
    refused = await sqlite_client.post(
        "/api/v1/devices/d-own/telemetry",
        content=point,
        headers={"Authorization": f"Basic {wrong_secret}"},
    )
    assert refused.status_code == 401

    _, viewer_key = await sqlite_platform.keys.create(role=Role.viewer, name="viewer")
    viewer = {"Authorization": f"Bearer {viewer_key}"}
    denied = await sqlite_client.post(
        "/api/v1/devices/d-own/telemetry", content=point, headers=viewer
    )
    assert denied.status_code == 403
    readable = await sqlite_client.get("/api/v1/devices/d-own/telemetry/latest", headers=viewer)
    assert readable.status_code == 200


async def test_unknown_deregistered_and_just_registered_devices(
    sqlite_client: httpx.AsyncClient,
) -> None:
    point = json.dumps({"metric": "temp", "value": 20.0})
    await register(sqlite_client, "d-gone")
    assert (await sqlite_client.delete("/api/v1/devices/d-gone")).status_code == 200

    # Registered and used at once, before the outbox relay published the event.
    created = await sqlite_client.post("/api/v1/devices", json={"type": "sensor", "id": "d-new"})
    assert created.status_code == 201
    fresh = await sqlite_client.post("/api/v1/devices/d-new/telemetry", content=point)
    assert fresh.status_code == 202, fresh.text

    for _ in range(50):
        gone = await sqlite_client.post("/api/v1/devices/d-gone/telemetry", content=point)
        if gone.status_code == 409:
            break
        await asyncio.sleep(0.05)
    assert gone.status_code == 409
    assert gone.json()["type"].endswith("/device-not-active")

    missing = await sqlite_client.post("/api/v1/devices/d-missing/telemetry", content=point)
    assert missing.status_code == 404
    assert missing.json()["type"].endswith("/device-not-found")


async def test_aggregates_latest_and_paging(client: httpx.AsyncClient) -> None:
    await register(client, "s-agg")
    base = (now_ms() - 30 * MINUTE_MS) // MINUTE_MS * MINUTE_MS
    samples = [
        (base, 10.0),
        (base + 10_000, 20.0),
        (base + MINUTE_MS, 30.0),
        (base + 2 * MINUTE_MS, 40.0),
        (base + 2 * MINUTE_MS + 1, 50.0),
        (base + 2 * MINUTE_MS + 2, 60.0),
    ]
    batch = [{"metric": "temp", "value": v, "ts": ts} for ts, v in samples]
    batch.append({"metric": "door", "value": False, "ts": base})
    assert (await post(client, "s-agg", batch)).status_code == 202

    async def buckets(agg: str, **extra: str) -> list[tuple[Any, int]]:
        answer = await client.get(
            "/api/v1/devices/s-agg/telemetry",
            params={
                "metric": "temp",
                "agg": agg,
                "interval": "1m",
                "from": str(base),
                "to": str(base + 3 * MINUTE_MS),
                **extra,
            },
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["metric"], body["agg"], body["interval"]) == ("temp", agg, "1m")
        return [(b["value"], b["count"]) for b in body["buckets"]]

    assert await buckets("avg") == [(15.0, 2), (30.0, 1), (50.0, 3)]
    assert await buckets("min") == [(10.0, 2), (30.0, 1), (40.0, 3)]
    assert await buckets("max") == [(20.0, 2), (30.0, 1), (60.0, 3)]
    assert await buckets("sum") == [(30.0, 2), (30.0, 1), (150.0, 3)]
    assert await buckets("count") == [(2, 2), (1, 1), (3, 3)]
    assert await buckets("last") == [(20.0, 2), (30.0, 1), (60.0, 3)]
    starts = await client.get(
        "/api/v1/devices/s-agg/telemetry",
        params={"metric": "temp", "agg": "avg", "interval": "1m", "from": str(base)},
    )
    first = starts.json()["buckets"][0]["start"]
    assert first == time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(base / 1000))

    bad_agg = await client.get(
        "/api/v1/devices/s-agg/telemetry", params={"metric": "temp", "agg": "median"}
    )
    assert bad_agg.status_code == 422
    assert bad_agg.json()["errors"][0]["field"] == "agg"
    bad_metric = await client.get(
        "/api/v1/devices/s-agg/telemetry", params={"metric": "pressure", "agg": "avg"}
    )
    assert bad_metric.status_code == 422
    assert bad_metric.json()["errors"][0]["field"] == "metric"
    bad_time = await client.get("/api/v1/devices/s-agg/telemetry", params={"from": "yesterday"})
    assert bad_time.status_code == 422
    assert bad_time.json()["errors"][0]["field"] == "from"
    not_numeric = await client.get(
        "/api/v1/devices/s-agg/telemetry", params={"metric": "door", "agg": "avg"}
    )
    assert not_numeric.status_code == 422

    latest = (await client.get("/api/v1/devices/s-agg/telemetry/latest")).json()["metrics"]
    assert latest["temp"]["value"] == 60.0 and latest["door"]["value"] is False

    seen: list[float] = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"metric": "temp", "limit": 4}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/api/v1/devices/s-agg/telemetry", params=params)).json()
        seen.extend(p["value"] for p in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [v for _, v in samples]
    rfc = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime((base + MINUTE_MS) / 1000))
    ranged = await points(client, "s-agg", metric="temp", **{"from": rfc})
    assert [p["value"] for p in ranged] == [30.0, 40.0, 50.0, 60.0]


async def test_transforms_are_validated_and_applied(sqlite_client: httpx.AsyncClient) -> None:
    await register(sqlite_client, "s-tr")
    bad = await sqlite_client.put(
        "/api/v1/device-types/sensor/transforms",
        json=[{"type": "scale", "metric": "temp", "scale": 0}],
    )
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"].startswith("transforms[0]")
    missing = await sqlite_client.put("/api/v1/device-types/nope/transforms", json=[])
    assert missing.status_code == 404

    transforms = [
        {"type": "rename", "from": "t", "to": "temp"},
        {"type": "scale", "metric": "hum", "scale": 0.1, "offset": 0},
    ]
    good = await sqlite_client.put("/api/v1/device-types/sensor/transforms", json=transforms)
    assert good.status_code == 200, good.text
    assert good.json()["transforms"] == transforms
    answer = await post(sqlite_client, "s-tr", {"values": {"t": 20.5, "hum": 455}})
    assert answer.status_code == 202, answer.text
    stored = {p["metric"]: p["value"] for p in await points(sqlite_client, "s-tr")}
    assert stored == {"temp": 20.5, "hum": pytest.approx(45.5)}
    read = await sqlite_client.get("/api/v1/device-types/sensor/transforms")
    assert read.json()["transforms"] == transforms


async def test_live_max_batch_points_refuses_larger_batches(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    await register(sqlite_client, "s-big")
    kv = await sqlite_platform.backbone.js.key_value("config")
    await kv.put(
        "default.telemetry.max_batch_points",
        json.dumps({"version": time.time_ns(), "value": 3}).encode(),
    )
    for _ in range(100):
        if sqlite_platform.live_config.get("telemetry", "max_batch_points") == 3:
            break
        await asyncio.sleep(0.02)
    at = now_ms()
    batch = [{"metric": "temp", "value": float(i), "ts": at - i} for i in range(4)]
    too_large = await post(sqlite_client, "s-big", batch)
    assert too_large.status_code == 413
    assert too_large.json()["limit"] == 3
    assert (await post(sqlite_client, "s-big", batch[:3])).status_code == 202
    assert (await sqlite_client.get("/openapi.json")).status_code == 200
