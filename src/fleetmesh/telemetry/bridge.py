"""The MQTT bridge: telemetry from an existing broker (Mosquitto, EMQX) into `DEVICES_IN`.

`fleetmesh up --mqtt-bridge mqtt://[user:pass@]host:1883[?client_id=..&topic=..]`
subscribes to `devices/+/telemetry` (QoS 1) on that broker and republishes
every message to JetStream on `devices.<id>.telemetry`, where the same consumer
as for the embedded MQTT listener ingests it (`mqtt.py`).

Nothing is lost on the way:

* the session is persistent (`clean_session=False`, a fixed client id): what the
  broker queues while fleetmesh is down is delivered when it reconnects (within
  the broker's own limits; Mosquitto's default `max_queued_messages 1000` drops
  beyond that);
* a QoS 1 message is acknowledged to the broker (PUBACK, paho's manual acks)
  only after JetStream has stored it (PubAck), and PUBACKs go out in the order
  the messages came in; if fleetmesh dies in between, the broker redelivers;
* the JetStream `Nats-Msg-Id` of a QoS 1 message is a hash of the client id,
  topic, MQTT packet id and payload, so a redelivery is dropped as a duplicate
  within the stream's duplicate window (120 s). The packet id is the broker's,
  reused only after 65,535 further deliveries, so two distinct messages collide
  only if one topic carries the same payload with the same packet id within the
  window. QoS 0 messages cannot be redelivered and get unique ids.

Who may publish for which device is the broker's business here (its ACLs);
fleetmesh checks only that the topic names a valid device id, and the ingest
path refuses unknown devices (quarantined, see `quarantine.py`).

One bridge per broker session: replicas of the telemetry service should not
all run one with the same client id (they would take the session from each
other); give each its own `client_id` and `topic` on a `$share/...` filter, or
run the bridge in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from fleetmesh.core.backbone import Backbone
from fleetmesh.core.ids import new_id
from fleetmesh.core.logging import get_logger
from fleetmesh.telemetry.mqtt import (
    SOURCE_HEADER,
    devices_in_stream_config,
    is_device_id,
    telemetry_subject,
)

log = get_logger(__name__)

DEFAULT_TOPIC = "devices/+/telemetry"
DEFAULT_CLIENT_ID = "fleetmesh-bridge"
SOURCE_BRIDGE = "mqtt-bridge"
MAX_IN_FLIGHT = 256
PUBLISH_TIMEOUT_S = 5.0


class BridgeConfigError(ValueError):
    """The bridge URL cannot be used."""


@dataclass(frozen=True, slots=True)
class BridgeTarget:
    """Where and as whom the bridge connects, and what it subscribes to."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    client_id: str = DEFAULT_CLIENT_ID
    topic: str = DEFAULT_TOPIC

    @classmethod
    def parse(cls, url: str) -> BridgeTarget:
        """`mqtt://[user[:pass]@]host[:port][?client_id=...&topic=...]` (or `mqtts://`)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise BridgeConfigError(f"{url!r}: use mqtt://host:port or mqtts://host:port")
        if not parts.hostname:
            raise BridgeConfigError(f"{url!r} names no host")
        tls = parts.scheme in ("mqtts", "ssl")
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        topic = query.get("topic", DEFAULT_TOPIC)
        if topic.split("/").count("+") != 1 or "#" in topic:
            raise BridgeConfigError(
                f"topic {topic!r}: use exactly one '+' (the device id level) and no '#'"
            )
        return cls(
            host=parts.hostname,
            port=parts.port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            client_id=query.get("client_id", DEFAULT_CLIENT_ID),
            topic=topic,
        )

    def device_id_of(self, topic: str) -> str | None:
        """The device id a topic names at the filter's `+` level, or None."""
        pattern = self.topic.split("/")
        if pattern[0] == "$share":
            pattern = pattern[2:]
        levels = topic.split("/")
        if len(levels) != len(pattern):
            return None
        device_id: str | None = None
        for expected, level in zip(pattern, levels, strict=True):
            if expected == "+":
                device_id = level
            elif expected != level:
                return None
        return device_id if device_id is not None and is_device_id(device_id) else None


@dataclass(frozen=True, slots=True)
class _Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int
    session: int


def bridge_msg_id(client_id: str, message: _Incoming) -> str:
    """Deterministic for a QoS 1 (re)delivery, unique for QoS 0."""
    if message.qos == 0:
        return f"bridge-{new_id()}"
    digest = hashlib.sha256()
    for part in (client_id.encode(), message.topic.encode(), str(message.mid).encode()):
        digest.update(part + b"\0")
    digest.update(message.payload)
    return f"bridge-{digest.hexdigest()[:40]}"


