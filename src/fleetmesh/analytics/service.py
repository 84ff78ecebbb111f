"""Use cases of the analytics service: the only place that commits.

Models are created here and trained by `jobs.TrainingJobs`; evaluation and
analysis read their data (inline, or a stored range through the telemetry API),
run the model's fitted detector over it in the scoring pool (the stored model is
never changed by scoring: each run starts from a copy of its fitted state), and
store the outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.analytics import contracts
from fleetmesh.analytics.domain import (
    Analysis,
    AnalysisNotFound,
    Anomaly,
    AnomalySource,
    Deployment,
    DeploymentNotFound,
    DeploymentStatus,
    InvalidAnalyticsInput,
    Model,
    ModelNotFound,
    ModelNotReady,
    ModelStatus,
    SeriesRef,
    default_threshold,
    evaluate_scores,
    from_ms,
    resolve_algorithm,
    score_summary,
    window_rows_from_times,
    windows_from_labels,
)
from fleetmesh.analytics.reader import TelemetryReader
from fleetmesh.analytics.repository import AnomalyQuery, SqlAnalyticsRepository
from fleetmesh.analytics.scoring import ScoringPool
from fleetmesh.core.clock import Clock, to_rfc3339
from fleetmesh.core.database import Database
from fleetmesh.core.errors import FieldError
from fleetmesh.core.ids import new_id
from fleetmesh.core.uow import SqlUnitOfWork

MAX_SERIES_POINTS = 500_000
MAX_ANALYSIS_ANOMALIES = 10_000
MAX_DEPLOYMENT_DEVICES = 1000


class AnalyticsUnitOfWork(SqlUnitOfWork):
    repo: SqlAnalyticsRepository

    def _open(self, session: AsyncSession) -> None:
        self.repo = SqlAnalyticsRepository(session)


UnitOfWorkFactory = Callable[[], AnalyticsUnitOfWork]


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class CreateModel:
    name: str
    algorithm: str
    parameters: dict[str, Any]
    training: SeriesRef
    threshold: float | None = None


@dataclass(frozen=True, slots=True)
class InlineSeries:
    """Points given in the request; sorted by time (labels, if any, move with their points)."""

    ts_ms: list[int]
    values: list[float]
    labels: list[int] | None = None

    @classmethod
    def of(
        cls, points: Sequence[tuple[int, float]], labels: Sequence[int] | None = None
    ) -> InlineSeries:
        if labels is not None and len(labels) != len(points):
            raise InvalidAnalyticsInput(
                f"{len(labels)} labels for {len(points)} points; give one label per point.",
                errors=[FieldError("labels", "one label per point", "length_mismatch")],
            )
        order = sorted(range(len(points)), key=lambda i: points[i][0])
        return cls(
            [points[i][0] for i in order],
            [points[i][1] for i in order],
            [int(labels[i]) for i in order] if labels is not None else None,
        )


SeriesSource = InlineSeries | SeriesRef


@dataclass(frozen=True, slots=True)
class Labels:
    """Validation truth: time windows (inclusive, epoch ms) or one 0/1 label per point."""

    windows_ms: tuple[tuple[int, int], ...] | None = None
    labels: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class DeploySelector:
    metric: str | None
    device_ids: tuple[str, ...] | None = None
    device_type: str | None = None

    def validate(self) -> None:
        if (self.device_ids is None) == (self.device_type is None):
            raise InvalidAnalyticsInput(
                "Select devices with exactly one of `device_ids` or `device_type`.",
                errors=[FieldError("device_ids", "give device_ids or device_type", "selector")],
            )
        if self.device_ids is not None and not 1 <= len(self.device_ids) <= MAX_DEPLOYMENT_DEVICES:
            raise InvalidAnalyticsInput(
                f"`device_ids` needs 1 to {MAX_DEPLOYMENT_DEVICES} ids.",
                errors=[FieldError("device_ids", "1 to 1000 ids", "length")],
            )


@dataclass(frozen=True, slots=True)
class LoadedSeries:
    ts_ms: list[int]
    values: list[float]
    read_s: float


# --------------------------------------------------------------------------- use cases


async def create_model(command: CreateModel, *, uow: AnalyticsUnitOfWork, clock: Clock) -> Model:
    """Record a new model version in `training`; `TrainingJobs.start` fits it."""
    algorithm = resolve_algorithm(command.algorithm, command.parameters)
    command.training.validate("training.")
    threshold = command.threshold if command.threshold is not None else default_threshold(algorithm)
    conflicts = 0
    while True:  # two creations of one name may race for a version: take the next one
        async with uow:
            now = clock.now()
            model = Model(
                id=new_id(),
                name=command.name,
                version=await uow.repo.next_version(command.name),
                algorithm=algorithm,
                parameters=dict(command.parameters),
                threshold=threshold,
                training=command.training,
                status=ModelStatus.training,
                created_at=now,
                updated_at=now,
            )
            await uow.repo.add_model(model)
            try:
                await uow.commit()
                return model
            except IntegrityError:
                conflicts += 1
                if conflicts >= 3:
                    raise


async def store_anomalies(
    uow: AnalyticsUnitOfWork,
    found: Sequence[Anomaly],
    *,
    correlation_id: str | None = None,
    causation_id: str | None = None,
) -> list[Anomaly]:
    """Insert the anomalies not stored yet (unique per source/device/metric/ts), with events."""
    groups: dict[tuple[str, str, str], list[Anomaly]] = {}
    for anomaly in found:
        groups.setdefault((anomaly.source_key, anomaly.device_id, anomaly.metric), []).append(
            anomaly
        )
    new: list[Anomaly] = []
    for (source_key, device_id, metric), items in groups.items():
        taken = await uow.repo.existing_anomaly_times(
            source_key, device_id, metric, [a.ts for a in items]
        )
        seen: set[datetime] = set()
        for anomaly in items:
            if anomaly.ts not in taken and anomaly.ts not in seen:
                seen.add(anomaly.ts)
                new.append(anomaly)
    await uow.repo.add_anomalies(new)
    for anomaly in new:
        uow.emit(
            contracts.anomaly_detected(
                anomaly, correlation_id=correlation_id, causation_id=causation_id
            )
        )
    return new


class AnalyticsService:
    """Evaluation, analysis and deployment; reads go through `AnalyticsQueries`."""

    def __init__(
        self,
        *,
        uow_factory: UnitOfWorkFactory,
        queries: AnalyticsQueries,
        reader: TelemetryReader,
        pool: ScoringPool,
        clock: Clock,
        on_deployments_changed: Callable[[], None] | None = None,
    ) -> None:
        self.uow_factory = uow_factory
        self.queries = queries
        self.reader = reader
        self.pool = pool
        self.clock = clock
        self.on_deployments_changed = on_deployments_changed

    async def load(self, source: SeriesSource) -> LoadedSeries:
        """The numeric points of the source, in time order (at most MAX_SERIES_POINTS)."""
        if isinstance(source, InlineSeries):
            return LoadedSeries(source.ts_ms, source.values, 0.0)
        source.validate("range.")
        started = time.perf_counter()
        ts_ms: list[int] = []
        values: list[float] = []
        async for page in self.reader.read(
            source.device_id, source.metric, source.start_ms, source.end_ms
        ):
            ts_ms.extend(page.ts_ms)
            values.extend(page.values)
            if len(ts_ms) > MAX_SERIES_POINTS:
                raise InvalidAnalyticsInput(
                    f"The range holds more than {MAX_SERIES_POINTS} points; split it.",
                    errors=[FieldError("range", "too many points", "too_many")],
                )
        return LoadedSeries(ts_ms, values, time.perf_counter() - started)

    async def evaluate(self, model_id: str, source: SeriesSource, truth: Labels) -> dict[str, Any]:
        """Score labelled data with the model; the result is stored as the model's evaluation."""
        model = await self.queries.get_model(model_id, with_state=True)
        state = model.require_ready()
        series = await self.load(source)
        if not series.ts_ms:
            raise _no_points()
        if truth.labels is not None:
            labels = list(truth.labels)
            if isinstance(source, InlineSeries) and source.labels is not None:
                labels = source.labels
            if len(labels) != len(series.ts_ms):
                raise InvalidAnalyticsInput(
                    f"{len(labels)} labels for {len(series.ts_ms)} numeric points.",
                    errors=[FieldError("labels", "one label per point", "length_mismatch")],
                )
            windows = windows_from_labels(labels)
        else:
            windows = window_rows_from_times(series.ts_ms, truth.windows_ms or ())
        started = time.perf_counter()
        _, scores = await self.pool.run(state, series.ts_ms, series.values)
        result = await asyncio.to_thread(evaluate_scores, scores, windows, model.threshold)
        evaluated_at = self.clock.now()
        result.update(
            {
                "id": new_id(),
                "evaluated_at": to_rfc3339(evaluated_at),
                "input": _input_description(source, len(series.ts_ms)),
                "label_kind": "labels" if truth.labels is not None else "windows",
                "window_times": [
                    [to_rfc3339(from_ms(series.ts_ms[a])), to_rfc3339(from_ms(series.ts_ms[b]))]
                    for a, b in windows
                ],
                "duration_s": time.perf_counter() - started + series.read_s,
            }
        )
        async with self.uow_factory() as uow:
            await uow.repo.update_model(model.id, evaluation=result, updated_at=evaluated_at)
            await uow.commit()
        return result

    async def analyze(self, model_id: str, source: SeriesSource) -> Analysis:
        """Run the model over the data; store the result, its anomalies and its events."""
        started = time.perf_counter()
        model = await self.queries.get_model(model_id, with_state=True)
        state = model.require_ready()
        series = await self.load(source)
        scoring_started = time.perf_counter()
        _, scores = await self.pool.run(state, series.ts_ms, series.values)
        score_s = time.perf_counter() - scoring_started
        flagged = [i for i, score in enumerate(scores) if score >= model.threshold]
        analysis_id = new_id()
        now = self.clock.now()
        found = [
            {
                "ts": to_rfc3339(from_ms(series.ts_ms[i])),
                "value": series.values[i],
                "score": scores[i],
            }
            for i in flagged[:MAX_ANALYSIS_ANOMALIES]
        ]
        summary = score_summary(scores, model.threshold)
        summary["anomalies"] = len(flagged)
        summary["anomalies_truncated"] = len(flagged) > MAX_ANALYSIS_ANOMALIES
        duration = time.perf_counter() - started
        points = len(series.ts_ms)
        analysis = Analysis(
            id=analysis_id,
            model_id=model.id,
            input=_input_description(source, points),
            summary=summary,
            anomalies=found,
            created_at=now,
            timing={
                "points": points,
                "read_s": series.read_s,
                "score_s": score_s,
                "duration_s": duration,
                "points_per_s": points / duration if duration > 0 else None,
                "scoring_points_per_s": points / score_s if score_s > 0 else None,
            },
        )
        async with self.uow_factory() as uow:
            await uow.repo.add_analysis(analysis)
            if isinstance(source, SeriesRef):
                records = [
                    Anomaly(
                        id=new_id(),
                        device_id=source.device_id,
                        metric=source.metric,
                        ts=from_ms(series.ts_ms[i]),
                        value=series.values[i],
                        score=scores[i],
                        threshold=model.threshold,
                        model_id=model.id,
                        source=AnomalySource.analysis,
                        detected_at=now,
                        analysis_id=analysis_id,
                    )
                    for i in flagged[:MAX_ANALYSIS_ANOMALIES]
                ]
                await store_anomalies(uow, records, correlation_id=analysis_id)
            uow.emit(contracts.analysis_completed(analysis, model))
            await uow.commit()
        return analysis

    async def deploy(self, model_id: str, selector: DeploySelector) -> tuple[Deployment, bool]:
        """Attach a ready model; the same selector twice returns the existing deployment."""
        selector.validate()
        model = await self.queries.get_model(model_id)
        if model.status is not ModelStatus.ready:
            raise ModelNotReady(f"Model {model.id} is {model.status.value}; deploy a ready model.")
        candidate = Deployment(
            id=new_id(),
            model_id=model.id,
            metric=selector.metric or model.training.metric,
            device_ids=tuple(dict.fromkeys(selector.device_ids)) if selector.device_ids else None,
            device_type=selector.device_type,
            status=DeploymentStatus.active,
            created_at=self.clock.now(),
        )
        async with self.uow_factory() as uow:
            active = await uow.repo.list_deployments(
                model_id=model.id, status=DeploymentStatus.active
            )
            for existing in active:
                if existing.same_selector(candidate):
                    return existing, False
            await uow.repo.add_deployment(candidate)
            await uow.commit()
        self._deployments_changed()
        return candidate, True

    async def undeploy(self, model_id: str, deployment_id: str | None = None) -> list[Deployment]:
        """Detach the model (one deployment, or all its active ones)."""
        await self.queries.get_model(model_id)
        async with self.uow_factory() as uow:
            active = await uow.repo.list_deployments(
                model_id=model_id, status=DeploymentStatus.active
            )
            if deployment_id is not None:
                active = [d for d in active if d.id == deployment_id]
                if not active:
                    raise DeploymentNotFound(
                        f"Model {model_id} has no active deployment {deployment_id!r}."
                    )
            now = self.clock.now()
            for deployment in active:
                deployment.status = DeploymentStatus.undeployed
                deployment.undeployed_at = now
                await uow.repo.save_deployment(deployment)
            await uow.commit()
        self._deployments_changed()
        return active

    def _deployments_changed(self) -> None:
        if self.on_deployments_changed is not None:
            self.on_deployments_changed()


