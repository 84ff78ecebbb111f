"""The load of `fleetmesh bench ingest`: what it sends over HTTP and MQTT, and how it counts.

Shapes (pure): an HTTP batch is `SAMPLES_PER_BATCH` compact samples of the simulator's
four metrics (1,000 points); an MQTT message is one point. `limit_rows` turns the HTTP
load into the rows the writer stores, so the raw-storage ceilings write the same rows.

Senders: devices post their own batches, encoded before the clock runs, with HTTP Basic
auth through the simulator's `HttpSender` (aiohttp; it retries a 503 after its
Retry-After); over MQTT each device is its own
paho connection (QoS 1, `MQTT_IN_FLIGHT` unacknowledged publishes at most, paho's
default). The plain pipe has the MQTT load's shape without fleetmesh: the same devices and
connections, each publishing QoS 1 on a topic of its own that it is subscribed to at QoS 1,
through the same MQTT listener. Publisher and subscriber share a connection because the
login callout lets a device use only `devices/<its id>/...` and only with client id =
device id, so a second connection could neither subscribe to the first one's topic nor
share its id.

Counting: the writer's counter (`fleetmesh_telemetry_points_stored_total` on `/metrics`)
tells when the accepted points are stored; the stored points are then counted back
through the query API (`simulator.count_stored`), which is what `lost` is made of.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from fleetmesh.bench.platform import BenchError, PlatformProcess
from fleetmesh.core.ids import new_id
from fleetmesh.telemetry.contracts import WirePoint
from fleetmesh.telemetry.simulator import (
    METRICS,
    Counters,
    HttpSender,
    basic_auth,
    sender_session,
)
from fleetmesh.telemetry.tables import PointRow, point_row

SAMPLES_PER_BATCH = 250
POINTS_PER_BATCH = SAMPLES_PER_BATCH * len(METRICS)
MQTT_IN_FLIGHT = 20
STORED_METRIC = "fleetmesh_telemetry_points_stored_total"
LAST_STORED_METRIC = "fleetmesh_telemetry_last_stored_timestamp_seconds"
MQTT_HOST = "127.0.0.1"
CONNECT_TIMEOUT_S = 30.0
POLL_MIN_S = 0.05
POLL_MAX_S = 1.0

Secrets = dict[str, str]


# --------------------------------------------------------------------------- shapes


def sample_values(n: int) -> dict[str, float | int]:
    """The values of a device's n-th sample: inside the simulated sensor type's ranges."""
    return {
        "temperature": 20.0 + (n % 50) / 10,
        "humidity": 40.0 + n % 30,
        "battery": 90.0 - (n % 20) / 10,
        "fault": 0,
    }


def batch_items(start_ms: int, first_sample: int, samples: int) -> list[dict[str, Any]]:
    """Compact samples `{"ts", "values"}`, one millisecond apart, from `first_sample` on."""
    return [
        {"ts": start_ms + n, "values": sample_values(n)}
        for n in range(first_sample, first_sample + samples)
    ]


def batch_rows(device_id: str, message_id: str, items: list[dict[str, Any]]) -> list[PointRow]:
    """The `telemetry_points` rows the writer stores for one accepted batch."""
    rows: list[PointRow] = []
    for item in items:
        for metric, value in item["values"].items():
            point = WirePoint(len(rows), metric, value, item["ts"], 1.0)
            rows.append(point_row(device_id, message_id, point))
    return rows


def limit_rows(device_ids: Sequence[str], batches: int, start_ms: int) -> list[PointRow]:
    """The HTTP load's rows in the order they arrive: batch after batch, devices interleaved."""
    rows: list[PointRow] = []
    for batch in range(batches):
        for device_id in device_ids:
            items = batch_items(start_ms, batch * SAMPLES_PER_BATCH, SAMPLES_PER_BATCH)
            rows.extend(batch_rows(device_id, new_id(), items))
    return rows


def one_point(n: int, start_ms: int) -> bytes:
    """The n-th MQTT message of a device: one temperature point."""
    point = {"metric": "temperature", "value": 20.0 + n % 50, "ts": start_ms + n}
    return json.dumps(point).encode()


def option_value(command: Sequence[object], option: str) -> str:
    """The value after `option` in a command line, e.g. a port of `fleetmesh up`."""
    words = [str(word) for word in command]
    if option not in words[:-1]:
        raise BenchError(f"{option} is not in the command line")
    return words[words.index(option) + 1]


