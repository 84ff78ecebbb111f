"""NATS consumers of the analytics service: streaming detection and the device projection.

Streaming detection (durable consumer `analytics-telemetry-collected` on
`events.telemetry.collected.v1`): for each collected batch, the active
deployments that match the device and one of the batch's metrics fetch the
batch's points (`first_ts`..`last_ts`) through the telemetry API and score them
with a per-(deployment, device) detector. The detector starts from the model's
fitted state, or from its last checkpoint; checkpoints (JSON state + the last
scored ts) are written every few seconds and at shutdown, so a restart continues
where the last checkpoint left it.

* Points at or before the detector's last scored ts are skipped (a detector
  learns in time order): redelivered batches and late points are not rescored.
* Every point scoring at least the model's threshold is an anomaly: stored and
  announced by `fleetmesh.anomaly.detected.v1` in one transaction. Anomalies are
  unique per (deployment, device, metric, ts), so rescoring after a restart
  from an older checkpoint produces no duplicates.
* A deployment scores batches received after it was created. The active deployments
  are read again at once after a change made in this process, and at least every
  `ACTIVE_TTL_S` (changes made by another process).

Failures are retried with backoff (`max_deliver` deliveries), then the message is
dead-lettered into `analytics_dead_letters` with its reason and acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from fleetmesh.analytics import contracts
from fleetmesh.analytics.detectors import Detector
from fleetmesh.analytics.domain import (
    Anomaly,
    AnomalySource,
    Deployment,
    DeploymentStatus,
    from_ms,
    parse_ts,
)
from fleetmesh.analytics.reader import DeviceDirectory, TelemetryReader
from fleetmesh.analytics.repository import Checkpoint, SqlAnalyticsRepository
from fleetmesh.analytics.scoring import ScoringPool
from fleetmesh.analytics.service import UnitOfWorkFactory, store_anomalies
from fleetmesh.core.backbone import EVENTS_STREAM, Backbone
from fleetmesh.core.clock import Clock, from_rfc3339
from fleetmesh.core.database import Database
from fleetmesh.core.errors import FleetmeshError
from fleetmesh.core.ids import new_id
from fleetmesh.core.logging import get_logger

log = get_logger(__name__)

MAX_DELIVER = 5
ACTIVE_TTL_S = 1.0
RETRY_DELAYS_S = (0.5, 2.0, 5.0, 10.0)
ACK_WAIT_S = 120.0
FETCH_BATCH = 20
CHECKPOINT_EVERY_S = 5.0

EventHandler = Callable[[dict[str, Any]], Awaitable[None]]


class PermanentFailure(Exception):
    """A message that can never be handled (dead-lettered without retries)."""


# --------------------------------------------------------------------------- consumer runner


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    durable: str
    subject: str
    handler: EventHandler
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL


class DurableConsumer:
    """A durable pull consumer on EVENTS: explicit acks, retries with backoff, dead letters."""

    def __init__(
        self, backbone: Backbone, uow_factory: UnitOfWorkFactory, clock: Clock, spec: ConsumerSpec
    ) -> None:
        self.backbone = backbone
        self.uow_factory = uow_factory
        self.clock = clock
        self.spec = spec
        self._task: asyncio.Task[None] | None = None
        self._subscription: Any = None

    async def start(self) -> None:
        config = ConsumerConfig(
            durable_name=self.spec.durable,
            filter_subject=self.spec.subject,
            deliver_policy=self.spec.deliver_policy,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT_S,
            max_deliver=MAX_DELIVER,
            max_ack_pending=1000,
        )
        self._subscription = await self.backbone.js.pull_subscribe(
            self.spec.subject, durable=self.spec.durable, stream=EVENTS_STREAM, config=config
        )
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.spec.durable}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _run(self) -> None:
        while True:
            try:
                messages = await self._subscription.fetch(FETCH_BATCH, timeout=1.0)
            except TimeoutError:  # nothing to fetch (NATS' TimeoutError is one too)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("analytics_fetch_failed", consumer=self.spec.durable, error=repr(error))
                await asyncio.sleep(1.0)
                continue
            for message in messages:
                await self._handle(message)

    async def _handle(self, message: Any) -> None:
        try:
            try:
                event = msgspec.json.decode(message.data)
            except msgspec.DecodeError as error:
                raise PermanentFailure(f"not JSON: {error}") from None
            if not isinstance(event, dict):
                raise PermanentFailure("not a CloudEvent object")
            await self.spec.handler(event)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            await self._failed(message, error)
            return
        await message.ack()

    async def _failed(self, message: Any, error: Exception) -> None:
        deliveries = int(message.metadata.num_delivered)
        permanent = isinstance(error, PermanentFailure)
        if not permanent and deliveries < MAX_DELIVER:
            delay = RETRY_DELAYS_S[min(deliveries - 1, len(RETRY_DELAYS_S) - 1)]
            log.warning(
                "analytics_event_retry",
                consumer=self.spec.durable,
                deliveries=deliveries,
                retry_in_s=delay,
                error=repr(error),
            )
            await message.nak(delay=delay)
            return
        reason = _reason(error)
        log.error(
            "analytics_event_dead_lettered",
            consumer=self.spec.durable,
            subject=message.subject,
            reason=reason,
        )
        try:
            async with self.uow_factory() as uow:
                await uow.repo.add_dead_letter(
                    id=new_id(),
                    consumer=self.spec.durable,
                    subject=message.subject,
                    stream_sequence=int(message.metadata.sequence.stream),
                    deliveries=deliveries,
                    payload=bytes(message.data).decode("utf-8", "replace"),
                    reason=reason,
                    failed_at=self.clock.now(),
                )
                await uow.commit()
        except Exception as store_error:
            # Not stored: leave it to JetStream to redeliver rather than lose it.
            log.error("analytics_dead_letter_failed", error=repr(store_error))
            await message.nak(delay=RETRY_DELAYS_S[-1])
            return
        await message.term()


def _reason(error: Exception) -> str:
    if isinstance(error, FleetmeshError | PermanentFailure):
        return f"{type(error).__name__}: {error}"
    lines = traceback.format_exception_only(type(error), error)
    return "".join(lines).strip()[:2000]


# --------------------------------------------------------------------------- streaming detection


@dataclass
class _Live:
    """A deployment's detector for one device, as it runs."""

    detector: Detector
    last_ts_ms: int | None
    points: int
    dirty: bool = False


