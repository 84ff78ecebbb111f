"""`fleetmesh bench registry`: device registrations over real HTTP, beside their ceilings.

The platform runs as users run it: a `fleetmesh up` subprocess (with its
nats-server child) on a temporary data dir and free loopback ports, SQLite by
default or the PostgreSQL database given. Measured over HTTP with httpx:

- single registrations/s (`POST /api/v1/devices`), sequential and with
  `CONCURRENCY` requests in flight, and the sequential latency percentiles;
- bulk registrations/s (`POST /api/v1/devices:bulk`, `BULK_BATCH` per call);
- the idle resident memory of the platform (Python process + nats-server),
  and after the load;
- the events the outbox published meanwhile (at least one per registration).

Every registration hashes a fresh secret with argon2, so argon2 hashes/s on
the devices context's threads is the true ceiling; raw storage writes
(SQLite executemany or PostgreSQL COPY) are reported beside it. The limits are
measured while the platform is not running (so they do not compete for the
CPU), once before and once after it, and the better of the two is kept: a
ceiling measured while other work loads the machine would be too low.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from fleetmesh.bench import limits
from fleetmesh.bench.platform import BenchError, PlatformProcess, percentile
from fleetmesh.bench.report import BenchOptions, BenchReport, machine_info

NAME = "registry"
DEVICE_TYPE = "bench-sensor"
CONCURRENCY = 16
BULK_BATCH = 1000
QUICK_BULK_BATCH = 50
MIB = 1024 * 1024


async def run(options: BenchOptions) -> BenchReport:
    """Registrations/s (single, concurrent, bulk) over HTTP and the platform's memory."""
    report = BenchReport(NAME)
    before = await _measure_limits(options, "before")
    with tempfile.TemporaryDirectory(prefix="fleetmesh-bench-") as tmp:
        load = await _measure_platform(Path(tmp), options)
    ceilings = before.best(await _measure_limits(options, "after"))
    _fill(report, load, ceilings, options)
    report.machine = machine_info(postgres_version=ceilings.postgres_version)
    return report


@dataclass
class _Load:
    startup_s: float = 0.0
    idle_rss: tuple[int, int] = (0, 0)
    loaded_rss: tuple[int, int] = (0, 0)
    sequential: float = 0.0
    sequential_latencies: tuple[float, ...] = ()
    concurrent: float = 0.0
    bulk: float = 0.0
    registered: int = 0
    expected_events: int = 0
    published: float = 0.0


@dataclass
class _Limits:
    argon2: float = 0.0
    sqlite_plain: float = 0.0
    sqlite_indexed: float = 0.0
    postgres_copy: float | None = None
    postgres_version: str | None = None

    def best(self, other: _Limits) -> _Limits:
        """The higher of two measurements of each limit."""
        copies = [v for v in (self.postgres_copy, other.postgres_copy) if v is not None]
        return _Limits(
            argon2=max(self.argon2, other.argon2),
            sqlite_plain=max(self.sqlite_plain, other.sqlite_plain),
            sqlite_indexed=max(self.sqlite_indexed, other.sqlite_indexed),
            postgres_copy=max(copies) if copies else None,
            postgres_version=self.postgres_version or other.postgres_version,
        )


async def _measure_platform(work_dir: Path, options: BenchOptions) -> _Load:
    load = _Load()
    with options.step("starting the platform (fleetmesh up)"):
        started = time.perf_counter()
        platform = await PlatformProcess.start(work_dir, database_url=options.database_url)
        load.startup_s = time.perf_counter() - started
    try:
        with options.step("letting it settle"):
            await asyncio.sleep(0.5 if options.quick else 3.0)
        load.idle_rss = platform.rss()
        async with platform.client() as client:
            # Other contexts publish events of their own: count only what the load adds.
            baseline = await _published(client)
            type_created = await _ensure_device_type(client)
            sequential = options.pick(500, 20)
            concurrent = options.pick(1000, 32)
            batch = options.pick(BULK_BATCH, QUICK_BULK_BATCH)
            bulk = options.pick(10, 2) * batch
            load.sequential, load.sequential_latencies = await _register_sequentially(
                client, sequential, options
            )
            load.concurrent = await _register_concurrently(client, concurrent, options)
            load.bulk = await _register_in_bulk(client, bulk, batch, options)
            load.registered = sequential + concurrent + bulk
            load.expected_events = load.registered + int(type_created)
            load.published = await _events_published(
                client, baseline, load.expected_events, timeout=20 if options.quick else 60
            )
        load.loaded_rss = platform.rss()
    finally:
        with options.step("stopping the platform"):
            await platform.stop()
    return load


async def _measure_limits(options: BenchOptions, when: str) -> _Limits:
    found = _Limits()
    hashes = options.pick(2000, 100)
    threads = limits.DEVICE_HASHER_THREADS
    with options.step(f"limit ({when}): argon2 on {threads} threads", hashes) as step:
        found.argon2 = await asyncio.to_thread(
            limits.argon2_hashes_per_s, hashes, on_progress=step.advance
        )
    rows = options.pick(100_000, 5_000)
    for indexed in (False, True):
        label = "indexed" if indexed else "plain"
        with options.step(f"limit ({when}): SQLite executemany ({label})", rows) as step:
            rate = await asyncio.to_thread(
                limits.sqlite_executemany_rows_per_s,
                rows,
                indexed=indexed,
                on_progress=step.advance,
            )
        if indexed:
            found.sqlite_indexed = rate
        else:
            found.sqlite_plain = rate
    if options.database_url:
        with options.step(f"limit ({when}): PostgreSQL COPY", rows) as step:
            found.postgres_copy = await limits.postgres_copy_rows_per_s(
                options.database_url, rows, on_progress=step.advance
            )
        found.postgres_version = await limits.postgres_version(options.database_url)
    return found