def _no_points() -> InvalidAnalyticsInput:
    return InvalidAnalyticsInput(
        "There are no numeric points to score.",
        errors=[FieldError("series", "no numeric points", "empty")],
    )


def _input_description(source: SeriesSource, points: int) -> dict[str, Any]:
    if isinstance(source, InlineSeries):
        return {"kind": "series", "points": points}
    return {"kind": "range", **source.as_dict(), "points": points}


class AnalyticsQueries:
    """Read side: lookups that change nothing."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def get_model(self, model_id: str, *, with_state: bool = False) -> Model:
        async with self.database.session() as session:
            model = await SqlAnalyticsRepository(session).get_model(model_id, with_state=with_state)
        if model is None:
            raise ModelNotFound(f"Model {model_id!r} does not exist.")
        return model

    async def list_models(
        self, *, name: str | None, status: ModelStatus | None, before_id: str | None, limit: int
    ) -> list[Model]:
        async with self.database.session() as session:
            return await SqlAnalyticsRepository(session).list_models(
                name=name, status=status, before_id=before_id, limit=limit
            )

    async def get_analysis(self, analysis_id: str) -> Analysis:
        async with self.database.session() as session:
            analysis = await SqlAnalyticsRepository(session).get_analysis(analysis_id)
        if analysis is None:
            raise AnalysisNotFound(f"Analysis {analysis_id!r} does not exist.")
        return analysis

    async def list_anomalies(self, query: AnomalyQuery) -> list[Anomaly]:
        async with self.database.session() as session:
            return await SqlAnalyticsRepository(session).list_anomalies(query)

    async def list_deployments(
        self,
        *,
        model_id: str | None = None,
        status: DeploymentStatus | None = None,
        after_id: str | None = None,
        limit: int = 1000,
    ) -> list[Deployment]:
        async with self.database.session() as session:
            return await SqlAnalyticsRepository(session).list_deployments(
                model_id=model_id, status=status, after_id=after_id, limit=limit
            )

    async def get_deployment(self, deployment_id: str) -> Deployment:
        async with self.database.session() as session:
            deployment = await SqlAnalyticsRepository(session).get_deployment(deployment_id)
        if deployment is None:
            raise DeploymentNotFound(f"Deployment {deployment_id!r} does not exist.")
        return deployment