def mqtt_port(platform: PlatformProcess) -> int:
    """The MQTT listener's port of a platform the bench started."""
    command = platform.process.args
    if not isinstance(command, list):
        raise BenchError("the platform's command line is not a list")
    return int(option_value(command, "--mqtt-port"))


def next_poll_s(remaining: float, rate: float | None) -> float:
    """How long to wait before looking at the writer's counter again.

    A quarter of the time the rest should take at the rate seen so far, within
    [`POLL_MIN_S`, `POLL_MAX_S`]: rendering `/metrics` costs the platform CPU, so it is
    looked at often only near the end (the end time itself is the writer's last commit).
    """
    if rate is None:
        return POLL_MIN_S
    if rate <= 0:
        return POLL_MAX_S
    return min(POLL_MAX_S, max(POLL_MIN_S, remaining / rate / 4))


def metric_value(exposition: str, name: str) -> float:
    """A sample of the Prometheus text format without labels; 0 when absent."""
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


# --------------------------------------------------------------------------- outcomes


@dataclass
class Throughput:
    """One load: what was accepted, when it was all stored, and what that cost."""

    sent: int = 0
    accepted: int = 0
    stored: int = 0
    """Counted back through the query API once the load was over."""
    accepted_s: float = 0.0
    """From the first send to the last acknowledgement (202 or PUBACK)."""
    stored_s: float = 0.0
    """From the first send to the writer having stored the last accepted point."""
    platform_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    """The bench process itself (the HTTP and MQTT clients) competes for the same cores."""

    @property
    def rate(self) -> float:
        """Accepted units stored per second."""
        return self.accepted / self.stored_s if self.stored_s > 0 else 0.0

    @property
    def accepted_rate(self) -> float:
        return self.accepted / self.accepted_s if self.accepted_s > 0 else 0.0

    @property
    def lost(self) -> int:
        return max(0, self.accepted - self.stored)

    @property
    def duplicated(self) -> int:
        return max(0, self.stored - self.accepted)

    def cpu_ms_per(self, units: int) -> tuple[float, float, float]:
        """(platform process, nats-server, bench) CPU milliseconds per `units` accepted."""
        if not self.accepted:
            return 0.0, 0.0, 0.0
        scale = 1000.0 * units / self.accepted
        return (
            self.platform_cpu_s * scale,
            self.server_cpu_s * scale,
            self.client_cpu_s * scale,
        )


class CpuMeter:
    """CPU seconds the platform's processes and the bench use from enter to exit."""

    def __init__(self, platform: PlatformProcess, into: Throughput) -> None:
        self.platform = platform
        self.into = into
        self._before = (0.0, 0.0, 0.0)

    def _now(self) -> tuple[float, float, float]:
        python, server = self.platform.cpu_seconds()
        return python, server, time.process_time()

    def __enter__(self) -> CpuMeter:
        self._before = self._now()
        return self

    def __exit__(self, *_: object) -> None:
        after = self._now()
        self.into.platform_cpu_s = after[0] - self._before[0]
        self.into.server_cpu_s = after[1] - self._before[1]
        self.into.client_cpu_s = after[2] - self._before[2]


# --------------------------------------------------------------------------- counting


async def points_stored(api: httpx.AsyncClient) -> float:
    """The writer's counter of stored points (this platform process's lifetime)."""
    return (await stored_progress(api))[0]


async def stored_progress(api: httpx.AsyncClient) -> tuple[float, float]:
    """The writer's counter of stored points and the Unix time of its last commit."""
    answer = await api.get("/metrics")
    answer.raise_for_status()
    return metric_value(answer.text, STORED_METRIC), metric_value(answer.text, LAST_STORED_METRIC)


async def wait_stored(api: httpx.AsyncClient, target: float, *, stall_s: float) -> float:
    """`time.perf_counter()` of the writer's last commit once the counter reached `target`
    points, or of when the counter last moved.

    The counter is looked at now and then (rendering `/metrics` costs the platform CPU);
    the moment is read from the time of the writer's last commit, so it does not depend
    on when the counter was looked at (a commit after the one that reached `target` can
    only make it later, never earlier). Gives up when the counter has not moved for
    `stall_s`: what is missing then shows as lost rather than as a bench that never ends.
    """
    last_value, last_change = -1.0, time.perf_counter()
    previous: tuple[float, float] | None = None
    while True:
        value, last_commit = await stored_progress(api)
        now = time.perf_counter()
        if value >= target:
            return on_perf_counter(last_commit, now, time.time()) if last_commit else now
        if value != last_value:
            last_value, last_change = value, now
        elif now - last_change > stall_s:
            return last_change
        rate = (value - previous[1]) / (now - previous[0]) if previous else None
        previous = (now, value)
        await asyncio.sleep(next_poll_s(target - value, rate))


