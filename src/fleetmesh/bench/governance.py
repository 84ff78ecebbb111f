"""`fleetmesh bench governance`: discovery, watches and health checking, beside their limits.

The platform runs as users run it: a `fleetmesh up` subprocess (with its
nats-server child) on a temporary data dir and free loopback ports, SQLite by
default or the PostgreSQL database given. Measured:

- discovery over HTTP: `GET /api/v1/services/{name}/instances` of a service
  with `DISCOVERY_INSTANCES` instances, `CONCURRENCY` in flight and one at a
  time, beside `GET /healthz` of the same server with the same client (what
  any request costs there), the two in alternating rounds; `RegistryClient.pick()`
  served from its watched cache, beside the balancer's own pick over the same
  list (the in-memory floor);
- watch notification latency, from the start of the write call to the watcher
  waking: registry (a TTL instance registered, then deregistered; the watcher
  is a `RegistryClient` cache fed by blocking queries) and config (a `PUT`;
  watched at once by a `ConfigClient` following the entry over HTTP and by a
  `LiveConfig`, the KV watch fleetmesh's own processes read settings with),
  beside raw KV watch latency on the platform's own nats-server (a put, then
  a watcher of that key waking);
- health checking: instances with HTTP checks every `CHECK_INTERVAL_S` against
  tiny HTTP servers the bench runs on loopback (one port per instance: real
  probes, real connections), the CPU of the platform process over whole check
  intervals, beside its idle CPU (measured first) and beside what the same
  probes cost a bare httpx client with the registry prober's limits (measured
  after the platform stopped, on a thread of its own, by that thread's CPU time).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog

from fleetmesh.bench import limits
from fleetmesh.bench.platform import BenchError, PlatformProcess, percentile
from fleetmesh.bench.report import BenchOptions, BenchReport, machine_info
from fleetmesh.config.client import ConfigClient
from fleetmesh.core.backbone import Backbone, NatsEndpoint
from fleetmesh.core.live_config import LiveConfig
from fleetmesh.core.nats_server import SERVICE_USER, NatsSecrets
from fleetmesh.registry.balancing import RoundRobinBalancer
from fleetmesh.registry.checker import DEFAULT_CONCURRENCY as PROBER_CONNECTIONS
from fleetmesh.registry.client import RegistryClient

NAME = "governance"
CONCURRENCY = 16
DISCOVERY_INSTANCES = 10
DISCOVERED = "bench-discovered"
WATCHED = "bench-watched"
CHECKED = "bench-checked"
CONFIG_SERVICE = "bench"
CONFIG_KEY = "watched"
RAW_BUCKET = "bench_raw"
RAW_KEY = "latency"
HEALTH_INSTANCES = 1000
QUICK_HEALTH_INSTANCES = 100
CHECK_INTERVAL_S = 10.0
CHECK_TIMEOUT_S = 2.0
HEALTH_PATH = "/health"
PROBER_KEEPALIVE = 32
"""Idle connections the registry's prober keeps (its httpx limits)."""
WATCH_PAUSE_S = 0.02
"""Between two watch samples, so each write finds its watcher waiting as in steady state."""
WAKE_TIMEOUT_S = 10.0


async def run(options: BenchOptions) -> BenchReport:
    """Discovery, watch latency and health-checking cost of the registry and config center."""
    report = BenchReport(NAME)
    with (
        _logs_on_stderr(),
        tempfile.TemporaryDirectory(prefix="fleetmesh-bench-governance-") as tmp,
    ):
        figures = await _measure(Path(tmp), options)
    fill(report, figures)
    postgres = None
    if options.database_url:
        postgres = await limits.postgres_version(options.database_url)
    report.machine = machine_info(postgres_version=postgres)
    return report


@contextlib.contextmanager
def _logs_on_stderr() -> Iterator[None]:
    """Warnings of the in-process clients (NATS, LiveConfig) on stderr: stdout is the report's."""
    if structlog.is_configured():
        yield
        return
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    try:
        yield
    finally:
        structlog.reset_defaults()


# --------------------------------------------------------------------------- figures


@dataclass
class Discovery:
    """Requests/s and per-request seconds of discovery and of the trivial endpoint."""

    http_rate: float = 0.0
    healthz_rate: float = 0.0
    http_latencies: list[float] = field(default_factory=list)
    healthz_latencies: list[float] = field(default_factory=list)
    cached_picks: list[float] = field(default_factory=list)
    bare_picks: list[float] = field(default_factory=list)


