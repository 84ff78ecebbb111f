"""A restart of the status service forgets no pending deadline and fires none twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from fleetmesh.bootstrap import Platform, bootstrap
from fleetmesh.core.clock import from_rfc3339
from fleetmesh.status.repository import status_devices
from support import client_for, make_settings

pytestmark = pytest.mark.integration

FAST, SLOW = 500, 1000
FAST_TIMEOUT_S, SLOW_TIMEOUT_S = 1.0, 5.0


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
    try:
        async with client_for(second) as http:
            kit = make_kit(second, http)
            await kit.eventually(
                lambda: _at_least(_count(second, "offline"), FAST + SLOW),
                timeout=SLOW_TIMEOUT_S + 3,
            )
            await kit.eventually(lambda: _at_least(_offline_count(second), FAST + SLOW))
            events = await _offline_events(second)
            per_device: dict[str, int] = {}
            for event in events:
                per_device[event["subject"]] = per_device.get(event["subject"], 0) + 1
            assert len(per_device) == FAST + SLOW
            assert set(per_device.values()) == {1}
            assert {e["data"]["cause"] for e in events} == {"timeout"}
            assert {e["data"]["sequence"] for e in events} == {2}
            # Each pending one fired at its deadline (last_seen + the type's timeout), also
            # those that passed while the service was down: they are stored at that time.
            deadlines = await _deadlines(second, SLOW_TIMEOUT_S)
            fired_at = {
                e["subject"]: from_rfc3339(e["data"]["at"])
                for e in events
                if e["subject"].startswith("s-")
            }
            assert len(deadlines) == SLOW and set(fired_at) == set(deadlines)
            late = [d for d, at in fired_at.items() if not _same_ms(at, deadlines[d])]
            assert late == []
            await asyncio.sleep(0.5)
            assert len(await _offline_events(second)) == FAST + SLOW
            assert await _scalar(second, "SELECT max(sequence) FROM status_history") == 2
    finally:
        await second.stop()


async def _telemetry(kit: Any, device_ids: list[str]) -> None:
    for start in range(0, len(device_ids), 100):
        await asyncio.gather(*(kit.telemetry(d) for d in device_ids[start : start + 100]))


async def _deadlines(platform: Platform, timeout_s: float) -> dict[str, datetime]:
    """Each slow device's offline deadline as stored: last_seen + the timeout."""
    async with platform.database.session() as session:
        rows = await session.execute(
            select(status_devices.c.device_id, status_devices.c.last_seen).where(
                status_devices.c.device_id.startswith("s-")
            )
        )
        return {row.device_id: row.last_seen + timedelta(seconds=timeout_s) for row in rows}


async def _offline_count(platform: Platform) -> int:
    return len(await _offline_events(platform))


async def _at_least(count: Awaitable[int], wanted: int) -> bool:
    return await count >= wanted


def _same_ms(a: datetime, b: datetime) -> bool:
    return abs((a - b).total_seconds()) < 0.002
