"""The durable pipeline on SQLite and PostgreSQL: writer idempotency, restarts, events,
overload, retention, dead letters."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import jsonschema
import nats.js.errors
import pytest
from sqlalchemy import text

from fleetmesh.bootstrap import Platform
from fleetmesh.core.ids import new_id
from fleetmesh.telemetry import contracts
from fleetmesh.telemetry.contracts import IngestMessage, WirePoint
from fleetmesh.telemetry.ingest import Ingestor
from fleetmesh.telemetry.retention import RetentionJob
from fleetmesh.telemetry.service import TelemetryUnitOfWork, store_batches
from fleetmesh.telemetry.tables import point_row
from fleetmesh.telemetry.writer import WRITER_DURABLE, TelemetryWriter
from support import restart_repeatedly

pytestmark = pytest.mark.integration

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
COLLECTED_SUBJECT = "events.telemetry.collected.v1"

METER = {
    "name": "meter",
    "telemetry_schema": {"power": {"type": "number", "unit": "W", "min": 0, "max": 10_000}},
}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def register(client: httpx.AsyncClient, device_id: str) -> None:
    if (await client.get("/api/v1/device-types/meter")).status_code == 404:
        assert (await client.post("/api/v1/device-types", json=METER)).status_code == 201
    created = await client.post("/api/v1/devices", json={"type": "meter", "id": device_id})
    assert created.status_code == 201, created.text


def batch(start_ms: int, count: int, step_ms: int = 1, value: float = 1.0) -> bytes:
    return json.dumps(
        [
            {"metric": "power", "value": value + i, "ts": start_ms + i * step_ms}
            for i in range(count)
        ]
    ).encode()


async def scalar(platform: Platform, sql: str, **params: Any) -> int:
    async with platform.database.session() as session:
        return int((await session.execute(text(sql), params)).scalar_one())


async def rows_of(platform: Platform, device_id: str) -> int:
    return await scalar(
        platform, "SELECT count(*) FROM telemetry_points WHERE device_id = :d", d=device_id
    )


async def writer_idle(platform: Platform, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = await platform.backbone.js.consumer_info(contracts.TELEMETRY_STREAM, WRITER_DURABLE)
        if not info.num_pending and not info.num_ack_pending:
            return
        assert time.monotonic() < deadline, f"writer still busy: {info}"
        await asyncio.sleep(0.05)


async def subject_count(platform: Platform, stream: str, subject: str) -> int:
    info = await platform.backbone.js.stream_info(stream, subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


async def collected_events(platform: Platform) -> list[dict[str, Any]]:
    """Every `collected` event on the bus, in order."""
    events: list[dict[str, Any]] = []
    sequence = 1
    while True:
        try:
            found = await platform.backbone.js.get_msg(
                "EVENTS", sequence, subject=COLLECTED_SUBJECT, next=True
            )
        except nats.js.errors.NotFoundError:
            return events
        assert found.data is not None and found.seq is not None
        events.append(json.loads(found.data))
        sequence = found.seq + 1


async def set_live(platform: Platform, key: str, value: object) -> None:
    kv = await platform.backbone.js.key_value("config")
    document = {"version": time.time_ns(), "value": value}
    await kv.put(f"default.telemetry.{key}", json.dumps(document).encode())
    for _ in range(200):
        if platform.live_config.get("telemetry", key) == value:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"live config {key} did not change")


def provided(platform: Platform, name: str, kind: type[Any]) -> Any:
    found = platform.provided(name)
    assert isinstance(found, kind)
    return found


async def test_redelivered_messages_are_stored_once(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    await register(client, "w-1")
    await writer_idle(platform)  # nothing before; the relay may still publish device events
    at = now_ms()
    message = IngestMessage(
        id=new_id(),
        device_id="w-1",
        received_at_ms=at,
        source="test",
        points=[WirePoint(i, "power", float(i), at - i, 1.0) for i in range(5)],
    )
    payload = contracts.encode_message(message)
    subject = contracts.ingest_subject("w-1")
    # The same message three times under distinct Nats-Msg-Ids, as a redelivery after a
    # crash between commit and ack would look to the writer.
    for attempt in range(3):
        await platform.backbone.publish(subject, payload, msg_id=f"{message.id}-{attempt}")
    await writer_idle(platform)
    await platform.backbone.publish(subject, payload, msg_id=f"{message.id}-late")
    await writer_idle(platform)

    assert await rows_of(platform, "w-1") == 5
    batches = "SELECT count(*) FROM telemetry_batches WHERE message_id = :m"
    assert await scalar(platform, batches, m=message.id) == 1
    for _ in range(100):
        if await subject_count(platform, "EVENTS", COLLECTED_SUBJECT) >= 1:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    assert await subject_count(platform, "EVENTS", COLLECTED_SUBJECT) == 1


async def test_restarting_the_writer_while_ingesting_loses_and_duplicates_nothing(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    await register(client, "w-2")
    writer = provided(platform, "telemetry_writer", TelemetryWriter)
    accepted: list[int] = []
    start = now_ms() - HOUR_MS

    async def produce(worker: int) -> None:
        for n in range(12):
            body = batch(start + (worker * 100 + n) * 1000, 25, value=float(n))
            answer = await client.post("/api/v1/devices/w-2/telemetry", content=body)
            assert answer.status_code == 202, answer.text
            accepted.append(answer.json()["accepted"])

    restart = restart_repeatedly(writer, every_s=0.15, down_s=0.1)
    await asyncio.gather(*(produce(w) for w in range(4)), restart)
    await writer_idle(platform)

    assert len(accepted) == 48
    assert await rows_of(platform, "w-2") == sum(accepted) == 48 * 25
    assert await scalar(platform, "SELECT count(*) FROM telemetry_batches") == 48
    # one event per device per writer transaction: batches stored together share one
    events: list[dict[str, Any]] = []
    for _ in range(100):
        events = await collected_events(platform)
        if sum(e["data"]["count"] for e in events) >= 48 * 25:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    events = await collected_events(platform)
    assert sum(e["data"]["count"] for e in events) == 48 * 25
    assert 1 <= len(events) <= 48
    for event in events:
        assert event["type"] == contracts.TELEMETRY_COLLECTED and event["subject"] == "w-2"
        jsonschema.validate(event["data"], contracts.SCHEMAS[contracts.TELEMETRY_COLLECTED])
        assert event["data"]["count"] % 25 == 0 and event["data"]["metrics"] == ["power"]


async def test_overload_answers_503_with_retry_after_and_recovers(
    sqlite_platform: Platform, sqlite_client: httpx.AsyncClient
) -> None:
    await register(sqlite_client, "o-1")
    writer = provided(sqlite_platform, "telemetry_writer", TelemetryWriter)
    ingestor = provided(sqlite_platform, "telemetry_ingestor", Ingestor)
    await set_live(sqlite_platform, "max_backlog_messages", 2)
    await writer.stop()
    at = now_ms()
    for n in range(3):
        answer = await sqlite_client.post(
            "/api/v1/devices/o-1/telemetry", content=batch(at + n * 10, 5)
        )
        assert answer.status_code == 202
    await ingestor.monitor.sample()

    refused = await sqlite_client.post("/api/v1/devices/o-1/telemetry", content=batch(at, 1))
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["type"].endswith("/overloaded")

    await writer.start()
    await writer_idle(sqlite_platform)
    await ingestor.monitor.sample()
    again = await sqlite_client.post("/api/v1/devices/o-1/telemetry", content=batch(at + 99, 1))
    assert again.status_code == 202
    await writer_idle(sqlite_platform)
    assert await rows_of(sqlite_platform, "o-1") == 16

    await set_live(sqlite_platform, "max_inflight_publishes", 0)
    busy = await sqlite_client.post("/api/v1/devices/o-1/telemetry", content=batch(at + 200, 1))
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"


async def test_retention_deletes_expired_rows_in_batches_and_keeps_rollups(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    await register(client, "r-1")
    retention = provided(platform, "telemetry_retention", RetentionJob)
    policy = {"days": 1, "rollup_days": 30}
    answer = await client.put("/api/v1/device-types/meter/retention", json=policy)
    assert answer.status_code == 200, answer.text
    assert answer.json()["effective_days"] == 1
    bad = await client.put("/api/v1/device-types/meter/retention", json={"days": -1})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "days"

    old = (now_ms() - 2 * DAY_MS) // HOUR_MS * HOUR_MS
    for body in (batch(old, 10, step_ms=MINUTE_MS, value=0.0), batch(now_ms() - 1000, 3)):
        stored = await client.post(
            "/api/v1/devices/r-1/telemetry", content=body, params={"wait": "stored"}
        )
        assert stored.status_code == 202 and stored.json()["stored"] is True
    await set_live(platform, "retention_batch_rows", 3)
    await set_live(platform, "retention_pause_s", 0)

    report = await retention.run_once()
    assert report.rows_deleted == 10
    assert report.per_statement == [3, 3, 3, 1]
    assert await rows_of(platform, "r-1") == 3
    assert (await retention.run_once()).rows_deleted == 0

    hourly = await client.get(
        "/api/v1/devices/r-1/telemetry",
        params={"metric": "power", "agg": "avg", "interval": "1h", "from": str(old)},
    )
    assert hourly.status_code == 200, hourly.text
    first = hourly.json()["buckets"][0]
    assert (first["value"], first["count"]) == (4.5, 10)
    maximum = await client.get(
        "/api/v1/devices/r-1/telemetry",
        params={"metric": "power", "agg": "max", "interval": "1h", "from": str(old)},
    )
    assert maximum.json()["buckets"][0]["value"] == 9.0


async def test_undecodable_messages_are_dead_lettered_with_their_reason(
    sqlite_platform: Platform,
) -> None:
    subject = contracts.ingest_subject("nobody")
    await sqlite_platform.backbone.publish(subject, b"not msgspec", msg_id=new_id())
    await writer_idle(sqlite_platform)
    dead = contracts.dead_letter_subject("nobody")
    for _ in range(100):
        if await subject_count(sqlite_platform, contracts.DEAD_LETTER_STREAM, dead):
            break
        await asyncio.sleep(0.05)
    message = await sqlite_platform.backbone.js.get_last_msg(contracts.DEAD_LETTER_STREAM, dead)
    assert message.data == b"not msgspec"
    assert message.headers is not None
    assert "not a telemetry ingest message" in message.headers[contracts.DEAD_REASON_HEADER]


async def test_a_message_the_database_refuses_is_retried_alone_then_dead_lettered(
    platform: Platform, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleetmesh.telemetry import consumers

    monkeypatch.setattr(consumers, "MAX_DELIVER", 2)
    await register(client, "p-1")
    writer = provided(platform, "telemetry_writer", TelemetryWriter)
    at = now_ms()
    good = IngestMessage(new_id(), "p-1", at, "test", [WirePoint(0, "power", 1.0, at, 1.0)])
    # A timestamp beyond BIGINT: both databases refuse the row, so the whole transaction fails.
    poison = IngestMessage(new_id(), "p-1", at, "test", [WirePoint(0, "power", 2.0, 2**70, 1.0)])
    await writer.stop()
    subject = contracts.ingest_subject("p-1")
    for message in (poison, good):
        await platform.backbone.publish(
            subject, contracts.encode_message(message), msg_id=message.id
        )
    await writer.start()
    await writer_idle(platform)

    assert await rows_of(platform, "p-1") == 1
    dead = contracts.dead_letter_subject("p-1")
    assert await subject_count(platform, contracts.DEAD_LETTER_STREAM, dead) == 1
    letter = await platform.backbone.js.get_last_msg(contracts.DEAD_LETTER_STREAM, dead)
    assert letter.headers is not None
    assert letter.headers[contracts.DEAD_REASON_HEADER].startswith("failed 2 times")
    assert contracts.decode_message(letter.data or b"").id == poison.id


async def test_a_transaction_with_some_batches_stored_before_stores_the_others_once(
    platform: Platform,
) -> None:
    at = now_ms()

    def message(device_id: str, first_ms: int) -> IngestMessage:
        points = [WirePoint(i, "power", float(i), first_ms + i, 1.0) for i in range(3)]
        return IngestMessage(new_id(), device_id, at, "test", points)

    a, b, c = message("m-1", at - 100), message("m-1", at - 50), message("m-2", at - 10)

    def store(messages: list[IngestMessage]) -> Any:
        uow = TelemetryUnitOfWork(platform.database)
        return store_batches(messages, uow=uow, now=platform.clock.now())

    first = await store([a, b])
    second = await store([b, c, a])

    assert (first.stored, first.duplicates, first.points) == ([a.id, b.id], [], 6)
    assert (second.stored, second.duplicates, second.points) == ([c.id], [b.id, a.id], 3)
    assert await rows_of(platform, "m-1") == 6
    assert await rows_of(platform, "m-2") == 3
    latest = "SELECT ts FROM telemetry_latest WHERE device_id = :d AND metric = 'power'"
    assert await scalar(platform, latest, d="m-1") == at - 50 + 2
    assert await scalar(platform, latest, d="m-2") == at - 10 + 2


async def test_every_kind_of_value_is_stored_in_the_column_of_its_type(
    platform: Platform,
) -> None:
    at = now_ms()
    values: list[bool | int | float | str] = [True, False, 0, 7, -2.5, 1e300, 2**53 + 1, "on", ""]
    values += ['ünïcødé "quoted" \\ back']
    points = [WirePoint(i, f"m{i}", value, at + i, 0.5) for i, value in enumerate(values)]
    message = IngestMessage(new_id(), "k-1", at, "test", points)

    await store_batches(
        [message], uow=TelemetryUnitOfWork(platform.database), now=platform.clock.now()
    )

    assert await _stored_rows(platform, "k-1") == _rows_of(message)


async def test_numbers_only_and_mixed_messages_stored_together_keep_their_columns(
    platform: Platform,
) -> None:
    at = now_ms()
    numbers: list[bool | int | float | str] = [0, 7, -2.5, 1e300, 2**53 + 1]
    mixed: list[bool | int | float | str] = [1, True, 2.5, "2.5", False]

    def message(values: list[bool | int | float | str], first_ms: int) -> IngestMessage:
        points = [WirePoint(i, f"m{i}", v, first_ms + i, 0.5) for i, v in enumerate(values)]
        return IngestMessage(new_id(), "k-2", at, "test", points)

    first, second = message(numbers, at), message(mixed, at + 100)
    uow = TelemetryUnitOfWork(platform.database)

    await store_batches([second, first], uow=uow, now=platform.clock.now())

    assert await _stored_rows(platform, "k-2") == _rows_of(first) + _rows_of(second)


async def _stored_rows(platform: Platform, device_id: str) -> list[tuple[Any, ...]]:
    """The device's points in time order, booleans as bool (SQLite keeps 0/1)."""
    async with platform.database.session() as session:
        found = await session.execute(
            text(
                "SELECT metric, ts, value_num, value_text, value_bool, quality, message_id"
                " FROM telemetry_points WHERE device_id = :d ORDER BY ts"
            ),
            {"d": device_id},
        )
        rows = [tuple(row) for row in found]
    return [(*row[:4], None if row[4] is None else bool(row[4]), *row[5:]) for row in rows]


def _rows_of(message: IngestMessage) -> list[tuple[Any, ...]]:
    return [tuple(point_row(message.device_id, message.id, p)[1:]) for p in message.points]