@dataclass
class Watches:
    """Seconds from the start of each write call to each watcher waking (and to the call's end)."""

    registry: list[float] = field(default_factory=list)
    registry_writes: list[float] = field(default_factory=list)
    config_client: list[float] = field(default_factory=list)
    live_config: list[float] = field(default_factory=list)
    config_writes: list[float] = field(default_factory=list)
    raw_kv: list[float] = field(default_factory=list)


@dataclass
class HealthCost:
    """CPU of the platform while it health-checks `instances` every `interval_s`."""

    instances: int = 0
    interval_s: float = CHECK_INTERVAL_S
    window_s: float = 0.0
    idle_cpu_percent: float = 0.0
    checking_cpu_percent: float = 0.0
    nats_cpu_percent: float = 0.0
    probes_answered: int = 0
    registrations_per_s: float = 0.0
    bare_cpu_per_probe_s: float = 0.0

    @property
    def expected_probes_per_s(self) -> float:
        return self.instances / self.interval_s if self.interval_s > 0 else 0.0

    @property
    def probes_per_s(self) -> float:
        return self.probes_answered / self.window_s if self.window_s > 0 else 0.0

    @property
    def net_cpu_percent(self) -> float:
        """What checking adds to the idle platform (never below zero)."""
        return max(0.0, self.checking_cpu_percent - self.idle_cpu_percent)

    @property
    def bare_cpu_percent(self) -> float:
        """CPU % a bare httpx client would spend on the same probes per second."""
        return self.bare_cpu_per_probe_s * self.expected_probes_per_s * 100

    @property
    def net_cpu_per_probe_s(self) -> float:
        probes = self.probes_per_s
        return self.net_cpu_percent / 100 / probes if probes > 0 else 0.0


@dataclass
class Figures:
    discovery: Discovery = field(default_factory=Discovery)
    watches: Watches = field(default_factory=Watches)
    health: HealthCost = field(default_factory=HealthCost)


def cpu_percent(before: float, after: float, seconds: float) -> float:
    """CPU seconds used over a wall-clock span, as % of one core."""
    return (after - before) / seconds * 100 if seconds > 0 else 0.0


def milliseconds(samples: list[float], share: float) -> float:
    return percentile(sorted(samples), share) * 1000


def whole_intervals(quick: bool) -> int:
    """Check intervals the CPU is measured over: every instance is probed once per interval."""
    return 1 if quick else 3


def http_check_instance(instance_id: str, port: int) -> dict[str, Any]:
    """The registration body of one instance checked over HTTP every `CHECK_INTERVAL_S`."""
    return {
        "instance_id": instance_id,
        "address": "127.0.0.1",
        "port": port,
        "check": {
            "kind": "http",
            "http_path": HEALTH_PATH,
            "interval": CHECK_INTERVAL_S,
            "timeout": CHECK_TIMEOUT_S,
        },
    }


def ttl_instance(instance_id: str, port: int) -> dict[str, Any]:
    """An instance with a TTL check long enough not to expire during the bench."""
    return {
        "instance_id": instance_id,
        "address": "127.0.0.1",
        "port": port,
        "check": {"kind": "ttl", "ttl": 3600},
    }


def fill(report: BenchReport, figures: Figures) -> None:
    _fill_discovery(report, figures.discovery)
    _fill_watches(report, figures.watches)
    _fill_health(report, figures.health)


def _fill_discovery(report: BenchReport, found: Discovery) -> None:
    report.add(
        f"discovery over HTTP, {CONCURRENCY} in flight",
        found.http_rate,
        "requests/s",
        limit_name=f"GET /healthz, {CONCURRENCY} in flight",
        limit_value=found.healthz_rate,
    )
    report.add(
        "discovery over HTTP, one at a time, p50", milliseconds(found.http_latencies, 0.5), "ms"
    )
    report.add(
        "discovery over HTTP, one at a time, p99",
        milliseconds(found.http_latencies, 0.99),
        "ms",
        limit_name="GET /healthz, one at a time, p99",
        limit_value=milliseconds(found.healthz_latencies, 0.99),
    )
    for label, share in (("p50", 0.5), ("p99", 0.99)):
        report.add(
            f"cached client pick(), {label}",
            milliseconds(found.cached_picks, share) * 1000,
            "µs",
            limit_name=f"balancer pick alone, {label}",
            limit_value=milliseconds(found.bare_picks, share) * 1000,
        )


