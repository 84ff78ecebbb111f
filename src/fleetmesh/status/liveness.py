"""The liveness engine: coalesced status writes, offline deadlines and health checks.

Coalescing. Automatic reports (telemetry, MQTT connect/disconnect, last will,
status messages, ping answers, timeouts) go to `ReportBatcher.submit`, which
keeps them per device for one window (`window_s`, 100 ms) and then writes the
whole window in one transaction (`StatusService.apply_inputs`). Within a window
a device's telemetry collapses to its earliest and latest report, so a device
sending 100 points/s costs about 10 row writes per second, and 10,000 devices
cost about 10 transactions per second, not 10,000. Each window returns one
future; consumers acknowledge their messages when it resolves, so nothing is
acknowledged before it is stored. A transaction holds at most
`MAX_WINDOW_DEVICES` devices, oldest input first: when thousands of deadlines
fall due at once, the first transitions commit within a fraction of a second
instead of waiting for one huge transaction (a window's future then resolves
with the transaction that stores its last device, and the consumer offset is
stored only there). On PostgreSQL two transactions are in flight at once: the
database writes one while the next one's rows and events are built here (with a
whole fleet of 100,000 silent, the worst delay in two bench runs each went from
1.25 and 1.10 s to 0.87 and 0.92 s). A transaction that fails is retried as a
whole (in order), then device by device, so one bad device cannot block the rest.

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
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from fleetmesh.core.clock import Clock
from fleetmesh.core.logging import get_logger
from fleetmesh.core.tasks import stop_task, wait_event
from fleetmesh.status import contracts
from fleetmesh.status.deadlines import DeadlineScheduler
from fleetmesh.status.domain import DeviceState, StatusReport
from fleetmesh.status.repository import TrackedDevice
from fleetmesh.status.service import (
    Armed,
    DeviceInput,
    FlushResult,
    PingToSend,
    StatusService,
)

log = get_logger(__name__)

WINDOW_S = 0.1
MAX_WINDOW_DEVICES = 4_000
"""At most this many devices per transaction: when many deadlines are due at once, the
first ones commit early instead of waiting for one huge transaction. With 2,000, the
100,000-device burst's offline delay was 880-940 ms at most (p50 490-520 ms) in four
bench runs; with 4,000, 700-810 ms (p50 370-400 ms): fewer commits for the same rows."""
MAX_IDLE_SLEEP_S = 5.0
WHOLE_WINDOW_ATTEMPTS = 4
DUE_BATCH = 2_000
CHECK_RETRY = timedelta(seconds=5)


class Timers:
    """Each device's pending offline deadline and next health check, as stored."""

    def __init__(self) -> None:
        self.offline = DeadlineScheduler()
        self.checks = DeadlineScheduler()
        self._armed: dict[str, tuple[datetime, int, int, float, float | None]] = {}
        """An `Armed` per device, kept as an exact tuple: the collector stops tracking
        those (never a tuple subclass's instances), so 100,000 of them do not make every
        full collection walk them."""
        self._wake = asyncio.Event()
        self._sleeping_until: datetime | None = None

    def track(self, device: TrackedDevice) -> None:
        status = device.status
        next_check = device.next_check_at if status.status is DeviceState.OFFLINE else None
        deadline = status.deadline()
        armed = None
        if deadline is not None and not device.mqtt_connected:
            armed = Armed(
                deadline,
                status.version,
                status.sequence,
                status.offline_timeout_s,
                device.quality_recent,
            )
        self.set_deadlines(device.device_id, deadline, next_check, armed)

    def armed(self, device_id: str, deadline: datetime) -> Armed | None:
        found = self._armed.get(device_id)
        return Armed._make(found) if found is not None and found[0] == deadline else None

    def armed_now(self, device_id: str) -> Armed | None:
        found = self._armed.get(device_id)
        return None if found is None else Armed._make(found)

    def set_deadlines(
        self,
        device_id: str,
        deadline: datetime | None,
        next_check: datetime | None,
        armed: Armed | None = None,
    ) -> None:
        if armed is not None and armed.deadline == deadline:
            armed_at, version, sequence, timeout_s, quality = armed
            self._armed[device_id] = (armed_at, version, sequence, timeout_s, quality)
        else:
            self._armed.pop(device_id, None)
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


