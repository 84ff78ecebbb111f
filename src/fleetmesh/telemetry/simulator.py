"""A simulated fleet: registers devices and sends realistic telemetry over HTTP or MQTT.

It is a client of fleetmesh like any other: it talks to the public HTTP API
(operator key to register, device Basic auth to post) and to the MQTT listener
(each device its own connection and credentials, QoS 1), never to the code of
a context.

Each device is a `SensorModel`: temperature with a daily cycle and noise,
humidity that moves against it, a battery that drains slowly, and now and then
a sensor fault (a few samples with a fault code and no temperature/humidity).
With anomalies on, spikes and level shifts are injected and recorded (device,
kind, start, end, magnitude), so a detector's output can be scored against them.

`run_simulation` runs a fleet for a duration and returns a report whose
`stored` is counted back through the query API: `lost` = accepted - stored.
`run_demo_fleet` runs a small fleet until cancelled (`fleetmesh up --demo-devices`).
Over MQTT, devices answer pings: a message on `devices/<id>/commands/ping` is
answered on `devices/<id>/responses/ping` with its `command_id`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import aiomqtt
import httpx
import msgspec

from fleetmesh.core.ids import new_id
from fleetmesh.core.logging import get_logger

log = get_logger(__name__)

DEVICE_TYPE = "simulated-sensor"
DEVICE_TYPE_BODY: dict[str, Any] = {
    "name": DEVICE_TYPE,
    "description": "Simulated environment sensor (fleetmesh simulate)",
    "capabilities": ["ping"],
    "telemetry_schema": {
        "temperature": {"type": "number", "unit": "degC", "min": -40, "max": 85},
        "humidity": {"type": "number", "unit": "percent", "min": 0, "max": 100},
        "battery": {"type": "number", "unit": "percent", "min": 0, "max": 100},
        "fault": {"type": "integer", "min": 0, "max": 255},
    },
    "offline_timeout_s": 60,
    "expected_interval_s": 5,
}
METRICS = tuple(DEVICE_TYPE_BODY["telemetry_schema"])
POINTS_PER_SAMPLE = len(METRICS)
MAX_RATE = 1000.0
BULK_CHUNK = 1000
QUERY_PAGE = 10_000
DAY_S = 86_400
FAULT_CODES = (2, 3, 7, 11)
Transport = Literal["http", "mqtt"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- the sensor


@dataclass(frozen=True, slots=True)
class AnomalyRecord:
    """An injected anomaly: what, on which device and metric, from when to when."""

    device_id: str
    kind: str
    metric: str
    start_ms: int
    end_ms: int
    magnitude: float


class SensorModel:
    """One simulated environment sensor; `sample(ts_ms)` gives its values at a time."""

    def __init__(
        self,
        device_id: str,
        rng: random.Random,
        *,
        anomalies: bool = False,
        start_ms: int | None = None,
        horizon_s: float = 600.0,
    ) -> None:
        self.device_id = device_id
        self.rng = rng
        self.base = rng.uniform(17.0, 24.0)
        self.amplitude = rng.uniform(2.5, 6.0)
        self.phase_s = rng.uniform(-3600.0, 3600.0)
        self.humidity_base = rng.uniform(35.0, 60.0)
        self.battery = rng.uniform(55.0, 100.0)
        self.drain_per_s = rng.uniform(0.5, 1.5) / 3600.0
        self.drift = 0.0
        self.fault_left = 0
        self.fault_code = 0
        self.fault_probability = 0.002
        self.anomalies_on = anomalies
        self.anomalies: list[AnomalyRecord] = []
        self.horizon_ms = int(horizon_s * 1000)
        begin = start_ms if start_ms is not None else now_ms()
        self._last_ms: int | None = None
        self._shift = 0.0
        self._shift_until = 0
        self._next_anomaly_ms = begin + int(rng.uniform(0.15, 0.6) * self.horizon_ms)

    def sample(self, ts_ms: int) -> dict[str, float | int]:
        elapsed_s = 0.0 if self._last_ms is None else max(0.0, (ts_ms - self._last_ms) / 1000)
        self._last_ms = ts_ms
        self.battery = max(0.0, self.battery - self.drain_per_s * elapsed_s)
        if self.battery < 3.0:
            self.battery = 100.0  # the battery was replaced
        values: dict[str, float | int] = {"battery": round(self.battery, 2)}
        if self._in_fault():
            values["fault"] = self.fault_code
            return values
        temperature = self._temperature(ts_ms)
        humidity = self.humidity_base - 1.5 * (temperature - self.base) + self.rng.gauss(0, 0.8)
        values["temperature"] = round(temperature, 3)
        values["humidity"] = round(min(100.0, max(0.0, humidity)), 2)
        values["fault"] = 0
        return values

    def _in_fault(self) -> bool:
        if self.fault_left > 0:
            self.fault_left -= 1
            return True
        if self.rng.random() < self.fault_probability:
            self.fault_code = self.rng.choice(FAULT_CODES)
            self.fault_left = self.rng.randint(1, 5)
            return True
        return False

    def _temperature(self, ts_ms: int) -> float:
        day_fraction = ((ts_ms / 1000 + self.phase_s) % DAY_S) / DAY_S
        # Coolest around 03:00, warmest around 15:00.
        cycle = self.amplitude * math.sin(2 * math.pi * (day_fraction - 0.375))
        self.drift = 0.98 * self.drift + self.rng.gauss(0, 0.05)
        value = self.base + cycle + self.drift + self.rng.gauss(0, 0.15)
        if self.anomalies_on:
            value += self._anomaly(ts_ms)
        return value

    def _anomaly(self, ts_ms: int) -> float:
        if ts_ms < self._shift_until:
            return self._shift
        self._shift = 0.0
        if ts_ms < self._next_anomaly_ms:
            return 0.0
        self._next_anomaly_ms = ts_ms + int(self.rng.expovariate(2.0 / self.horizon_ms))
        sign = self.rng.choice((-1.0, 1.0))
        if self.rng.random() < 0.5:
            magnitude = round(sign * self.rng.uniform(12.0, 20.0), 2)
            self._record("spike", ts_ms, ts_ms, magnitude)
            return magnitude
        magnitude = round(sign * self.rng.uniform(6.0, 10.0), 2)
        length = max(1000, int(self.rng.uniform(0.1, 0.3) * self.horizon_ms))
        self._shift, self._shift_until = magnitude, ts_ms + length
        self._record("level_shift", ts_ms, ts_ms + length, magnitude)
        return magnitude

    def _record(self, kind: str, start_ms: int, end_ms: int, magnitude: float) -> None:
        self.anomalies.append(
            AnomalyRecord(self.device_id, kind, "temperature", start_ms, end_ms, magnitude)
        )


# --------------------------------------------------------------------------- credentials


class CredentialsFile:
    """Issued device secrets, kept (mode 0600) so a later run reuses the same devices."""

    def __init__(self, path: Path, api_url: str) -> None:
        self.path = path
        self.api_url = api_url.rstrip("/")

    def load(self) -> dict[str, str]:
        try:
            content = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(content, dict) or content.get("api") != self.api_url:
            return {}
        devices = content.get("devices", {})
        return {str(k): str(v) for k, v in devices.items()} if isinstance(devices, dict) else {}

    def save(self, secrets: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"api": self.api_url, "devices": secrets}, handle, indent=1)
        os.chmod(temporary, 0o600)
        os.replace(temporary, self.path)


def basic_auth(device_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{device_id}:{secret}".encode()).decode()


class ProvisioningError(RuntimeError):
    """The fleet could not be registered."""


async def provision_fleet(
    api: httpx.AsyncClient, device_ids: list[str], credentials: CredentialsFile
) -> dict[str, str]:
    """Register the devices (and their type) or reuse them; returns id → secret."""
    answer = await api.post("/api/v1/device-types", json=DEVICE_TYPE_BODY)
    if answer.status_code not in (201, 409):
        raise ProvisioningError(f"device type: {answer.status_code} {answer.text[:300]}")
    saved = credentials.load()
    known = {i: saved[i] for i in device_ids if i in saved}
    valid = await _still_valid(api, known)
    secrets = {i: s for i, s in known.items() if i in valid}
    missing = [i for i in device_ids if i not in secrets]
    for start in range(0, len(missing), BULK_CHUNK):
        chunk = missing[start : start + BULK_CHUNK]
        secrets.update(await _register(api, chunk))
    credentials.save({**saved, **secrets})
    return {i: secrets[i] for i in device_ids}


async def _still_valid(api: httpx.AsyncClient, known: dict[str, str]) -> set[str]:
    """The saved secrets the platform still accepts (a 401 means rotated or another platform)."""
    gate = asyncio.Semaphore(16)

    async def check(device_id: str, secret: str) -> str | None:
        async with gate:
            answer = await api.get(
                f"/api/v1/devices/{device_id}/telemetry/rejections",
                params={"limit": 1},
                headers={"Authorization": basic_auth(device_id, secret)},
            )
        return None if answer.status_code in (401, 403) else device_id

    results = await asyncio.gather(*(check(i, s) for i, s in known.items()))
    return {i for i in results if i is not None}


async def _register(api: httpx.AsyncClient, device_ids: list[str]) -> dict[str, str]:
    body = {"devices": [{"type": DEVICE_TYPE, "id": i} for i in device_ids]}
    answer = await api.post("/api/v1/devices:bulk", json=body)
    if answer.status_code not in (201, 207):
        raise ProvisioningError(f"bulk registration: {answer.status_code} {answer.text[:300]}")
    secrets: dict[str, str] = {}
    for item in answer.json()["items"]:
        device_id = device_ids[item["index"]]
        if item["status"] == "created":
            secrets[device_id] = item["credentials"]["secret"]
        elif (item.get("error") or {}).get("status") == 409:
            secrets[device_id] = await _rotate(api, device_id)
        else:
            raise ProvisioningError(f"{device_id}: {item.get('error')}")
    return secrets


async def _rotate(api: httpx.AsyncClient, device_id: str) -> str:
    """A device that exists but whose secret we lost: issue it a new one."""
    answer = await api.post(f"/api/v1/devices/{device_id}/credentials:rotate")
    if answer.status_code != 200:
        raise ProvisioningError(f"{device_id}: rotate: {answer.status_code} {answer.text[:300]}")
    return str(answer.json()["credentials"]["secret"])


# --------------------------------------------------------------------------- running


@dataclass
class Counters:
    """What the fleet did so far (points unless named otherwise)."""

    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    messages: int = 0
    retries: int = 0
    failed: int = 0
    refused_messages: int = 0
    pings_answered: int = 0
    connected: int = 0


@dataclass(frozen=True)
class SimulationConfig:
    api_url: str
    admin_key: str
    devices: int
    rate: float
    """Points per second per device."""
    duration_s: float | None
    """None: run until cancelled."""
    transport: Transport = "http"
    anomalies: bool = False
    mqtt_url: str | None = None
    credentials_path: Path = Path(".fleetmesh/simulator-credentials.json")
    prefix: str = "sim"
    send_interval_s: float = 1.0
    seed: int | None = None
    verify_timeout_s: float = 30.0

    def device_ids(self) -> list[str]:
        return [f"{self.prefix}-{i:04}" for i in range(self.devices)]

    @property
    def sample_interval_ms(self) -> float:
        return 1000.0 * POINTS_PER_SAMPLE / self.rate


@dataclass
class SimulationReport:
    transport: str
    devices: int
    rate: float
    duration_s: float
    sent: int
    accepted: int
    rejected: int
    stored: int
    lost: int
    duplicates: int
    messages: int
    retries: int
    failed: int
    pings_answered: int
    verified: bool
    anomalies: list[AnomalyRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["anomalies"] = [asdict(a) for a in self.anomalies]
        return body


class _Window:
    """The time span a run covers, so the stored points can be counted back."""

    def __init__(self, start_ms: int, end_ms: int | None) -> None:
        self.start_ms = start_ms
        self.end_ms = end_ms

    def done(self, at_ms: int) -> bool:
        return self.end_ms is not None and at_ms >= self.end_ms


def _samples_due(
    model: SensorModel, next_ts: float, up_to_ms: int, interval_ms: float
) -> tuple[list[dict[str, Any]], float]:
    items: list[dict[str, Any]] = []
    while next_ts <= up_to_ms:
        ts = int(next_ts)
        items.append({"ts": ts, "values": model.sample(ts)})
        next_ts += interval_ms
    return items, next_ts


def _points(items: list[dict[str, Any]]) -> int:
    return sum(len(item["values"]) for item in items)


class _Device:
    """One simulated device's loop: every send interval, the samples that fell due."""

    def __init__(
        self,
        device_id: str,
        secret: str,
        model: SensorModel,
        config: SimulationConfig,
        window: _Window,
        counters: Counters,
    ) -> None:
        self.device_id = device_id
        self.secret = secret
        self.model = model
        self.config = config
        self.window = window
        self.counters = counters
        interval = config.sample_interval_ms
        self.next_ts = window.start_ms + model.rng.uniform(0, min(interval, 1000.0))

    async def batches(self) -> AsyncIterator[list[dict[str, Any]]]:
        """Sample batches, paced in real time, until the window ends."""
        interval = self.config.sample_interval_ms
        pause = max(self.config.send_interval_s, min(interval / 1000, 10.0))
        await asyncio.sleep(self.model.rng.uniform(0, pause))
        while True:
            current = now_ms()
            limit = current if self.window.end_ms is None else min(current, self.window.end_ms - 1)
            items, self.next_ts = _samples_due(self.model, self.next_ts, limit, interval)
            if items:
                yield items
            if self.window.done(current):
                return
            await asyncio.sleep(pause)


