"""The liveness engine with a fake service: coalescing windows, retries, timers, deadlines."""

from __future__ import annotations

import asyncio
import gc
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleetmesh.status.domain import DeviceState, DeviceStatus, StatusCause, StatusReport
from fleetmesh.status.liveness import DeadlineRunner, ReportBatcher, Timers
from fleetmesh.status.repository import TrackedDevice
from fleetmesh.status.service import Armed, DeviceInput, FlushResult

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def telemetry(seconds: float) -> StatusReport:
    return StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, at(seconds))


class FakeService:
    """Records each window it is asked to write; can fail the first `failures` calls."""

    def __init__(self, *, failures: int = 0, poison: str | None = None) -> None:
        self.windows: list[dict[str, DeviceInput]] = []
        self.offsets: list[tuple[str, int] | None] = []
        self.failures = failures
        self.poison = poison

    async def apply_inputs(
        self, inputs: dict[str, DeviceInput], *, offset: tuple[str, int] | None = None
    ) -> FlushResult:
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("database is down")
        if self.poison is not None and self.poison in inputs:
            raise RuntimeError("poison")
        self.windows.append(inputs)
        self.offsets.append(offset)
        return FlushResult(unknown=frozenset(d for d in inputs if d.startswith("unknown")))


class TestDeviceInput:
    def test_telemetry_collapses_to_its_earliest_and_latest_report(self) -> None:
        item = DeviceInput()
        for seconds in (5, 1, 9, 3, 7):
            item.add(telemetry(seconds))
        will = StatusReport(DeviceState.OFFLINE, StatusCause.LAST_WILL, at(4))
        item.add(will)
        ordered = item.ordered_reports()
        assert [r.observed_at for r in ordered] == [at(1), at(4), at(9)]
        assert ordered[1] is will

    def test_a_single_report_is_not_applied_twice(self) -> None:
        item = DeviceInput()
        item.add(telemetry(2))
        assert item.ordered_reports() == [telemetry(2)]

    def test_quality_sums_points_per_hour(self) -> None:
        item = DeviceInput()
        item.add_quality(at(10), 4, 0.5)
        item.add_quality(at(20), 6, 1.0)
        item.add_quality(at(3600), 1, 0.0)
        assert item.quality == {T0: [10, 8.0], at(3600): [1, 0.0]}


class TestReportBatcher:
    async def test_a_window_coalesces_a_chatty_device_into_one_write(self) -> None:
        service = FakeService()
        batcher = ReportBatcher(service, window_s=0.05)  # type: ignore[arg-type]
        batcher.start()
        try:
            futures = {
                batcher.submit("chatty", telemetry(i / 100), offset=("liveness", i))
                for i in range(100)
            }
            futures.add(batcher.submit("quiet", telemetry(0.5)))
            assert len(futures) == 1  # one window, one future
            result = await asyncio.wait_for(futures.pop(), 2)
        finally:
            await batcher.stop()
        assert result == FlushResult()
        assert len(service.windows) == 1 and service.offsets == [("liveness", 99)]
        chatty = service.windows[0]["chatty"].ordered_reports()
        assert [r.observed_at for r in chatty] == [at(0), at(0.99)]

    async def test_windows_follow_each_other_and_report_unknown_devices(self) -> None:
        service = FakeService()
        batcher = ReportBatcher(service, window_s=0.02)  # type: ignore[arg-type]
        batcher.start()
        try:
            first = batcher.submit("a", telemetry(1))
            assert (await asyncio.wait_for(first, 2)).unknown == frozenset()
            second = batcher.submit("unknown-1", telemetry(2))
            assert second is not first
            assert (await asyncio.wait_for(second, 2)).unknown == {"unknown-1"}
        finally:
            await batcher.stop()
        assert [list(w) for w in service.windows] == [["a"], ["unknown-1"]]

    async def test_a_failing_window_is_retried_whole_then_device_by_device(self) -> None:
        service = FakeService(poison="bad")
        batcher = ReportBatcher(service, window_s=0.01)  # type: ignore[arg-type]
        batcher.start()
        try:
            batcher.submit("good", telemetry(1))
            future = batcher.submit("bad", telemetry(1))
            result = await asyncio.wait_for(future, 5)
        finally:
            await batcher.stop()
        assert result.failed == {"bad"}
        assert [list(w) for w in service.windows] == [["good"]]

    async def test_a_transient_failure_is_retried_in_order(self) -> None:
        service = FakeService(failures=2)
        batcher = ReportBatcher(service, window_s=0.01)  # type: ignore[arg-type]
        batcher.start()
        try:
            result = await asyncio.wait_for(batcher.submit("a", telemetry(1)), 5)
        finally:
            await batcher.stop()
        assert result.failed == frozenset() and len(service.windows) == 1

    async def test_stop_writes_what_is_still_pending(self) -> None:
        service = FakeService()
        batcher = ReportBatcher(service, window_s=10)  # type: ignore[arg-type]
        batcher.start()
        batcher.submit("a", telemetry(1), mqtt_connected=True)
        await asyncio.sleep(0)
        await batcher.stop()
        assert service.windows[0]["a"].mqtt_connected is True


