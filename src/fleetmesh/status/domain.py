"""The device status aggregate: states, causes, reports and the transition rules.

A `DeviceStatus` is fed `StatusReport`s (telemetry arrived, MQTT connect or
disconnect, last will, inactivity timeout, operator action, health check,
deregistration) and records a `StatusChanged` event in `self.events` only when
the status really changes. Pure Python: no clock, no I/O.

The rules, in the order `apply` checks them:

1. `deregistered` is terminal: once there, every report is ignored.
2. Operator causes (`manual`, `deregistered`) are authoritative: they always
   apply when they name a different status. They never reorder history: an
   operator report older than the last transition is recorded at the time of
   that transition (`since`) instead.
3. Automatic causes (telemetry, MQTT, last will, timeout, health check):
   - an `online` report is evidence of life: it moves `last_seen` forward
     (never back), whatever the status and however late it arrives;
   - in `maintenance` they never change the status (only `last_seen` above);
   - the same status again changes nothing else;
   - an `online` report older than the last transition is stale (it only did
     the `last_seen` bump above); a newer one makes the device online;
   - an `offline` report older than the last transition or than `last_seen` is
     stale and ignored (the device was seen alive after it; if it is really
     gone, the inactivity timeout catches it);
   - a `timeout` applies only while `online` and only at or after the current
     `deadline()`, so a timeout raced by fresh telemetry is ignored.

Equal timestamps count as in order: a report observed at the same instant as
the last transition applies after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TypeVar

from fleetmesh.core.errors import InvalidInput

_E = TypeVar("_E", bound=StrEnum)


class DeviceState(StrEnum):
    """Where a device is in its life, as far as the platform can tell."""

    REGISTERED = "registered"
    ONLINE = "online"
    OFFLINE = "offline"
    MAINTENANCE = "maintenance"
    DEREGISTERED = "deregistered"


class StatusCause(StrEnum):
    """Why a status report was made."""

    TELEMETRY = "telemetry"
    MQTT_CONNECT = "mqtt_connect"
    MQTT_DISCONNECT = "mqtt_disconnect"
    LAST_WILL = "last_will"
    TIMEOUT = "timeout"
    MANUAL = "manual"
    HEALTH_CHECK = "health_check"
    DEREGISTERED = "deregistered"


OPERATOR_CAUSES = frozenset({StatusCause.MANUAL, StatusCause.DEREGISTERED})

ALLOWED_STATES: Mapping[StatusCause, frozenset[DeviceState]] = {
    StatusCause.TELEMETRY: frozenset({DeviceState.ONLINE}),
    StatusCause.MQTT_CONNECT: frozenset({DeviceState.ONLINE}),
    StatusCause.MQTT_DISCONNECT: frozenset({DeviceState.OFFLINE}),
    StatusCause.LAST_WILL: frozenset({DeviceState.OFFLINE}),
    StatusCause.TIMEOUT: frozenset({DeviceState.OFFLINE}),
    StatusCause.HEALTH_CHECK: frozenset({DeviceState.ONLINE, DeviceState.OFFLINE}),
    StatusCause.MANUAL: frozenset(
        {DeviceState.ONLINE, DeviceState.OFFLINE, DeviceState.MAINTENANCE}
    ),
    StatusCause.DEREGISTERED: frozenset({DeviceState.DEREGISTERED}),
}
"""Which states each cause may report; anything else is an `InvalidStatusInput`."""


MAX_OFFLINE_TIMEOUT_S = 365 * 24 * 3600.0
"""Upper bound of a device type's inactivity timeout (one year)."""


class InvalidStatusInput(InvalidInput):
    """A report or setting that cannot be applied: an impossible cause/state pair,
    a naive datetime, or an offline timeout outside (0, one year]."""


