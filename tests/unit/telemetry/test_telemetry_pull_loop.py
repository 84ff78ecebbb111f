"""PullLoop: batches handled at once up to its concurrency, finished on stop, errors survived."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fleetmesh.telemetry.consumers import PullLoop

pytestmark = pytest.mark.unit


class _Subscription:
    """A pull subscription holding messages in memory."""

    def __init__(self, messages: list[Any]) -> None:
        self.messages = messages
        self.pending_msgs = 0

    async def fetch(self, count: int, timeout: float) -> list[Any]:
        if not self.messages:
            await asyncio.sleep(timeout)
            raise TimeoutError
        taken, self.messages = self.messages[:count], self.messages[count:]
        return taken

    async def unsubscribe(self) -> None:
        return None


def _loop(subscription: _Subscription, handle: Any, concurrency: int) -> PullLoop:
    async def subscribe() -> _Subscription:
        return subscription

    return PullLoop(
        name="test",
        subscribe=subscribe,
        handle=handle,
        max_messages=lambda: 1,
        wait_s=0.01,
        drain_s=0.0,
        concurrency=concurrency,
    )


@pytest.mark.parametrize("concurrency", [1, 2, 3])
async def test_no_more_batches_are_in_hand_than_the_concurrency(concurrency: int) -> None:
    in_hand: list[int] = []
    most = 0
    handled: list[int] = []

    async def handle(batch: list[int]) -> None:
        nonlocal most
        in_hand.append(batch[0])
        most = max(most, len(in_hand))
        await asyncio.sleep(0.02)
        in_hand.remove(batch[0])
        handled.append(batch[0])

    loop = _loop(_Subscription(list(range(12))), handle, concurrency)
    await loop.start()
    while len(handled) < 12:
        await asyncio.sleep(0.01)
    await loop.stop()

    assert most == concurrency
    assert sorted(handled) == list(range(12))


async def test_stop_lets_the_batches_in_hand_finish() -> None:
    release = asyncio.Event()
    started: list[int] = []
    finished: list[int] = []

    async def handle(batch: list[int]) -> None:
        started.append(batch[0])
        await release.wait()
        finished.append(batch[0])

    loop = _loop(_Subscription([1, 2]), handle, concurrency=2)
    await loop.start()
    while len(started) < 2:
        await asyncio.sleep(0.01)
    stopping = asyncio.create_task(loop.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()
    release.set()
    await stopping

    assert sorted(finished) == [1, 2]


async def test_a_failing_batch_does_not_stop_the_others() -> None:
    handled: list[int] = []

    async def handle(batch: list[int]) -> None:
        if batch[0] == 2:
            raise RuntimeError("poison")
        handled.append(batch[0])

    loop = _loop(_Subscription([1, 2, 3, 4]), handle, concurrency=2)
    await loop.start()
    for _ in range(300):
        if len(handled) == 3:
            break
        await asyncio.sleep(0.01)
    await loop.stop()

    assert sorted(handled) == [1, 3, 4]
