"""Ingestion: validate a batch for a device, make the accepted points durable, report per item.

``Ingestor.ingest`` is the entry point of HTTP:

1. find the device and its type in the in-memory projection (no SQL on the hot path; a
   device registered a moment ago is waited for, up to ``projection_wait_s``);
2. refuse with ``Overloaded`` (503 + Retry-After) when the process or the writer is behind;
3. ``process_batch`` (decode → transform → validate → derive; the points limit is live);
4. publish the accepted points as ONE message to the ``TELEMETRY`` stream, ``Nats-Msg-Id`` =
   a new ULID (or one derived from the client's ``Idempotency-Key``, see
   ``message_id_for_client_key``), and return after the PubAck: acknowledged means durable;
5. with ``wait_stored``, also wait until the writer committed it (queryable).

MQTT messages are durable in ``DEVICES_IN`` already: the MQTT consumer uses only steps 1
and 3 (``Ingestor.prepare``) and stores through the writer's ``BatchStore`` itself.

Overload thresholds (live-tunable under the config service ``telemetry``):

* ``max_inflight_publishes`` (default 1,000): publishes awaiting their PubAck in this
  process. Above it the call is refused at once (Retry-After: 1 s) instead of queueing.
* ``max_backlog_messages`` (default 20,000): messages the writer has not acked yet
  (``num_pending + num_ack_pending`` of ``telemetry-writer``, sampled every 0.5 s). Above it
  calls are refused with a Retry-After estimated from the writer's drain rate (1-30 s).
* the stream's byte limit (2 GiB, discard new): a full stream refuses the publish (503).

Nothing refused was accepted, so nothing is lost: the client retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import re
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from nats.errors import MaxPayloadError
from ulid import ULID

from fleetmesh.core.backbone import Backbone
from fleetmesh.core.clock import Clock
from fleetmesh.core.errors import FieldError, InvalidInput, Overloaded, PayloadTooLarge
from fleetmesh.core.ids import new_id
from fleetmesh.core.live_config import LiveConfig
from fleetmesh.core.logging import get_logger
from fleetmesh.telemetry import contracts
from fleetmesh.telemetry.contracts import IngestMessage, WirePoint
from fleetmesh.telemetry.domain import (
    MAX_BATCH_POINTS,
    Accepted,
    BatchTooLarge,
    InvalidSpec,
    MalformedBatch,
    Rejected,
    ValidationPolicy,
    process_batch,
)
from fleetmesh.telemetry.metrics import TelemetryMetrics
from fleetmesh.telemetry.projection import DeviceDirectory, DeviceNotActive, DeviceNotFound
from fleetmesh.telemetry.writer import WRITER_DURABLE, StoredNotifier

__all__ = [
    "Accepted",
    "BacklogMonitor",
    "BatchTooLarge",
    "DeviceNotActive",
    "DeviceNotFound",
    "IngestReport",
    "IngestSettings",
    "Ingestor",
    "MalformedBatch",
    "Overloaded",
    "Rejected",
    "message_id_for_client_key",
]

log = get_logger(__name__)

SERVICE: Final = "telemetry"
_MSG_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class IngestReport:
    """What became of one batch; ``accepted``/``rejected`` are in index order."""

    accepted: list[Accepted]
    rejected: list[Rejected]
    message_id: str
    """The TELEMETRY message id; point ids are ``<message_id>:<index>``."""
    stored: bool
    """True when the points were already queryable on return (``wait_stored``)."""
    item_count: int = 0
    published: bool = False
    """False when nothing was accepted (then nothing was published)."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated batch: what to answer, and the message that makes it durable (if any)."""

    report: IngestReport
    message: IngestMessage | None


