"""`fleetmesh bench status`: offline-detection delay and status updates/s, beside their limits.

For each fleet size the status context runs in-process, as `fleetmesh up` runs
it (`bootstrap` with only the status context: its consumers, report batcher,
deadline runner and outbox relay, on a real nats-server and a fresh SQLite
file, or the PostgreSQL database given; the heap is settled once started, as
`fleetmesh up` does: `core.heap`), and:

1. learns the fleet from the device registry's events, handed to
   `StatusService.project` in chunks (what its projection consumer does with
   `type_defined` and `registered`; no credentials are hashed for the bench);
2. takes one telemetry report per device through `ReportBatcher.submit`, the
   entry point of its liveness consumer, with that consumer's flow control
   (`CHUNK` reports per fetch, at most `MAX_UNSETTLED` not yet stored), the
   device type's timeout an hour long meanwhile: status updates/s is the fleet
   size over the time from the first report to the last one committed (each
   update writes the status row, a history row, an outbox event and a quality
   sample), beside raw storage rows/s;
3. lets the fleet go silent: the type's timeout becomes a short one, so the
   earliest deadline (last report + timeout) lands `MARGIN_S` after the change,
   and the deadlines come due as densely as the reports came in (the whole
   fleet silent at once, right after reporting as fast as it was taken). The
   delay of a device is from its deadline to the commit of its offline
   `status_changed` (the outbox row's creation time), and to that event's
   publication on the bus by the outbox relay (given `PUBLISH_WAIT_S` once
   the fleet is offline; what it has not published by then is counted); the
   target is the 1 s deadline tolerance. Missing or repeated offline
   transitions are counted too.

4. then, beside that worst case, a steady fleet: every device reports once per
   period (`SPREAD_RATE` reports/s over the fleet, at a random phase of the
   period each, so deadlines are spread over time, as in a running fleet), the
   timeout is two periods, and a share (`SILENT_SHARE`) of the devices goes
   silent each at a random time of the second period. Reported: the delay of
   their offline transitions beyond the timeout (p50/p99/max), missing ones, and
   offline transitions of devices that kept reporting (false alarms);
5. last, one more report from each device still online, as fast as they are taken,
   the way a running fleet reports (each only moves `last_seen` and adds a quality
   sample): status updates/s of devices already online. It comes last because its
   deadlines would fall due far more densely than the first reports' (step 3).

Raw storage rows/s (SQLite executemany into an indexed table, or PostgreSQL
COPY) is measured before and after the platform runs, and the better of the two
is kept, like the other benches do.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import random
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from sqlalchemy import func, select

from fleetmesh.bench import limits
from fleetmesh.bench.platform import BenchError, percentile
from fleetmesh.bench.report import BenchOptions, BenchReport, machine_info
from fleetmesh.bootstrap import Platform, bootstrap
from fleetmesh.core.clock import Clock, from_rfc3339, to_rfc3339
from fleetmesh.core.envelope import subject_for_type
from fleetmesh.core.heap import release_heap, settle_heap
from fleetmesh.core.logging import set_log_level
from fleetmesh.core.ports import free_port
from fleetmesh.core.settings import Settings
from fleetmesh.core.tables import outbox
from fleetmesh.status import contracts
from fleetmesh.status.domain import DeviceState, StatusCause, StatusReport
from fleetmesh.status.liveness import ReportBatcher
from fleetmesh.status.repository import status_devices
from fleetmesh.status.service import FlushResult, StatusService

NAME = "status"
FLEETS = (10_000, 100_000)
QUICK_FLEETS = (1_000, 5_000)
CHUNK = 1_000
"""Reports per fetch of the liveness consumer."""
MAX_UNSETTLED = 20_000
"""The liveness consumer's `max_ack_pending`: reports submitted and not yet stored."""
PROJECTION_CHUNK = 5_000
FEED_TIMEOUT_S = 3600.0
MARGIN_S = 10.0
QUICK_MARGIN_S = 4.0
TOLERANCE_S = 1.0
"""How late an offline transition may be committed after its deadline."""
PUBLISH_WAIT_S = 60.0
"""How long the outbox relay gets, once the fleet is offline, to publish its events."""
QUALITY = 1.0
SPREAD_RATE = 5_000
QUICK_SPREAD_RATE = 2_500
"""Reports/s of the whole steady fleet: each device reports every `size / rate` seconds."""
MIN_SPREAD_PERIOD_S = 5.0
QUICK_MIN_SPREAD_PERIOD_S = 2.0
SILENT_SHARE = 0.1
"""Devices of the steady fleet that go silent, each at a random time."""
SPREAD_TICK_S = 0.05
STEADY_PATIENCE_S = 30.0
"""How long the steady fleet keeps reporting after the plan's end for late offlines."""
SPREAD_SEED = 20_260_101
OFFSET_NAME = "bench-status"
STATUS_CHANGED_SUBJECT = subject_for_type(contracts.STATUS_CHANGED)