def on_perf_counter(unix_time: float, perf_now: float, unix_now: float) -> float:
    """A past Unix time on the `time.perf_counter()` scale (never later than now)."""
    return perf_now - max(0.0, unix_now - unix_time)


# --------------------------------------------------------------------------- HTTP


def http_bodies(devices: Sequence[str], batches: int, start_ms: int) -> dict[str, list[bytes]]:
    """Each device's `batches` batches, encoded before the clock runs: the devices of a
    fleet make their data on their own hardware, not on the platform's cores."""
    encoded = [
        msgspec.json.encode(batch_items(start_ms, batch * SAMPLES_PER_BATCH, SAMPLES_PER_BATCH))
        for batch in range(batches)
    ]
    return dict.fromkeys(devices, encoded)


async def http_batches(
    base_url: str,
    devices: Secrets,
    bodies: dict[str, list[bytes]],
    *,
    on_batch: Callable[[int], None],
) -> tuple[Counters, float]:
    """Every device posts its batches one after the other, all devices at once.

    Returns the sender's counters and when the last batch was acknowledged.
    """
    counters = Counters()
    async with sender_session() as session:
        sender = HttpSender(session, base_url, counters, give_up_s=60.0)

        async def device(device_id: str, secret: str) -> None:
            for body in bodies[device_id]:
                await sender.send_encoded(device_id, secret, body, POINTS_PER_BATCH)
                on_batch(POINTS_PER_BATCH)

        await asyncio.gather(*(device(i, s) for i, s in devices.items()))
        acknowledged = time.perf_counter()
    if counters.failed or counters.refused_messages:
        raise BenchError(
            f"HTTP ingest refused {counters.refused_messages} batches,"
            f" gave up on {counters.failed} points"
        )
    return counters, acknowledged


async def http_latencies(
    api: httpx.AsyncClient,
    device_id: str,
    secret: str,
    count: int,
    start_ms: int,
    *,
    on_request: Callable[[int], None],
) -> tuple[list[float], int]:
    """Sequential `?wait=stored` posts of one sample: (latencies in s, answers not stored)."""
    latencies: list[float] = []
    not_stored = 0
    headers = {"Authorization": basic_auth(device_id, secret), "Content-Type": "application/json"}
    for n in range(count):
        body = json.dumps({"ts": start_ms + n, "values": sample_values(n)})
        sent = time.perf_counter()
        answer = await api.post(
            f"/api/v1/devices/{device_id}/telemetry",
            content=body,
            params={"wait": "stored"},
            headers=headers,
        )
        latencies.append(time.perf_counter() - sent)
        if answer.status_code != 202:
            raise BenchError(f"?wait=stored post: {answer.status_code} {answer.text[:300]}")
        if answer.json().get("stored") is not True:
            not_stored += 1
        on_request(1)
    return latencies, not_stored


# --------------------------------------------------------------------------- MQTT


def _device_client(device_id: str, secret: str) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=True)
    client.username_pw_set(device_id, secret)
    client.max_inflight_messages_set(MQTT_IN_FLIGHT)
    return client


