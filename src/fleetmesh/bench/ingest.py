"""`fleetmesh bench ingest`: telemetry accepted -> stored over HTTP and MQTT, beside raw limits.

The platform runs as users run it: a `fleetmesh up` subprocess (with its nats-server
child) on a temporary data dir and free loopback ports, once on SQLite and once on
PostgreSQL (`--database-url`, else a temporary database on the machine's server; that
part is reported as skipped when the server cannot be reached). On each:

- HTTP batch ingest, in three rounds (one with `--quick`): the raw driver writes the rows
  into the same table layout (SQLite `executemany`, target >= 0.6; PostgreSQL `COPY`,
  target >= 0.5), then 8 devices post the same points, batches of 1,000 (250 samples of
  four metrics) at the same time, each device one batch after the other;
  points/s from the first post until the writer stored the last accepted point. A round's
  ratio is its points/s divided by the raw rows/s measured just before it; the round with
  the median ratio is reported, beside the lowest and highest ratio (a 2-core machine's
  speed drifts by a quarter between seconds, and one measurement of each would set a
  slow second of one against a fast second of the other);
- latency: one-sample posts with `?wait=stored`, one at a time (p50, p99);
- MQTT: `MQTT_DEVICES` devices, each its own paho connection, publish one-point QoS 1
  messages on `devices/<id>/telemetry`; messages/s from the first publish until stored,
  divided by a plain paho QoS 1 pipe of the same shape (the same connections, each
  publishing to and subscribed to a topic of its own) through the same embedded MQTT
  listener (target >= 1.0);
- lost = accepted - stored, counted back through the query API (must be 0).

The raw storage limits are measured while the platform idles between rounds. The pipe is
measured on each platform just before its MQTT load; the better one is the limit.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fleetmesh.bench import ingest_limits
from fleetmesh.bench.ingest_load import (
    POINTS_PER_BATCH,
    SAMPLES_PER_BATCH,
    CpuMeter,
    Secrets,
    Throughput,
    batch_items,
    http_batches,
    http_bodies,
    http_latencies,
    limit_rows,
    mqtt_devices,
    mqtt_pipe,
    mqtt_port,
    points_stored,
    wait_stored,
)
from fleetmesh.bench.limits import postgres_version
from fleetmesh.bench.platform import BenchError, PlatformProcess, percentile
from fleetmesh.bench.report import BenchOptions, BenchReport, machine_info
from fleetmesh.telemetry.simulator import CredentialsFile, basic_auth, count_stored, provision_fleet
from fleetmesh.telemetry.tables import PointRow

NAME = "ingest"
SQLITE = "SQLite"
POSTGRES = "PostgreSQL"
TARGETS = {SQLITE: 0.6, POSTGRES: 0.5, "mqtt": 1.0}
SQLITE_LIMIT = "raw SQLite executemany into telemetry_points rows/s"
POSTGRES_LIMIT = "raw PostgreSQL COPY into telemetry_points rows/s"
PIPE_LIMIT = "plain paho -> MQTT listener -> paho QoS 1 pipe, same connections, msgs/s"
PAST_MS = 30 * 60_000
"""The loads' timestamps start this long ago: recent enough to be on time."""
ROUND_SHIFT_MS = 60_000
"""Each HTTP round's timestamps start this much later than the round before (points of
one round never share a time range with another's, so each is counted back alone)."""


@dataclass(frozen=True, slots=True)
class Sizes:
    http_devices: int
    http_batches: int
    http_rounds: int
    latency_requests: int
    mqtt_devices: int
    mqtt_messages: int
    """Per device."""
    stall_s: float
    """Give up waiting for the writer when nothing moved for this long."""

    @classmethod
    def of(cls, options: BenchOptions) -> Sizes:
        return cls(
            http_devices=options.pick(8, 4),
            http_batches=options.pick(40, 3),
            http_rounds=options.pick(3, 1),
            latency_requests=options.pick(300, 20),
            mqtt_devices=options.pick(20, 4),
            mqtt_messages=options.pick(1_500, 50),
            stall_s=options.pick(60, 20),
        )


@dataclass(frozen=True, slots=True)
class HttpRound:
    """One HTTP load, and the raw driver's rows/s measured just before it."""

    load: Throughput
    limit: float

    @property
    def ratio(self) -> float:
        return self.load.rate / self.limit if self.limit > 0 else 0.0


