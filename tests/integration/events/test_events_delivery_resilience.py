"""Delivery under failure: endpoints down, ordering, restarts, live retry policy, replays.

These run on SQLite only: the delivery engine is the same on both stores, and the
delivery log's SQL is covered on PostgreSQL by the publish-and-deliver tests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetmesh.bootstrap import Platform, bootstrap
from fleetmesh.core.live_config import CONFIG_BUCKET, config_kv_key
from support import client_for, make_settings

pytestmark = pytest.mark.integration

FAST_RETRY = {"max_attempts": 50, "base_delay": 0.05, "max_delay": 0.2}
SLOW_RETRY = {"max_attempts": 100, "base_delay": 0.1, "max_delay": 0.3}


def ids(requests: list[Any]) -> list[str]:
    return [r.headers["ce-id"] for r in requests]


async def test_an_endpoint_down_for_a_while_gets_everything_once_and_others_are_unaffected(
    sqlite_bus: Any, receivers: Any, wait_until: Any
) -> None:
    await sqlite_bus.contract()
    phase = {"now": "error"}

    def sick_behaviour(_n: int, _request: Any) -> tuple[int, float]:
        if phase["now"] == "error":
            return 500, 0.0
        if phase["now"] == "slow":
            return 503, 1.0  # the sender gave up after 0.3 s
        return 200, 0.0

    sick = await receivers(sick_behaviour)
    healthy = await receivers()
    sick_sub = await sqlite_bus.subscribe(
        sick.url, delivery={"timeout_s": 0.3, "retry": FAST_RETRY}
    )
    await sqlite_bus.subscribe(healthy.url)
    events = [sqlite_bus.event(data={"temp": i}) for i in range(20)]

    for event in events:
        assert (await sqlite_bus.publish(event)).status_code == 202

    await wait_until(lambda: len(healthy.delivered) == 20, timeout=5)
    assert sick.delivered == [] and len(sick.requests) >= 20
    phase["now"] = "slow"
    await asyncio.sleep(1.0)
    assert sick.delivered == []
    phase["now"] = "ok"
    await wait_until(lambda: len(set(ids(sick.delivered))) == 20, timeout=15)
    await asyncio.sleep(0.3)
    assert Counter(ids(sick.delivered)) == Counter(e["id"] for e in events)
    assert sorted(ids(healthy.delivered)) == sorted(e["id"] for e in events)

    async def settled() -> bool:
        stats = (await sqlite_bus.deliveries(sick_sub["id"]))["stats"]
        return bool(stats["delivered"] == 20 and stats["pending"] == 0 and stats["lag"] == 0)

    await wait_until(settled)
    log = await sqlite_bus.deliveries(sick_sub["id"], limit=1000)
    errors = {item["error"] for item in log["items"] if item["status"] == "failed"}
    assert any(e.startswith("HTTP 500") for e in errors)
    assert any(e.startswith("timeout after 0.3 s") for e in errors)
    assert log["stats"]["dead_lettered"] == 0 and 0 < log["stats"]["success_rate"] < 1
    assert await sqlite_bus.dead_letters(sick_sub["id"]) == []


async def test_events_given_up_on_are_dead_lettered_then_redriven(
    sqlite_client: httpx.AsyncClient, sqlite_bus: Any, receivers: Any, wait_until: Any
) -> None:
    await sqlite_bus.contract()
    up = {"yes": False}
    receiver = await receivers(lambda _n, _r: (200, 0.0) if up["yes"] else (500, 0.0))
    subscription = await sqlite_bus.subscribe(
        receiver.url, delivery={"retry": {"max_attempts": 3, "base_delay": 0.01}}
    )
    events = [sqlite_bus.event(data={"temp": i}) for i in range(3)]
    for event in events:
        await sqlite_bus.publish(event)

    async def dead() -> bool:
        return len(await sqlite_bus.dead_letters(subscription["id"])) == 3

    await wait_until(dead)
    letters = await sqlite_bus.dead_letters(subscription["id"])
    assert {letter["event_id"] for letter in letters} == {e["id"] for e in events}
    assert all(letter["attempts"] == 3 and letter["last_status"] == 500 for letter in letters)
    assert all(letter["error"].startswith("HTTP 500") for letter in letters)
    assert len(receiver.requests) == 9

    up["yes"] = True
    base = f"/api/v1/subscriptions/{subscription['id']}/dead-letters"
    one = await sqlite_client.post(f"{base}/{letters[0]['id']}:replay")
    assert one.status_code == 200 and one.json()["status"] == "redelivered"
    assert one.json()["attempts"] == 4
    redrive = await sqlite_client.post(f"{base}:redrive")
    assert redrive.status_code == 202 and redrive.json()["dead_letters"] == 2

    async def all_redelivered() -> bool:
        return all(
            x["status"] == "redelivered" for x in await sqlite_bus.dead_letters(subscription["id"])
        )

    await wait_until(all_redelivered)
    assert sorted(ids(receiver.delivered)) == sorted(e["id"] for e in events)


async def test_ordered_subscriptions_keep_the_order_per_subject_through_failures(
    sqlite_bus: Any, receivers: Any, wait_until: Any
) -> None:
    await sqlite_bus.contract()
    flaky = await receivers(lambda n, _r: (500, 0.0) if n % 3 == 0 else (200, 0.0))
    await sqlite_bus.subscribe(
        flaky.url,
        delivery={"ordered": True, "retry": {"max_attempts": 20, "base_delay": 0.01}},
    )
    events = [sqlite_bus.event(subject=f"sensor-{i % 3}", data={"temp": i}) for i in range(24)]
    for event in events:
        await sqlite_bus.publish(event)

    await wait_until(lambda: len(flaky.delivered) == 24, timeout=20)
    assert ids(flaky.delivered) == [e["id"] for e in events]
    for subject in ("sensor-0", "sensor-1", "sensor-2"):
        delivered = [
            r.headers["ce-id"] for r in flaky.delivered if r.headers["ce-subject"] == subject
        ]
        assert delivered == [e["id"] for e in events if e["subject"] == subject]
    assert len(flaky.requests) > 24


async def test_a_restart_in_the_middle_of_deliveries_resumes_them(
    tmp_path: Path, receivers: Any, wait_until: Any
) -> None:
    data_dir = tmp_path / "data"
    up = {"yes": True}

    def behaviour(n: int, _request: Any) -> tuple[int, float]:
        return (200, 0.0) if up["yes"] and n < 5 or up.get("back") else (500, 0.0)

    receiver = await receivers(behaviour)
    first = bootstrap(make_settings(data_dir))
    await first.start()
    try:
        async with client_for(first) as client:
            await _contract(client)
            created = await client.post(
                "/api/v1/subscriptions",
                json={
                    "endpoint": receiver.url,
                    "types": ["com.acme.reading.taken"],
                    "delivery": {
                        "retry": {"max_attempts": 100, "base_delay": 0.1, "max_delay": 0.3}
                    },
                },
            )
            assert created.status_code == 201
            events = [_event(i) for i in range(20)]
            for event in events:
                response = await client.post(
                    "/api/v1/events",
                    json=event,
                    headers={"content-type": "application/cloudevents+json"},
                )
                assert response.status_code == 202
            await wait_until(lambda: len(receiver.delivered) == 5 and len(receiver.requests) > 20)
    finally:
        await first.stop()
    up["back"] = True
    second = bootstrap(make_settings(data_dir))
    started = time.monotonic()
    await second.start()
    try:
        await wait_until(lambda: len(set(ids(receiver.delivered))) == 20, timeout=30)
        resumed_in = time.monotonic() - started
        await asyncio.sleep(0.3)
        assert Counter(ids(receiver.delivered)) == Counter(e["id"] for e in events)
        assert resumed_in < 10  # the events in hand come back after the 5 s ack wait
    finally:
        await second.stop()


async def test_the_default_retry_policy_changes_live(
    sqlite_platform: Platform, sqlite_bus: Any, receivers: Any, wait_until: Any
) -> None:
    await sqlite_bus.contract()
    receiver = await receivers(lambda _n, _r: (500, 0.0))
    subscription = await sqlite_bus.subscribe(receiver.url)
    assert subscription["delivery"]["retry"] is None
    kv = await sqlite_platform.backbone.js.key_value(CONFIG_BUCKET)
    key = config_kv_key("events", "webhook_retry")

    async def set_policy(version: int, max_attempts: int) -> None:
        value = {"max_attempts": max_attempts, "base_delay": 0.01, "max_delay": 0.02}
        await kv.put(key, json.dumps({"version": version, "value": value}).encode())
        await wait_until(
            lambda: sqlite_platform.live_config.get("events", "webhook_retry") == value
        )

    async def dead_letter_attempts(count: int) -> list[int]:
        async def arrived() -> bool:
            return len(await sqlite_bus.dead_letters(subscription["id"])) == count

        await wait_until(arrived)
        return [x["attempts"] for x in await sqlite_bus.dead_letters(subscription["id"])]

    await set_policy(1, 2)
    await sqlite_bus.publish(sqlite_bus.event())
    assert await dead_letter_attempts(1) == [2]
    await set_policy(2, 4)
    await sqlite_bus.publish(sqlite_bus.event())
    assert await dead_letter_attempts(2) == [2, 4]


async def test_replay_pause_resume_and_filters(
    sqlite_client: httpx.AsyncClient, sqlite_bus: Any, receivers: Any, wait_until: Any
) -> None:
    await sqlite_bus.contract()
    receiver = await receivers()
    hot_only = await receivers()
    subscription = await sqlite_bus.subscribe(receiver.url)
    await sqlite_bus.subscribe(hot_only.url, filters=[{"jmespath": "data.temp > `30`"}])
    sequences = []
    for temp in (10, 40, 20, 50):
        response = await sqlite_bus.publish(sqlite_bus.event(data={"temp": temp}))
        sequences.append(response.json()["sequence"])
    await wait_until(lambda: len(receiver.delivered) == 4 and len(hot_only.delivered) == 2)
    assert [json.loads(r.body)["temp"] for r in hot_only.delivered] == [40, 50]

    path = f"/api/v1/subscriptions/{subscription['id']}"
    replay = await sqlite_client.post(f"{path}:replay", json={"from_sequence": sequences[2]})
    assert replay.status_code == 202, replay.text
    assert replay.json()["to_sequence"] >= sequences[3]
    await wait_until(lambda: len(receiver.delivered) == 6)
    assert [json.loads(r.body)["temp"] for r in receiver.delivered[4:]] == [20, 50]
    bad = await sqlite_client.post(f"{path}:replay", json={})
    assert bad.status_code == 422

    paused = await sqlite_client.post(f"{path}:pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    waited = await sqlite_bus.publish(sqlite_bus.event(data={"temp": 60}), ack="delivered")
    assert waited.status_code == 207
    assert waited.json()["deliveries"][subscription["id"]]["reason"] == "subscription paused"
    await asyncio.sleep(0.3)
    assert len(receiver.delivered) == 6
    assert (await sqlite_bus.deliveries(subscription["id"]))["stats"]["lag"] == 1
    resumed = await sqlite_client.post(f"{path}:resume")
    assert resumed.json()["status"] == "active"
    await wait_until(lambda: len(receiver.delivered) == 7)
    assert (await sqlite_client.delete(path)).status_code == 204
    assert (await sqlite_client.get(path)).status_code == 404


async def _contract(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/event-contracts",
        json={"type": "com.acme.reading.taken", "schema": {"type": "object"}},
    )
    assert response.status_code in (200, 201)


def _event(index: int) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"restart-{index}",
        "source": "/sensors/lab",
        "type": "com.acme.reading.taken",
        "data": {"temp": index},
    }
