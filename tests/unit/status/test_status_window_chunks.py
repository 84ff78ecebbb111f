"""Windows of the report batcher cut into transactions of a bounded number of devices."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from fleetmesh.status.domain import DeviceState, StatusCause, StatusReport
from fleetmesh.status.liveness import ReportBatcher
from fleetmesh.status.service import DeviceInput, FlushResult

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def telemetry(seconds: float) -> StatusReport:
    return StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, T0 + timedelta(seconds=seconds))


def timeout(seconds: float) -> StatusReport:
    return StatusReport(DeviceState.OFFLINE, StatusCause.TIMEOUT, T0 + timedelta(seconds=seconds))


class RecordingService:
    """Stores each transaction it is given; `gate` holds a write until it is set."""

    def __init__(self) -> None:
        self.transactions: list[dict[str, DeviceInput]] = []
        self.offsets: list[tuple[str, int] | None] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.writing = asyncio.Event()
        self.one_at_a_time = False
        """Each write waits for its own `release()`."""
        self._stored = asyncio.Event()

    async def apply_inputs(
        self, inputs: dict[str, DeviceInput], *, offset: tuple[str, int] | None = None
    ) -> FlushResult:
        self.writing.set()
        if self.one_at_a_time:
            self.gate.clear()
        await self.gate.wait()
        self.transactions.append(dict(inputs))
        self.offsets.append(offset)
        self._stored.set()
        return FlushResult(unknown=frozenset(d for d in inputs if d.startswith("unknown")))

    async def release(self) -> None:
        """Let the waiting write store, and wait until it did."""
        self._stored.clear()
        self.gate.set()
        await asyncio.wait_for(self._stored.wait(), 5)
        await asyncio.sleep(0)  # the batcher settles its windows


def batcher_for(service: RecordingService, max_devices: int) -> ReportBatcher:
    return ReportBatcher(service, window_s=0.01, max_window_devices=max_devices)  # type: ignore[arg-type]


async def test_a_large_window_is_written_oldest_first_in_bounded_transactions() -> None:
    service = RecordingService()
    batcher = batcher_for(service, max_devices=3)
    devices = [f"d{i}" for i in range(7)]
    futures = {batcher.submit(d, timeout(i), offset=("c", i + 1)) for i, d in enumerate(devices)}
    assert len(futures) == 1
    batcher.start()
    try:
        result = await asyncio.wait_for(futures.pop(), 5)
    finally:
        await batcher.stop()
    assert [list(t) for t in service.transactions] == [devices[0:3], devices[3:6], devices[6:7]]
    assert result == FlushResult()


async def test_the_consumer_offset_is_stored_only_with_the_last_device_of_its_window() -> None:
    service = RecordingService()
    batcher = batcher_for(service, max_devices=2)
    for i, device_id in enumerate(["a", "b", "c", "d", "e"]):
        batcher.submit(device_id, telemetry(i), offset=("c", 10 + i))
    batcher.start()
    try:
        await asyncio.wait_for(batcher.submit("e", telemetry(9)), 5)
    finally:
        await batcher.stop()
    # A crash after the first two transactions must not skip c, d and e's quality.
    assert service.offsets == [None, None, ("c", 14)]


async def test_a_window_resolves_only_when_all_its_devices_are_stored() -> None:
    service = RecordingService()
    service.one_at_a_time = True
    batcher = batcher_for(service, max_devices=2)
    first = batcher.submit("a", telemetry(1))
    for device_id in ("b", "c"):
        batcher.submit(device_id, telemetry(1))
    batcher.start()
    try:
        await asyncio.wait_for(service.writing.wait(), 5)
        later = batcher.submit("d", telemetry(2))  # written with c, but a window of its own
        assert later is not first
        await service.release()
        assert [list(t) for t in service.transactions] == [["a", "b"]]
        assert not first.done()  # c is not stored yet
        await service.release()
        await asyncio.wait_for(asyncio.gather(first, later), 5)
    finally:
        service.one_at_a_time = False
        service.gate.set()
        await batcher.stop()
    assert [list(t) for t in service.transactions] == [["a", "b"], ["c", "d"]]


async def test_input_for_a_device_still_pending_joins_it_and_reports_its_outcome() -> None:
    service = RecordingService()
    service.gate.clear()
    batcher = batcher_for(service, max_devices=1)
    batcher.submit("a", telemetry(1))
    batcher.submit("unknown-1", telemetry(1))
    batcher.start()
    try:
        await asyncio.wait_for(service.writing.wait(), 5)  # writing "a"; "unknown-1" waits
        again = batcher.submit("unknown-1", telemetry(5))
        service.gate.set()
        result = await asyncio.wait_for(again, 5)
    finally:
        await batcher.stop()
    assert result.unknown == {"unknown-1"}
    assert [list(t) for t in service.transactions] == [["a"], ["unknown-1"]]
    reports = service.transactions[1]["unknown-1"].ordered_reports()
    assert [r.observed_at for r in reports] == [telemetry(1).observed_at, telemetry(5).observed_at]


def test_merging_later_input_keeps_every_report_and_sums_quality() -> None:
    older, newer = DeviceInput(), DeviceInput()
    older.add(telemetry(3))
    older.add_quality(T0, 2, 0.5)
    newer.add(telemetry(1))
    newer.add(telemetry(9))
    newer.add(timeout(4))
    newer.add_quality(T0, 2, 1.0)
    newer.mqtt_connected = False
    newer.answers.append(("cmd", T0))
    older.merge(newer)
    assert [r.observed_at.second for r in older.ordered_reports()] == [1, 4, 9]
    assert older.quality == {T0: [4, 3.0]}
    assert older.mqtt_connected is False and older.answers == [("cmd", T0)]


def test_a_fired_deadline_alone_is_a_short_timeout_and_a_report_once_mixed() -> None:
    alone = DeviceInput()
    alone.add_timeout(T0 + timedelta(seconds=5))
    assert alone.timeout_only() == (T0 + timedelta(seconds=5), "")
    assert [(r.cause, r.observed_at.second) for r in alone.ordered_reports()] == [
        (StatusCause.TIMEOUT, 5)
    ]

    mixed = DeviceInput()
    mixed.add_timeout(T0 + timedelta(seconds=5))
    mixed.add(telemetry(7))
    assert mixed.timeout_only() is None
    assert [(r.cause, r.observed_at.second) for r in mixed.ordered_reports()] == [
        (StatusCause.TIMEOUT, 5),
        (StatusCause.TELEMETRY, 7),
    ]


def test_two_fired_deadlines_of_a_device_are_both_kept() -> None:
    older, newer = DeviceInput(), DeviceInput()
    older.add_timeout(T0 + timedelta(seconds=5))
    newer.add_timeout(T0 + timedelta(seconds=8))
    older.merge(newer)
    assert older.timeout_only() is None
    assert [r.observed_at.second for r in older.ordered_reports()] == [5, 8]


def test_a_timeout_report_given_alone_keeps_its_detail() -> None:
    item = DeviceInput()
    item.add(
        StatusReport(DeviceState.OFFLINE, StatusCause.TIMEOUT, T0, detail="MQTT keepalive lost")
    )
    assert item.timeout_only() == (T0, "MQTT keepalive lost")