def _fill_watches(report: BenchReport, watches: Watches) -> None:
    watched = (
        ("registry change -> RegistryClient woke", watches.registry),
        ("config PUT -> ConfigClient woke", watches.config_client),
        ("config PUT -> LiveConfig woke", watches.live_config),
    )
    for label, share in (("p50", 0.5), ("p99", 0.99)):
        raw = milliseconds(watches.raw_kv, share)
        for name, samples in watched:
            report.add(
                f"{name}, {label}",
                milliseconds(samples, share),
                "ms",
                limit_name=f"raw KV put -> watcher woke, {label}",
                limit_value=raw,
            )
    report.add(
        "registry write call (register / deregister), p50",
        milliseconds(watches.registry_writes, 0.5),
        "ms",
    )
    report.add("config write call (PUT), p50", milliseconds(watches.config_writes, 0.5), "ms")
    report.add("raw KV put -> watcher woke, p50", milliseconds(watches.raw_kv, 0.5), "ms")
    report.add("raw KV put -> watcher woke, p99", milliseconds(watches.raw_kv, 0.99), "ms")


def _fill_health(report: BenchReport, health: HealthCost) -> None:
    every = f"{health.instances:,} HTTP-checked instances every {health.interval_s:g} s"
    report.add(
        f"health checking {every}: platform CPU, net of idle",
        health.net_cpu_percent,
        "% of a core",
        limit_name="bare httpx GETs at the same rate",
        limit_value=health.bare_cpu_percent,
    )
    report.add(f"platform CPU while checking {every}", health.checking_cpu_percent, "% of a core")
    report.add("platform CPU, idle", health.idle_cpu_percent, "% of a core")
    report.add(f"nats-server CPU while checking {every}", health.nats_cpu_percent, "% of a core")
    report.add(
        "probes answered",
        health.probes_per_s,
        "probes/s",
        limit_name="instances / interval",
        limit_value=health.expected_probes_per_s,
    )
    report.add("platform CPU per probe, net of idle", health.net_cpu_per_probe_s * 1000, "ms")
    report.add("bare httpx GET CPU per probe", health.bare_cpu_per_probe_s * 1000, "ms")
    report.add(
        f"registrations with an HTTP check, {CONCURRENCY} in flight",
        health.registrations_per_s,
        "registrations/s",
    )


# --------------------------------------------------------------------------- the run


async def _measure(work_dir: Path, options: BenchOptions) -> Figures:
    figures = Figures()
    endpoints = HealthEndpoints()
    try:
        await _measure_platform(work_dir, endpoints, figures, options)
        rounds = whole_intervals(options.quick)
        with options.step(f"limit: bare httpx GETs, {rounds} x {len(endpoints.ports):,}"):
            figures.health.bare_cpu_per_probe_s = await asyncio.to_thread(
                bare_probe_cpu_s, endpoints.ports, rounds
            )
    finally:
        await endpoints.close()
    return figures


async def _measure_platform(
    work_dir: Path, endpoints: HealthEndpoints, figures: Figures, options: BenchOptions
) -> None:
    with options.step("starting the platform (fleetmesh up)"):
        platform = await PlatformProcess.start(work_dir, database_url=options.database_url)
    try:
        with options.step("letting it settle"):
            await asyncio.sleep(options.pick(3, 0))
        idle_s = options.pick(20, 3)
        with options.step(f"platform CPU, idle for {idle_s} s"):
            figures.health.idle_cpu_percent, _ = await _cpu_over(platform, idle_s)
        async with platform.client() as http:
            figures.discovery = await _discovery(platform, http, options)
            figures.watches = await _watches(platform, http, options)
            await endpoints.start(options.pick(HEALTH_INSTANCES, QUICK_HEALTH_INSTANCES))
            await _health_checking(platform, http, endpoints, figures.health, options)
    finally:
        with options.step("stopping the platform"):
            await platform.stop()