_T = TypeVar("_T")


async def run(options: BenchOptions) -> BenchReport:
    """Offline-detection delay beyond the timeout and status updates/s, for 10k and 100k devices."""
    report = BenchReport(NAME)
    before = await _measure_storage(options, "before")
    fleets: list[Fleet] = []
    previous_level = logging.getLevelName(logging.getLogger().level)
    set_log_level("ERROR")  # the platform runs in this process: keep its logs off the progress
    try:
        for size in QUICK_FLEETS if options.quick else FLEETS:
            with tempfile.TemporaryDirectory(prefix="fleetmesh-bench-status-") as tmp:
                fleets.append(await _measure_fleet(Path(tmp), size, options))
    finally:
        set_log_level(previous_level)
    storage = before.best(await _measure_storage(options, "after"))
    for fleet in fleets:
        fill(report, fleet, storage)
    report.add(storage.name, storage.rows_per_s, "rows/s")
    report.machine = machine_info(postgres_version=storage.postgres_version)
    return report


# --------------------------------------------------------------------------- figures


@dataclass
class Offline:
    """Offline transitions of a fleet: delays past each deadline, in seconds, ascending."""

    committed: list[float] = field(default_factory=list)
    published: list[float] = field(default_factory=list)
    missing: int = 0
    repeated: int = 0
    unpublished: int = 0
    peak_due: int = 0
    """The most deadlines that fell due within one second."""
    committed_per_s: float = 0.0
    """Offline transitions committed per second, from the first deadline to the last commit."""


@dataclass
class Fleet:
    """What one fleet size measured."""

    size: int
    updates_per_s: float = 0.0
    """Reports of devices coming online, stored per second."""
    repeat_updates_per_s: float = 0.0
    """Reports of devices already online, stored per second."""
    stored_latencies: list[float] = field(default_factory=list)
    timeout_s: float = 0.0
    rearm_s: float = 0.0
    offline: Offline = field(default_factory=Offline)
    steady: Steady | None = None


@dataclass
class Steady:
    """The steady fleet: deadlines spread over time, a share of the devices going silent."""

    period_s: float
    timeout_s: float
    silent: int
    offline: Offline = field(default_factory=Offline)
    false_offline: int = 0
    reports: int = 0


@dataclass(frozen=True)
class Storage:
    """Raw storage rows/s of this machine: the ceiling of a status write."""

    name: str
    rows_per_s: float
    postgres_version: str | None = None

    def best(self, other: Storage) -> Storage:
        return Storage(
            self.name,
            max(self.rows_per_s, other.rows_per_s),
            self.postgres_version or other.postgres_version,
        )


def offline_outcome(
    rows: Iterable[tuple[datetime, datetime | None, bytes]], devices: set[str]
) -> Offline:
    """Delays of the offline `status_changed` events of `devices`, from outbox rows
    (created at, published at, CloudEvent JSON); the deadline is the event's `at`."""
    outcome = Offline()
    per_device: Counter[str] = Counter()
    deadlines: list[datetime] = []
    last_commit: datetime | None = None
    for created_at, published_at, payload in rows:
        event = json.loads(payload)
        data = event["data"]
        if data["current"] != DeviceState.OFFLINE.value or data["device_id"] not in devices:
            continue
        per_device[data["device_id"]] += 1
        deadline = from_rfc3339(data["at"])
        deadlines.append(deadline)
        last_commit = created_at if last_commit is None else max(last_commit, created_at)
        outcome.committed.append((created_at - deadline).total_seconds())
        if published_at is None:
            outcome.unpublished += 1
        else:
            outcome.published.append((published_at - deadline).total_seconds())
    outcome.committed.sort()
    outcome.published.sort()
    outcome.missing = len(devices) - len(per_device)
    outcome.repeated = sum(count - 1 for count in per_device.values())
    if deadlines and last_commit is not None:
        deadlines.sort()
        outcome.peak_due = _most_within(deadlines, timedelta(seconds=1))
        spread = (last_commit - deadlines[0]).total_seconds()
        outcome.committed_per_s = len(deadlines) / max(spread, 1e-9)
    return outcome


