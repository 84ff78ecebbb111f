"""The transactional outbox: no event lost when NATS or the relay dies, none duplicated."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import select, text, update

from fleetmesh.bootstrap import Platform
from fleetmesh.core.backbone import EVENTS_STREAM
from fleetmesh.core.envelope import CloudEvent
from fleetmesh.core.outbox import unpublished_rows
from fleetmesh.core.tables import outbox
from fleetmesh.core.uow import SqlUnitOfWork

pytestmark = pytest.mark.integration

THERMO = {"name": "thermo", "telemetry_schema": {}}


async def _stream_messages(platform: Platform) -> int:
    info = await platform.backbone.js.stream_info(EVENTS_STREAM)
    return int(info.state.messages)


async def _wait_for(predicate: object, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_events_committed_while_nats_is_down_arrive_exactly_once(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    await client.post("/api/v1/device-types", json=THERMO)
    await _wait_for(lambda: _is(platform, 1))
    assert platform.nats_server is not None
    platform.nats_server.kill()
    created = await client.post("/api/v1/devices", json={"type": "thermo", "id": "while-down"})
    assert created.status_code == 201  # the state change and its event are committed together
    assert await platform.relay.backlog() == 1
    await asyncio.sleep(0.5)  # the relay fails and backs off meanwhile
    await platform.nats_server.start()
    await _wait_for(lambda: _backlog_is(platform, 0))
    await _wait_for(lambda: _is(platform, 2))
    await asyncio.sleep(0.3)
    assert await _stream_messages(platform) == 2


async def test_crash_between_publish_and_mark_sent_is_deduplicated(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    await platform.relay.stop()
    await client.post("/api/v1/device-types", json=THERMO)
    await client.post("/api/v1/devices", json={"type": "thermo", "id": "once"})
    assert await platform.relay.backlog() == 2
    assert await platform.relay.publish_pending() == 2
    # As if the process died after publishing but before marking the rows sent:
    async with platform.database.session() as session:
        await session.execute(update(outbox).values(published_at=None))
        await session.commit()
    # Its atomic batch is refused whole (it holds stored ids), then sent one by one:
    assert await platform.relay.publish_pending() == 2
    assert await platform.relay.backlog() == 0
    assert await _stream_messages(platform) == 2


async def _is(platform: Platform, count: int) -> bool:
    try:
        return await _stream_messages(platform) == count
    except Exception:
        return False


async def _backlog_is(platform: Platform, count: int) -> bool:
    return await platform.relay.backlog() == count


async def test_a_pipelined_batch_is_stored_in_outbox_order(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    await platform.relay.stop()
    await client.post("/api/v1/device-types", json=THERMO)
    wanted = [{"type": "thermo", "id": f"order-{i:03}"} for i in range(250)]
    assert (await client.post("/api/v1/devices:bulk", json={"devices": wanted})).status_code == 201
    async with platform.database.session() as session:
        in_outbox = list(
            (await session.execute(select(outbox.c.event_id).order_by(outbox.c.seq))).scalars()
        )
    while await platform.relay.publish_pending():
        pass
    subscription = await platform.backbone.js.pull_subscribe(">", stream=EVENTS_STREAM)
    in_stream: list[str] = []
    batches: set[str] = set()
    while len(in_stream) < len(in_outbox):
        for message in await subscription.fetch(100, timeout=5):
            in_stream.append(message.headers["Nats-Msg-Id"])  # type: ignore[index]
            batches.add(message.headers["Nats-Batch-Id"])  # type: ignore[index]
    assert in_stream == in_outbox
    assert 1 <= len(batches) <= 2  # 251 events in atomic batches: one PubAck each


async def test_a_transaction_s_events_are_stored_in_emit_order_byte_for_byte(
    platform: Platform,
) -> None:
    await platform.relay.stop()
    events = [
        CloudEvent(
            type="fleetmesh.test.stored.v1",
            source="/tests",
            data={"n": n, "text": f'quote " backslash \\ newline \n tab \t ü ✓ {n}'},
        )
        for n in range(1_500)
    ]
    async with SqlUnitOfWork(platform.database) as uow:
        for event in events:
            uow.emit(event)
        await uow.commit()
    async with platform.database.session() as session:
        rows = (
            await session.execute(
                select(outbox)
                .where(outbox.c.subject == events[0].nats_subject)
                .order_by(outbox.c.seq)
            )
        ).all()
    assert [(row.event_id, bytes(row.payload)) for row in rows] == [
        (event.id, event.to_json()) for event in events
    ]
    assert {(row.created_at, row.published_at, row.attempts) for row in rows} == {
        (rows[0].created_at, None, 0)
    }
    assert rows[0].created_at.tzinfo is not None


async def test_marking_a_batch_published_leaves_rows_another_relay_marked(
    platform: Platform,
) -> None:
    await platform.relay.stop()
    while await platform.relay.publish_pending():
        pass  # what the platform emitted while starting
    events = [
        CloudEvent(type="fleetmesh.test.marked.v1", source="/tests", data=n) for n in range(6)
    ]
    async with SqlUnitOfWork(platform.database) as uow:
        for event in events:
            uow.emit(event)
        await uow.commit()
    earlier = datetime(2020, 1, 1, tzinfo=UTC)
    async with platform.database.session() as session:
        await session.execute(
            update(outbox).where(outbox.c.event_id == events[2].id).values(published_at=earlier)
        )
        await session.commit()

    assert await platform.relay.publish_pending() == 5

    async with platform.database.session() as session:
        marked = dict(
            (
                await session.execute(
                    select(outbox.c.event_id, outbox.c.published_at).where(
                        outbox.c.event_id.in_([e.id for e in events])
                    )
                )
            ).all()
        )
    assert marked[events[2].id] == earlier
    others = [marked[e.id] for n, e in enumerate(events) if n != 2]
    assert all(at is not None and at > earlier for at in others)
    assert await platform.relay.backlog() == 0


async def test_on_postgresql_the_relay_reads_unpublished_rows_through_their_own_index(
    platform: Platform,
) -> None:
    """Rows published since the last vacuum stay in an index on `published_at`; a read
    through it visits each of them (349 ms with 350,000), the partial index does not."""
    if not platform.database.is_postgres:
        pytest.skip("SQLite updates its indexes in place")
    query = unpublished_rows(platform.database)
    compiled = query.compile(
        dialect=platform.database.engine.dialect, compile_kwargs={"literal_binds": True}
    )
    async with platform.database.session() as session:
        await session.execute(text("SET LOCAL enable_seqscan = off"))  # a test table is tiny
        plan = "\n".join((await session.execute(text(f"EXPLAIN {compiled}"))).scalars())
    assert "ix_outbox_unpublished" in plan
