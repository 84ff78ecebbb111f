"""The device status aggregate: transitions, out-of-order reports, maintenance, deadlines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetmesh.core.errors import InvalidInput
from fleetmesh.status.domain import (
    ALLOWED_STATES,
    DeviceState,
    DeviceStatus,
    InvalidStatusInput,
    StatusCause,
    StatusChanged,
    StatusReport,
    seen_again,
    timed_out,
)

pytestmark = pytest.mark.unit

T0 = datetime(2024, 1, 1, tzinfo=UTC)
ONLINE, OFFLINE = DeviceState.ONLINE, DeviceState.OFFLINE
MAINTENANCE, DEREGISTERED = DeviceState.MAINTENANCE, DeviceState.DEREGISTERED
Cause = StatusCause


def t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def report(state: DeviceState, cause: StatusCause, at: float, detail: str = "") -> StatusReport:
    return StatusReport(state, cause, t(at), detail)


def telemetry(at: float) -> StatusReport:
    return report(ONLINE, Cause.TELEMETRY, at)


def disconnect(at: float) -> StatusReport:
    return report(OFFLINE, Cause.MQTT_DISCONNECT, at)


def manual(state: DeviceState, at: float) -> StatusReport:
    return report(state, Cause.MANUAL, at)


def new_device(timeout_s: float = 60) -> DeviceStatus:
    return DeviceStatus.register("dev-1", at=t(0), offline_timeout_s=timeout_s)


def online_device(at: float = 10, timeout_s: float = 60) -> DeviceStatus:
    device = new_device(timeout_s)
    device.apply(telemetry(at))
    return device


class TestRegistration:
    def test_a_new_device_is_registered_at_sequence_zero_without_event(self) -> None:
        device = new_device()
        assert (device.status, device.since, device.sequence) == (DeviceState.REGISTERED, t(0), 0)
        assert device.last_seen is None
        assert device.events == []
        assert device.deadline() is None

    @pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), 366 * 86400])
    def test_offline_timeout_must_be_positive_and_bounded(self, timeout: float) -> None:
        with pytest.raises(InvalidStatusInput):
            DeviceStatus.register("d", at=t(0), offline_timeout_s=timeout)

    def test_naive_times_are_refused(self) -> None:
        with pytest.raises(InvalidStatusInput):
            DeviceStatus.register("d", at=datetime(2024, 1, 1), offline_timeout_s=60)
        with pytest.raises(InvalidStatusInput):
            StatusReport(ONLINE, Cause.TELEMETRY, datetime(2024, 1, 1))


class TestReports:
    @pytest.mark.parametrize(
        ("state", "cause"),
        [
            (ONLINE, Cause.MQTT_DISCONNECT),
            (OFFLINE, Cause.TELEMETRY),
            (MAINTENANCE, Cause.TELEMETRY),
            (DEREGISTERED, Cause.MANUAL),
            (DeviceState.REGISTERED, Cause.MANUAL),
            (ONLINE, Cause.DEREGISTERED),
        ],
    )
    def test_impossible_cause_and_state_pairs_are_refused(
        self, state: DeviceState, cause: StatusCause
    ) -> None:
        with pytest.raises(InvalidStatusInput, match=str(cause)):
            StatusReport(state, cause, t(0))

    def test_invalid_input_maps_to_the_shared_422_error(self) -> None:
        assert issubclass(InvalidStatusInput, InvalidInput)
        assert InvalidStatusInput.status == 422

    def test_plain_strings_from_storage_become_enums(self) -> None:
        r = StatusReport("online", "telemetry", t(1))  # type: ignore[arg-type]
        assert (r.state, r.cause) == (ONLINE, Cause.TELEMETRY)
        device = DeviceStatus("d", "online", t(0), t(0), 60)  # type: ignore[arg-type]
        assert device.status is ONLINE
        with pytest.raises(InvalidStatusInput, match="unknown DeviceState 'asleep'"):
            StatusReport("asleep", "telemetry", t(1))  # type: ignore[arg-type]

    def test_every_cause_has_allowed_states(self) -> None:
        assert set(ALLOWED_STATES) == set(StatusCause)


class TestTransitions:
    def test_first_telemetry_makes_the_device_online(self) -> None:
        device = new_device()
        change = device.apply(telemetry(10))
        assert change == StatusChanged(
            "dev-1", DeviceState.REGISTERED, ONLINE, Cause.TELEMETRY, t(10), 1
        )
        assert device.events == [change]
        assert (device.status, device.since, device.last_seen, device.last_update) == (
            ONLINE,
            t(10),
            t(10),
            t(10),
        )

    def test_repeated_status_only_moves_last_seen(self) -> None:
        device = online_device(at=10)
        assert device.apply(telemetry(20)) is None
        assert device.apply(report(ONLINE, Cause.MQTT_CONNECT, 30)) is None
        assert (device.status, device.since, device.sequence, device.last_seen) == (
            ONLINE,
            t(10),
            1,
            t(30),
        )
        assert len(device.events) == 1

    def test_sequence_counts_real_changes_only(self) -> None:
        device = new_device()
        for r in [telemetry(1), telemetry(2), disconnect(3), disconnect(4), telemetry(5)]:
            device.apply(r)
        assert [e.sequence for e in device.events] == [1, 2, 3]
        assert [e.current for e in device.events] == [ONLINE, OFFLINE, ONLINE]
        assert device.sequence == 3

    def test_a_second_offline_cause_is_not_a_new_transition(self) -> None:
        device = online_device(at=10)
        device.apply(disconnect(20))
        assert device.apply(report(OFFLINE, Cause.LAST_WILL, 21)) is None
        assert device.since == t(20)

    def test_offline_before_any_online_is_a_transition(self) -> None:
        device = new_device()
        change = device.apply(report(OFFLINE, Cause.LAST_WILL, 5, "Read Error"))
        assert change is not None
        assert (change.previous, change.current, change.detail) == (
            DeviceState.REGISTERED,
            OFFLINE,
            "Read Error",
        )

    def test_a_report_at_the_same_instant_as_the_last_transition_applies_after_it(self) -> None:
        device = online_device(at=10)
        assert device.apply(disconnect(10)) is not None
        assert device.status is OFFLINE

    def test_version_moves_on_every_change_and_only_then(self) -> None:
        device = online_device(at=10)
        version = device.version
        device.apply(telemetry(5))
        assert device.version == version
        device.apply(telemetry(20))
        assert device.version == version + 1


class TestOutOfOrder:
    def test_an_older_online_only_moves_last_seen_forward(self) -> None:
        device = online_device(at=10)
        device.apply(telemetry(50))
        device.apply(report(OFFLINE, Cause.TIMEOUT, 110))
        assert device.apply(telemetry(60)) is None
        assert (device.status, device.since, device.last_seen) == (OFFLINE, t(110), t(60))

    def test_an_older_online_never_moves_last_seen_back(self) -> None:
        device = online_device(at=10)
        device.apply(telemetry(50))
        device.apply(telemetry(30))
        assert device.last_seen == t(50)

    def test_an_offline_older_than_the_last_transition_is_ignored(self) -> None:
        device = online_device(at=10)
        assert device.apply(disconnect(5)) is None
        assert device.status is ONLINE

    def test_an_offline_older_than_last_seen_is_ignored(self) -> None:
        device = online_device(at=10)
        device.apply(telemetry(50))
        assert device.apply(disconnect(40)) is None
        assert (device.status, device.version) == (ONLINE, 2)

    def test_events_are_never_reordered(self) -> None:
        device = new_device()
        for r in [telemetry(10), disconnect(30), telemetry(20), disconnect(15), telemetry(40)]:
            device.apply(r)
        times = [e.at for e in device.events]
        assert times == sorted(times) == [t(10), t(30), t(40)]

    def test_an_older_operator_report_is_recorded_at_the_last_transition(self) -> None:
        device = online_device(at=10)
        change = device.apply(manual(MAINTENANCE, 3))
        assert change is not None
        assert change.at == t(10)


class TestTimeout:
    def test_deadline_is_last_seen_plus_timeout_while_online(self) -> None:
        device = online_device(at=10, timeout_s=60)
        device.apply(telemetry(40))
        assert device.deadline() == t(100)
        assert not device.is_overdue(t(99))
        assert device.is_overdue(t(100))

    @pytest.mark.parametrize("state", [OFFLINE, MAINTENANCE, DEREGISTERED])
    def test_no_deadline_unless_online(self, state: DeviceState) -> None:
        device = online_device()
        cause = Cause.DEREGISTERED if state is DEREGISTERED else Cause.MANUAL
        device.apply(report(state, cause, 20))
        assert device.deadline() is None

    def test_timeout_at_the_deadline_makes_the_device_offline(self) -> None:
        device = online_device(at=10, timeout_s=60)
        change = device.apply(report(OFFLINE, Cause.TIMEOUT, 70))
        assert change is not None
        assert (change.current, change.cause, change.at) == (OFFLINE, Cause.TIMEOUT, t(70))

    def test_timeout_raced_by_fresh_telemetry_is_ignored(self) -> None:
        device = online_device(at=10, timeout_s=60)
        device.apply(telemetry(65))
        assert device.apply(report(OFFLINE, Cause.TIMEOUT, 70)) is None
        assert device.status is ONLINE

    def test_timeout_of_a_registered_device_is_ignored(self) -> None:
        device = new_device()
        assert device.apply(report(OFFLINE, Cause.TIMEOUT, 1000)) is None

    def test_manual_online_gets_a_full_timeout_from_the_operator_action(self) -> None:
        device = online_device(at=10, timeout_s=60)
        device.apply(manual(MAINTENANCE, 20))
        device.apply(telemetry(30))
        device.apply(manual(ONLINE, 500))
        assert device.deadline() == t(560)

    def test_changing_the_timeout_moves_the_deadline(self) -> None:
        device = online_device(at=10, timeout_s=60)
        device.change_offline_timeout(300)
        assert device.deadline() == t(310)
        with pytest.raises(InvalidStatusInput):
            device.change_offline_timeout(0)


class TestMaintenance:
    def test_automatic_causes_do_not_change_maintenance_but_update_last_seen(self) -> None:
        device = online_device(at=10)
        device.apply(manual(MAINTENANCE, 20))
        for r in [
            telemetry(30),
            disconnect(40),
            report(OFFLINE, Cause.LAST_WILL, 41),
            report(OFFLINE, Cause.TIMEOUT, 1000),
            report(ONLINE, Cause.MQTT_CONNECT, 50),
            report(OFFLINE, Cause.HEALTH_CHECK, 60),
        ]:
            assert device.apply(r) is None
        assert (device.status, device.since, device.last_seen) == (MAINTENANCE, t(20), t(50))
        assert device.deadline() is None

    @pytest.mark.parametrize("leave_to", [ONLINE, OFFLINE])
    def test_manual_leaves_maintenance(self, leave_to: DeviceState) -> None:
        device = online_device(at=10)
        device.apply(manual(MAINTENANCE, 20))
        change = device.apply(manual(leave_to, 30))
        assert change is not None
        assert (change.previous, change.current, change.cause) == (
            MAINTENANCE,
            leave_to,
            Cause.MANUAL,
        )

    def test_manual_to_the_same_status_changes_nothing(self) -> None:
        device = online_device(at=10)
        version = device.version
        assert device.apply(manual(ONLINE, 30)) is None
        assert (device.since, device.version) == (t(10), version)

    def test_manual_offline_is_not_sticky(self) -> None:
        device = online_device(at=10)
        device.apply(manual(OFFLINE, 20))
        assert device.apply(telemetry(30)) is not None
        assert device.status is ONLINE

    def test_manual_online_is_not_evidence_of_life(self) -> None:
        device = new_device()
        device.apply(manual(ONLINE, 20))
        assert device.last_seen is None
        assert device.deadline() == t(80)


class TestDeregistration:
    def test_deregistered_is_terminal(self) -> None:
        device = online_device(at=10)
        change = device.apply(report(DEREGISTERED, Cause.DEREGISTERED, 20))
        assert change is not None and change.current is DEREGISTERED
        version = device.version
        for r in [telemetry(30), manual(ONLINE, 40), manual(MAINTENANCE, 50)]:
            assert device.apply(r) is None
        assert (device.status, device.version, device.last_seen) == (DEREGISTERED, version, t(10))

    def test_deregistration_from_maintenance(self) -> None:
        device = online_device(at=10)
        device.apply(manual(MAINTENANCE, 20))
        assert device.apply(report(DEREGISTERED, Cause.DEREGISTERED, 5)) is not None
        assert device.since == t(20)


# Property: whatever arrives, in whatever order, the aggregate's invariants hold.

ALL_REPORTS = [(state, cause) for cause, states in ALLOWED_STATES.items() for state in states]
reports = st.lists(
    st.builds(
        lambda pair, at: report(pair[0], pair[1], at),
        st.sampled_from(ALL_REPORTS),
        st.integers(min_value=0, max_value=200),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(reports)
def test_any_report_sequence_keeps_the_invariants(stream: list[StatusReport]) -> None:
    device = new_device(timeout_s=30)
    last_seen_so_far: list[datetime] = []
    for r in stream:
        before = (device.status, device.since, device.version)
        seen_before = device.last_seen
        change = device.apply(r)
        changed = change is not None or device.last_seen != seen_before
        assert device.version == before[2] + changed
        if before[0] is DEREGISTERED:
            assert (device.status, device.since, device.version) == before
        if before[0] is MAINTENANCE and r.cause not in {Cause.MANUAL, Cause.DEREGISTERED}:
            assert device.status is MAINTENANCE
        if change is not None:
            assert change.previous is before[0] and change.current is device.status
            assert change.previous is not change.current
            assert change.at >= before[1]
        if device.last_seen is not None:
            last_seen_so_far.append(device.last_seen)
    assert [e.sequence for e in device.events] == list(range(1, device.sequence + 1))
    assert [e.at for e in device.events] == sorted(e.at for e in device.events)
    assert last_seen_so_far == sorted(last_seen_so_far)
    for previous, current in zip(device.events, device.events[1:], strict=False):
        assert previous.current is current.previous
    if device.events:
        assert device.since == device.events[-1].at


def after(stream: list[StatusReport]) -> tuple[DeviceStatus, datetime | None]:
    """A device (timeout 30 s) that took these reports, and its deadline."""
    device = new_device(timeout_s=30)
    for r in stream:
        device.apply(r)
    return device, device.deadline()


@settings(max_examples=300, deadline=None)
@given(reports)
def test_a_due_timeout_does_what_timed_out_says(stream: list[StatusReport]) -> None:
    device, deadline = after(stream)
    if deadline is None:
        return
    before = (device.sequence, device.version)

    change = device.apply(report(OFFLINE, Cause.TIMEOUT, (deadline - t(0)).total_seconds(), "x"))

    assert change == timed_out(device.device_id, before[0], deadline, "x")
    assert (device.status, device.since, device.last_update) == (OFFLINE, deadline, deadline)
    assert (device.sequence, device.version) == (before[0] + 1, before[1] + 1)


@settings(max_examples=300, deadline=None)
@given(reports, st.integers(min_value=-40, max_value=60), st.integers(min_value=0, max_value=30))
def test_late_enough_telemetry_does_what_seen_again_says(
    stream: list[StatusReport], first_after: int, spread: int
) -> None:
    device, deadline = after(stream)
    if deadline is None:
        return
    first = deadline - timedelta(seconds=30) + timedelta(seconds=first_after)
    last = first + timedelta(seconds=spread)
    before = (device.status, device.since, device.sequence, device.last_update, device.version)

    moved = seen_again(deadline, 30.0, first, last)
    changes = [device.apply(StatusReport(ONLINE, Cause.TELEMETRY, at)) for at in (first, last)]

    if moved is None:
        assert first_after <= 0
        return
    assert changes == [None, None]
    assert (device.status, device.since, device.sequence) == before[:3]
    assert device.last_seen == last and device.last_update == max(before[3], last)
    assert device.deadline() == moved
    assert device.version > before[4]
