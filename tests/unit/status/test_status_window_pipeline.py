"""The report batcher with two transactions in flight (as on PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from fleetmesh.status.domain import DeviceState, StatusCause, StatusReport
from fleetmesh.status.liveness import ReportBatcher
from fleetmesh.status.service import DeviceInput, FlushResult

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def telemetry(seconds: float) -> StatusReport:
    return StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, T0 + timedelta(seconds=seconds))


class Write:
    def __init__(self, inputs: dict[str, DeviceInput], offset: tuple[str, int] | None) -> None:
        self.devices = list(inputs)
        self.inputs = dict(inputs)
        self.offset = offset
        self.release = asyncio.Event()
        self.stored = False


class GatedService:
    """Each write waits until the test releases it; writes run concurrently."""

    def __init__(self) -> None:
        self.writes: list[Write] = []
        self._started = asyncio.Event()

    async def apply_inputs(
        self, inputs: dict[str, DeviceInput], *, offset: tuple[str, int] | None = None
    ) -> FlushResult:
        write = Write(inputs, offset)
        self.writes.append(write)
        self._started.set()
        await write.release.wait()
        write.stored = True
        return FlushResult()

    async def started(self, count: int) -> list[Write]:
        """Wait until `count` writes have started."""
        async with asyncio.timeout(5):
            while len(self.writes) < count:
                self._started.clear()
                await self._started.wait()
        return self.writes

    async def release(self, write: Write) -> None:
        write.release.set()
        async with asyncio.timeout(5):
            while not write.stored:
                await asyncio.sleep(0)
        for _ in range(3):
            await asyncio.sleep(0)  # the batcher settles its windows


@contextlib.asynccontextmanager
async def running(batcher: ReportBatcher) -> AsyncIterator[None]:
    batcher.start()
    try:
        yield
    finally:
        await batcher.stop()


def pipelined(service: GatedService, max_devices: int = 2) -> ReportBatcher:
    return ReportBatcher(
        service,  # type: ignore[arg-type]
        window_s=0.01,
        max_window_devices=max_devices,
        max_in_flight=2,
    )


async def test_two_transactions_are_written_at_once() -> None:
    service = GatedService()
    batcher = pipelined(service)
    window = None
    for device_id in ("a", "b", "c", "d"):
        window = batcher.submit(device_id, telemetry(1))
    assert window is not None
    async with running(batcher):
        first, second = await service.started(2)
        assert (first.devices, second.devices) == (["a", "b"], ["c", "d"])
        await service.release(second)
        await service.release(first)
        assert (await asyncio.wait_for(window, 5)) == FlushResult()


async def test_a_device_being_written_waits_for_the_next_transaction() -> None:
    service = GatedService()
    batcher = pipelined(service)
    batcher.submit("a", telemetry(1))
    batcher.submit("b", telemetry(1))
    async with running(batcher):
        (first,) = await service.started(1)
        later = batcher.submit("a", telemetry(5))  # "a" is in the first transaction
        batcher.submit("c", telemetry(5))
        second = (await service.started(2))[1]
        assert second.devices == ["c"]
        await service.release(second)
        assert not later.done()
        await service.release(first)
        third = (await service.started(3))[2]
        assert third.devices == ["a"]
        assert [r.observed_at for r in third.inputs["a"].ordered_reports()] == [
            telemetry(5).observed_at
        ]
        await service.release(third)
        await asyncio.wait_for(later, 5)


async def test_windows_resolve_in_order_when_a_later_transaction_ends_first() -> None:
    service = GatedService()
    batcher = pipelined(service, max_devices=1)
    older = batcher.submit("a", telemetry(1))
    async with running(batcher):
        (first,) = await service.started(1)
        newer = batcher.submit("b", telemetry(2))
        second = (await service.started(2))[1]
        await service.release(second)
        assert not newer.done()  # stored, but the window before it is not
        await service.release(first)
        await asyncio.wait_for(asyncio.gather(older, newer), 5)


async def test_a_transaction_storing_the_consumer_offset_starts_after_those_before_it() -> None:
    """A crash must not leave an offset stored past input that is not."""
    service = GatedService()
    batcher = pipelined(service, max_devices=1)
    batcher.submit("a", telemetry(1))  # a timeout-like input: no offset
    async with running(batcher):
        (first,) = await service.started(1)
        window = batcher.submit("b", telemetry(2), offset=("c", 7))
        await asyncio.sleep(0.1)
        assert len(service.writes) == 1  # "b" carries the offset: it waits for "a"
        await service.release(first)
        second = (await service.started(2))[1]
        assert (second.devices, second.offset) == (["b"], ("c", 7))
        await service.release(second)
        await asyncio.wait_for(window, 5)


async def test_stop_puts_writes_in_flight_back_and_writes_them() -> None:
    service = GatedService()
    batcher = pipelined(service, max_devices=1)
    window = batcher.submit("a", telemetry(1))
    batcher.submit("b", telemetry(1))
    batcher.start()
    await service.started(2)
    stopping = asyncio.create_task(batcher.stop())
    for count in (3, 4):  # the stop writes them again, one transaction after the other
        await service.release((await service.started(count))[-1])
    await asyncio.wait_for(stopping, 5)
    assert sorted(w.devices[0] for w in service.writes[2:]) == ["a", "b"]
    assert (await asyncio.wait_for(window, 5)) == FlushResult()
