"""BatchPull against a real nats-server: batches, waiting, acks and naks, a reused durable."""

from __future__ import annotations

import asyncio

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from fleetmesh.bootstrap import Platform
from fleetmesh.core.pull import BatchPull

pytestmark = pytest.mark.integration

STREAM = "PULLTEST"


def consumer(name: str) -> ConsumerConfig:
    return ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT, ack_wait=30)


async def publish(platform: Platform, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        await platform.backbone.js.publish(f"pulltest.{n % 3}", str(n).encode())


@pytest.fixture
async def stream(sqlite_platform: Platform) -> Platform:
    await sqlite_platform.backbone.ensure_stream(StreamConfig(name=STREAM, subjects=["pulltest.>"]))
    return sqlite_platform


async def subscribe(platform: Platform, name: str) -> BatchPull:
    backbone = platform.backbone
    return await BatchPull.subscribe(backbone.nc, backbone.js, STREAM, consumer(name))


async def test_a_fetch_takes_what_is_pending_and_then_times_out(stream: Platform) -> None:
    await publish(stream, 50)
    pull = await subscribe(stream, "batches")

    first = await pull.fetch(1_000, timeout=5.0)
    assert [m.data for m in first] == [str(n).encode() for n in range(50)]
    with pytest.raises(TimeoutError):
        await pull.fetch(1_000, timeout=0.2)
    assert pull.pending_msgs == 0


async def test_a_fetch_hands_out_no_more_than_asked(stream: Platform) -> None:
    await publish(stream, 10)
    pull = await subscribe(stream, "smaller")

    first = await pull.fetch(4, timeout=5.0)
    second = await pull.fetch(100, timeout=5.0)
    assert [m.data for m in first + second] == [str(n).encode() for n in range(10)]
    assert len(first) == 4


async def test_a_fetch_of_one_waits_for_the_next_message(stream: Platform) -> None:
    pull = await subscribe(stream, "waiting")

    async def later() -> None:
        await asyncio.sleep(0.2)
        await publish(stream, 1, start=7)

    sender = asyncio.create_task(later())
    [message] = await pull.fetch(1, timeout=5.0)
    await sender
    assert message.data == b"7"


async def test_acks_settle_and_a_nak_comes_back(stream: Platform) -> None:
    await publish(stream, 3)
    pull = await subscribe(stream, "settling")

    messages = await pull.fetch(3, timeout=5.0)
    await messages[0].ack()
    await messages[1].ack()
    await messages[2].nak()
    [again] = await pull.fetch(10, timeout=5.0)  # waits for the redelivery
    assert again.data == b"2"
    assert again.metadata.num_delivered == 2
    await again.ack()
    await stream.backbone.nc.flush()
    for _ in range(100):  # the server takes acks asynchronously
        info = await stream.backbone.js.consumer_info(STREAM, "settling")
        if info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.02)
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_second_subscription_continues_the_same_durable(stream: Platform) -> None:
    await publish(stream, 6)
    pull = await subscribe(stream, "durable")
    for message in await pull.fetch(4, timeout=5.0):
        await message.ack()
    await pull.unsubscribe()

    again = await subscribe(stream, "durable")
    rest = await again.fetch(100, timeout=5.0)
    assert [m.data for m in rest] == [b"4", b"5"]


async def test_what_comes_after_a_fetch_returned_is_kept_then_naked_at_the_end(
    stream: Platform,
) -> None:
    pull = await subscribe(stream, "late")

    async def later(start: int) -> None:
        await asyncio.sleep(0.2)
        await publish(stream, 1, start=start)

    sender = asyncio.create_task(later(0))
    first = await pull.fetch(100, timeout=3.0)  # waits: its request stays open
    await sender
    await publish(stream, 2, start=1)
    for _ in range(100):
        if pull.pending_msgs == 2:
            break
        await asyncio.sleep(0.02)
    assert [m.data for m in first] == [b"0"] and pull.pending_msgs == 2
    await pull.unsubscribe()  # the two are naked, not left to their 30 s ack wait

    again = await subscribe(stream, "late")
    redelivered = await again.fetch(100, timeout=5.0)
    # Both come back at once; JetStream does not keep stream order among redeliveries.
    assert sorted(m.data for m in redelivered) == [b"1", b"2"]
    assert all(m.metadata.num_delivered == 2 for m in redelivered)