def _most_within(moments: list[datetime], span: timedelta) -> int:
    """The most of these (ascending) moments that fall within one `span`."""
    most, start = 0, 0
    for end, moment in enumerate(moments):
        while moments[start] <= moment - span:
            start += 1
        most = max(most, end - start + 1)
    return most


def silent_timeout(first_report: datetime, now: datetime, margin_s: float) -> float:
    """A timeout (whole seconds) whose earliest deadline is at least `margin_s` after `now`."""
    return float(math.ceil((now - first_report).total_seconds() + margin_s))


def fill(report: BenchReport, fleet: Fleet, storage: Storage) -> None:
    label = f"{fleet.size:,} devices"
    target = f"deadline tolerance ({TOLERANCE_S:g} s)"
    committed, published = fleet.offline.committed, fleet.offline.published
    for share, name in ((0.50, "p50"), (0.99, "p99"), (1.0, "max")):
        report.add(
            f"offline-detection delay {name} beyond the timeout, {label}",
            percentile(committed, share) * 1000,
            "ms",
            limit_name=target,
            limit_value=TOLERANCE_S * 1000,
        )
    if published:  # none at all when the relay is still busy with the online events
        for share, name in ((0.99, "p99"), (1.0, "max")):
            report.add(
                f"offline event published, delay {name} beyond the timeout, {label}",
                percentile(published, share) * 1000,
                "ms",
            )
    for name, updates_per_s in (
        ("status updates/s processed (report in -> stored)", fleet.updates_per_s),
        (
            "status updates/s processed, devices already online (report moves last_seen)",
            fleet.repeat_updates_per_s,
        ),
    ):
        report.add(
            f"{name}, {label}",
            updates_per_s,
            "updates/s",
            limit_name=storage.name,
            limit_value=storage.rows_per_s,
        )
    latencies = sorted(fleet.stored_latencies)
    report.add(f"report -> stored latency p50, {label}", percentile(latencies, 0.50) * 1000, "ms")
    report.add(f"report -> stored latency p99, {label}", percentile(latencies, 0.99) * 1000, "ms")
    report.add(
        f"deadlines falling due within one second, at most, {label}",
        float(fleet.offline.peak_due),
        "deadlines",
    )
    report.add(
        f"offline transitions committed/s, first deadline to last commit, {label}",
        fleet.offline.committed_per_s,
        "transitions/s",
    )
    report.add(f"offline timeout used, {label}", fleet.timeout_s, "s")
    report.add(f"deadlines re-armed from the store, {label}", fleet.rearm_s * 1000, "ms")
    report.add(f"offline transitions missing, {label}", float(fleet.offline.missing), "devices")
    report.add(f"offline transitions repeated, {label}", float(fleet.offline.repeated), "events")
    report.add(
        f"offline events unpublished {PUBLISH_WAIT_S:g} s after the last offline, {label}",
        float(fleet.offline.unpublished),
        "events",
    )
    if fleet.steady is not None:
        fill_steady(report, fleet.steady, label)


def fill_steady(report: BenchReport, steady: Steady, label: str) -> None:
    label = f"steady fleet, {label}"
    target = f"deadline tolerance ({TOLERANCE_S:g} s)"
    for share, name in ((0.50, "p50"), (0.99, "p99"), (1.0, "max")):
        report.add(
            f"offline-detection delay {name} beyond the timeout, {label}",
            percentile(steady.offline.committed, share) * 1000,
            "ms",
            limit_name=target,
            limit_value=TOLERANCE_S * 1000,
        )
    report.add(f"report period, {label}", steady.period_s, "s")
    report.add(f"offline timeout used, {label}", steady.timeout_s, "s")
    report.add(f"devices gone silent, {label}", float(steady.silent), "devices")
    report.add(f"reports sent, {label}", float(steady.reports), "reports")
    report.add(f"offline transitions missing, {label}", float(steady.offline.missing), "devices")
    report.add(f"offline transitions repeated, {label}", float(steady.offline.repeated), "events")
    report.add(
        f"offline transitions of devices still reporting, {label}",
        float(steady.false_offline),
        "events",
    )


