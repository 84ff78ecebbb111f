"""Analytics end to end over HTTP: telemetry in, models trained, evaluated, run and deployed.

A device posts a sine with noise, a spike and a level shift through the telemetry
API; a model is trained on the first half, evaluated with windows around the
injected anomalies, run over the second half, then deployed: new points with a
spike produce an `anomaly.detected` event and an anomaly record.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from fleetmesh.analytics.domain import parse_ts

pytestmark = pytest.mark.integration

MINUTE = 60_000
N = 4000
TRAIN = 2000
SPIKE, SHIFT = 2600, 3300
PROBLEM_JSON = "application/problem+json"
THERMO = {
    "name": "thermo",
    "telemetry_schema": {"temp": {"type": "number", "unit": "degC", "min": -50, "max": 150}},
    "offline_timeout_s": 600,
    "expected_interval_s": 60,
}


async def eventually(
    probe: Callable[[], Awaitable[Any]], *, timeout: float = 30.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await probe()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def simulated(t0: int) -> list[dict[str, Any]]:
    """A sine with noise, one spike and a level shift; one point a minute."""
    rng = random.Random(11)
    points = []
    for i in range(N):
        value = 20 + 5 * math.sin(2 * math.pi * i / 120) + rng.gauss(0, 0.3)
        value += 15 if i == SPIKE else 0
        value += 8 if i >= SHIFT else 0
        points.append({"metric": "temp", "value": round(value, 4), "ts": t0 + i * MINUTE})
    return points


async def register(client: httpx.AsyncClient, device_id: str) -> str:
    """The device's `Authorization` value for posting telemetry."""
    if (await client.get(f"/api/v1/device-types/{THERMO['name']}")).status_code == 404:
        assert (await client.post("/api/v1/device-types", json=THERMO)).status_code == 201
    created = await client.post("/api/v1/devices", json={"type": "thermo", "id": device_id})
    assert created.status_code == 201, created.text
    return str(created.json()["credentials"]["http_basic"])


async def post_points(
    client: httpx.AsyncClient, device_id: str, auth: str, points: list[dict[str, Any]]
) -> None:
    for start in range(0, len(points), 1000):
        response = await client.post(
            f"/api/v1/devices/{device_id}/telemetry",
            params={"wait": "stored"},
            json=points[start : start + 1000],
            headers={"Authorization": auth},
        )
        assert response.status_code < 300, response.text


async def wait_ready(client: httpx.AsyncClient, model_id: str) -> dict[str, Any]:
    seen: list[float] = []

    async def done() -> dict[str, Any] | None:
        model = (await client.get(f"/api/v1/models/{model_id}")).json()
        seen.append(model["progress"])
        return model if model["status"] != "training" else None

    model: dict[str, Any] = await eventually(done, what="training")
    assert seen == sorted(seen), "progress never goes back"
    return model


async def events(client: httpx.AsyncClient, event_type: str) -> list[dict[str, Any]]:
    body = (await client.get("/api/v1/events", params={"type": event_type})).json()
    return list(body["items"])


def minute_of(ts: str, t0: int) -> int:
    return (parse_ts(ts) - t0) // MINUTE