class HttpSender:
    """Posts batches with the device's Basic credentials; retries what was not accepted.

    Over aiohttp: a post costs it about a third of the CPU httpx spends, which a simulated
    fleet (or the ingest bench's load) on the platform's own machine takes from it."""

    def __init__(
        self, http: aiohttp.ClientSession, api_url: str, counters: Counters, *, give_up_s: float
    ) -> None:
        self.http = http
        self.api_url = api_url.rstrip("/")
        self.counters = counters
        self.give_up_s = give_up_s

    async def send(self, device_id: str, secret: str, items: list[dict[str, Any]]) -> None:
        """Post one batch until it is settled."""
        await self.send_encoded(device_id, secret, msgspec.json.encode(items), _points(items))

    async def send_encoded(self, device_id: str, secret: str, body: bytes, points: int) -> None:
        """`send` for a batch of `points` points already encoded: every resend carries the
        same bytes and `Idempotency-Key`, so a batch accepted before a lost answer is
        stored once."""
        url = f"{self.api_url}/api/v1/devices/{device_id}/telemetry"
        headers = {
            "Authorization": basic_auth(device_id, secret),
            "Content-Type": "application/json",
            "Idempotency-Key": new_id(),
        }
        deadline = time.monotonic() + self.give_up_s
        delay = 0.2
        while True:
            try:
                async with self.http.post(url, data=body, headers=headers) as answer:
                    content = await answer.read()
                    outcome = self._outcome(answer.status, answer.headers, content, points, delay)
            except (aiohttp.ClientError, TimeoutError) as error:
                outcome = delay
                log.debug("simulator_http_error", device_id=device_id, error=repr(error))
            if outcome is None:
                return
            if time.monotonic() + outcome > deadline:
                self.counters.failed += points
                return
            self.counters.retries += 1
            await asyncio.sleep(outcome)
            delay = min(delay * 2, 5.0)

    def _outcome(
        self, status: int, headers: Mapping[str, str], content: bytes, points: int, delay: float
    ) -> float | None:
        """None when the batch is settled, else how long to wait before sending it again."""
        if status in (429, 503) or status >= 500:
            return _retry_after(headers, delay)
        if status == 404 and _problem_type(content).endswith("device-not-found"):
            return delay  # the registration has not reached the telemetry service yet
        self.counters.messages += 1
        self.counters.sent += points
        if status < 300:
            accepted, rejected = _report_counts(content, points)
            self.counters.accepted += accepted
            self.counters.rejected += rejected
        else:
            self.counters.rejected += points
            self.counters.refused_messages += 1
            detail = content[:300].decode(errors="replace")
            log.warning("simulator_batch_refused", status=status, detail=detail)
        return None