def _fill(report: BenchReport, load: _Load, ceilings: _Limits, options: BenchOptions) -> None:
    argon2_name = f"argon2 hashes/s, {limits.DEVICE_HASHER_THREADS} threads"
    if ceilings.postgres_copy is not None:
        storage_name, storage = "PostgreSQL COPY rows/s", ceilings.postgres_copy
    else:
        storage_name, storage = "SQLite executemany rows/s (indexed)", ceilings.sqlite_indexed
    rate = "registrations/s"
    figures = [
        ("single registrations, sequential", load.sequential),
        (f"single registrations, {CONCURRENCY} in flight", load.concurrent),
        (
            f"bulk registrations, {options.pick(BULK_BATCH, QUICK_BULK_BATCH):,} per call",
            load.bulk,
        ),
    ]
    for name, value in figures:
        report.add(name, value, rate, limit_name=argon2_name, limit_value=ceilings.argon2)
        report.add(
            f"{name} (vs storage)", value, rate, limit_name=storage_name, limit_value=storage
        )
    latencies = sorted(load.sequential_latencies)
    report.add("single registration latency p50", percentile(latencies, 0.50) * 1000, "ms")
    report.add("single registration latency p99", percentile(latencies, 0.99) * 1000, "ms")
    report.add(
        "events published during the load",
        load.published,
        "events",
        limit_name="events expected (registrations + device type)",
        limit_value=load.expected_events,
    )
    report.add("platform startup", load.startup_s, "s")
    report.add("idle RSS, platform + nats-server", sum(load.idle_rss) / MIB, "MiB")
    report.add("idle RSS, Python process", load.idle_rss[0] / MIB, "MiB")
    report.add("idle RSS, nats-server", load.idle_rss[1] / MIB, "MiB")
    report.add("RSS after the load, platform + nats-server", sum(load.loaded_rss) / MIB, "MiB")
    report.add(argon2_name, ceilings.argon2, "hashes/s")
    report.add("SQLite executemany rows/s (plain)", ceilings.sqlite_plain, "rows/s")
    report.add("SQLite executemany rows/s (indexed)", ceilings.sqlite_indexed, "rows/s")
    if ceilings.postgres_copy is not None:
        report.add("PostgreSQL COPY rows/s", ceilings.postgres_copy, "rows/s")


async def _ensure_device_type(client: httpx.AsyncClient) -> bool:
    """Create the bench's device type; False if it exists already (a reused database)."""
    response = await client.post(
        "/api/v1/device-types", json={"name": DEVICE_TYPE, "description": "fleetmesh bench"}
    )
    if response.status_code not in (201, 409):
        raise BenchError(f"creating the device type: {response.status_code} {response.text}")
    return response.status_code == 201


async def _register_one(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/devices", json={"type": DEVICE_TYPE})
    if response.status_code != 201:
        raise BenchError(f"POST /api/v1/devices: {response.status_code} {response.text}")


async def _register_sequentially(
    client: httpx.AsyncClient, count: int, options: BenchOptions
) -> tuple[float, tuple[float, ...]]:
    latencies: list[float] = []
    with options.step("single registrations, sequential", count) as step:
        started = time.perf_counter()
        for _ in range(count):
            sent = time.perf_counter()
            await _register_one(client)
            latencies.append(time.perf_counter() - sent)
            step.advance()
        elapsed = time.perf_counter() - started
    return count / elapsed, tuple(latencies)


async def _register_concurrently(
    client: httpx.AsyncClient, count: int, options: BenchOptions
) -> float:
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await _register_one(client)
            step.advance()

    with options.step(f"single registrations, {CONCURRENCY} in flight", count) as step:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(min(CONCURRENCY, count)):
                group.create_task(worker())
        elapsed = time.perf_counter() - started
    return count / elapsed


async def _register_in_bulk(
    client: httpx.AsyncClient, count: int, batch: int, options: BenchOptions
) -> float:
    body = {"devices": [{"type": DEVICE_TYPE} for _ in range(batch)]}
    with options.step(f"bulk registrations, {batch:,} per call", count) as step:
        started = time.perf_counter()
        for _ in range(count // batch):
            response = await client.post("/api/v1/devices:bulk", json=body)
            created = response.json().get("created") if response.status_code == 201 else None
            if created != batch:
                raise BenchError(f"bulk registration: {response.status_code} {response.text[:500]}")
            step.advance(batch)
        elapsed = time.perf_counter() - started
    return count / elapsed


async def _published(client: httpx.AsyncClient) -> float:
    """The outbox's counter of published events (Prometheus `/metrics`)."""
    response = await client.get("/metrics")
    return _metric(response.text, "fleetmesh_outbox_published_total")


async def _events_published(
    client: httpx.AsyncClient, baseline: float, expected: int, *, timeout: float
) -> float:
    """Events published since `baseline`, once they reach `expected` or the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        published = await _published(client) - baseline
        if published >= expected or time.monotonic() > deadline:
            return published
        await asyncio.sleep(0.2)


def _metric(exposition: str, name: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
