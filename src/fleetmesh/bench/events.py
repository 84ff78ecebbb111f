"""`fleetmesh bench events`: publish -> webhook delivered, beside raw JetStream and raw HTTP.

The platform runs as users run it: a `fleetmesh up --allow-private-webhooks`
subprocess (with its nats-server child) on a temporary data dir, SQLite by
default or the PostgreSQL database given. The bench process publishes over
HTTP and runs the webhook receiver (a minimal asyncio HTTP/1.1 server on
loopback, keep-alive); a delivery's latency is from the start of its
`POST /api/v1/events` to the receiver reading the webhook request.

- fixed rates: single events (binary mode) at `LOW_RATE`/s, then `RATE`/s, for
  a while each: delivered events/s and the latency percentiles;
- saturation, single events: `CONCURRENCY` publishers in flight, one webhook
  request per event;
- saturation, batched: `BATCH` events per publish call (batched mode) to a
  subscription with `batch_size` = `BATCH` (one webhook request per batch).

Beside them, measured in the same run after the platform stopped: raw
JetStream (a plain nats-server, a file stream, async publishes and a pull
consumer acking every message: no fleetmesh code) and raw HTTP (httpx POSTs
to the same receiver, `HTTP_IN_FLIGHT` in flight, like a subscription's default).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from fleetmesh.bench.platform import BenchError, PlatformProcess, percentile
from fleetmesh.bench.report import BenchOptions, BenchReport, machine_info
from fleetmesh.core.nats_server import die_with_parent, nats_server_binary
from fleetmesh.core.ports import free_port

NAME = "events"
RATE = 500
LOW_RATE = 100
CONCURRENCY = 32
HTTP_IN_FLIGHT = 8
BATCH = 100
EVENT_TYPE = "com.fleetmesh.bench.reading"
TARGET_RATE = 5000.0
TARGET_P99_MS = 20.0
_PR_SET_PDEATHSIG = 1


async def run(options: BenchOptions) -> BenchReport:
    """Events/s and latency from publish to webhook delivered, beside raw JetStream and HTTP."""
    report = BenchReport(NAME)
    with tempfile.TemporaryDirectory(prefix="fleetmesh-bench-events-") as tmp:
        async with _bench_heap_frozen():
            figures = await _measure_platform(Path(tmp), options)
            raw_js = await _raw_jetstream(Path(tmp), options.pick(100_000, 5_000), options)
            raw_http = await _raw_http(options.pick(10_000, 500), options)
    _fill(report, figures, raw_js, raw_http)
    report.machine = machine_info()
    return report


async def run_events_bench(quick: bool) -> list[dict[str, Any]]:
    """The same bench as plain rows, for callers without the bench framework."""
    report = await run(BenchOptions(quick=quick))
    return [result.to_dict() for result in report.results]


# --------------------------------------------------------------------------- receiver


@dataclass
class Receiver:
    """A webhook endpoint that notes when each event arrived (by `ce-id` or batch body)."""

    arrived: dict[str, float] = field(default_factory=dict)
    requests: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                now = time.monotonic()
                headers = _headers(head)
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                self.requests += 1
                event_id = headers.get(b"ce-id")
                if event_id is not None:
                    self.arrived.setdefault(event_id.decode(), now)
                elif body.startswith(b"["):
                    for event in json.loads(body):
                        self.arrived.setdefault(str(event.get("id")), now)
                writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()


def _headers(head: bytes) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return headers


class Publisher:
    """A minimal HTTP/1.1 keep-alive client for publishing (cheaper than httpx per request).

    The bench publishes from the same process that receives the webhooks, so its
    own overhead is kept low; the platform's webhook client is httpx, measured
    alone as a limit.
    """

    def __init__(self, port: int, key: str, connections: int) -> None:
        self.port = port
        self.key = key
        self.size = connections
        self._idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        self._idle = asyncio.Queue()
        self._all: list[asyncio.StreamWriter] = []

    async def open(self) -> Publisher:
        for _ in range(self.size):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            self._all.append(writer)
            self._idle.put_nowait((reader, writer))
        return self

    async def close(self) -> None:
        for writer in self._all:
            writer.close()

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """POST on an idle connection; one closed by the server meanwhile is reopened.

        Retrying is safe: events are deduplicated on their id.
        """
        lines = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", f"authorization: Bearer {self.key}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"content-length: {len(body)}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        reader, writer = await self._idle.get()
        try:
            return await _exchange(reader, writer, request)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            self._all.append(writer)
            return await _exchange(reader, writer, request)
        finally:
            self._idle.put_nowait((reader, writer))


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(_headers(head).get(b"content-length", b"0"))
    return status, await reader.readexactly(length)


def _per_event(
    before: tuple[float, float], after: tuple[float, float], events: int
) -> tuple[float, float]:
    """Milliseconds of CPU per event of (the platform process, nats-server)."""
    count = max(events, 1)
    return (after[0] - before[0]) * 1000 / count, (after[1] - before[1]) * 1000 / count


# --------------------------------------------------------------------------- measurements


@contextlib.asynccontextmanager
async def _bench_heap_frozen() -> AsyncIterator[None]:
    """Keep the bench process's own heap out of its full garbage collections.

    The bench imports every benchmark; a full collection of that heap pauses
    the bench for ~120 ms (several times a second under the batched and raw
    JetStream loads): counted as delivery latency, or slowing the limits.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass
