"""A restart of the status service forgets no pending deadline and fires none twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from fleetmesh.bootstrap import Platform, bootstrap
from fleetmesh.core.clock import from_rfc3339, utcnow
from support import client_for, make_settings

pytestmark = pytest.mark.integration

FAST, SLOW = 500, 500
FAST_TIMEOUT_S, SLOW_TIMEOUT_S = 1.0, 3.0


async def _scalar(platform: Platform, sql: str) -> Any:
    async with platform.database.session() as session:
        return (await session.execute(text(sql))).scalar()


async def _count(platform: Platform, status: str) -> int:
    return int(
        await _scalar(platform, f"SELECT count(*) FROM status_devices WHERE status = '{status}'")
    )


async def _offline_events(platform: Platform) -> list[dict[str, Any]]:
    async with platform.database.session() as session:
        rows = await session.execute(
            text("SELECT payload FROM outbox WHERE subject = 'events.device.status_changed.v1'")
        )
        events = [json.loads(bytes(row.payload)) for row in rows]
    return [e for e in events if e["data"]["current"] == "offline"]


async def _start(data_dir: Path, database_url: str | None) -> Platform:
    platform = bootstrap(make_settings(data_dir, database_url))
    await platform.start()
    return platform


async def test_restart_with_1000_pending_deadlines_loses_none_and_fires_none_twice(
    tmp_path: Path, database_url: str | None, make_kit: Any
) -> None:
    data_dir = tmp_path / "data"
    fast = [f"f-{i:04}" for i in range(FAST)]
    slow = [f"s-{i:04}" for i in range(SLOW)]
    first = await _start(data_dir, database_url)
    try:
        async with client_for(first) as http:
            kit = make_kit(first, http)
            await kit.define_type("fast", offline_timeout_s=FAST_TIMEOUT_S)
            await kit.define_type("slow", offline_timeout_s=SLOW_TIMEOUT_S)
            await kit.announce(*fast, type_name="fast")
            await kit.announce(*slow, type_name="slow")
            await _telemetry(kit, fast)
            # The fast ones time out before the restart ...
            await kit.eventually(lambda: _at_least(_count(first, "offline"), FAST))
            await _telemetry(kit, slow)
            # ... the slow ones are online, their deadlines pending when it stops.
            await kit.eventually(lambda: _at_least(_count(first, "online"), SLOW))
            assert await _count(first, "offline") == FAST
    finally:
        await first.stop()

    second = await _start(data_dir, database_url)
    restarted = utcnow()
    try:
        async with client_for(second) as http:
            kit = make_kit(second, http)
            await kit.eventually(
                lambda: _at_least(_count(second, "offline"), FAST + SLOW),
                timeout=SLOW_TIMEOUT_S + 3,
            )
            # Each offline transition was committed no later than a second after its
            # deadline (or after the restart, for deadlines that passed while down).
            lateness = await _lateness(second, restarted)
            assert len(lateness) == SLOW and max(lateness) <= timedelta(seconds=1)
            await kit.eventually(lambda: _at_least(_offline_count(second), FAST + SLOW))
            events = await _offline_events(second)
            per_device: dict[str, int] = {}
            for event in events:
                per_device[event["subject"]] = per_device.get(event["subject"], 0) + 1
            assert len(per_device) == FAST + SLOW
            assert set(per_device.values()) == {1}
            assert {e["data"]["cause"] for e in events} == {"timeout"}
            assert {e["data"]["sequence"] for e in events} == {2}
            # Each fired at its deadline: last_seen + the type's timeout.
            body = await kit.status("s-0007")
            offline_at = next(h for h in await kit.history("s-0007") if h["current"] == "offline")
            deadline = from_rfc3339(body["last_seen"]) + timedelta(seconds=SLOW_TIMEOUT_S)
            assert _same_ms(from_rfc3339(offline_at["at"]), deadline)
            await asyncio.sleep(0.5)
            assert len(await _offline_events(second)) == FAST + SLOW
            assert await _scalar(second, "SELECT max(sequence) FROM status_history") == 2
    finally:
        await second.stop()


async def _telemetry(kit: Any, device_ids: list[str]) -> None:
    for start in range(0, len(device_ids), 100):
        await asyncio.gather(*(kit.telemetry(d) for d in device_ids[start : start + 100]))


async def _lateness(platform: Platform, restarted: datetime) -> list[timedelta]:
    """For the slow devices: commit time of the offline event minus max(deadline, restart)."""
    async with platform.database.session() as session:
        rows = await session.execute(
            text(
                "SELECT created_at, payload FROM outbox "
                "WHERE subject = 'events.device.status_changed.v1'"
            )
        )
        found = []
        for row in rows:
            event = json.loads(bytes(row.payload))
            if event["data"]["current"] == "offline" and event["subject"].startswith("s-"):
                committed = row.created_at
                if isinstance(committed, str):
                    committed = datetime.fromisoformat(committed)
                committed = committed if committed.tzinfo else committed.replace(tzinfo=UTC)
                deadline = from_rfc3339(event["data"]["at"])
                found.append(committed - max(deadline, restarted))
    return found


async def _offline_count(platform: Platform) -> int:
    return len(await _offline_events(platform))


async def _at_least(count: Awaitable[int], wanted: int) -> bool:
    return await count >= wanted


def _same_ms(a: datetime, b: datetime) -> bool:
    return abs((a - b).total_seconds()) < 0.002