def tracked(status: DeviceStatus, next_check: datetime | None = None) -> TrackedDevice:
    return TrackedDevice(
        status=status, type_name="t", cause="x", registered_at=T0, next_check_at=next_check
    )


class TestTimers:
    def test_track_follows_the_aggregate(self) -> None:
        timers = Timers()
        device = DeviceStatus.register("d", at=T0, offline_timeout_s=60)
        timers.track(tracked(device))
        assert "d" not in timers.offline  # registered: no deadline
        device.apply(telemetry(10))
        timers.track(tracked(device))
        assert timers.offline.get("d") == at(70)
        device.apply(telemetry(30))
        timers.track(tracked(device))
        assert timers.offline.get("d") == at(90) and timers.next_at() == at(90)
        device.apply(StatusReport(DeviceState.OFFLINE, StatusCause.TIMEOUT, at(90)))
        timers.track(tracked(device, next_check=at(120)))
        assert "d" not in timers.offline and timers.checks.get("d") == at(120)

    async def test_an_earlier_deadline_wakes_the_sleeper(self) -> None:
        timers = Timers()
        timers.set_deadlines("far", at(3600), None)
        timers.arm()
        sleeper = asyncio.create_task(timers.sleep(T0))
        await asyncio.sleep(0.01)
        assert not sleeper.done()
        timers.set_deadlines("later", at(7200), None)  # later: no need to wake
        await asyncio.sleep(0.01)
        assert not sleeper.done()
        timers.set_deadlines("near", at(1), None)
        await asyncio.wait_for(sleeper, 1)


class FakeBatcher:
    def __init__(self) -> None:
        self.submitted: list[tuple[str, datetime | None]] = []

    def submit(self, device_id: str, *, timeout_at: datetime | None = None, **_: Any) -> None:
        self.submitted.append((device_id, timeout_at))


def test_due_deadlines_are_submitted_as_timeouts_at_the_deadline() -> None:
    timers = Timers()
    timers.set_deadlines("a", at(5), None)
    timers.set_deadlines("b", at(7), None)
    timers.set_deadlines("c", at(60), None)
    batcher = FakeBatcher()
    runner = DeadlineRunner(
        timers=timers,
        batcher=batcher,  # type: ignore[arg-type]
        service=None,  # type: ignore[arg-type]
        publish=None,  # type: ignore[arg-type]
        clock=None,  # type: ignore[arg-type]
    )
    assert runner.fire_due(at(10)) == 2
    assert batcher.submitted == [("a", at(5)), ("b", at(7))]
    assert runner.fire_due(at(10)) == 0  # popped: never fires twice


async def test_a_timeout_that_could_not_be_written_is_rearmed() -> None:
    timers = Timers()
    timers.set_deadlines("a", at(5), None)
    timers.set_deadlines("b", at(6), None)
    window: asyncio.Future[FlushResult] = asyncio.get_running_loop().create_future()

    class WindowBatcher(FakeBatcher):
        def submit(self, device_id: str, *, timeout_at: datetime | None = None, **_: Any) -> Any:
            super().submit(device_id, timeout_at=timeout_at)
            return window

    runner = DeadlineRunner(
        timers=timers,
        batcher=WindowBatcher(),  # type: ignore[arg-type]
        service=None,  # type: ignore[arg-type]
        publish=None,  # type: ignore[arg-type]
        clock=None,  # type: ignore[arg-type]
    )
    assert runner.fire_due(at(10)) == 2
    window.set_result(FlushResult(failed=frozenset({"b"})))
    await asyncio.sleep(0)
    assert "a" not in timers.offline
    assert timers.offline.get("b") == at(15)  # tried again 5 s later


def test_armed_timeouts_are_kept_where_the_collector_stops_tracking_them() -> None:
    timers = Timers()
    armed = Armed(at(60), version=3, sequence=2, offline_timeout_s=60.0, quality_recent=None)
    timers.set_deadlines("a", at(60), None, armed)
    gc.collect()

    assert not any(gc.is_tracked(kept) for kept in timers._armed.values())
    assert timers.armed("a", at(60)) == armed
    assert timers.armed("a", at(61)) is None