class Run:
    """One load: when each event was sent, when it arrived."""

    sent: dict[str, float] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0
    lost: int = 0

    def rate(self, arrived: dict[str, float]) -> float:
        last = max((arrived[i] for i in self.sent if i in arrived), default=self.started)
        delivered = sum(1 for i in self.sent if i in arrived)
        return delivered / max(last - self.started, 1e-9)

    def latencies_ms(self, arrived: dict[str, float]) -> list[float]:
        return sorted((arrived[i] - t) * 1000 for i, t in self.sent.items() if i in arrived)


@dataclass
class Figures:
    fixed: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)
    fixed_cpu: dict[int, float] = field(default_factory=dict)
    """Offered rate -> the platform process's CPU, % of one core, while under that load."""
    single: tuple[float, float, float] = (0.0, 0.0, 0.0)
    batched: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cpu_single: tuple[float, float] = (0.0, 0.0)
    cpu_batched: tuple[float, float] = (0.0, 0.0)
    lost: int = 0


async def _measure_platform(work_dir: Path, options: BenchOptions) -> Figures:
    figures = Figures()
    with options.step("starting the platform (fleetmesh up)"):
        platform = await PlatformProcess.start(
            work_dir,
            database_url=options.database_url,
            extra_args=("--allow-private-webhooks",),
        )
    receiver = await Receiver().start()
    publisher = await Publisher(platform.port, platform.api_key, CONCURRENCY).open()
    try:
        async with platform.client() as client:
            await _setup(client, receiver)
            await _warm_up(publisher, receiver)
            runs: list[Run] = []
            for rate in (LOW_RATE, RATE):
                before = platform.cpu_seconds()
                fixed = await _at_rate(publisher, rate, options.pick(10, 2), options)
                used = platform.cpu_seconds()[0] - before[0]
                figures.fixed_cpu[rate] = used * 100 / max(fixed.finished - fixed.started, 1e-9)
                await _settle(receiver, fixed)
                lat = fixed.latencies_ms(receiver.arrived)
                figures.fixed[rate] = (
                    fixed.rate(receiver.arrived),
                    len(fixed.sent) / max(fixed.finished - fixed.started, 1e-9),
                    percentile(lat, 0.50),
                    percentile(lat, 0.99),
                )
                runs.append(fixed)
            before = platform.cpu_seconds()
            single = await _saturate_single(publisher, options.pick(10_000, 500), options)
            await _settle(receiver, single)
            figures.cpu_single = _per_event(before, platform.cpu_seconds(), len(single.sent))
            lat = single.latencies_ms(receiver.arrived)
            figures.single = (
                single.rate(receiver.arrived),
                percentile(lat, 0.50),
                percentile(lat, 0.99),
            )
            await _subscribe(client, receiver, batch_size=BATCH, types=[f"{EVENT_TYPE}.batched"])
            before = platform.cpu_seconds()
            batched = await _saturate_batched(publisher, options.pick(50_000, 2_000), options)
            await _settle(receiver, batched)
            figures.cpu_batched = _per_event(before, platform.cpu_seconds(), len(batched.sent))
            lat = batched.latencies_ms(receiver.arrived)
            figures.batched = (
                batched.rate(receiver.arrived),
                percentile(lat, 0.50),
                percentile(lat, 0.99),
            )
            figures.lost = sum(
                1 for run in (*runs, single, batched) for i in run.sent if i not in receiver.arrived
            )
    finally:
        with options.step("stopping the platform"):
            await publisher.close()
            await platform.stop()
            await receiver.close()
    return figures