async def _cpu_over(platform: PlatformProcess, seconds: float) -> tuple[float, float]:
    """CPU % of (the platform process, its children) over the next `seconds`."""
    before = platform.cpu_seconds()
    started = time.monotonic()
    await asyncio.sleep(seconds)
    after = platform.cpu_seconds()
    elapsed = time.monotonic() - started
    return (
        cpu_percent(before[0], after[0], elapsed),
        cpu_percent(before[1], after[1], elapsed),
    )


async def _expect(response: Awaitable[httpx.Response], *statuses: int) -> httpx.Response:
    answer = await response
    if answer.status_code not in statuses:
        request = answer.request
        raise BenchError(
            f"{request.method} {request.url.path}: {answer.status_code} {answer.text[:300]}"
        )
    return answer


# --------------------------------------------------------------------------- discovery

ROUNDS = 5
"""Alternating rounds of discovery and its limit: other work on the machine weighs on both alike."""


async def _discovery(
    platform: PlatformProcess, http: httpx.AsyncClient, options: BenchOptions
) -> Discovery:
    found = Discovery()
    discover = f"/api/v1/services/{DISCOVERED}/instances"
    for index in range(DISCOVERY_INSTANCES):
        body = ttl_instance(f"d-{index}", 20_000 + index)
        await _expect(http.post(discover, json=body), 201, 200)
    concurrent = options.pick(5000, 250) // ROUNDS
    with options.step(f"GET discovery and /healthz, {CONCURRENCY} in flight", 2 * ROUNDS) as step:
        spent = {discover: 0.0, "/healthz": 0.0}
        for _ in range(ROUNDS):
            for path in spent:
                spent[path] += await _seconds_for(http, path, concurrent)
                step.advance()
    found.http_rate = concurrent * ROUNDS / spent[discover]
    found.healthz_rate = concurrent * ROUNDS / spent["/healthz"]
    sequential = options.pick(1000, 50)
    with options.step("GET discovery and /healthz, one at a time", sequential) as step:
        for _ in range(sequential):
            found.http_latencies.append(await _latency(http, discover))
            found.healthz_latencies.append(await _latency(http, "/healthz"))
            step.advance()
    with options.step("RegistryClient.pick() and the balancer alone"):
        found.cached_picks, found.bare_picks = await _picks(platform, options.pick(100_000, 5_000))
    return found


async def _seconds_for(http: httpx.AsyncClient, path: str, count: int) -> float:
    """Seconds for `count` GETs of `path`, up to `CONCURRENCY` in flight."""
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await _expect(http.get(path), 200)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(min(CONCURRENCY, count)):
            group.create_task(worker())
    return time.perf_counter() - started


async def _latency(http: httpx.AsyncClient, path: str) -> float:
    started = time.perf_counter()
    await _expect(http.get(path), 200)
    return time.perf_counter() - started


async def _picks(platform: PlatformProcess, count: int) -> tuple[list[float], list[float]]:
    """Seconds per `RegistryClient.pick()` (watched cache) and per bare balancer pick."""
    async with RegistryClient(platform.base_url, platform.api_key) as registry:
        instances = await registry.watch(DISCOVERED)
        if len(instances) != DISCOVERY_INSTANCES:
            raise BenchError(f"the cache holds {len(instances)} instances of {DISCOVERED}")
        balancer = RoundRobinBalancer()
        cached: list[float] = []
        bare: list[float] = []
        for _ in range(count):
            started = time.perf_counter()
            await registry.pick(DISCOVERED)
            picked = time.perf_counter()
            balancer.pick(instances)
            cached.append(picked - started)
            bare.append(time.perf_counter() - picked)
    return cached, bare


# --------------------------------------------------------------------------- watches


class Wakeups:
    """Notes when a watcher was called: `arm()` is a future of the next call's time."""

    def __init__(self) -> None:
        self._pending: asyncio.Future[float] | None = None

    def arm(self) -> asyncio.Future[float]:
        self._pending = asyncio.get_running_loop().create_future()
        return self._pending

    def __call__(self, _value: object = None) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.set_result(time.perf_counter())


async def _arrivals(futures: tuple[asyncio.Future[float], ...], what: str) -> list[float]:
    try:
        return list(await asyncio.wait_for(asyncio.gather(*futures), WAKE_TIMEOUT_S))
    except TimeoutError:
        raise BenchError(f"the {what} did not wake within {WAKE_TIMEOUT_S} s") from None


