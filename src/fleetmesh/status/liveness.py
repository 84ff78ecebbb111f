"""The liveness engine: coalesced status writes, offline deadlines and health checks.

Coalescing. Automatic reports (telemetry, MQTT connect/disconnect, last will,
status messages, ping answers, timeouts) go to `ReportBatcher.submit`, which
keeps them per device for one window (`window_s`, 100 ms) and then writes the
whole window in one transaction (`StatusService.apply_inputs`). Within a window
a device's telemetry collapses to its earliest and latest report, so a device
sending 100 points/s costs about 10 row writes per second, and 10,000 devices
cost about 10 transactions per second, not 10,000. Each window returns one
future; consumers acknowledge their messages when it resolves, so nothing is
acknowledged before it is stored. A window that fails is retried as a whole
(in order), then device by device, so one bad device cannot block the rest.

Deadlines. `Timers` mirrors, after each commit, each device's offline deadline
(`max(since, last_seen) + timeout`, only while online) and its next health
check into two `DeadlineScheduler`s. `DeadlineRunner` sleeps until the earliest
one (woken when an earlier one appears; no periodic scan of all devices), turns
due deadlines into `timeout` reports observed at the deadline itself, and sends
due pings. A timeout raced by fresh telemetry is ignored by the aggregate (it is
not overdue any more), so a deadline never fires twice, and at start
`StatusService.rebuild_timers` re-arms everything from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from fleetmesh.core.clock import Clock
from fleetmesh.core.logging import get_logger
from fleetmesh.status import contracts
from fleetmesh.status.deadlines import DeadlineScheduler
from fleetmesh.status.domain import DeviceState, StatusCause, StatusReport
from fleetmesh.status.repository import TrackedDevice
from fleetmesh.status.service import DeviceInput, FlushResult, PingToSend, StatusService
from fleetmesh.status.tasks import stop_task, wait_event

log = get_logger(__name__)

WINDOW_S = 0.1
MAX_WINDOW_DEVICES = 5_000
MAX_IDLE_SLEEP_S = 5.0
WHOLE_WINDOW_ATTEMPTS = 4
DUE_BATCH = 2_000
CHECK_RETRY = timedelta(seconds=5)


class Timers:
    """Each device's pending offline deadline and next health check, as stored."""

    def __init__(self) -> None:
        self.offline = DeadlineScheduler()
        self.checks = DeadlineScheduler()
        self._wake = asyncio.Event()
        self._sleeping_until: datetime | None = None

    def track(self, device: TrackedDevice) -> None:
        next_check = device.next_check_at if device.status.status is DeviceState.OFFLINE else None
        self.set_deadlines(device.device_id, device.status.deadline(), next_check)

    def set_deadlines(
        self, device_id: str, deadline: datetime | None, next_check: datetime | None
    ) -> None:
        for scheduler, at in ((self.offline, deadline), (self.checks, next_check)):
            if at is None:
                scheduler.cancel(device_id)
                continue
            if scheduler.get(device_id) == at:
                continue
            scheduler.set(device_id, at)
            if self._sleeping_until is None or at < self._sleeping_until:
                self._wake.set()

    def next_at(self) -> datetime | None:
        times = [t for t in (self.offline.next_at(), self.checks.next_at()) if t is not None]
        return min(times) if times else None

    def arm(self) -> None:
        """Start a runner cycle: from here on, any new earlier deadline wakes it."""
        self._wake.clear()
        self._sleeping_until = None

    async def sleep(self, now: datetime) -> None:
        next_at = self.next_at()
        delay = MAX_IDLE_SLEEP_S
        if next_at is not None:
            delay = min(delay, max(0.0, (next_at - now).total_seconds()))
        self._sleeping_until = next_at if next_at is not None else now + timedelta(seconds=delay)
        await wait_event(self._wake, delay)