async def _setup(client: httpx.AsyncClient, receiver: Receiver) -> None:
    for event_type in (EVENT_TYPE, f"{EVENT_TYPE}.batched"):
        response = await client.post(
            "/api/v1/event-contracts",
            json={
                "type": event_type,
                "schema": {
                    "type": "object",
                    "required": ["seq"],
                    "properties": {"seq": {"type": "integer"}, "temp": {"type": "number"}},
                },
            },
        )
        if response.status_code not in (200, 201):
            raise BenchError(f"registering the contract: {response.status_code} {response.text}")
    await _subscribe(client, receiver, batch_size=1, types=[EVENT_TYPE])


async def _subscribe(
    client: httpx.AsyncClient, receiver: Receiver, *, batch_size: int, types: list[str]
) -> None:
    response = await client.post(
        "/api/v1/subscriptions",
        json={"endpoint": receiver.url, "types": types, "delivery": {"batch_size": batch_size}},
    )
    if response.status_code != 201:
        raise BenchError(f"subscribing: {response.status_code} {response.text}")


_counter = iter(range(1, 10**12))


def _binary(event_type: str = EVENT_TYPE) -> tuple[str, dict[str, str], bytes]:
    sequence = next(_counter)
    event_id = f"bench-{sequence}"
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "/bench",
        "ce-type": event_type,
        "ce-subject": f"sensor-{sequence % 100}",
        "content-type": "application/json",
    }
    return event_id, headers, json.dumps({"seq": sequence, "temp": 21.5}).encode()


async def _publish_one(publisher: Publisher, run: Run) -> None:
    event_id, headers, body = _binary()
    run.sent[event_id] = time.monotonic()
    status, answer = await publisher.post("/api/v1/events", headers, body)
    if status != 202:
        raise BenchError(f"POST /api/v1/events: {status} {answer[:300]!r}")


async def _warm_up(publisher: Publisher, receiver: Receiver) -> None:
    warm = Run(started=time.monotonic())
    await asyncio.gather(*(_publish_one(publisher, warm) for _ in range(50)))
    await _settle(receiver, warm)


async def _at_rate(publisher: Publisher, rate: int, seconds: int, options: BenchOptions) -> Run:
    total = rate * seconds
    run = Run()
    tasks: list[asyncio.Task[None]] = []
    with options.step(f"single events at {rate}/s for {seconds} s", total) as step:
        run.started = time.monotonic()
        for index in range(total):
            delay = run.started + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_publish_one(publisher, run))
            task.add_done_callback(lambda _: step.advance())
            tasks.append(task)
        await asyncio.gather(*tasks)
        run.finished = time.monotonic()
    return run


async def _saturate_single(publisher: Publisher, count: int, options: BenchOptions) -> Run:
    run = Run()
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await _publish_one(publisher, run)
            step.advance()

    with options.step(f"single events, {CONCURRENCY} publishers in flight", count) as step:
        run.started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        run.finished = time.monotonic()
    return run


async def _saturate_batched(publisher: Publisher, count: int, options: BenchOptions) -> Run:
    run = Run()
    event_type = f"{EVENT_TYPE}.batched"
    calls = count // BATCH
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            batch = []
            for _ in range(BATCH):
                event_id, headers, body = _binary(event_type)
                batch.append(
                    {
                        **{k[3:]: v for k, v in headers.items() if k.startswith("ce-")},
                        "data": json.loads(body),
                    }
                )
            now = time.monotonic()
            for event in batch:
                run.sent[event["id"]] = now
            status, answer = await publisher.post(
                "/api/v1/events",
                {"content-type": "application/cloudevents-batch+json"},
                json.dumps(batch).encode(),
            )
            if status != 202:
                raise BenchError(f"batch publish: {status} {answer[:300]!r}")
            step.advance(BATCH)

    with options.step(f"batches of {BATCH}, 4 publishers in flight", calls * BATCH) as step:
        run.started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(4)))
        run.finished = time.monotonic()
    return run


async def _settle(receiver: Receiver, run: Run, timeout: float = 60.0) -> None:
    """Wait until every event of the run arrived (or nothing arrived for a while)."""
    deadline = time.monotonic() + timeout
    last_count, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = sum(1 for i in run.sent if i in receiver.arrived)
        if count == len(run.sent):
            return
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > 10:
            return
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- limits


