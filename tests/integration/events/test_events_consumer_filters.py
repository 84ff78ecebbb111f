"""Subscriptions' type patterns become JetStream consumer filters JetStream accepts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fleetmesh.events.supervisor import minimal_subject_filters

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (("events.a.b.v1",), ["events.a.b.v1"]),
        (("events.a.>", "events.a.b.v1"), ["events.a.>"]),
        (("events.a.b.v1", "events.a.>"), ["events.a.>"]),
        (("events.>", "events.a.*.v1"), ["events.>"]),
        (("events.a.*.v1", "events.a.b.v1"), ["events.a.*.v1"]),
        (("events.a.b.v1", "events.c.d.v1"), ["events.a.b.v1", "events.c.d.v1"]),
        (("events.*.x.v1", "events.a.>"), ["events.>"]),
        (("events.a.b", "events.a.b.c"), ["events.a.b", "events.a.b.c"]),
        (("events.a.b.v1", "events.a.b.v1"), ["events.a.b.v1"]),
    ],
)
def test_filters_are_reduced_to_non_overlapping_ones(
    filters: tuple[str, ...], expected: list[str]
) -> None:
    assert minimal_subject_filters(filters) == expected


async def test_overlapping_patterns_deliver_each_event_once(
    sqlite_bus: Any, receivers: Any, wait_until: Any
) -> None:
    await sqlite_bus.contract()
    await sqlite_bus.contract("com.other.thing", schema=True)
    receiver = await receivers()
    await sqlite_bus.subscribe(
        receiver.url, types=["*.acme.reading.taken", "com.acme.>", "com.acme.reading.*"]
    )
    reading = sqlite_bus.event()
    other = sqlite_bus.event(type="com.other.thing", data=None)

    await sqlite_bus.publish(other)
    await sqlite_bus.publish(reading)

    await wait_until(lambda: len(receiver.delivered) == 1)
    assert receiver.delivered[0].headers["ce-id"] == reading["id"]
    assert json.loads(receiver.delivered[0].body) == reading["data"]
