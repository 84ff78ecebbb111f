"""The configuration center over HTTP, on SQLite and PostgreSQL, with the real backbone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from fleetmesh.bootstrap import Platform
from fleetmesh.config.domain import ConfigRef
from fleetmesh.config.repository import LatestVersion
from fleetmesh.config.service import ConfigUnitOfWork, KvMirror, SetConfig, change_config

pytestmark = pytest.mark.integration

RETRY_SCHEMA = {
    "type": "object",
    "properties": {
        "max_attempts": {"type": "integer", "minimum": 1},
        "backoff": {
            "type": "object",
            "properties": {"initial_s": {"type": "number", "exclusiveMinimum": 0}},
        },
    },
    "required": ["max_attempts"],
}


async def eventually(probe: Callable[[], Awaitable[Any]], *, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s (last: {result!r})")
        await asyncio.sleep(0.02)


async def test_versions_history_rollback_delete_and_if_match(client: httpx.AsyncClient) -> None:
    url = "/api/v1/config/billing/retry"
    first = await client.put(url, json={"value": {"max_attempts": 3}, "comment": "initial"})
    assert first.status_code == 201, first.text
    assert first.headers["ETag"] == '"1"'
    second = await client.put(url, json={"value": {"max_attempts": 5}, "comment": "more"})
    assert second.status_code == 200
    assert second.json()["version"] == 2

    current = await client.get(url)
    assert current.status_code == 200
    assert current.headers["ETag"] == '"2"'
    body = current.json()
    assert (body["value"], body["version"], body["author"], body["comment"]) == (
        {"max_attempts": 5},
        2,
        "initial admin",
        "more",
    )
    assert body["at"]

    rolled = await client.post(f"{url}:rollback", json={"version": 1, "reason": "too many"})
    assert rolled.status_code == 200
    assert rolled.json()["version"] == 3
    assert rolled.json()["value"] == {"max_attempts": 3}
    assert rolled.json()["comment"] == "rollback to v1: too many"
    missing_version = await client.post(f"{url}:rollback", json={"version": 9})
    assert missing_version.status_code == 404

    deleted = await client.delete(url)
    assert deleted.status_code == 200
    assert deleted.json()["deleted"] is True
    gone = await client.get(url)
    assert gone.status_code == 404
    assert gone.headers["X-Fleetmesh-Index"] == "4"
    revived = await client.put(url, json={"value": {"max_attempts": 2}})
    assert revived.json()["version"] == 5

    page = (await client.get(f"{url}/history", params={"limit": 2})).json()
    assert [item["version"] for item in page["items"]] == [5, 4]
    rest = (await client.get(f"{url}/history", params={"cursor": page["next_cursor"]})).json()
    assert [item["version"] for item in rest["items"]] == [3, 2, 1]
    assert rest["next_cursor"] is None
    assert [i["kind"] for i in page["items"] + rest["items"]] == [
        "set",
        "delete",
        "rollback",
        "set",
        "set",
    ]

    other_namespace = await client.get(url, params={"namespace": "staging"})
    assert other_namespace.status_code == 404
    listed = (await client.get("/api/v1/config", params={"service": "billing"})).json()
    assert listed == [{"namespace": "default", "service": "billing", "key": "retry", "version": 5}]

    async def changed_events() -> list[dict[str, Any]]:
        response = await client.get(
            "/api/v1/events", params={"type": "fleetmesh.config.changed.v1"}
        )
        items = response.json()["items"]
        return items if len(items) >= 5 else []

    events = await eventually(changed_events)
    assert [e["data"]["version"] for e in events] == [1, 2, 3, 4, 5]
    assert events[0]["subject"] == "default/billing/retry"

    url = "/api/v1/config/telemetry/flush_s"
    created = await client.put(url, json={"value": 5}, headers={"If-Match": "0"})
    assert created.status_code == 201
    assert (await client.put(url, json={"value": 6})).status_code == 200
    stale = await client.put(url, json={"value": 7}, headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    assert stale.json()["current_version"] == 2
    fresh = await client.put(url, json={"value": 7}, headers={"If-Match": '"2"'})
    assert fresh.status_code == 200
    assert (await client.delete(url, headers={"If-Match": "2"})).status_code == 412
    assert (
        await client.post(f"{url}:rollback", json={"version": 1}, headers={"If-Match": "1"})
    ).status_code == 412
    assert (await client.put(url, json={"value": 8}, headers={"If-Match": "*"})).status_code == 200
    assert (
        await client.put(url, json={"value": 9}, headers={"If-Match": "soon"})
    ).status_code == 422
    assert (await client.get(url)).json()["value"] == 8


async def test_concurrent_writers_each_get_their_own_version(client: httpx.AsyncClient) -> None:
    url = "/api/v1/config/routing/weights"
    answers = await asyncio.gather(*(client.put(url, json={"value": n}) for n in range(8)))
    assert all(a.status_code in (200, 201) for a in answers), [
        a.text[:300] for a in answers if a.status_code >= 300
    ]
    assert sorted(answer.json()["version"] for answer in answers) == list(range(1, 9))
    history = (await client.get(f"{url}/history")).json()["items"]
    assert [item["version"] for item in history] == list(range(8, 0, -1))
    latest = (await client.get(url)).json()
    assert latest["value"] == history[0]["value"]


async def test_schema_violations_name_their_json_paths(client: httpx.AsyncClient) -> None:
    url = "/api/v1/config/billing/retry"
    bad = await client.put(
        url,
        json={
            "value": {"max_attempts": 0, "backoff": {"initial_s": -1}},
            "schema": RETRY_SCHEMA,
        },
    )
    assert bad.status_code == 422
    problem = bad.json()
    assert problem["type"].endswith("/config-schema-violation")
    assert {error["field"] for error in problem["errors"]} == {
        "/max_attempts",
        "/backoff/initial_s",
    }
    assert (await client.get(url)).status_code == 404  # nothing was stored

    good = await client.put(url, json={"value": {"max_attempts": 2}, "schema": RETRY_SCHEMA})
    assert good.status_code == 201
    schema = (await client.get(f"{url}/schema")).json()
    assert schema["schema"] == RETRY_SCHEMA
    refused = await client.put(url, json={"value": {"attempts": 2}})
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["field"] == ""  # the document root: a required key

    invalid_schema = await client.put(
        f"{url}/schema", json={"schema": {"type": "integer", "minimum": "one"}}
    )
    assert invalid_schema.status_code == 422
    assert invalid_schema.json()["errors"][0]["field"] == "/minimum"
    violated_by_current = await client.put(f"{url}/schema", json={"schema": {"type": "integer"}})
    assert violated_by_current.status_code == 422
    removed = await client.put(f"{url}/schema", json={"schema": None})
    assert removed.json()["schema"] is None
    assert (await client.put(url, json={"value": "anything"})).status_code == 200
    bad_ref = await client.put("/api/v1/config/Bad_Service/k", json={"value": 1})
    assert bad_ref.status_code == 422
    assert bad_ref.json()["errors"][0]["field"] == "service"


async def test_blocking_query_wakes_on_the_next_version(client: httpx.AsyncClient) -> None:
    url = "/api/v1/config/status/offline_timeout_s"
    await client.put(url, json={"value": 60})
    started = time.monotonic()
    unchanged = await client.get(url, params={"index": 1, "wait": "200ms"})
    assert time.monotonic() - started >= 0.2  # it blocked for the wait it was given
    assert unchanged.headers["X-Fleetmesh-Index"] == "1"

    waiting = asyncio.create_task(client.get(url, params={"index": 1, "wait": "10s"}))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await client.put(url, json={"value": 90})
    woken = await waiting  # woken by the change, long before its 10 s wait
    assert woken.json()["value"] == 90
    assert woken.headers["X-Fleetmesh-Index"] == "2"

    not_yet = asyncio.create_task(
        client.get("/api/v1/config/status/new_key", params={"index": 0, "wait": "10s"})
    )
    await asyncio.sleep(0.2)
    await client.put("/api/v1/config/status/new_key", json={"value": True})
    assert (await asyncio.wait_for(not_yet, 2)).json()["value"] is True


LIVE_SETTINGS = [
    ("status", "offline_timeout_s", 45),
    ("telemetry", "max_batch_points", 2500),
    ("events", "webhook_retry", {"max_attempts": 8, "backoff_s": [1, 5, 30]}),
]


async def test_changes_reach_live_config_without_a_restart(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    for service, key, value in LIVE_SETTINGS:
        seen: list[Any] = []
        unsubscribe = platform.live_config.on_change(service, key, seen.append)
        try:
            sent = time.monotonic()
            await client.put(f"/api/v1/config/{service}/{key}", json={"value": value})
            started = time.monotonic()

            async def arrived(service: str = service, key: str = key, value: Any = value) -> bool:
                return platform.live_config.get(service, key) == value

            await eventually(arrived, timeout=1.0)
            took_ms = (time.monotonic() - started) * 1000
            put_ms = (started - sent) * 1000
            print(f"{service}/{key}: PUT {put_ms:.1f} ms, then in LiveConfig {took_ms:.1f} ms")  # noqa: T201
            assert seen == [value]
            await client.delete(f"/api/v1/config/{service}/{key}")

            async def dropped(service: str = service, key: str = key) -> bool:
                return platform.live_config.get(service, key, "default") == "default"

            await eventually(dropped, timeout=1.0)
        finally:
            unsubscribe()


async def test_the_reconciler_heals_a_lost_kv_write(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    class CrashBeforeKv(KvMirror):
        async def publish(self, latest: LatestVersion) -> bool:
            return False  # the process "dies" between the commit and the KV write

    mirror = platform.provided("config_mirror")
    assert isinstance(mirror, KvMirror)
    await client.put("/api/v1/config/analytics/window", json={"value": 10})
    await change_config(
        SetConfig(ref=ConfigRef(service="analytics", key="window"), value=20, author="test"),
        uow_factory=lambda: ConfigUnitOfWork(platform.database),
        clock=platform.clock,
        mirror=CrashBeforeKv(platform.backbone, mirror.queries),
    )
    await asyncio.sleep(0.2)
    assert platform.live_config.get("analytics", "window") == 10  # the KV copy is behind
    assert await mirror.reconcile() == 1
    await eventually(
        lambda: asyncio.sleep(0, platform.live_config.get("analytics", "window") == 20)
    )
    assert await mirror.reconcile() == 0