@dataclass(frozen=True)
class SteadyPlan:
    """When each device of the steady fleet reports, and when the silent ones stop."""

    period_s: float
    offsets: list[tuple[float, str]]
    """(seconds into each period, device), ascending."""
    silent_at: dict[str, float]
    """Device -> seconds after the start from which it sends nothing."""

    def due(self, after: float, until: float) -> list[str]:
        """Devices with a report due in (after, until] seconds after the start."""
        found: list[str] = []
        period = self.period_s
        first_round = max(0, math.floor(after / period))
        for round_index in range(first_round, math.floor(until / period) + 1):
            base = round_index * period
            lo = bisect.bisect_right(self.offsets, (after - base, "\uffff"))
            hi = bisect.bisect_right(self.offsets, (until - base, "\uffff"))
            for offset, device_id in self.offsets[lo:hi]:
                silent = self.silent_at.get(device_id)
                if silent is None or base + offset < silent:
                    found.append(device_id)
        return found

    @property
    def end_s(self) -> float:
        """Seconds after the start when the last silent device's deadline has passed."""
        return 2 * self.period_s + 2 * self.period_s + TOLERANCE_S


def steady_plan(devices: list[str], period_s: float, seed: int = SPREAD_SEED) -> SteadyPlan:
    """Each device reports at a random phase of the period; `SILENT_SHARE` of them stop
    at a random time of the second period (after their first report)."""
    rng = random.Random(seed)
    offsets = sorted((rng.uniform(0, period_s), device_id) for device_id in devices)
    silent = rng.sample(devices, round(len(devices) * SILENT_SHARE))
    return SteadyPlan(
        period_s,
        offsets,
        {device_id: rng.uniform(period_s, 2 * period_s) for device_id in silent},
    )


# --------------------------------------------------------------------------- one fleet


async def _measure_fleet(work_dir: Path, size: int, options: BenchOptions) -> Fleet:
    fleet = Fleet(size)
    run_id = secrets.token_hex(4)  # a reused PostgreSQL database may hold earlier runs
    device_type = f"bench-status-{run_id}"
    devices = [f"bench-{run_id}-{i:07d}" for i in range(size)]
    with options.step(f"{size:,} devices: starting the status context"):
        platform = bootstrap(_settings(work_dir, options.database_url), contexts=["status"])
        await platform.start()
    thresholds = settle_heap()  # what `fleetmesh up` does once started
    try:
        service = _provided(platform, "status_service", StatusService)
        batcher = _provided(platform, "status_batcher", ReportBatcher)
        started = platform.clock.now()
        await _project(service, device_type, devices, options)
        first_report, fleet.updates_per_s, fleet.stored_latencies = await _feed(
            platform, batcher, devices, options, "coming online"
        )
        margin = QUICK_MARGIN_S if options.quick else MARGIN_S
        fleet.timeout_s = silent_timeout(first_report, platform.clock.now(), margin)
        with options.step(f"{size:,} devices: timeout {fleet.timeout_s:g} s, re-arming"):
            rearm_started = time.perf_counter()
            await service.project([contracts.TypeDefined(device_type, fleet.timeout_s)])
            fleet.rearm_s = time.perf_counter() - rearm_started
        await _wait_offline(platform, device_type, size, fleet.timeout_s, options)
        await _wait_published(platform, started, options)
        fleet.offline = offline_outcome(await _status_changes(platform, started), set(devices))
        fleet.steady = await _measure_steady(
            platform, service, batcher, device_type, devices, options
        )
        online = await _online(platform, device_type)
        if online:
            _, fleet.repeat_updates_per_s, _ = await _feed(
                platform, batcher, online, options, "reporting again"
            )
    finally:
        release_heap(thresholds)
        with options.step(f"{size:,} devices: stopping"):
            await platform.stop()
    return fleet


def _settings(data_dir: Path, database_url: str | None) -> Settings:
    return Settings(
        data_dir=data_dir,
        host="127.0.0.1",
        http_port=free_port(),
        nats_port=free_port(),
        mqtt_port=free_port(),
        nats=None,
        database_url=database_url,
        log_level="ERROR",
    )


def _provided(platform: Platform, name: str, kind: type[_T]) -> _T:
    found = platform.provided(name)
    if not isinstance(found, kind):
        raise BenchError(f"the status context does not provide {name}")
    return found


async def _project(
    service: StatusService, device_type: str, devices: list[str], options: BenchOptions
) -> None:
    await service.project([contracts.TypeDefined(device_type, FEED_TIMEOUT_S)])
    registered_at = to_rfc3339(service.clock.now())
    with options.step(f"{len(devices):,} devices: registering", len(devices)) as step:
        for start in range(0, len(devices), PROJECTION_CHUNK):
            chunk = devices[start : start + PROJECTION_CHUNK]
            await service.project(
                [contracts.Registered(d, registered_at, device_type) for d in chunk]
            )
            step.advance(len(chunk))