@dataclass(frozen=True, slots=True)
class _ModelFacts:
    state: dict[str, Any]
    threshold: float


class StreamingDetection:
    """Scores collected telemetry with the deployed models."""

    def __init__(
        self,
        *,
        database: Database,
        uow_factory: UnitOfWorkFactory,
        reader: TelemetryReader,
        directory: DeviceDirectory,
        pool: ScoringPool,
        clock: Clock,
        checkpoint_every_s: float = CHECKPOINT_EVERY_S,
    ) -> None:
        self.pool = pool
        self.database = database
        self.uow_factory = uow_factory
        self.reader = reader
        self.directory = directory
        self.clock = clock
        self.checkpoint_every_s = checkpoint_every_s
        self._live: dict[tuple[str, str], _Live] = {}
        self._models: dict[str, _ModelFacts] = {}
        self._active: tuple[float, list[Deployment]] | None = None
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_loop(), name="analytics-checkpoints")

    async def stop(self) -> None:
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        await self.flush()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_every_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("analytics_checkpoint_failed", error=repr(error))

    async def flush(self) -> int:
        """Write the checkpoints of detectors that learnt since the last flush."""
        async with self._lock:
            dirty = [(key, live) for key, live in self._live.items() if live.dirty]
            if not dirty:
                return 0
            snapshots = [
                Checkpoint(
                    key[0],
                    key[1],
                    await self.pool.call(live.detector.get_state),
                    live.last_ts_ms,
                    live.points,
                )
                for key, live in dirty
            ]
            async with self.uow_factory() as uow:
                now = self.clock.now()
                for checkpoint in snapshots:
                    await uow.repo.save_checkpoint(checkpoint, now=now)
                await uow.commit()
            for _, live in dirty:
                live.dirty = False
        return len(snapshots)

    def forget(self) -> None:
        """Drop every live detector: each reloads from its checkpoint on its next batch."""
        self._live.clear()

    # ------------------------------------------------------------------ handling

    async def handle_collected(self, event: dict[str, Any]) -> None:
        data = event.get("data")
        if not isinstance(data, dict):
            raise PermanentFailure("collected event without data")
        try:
            device_id = str(data["device_id"])
            metrics = {str(m) for m in data.get("metrics") or []}
            first_ms = parse_ts(data["first_ts"], "first_ts")
            last_ms = parse_ts(data["last_ts"], "last_ts")
        except (KeyError, TypeError, FleetmeshError) as error:
            raise PermanentFailure(f"malformed collected event: {error!r}") from None
        received = _received_at(event, data)
        deployments = await self._matching(device_id, metrics, received)
        if not deployments:
            return
        series: dict[str, tuple[list[int], list[float]]] = {}
        for metric in sorted({d.metric for d in deployments}):
            series[metric] = await self._read(device_id, metric, first_ms, last_ms)
        async with self._lock:
            await self._score(event, device_id, deployments, series)

    def deployments_changed(self) -> None:
        """A deployment was made or removed in this process: read them again at once."""
        self._active = None

    async def _active_deployments(self) -> list[Deployment]:
        """The active deployments, read at most once per `ACTIVE_TTL_S` (per event is costly
        when every device reports: changes made by another process show within that time)."""
        now = time.monotonic()
        if self._active is None or now - self._active[0] >= ACTIVE_TTL_S:
            async with self.database.session() as session:
                active = await SqlAnalyticsRepository(session).list_deployments(
                    status=DeploymentStatus.active
                )
            self._active = (now, active)
        return self._active[1]

    async def _matching(
        self, device_id: str, metrics: set[str], received: datetime | None
    ) -> list[Deployment]:
        active = await self._active_deployments()
        active_ids = {d.id for d in active}
        for key in [key for key in self._live if key[0] not in active_ids]:
            del self._live[key]
        candidates = [
            d
            for d in active
            if (not metrics or d.metric in metrics)
            and (received is None or received >= d.created_at)
        ]
        if not candidates:
            return []
        device_type = None
        if any(d.needs_device_type for d in candidates):
            device_type = await self._device_type(device_id)
        return [d for d in candidates if d.matches(device_id, device_type)]

    async def _device_type(self, device_id: str) -> str | None:
        async with self.database.session() as session:
            known = await SqlAnalyticsRepository(session).device_type(device_id)
        if known is not None:
            return known[0]
        type_name = await self.directory.device_type(device_id)
        if type_name is not None:
            async with self.uow_factory() as uow:
                await uow.repo.put_device(device_id, type_name, active=True, now=self.clock.now())
                await uow.commit()
        return type_name

    async def _read(
        self, device_id: str, metric: str, first_ms: int, last_ms: int
    ) -> tuple[list[int], list[float]]:
        ts_ms: list[int] = []
        values: list[float] = []
        async for page in self.reader.read(device_id, metric, first_ms, last_ms):
            ts_ms.extend(page.ts_ms)
            values.extend(page.values)
        return ts_ms, values

    async def _score(
        self,
        event: dict[str, Any],
        device_id: str,
        deployments: Sequence[Deployment],
        series: dict[str, tuple[list[int], list[float]]],
    ) -> None:
        found: list[Anomaly] = []
        touched: list[tuple[str, str]] = []
        now = self.clock.now()
        for deployment in deployments:
            facts = await self._model(deployment.model_id)
            key = (deployment.id, device_id)
            live = await self._live_detector(key, facts)
            all_ts, all_values = series[deployment.metric]
            start = 0
            if live.last_ts_ms is not None:
                start = next(
                    (i for i, ts in enumerate(all_ts) if ts > live.last_ts_ms), len(all_ts)
                )
            ts_ms, values = all_ts[start:], all_values[start:]
            if not ts_ms:
                continue
            scores = await self.pool.score(live.detector, ts_ms, values)
            live.last_ts_ms = ts_ms[-1]
            live.points += len(ts_ms)
            live.dirty = True
            touched.append(key)
            found.extend(
                Anomaly(
                    id=new_id(),
                    device_id=device_id,
                    metric=deployment.metric,
                    ts=from_ms(ts),
                    value=value,
                    score=score,
                    threshold=facts.threshold,
                    model_id=deployment.model_id,
                    source=AnomalySource.streaming,
                    detected_at=now,
                    deployment_id=deployment.id,
                )
                for ts, value, score in zip(ts_ms, values, scores, strict=True)
                if score >= facts.threshold
            )
        if not found:
            return
        try:
            async with self.uow_factory() as uow:
                await store_anomalies(
                    uow,
                    found,
                    correlation_id=event.get("correlationid") or event.get("id"),
                    causation_id=event.get("id"),
                )
                await uow.commit()
        except Exception:
            # The detectors moved past points whose anomalies were not stored: drop them,
            # so the redelivery rescores from the last checkpoint.
            for key in touched:
                self._live.pop(key, None)
            raise

    async def _model(self, model_id: str) -> _ModelFacts:
        facts = self._models.get(model_id)
        if facts is None:
            async with self.database.session() as session:
                model = await SqlAnalyticsRepository(session).get_model(model_id)
            if model is None or model.fitted_state is None:
                raise PermanentFailure(f"deployed model {model_id} has no fitted state")
            facts = self._models[model_id] = _ModelFacts(model.fitted_state, model.threshold)
        return facts

    async def _live_detector(self, key: tuple[str, str], facts: _ModelFacts) -> _Live:
        live = self._live.get(key)
        if live is not None:
            return live
        async with self.database.session() as session:
            checkpoint = await SqlAnalyticsRepository(session).get_checkpoint(*key)
        if checkpoint is not None:
            state, last_ts, points = checkpoint.state, checkpoint.last_ts_ms, checkpoint.points
        else:
            state, last_ts, points = facts.state, None, 0
        detector = await self.pool.detector(state)
        live = self._live[key] = _Live(detector, last_ts, points)
        return live


def _received_at(event: dict[str, Any], data: dict[str, Any]) -> datetime | None:
    for raw in (data.get("received_at"), event.get("time")):
        if isinstance(raw, str):
            with contextlib.suppress(ValueError):
                return from_rfc3339(raw)
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return from_ms(int(raw))
    return None


# --------------------------------------------------------------------------- device projection


class DeviceProjection:
    """Device id -> type, from the device registry's events (for `device_type` selectors)."""

    def __init__(self, uow_factory: UnitOfWorkFactory, clock: Clock) -> None:
        self.uow_factory = uow_factory
        self.clock = clock

    async def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind not in (contracts.DEVICE_REGISTERED, contracts.DEVICE_DEREGISTERED):
            return
        data = event.get("data")
        if not isinstance(data, dict) or not data.get("device_id") or not data.get("type"):
            return
        async with self.uow_factory() as uow:
            await uow.repo.put_device(
                str(data["device_id"]),
                str(data["type"]),
                active=kind == contracts.DEVICE_REGISTERED,
                now=self.clock.now(),
            )
            await uow.commit()