class MqttBridge:
    """Subscribes on an external broker and lands every message in `DEVICES_IN`."""

    def __init__(
        self,
        url: str,
        backbone: Backbone,
        *,
        connect_timeout_s: float = 10.0,
        keepalive_s: int = 30,
    ) -> None:
        self.target = BridgeTarget.parse(url)
        self.backbone = backbone
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.forwarded = 0
        self.skipped = 0
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._incoming: asyncio.Queue[_Incoming] = asyncio.Queue()
        self._in_flight: asyncio.Queue[tuple[_Incoming, asyncio.Task[bool]]] = asyncio.Queue(
            MAX_IN_FLIGHT
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._forwards: set[asyncio.Task[bool]] = set()
        self._subscribed = asyncio.Event()
        self._stopping = False
        self._session = 0
        self._session_lock = threading.Lock()

    @property
    def url_for_logs(self) -> str:
        return f"mqtt{'s' if self.target.tls else ''}://{self.target.host}:{self.target.port}"

    async def start(self) -> None:
        """Connect and subscribe; keeps retrying in the background if the broker is down."""
        await self.backbone.ensure_stream(devices_in_stream_config())
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._client = self._new_client()
        self._tasks = [
            asyncio.create_task(self._pump(), name="mqtt-bridge-pump"),
            asyncio.create_task(self._acknowledge(), name="mqtt-bridge-ack"),
        ]
        self._client.connect_async(self.target.host, self.target.port, keepalive=self.keepalive_s)
        self._client.loop_start()
        try:
            await asyncio.wait_for(self._subscribed.wait(), self.connect_timeout_s)
            log.info("mqtt_bridge_started", broker=self.url_for_logs, topic=self.target.topic)
        except TimeoutError:
            log.warning("mqtt_bridge_not_connected_yet", broker=self.url_for_logs, retrying=True)

    async def wait_subscribed(self, timeout: float) -> None:
        await asyncio.wait_for(self._subscribed.wait(), timeout)

    async def stop(self, *, drain_timeout_s: float = 5.0) -> None:
        """Let in-flight messages reach JetStream and be acked, then disconnect."""
        client, self._client = self._client, None
        if client is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained(), drain_timeout_s)
        self._stopping = True
        with self._session_lock:
            self._session += 1
        client.disconnect()
        await asyncio.get_running_loop().run_in_executor(None, client.loop_stop)
        # What is not acked yet stays with the broker, which redelivers it next session.
        pending: list[asyncio.Task[Any]] = [*self._tasks, *self._forwards]
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._incoming = asyncio.Queue()
        self._in_flight = asyncio.Queue(MAX_IN_FLIGHT)
        self._subscribed.clear()
        log.info("mqtt_bridge_stopped", forwarded=self.forwarded, skipped=self.skipped)

    async def _drained(self) -> None:
        while not (self._incoming.empty() and self._in_flight.empty() and not self._forwards):
            await asyncio.sleep(0.02)

    # ----------------------------------------------------------------- paho thread

    def _new_client(self) -> paho.Client:
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.target.client_id,
            clean_session=False,
            protocol=paho.MQTTv311,
            manual_ack=True,
        )
        if self.target.username is not None:
            client.username_pw_set(self.target.username, self.target.password)
        if self.target.tls:
            client.tls_set_context(ssl.create_default_context())
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _on_connect(
        self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("mqtt_bridge_connect_refused", broker=self.url_for_logs, reason=str(reason))
            return
        with self._session_lock:
            self._session += 1
        client.subscribe(self.target.topic, qos=1)

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, _mid: int, reasons: Any, _props: Any
    ) -> None:
        if any(reason.is_failure for reason in reasons):
            log.error("mqtt_bridge_subscribe_refused", topic=self.target.topic)
            return
        self._call_soon(self._subscribed.set)

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        with self._session_lock:
            self._session += 1
        if not self._stopping:
            log.warning("mqtt_bridge_disconnected", broker=self.url_for_logs, reason=str(reason))
            self._call_soon(self._subscribed.clear)

    def _on_message(self, _client: paho.Client, _userdata: Any, message: Any) -> None:
        with self._session_lock:
            session = self._session
        incoming = _Incoming(
            topic=message.topic,
            payload=bytes(message.payload),
            mid=int(message.mid),
            qos=int(message.qos),
            session=session,
        )
        self._call_soon(self._incoming.put_nowait, incoming)

    def _call_soon(self, callback: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(callback, *args)

    # ----------------------------------------------------------------- event loop

    async def _pump(self) -> None:
        """Start a JetStream publish per message; at most MAX_IN_FLIGHT outstanding."""
        while True:
            incoming = await self._incoming.get()
            task = asyncio.create_task(self._forward(incoming))
            self._forwards.add(task)
            task.add_done_callback(self._forwards.discard)
            await self._in_flight.put((incoming, task))

    async def _acknowledge(self) -> None:
        """PUBACK in arrival order, each once its message is stored."""
        while True:
            incoming, task = await self._in_flight.get()
            try:
                stored = await task
            except asyncio.CancelledError:
                task.cancel()
                raise
            if not stored or incoming.qos == 0:
                continue
            with self._session_lock:
                same_session = incoming.session == self._session
            client = self._client
            # A message from a previous connection is redelivered by the broker on
            # this one: that copy gets the PUBACK (its JetStream publish is a duplicate).
            if same_session and client is not None:
                client.ack(incoming.mid, incoming.qos)

    async def _forward(self, incoming: _Incoming) -> bool:
        device_id = self.target.device_id_of(incoming.topic)
        if device_id is None:
            self.skipped += 1
            log.warning("mqtt_bridge_bad_topic", topic=incoming.topic[:200])
            return True
        msg_id = bridge_msg_id(self.target.client_id, incoming)
        delay = 0.1
        while not self._stopping:
            try:
                await self.backbone.publish(
                    telemetry_subject(device_id),
                    incoming.payload,
                    msg_id=msg_id,
                    headers={SOURCE_HEADER: SOURCE_BRIDGE},
                    timeout=PUBLISH_TIMEOUT_S,
                )
            except Exception as error:
                log.warning("mqtt_bridge_publish_retry", device_id=device_id, error=repr(error))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.forwarded += 1
            return True
        return False