def sender_session() -> aiohttp.ClientSession:
    """The HTTP session of an `HttpSender`: up to 64 connections, 30 s per request."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64),
        timeout=aiohttp.ClientTimeout(total=30),
    )


def _retry_after(headers: Mapping[str, str], default: float) -> float:
    try:
        return max(0.05, float(headers.get("Retry-After", default)))
    except ValueError:
        return default


class _Problem(msgspec.Struct):
    type: str = ""


_read_problem = msgspec.json.Decoder(_Problem).decode


def _problem_type(content: bytes) -> str:
    try:
        return _read_problem(content).type
    except msgspec.DecodeError:
        return ""


class _Counts(msgspec.Struct):
    """The counts of an ingest answer; its per-item list is skipped unread."""

    accepted: int | list[msgspec.Raw] | None = None
    rejected: int | list[msgspec.Raw] | None = None


_read_counts = msgspec.json.Decoder(_Counts).decode


def _report_counts(content: bytes, points: int) -> tuple[int, int]:
    """(accepted, rejected) from an ingest answer: counts or lists, whichever it holds."""
    try:
        counts = _read_counts(content)
    except msgspec.DecodeError:  # not JSON, not an object, or counts of another type
        return points, 0
    rejected = _count(counts.rejected) or 0
    accepted = _count(counts.accepted)
    return (points - rejected if accepted is None else accepted), rejected


def _count(value: int | list[msgspec.Raw] | None) -> int | None:
    return len(value) if isinstance(value, list) else value


class _MqttDevice:
    """One MQTT connection per device: publishes QoS 1, hears errors and answers pings."""

    def __init__(self, device: _Device, host: str, port: int) -> None:
        self.device = device
        self.host = host
        self.port = port
        self.counters = device.counters
        self.topic = f"devices/{device.device_id}/telemetry"

    def _client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.device.device_id,
            username=self.device.device_id,
            password=self.device.secret,
            keepalive=30,
            timeout=30,
        )

    async def run(self) -> None:
        """Publish every batch, reconnecting as needed; a batch not PUBACKed is sent again."""
        pending: list[list[dict[str, Any]]] = []
        batches = self.device.batches()
        delay = 0.5
        while True:
            try:
                async with self._client() as client:
                    await self._subscribe(client)
                    self.counters.connected += 1
                    listener = asyncio.create_task(self._listen(client))
                    try:
                        await self._publish_all(client, batches, pending)
                        await asyncio.sleep(0.5)  # let late error reports arrive
                    finally:
                        self.counters.connected -= 1
                        listener.cancel()
                        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                            await listener
                return
            except aiomqtt.MqttError as error:
                log.debug("simulator_mqtt_retry", device=self.device.device_id, error=str(error))
                self.counters.retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        device_id = self.device.device_id
        await client.subscribe(f"devices/{device_id}/commands/ping", qos=1)
        await client.subscribe(f"devices/{device_id}/errors", qos=0)

    async def _publish_all(
        self,
        client: aiomqtt.Client,
        batches: AsyncIterator[list[dict[str, Any]]],
        pending: list[list[dict[str, Any]]],
    ) -> None:
        while pending:  # left over from a dropped connection
            await self._publish(client, pending[0])
            pending.pop(0)
        async for items in batches:
            pending.append(items)
            await self._publish(client, items)
            pending.pop(0)

    async def _publish(self, client: aiomqtt.Client, items: list[dict[str, Any]]) -> None:
        await client.publish(self.topic, json.dumps(items).encode(), qos=1)
        self.counters.messages += 1
        self.counters.sent += _points(items)
        self.counters.accepted += _points(items)

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = str(message.topic)
            try:
                body = json.loads(bytes(message.payload))
            except (ValueError, TypeError):
                continue
            if not isinstance(body, dict):
                continue
            if topic.endswith("/errors"):
                self._on_error(body)
            elif topic.endswith("/commands/ping"):
                await self._answer_ping(client, body)

    def _on_error(self, body: dict[str, Any]) -> None:
        rejected = body.get("rejected")
        if isinstance(rejected, int) and not isinstance(rejected, bool):
            self.counters.rejected += rejected
            self.counters.accepted -= rejected
        else:
            self.counters.refused_messages += 1
        log.info("simulator_error_report", device=self.device.device_id, reason=body.get("reason"))

    async def _answer_ping(self, client: aiomqtt.Client, body: dict[str, Any]) -> None:
        own = f"devices/{self.device.device_id}/"
        command_id = body.get("command_id", body.get("id"))
        reply = {"command_id": command_id, "ok": True, "device_id": self.device.device_id}
        topic = body.get("reply_topic")
        if not (isinstance(topic, str) and topic.startswith(own) and "#" not in topic):
            topic = own + "responses/ping"
        await client.publish(topic, json.dumps(reply).encode(), qos=1)
        self.counters.pings_answered += 1


def _mqtt_address(config: SimulationConfig) -> tuple[str, int]:
    url = config.mqtt_url or f"mqtt://{urlsplit(config.api_url).hostname or '127.0.0.1'}:1883"
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


class Fleet:
    """A provisioned fleet, ready to run."""

    def __init__(self, config: SimulationConfig, counters: Counters | None = None) -> None:
        if not 0 < config.rate <= MAX_RATE:
            raise ValueError(f"rate must be in (0, {MAX_RATE:g}] points/s per device")
        self.config = config
        self.counters = counters or Counters()
        self.models: list[SensorModel] = []
        self.window = _Window(now_ms(), None)

    def _api(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.config.api_url.rstrip("/"),
            headers={"Authorization": f"Bearer {self.config.admin_key}"},
            timeout=30,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    async def run(self) -> SimulationReport:
        """Provision, send for the duration, then count what was stored."""
        config = self.config
        async with self._api() as api:
            secrets = await provision_fleet(
                api, config.device_ids(), CredentialsFile(config.credentials_path, config.api_url)
            )
            started = now_ms()
            end = None if config.duration_s is None else started + int(config.duration_s * 1000)
            self.window = _Window(started, end)
            seed = config.seed if config.seed is not None else random.randrange(2**32)
            horizon = config.duration_s or 600.0
            devices = []
            for index, (device_id, secret) in enumerate(secrets.items()):
                rng = random.Random(seed * 100_003 + index)
                model = SensorModel(
                    device_id, rng, anomalies=config.anomalies, start_ms=started, horizon_s=horizon
                )
                self.models.append(model)
                devices.append(
                    _Device(device_id, secret, model, config, self.window, self.counters)
                )
            await self._send(devices)
            stored, verified = await self._verify(api)
        return self._report(stored, verified)

    async def _send(self, devices: list[_Device]) -> None:
        if self.config.transport == "mqtt":
            host, port = _mqtt_address(self.config)
            await asyncio.gather(*(_MqttDevice(d, host, port).run() for d in devices))
            return
        give_up_s = max(30.0, self.config.send_interval_s)
        async with sender_session() as session:
            sender = HttpSender(session, self.config.api_url, self.counters, give_up_s=give_up_s)

            async def run(device: _Device) -> None:
                async for items in device.batches():
                    await sender.send(device.device_id, device.secret, items)

            await asyncio.gather(*(run(d) for d in devices))

    async def _verify(self, api: httpx.AsyncClient) -> tuple[int, bool]:
        """Count the stored points of the run, waiting for the writer to catch up."""
        deadline = time.monotonic() + self.config.verify_timeout_s
        stored = 0
        while True:
            try:
                stored = await count_stored(
                    api,
                    [m.device_id for m in self.models],
                    self.window.start_ms,
                    now_ms() if self.window.end_ms is None else self.window.end_ms,
                )
            except httpx.HTTPError as error:
                log.warning("simulator_verify_failed", error=repr(error))
                return stored, False
            if stored >= self.counters.accepted or time.monotonic() >= deadline:
                return stored, True
            await asyncio.sleep(0.5)

    def _report(self, stored: int, verified: bool) -> SimulationReport:
        counters = self.counters
        end = self.window.end_ms or now_ms()
        return SimulationReport(
            transport=self.config.transport,
            devices=self.config.devices,
            rate=self.config.rate,
            duration_s=round((end - self.window.start_ms) / 1000, 3),
            sent=counters.sent,
            accepted=counters.accepted,
            rejected=counters.rejected,
            stored=stored,
            lost=max(0, counters.accepted - stored) + counters.failed,
            duplicates=max(0, stored - counters.accepted),
            messages=counters.messages,
            retries=counters.retries,
            failed=counters.failed,
            pings_answered=counters.pings_answered,
            verified=verified,
            anomalies=[a for m in self.models for a in m.anomalies],
        )


async def count_stored(
    api: httpx.AsyncClient, device_ids: list[str], from_ms: int, to_ms: int
) -> int:
    """How many points of these devices the platform stored in [from_ms, to_ms]."""
    gate = asyncio.Semaphore(8)

    async def one(device_id: str) -> int:
        async with gate:
            return await _count_device(api, device_id, from_ms, to_ms)

    return sum(await asyncio.gather(*(one(d) for d in device_ids)))


async def _count_device(api: httpx.AsyncClient, device_id: str, from_ms: int, to_ms: int) -> int:
    total = 0
    params: dict[str, Any] = {"from": from_ms, "to": to_ms + 1, "limit": QUERY_PAGE}
    while True:
        answer = await api.get(f"/api/v1/devices/{device_id}/telemetry", params=params)
        answer.raise_for_status()
        body = answer.json()
        total += len(body["items"])
        if not body.get("next_cursor"):
            return total
        params["cursor"] = body["next_cursor"]


async def run_simulation(
    config: SimulationConfig, *, counters: Counters | None = None
) -> SimulationReport:
    """Register (or reuse) the fleet, send for `config.duration_s`, verify, report."""
    return await Fleet(config, counters).run()


async def run_demo_fleet(
    api_url: str,
    admin_key: str,
    count: int,
    *,
    data_dir: Path,
    rate: float = 2.0,
    anomalies: bool = True,
    on_started: Callable[[int], None] | None = None,
) -> None:
    """A small fleet (`demo-0000`...) posting over HTTP until cancelled (`up --demo-devices`).

    Waits for the API to answer first; device secrets are kept in
    `<data_dir>/demo-credentials.json` so a restart reuses the devices.
    """
    config = SimulationConfig(
        api_url=api_url,
        admin_key=admin_key,
        devices=count,
        rate=rate,
        duration_s=None,
        transport="http",
        anomalies=anomalies,
        credentials_path=data_dir / "demo-credentials.json",
        prefix="demo",
        send_interval_s=2.0,
    )
    for _ in range(150):
        try:
            async with httpx.AsyncClient(base_url=api_url, timeout=2) as probe:
                if (await probe.get("/readyz")).status_code == 200:
                    break
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    if on_started is not None:
        on_started(count)
    log.info("demo_fleet_starting", devices=count, rate=rate)
    try:
        await run_simulation(config)
    except asyncio.CancelledError:
        log.info("demo_fleet_stopped")
        raise
