"""When to act next: per-device deadlines and the health-check backoff. Pure Python.

`DeadlineScheduler` keeps at most one live deadline per device in a binary
heap with lazy invalidation: re-setting or cancelling a deadline only updates
a dict, and the superseded heap entry is skipped when it surfaces. When a `set`
finds stale entries outnumbering the live ones, the heap is rebuilt from the live
entries, so memory stays O(live devices) however often deadlines are pushed back
(every telemetry point pushes one back). Only `set` grows the heap, so only `set`
rebuilds it: when a whole fleet falls silent, the timeouts cancel thousands of
deadlines a second, and a rebuild of 100,000 entries in the middle of that held
the first offline transitions back by about 40 ms. Costs: `set` O(log n)
amortised, `cancel` O(1), `pop_due` O(log n) per entry popped, `next_at` O(log n)
amortised.

Deadlines that fall at the same instant fire in the order they were set.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

_COMPACTION_SLACK = 1024
"""Stale entries tolerated on top of the live count before the heap is rebuilt."""


class DeadlineScheduler:
    """At most one pending deadline per device; superseded deadlines never fire."""

    def __init__(self) -> None:
        self._heap: list[tuple[datetime, int, str]] = []
        self._live: dict[str, tuple[datetime, int]] = {}
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._live

    def get(self, device_id: str) -> datetime | None:
        """The device's pending deadline, if any."""
        entry = self._live.get(device_id)
        return None if entry is None else entry[0]

    def set(self, device_id: str, at: datetime) -> None:
        """Schedule the device at `at`, replacing its pending deadline if it has one."""
        order = next(self._order)
        self._live[device_id] = (at, order)
        heapq.heappush(self._heap, (at, order, device_id))
        self._compact_if_mostly_stale()

    def cancel(self, device_id: str) -> bool:
        """Drop the device's pending deadline; False if it had none."""
        return self._live.pop(device_id, None) is not None

    def pop_due(self, now: datetime, limit: int | None = None) -> list[tuple[str, datetime]]:
        """Remove and return the deadlines at or before `now`, earliest first (at most `limit`)."""
        due: list[tuple[str, datetime]] = []
        while self._heap and self._heap[0][0] <= now and (limit is None or len(due) < limit):
            at, order, device_id = heapq.heappop(self._heap)
            if self._live.get(device_id) == (at, order):
                del self._live[device_id]
                due.append((device_id, at))
        return due

    def next_at(self) -> datetime | None:
        """The earliest pending deadline, or None when nothing is scheduled."""
        self._drop_stale_head()
        return self._heap[0][0] if self._heap else None

    def _drop_stale_head(self) -> None:
        while self._heap and not self._is_live(self._heap[0]):
            heapq.heappop(self._heap)

    def _is_live(self, entry: tuple[datetime, int, str]) -> bool:
        at, order, device_id = entry
        return self._live.get(device_id) == (at, order)

    def _compact_if_mostly_stale(self) -> None:
        if len(self._heap) > 2 * len(self._live) + _COMPACTION_SLACK:
            self._heap = [(at, order, device) for device, (at, order) in self._live.items()]
            heapq.heapify(self._heap)


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Health checks of an offline device: `initial`, then times `factor`, capped at `maximum`."""

    initial: timedelta = timedelta(seconds=30)
    factor: float = 2.0
    maximum: timedelta = timedelta(hours=1)

    def __post_init__(self) -> None:
        if self.initial <= timedelta(0):
            raise ValueError(f"initial delay must be positive, got {self.initial}")
        if not 1.0 <= self.factor < math.inf:
            raise ValueError(f"factor must be at least 1, got {self.factor}")
        if self.maximum < self.initial:
            raise ValueError(f"maximum {self.maximum} is below initial {self.initial}")


def next_check_delay(attempt: int, policy: BackoffPolicy | None = None) -> timedelta:
    """Delay before health check number `attempt` (0 = first check after going offline).

    With the default policy: 30 s, 1 m, 2 m, 4 m, ... then 1 h for every
    attempt from the 8th on. Each delay counts from the previous check (from the
    offline transition for attempt 0).
    """
    if attempt < 0:
        raise ValueError(f"attempt must not be negative, got {attempt}")
    policy = policy or BackoffPolicy()
    if attempt >= _attempts_until_capped(policy):
        return policy.maximum
    return min(policy.initial * policy.factor**attempt, policy.maximum)


def _attempts_until_capped(policy: BackoffPolicy) -> float:
    """The first attempt whose uncapped delay would reach the maximum (inf if never)."""
    if policy.factor == 1.0:
        return math.inf
    return math.ceil(math.log(policy.maximum / policy.initial, policy.factor))
