"""Uptime and availability computed from a device's status history. Pure functions.

A history is a sequence of `(ts, state)` points, each meaning "from `ts` on,
the device was in `state`". It may hold duplicates and arrive out of order;
its meaning is fixed by these rules (the tests check them against a
second-by-second brute force):

- Points are ordered by time. Points with the same timestamp keep their input
  order and the last one wins, so pass the history in `sequence` order.
- The state at instant `t` is the state of the last point at or before `t`.
  Before the first point the state is unknown.
- `deregistered` is terminal: points after the first `deregistered` one (in
  that order) are ignored.
- A repeated state is not a new interval: five `online` reports in a row
  count the time once, from the first of them.
- Intervals are half-open, `[start, end)`: the instant of a transition
  belongs to the new state.

Availability over the window `[now - window, now)` is
`online / (online + offline)`. Time that is not evidence either way is left
out of the denominator: unknown time (before the first point, i.e. before
the device was registered or first reported), `registered` (never reported
yet), `maintenance` (an operator took it out of service) and
`deregistered`. With nothing left in the denominator it is None, not 0 or 100.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType

from fleetmesh.status.domain import DeviceState

StatusPoint = tuple[datetime, DeviceState]
"""From this instant on, the device was in this state."""

AVAILABILITY_STATES = frozenset({DeviceState.ONLINE, DeviceState.OFFLINE})
"""The states that count in the denominator of availability."""

_ZERO = timedelta(0)


@dataclass(frozen=True, slots=True)
class StateSpan:
    """The device was in `state` during `[start, end)`."""

    state: DeviceState
    start: datetime
    end: datetime

    @property
    def duration(self) -> timedelta:
        return self.end - self.start


def normalize_history(points: Iterable[StatusPoint]) -> list[StatusPoint]:
    """The history in time order, one point per real change, cut at deregistration."""
    ordered = sorted(((ts, DeviceState(state)) for ts, state in points), key=lambda p: p[0])
    changes: list[StatusPoint] = []
    for ts, state in _until_deregistered(ordered):
        if changes and changes[-1][0] == ts:
            changes.pop()
        if not changes or changes[-1][1] is not state:
            changes.append((ts, state))
    return changes


def _until_deregistered(ordered: list[StatusPoint]) -> Iterator[StatusPoint]:
    for point in ordered:
        yield point
        if point[1] is DeviceState.DEREGISTERED:
            return


def state_spans(points: Iterable[StatusPoint], start: datetime, end: datetime) -> list[StateSpan]:
    """The known states during `[start, end)`, clipped to it, in time order."""
    changes = normalize_history(points)
    if not changes:
        return []
    ends = [ts for ts, _ in changes[1:]] + [end]
    spans: list[StateSpan] = []
    for (ts, state), next_ts in zip(changes, ends, strict=True):
        clipped = StateSpan(state, max(ts, start), min(next_ts, end))
        if clipped.start < clipped.end:
            spans.append(clipped)
    return spans


@dataclass(frozen=True, slots=True)
class TimeInStates:
    """How the time in `[start, end)` splits between the states, and what is unknown."""

    start: datetime
    end: datetime
    by_state: Mapping[DeviceState, timedelta] = field(default_factory=dict)

    def of(self, state: DeviceState) -> timedelta:
        return self.by_state.get(state, _ZERO)

    @property
    def known(self) -> timedelta:
        return sum(self.by_state.values(), _ZERO)

    @property
    def unknown(self) -> timedelta:
        return max(self.end - self.start, _ZERO) - self.known


def time_in_states(points: Iterable[StatusPoint], start: datetime, end: datetime) -> TimeInStates:
    """Total time spent in each state during `[start, end)`."""
    totals: dict[DeviceState, timedelta] = {}
    for span in state_spans(points, start, end):
        totals[span.state] = totals.get(span.state, _ZERO) + span.duration
    return TimeInStates(start, end, MappingProxyType(totals))


def uptime(
    points: Iterable[StatusPoint], now: datetime, *, since: datetime | None = None
) -> timedelta:
    """Total time online up to `now`, the open interval included; from `since` if given."""
    changes = normalize_history(points)
    if not changes:
        return _ZERO
    start = changes[0][0] if since is None else since
    return time_in_states(changes, start, now).of(DeviceState.ONLINE)


@dataclass(frozen=True, slots=True)
class Availability:
    """Availability over `[start, end)`: online time over online plus offline time."""

    start: datetime
    end: datetime
    online: timedelta
    offline: timedelta
    maintenance: timedelta
    excluded: timedelta
    """Time out of the denominator other than maintenance: unknown, registered, deregistered."""

    @property
    def window(self) -> timedelta:
        return self.end - self.start

    @property
    def counted(self) -> timedelta:
        return self.online + self.offline

    @property
    def ratio(self) -> float | None:
        """Online share of the counted time in [0, 1]; None when nothing was counted."""
        if self.counted <= _ZERO:
            return None
        return self.online / self.counted

    @property
    def percent(self) -> float | None:
        ratio = self.ratio
        return None if ratio is None else 100.0 * ratio


def availability(points: Iterable[StatusPoint], now: datetime, window: timedelta) -> Availability:
    """Availability over `[now - window, now)`; see the module docstring for what counts."""
    if window <= _ZERO:
        raise ValueError(f"window must be positive, got {window}")
    times = time_in_states(points, now - window, now)
    online = times.of(DeviceState.ONLINE)
    offline = times.of(DeviceState.OFFLINE)
    maintenance = times.of(DeviceState.MAINTENANCE)
    return Availability(
        start=times.start,
        end=times.end,
        online=online,
        offline=offline,
        maintenance=maintenance,
        excluded=window - online - offline - maintenance,
    )