class ReportBatcher:
    """Collects automatic reports per device and writes each window in one transaction."""

    def __init__(self, service: StatusService, *, window_s: float = WINDOW_S) -> None:
        self.service = service
        self.window_s = window_s
        self._pending: dict[str, DeviceInput] = {}
        self._future: asyncio.Future[FlushResult] | None = None
        self._waiting: list[asyncio.Future[FlushResult]] = []
        self._offset: tuple[str, int] | None = None
        self._has_pending = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.windows_written = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="status-batcher")

    async def stop(self) -> None:
        """Stop, writing what is still pending (best effort; unacked input is redelivered)."""
        task, self._task = self._task, None
        await stop_task(task)
        if self._pending:
            with contextlib.suppress(Exception):
                await self._write_window()

    def submit(
        self,
        device_id: str,
        report: StatusReport | None = None,
        *,
        mqtt_connected: bool | None = None,
        quality: tuple[datetime, int, float] | None = None,
        answer: tuple[str, datetime] | None = None,
        offset: tuple[str, int] | None = None,
    ) -> asyncio.Future[FlushResult]:
        """Queue input for the device; the future resolves when its window is stored."""
        item = self._pending.get(device_id)
        if item is None:
            item = self._pending[device_id] = DeviceInput()
        if report is not None:
            item.add(report)
        if mqtt_connected is not None:
            item.mqtt_connected = mqtt_connected
        if quality is not None:
            item.add_quality(*quality)
        if answer is not None:
            item.answers.append(answer)
        if offset is not None and (self._offset is None or offset[1] > self._offset[1]):
            self._offset = offset
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        self._has_pending.set()
        if len(self._pending) >= MAX_WINDOW_DEVICES:
            self._full.set()
        return self._future

    async def _run(self) -> None:
        while True:
            await self._has_pending.wait()
            await wait_event(self._full, self.window_s)
            await self._write_window()

    async def _write_window(self) -> None:
        pending, self._pending = self._pending, {}
        future, self._future = self._future, None
        offset, self._offset = self._offset, None
        self._has_pending.clear()
        self._full.clear()
        if not pending:
            return
        try:
            result = await self._write(pending, offset)
        except asyncio.CancelledError:
            # Stopping mid-window: put it back so `stop` can write it (once more: the
            # aggregate ignores what it already applied).
            for device_id, item in pending.items():
                self._pending.setdefault(device_id, item)
            if future is not None:
                self._waiting.append(future)
            raise
        self.windows_written += 1
        for waiting in [future, *self._waiting]:
            if waiting is not None and not waiting.done():
                waiting.set_result(result)
        self._waiting.clear()

    async def _write(
        self, pending: dict[str, DeviceInput], offset: tuple[str, int] | None
    ) -> FlushResult:
        for attempt in range(1, WHOLE_WINDOW_ATTEMPTS + 1):
            try:
                return await self.service.apply_inputs(pending, offset=offset)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning(
                    "status_window_failed",
                    devices=len(pending),
                    attempt=attempt,
                    error=repr(error),
                )
                await asyncio.sleep(min(2.0, 0.05 * 2**attempt))
        return await self._write_one_by_one(pending)

    async def _write_one_by_one(self, pending: dict[str, DeviceInput]) -> FlushResult:
        unknown: set[str] = set()
        failed: set[str] = set()
        changes = 0
        for device_id, item in pending.items():
            try:
                result = await self.service.apply_inputs({device_id: item})
            except Exception as error:
                log.warning("status_device_input_failed", device_id=device_id, error=repr(error))
                failed.add(device_id)
                continue
            unknown |= result.unknown
            changes += result.changes
        return FlushResult(frozenset(unknown), frozenset(failed), changes)


Publisher = Callable[[str, bytes], Awaitable[None]]


class DeadlineRunner:
    """Fires offline deadlines (as timeout reports) and sends due health-check pings."""

    def __init__(
        self,
        *,
        timers: Timers,
        batcher: ReportBatcher,
        service: StatusService,
        publish: Publisher,
        clock: Clock,
    ) -> None:
        self.timers = timers
        self.batcher = batcher
        self.service = service
        self.publish = publish
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="status-deadlines")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    async def _run(self) -> None:
        while True:
            self.timers.arm()
            now = self.clock.now()
            try:
                self.fire_due(now)
                due_checks = self.timers.checks.pop_due(now, DUE_BATCH)
                if due_checks:
                    await self._send_checks(due_checks, now)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("status_deadline_cycle_failed", error=repr(error))
                await asyncio.sleep(0.5)
            await self.timers.sleep(self.clock.now())

    def fire_due(self, now: datetime) -> int:
        due = self.timers.offline.pop_due(now, DUE_BATCH)
        window: asyncio.Future[FlushResult] | None = None
        for device_id, at in due:
            window = self.batcher.submit(
                device_id, StatusReport(DeviceState.OFFLINE, StatusCause.TIMEOUT, at)
            )
        if window is not None:
            window.add_done_callback(lambda done: self._rearm_failed(done, due, now))
        return len(due)

    def _rearm_failed(
        self, done: asyncio.Future[FlushResult], due: list[tuple[str, datetime]], now: datetime
    ) -> None:
        """A timeout that could not be written is tried again a little later."""
        if done.cancelled() or done.exception() is not None:
            failed = {device_id for device_id, _ in due}
        else:
            failed = set(done.result().failed)
        for device_id, _ in due:
            if device_id in failed and device_id not in self.timers.offline:
                self.timers.offline.set(device_id, now + CHECK_RETRY)

    async def _send_checks(self, due: list[tuple[str, datetime]], now: datetime) -> None:
        try:
            pings = await self.service.take_due_checks(due)
        except Exception as error:
            log.warning("status_health_checks_failed", devices=len(due), error=repr(error))
            for device_id, _ in due:
                self.timers.checks.set(device_id, now + CHECK_RETRY)
            return
        for ping in pings:
            await self._send(ping)

    async def _send(self, ping: PingToSend) -> None:
        payload = contracts.ping_command(ping.device_id, ping.command_id, ping.sent_at)
        try:
            await self.publish(contracts.ping_command_subject(ping.device_id), payload)
        except Exception as error:  # recorded as pending: it counts as failed if unanswered
            log.warning("status_ping_not_sent", device_id=ping.device_id, error=repr(error))