@dataclass(eq=False)
class _Window:
    """The devices that joined pending input while one future was handed out.

    The window is stored once all the devices that joined it have been written, and
    every window before it is stored (a device may carry input of several windows:
    later input joins the one already pending)."""

    number: int
    future: asyncio.Future[FlushResult]
    untaken: int = 0
    """Devices that joined it and are not in a transaction yet."""
    unwritten: int = 0
    """Devices that joined it and are not written yet."""
    offset: tuple[str, int] | None = None
    closed: bool = False
    unknown: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    changes: int = 0

    def add_result(self, result: FlushResult) -> None:
        self.unknown |= result.unknown
        self.failed |= result.failed
        self.changes += result.changes

    def resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(
                FlushResult(frozenset(self.unknown), frozenset(self.failed), self.changes)
            )


@dataclass(eq=False)
class _Chunk:
    """One transaction's devices, with the window each of them joined."""

    inputs: dict[str, DeviceInput]
    windows: list[int]
    offset: tuple[str, int] | None


class ReportBatcher:
    """Collects automatic reports per device and writes them in transactions of at
    most `max_window_devices` devices, oldest input first, up to `max_in_flight`
    transactions at a time.

    With more than one in flight (PostgreSQL: one transaction's rows are written by
    the database while the next one is built here), a device is in one transaction
    at a time (its later input waits for the next), and a transaction that stores
    the consumer offset starts only once those before it have ended, so the offset
    never covers input that is not stored."""

    def __init__(
        self,
        service: StatusService,
        *,
        window_s: float = WINDOW_S,
        max_window_devices: int = MAX_WINDOW_DEVICES,
        max_in_flight: int = 1,
    ) -> None:
        self.service = service
        self.window_s = window_s
        self.max_window_devices = max_window_devices
        self._pending: dict[str, DeviceInput] = {}
        self._joined: dict[str, int] = {}
        """Pending device -> the window it joined."""
        self._windows: deque[_Window] = deque()
        self._numbers = itertools.count()
        self._in_flight: set[str] = set()
        self._offered = -1
        """The last window whose consumer offset a chunk took to store."""
        self._writes: list[asyncio.Task[None]] = []
        self._slots = asyncio.Semaphore(max_in_flight)
        self._written = asyncio.Event()
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
        for write in list(self._writes):  # their devices go back to pending input
            await stop_task(write)
        with contextlib.suppress(Exception):
            while self._pending:
                await self._write_chunk(self._take_chunk(), [])
        while self._windows:  # not stored: left unacknowledged, so it is redelivered
            self._windows.popleft().future.cancel()

    def submit(
        self,
        device_id: str,
        report: StatusReport | None = None,
        *,
        mqtt_connected: bool | None = None,
        quality: tuple[datetime, int, float] | None = None,
        answer: tuple[str, datetime] | None = None,
        offset: tuple[str, int] | None = None,
        timeout_at: datetime | None = None,
    ) -> asyncio.Future[FlushResult]:
        """Queue input for the device; the future resolves when its input is stored."""
        window = self._open_window()
        item = self._pending.get(device_id)
        if item is None:
            item = self._pending[device_id] = DeviceInput()
            self._joined[device_id] = window.number
            window.untaken += 1
            window.unwritten += 1
        if report is not None:
            item.add(report)
        if mqtt_connected is not None:
            item.mqtt_connected = mqtt_connected
        if quality is not None:
            item.add_quality(*quality)
        if answer is not None:
            item.answers.append(answer)
        if timeout_at is not None:
            item.add_timeout(timeout_at)
        if offset is not None and (window.offset is None or offset[1] > window.offset[1]):
            window.offset = offset
        self._has_pending.set()
        if len(self._pending) >= self.max_window_devices:
            self._full.set()
        return window.future

    def _open_window(self) -> _Window:
        if not self._windows or self._windows[-1].closed:
            future = asyncio.get_running_loop().create_future()
            self._windows.append(_Window(next(self._numbers), future))
        return self._windows[-1]

    def _window(self, number: int) -> _Window:
        return self._windows[number - self._windows[0].number]

    async def _run(self) -> None:
        while True:
            await self._has_pending.wait()
            await wait_event(self._full, self.window_s)
            await self._slots.acquire()
            chunk = self._take_chunk()
            if not chunk.inputs:  # what is pending is all being written: wait for that
                self._slots.release()
                self._written.clear()
                await self._written.wait()
                continue
            before = [write for write in self._writes if not write.done()]
            write = asyncio.create_task(self._write_in_slot(chunk, before))
            self._writes.append(write)

    async def _write_in_slot(self, chunk: _Chunk, before: list[asyncio.Task[None]]) -> None:
        try:
            await self._write_chunk(chunk, before)
        finally:
            self._slots.release()
            self._writes.remove(asyncio.current_task())  # type: ignore[arg-type]
            self._written.set()

    async def _write_chunk(self, chunk: _Chunk, before: list[asyncio.Task[None]]) -> None:
        if not chunk.inputs:
            return
        try:
            if chunk.offset is not None and before:
                await asyncio.wait(before)
            result = await self._write(chunk.inputs, chunk.offset)
        except asyncio.CancelledError:
            self._put_back(chunk)  # stopping mid-write: `stop` writes it (once more)
            raise
        finally:
            self._in_flight.difference_update(chunk.inputs)
        self.windows_written += 1
        self._settle(chunk, result)

    def _take_chunk(self) -> _Chunk:
        """Cut the window: the oldest pending devices not being written, at most
        `max_window_devices`; and the consumer offset the chunk may store."""
        if self._windows:
            self._windows[-1].closed = True  # later input gets the next future
        device_ids = list(
            itertools.islice(
                (d for d in self._pending if d not in self._in_flight), self.max_window_devices
            )
        )
        inputs = {device_id: self._pending.pop(device_id) for device_id in device_ids}
        windows = [self._joined.pop(device_id) for device_id in device_ids]
        for number in windows:
            self._window(number).untaken -= 1
        self._in_flight.update(device_ids)
        self._full.clear()
        if len(self._pending) > len(self._in_flight & self._pending.keys()):
            self._full.set()  # the rest has waited long enough: write it right away
        elif not self._pending:
            self._has_pending.clear()
        return _Chunk(inputs, windows, _highest_offset(self._newly_taken()))

    def _newly_taken(self) -> list[_Window]:
        """The leading closed windows all of whose devices are now in a transaction,
        past those whose offset a chunk already took."""
        taken: list[_Window] = []
        for window in self._windows:
            if window.untaken or not window.closed:
                break
            if window.number > self._offered:
                taken.append(window)
        if taken:
            self._offered = taken[-1].number
        return taken

    def _settle(self, chunk: _Chunk, result: FlushResult) -> None:
        """Count the chunk's devices as written and resolve the leading windows now stored.

        Every window still open also takes the result: a device of it may have been
        written early, because it was already pending from an older one."""
        for window in self._windows:
            window.add_result(result)
        for number in chunk.windows:
            self._window(number).unwritten -= 1
        while self._windows and self._windows[0].closed and not self._windows[0].unwritten:
            self._windows.popleft().resolve()

    def _put_back(self, chunk: _Chunk) -> None:
        self._offered = -1  # the chunk's offset is offered again (storing it twice is harmless)
        newer, self._pending = self._pending, dict(chunk.inputs)
        for device_id, number in zip(chunk.inputs, chunk.windows, strict=True):
            self._window(number).untaken += 1
            if device_id in self._joined:  # newer input joined a later window meanwhile
                self._window(self._joined[device_id]).untaken -= 1
                self._window(self._joined[device_id]).unwritten -= 1
            self._joined[device_id] = number
        for device_id, item in newer.items():
            if device_id in self._pending:
                self._pending[device_id].merge(item)
            else:
                self._pending[device_id] = item
        self._has_pending.set()

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


def _highest_offset(windows: list[_Window]) -> tuple[str, int] | None:
    """The consumer offset a chunk may store: all input up to it is then stored."""
    offsets = [w.offset for w in windows if w.offset is not None]
    return max(offsets, key=lambda offset: offset[1]) if offsets else None


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
            window = self.batcher.submit(device_id, timeout_at=at)
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