async def _watches(
    platform: PlatformProcess, http: httpx.AsyncClient, options: BenchOptions
) -> Watches:
    """One sample of each watch in turn, so other work on the machine weighs on all alike."""
    watches = Watches()
    samples = options.pick(200, 20)
    backbone = await _platform_backbone(platform)
    try:
        async with (
            RegistryWatch(platform, http, watches) as registry,
            ConfigWatch(platform, http, backbone, watches) as config,
            RawKvWatch(backbone, watches) as raw,
        ):
            with options.step("watches: registry, config, raw KV", samples) as step:
                for number in range(1, samples + 1):
                    for watch in (registry, config, raw):
                        await watch.sample(number)
                        await asyncio.sleep(WATCH_PAUSE_S)
                    step.advance()
    finally:
        await backbone.close()
    return watches


class RegistryWatch:
    """A TTL instance registered, then deregistered, in turn; a RegistryClient cache watches."""

    def __init__(self, platform: PlatformProcess, http: httpx.AsyncClient, into: Watches) -> None:
        self.http = http
        self.into = into
        self.client = RegistryClient(platform.base_url, platform.api_key)
        self.path = f"/api/v1/services/{WATCHED}/instances"

    async def __aenter__(self) -> RegistryWatch:
        await self.client.watch(WATCHED)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.client.close()

    async def sample(self, number: int) -> None:
        index = self.client.index(WATCHED)
        waiting = asyncio.create_task(self._woken(index))
        await asyncio.sleep(0)  # the waiter is parked before the write starts
        started = time.perf_counter()
        if number % 2:
            await _expect(self.http.post(self.path, json=ttl_instance("w-1", 21_000)), 201)
        else:
            await _expect(self.http.delete(f"{self.path}/w-1"), 200)
        self.into.registry_writes.append(time.perf_counter() - started)
        self.into.registry.append(await waiting - started)

    async def _woken(self, index: int) -> float:
        if await self.client.wait_for_change(WATCHED, index, WAKE_TIMEOUT_S) <= index:
            raise BenchError(f"the RegistryClient did not wake within {WAKE_TIMEOUT_S} s")
        return time.perf_counter()


class ConfigWatch:
    """PUTs of one entry, watched by a ConfigClient (HTTP) and a LiveConfig (KV) at once."""

    def __init__(
        self,
        platform: PlatformProcess,
        http: httpx.AsyncClient,
        backbone: Backbone,
        into: Watches,
    ) -> None:
        self.http = http
        self.into = into
        self.path = f"/api/v1/config/{CONFIG_SERVICE}/{CONFIG_KEY}"
        self.client = ConfigClient(platform.base_url, platform.api_key)
        self.live = LiveConfig(backbone)
        self.by_http, self.by_kv = Wakeups(), Wakeups()

    async def __aenter__(self) -> ConfigWatch:
        await _expect(self.http.put(self.path, json={"value": 0}), 201, 200)
        await self.live.start()
        self.live.on_change(CONFIG_SERVICE, CONFIG_KEY, self.by_kv)
        self.client.on_change(CONFIG_SERVICE, CONFIG_KEY, self.by_http)
        await self.client.follow(CONFIG_SERVICE, CONFIG_KEY)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.client.close()
        await self.live.stop()

    async def sample(self, number: int) -> None:
        arrivals = (self.by_http.arm(), self.by_kv.arm())
        started = time.perf_counter()
        await _expect(self.http.put(self.path, json={"value": number}), 200)
        self.into.config_writes.append(time.perf_counter() - started)
        by_http, by_kv = await _arrivals(arrivals, "config watchers")
        self.into.config_client.append(by_http - started)
        self.into.live_config.append(by_kv - started)


class RawKvWatch:
    """The limit: a put into a KV bucket of the same nats-server, a watcher of the key waking."""

    def __init__(self, backbone: Backbone, into: Watches) -> None:
        self.backbone = backbone
        self.into = into
        self.woke = Wakeups()
        self._following: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawKvWatch:
        self.kv = await self.backbone.ensure_kv(RAW_BUCKET, history=1)
        self.watcher = await self.kv.watch(RAW_KEY)
        self._following = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following
        await self.watcher.stop()  # type: ignore[no-untyped-call]

    async def _follow(self) -> None:
        async for entry in self.watcher:
            if entry is not None:
                self.woke()

    async def sample(self, number: int) -> None:
        arrival = self.woke.arm()
        started = time.perf_counter()
        await self.kv.put(RAW_KEY, str(number).encode())
        [at] = await _arrivals((arrival,), "raw KV watcher")
        self.into.raw_kv.append(at - started)