def _connect(client: paho.Client, port: int, device_id: str) -> None:
    """Connect and start the network thread; raise unless the login was accepted."""
    answered = threading.Event()
    codes: list[Any] = []

    def on_connect(_c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        codes.append(reason)
        answered.set()

    client.on_connect = on_connect
    client.connect(MQTT_HOST, port, keepalive=60)
    client.loop_start()
    if not answered.wait(CONNECT_TIMEOUT_S) or codes[0].is_failure:
        _close(client)
        raise BenchError(f"MQTT login of {device_id} refused: {codes}")


def _close(client: paho.Client) -> None:
    client.disconnect()
    client.loop_stop()


class _Countdown:
    """Counts callbacks from paho's threads; `wait` returns once `total` arrived or stalled."""

    def __init__(self, total: int, on_step: Callable[[int], None] | None = None) -> None:
        self.total = total
        self.count = 0
        self.last_at = time.perf_counter()
        self._on_step = on_step
        self._lock = threading.Lock()
        self._done = threading.Event()

    def tick(self, *_: Any) -> None:
        with self._lock:
            self.count += 1
            self.last_at = time.perf_counter()
            if self.count >= self.total:
                self._done.set()
        if self._on_step is not None:
            self._on_step(1)

    def wait(self, stall_s: float) -> None:
        seen = -1
        while not self._done.wait(min(stall_s, 1.0)):
            if self.count == seen and time.perf_counter() - self.last_at > stall_s:
                return
            seen = self.count


def mqtt_devices(
    port: int,
    devices: Secrets,
    messages: int,
    start_ms: int,
    *,
    stall_s: float,
    on_puback: Callable[[int], None] | None = None,
) -> tuple[int, float, float]:
    """Every device publishes `messages` one-point messages at QoS 1 on its telemetry topic.

    Blocking (run it in a thread). Returns (PUBACKs, first publish, last PUBACK) as
    `time.perf_counter()` values.
    """
    pubacks = _Countdown(len(devices) * messages, on_puback)

    def count_pubacks(client: paho.Client, _device_id: str) -> None:
        client.on_publish = pubacks.tick

    started = _publish_rounds(
        port, devices, messages, start_ms, _telemetry_topic, count_pubacks, pubacks, stall_s
    )
    return pubacks.count, started, pubacks.last_at


def mqtt_pipe(
    port: int,
    devices: Secrets,
    messages: int,
    *,
    stall_s: float,
    on_message: Callable[[int], None] | None = None,
) -> tuple[int, float]:
    """QoS 1 through the broker and back, shaped like the MQTT load: (received, seconds).

    The same devices, each its own paho connection with the same in-flight window, publish
    the same number of one-point messages, each on a topic of its own that it is subscribed
    to at QoS 1 (see the module docstring for why not a second connection). Blocking (run
    it in a thread). The topics are ones nothing of fleetmesh captures or subscribes to, so
    only the broker touches the messages.
    """
    received = _Countdown(len(devices) * messages, on_message)

    def listen(client: paho.Client, device_id: str) -> None:
        client.on_message = received.tick
        _subscribe(client, _pipe_topic(device_id))

    started = _publish_rounds(port, devices, messages, 0, _pipe_topic, listen, received, stall_s)
    return received.count, received.last_at - started


def _publish_rounds(
    port: int,
    devices: Secrets,
    messages: int,
    start_ms: int,
    topic_of: Callable[[str], str],
    prepare: Callable[[paho.Client, str], None],
    done: _Countdown,
    stall_s: float,
) -> float:
    """Connect each device (then `prepare` it); publish `messages` rounds of one point each.

    Returns when `done` counted everything or stalled; the value is when publishing began
    (`time.perf_counter()`).
    """
    clients = {i: _device_client(i, secret) for i, secret in devices.items()}
    connected: list[paho.Client] = []
    try:
        for device_id, client in clients.items():
            _connect(client, port, device_id)
            connected.append(client)
            prepare(client, device_id)
        started = time.perf_counter()
        for n in range(messages):
            payload = one_point(n, start_ms)
            for device_id, client in clients.items():
                client.publish(topic_of(device_id), payload, qos=1)
        done.wait(stall_s)
        return started
    finally:
        for client in connected:
            _close(client)


def _telemetry_topic(device_id: str) -> str:
    return f"devices/{device_id}/telemetry"


def _pipe_topic(device_id: str) -> str:
    return f"devices/{device_id}/pipe"


def _subscribe(client: paho.Client, topic: str) -> None:
    """Subscribe at QoS 1; raise unless the broker granted it."""
    subscribed = threading.Event()
    granted: list[Any] = []

    def on_subscribe(_c: paho.Client, _u: Any, _m: Any, reasons: Any, _p: Any) -> None:
        granted.extend(reasons)
        subscribed.set()

    client.on_subscribe = on_subscribe
    client.subscribe(topic, qos=1)
    if not subscribed.wait(CONNECT_TIMEOUT_S) or any(r.is_failure for r in granted):
        raise BenchError(f"subscribing to {topic}: {granted}")
