"""Blocking queries, as Consul has them: wait until a key's index passes the one you saw.

Each key has a monotonically increasing index (a version, a KV revision). A
reader that saw index N asks to wait until the index passes N, with a timeout;
`advance` wakes it as soon as it does. Waiters sleep on one condition per key,
kept only while somebody waits on it; `close` wakes everybody for good.
"""

from __future__ import annotations

import asyncio
import contextlib


class IndexWaiters:
    """Per-key indexes and the readers waiting for them to move."""

    def __init__(self) -> None:
        self._indexes: dict[str, int] = {}
        self._conditions: dict[str, tuple[asyncio.Condition, int]] = {}
        self.closed = False

    def index(self, key: str) -> int:
        return self._indexes.get(key, 0)

    async def advance(self, key: str, index: int) -> bool:
        """Raise the key's index to `index` (never lower it); True if it moved."""
        if index <= self._indexes.get(key, 0):
            return False
        self._indexes[key] = index
        await self._notify(key)
        return True

    async def wait(self, key: str, after: int, timeout: float) -> int:
        """The key's index once it passes `after`, or after `timeout`, or when closed."""
        if self.index(key) > after or self.closed:
            return self.index(key)
        condition, waiters = self._conditions.get(key, (asyncio.Condition(), 0))
        self._conditions[key] = (condition, waiters + 1)
        try:
            async with condition:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await condition.wait_for(lambda: self.index(key) > after or self.closed)
        finally:
            condition, waiters = self._conditions[key]
            if waiters <= 1:
                del self._conditions[key]
            else:
                self._conditions[key] = (condition, waiters - 1)
        return self.index(key)

    async def close(self) -> None:
        """Wake every waiter now, and answer every later wait at once."""
        self.closed = True
        for key in list(self._conditions):
            await self._notify(key)

    async def _notify(self, key: str) -> None:
        found = self._conditions.get(key)
        if found is not None:
            async with found[0]:
                found[0].notify_all()