async def test_telemetry_to_models_evaluation_analysis_and_streaming_detection(
    client: httpx.AsyncClient,
) -> None:
    auth = await register(client, "sensor-1")
    t0 = (int(time.time() * 1000) - (N + 30) * MINUTE) // MINUTE * MINUTE
    points = simulated(t0)
    await post_points(client, "sensor-1", auth, points)
    iso = (await client.get("/api/v1/devices/sensor-1/telemetry?metric=temp&limit=1")).json()
    assert iso["items"], "the telemetry API serves what was stored"

    training = {
        "device_id": "sensor-1",
        "metric": "temp",
        "from": t0,
        "to": points[TRAIN - 1]["ts"],
    }
    created = await client.post(
        "/api/v1/models", json={"name": "thermo-temp", "algorithm": "best", "training": training}
    )
    assert created.status_code == 202, created.text
    assert created.json()["status"] == "training"
    model = await wait_ready(client, created.json()["id"])
    assert model["status"] == "ready", model["error"]
    assert model["training"]["points"] == TRAIN
    assert model["progress"] == 1.0

    rest = {
        "device_id": "sensor-1",
        "metric": "temp",
        "from": _rfc3339(points[TRAIN]["ts"]),
        "to": points[-1]["ts"],
    }
    windows = [[points[i - 5]["ts"], _rfc3339(points[i + 20]["ts"])] for i in (SPIKE, SHIFT)]
    evaluated = await client.post(
        f"/api/v1/models/{model['id']}:evaluate", json={"range": rest, "windows": windows}
    )
    assert evaluated.status_code == 200, evaluated.text
    evaluation = evaluated.json()
    assert evaluation["points"] == N - TRAIN
    assert evaluation["nab_score"] > 0
    assert evaluation["recall"] > 0
    assert evaluation["nab"]["profile"] == "standard"
    assert (await client.get(f"/api/v1/models/{model['id']}")).json()["evaluation"] == evaluation

    analysed = await client.post("/api/v1/analyses", json={"model_id": model["id"], "range": rest})
    assert analysed.status_code == 201, analysed.text
    analysis = analysed.json()
    minutes = [minute_of(a["ts"], t0) for a in analysis["anomalies"]]
    assert any(abs(m - SPIKE) <= 3 for m in minutes), minutes
    assert any(abs(m - SHIFT) <= 10 for m in minutes), minutes
    assert analysis["timing"]["points"] == N - TRAIN
    completed = await eventually(
        lambda: events(client, "fleetmesh.analysis.completed.v1"), what="analysis.completed"
    )
    assert completed[0]["data"]["analysis_id"] == analysis["id"]
    assert completed[0]["data"]["anomalies"] == len(analysis["anomalies"])

    deployed = await client.post(
        f"/api/v1/models/{model['id']}:deploy", json={"device_ids": ["sensor-1"], "metric": "temp"}
    )
    assert deployed.status_code == 201, deployed.text
    deployment = deployed.json()
    listed = (await client.get("/api/v1/deployments")).json()["items"]
    assert [d["id"] for d in listed] == [deployment["id"]]

    now = int(time.time() * 1000) // 1000 * 1000
    fresh = [
        {
            "metric": "temp",
            "value": round(20 + 5 * math.sin(i / 19), 4),
            "ts": now - 60_000 + i * 1000,
        }
        for i in range(50)
    ]
    fresh[40]["value"] = 90.0
    await post_points(client, "sensor-1", auth, fresh)

    async def streamed() -> list[dict[str, Any]]:
        return [
            e
            for e in await events(client, "fleetmesh.anomaly.detected.v1")
            if e["data"]["deployment_id"] == deployment["id"]
        ]

    detected = await eventually(streamed, what="anomaly.detected from streaming")
    assert detected[0]["data"]["value"] == 90.0
    assert parse_ts(detected[0]["data"]["ts"]) == fresh[40]["ts"]
    assert detected[0]["data"]["model_id"] == model["id"]
    assert detected[0]["data"]["score"] >= detected[0]["data"]["threshold"]
    anomalies = (
        await client.get("/api/v1/anomalies", params={"device": "sensor-1", "source": "streaming"})
    ).json()["items"]
    assert [(a["value"], a["deployment_id"]) for a in anomalies] == [(90.0, deployment["id"])]
    window = await client.get(
        "/api/v1/anomalies",
        params={"device": "sensor-1", "from": _rfc3339(now - 120_000), "to": now + 60_000},
    )
    assert [a["value"] for a in window.json()["items"]] == [90.0]

    undeployed = await client.post(f"/api/v1/models/{model['id']}:undeploy", json={})
    assert undeployed.status_code == 200
    assert undeployed.json()["undeployed"][0]["status"] == "undeployed"