async def _raw_jetstream(work_dir: Path, count: int, options: BenchOptions) -> float:
    """Messages/s through a plain file stream: async publishes + a pull consumer acking each."""
    port = free_port()
    store = work_dir / "raw-js"
    server = subprocess.Popen(
        [str(nats_server_binary()), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    try:
        nc = await _connect(f"nats://127.0.0.1:{port}")
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name="RAW", subjects=["raw.>"]))
            await js.add_consumer(
                "RAW", ConsumerConfig(durable_name="raw", ack_policy=AckPolicy.EXPLICIT)
            )
            subscription = await js.pull_subscribe_bind("raw", stream="RAW")
            payload = b'{"seq":1,"temp":21.5}' * 4
            with options.step("limit: raw JetStream publish + consume", count) as step:
                started = time.monotonic()

                async def produce() -> None:
                    for chunk in _chunks(range(count), 500):
                        await asyncio.gather(
                            *(js.publish(f"raw.s{i % 100}", payload) for i in chunk)
                        )

                async def consume() -> None:
                    received = 0
                    while received < count:
                        with contextlib.suppress(nats.errors.TimeoutError):
                            for message in await subscription.fetch(500, timeout=1):
                                await message.ack()
                                received += 1
                                step.advance()

                await asyncio.gather(produce(), consume())
                elapsed = time.monotonic() - started
        finally:
            await nc.close()
    finally:
        server.terminate()
        await asyncio.to_thread(server.wait, 10)
    return count / elapsed


async def _connect(url: str) -> Any:
    deadline = time.monotonic() + 10
    while True:
        try:
            return await nats.connect(url, connect_timeout=1, error_cb=_ignore)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _raw_http(count: int, options: BenchOptions) -> float:
    """Requests/s of httpx POSTs to the receiver, `HTTP_IN_FLIGHT` in flight (no fleetmesh)."""
    receiver = await Receiver().start()
    remaining = count
    body = json.dumps({"seq": 1, "temp": 21.5}).encode()
    limits = httpx.Limits(max_connections=HTTP_IN_FLIGHT, max_keepalive_connections=HTTP_IN_FLIGHT)
    try:
        async with httpx.AsyncClient(limits=limits) as client:

            async def poster() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await client.post(receiver.url, content=body)
                    step.advance()

            with options.step(f"limit: raw httpx POSTs, {HTTP_IN_FLIGHT} in flight", count) as step:
                started = time.monotonic()
                await asyncio.gather(*(poster() for _ in range(HTTP_IN_FLIGHT)))
                elapsed = time.monotonic() - started
    finally:
        await receiver.close()
    return count / elapsed


async def _ignore(_error: Exception) -> None:
    """The server may still be starting: `_connect` retries instead of logging."""


def _chunks(items: Iterable[int], size: int) -> list[list[int]]:
    values = list(items)
    return [values[i : i + size] for i in range(0, len(values), size)]


def _fill(report: BenchReport, figures: Figures, raw_js: float, raw_http: float) -> None:
    js_name = "raw JetStream publish+consume msgs/s"
    http_name = f"raw httpx POSTs/s, {HTTP_IN_FLIGHT} in flight"
    for offered_rate, (delivered, offered, p50, p99) in figures.fixed.items():
        report.add(
            f"delivered at {offered_rate}/s offered (single events)",
            delivered,
            "events/s",
            limit_name="offered rate",
            limit_value=offered,
        )
        report.add(f"latency p50 at {offered_rate}/s", p50, "ms")
        report.add(
            f"latency p99 at {offered_rate}/s",
            p99,
            "ms",
            limit_name="target",
            limit_value=TARGET_P99_MS,
        )
        report.add(
            f"platform process CPU at {offered_rate}/s",
            figures.fixed_cpu.get(offered_rate, 0.0),
            "% of a core",
        )
    rate, p50, p99 = figures.single
    name = f"delivered at saturation, single events ({CONCURRENCY} publishers)"
    report.add(name, rate, "events/s", limit_name=js_name, limit_value=raw_js)
    report.add(f"{name} (vs HTTP)", rate, "events/s", limit_name=http_name, limit_value=raw_http)
    report.add("latency p50 at saturation, single events", p50, "ms")
    report.add("latency p99 at saturation, single events", p99, "ms")
    rate, p50, p99 = figures.batched
    name = f"delivered at saturation, batches of {BATCH}"
    report.add(name, rate, "events/s", limit_name=js_name, limit_value=raw_js)
    report.add(
        f"{name} (vs target)", rate, "events/s", limit_name="target", limit_value=TARGET_RATE
    )
    report.add(f"latency p50 at saturation, batches of {BATCH}", p50, "ms")
    report.add(f"latency p99 at saturation, batches of {BATCH}", p99, "ms")
    for label, (python, server) in (
        ("single events", figures.cpu_single),
        (f"batches of {BATCH}", figures.cpu_batched),
    ):
        report.add(f"platform process CPU per event, {label}", python, "ms")
        report.add(f"nats-server CPU per event, {label}", server, "ms")
    report.add("events not delivered", float(figures.lost), "events")
    report.add(js_name, raw_js, "msgs/s")
    report.add(http_name, raw_http, "requests/s")