async def _feed(
    platform: Platform,
    batcher: ReportBatcher,
    devices: list[str],
    options: BenchOptions,
    label: str,
) -> tuple[datetime, float, list[float]]:
    """One telemetry report per device; (first report's time, updates/s, latencies in s)."""
    clock = platform.clock
    unsettled: dict[asyncio.Future[FlushResult], int] = {}
    sent: list[tuple[float, int, asyncio.Future[FlushResult]]] = []
    stored_at: dict[asyncio.Future[FlushResult], float] = {}
    first_report = clock.now()
    with options.step(f"{len(devices):,} devices: {label}", len(devices)) as step:
        began = time.monotonic()
        for start in range(0, len(devices), CHUNK):
            chunk = devices[start : start + CHUNK]
            while unsettled and sum(unsettled.values()) + len(chunk) > MAX_UNSETTLED:
                done, _ = await asyncio.wait(unsettled, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    step.advance(unsettled.pop(future))
            submitted = time.monotonic()
            future = _submit(batcher, chunk, clock, start)
            if future not in stored_at:
                stored_at[future] = 0.0
                future.add_done_callback(lambda done: stored_at.__setitem__(done, time.monotonic()))
            unsettled[future] = unsettled.get(future, 0) + len(chunk)
            sent.append((submitted, len(chunk), future))
            await asyncio.sleep(0)  # the consumer awaits its next fetch here
        results = await asyncio.gather(*unsettled)
        step.advance(sum(unsettled.values()))
    _check_stored(results)
    finished = max(stored_at.values())
    latencies = [stored_at[future] - at for at, count, future in sent for _ in range(count)]
    return first_report, len(devices) / max(finished - began, 1e-9), latencies


def _submit(
    batcher: ReportBatcher, chunk: list[str], clock: Clock, offset: int
) -> asyncio.Future[FlushResult]:
    """What the liveness consumer does with one fetch of `telemetry.collected` events."""
    future: asyncio.Future[FlushResult] | None = None
    for index, device_id in enumerate(chunk):
        at = clock.now()
        future = batcher.submit(
            device_id,
            StatusReport(DeviceState.ONLINE, StatusCause.TELEMETRY, at),
            quality=(at, 1, QUALITY),
            offset=(OFFSET_NAME, offset + index + 1),
        )
    if future is None:
        raise BenchError("an empty chunk of reports")
    return future


async def _measure_steady(
    platform: Platform,
    service: StatusService,
    batcher: ReportBatcher,
    device_type: str,
    devices: list[str],
    options: BenchOptions,
) -> Steady:
    rate = options.pick(SPREAD_RATE, QUICK_SPREAD_RATE)
    least = QUICK_MIN_SPREAD_PERIOD_S if options.quick else MIN_SPREAD_PERIOD_S
    plan = steady_plan(devices, max(least, len(devices) / rate))
    steady = Steady(plan.period_s, 2 * plan.period_s, len(plan.silent_at))
    await service.project([contracts.TypeDefined(device_type, steady.timeout_s)])
    started = platform.clock.now()
    label = f"{len(devices):,} devices: steady fleet, {len(plan.silent_at):,} going silent"

    async def silent_ones_offline() -> bool:
        offline = await _count(platform, device_type, DeviceState.OFFLINE)
        return offline >= len(plan.silent_at)

    with options.step(label, math.ceil(plan.end_s)) as step:
        steady.reports = await _report_steadily(
            platform.clock, batcher, plan, step.advance, silent_ones_offline
        )
    ended = platform.clock.now()  # from here on, nobody reports: later offlines do not count
    await _wait_published(platform, started, options)
    changes = [row for row in await _status_changes(platform, started) if row[0] <= ended]
    steady.offline = offline_outcome(changes, set(plan.silent_at))
    still_reporting = set(devices) - set(plan.silent_at)
    steady.false_offline = len(offline_outcome(changes, still_reporting).committed)
    return steady


async def _report_steadily(
    clock: Clock,
    batcher: ReportBatcher,
    plan: SteadyPlan,
    on_second: Callable[[int], None],
    finished: Callable[[], Awaitable[bool]],
) -> int:
    """Send the plan's reports as their times come, with the consumer's flow control,
    until the plan's end and then until `finished()` (at most `STEADY_PATIENCE_S` more)."""
    unsettled: dict[asyncio.Future[FlushResult], int] = {}
    began = time.monotonic()
    sent, elapsed, seconds = 0, -1.0, 0
    while True:
        now = time.monotonic() - began
        for device_ids in _batches(plan.due(elapsed, now), CHUNK):
            while unsettled and sum(unsettled.values()) + len(device_ids) > MAX_UNSETTLED:
                done, _ = await asyncio.wait(unsettled, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    unsettled.pop(future)
            future = _submit(batcher, device_ids, clock, _STEADY_OFFSET + sent)
            unsettled[future] = unsettled.get(future, 0) + len(device_ids)
            sent += len(device_ids)
        elapsed = now
        if int(elapsed) > seconds:
            on_second(int(elapsed) - seconds)
            seconds = int(elapsed)
            if elapsed >= plan.end_s + STEADY_PATIENCE_S:
                break
            if elapsed >= plan.end_s and await finished():
                break
        await asyncio.sleep(SPREAD_TICK_S)
    _check_stored(list(await asyncio.gather(*unsettled)))
    return sent


def _batches(items: list[str], size: int) -> list[list[str]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


_STEADY_OFFSET = 1_000_000_000
"""Consumer offsets of the steady fleet's reports: after the first feed's."""


def _check_stored(results: list[FlushResult]) -> None:
    unknown = sum(len(r.unknown) for r in results)
    failed = sum(len(r.failed) for r in results)
    if unknown or failed:
        raise BenchError(f"reports not stored: {unknown} unknown devices, {failed} failed")


async def _count(platform: Platform, device_type: str, state: DeviceState) -> int:
    async with platform.database.session() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(status_devices)
            .where(status_devices.c.type_name == device_type, status_devices.c.status == state)
        )
    return int(count or 0)


async def _online(platform: Platform, device_type: str) -> list[str]:
    async with platform.database.session() as session:
        found = await session.scalars(
            select(status_devices.c.device_id).where(
                status_devices.c.type_name == device_type,
                status_devices.c.status == DeviceState.ONLINE,
            )
        )
    return sorted(found)


async def _wait_offline(
    platform: Platform, device_type: str, size: int, timeout_s: float, options: BenchOptions
) -> None:
    patience = timeout_s + 60 + size / 500
    deadline = time.monotonic() + patience
    with options.step(f"{size:,} devices: silent, waiting for offline", size) as step:
        seen = 0
        while seen < size:
            if time.monotonic() > deadline:
                raise BenchError(f"{size - seen} devices still not offline after {patience:.0f} s")
            await asyncio.sleep(0.5)
            count = await _count(platform, device_type, DeviceState.OFFLINE)
            step.advance(count - seen)
            seen = count


async def _wait_published(platform: Platform, since: datetime, options: BenchOptions) -> None:
    """Until the outbox relay published every status_changed of the run, at most a while."""
    deadline = time.monotonic() + PUBLISH_WAIT_S
    with options.step("waiting for the outbox relay"):
        while time.monotonic() < deadline:
            async with platform.database.session() as session:
                pending = await session.scalar(
                    select(func.count())
                    .select_from(outbox)
                    .where(
                        outbox.c.subject == STATUS_CHANGED_SUBJECT,
                        outbox.c.created_at >= since,
                        outbox.c.published_at.is_(None),
                    )
                )
            if not pending:
                return
            await asyncio.sleep(0.5)


async def _status_changes(
    platform: Platform, since: datetime
) -> list[tuple[datetime, datetime | None, bytes]]:
    async with platform.database.session() as session:
        rows = await session.execute(
            select(outbox.c.created_at, outbox.c.published_at, outbox.c.payload).where(
                outbox.c.subject == STATUS_CHANGED_SUBJECT, outbox.c.created_at >= since
            )
        )
        return [(row.created_at, row.published_at, bytes(row.payload)) for row in rows]


# --------------------------------------------------------------------------- limits


async def _measure_storage(options: BenchOptions, when: str) -> Storage:
    rows = options.pick(100_000, 5_000)
    if options.database_url:
        with options.step(f"limit ({when}): PostgreSQL COPY", rows) as step:
            rate = await limits.postgres_copy_rows_per_s(
                options.database_url, rows, on_progress=step.advance
            )
        version = await limits.postgres_version(options.database_url)
        return Storage("PostgreSQL COPY rows/s", rate, version)
    with options.step(f"limit ({when}): SQLite executemany (indexed)", rows) as step:
        rate = await asyncio.to_thread(
            limits.sqlite_executemany_rows_per_s, rows, indexed=True, on_progress=step.advance
        )
    return Storage("SQLite executemany rows/s (indexed)", rate)
