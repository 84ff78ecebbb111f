"""Blocking queries: a waiter wakes when the index passes what it saw, or at its timeout."""

from __future__ import annotations

import asyncio

import pytest

from fleetmesh.core.blocking import IndexWaiters

pytestmark = pytest.mark.unit


async def test_a_waiter_wakes_when_the_index_passes_what_it_saw() -> None:
    waiters = IndexWaiters()
    assert await waiters.advance("a", 3)
    waiting = asyncio.create_task(waiters.wait("a", 3, timeout=30))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    assert not await waiters.advance("a", 2)  # an index never goes back
    assert await waiters.advance("b", 9)  # another key wakes nobody here
    await asyncio.sleep(0.01)
    assert not waiting.done()
    assert await waiters.advance("a", 4)
    assert await waiting == 4


async def test_a_wait_behind_answers_at_once_and_a_timeout_returns_the_same_index() -> None:
    waiters = IndexWaiters()
    await waiters.advance("a", 5)
    assert await waiters.wait("a", 1, timeout=30) == 5
    assert await waiters.wait("a", 5, timeout=0.01) == 5
    assert waiters._conditions == {}  # nothing kept once nobody waits


async def test_close_wakes_every_waiter_and_answers_later_ones() -> None:
    waiters = IndexWaiters()
    waiting = [asyncio.create_task(waiters.wait(key, 0, timeout=30)) for key in "abc"]
    await asyncio.sleep(0.01)
    await waiters.close()
    assert await asyncio.gather(*waiting) == [0, 0, 0]
    assert await waiters.wait("d", 0, timeout=30) == 0