@dataclass
class StoreRun:
    """What one platform (on one store) did."""

    store: str
    rounds: list[HttpRound] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    not_stored: int = 0
    mqtt: Throughput = field(default_factory=Throughput)
    pipe: float = 0.0

    @property
    def median_round(self) -> HttpRound:
        """The round of the median ratio (the lower middle one of an even count)."""
        if not self.rounds:
            return HttpRound(Throughput(), 0.0)
        ranked = sorted(self.rounds, key=lambda one: one.ratio)
        return ranked[(len(ranked) - 1) // 2]


@dataclass(frozen=True, slots=True)
class Fleet:
    """The bench's devices on one platform, by role."""

    http: Secrets
    latency: tuple[str, str]
    mqtt: Secrets


async def run(options: BenchOptions) -> BenchReport:
    """Telemetry accepted -> stored over HTTP and MQTT, beside raw storage and a plain MQTT pipe."""
    sizes = Sizes.of(options)
    rows = limit_rows(
        [f"bench-raw-h{i:03}" for i in range(sizes.http_devices)],
        sizes.http_batches,
        _now_ms() - PAST_MS,
    )
    runs: list[StoreRun] = []
    async with ingest_limits.postgres_target(options.database_url) as postgres:
        with tempfile.TemporaryDirectory(prefix="fleetmesh-bench-ingest-") as tmp:
            runs.append(await _measure_store(Path(tmp) / "sqlite", None, rows, sizes, options))
            if postgres.url:
                runs.append(
                    await _measure_store(
                        Path(tmp) / "postgresql", postgres.url, rows, sizes, options
                    )
                )
        version = await postgres_version(postgres.url) if postgres.url else None
    report = BenchReport(NAME)
    fill(report, runs, sizes, skipped=postgres.skipped_reason)
    report.machine = machine_info(postgres_version=version)
    return report


# --------------------------------------------------------------------------- limits


async def _raw_limit(
    rows: Sequence[PointRow], postgres_url: str | None, options: BenchOptions, label: str
) -> float:
    """Rows/s of the raw driver of the store (SQLite `executemany`, PostgreSQL `COPY`)."""
    if postgres_url is None:
        with options.step(f"{label}: limit: SQLite executemany", len(rows)) as step:
            return await ingest_limits.sqlite_rows_per_s(rows, on_progress=step.advance)
    with options.step(f"{label}: limit: PostgreSQL COPY", len(rows)) as step:
        return await ingest_limits.postgres_rows_per_s(postgres_url, rows, on_progress=step.advance)


# --------------------------------------------------------------------------- one platform


async def _measure_store(
    work_dir: Path,
    database_url: str | None,
    rows: Sequence[PointRow],
    sizes: Sizes,
    options: BenchOptions,
) -> StoreRun:
    work_dir.mkdir(parents=True)
    result = StoreRun(POSTGRES if database_url else SQLITE)
    label = result.store
    with options.step(f"{label}: starting the platform (fleetmesh up)"):
        platform = await PlatformProcess.start(work_dir, database_url=database_url)
    try:
        async with platform.client() as api:
            fleet = await _provision(api, platform, work_dir, sizes, label, options)
            start_ms = _now_ms() - PAST_MS
            for number in range(sizes.http_rounds):
                limit = await _raw_limit(rows, database_url, options, label)
                round_ms = start_ms + number * ROUND_SHIFT_MS
                load = await _http_load(api, platform, fleet, sizes, round_ms, label, options)
                result.rounds.append(HttpRound(load, limit))
            with options.step(f"{label}: ?wait=stored posts", sizes.latency_requests) as step:
                device_id, secret = fleet.latency
                count = sizes.latency_requests
                result.latencies, result.not_stored = await http_latencies(
                    api, device_id, secret, count, start_ms, on_request=step.advance
                )
            result.pipe = await _pipe(platform, fleet, sizes, label, options)
            result.mqtt = await _mqtt_load(api, platform, fleet, sizes, start_ms, label, options)
    finally:
        with options.step(f"{label}: stopping the platform"):
            await platform.stop()
    return result


async def _provision(
    api: httpx.AsyncClient,
    platform: PlatformProcess,
    work_dir: Path,
    sizes: Sizes,
    label: str,
    options: BenchOptions,
) -> Fleet:
    """Register the bench's devices under ids of this run (a reused database keeps old ones)."""
    tag = secrets.token_hex(3)
    http_ids = [f"bench-{tag}-h{i:03}" for i in range(sizes.http_devices)]
    mqtt_ids = [f"bench-{tag}-m{i:03}" for i in range(sizes.mqtt_devices)]
    latency_id = f"bench-{tag}-latency"
    every = [*http_ids, *mqtt_ids, latency_id]
    with options.step(f"{label}: registering {len(every)} devices"):
        credentials = CredentialsFile(work_dir / "devices.json", platform.base_url)
        issued = await provision_fleet(api, every, credentials)
        await _warm_up(api, issued, [*http_ids, latency_id], sizes.stall_s)
        await _known_to_telemetry(api, mqtt_ids, sizes.stall_s)
    return Fleet(
        http={i: issued[i] for i in http_ids},
        latency=(latency_id, issued[latency_id]),
        mqtt={i: issued[i] for i in mqtt_ids},
    )


async def _warm_up(
    api: httpx.AsyncClient, issued: Secrets, device_ids: list[str], timeout_s: float
) -> None:
    """One stored sample per HTTP device, before the clock runs.

    The first post of a device checks its secret (argon2) and may meet a registration the
    telemetry context has not seen yet; neither belongs in the figures. The sample's
    timestamp lies before the load's, outside what is counted back.
    """
    sample = batch_items(_now_ms() - 2 * PAST_MS, 0, 1)

    async def one(device_id: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            answer = await api.post(
                f"/api/v1/devices/{device_id}/telemetry",
                json=sample,
                params={"wait": "stored"},
                headers={"Authorization": basic_auth(device_id, issued[device_id])},
            )
            if answer.status_code == 202:
                return
            if answer.status_code != 404 or time.monotonic() > deadline:
                raise BenchError(f"warm-up post: {answer.status_code} {answer.text[:300]}")
            await asyncio.sleep(0.1)

    await asyncio.gather(*(one(i) for i in device_ids))


async def _known_to_telemetry(
    api: httpx.AsyncClient, device_ids: list[str], timeout_s: float
) -> None:
    """Wait until the telemetry context knows every device (an unknown one is quarantined)."""
    deadline = time.monotonic() + timeout_s
    for device_id in device_ids:
        while (await api.get(f"/api/v1/devices/{device_id}/telemetry/latest")).status_code != 200:
            if time.monotonic() > deadline:
                raise BenchError(f"the telemetry context never learnt of {device_id}")
            await asyncio.sleep(0.1)


async def _http_load(
    api: httpx.AsyncClient,
    platform: PlatformProcess,
    fleet: Fleet,
    sizes: Sizes,
    start_ms: int,
    label: str,
    options: BenchOptions,
) -> Throughput:
    total = sizes.http_devices * sizes.http_batches * POINTS_PER_BATCH
    result = Throughput()
    bodies = http_bodies(list(fleet.http), sizes.http_batches, start_ms)
    baseline = await points_stored(api)
    description = f"{label}: HTTP batches of {POINTS_PER_BATCH:,}, {sizes.http_devices} devices"
    with options.step(description, total) as step, CpuMeter(platform, result):
        started = time.perf_counter()
        counters, acknowledged = await http_batches(
            platform.base_url, fleet.http, bodies, on_batch=step.advance
        )
        stored = await wait_stored(api, baseline + counters.accepted, stall_s=sizes.stall_s)
    result.sent, result.accepted = counters.sent, counters.accepted
    result.accepted_s, result.stored_s = acknowledged - started, stored - started
    last_ms = start_ms + sizes.http_batches * SAMPLES_PER_BATCH - 1
    result.stored = await _count_back(api, list(fleet.http), start_ms, last_ms, label, options)
    return result


async def _pipe(
    platform: PlatformProcess, fleet: Fleet, sizes: Sizes, label: str, options: BenchOptions
) -> float:
    count = sizes.mqtt_devices * sizes.mqtt_messages
    with options.step(f"{label}: limit: plain MQTT QoS 1 pipe", count) as step:
        received, seconds = await asyncio.to_thread(
            mqtt_pipe,
            mqtt_port(platform),
            fleet.mqtt,
            sizes.mqtt_messages,
            stall_s=sizes.stall_s,
            on_message=step.advance,
        )
    if received < count:
        raise BenchError(f"the plain MQTT pipe delivered {received} of {count} messages")
    return received / max(seconds, 1e-9)


async def _mqtt_load(
    api: httpx.AsyncClient,
    platform: PlatformProcess,
    fleet: Fleet,
    sizes: Sizes,
    start_ms: int,
    label: str,
    options: BenchOptions,
) -> Throughput:
    total = sizes.mqtt_devices * sizes.mqtt_messages
    result = Throughput(sent=total)
    baseline = await points_stored(api)
    description = f"{label}: MQTT QoS 1 one-point messages, {sizes.mqtt_devices} devices"
    with options.step(description, total) as step, CpuMeter(platform, result):
        pubacks, started, acknowledged = await asyncio.to_thread(
            mqtt_devices,
            mqtt_port(platform),
            fleet.mqtt,
            sizes.mqtt_messages,
            start_ms,
            stall_s=sizes.stall_s,
            on_puback=step.advance,
        )
        stored = await wait_stored(api, baseline + pubacks, stall_s=sizes.stall_s)
    result.accepted = pubacks
    result.accepted_s, result.stored_s = acknowledged - started, stored - started
    last_ms = start_ms + sizes.mqtt_messages - 1
    result.stored = await _count_back(api, list(fleet.mqtt), start_ms, last_ms, label, options)
    return result


async def _count_back(
    api: httpx.AsyncClient,
    device_ids: list[str],
    from_ms: int,
    to_ms: int,
    label: str,
    options: BenchOptions,
) -> int:
    with options.step(f"{label}: counting the stored points back (query API)"):
        return await count_stored(api, device_ids, from_ms, to_ms)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- report


def fill(
    report: BenchReport,
    runs: list[StoreRun],
    sizes: Sizes,
    *,
    skipped: str | None = None,
) -> None:
    """The figures of every store, each beside its limit, then the limits themselves."""
    pipe = max((run.pipe for run in runs), default=0.0)
    pipe_name = _with_target(PIPE_LIMIT, TARGETS["mqtt"])
    for run in runs:
        _add_http(report, run, _with_target(_raw_name(run), TARGETS[run.store]), sizes)
        _add_latency(report, run)
        _add_mqtt(report, run, pipe_name, pipe, sizes)
    if skipped:
        report.add(f"{POSTGRES}: skipped ({skipped})", 0.0, "skipped")
    for run in runs:
        report.add(f"{_raw_name(run)}, before the median round", run.median_round.limit, "rows/s")
    report.add(PIPE_LIMIT, pipe, "msgs/s")


def _raw_name(run: StoreRun) -> str:
    return SQLITE_LIMIT if run.store == SQLITE else POSTGRES_LIMIT


def _with_target(limit_name: str, target: float) -> str:
    return f"{limit_name} (target ratio >= {target:g})"


def _add_http(report: BenchReport, run: StoreRun, limit_name: str, sizes: Sizes) -> None:
    name = f"HTTP batch ingest, {run.store}, {sizes.http_devices} devices"
    median = run.median_round
    http = median.load
    rounds = f"median of {len(run.rounds)} rounds" if len(run.rounds) > 1 else "one round"
    report.add(
        f"{name}: points/s accepted -> stored ({rounds})",
        http.rate,
        "points/s",
        limit_name=limit_name,
        limit_value=median.limit,
    )
    ratios = [one.ratio for one in run.rounds]
    report.add(f"{name}: ratio to raw, lowest round", min(ratios, default=0.0), "ratio")
    report.add(f"{name}: ratio to raw, highest round", max(ratios, default=0.0), "ratio")
    report.add(f"{name}: points/s accepted (202)", http.accepted_rate, "points/s")
    lost = sum(one.load.lost for one in run.rounds)
    twice = sum(one.load.duplicated for one in run.rounds)
    report.add(f"{name}: points lost (accepted - stored), all rounds", float(lost), "points")
    report.add(f"{name}: points stored twice, all rounds", float(twice), "points")
    _add_cpu(report, name, http.cpu_ms_per(1000), "1,000 points")


def _add_latency(report: BenchReport, run: StoreRun) -> None:
    latencies = sorted(run.latencies)
    name = f"HTTP ?wait=stored latency, {run.store}, one sample"
    report.add(f"{name}, p50", percentile(latencies, 0.50) * 1000, "ms")
    report.add(f"{name}, p99", percentile(latencies, 0.99) * 1000, "ms")
    report.add(f"{name}: answers not yet stored", float(run.not_stored), "requests")


def _add_mqtt(
    report: BenchReport, run: StoreRun, limit_name: str, limit: float, sizes: Sizes
) -> None:
    name = f"MQTT QoS 1 one-point messages, {run.store}, {sizes.mqtt_devices} devices"
    mqtt = run.mqtt
    report.add(
        f"{name}: msgs/s published -> stored",
        mqtt.rate,
        "msgs/s",
        limit_name=limit_name,
        limit_value=limit,
    )
    report.add(f"{name}: msgs/s PUBACKed", mqtt.accepted_rate, "msgs/s")
    report.add(f"{name}: msgs not PUBACKed", float(mqtt.sent - mqtt.accepted), "msgs")
    report.add(f"{name}: points lost (PUBACKed - stored)", float(mqtt.lost), "points")
    report.add(f"{name}: points stored twice", float(mqtt.duplicated), "points")
    _add_cpu(report, name, mqtt.cpu_ms_per(1), "message")


def _add_cpu(report: BenchReport, name: str, cpu: tuple[float, float, float], per: str) -> None:
    python, server, client = cpu
    report.add(f"{name}: platform process CPU per {per}", python, "ms")
    report.add(f"{name}: nats-server CPU per {per}", server, "ms")
    report.add(f"{name}: bench (clients) CPU per {per}", client, "ms")