class IngestSettings:
    """The live-tunable knobs, read from the configuration center on every call."""

    def __init__(self, live_config: LiveConfig) -> None:
        self.live_config = live_config
        self._policy_source: object = None
        self._policy = ValidationPolicy()

    def _get(self, key: str, default: Any) -> Any:
        return self.live_config.get(SERVICE, key, default)

    def _int(self, key: str, default: int, minimum: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            return default
        return int(value)

    @property
    def max_batch_points(self) -> int:
        return self._int("max_batch_points", MAX_BATCH_POINTS, 1)

    @property
    def max_inflight_publishes(self) -> int:
        return self._int("max_inflight_publishes", 1_000, 0)

    @property
    def max_backlog_messages(self) -> int:
        return self._int("max_backlog_messages", 20_000, 0)

    @property
    def projection_wait_s(self) -> float:
        value = self._get("projection_wait_s", 2.0)
        return float(value) if isinstance(value, int | float) and 0 <= value <= 30 else 2.0

    @property
    def policy(self) -> ValidationPolicy:
        """``telemetry.validation``: an object of ValidationPolicy fields, parsed per change."""
        source = self._get("validation", None)
        if source is self._policy_source:
            return self._policy
        policy = ValidationPolicy()
        if isinstance(source, dict):
            try:
                policy = ValidationPolicy(**source)
            except (InvalidSpec, TypeError) as error:
                log.warning("telemetry_validation_config_invalid", error=str(error))
        self._policy_source, self._policy = source, policy
        return policy


class BacklogMonitor:
    """Samples the writer consumer's backlog and drain rate every ``interval_s``."""

    def __init__(self, backbone: Backbone, *, interval_s: float = 0.5) -> None:
        self.backbone = backbone
        self.interval_s = interval_s
        self.backlog = 0
        self.drain_per_s = 0.0
        self._last: tuple[float, int] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.sample()
        self._task = asyncio.create_task(self._run(), name="telemetry-backlog")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def sample(self) -> None:
        info = await self.backbone.js.consumer_info(contracts.TELEMETRY_STREAM, WRITER_DURABLE)
        self.backlog = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        acked = int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
        now = time.monotonic()
        if self._last is not None and now > self._last[0]:
            rate = (acked - self._last[1]) / (now - self._last[0])
            self.drain_per_s = 0.7 * self.drain_per_s + 0.3 * max(0.0, rate)
        self._last = (now, acked)

    def retry_after_s(self, excess: int) -> int:
        """Seconds until the writer should have drained ``excess`` messages (1-30)."""
        if self.drain_per_s <= 0:
            return 5
        return max(1, min(30, math.ceil(excess / self.drain_per_s)))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # keep the last sample; try again next tick
                log.debug("telemetry_backlog_sample_failed", error=repr(error))


class Ingestor:
    """The shared ingestion interface of the telemetry context (HTTP, MQTT)."""

    def __init__(
        self,
        *,
        directory: DeviceDirectory,
        backbone: Backbone,
        notifier: StoredNotifier,
        clock: Clock,
        settings: IngestSettings,
        monitor: BacklogMonitor,
        metrics: TelemetryMetrics,
        publish_timeout_s: float = 5.0,
    ) -> None:
        self.directory = directory
        self.backbone = backbone
        self.notifier = notifier
        self.clock = clock
        self.settings = settings
        self.monitor = monitor
        self.metrics = metrics
        self.publish_timeout_s = publish_timeout_s
        self._inflight = 0

    async def ingest(
        self,
        device_id: str,
        raw: bytes,
        *,
        source: str = "http",
        received_at_ms: int | None = None,
        wait_stored: bool = False,
        wait_timeout_s: float = 10.0,
        msg_id: str | None = None,
    ) -> IngestReport:
        """Validate and durably accept one batch for a device; see the module docstring.

        ``msg_id`` (1-64 of ``[A-Za-z0-9_-]``) replaces the new ULID message id: a transport
        that redelivers the same input (MQTT) passes a deterministic one, so JetStream (within
        its duplicate window) and the writer (``telemetry_batches``) store it once.

        Raises ``DeviceNotFound`` (404), ``DeviceNotActive`` (409), ``MalformedBatch`` (400),
        ``BatchTooLarge`` (413) and ``Overloaded`` (503 with Retry-After).
        """
        self._admit()
        prepared = await self.prepare(
            device_id, raw, source=source, received_at_ms=received_at_ms, msg_id=msg_id
        )
        report, message = prepared.report, prepared.message
        if message is None:
            return report
        message_id = message.id
        stored_future = self.notifier.expect(message_id) if wait_stored else None
        try:
            await self._publish(device_id, message)
        except BaseException:
            self.notifier.forget(message_id)
            raise
        self.metrics.points_accepted.labels(source).inc(len(report.accepted))
        stored = False
        if stored_future is not None:
            stored = await self.notifier.wait(message_id, stored_future, wait_timeout_s)
        return replace(report, stored=stored)

    async def prepare(
        self,
        device_id: str,
        raw: bytes,
        *,
        source: str,
        received_at_ms: int | None = None,
        msg_id: str | None = None,
    ) -> Prepared:
        """Validate a batch without publishing it: the report, and the message to store.

        The message is None when no point was accepted. A transport that stores what it
        received itself (MQTT: ``DEVICES_IN`` is already durable) hands the message to the
        writer's ``BatchStore``; ``ingest`` publishes it to the ``TELEMETRY`` stream.
        Raises like ``ingest``, except ``Overloaded``.
        """
        _, device_type = await self.directory.require_device(
            device_id, wait_s=self.settings.projection_wait_s
        )
        now_ms = received_at_ms if received_at_ms is not None else self._now_ms()
        outcome = process_batch(
            raw,
            schema=device_type.schema,
            policy=self.settings.policy,
            now_ms=now_ms,
            transforms=device_type.transforms,
            max_points=self.settings.max_batch_points,
        )
        message_id = _checked_msg_id(msg_id) if msg_id is not None else new_id()
        self.metrics.points_rejected.labels(source).inc(len(outcome.rejected))
        report = IngestReport(
            outcome.accepted,
            outcome.rejected,
            message_id,
            False,
            outcome.item_count,
            published=bool(outcome.accepted),
        )
        if not outcome.accepted:
            return Prepared(report, None)
        message = IngestMessage(
            id=message_id,
            device_id=device_id,
            received_at_ms=now_ms,
            source=source,
            points=[
                WirePoint(a.index, a.metric, a.value, a.ts_ms, a.quality) for a in outcome.accepted
            ],
        )
        return Prepared(report, message)

    def _admit(self) -> None:
        limit = self.settings.max_inflight_publishes
        if self._inflight >= limit:
            self.metrics.overloaded.labels("inflight").inc()
            raise Overloaded(
                f"{self._inflight} telemetry publishes are in flight (limit {limit}); retry.",
                retry_after_s=1,
            )
        backlog, limit = self.monitor.backlog, self.settings.max_backlog_messages
        if backlog > limit:
            self.metrics.overloaded.labels("backlog").inc()
            raise Overloaded(
                f"The telemetry writer is {backlog} messages behind (limit {limit}); retry later.",
                retry_after_s=self.monitor.retry_after_s(backlog - limit),
            )

    async def _publish(self, device_id: str, message: IngestMessage) -> None:
        payload = contracts.encode_message(message)
        self._inflight += 1
        try:
            await self.backbone.publish(
                contracts.ingest_subject(device_id),
                payload,
                msg_id=message.id,
                timeout=self.publish_timeout_s,
            )
        except MaxPayloadError:
            raise PayloadTooLarge(
                f"The accepted points encode to {len(payload)} bytes, more than one message "
                "may carry; send smaller batches."
            ) from None
        except Exception as error:
            self.metrics.overloaded.labels("publish").inc()
            log.warning("telemetry_publish_failed", device_id=device_id, error=repr(error))
            raise Overloaded(
                "The telemetry stream did not confirm the batch; nothing was accepted, retry.",
                retry_after_s=2,
            ) from None
        finally:
            self._inflight -= 1

    def _now_ms(self) -> int:
        return (self.clock.now() - _EPOCH) // _ONE_MS


def _checked_msg_id(msg_id: str) -> str:
    if not _MSG_ID.fullmatch(msg_id):
        raise ValueError(f"msg_id must be 1-64 characters of [A-Za-z0-9_-], not {msg_id!r}")
    return msg_id


def message_id_for_client_key(device_id: str, client_key: str, body: bytes) -> str:
    """The message id of a batch a client may send more than once (HTTP ``Idempotency-Key``).

    The key is a ULID the client made for the batch and reuses on every retry. The message
    id keeps its time part (the writer forgets batch ids by ULID order) and replaces the
    random part by a hash of device, key and body: a retry of the same bytes is the same
    message, so JetStream and the writer store it once; another device, or other bytes sent
    with the same key by mistake, make another message instead of being silently dropped.
    """
    try:
        key = ULID.from_str(client_key)
    except ValueError:
        raise InvalidInput(
            "Idempotency-Key must be a ULID (26 characters of Crockford base32).",
            errors=[FieldError("Idempotency-Key", f"not a ULID: {client_key!r}", "invalid")],
        ) from None
    digest = hashlib.sha256(b"\0".join([device_id.encode(), key.bytes, body])).digest()
    return str(ULID.from_bytes(key.bytes[:6] + digest[:10]))