def _parse(kind: type[_E], value: str) -> _E:
    """Accept the enum or its plain string value (as read back from storage)."""
    if isinstance(value, kind):
        return value  # the common case, and far cheaper than `kind(value)`
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(kind)
        raise InvalidStatusInput(
            f"unknown {kind.__name__} {value!r} (allowed: {allowed})"
        ) from None


def _require_aware(name: str, moment: datetime) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidStatusInput(f"{name} must be timezone-aware, got {moment.isoformat()}")


@dataclass(frozen=True, slots=True)
class StatusReport:
    """One observation about a device: what state it is in, why we think so, and when.

    `observed_at` should be the platform's time of observation (receive time,
    MQTT event time, deadline), not the device's own clock.
    """

    state: DeviceState
    cause: StatusCause
    observed_at: datetime
    detail: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", _parse(DeviceState, self.state))
        object.__setattr__(self, "cause", _parse(StatusCause, self.cause))
        _require_aware("observed_at", self.observed_at)
        if self.state not in ALLOWED_STATES[self.cause]:
            allowed = ", ".join(sorted(ALLOWED_STATES[self.cause]))
            raise InvalidStatusInput(
                f"cause {self.cause!s} cannot report state {self.state!s} (allowed: {allowed})"
            )

    @property
    def is_evidence_of_life(self) -> bool:
        """The device itself showed up: it sent data, connected, or answered a check."""
        return self.state is DeviceState.ONLINE and self.cause not in OPERATOR_CAUSES


@dataclass(frozen=True, slots=True)
class StatusChanged:
    """Domain event: the device's status changed. One per history entry."""

    device_id: str
    previous: DeviceState
    current: DeviceState
    cause: StatusCause
    at: datetime
    sequence: int
    detail: str = ""


@dataclass(eq=False)
class DeviceStatus:
    """The status aggregate of one device.

    - `since`: when the current status began (time of the last transition).
    - `last_update`: the latest observation time that changed this aggregate.
    - `last_seen`: the latest evidence of life from the device, or None.
    - `sequence`: number of the last transition; 0 is the registered state,
      each transition adds exactly one.
    - `version`: bumped once by every call that changed the aggregate, for
      optimistic locking and to skip writes when `apply` changed nothing.
    """

    device_id: str
    status: DeviceState
    since: datetime
    last_update: datetime
    offline_timeout_s: float
    last_seen: datetime | None = None
    sequence: int = 0
    version: int = 0
    events: list[StatusChanged] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.status = _parse(DeviceState, self.status)
        _require_aware("since", self.since)
        _require_aware("last_update", self.last_update)
        if self.last_seen is not None:
            _require_aware("last_seen", self.last_seen)
        _require_positive_timeout(self.offline_timeout_s)

    @classmethod
    def register(cls, device_id: str, *, at: datetime, offline_timeout_s: float) -> DeviceStatus:
        """A newly tracked device: `registered` since `at`, sequence 0, no event."""
        return cls(
            device_id=device_id,
            status=DeviceState.REGISTERED,
            since=at,
            last_update=at,
            offline_timeout_s=offline_timeout_s,
        )

    @property
    def offline_timeout(self) -> timedelta:
        return timedelta(seconds=self.offline_timeout_s)

    def deadline(self) -> datetime | None:
        """When the device goes offline if nothing else arrives; None unless online.

        Counted from the later of `last_seen` and `since`, so a device put
        online by an operator (or back from maintenance) gets a full timeout.
        """
        if self.status is not DeviceState.ONLINE:
            return None
        return self._latest_sign_of_life() + self.offline_timeout

    def is_overdue(self, now: datetime) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def change_offline_timeout(self, offline_timeout_s: float) -> None:
        """The device type's timeout changed; the caller reschedules `deadline()`."""
        _require_positive_timeout(offline_timeout_s)
        if offline_timeout_s != self.offline_timeout_s:
            self.offline_timeout_s = offline_timeout_s
            self.version += 1

    def apply(self, report: StatusReport) -> StatusChanged | None:
        """Apply one report; return the transition it caused, if any (see module rules)."""
        if self.status is DeviceState.DEREGISTERED:
            return None
        last_seen_before = self.last_seen
        if report.cause in OPERATOR_CAUSES:
            change = self._apply_operator(report)
        else:
            change = self._apply_automatic(report)
        if change is not None:
            self._touch(change.at)
        elif self.last_seen != last_seen_before:
            self._touch(report.observed_at)
        return change

    def _apply_operator(self, report: StatusReport) -> StatusChanged | None:
        if report.state is self.status:
            return None
        return self._transition(report, at=max(report.observed_at, self.since))

    def _apply_automatic(self, report: StatusReport) -> StatusChanged | None:
        if report.is_evidence_of_life:
            self._mark_seen(report.observed_at)
        if self.status is DeviceState.MAINTENANCE or report.state is self.status:
            return None
        if not self._is_current(report):
            return None
        return self._transition(report, at=report.observed_at)

    def _is_current(self, report: StatusReport) -> bool:
        """Whether an automatic report is recent enough to change the status."""
        if report.cause is StatusCause.TIMEOUT:
            return self.is_overdue(report.observed_at)
        if report.state is DeviceState.ONLINE:
            return report.observed_at >= self.since
        return report.observed_at >= self._latest_sign_of_life()

    def _latest_sign_of_life(self) -> datetime:
        if self.last_seen is None:
            return self.since
        return max(self.since, self.last_seen)

    def _mark_seen(self, at: datetime) -> None:
        if self.last_seen is not None and at <= self.last_seen:
            return
        self.last_seen = at

    def _transition(self, report: StatusReport, *, at: datetime) -> StatusChanged:
        event = StatusChanged(
            device_id=self.device_id,
            previous=self.status,
            current=report.state,
            cause=report.cause,
            at=at,
            sequence=self.sequence + 1,
            detail=report.detail,
        )
        self.status = report.state
        self.since = at
        self.sequence = event.sequence
        self.events.append(event)
        return event

    def _touch(self, at: datetime) -> None:
        self.last_update = max(self.last_update, at)
        self.version += 1