def _rfc3339(ms: int) -> str:
    from fleetmesh.analytics.domain import from_ms
    from fleetmesh.core.clock import to_rfc3339

    return to_rfc3339(from_ms(ms))


def assert_problem(response: httpx.Response, status: int, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body = response.json()
    assert body["status"] == status and body["type"].startswith("https://fleetmesh.dev/problems/")
    if field is not None:
        assert field in [error["field"] for error in body.get("errors", [])], body


async def test_bad_input_is_refused_with_problem_details(sqlite_client: httpx.AsyncClient) -> None:
    client = sqlite_client
    now = int(time.time() * 1000)
    training = {"device_id": "nobody", "metric": "temp", "from": now - MINUTE, "to": now}

    def model(**changes: Any) -> dict[str, Any]:
        return {"name": "m", "algorithm": "best", "training": training, **changes}

    assert_problem(
        await client.post("/api/v1/models", json=model(algorithm="magic")), 422, "algorithm"
    )
    assert_problem(
        await client.post("/api/v1/models", json=model(parameters={"nope": 1})), 422, "parameters"
    )
    assert_problem(await client.post("/api/v1/models", json=model(threshold=2)), 422, "threshold")
    assert_problem(await client.post("/api/v1/models", json=model(name="bad name!")), 422, "name")
    backwards = {**training, "from": now, "to": now - MINUTE}
    assert_problem(
        await client.post("/api/v1/models", json=model(training=backwards)), 422, "training.from"
    )
    assert_problem(
        await client.post("/api/v1/models", json=model(training={**training, "from": "soon"})),
        422,
        "training.from",
    )
    assert_problem(await client.get("/api/v1/models/01M8CHFN2C95Y3E7VNZ95Q6S3R"), 404)
    series = [{"ts": now, "value": 1.0}]
    unknown = "/api/v1/models/01M8CHFN2C95Y3E7VNZ95Q6S3R"
    assert_problem(
        await client.post(f"{unknown}:evaluate", json={"series": series, "labels": [0]}), 404
    )
    assert_problem(await client.post(f"{unknown}:deploy", json={"device_ids": ["a"]}), 404)
    assert_problem(await client.post(f"{unknown}:undeploy"), 404)
    assert_problem(
        await client.post("/api/v1/analyses", json={"model_id": unknown[-26:], "series": series}),
        404,
    )
    assert_problem(await client.get("/api/v1/analyses/nope"), 404)
    assert_problem(await client.get("/api/v1/deployments/nope"), 404)
    assert_problem(await client.get("/api/v1/anomalies", params={"cursor": "%%%"}), 422, "cursor")
    assert_problem(await client.get("/api/v1/anomalies", params={"from": "later"}), 422, "from")

    # A model whose training finds no data fails with a reason, and cannot be used.
    created = await client.post("/api/v1/models", json=model())
    assert created.status_code == 202
    failed = await wait_ready(client, created.json()["id"])
    assert failed["status"] == "failed" and failed["error"]
    path = f"/api/v1/models/{failed['id']}"
    assert_problem(
        await client.post(f"{path}:evaluate", json={"series": series, "labels": [0]}), 409
    )
    assert_problem(
        await client.post("/api/v1/analyses", json={"model_id": failed["id"], "series": series}),
        409,
    )
    assert_problem(await client.post(f"{path}:deploy", json={"device_ids": ["a"]}), 409)
    both = {"series": series, "range": training, "labels": [0]}
    assert_problem(await client.post(f"{path}:evaluate", json=both), 422, "series")
    neither_labels = {"series": series}
    assert_problem(await client.post(f"{path}:evaluate", json=neither_labels), 422, "windows")
    assert_problem(await client.post(f"{path}:deploy", json={}), 422, "device_ids")
    assert_problem(await client.post(f"{path}:undeploy", json={"deployment_id": "nope"}), 404)
    algorithms = (await client.get("/api/v1/algorithms")).json()
    best = next(a for a in algorithms if a["name"] == "fleetmesh_novelty")
    assert best["aliases"] == ["best"] and best["default_threshold"] == 0.7
