"""Discovery watches: the blocking query and the SSE stream wake as soon as the registry changes."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from fleetmesh.bootstrap import Platform
from support import admin_key

pytestmark = pytest.mark.integration


def ttl_instance(instance_id: str, port: int = 7100) -> dict[str, Any]:
    return {
        "instance_id": instance_id,
        "address": "127.0.0.1",
        "port": port,
        "check": {"kind": "ttl"},
    }


async def test_blocking_query_answers_at_once_when_behind_and_wakes_on_every_change(
    sqlite_client: httpx.AsyncClient,
) -> None:
    await sqlite_client.post("/api/v1/services/watched/instances", json=ttl_instance("a"))
    first = await sqlite_client.get("/api/v1/services/watched/instances")
    index = int(first.headers["X-Fleetmesh-Index"])
    assert index == first.json()["index"] > 0

    behind = await sqlite_client.get(
        "/api/v1/services/watched/instances", params={"index": index - 1, "wait": "10s"}
    )
    assert [i["instance_id"] for i in behind.json()["instances"]] == ["a"]

    started = time.monotonic()
    timed_out = await sqlite_client.get(
        "/api/v1/services/watched/instances", params={"index": index, "wait": "200ms"}
    )
    assert time.monotonic() - started >= 0.2  # it blocked for the wait it was given
    assert int(timed_out.headers["X-Fleetmesh-Index"]) == index

    waiting = asyncio.create_task(
        sqlite_client.get(
            "/api/v1/services/watched/instances", params={"index": index, "wait": "10s"}
        )
    )
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await sqlite_client.post("/api/v1/services/watched/instances", json=ttl_instance("b"))
    woken = await waiting  # woken by the change, long before its 10 s wait
    assert int(woken.headers["X-Fleetmesh-Index"]) > index
    assert sorted(i["instance_id"] for i in woken.json()["instances"]) == ["a", "b"]

    bad = await sqlite_client.get(
        "/api/v1/services/watched/instances", params={"index": 1, "wait": "soon"}
    )
    assert bad.status_code == 422

    await sqlite_client.post("/api/v1/services/gone/instances", json=ttl_instance("x"))
    index = (await sqlite_client.get("/api/v1/services/gone/instances")).json()["index"]
    waiting = asyncio.create_task(
        sqlite_client.get("/api/v1/services/gone/instances", params={"index": index, "wait": "10s"})
    )
    await asyncio.sleep(0.2)
    await sqlite_client.delete("/api/v1/services/gone/instances/x")
    woken = await asyncio.wait_for(waiting, 2)
    assert woken.json()["instances"] == []
    assert woken.json()["index"] > index


async def _next_event(lines: Any) -> dict[str, str]:
    event: dict[str, str] = {}
    async for line in lines:
        if not line:
            if "data" in event:
                return event
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(": ")
        event[field] = value
    raise AssertionError("the stream ended")


async def test_sse_watch_sends_a_snapshot_then_every_change(
    sqlite_platform: Platform, live_url: str
) -> None:
    headers = {"Authorization": f"Bearer {admin_key(sqlite_platform)}"}
    async with httpx.AsyncClient(base_url=live_url, headers=headers, timeout=10) as http:
        await http.post("/api/v1/services/streamed/instances", json=ttl_instance("s-1"))
        async with http.stream("GET", "/api/v1/services/streamed/watch") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            snapshot = await asyncio.wait_for(_next_event(lines), 5)
            assert snapshot["event"] == "instances"
            assert [i["instance_id"] for i in json.loads(snapshot["data"])["instances"]] == ["s-1"]

            await http.post("/api/v1/services/streamed/instances", json=ttl_instance("s-2", 7101))
            update = await asyncio.wait_for(_next_event(lines), 5)
            assert int(update["id"]) > int(snapshot["id"])
            names = sorted(i["instance_id"] for i in json.loads(update["data"])["instances"])
            assert names == ["s-1", "s-2"]
