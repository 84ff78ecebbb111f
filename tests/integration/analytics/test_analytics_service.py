"""The analytics service on the real platform, with telemetry replaced by an in-memory reader.

These tests pin the service layer (training jobs, evaluation, analyses, streaming
detection, checkpoints, restarts, dead letters) independently of the telemetry
context; `test_analytics_api.py` runs the same flow end to end through telemetry.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, func, select

from fleetmesh.analytics import consumers
from fleetmesh.analytics.consumers import StreamingDetection
from fleetmesh.analytics.domain import SeriesRef, TelemetryNotFound, from_ms
from fleetmesh.analytics.jobs import INTERRUPTED_BY_RESTART, TrainingJobs
from fleetmesh.analytics.module import COLLECTED_CONSUMER
from fleetmesh.analytics.reader import SeriesPage
from fleetmesh.analytics.repository import anomalies, checkpoints, dead_letters
from fleetmesh.analytics.service import (
    AnalyticsService,
    AnalyticsUnitOfWork,
    CreateModel,
    create_model,
)
from fleetmesh.bootstrap import Platform, bootstrap
from fleetmesh.core.backbone import EVENTS_STREAM
from fleetmesh.core.clock import to_rfc3339
from fleetmesh.core.envelope import CloudEvent
from support import client_for, make_settings

pytestmark = pytest.mark.integration

MINUTE = 60_000
N = 4000
SPIKE, SHIFT = 2600, 3300


class MemoryTelemetry:
    """Implements the reader port over points held in memory."""

    def __init__(self) -> None:
        self.points: dict[tuple[str, str], dict[int, float]] = {}
        self.fail_for: set[str] = set()
        self.reads = 0

    def add(self, device_id: str, metric: str, points: list[tuple[int, float]]) -> None:
        self.points.setdefault((device_id, metric), {}).update(points)

    async def read(
        self, device_id: str, metric: str, start_ms: int, end_ms: int
    ) -> AsyncIterator[SeriesPage]:
        self.reads += 1
        if device_id in self.fail_for:
            raise TelemetryNotFound(f"device {device_id} is unknown")
        series = sorted(
            (ts, v)
            for ts, v in self.points.get((device_id, metric), {}).items()
            if start_ms <= ts <= end_ms
        )
        for start in range(0, max(len(series), 1), 500):
            chunk = series[start : start + 500]
            covered = chunk[-1][0] if start + 500 < len(series) else end_ms
            yield SeriesPage([t for t, _ in chunk], [v for _, v in chunk], covered)


def simulated_series(t0: int) -> list[tuple[int, float]]:
    rng = random.Random(7)
    points = []
    for i in range(N):
        value = 20 + 5 * math.sin(2 * math.pi * i / 120) + rng.gauss(0, 0.3)
        value += 15 if i == SPIKE else 0
        value += 8 if i >= SHIFT else 0
        points.append((t0 + i * MINUTE, value))
    return points


def use_memory_telemetry(platform: Platform) -> MemoryTelemetry:
    memory = MemoryTelemetry()
    for name in ("analytics_service", "analytics_jobs", "analytics_streaming"):
        part = platform.provided(name)
        assert isinstance(part, AnalyticsService | TrainingJobs | StreamingDetection)
        part.reader = memory
    return memory


def streaming(platform: Platform) -> StreamingDetection:
    part = platform.provided("analytics_streaming")
    assert isinstance(part, StreamingDetection)
    return part


async def eventually(
    probe: Callable[[], Awaitable[Any]], *, timeout: float = 20.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await probe()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def ready_model(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    created = await client.post("/api/v1/models", json=body)
    assert created.status_code == 202, created.text
    assert created.headers["location"] == f"/api/v1/models/{created.json()['id']}"

    async def done() -> dict[str, Any] | None:
        model = (await client.get(f"/api/v1/models/{created.json()['id']}")).json()
        assert 0.0 <= model["progress"] <= 1.0
        return model if model["status"] != "training" else None

    model: dict[str, Any] = await eventually(done, what="training")
    return model


async def collected(platform: Platform, device_id: str, points: list[tuple[int, float]]) -> str:
    """Publish a telemetry.collected event for points already in the reader."""
    event = CloudEvent(
        type="fleetmesh.telemetry.collected.v1",
        source="/fleetmesh/telemetry",
        subject=device_id,
        data={
            "device_id": device_id,
            "count": len(points),
            "first_ts": to_rfc3339(from_ms(points[0][0])),
            "last_ts": to_rfc3339(from_ms(points[-1][0])),
            "metrics": ["temp"],
            "received_at": to_rfc3339(platform.clock.now()),
            "quality_mean": 1.0,
            "message_id": "m-" + str(points[0][0]),
        },
    )
    await platform.backbone.publish(event.nats_subject, event.to_json(), msg_id=event.id)
    return event.id


async def consumer_idle(platform: Platform, durable: str = COLLECTED_CONSUMER) -> None:
    async def idle() -> bool:
        info = await platform.backbone.js.consumer_info(EVENTS_STREAM, durable)
        return int(info.num_pending) == 0 and int(info.num_ack_pending) == 0

    await eventually(idle, what=f"consumer {durable} to drain")


async def count(platform: Platform, table: Any) -> int:
    async with platform.database.session() as session:
        return int(await session.scalar(select(func.count()).select_from(table)) or 0)


async def test_training_evaluation_and_analysis_on_stored_and_inline_data(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    client = sqlite_client
    memory = use_memory_telemetry(sqlite_platform)
    t0 = int(time.time() * 1000) - (N + 10) * MINUTE
    series = simulated_series(t0)
    memory.add("d1", "temp", series)
    training = {"device_id": "d1", "metric": "temp", "from": t0, "to": series[1999][0]}
    model = await ready_model(
        client, {"name": "temp-model", "algorithm": "best", "training": training}
    )
    assert model["status"] == "ready", model
    assert (model["version"], model["progress"], model["algorithm"]) == (
        1,
        1.0,
        "fleetmesh_novelty",
    )
    assert model["training"]["points"] == 2000
    assert model["threshold"] == 0.7
    assert model["training_summary"]["points"] == 2000
    assert "fitted_state" not in model or model["fitted_state"] is None
    with_state = (await client.get(f"/api/v1/models/{model['id']}?include_state=true")).json()
    assert with_state["fitted_state"]["name"] == "fleetmesh_novelty"

    second = await ready_model(
        client,
        {"name": "temp-model", "algorithm": "ewma", "training": training, "threshold": 0.99},
    )
    assert second["version"] == 2
    versions = (await client.get("/api/v1/models", params={"name": "temp-model"})).json()
    assert [m["version"] for m in versions["items"]] == [2, 1]
    page = (await client.get("/api/v1/models", params={"limit": 1})).json()
    assert len(page["items"]) == 1 and page["next_cursor"]
    rest = (await client.get("/api/v1/models", params={"cursor": page["next_cursor"]})).json()
    assert [m["id"] for m in rest["items"]] == [model["id"]]

    # Evaluation on a stored range with windows around the injected anomalies.
    def window(i: int) -> list[int]:
        return [t0 + (i - 5) * MINUTE, t0 + (i + 20) * MINUTE]

    stored = {"device_id": "d1", "metric": "temp", "from": series[2000][0], "to": series[-1][0]}
    evaluation = await client.post(
        f"/api/v1/models/{model['id']}:evaluate",
        json={"range": stored, "windows": [window(SPIKE), window(SHIFT)]},
    )
    assert evaluation.status_code == 200, evaluation.text
    result = evaluation.json()
    assert result["points"] == 2000 and result["windows"] == 2
    assert result["nab_score"] > 50
    assert result["recall"] == 1.0
    assert result["windowwise"]["detected_windows"] == 2
    assert result["pointwise"]["true_positives"] >= 2
    stored_model = (await client.get(f"/api/v1/models/{model['id']}")).json()
    assert stored_model["evaluation"]["id"] == result["id"]

    # Evaluation on inline points with one label per point.
    inline = [{"ts": to_rfc3339(from_ms(ts)), "value": v} for ts, v in series[2400:2800]]
    labels = [1 if 2600 <= 2400 + i <= 2610 else 0 for i in range(400)]
    labelled = await client.post(
        f"/api/v1/models/{model['id']}:evaluate", json={"series": inline, "labels": labels}
    )
    assert labelled.status_code == 200, labelled.text
    assert labelled.json()["label_kind"] == "labels"
    assert labelled.json()["windowwise"]["detected_windows"] == 1

    # Analysis of a stored range: anomalies near the injected ones, stored, announced.
    analysis = await client.post(
        "/api/v1/analyses", json={"model_id": model["id"], "range": stored}
    )
    assert analysis.status_code == 201, analysis.text
    body = analysis.json()
    found = sorted((from_iso(a["ts"]) - t0) // MINUTE for a in body["anomalies"])
    assert any(abs(i - SPIKE) <= 3 for i in found), found
    assert any(abs(i - SHIFT) <= 10 for i in found), found
    assert body["timing"]["points"] == 2000 and body["timing"]["points_per_s"] > 0
    assert body["summary"]["anomalies"] == len(body["anomalies"])
    assert (await client.get(f"/api/v1/analyses/{body['id']}")).json() == body
    listed = (await client.get("/api/v1/anomalies", params={"device": "d1"})).json()["items"]
    assert {a["analysis_id"] for a in listed} == {body["id"]}
    assert all(a["source"] == "analysis" for a in listed)

    # Inline analysis: the record only (no device, so no anomaly records).
    quick = await client.post("/api/v1/analyses", json={"model_id": model["id"], "series": inline})
    assert quick.status_code == 201 and quick.json()["input"]["kind"] == "series"
    assert len((await client.get("/api/v1/anomalies")).json()["items"]) == len(listed)
    events = await eventually(
        lambda: events_of(client, "fleetmesh.analysis.completed.v1", 2), what="events"
    )
    assert {e["data"]["analysis_id"] for e in events} == {body["id"], quick.json()["id"]}


def from_iso(text: str) -> int:
    from fleetmesh.analytics.domain import parse_ts

    return parse_ts(text)


async def events_of(client: httpx.AsyncClient, event_type: str, at_least: int) -> list[Any]:
    items = (await client.get("/api/v1/events", params={"type": event_type})).json()["items"]
    return list(items) if len(items) >= at_least else []


async def deployed_model(
    platform: Platform, client: httpx.AsyncClient, memory: MemoryTelemetry, t0: int
) -> dict[str, Any]:
    series = simulated_series(t0)[:2000]
    memory.add("train-dev", "temp", series)
    training = {"device_id": "train-dev", "metric": "temp", "from": t0, "to": series[-1][0]}
    return await ready_model(
        client, {"name": "streamer", "algorithm": "best", "training": training}
    )


async def test_streaming_detection_by_device_type_is_idempotent_and_checkpointed(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    client = sqlite_client
    memory = use_memory_telemetry(sqlite_platform)
    now = int(time.time() * 1000)
    model = await deployed_model(sqlite_platform, client, memory, now - 3000 * MINUTE)
    await client.post(
        "/api/v1/device-types",
        json={"name": "thermo", "telemetry_schema": {"temp": {"type": "number"}}},
    )
    assert (
        await client.post("/api/v1/devices", json={"type": "thermo", "id": "s1"})
    ).status_code == 201
    deployed = await client.post(
        f"/api/v1/models/{model['id']}:deploy", json={"device_type": "thermo", "metric": "temp"}
    )
    assert deployed.status_code == 201, deployed.text
    deployment = deployed.json()
    again = await client.post(
        f"/api/v1/models/{model['id']}:deploy", json={"device_type": "thermo"}
    )
    assert again.status_code == 200 and again.json()["id"] == deployment["id"]

    points = [(now + i * 1000, 20.0 + 5 * math.sin(i / 19)) for i in range(40)]
    points[30] = (points[30][0], 80.0)
    memory.add("s1", "temp", points)
    memory.add("other", "temp", points)
    cause = await collected(sqlite_platform, "s1", points)
    await collected(sqlite_platform, "other", points)  # unknown device: no type, no match

    async def streamed() -> list[Any]:
        items = (
            await client.get("/api/v1/anomalies", params={"device": "s1", "source": "streaming"})
        ).json()["items"]
        return list(items)

    found = await eventually(streamed, what="a streaming anomaly")
    assert [from_iso(a["ts"]) for a in found] == [points[30][0]]
    assert found[0]["deployment_id"] == deployment["id"]
    assert found[0]["score"] >= model["threshold"]
    detected = await eventually(
        lambda: events_of(client, "fleetmesh.anomaly.detected.v1", 1), what="anomaly event"
    )
    assert detected[0]["data"]["deployment_id"] == deployment["id"]
    assert detected[0]["causationid"] == cause
    await consumer_idle(sqlite_platform)
    assert not (await client.get("/api/v1/anomalies", params={"device": "other"})).json()["items"]

    # Redelivery with the detector rebuilt from the model (no checkpoint): no duplicate.
    streaming(sqlite_platform).forget()
    async with sqlite_platform.database.writing(), sqlite_platform.database.session() as session:
        await session.execute(delete(checkpoints))
        await session.commit()
    await collected(sqlite_platform, "s1", points)
    await consumer_idle(sqlite_platform)
    assert len(await streamed()) == 1
    assert await count(sqlite_platform, anomalies) == 1

    # Checkpoints hold the JSON state and the last scored point.
    await streaming(sqlite_platform).flush()  # (the periodic flush may have run already)
    async with sqlite_platform.database.session() as session:
        row = (await session.execute(select(checkpoints))).one()
    assert row.deployment_id == deployment["id"] and row.device_id == "s1"
    assert row.points == 40 and row.state["name"] == "fleetmesh_novelty"

    undeployed = await client.post(f"/api/v1/models/{model['id']}:undeploy")
    assert [d["status"] for d in undeployed.json()["undeployed"]] == ["undeployed"]
    listing = (await client.get("/api/v1/deployments", params={"status": "active"})).json()
    assert listing["items"] == []


async def test_failing_batches_are_retried_then_dead_lettered(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumers, "RETRY_DELAYS_S", (0.05, 0.05, 0.05, 0.05))
    memory = use_memory_telemetry(sqlite_platform)
    now = int(time.time() * 1000)
    model = await deployed_model(sqlite_platform, sqlite_client, memory, now - 3000 * MINUTE)
    await sqlite_client.post(f"/api/v1/models/{model['id']}:deploy", json={"device_ids": ["gone"]})
    memory.fail_for.add("gone")
    await collected(sqlite_platform, "gone", [(now, 1.0)])
    bad = b'{"type": "fleetmesh.telemetry.collected.v1", "id": "x", "data": {"device_id": 3}}'
    await sqlite_platform.backbone.publish("events.telemetry.collected.v1", bad, msg_id="bad-1")

    async def two_dead_letters() -> bool:
        return await count(sqlite_platform, dead_letters) == 2

    await eventually(two_dead_letters, what="dead letters")
    async with sqlite_platform.database.session() as session:
        statement = select(dead_letters).order_by(dead_letters.c.stream_sequence)
        rows = (await session.execute(statement)).all()
    assert [(r.deliveries, r.reason.split(":")[0]) for r in rows] == [
        (consumers.MAX_DELIVER, "TelemetryNotFound"),
        (1, "PermanentFailure"),
    ]
    assert memory.reads - 1 == consumers.MAX_DELIVER  # one read trained the model


async def test_deployments_checkpoints_survive_a_restart_and_interrupted_training_fails(
    tmp_path: Path,
) -> None:
    settings_dir = tmp_path / "data"
    now = int(time.time() * 1000)
    first = bootstrap(make_settings(settings_dir))
    await first.start()
    try:
        async with client_for(first) as client:
            memory = use_memory_telemetry(first)
            model = await deployed_model(first, client, memory, now - 3000 * MINUTE)
            deployment = (
                await client.post(
                    f"/api/v1/models/{model['id']}:deploy", json={"device_ids": ["s1"]}
                )
            ).json()
            batch = [(now + i * 1000, 20.0 + math.sin(i / 7)) for i in range(25)]
            memory.add("s1", "temp", batch)
            await collected(first, "s1", batch)
            await consumer_idle(first)
            # A model left in `training` by a process that dies.
            stuck = await create_model(
                CreateModel("stuck", "best", {}, SeriesRef("s1", "temp", now - MINUTE, now)),
                uow=AnalyticsUnitOfWork(first.database),
                clock=first.clock,
            )
    finally:
        await first.stop()  # flushes the checkpoint

    second = bootstrap(make_settings(settings_dir))
    await second.start()
    try:
        async with client_for(second) as client:
            memory = use_memory_telemetry(second)
            failed = (await client.get(f"/api/v1/models/{stuck.id}")).json()
            assert (failed["status"], failed["error"]) == ("failed", INTERRUPTED_BY_RESTART)
            active = (await client.get("/api/v1/deployments")).json()["items"]
            assert [d["id"] for d in active] == [deployment["id"]]
            more = [(now + (25 + i) * 1000, 20.0 + math.sin((25 + i) / 7)) for i in range(10)]
            more.append((now + 40_000, 95.0))
            memory.add("s1", "temp", batch + more)
            await collected(second, "s1", batch + more)  # the old part is skipped
            await consumer_idle(second)
            found = (await client.get("/api/v1/anomalies", params={"device": "s1"})).json()
            assert [a["value"] for a in found["items"]] == [95.0]
            await streaming(second).flush()
            async with second.database.session() as session:
                row = (await session.execute(select(checkpoints))).one()
            assert row.points == 25 + 11  # continued from the checkpoint
    finally:
        await second.stop()


class FixedClock:
    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def now(self) -> datetime:
        return self.moment


async def test_a_replica_fails_only_training_jobs_with_a_stale_heartbeat(
    sqlite_platform: Platform,
) -> None:
    jobs = sqlite_platform.provided("analytics_jobs")
    assert isinstance(jobs, TrainingJobs)
    now = sqlite_platform.clock.now()
    ref = SeriesRef("s1", "temp", 0, 1000)

    async def training(name: str, clock: FixedClock) -> str:
        model = await create_model(
            CreateModel(name, "best", {}, ref),
            uow=AnalyticsUnitOfWork(sqlite_platform.database),
            clock=clock,
        )
        return model.id

    stale = await training("stale", FixedClock(now - timedelta(minutes=5)))
    alive = await training("alive", FixedClock(now))
    assert await jobs.fail_abandoned() == [stale]
    assert await jobs.fail_abandoned(everything=True) == [alive]