async def _platform_backbone(platform: PlatformProcess) -> Backbone:
    """A connection to the platform's nats-server as its service user (the bench's own data dir)."""
    secrets_path = platform.data_dir / "nats" / "secrets.json"
    if not secrets_path.exists():
        raise BenchError(f"no NATS secrets at {secrets_path}")
    secrets = NatsSecrets.load_or_create(secrets_path)
    endpoint = NatsEndpoint(
        servers=[platform.nats_url], user=SERVICE_USER, password=secrets.service_password
    )
    backbone = Backbone(endpoint, name="fleetmesh-bench")
    await backbone.connect()
    return backbone


# --------------------------------------------------------------------------- health checking


class HealthEndpoints:
    """Minimal HTTP/1.1 servers on loopback, one port each, answering every request 200."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.requests = 0
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, count: int) -> HealthEndpoints:
        for _ in range(count):
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self._servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        self._servers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")  # probes are GETs: no body
                self.requests += 1
                writer.write(HEALTHY_RESPONSE)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()


HEALTHY_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n"
    b'{"status":"ok"}'
)


async def _health_checking(
    platform: PlatformProcess,
    http: httpx.AsyncClient,
    endpoints: HealthEndpoints,
    health: HealthCost,
    options: BenchOptions,
) -> None:
    health.instances = len(endpoints.ports)
    health.registrations_per_s = await _register_checked(http, endpoints.ports, options)
    intervals = whole_intervals(options.quick)
    # Each instance is probed one interval after its registration, then every
    # interval: a window of whole intervals that starts half an interval from
    # now sees each instance probed once per interval, its probes far from the
    # window's edges (so a late probe is not lost off the end).
    with options.step("half an interval until the first probes"):
        await asyncio.sleep(health.interval_s / 2)
    seconds = intervals * health.interval_s
    answered = endpoints.requests
    with options.step(f"platform CPU while checking, {intervals} x {health.interval_s:g} s"):
        started = time.monotonic()
        health.checking_cpu_percent, health.nats_cpu_percent = await _cpu_over(platform, seconds)
        health.window_s = time.monotonic() - started
    health.probes_answered = endpoints.requests - answered


async def _register_checked(
    http: httpx.AsyncClient, ports: list[int], options: BenchOptions
) -> float:
    """Register one HTTP-checked instance per port (each is probed once on registration)."""
    bodies = iter(http_check_instance(f"hc-{index:05d}", port) for index, port in enumerate(ports))
    path = f"/api/v1/services/{CHECKED}/instances"

    async def worker() -> None:
        for body in bodies:
            await _expect(http.post(path, json=body), 201)
            step.advance()

    with options.step(f"registering {len(ports):,} HTTP-checked instances", len(ports)) as step:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(CONCURRENCY):
                group.create_task(worker())
        elapsed = time.perf_counter() - started
    return len(ports) / elapsed


def bare_probe_cpu_s(ports: list[int], rounds: int) -> float:
    """CPU seconds per GET of a bare httpx client probing every port in turn.

    Runs its own event loop: call it on a thread of its own (the servers keep
    answering on the caller's loop), whose CPU time is all that is counted.
    """
    return asyncio.run(_bare_probes(ports, rounds))


async def _bare_probes(ports: list[int], rounds: int) -> float:
    connections = httpx.Limits(
        max_connections=PROBER_CONNECTIONS, max_keepalive_connections=PROBER_KEEPALIVE
    )
    urls = [f"http://127.0.0.1:{port}{HEALTH_PATH}" for port in ports]
    async with httpx.AsyncClient(limits=connections, follow_redirects=False) as client:
        started = time.thread_time()
        for url in itertools.chain.from_iterable(itertools.repeat(urls, rounds)):
            response = await client.get(url, timeout=CHECK_TIMEOUT_S)
            if not response.is_success:
                raise BenchError(f"GET {url}: {response.status_code}")
        used = time.thread_time() - started
    return used / max(1, rounds * len(urls))