def timed_out(device_id: str, sequence: int, deadline: datetime, detail: str) -> StatusChanged:
    """What `apply` records for a `timeout` report at `deadline()` of an online device whose
    state has not changed since that deadline was computed: offline from the deadline on,
    with the next sequence number. The aggregate's `since` and `last_update` both become the
    deadline (nothing it was told happened later than its latest sign of life), and its
    version moves by one; a caller that kept only `sequence` and `version` can write it."""
    return StatusChanged(
        device_id=device_id,
        previous=DeviceState.ONLINE,
        current=DeviceState.OFFLINE,
        cause=StatusCause.TIMEOUT,
        at=deadline,
        sequence=sequence + 1,
        detail=detail,
    )


def seen_again(
    deadline: datetime, offline_timeout_s: float, first: datetime, last: datetime
) -> datetime | None:
    """What `apply` records for telemetry observed from `first` to `last` (reports of life)
    of an online device whose `deadline()` is `deadline` and whose state has not changed
    since it was computed, when even the first report is later than the sign of life that
    deadline counts from: no transition; `last_seen` becomes `last`, `last_update` at least
    `last`, and the version moves (once per report here; a caller that writes the window
    at once moves it once). Returns the new deadline, or None when a report is not that
    late (then only the whole aggregate tells what changes)."""
    timeout = timedelta(seconds=offline_timeout_s)
    if first <= deadline - timeout:
        return None
    return last + timeout


def _require_positive_timeout(offline_timeout_s: float) -> None:
    if not 0 < offline_timeout_s <= MAX_OFFLINE_TIMEOUT_S:
        raise InvalidStatusInput(
            f"offline_timeout_s must be in (0, {MAX_OFFLINE_TIMEOUT_S:g}], got {offline_timeout_s}"
        )
