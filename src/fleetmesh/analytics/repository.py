"""Tables of the analytics service and their SQLAlchemy adapters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.analytics.domain import (
    Analysis,
    Anomaly,
    AnomalySource,
    Deployment,
    DeploymentStatus,
    Model,
    ModelStatus,
    SeriesRef,
    from_ms,
    to_ms,
)
from fleetmesh.core.sqltypes import UtcDateTime

metadata = MetaData()

models = Table(
    "analytics_models",
    metadata,
    Column("id", String(26), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("version", Integer, nullable=False),
    Column("algorithm", String(64), nullable=False),
    Column("parameters", JSON, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("training_device_id", String(64), nullable=False),
    Column("training_metric", String(128), nullable=False),
    Column("training_from", UtcDateTime(), nullable=False),
    Column("training_to", UtcDateTime(), nullable=False),
    Column("training_points", BigInteger, nullable=False),
    Column("training_summary", JSON, nullable=True),
    Column("evaluation", JSON, nullable=True),
    Column("status", String(16), nullable=False),
    Column("progress", Float, nullable=False),
    Column("error", Text, nullable=True),
    Column("fitted_state", JSON, nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("completed_at", UtcDateTime(), nullable=True),
    UniqueConstraint("name", "version", name="uq_analytics_models_name_version"),
    Index("ix_analytics_models_status", "status"),
)

deployments = Table(
    "analytics_deployments",
    metadata,
    Column("id", String(26), primary_key=True),
    Column("model_id", String(26), nullable=False),
    Column("metric", String(128), nullable=False),
    Column("device_ids", JSON, nullable=True),
    Column("device_type", String(63), nullable=True),
    Column("status", String(16), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("undeployed_at", UtcDateTime(), nullable=True),
    Index("ix_analytics_deployments_status", "status"),
    Index("ix_analytics_deployments_model_id", "model_id"),
)

checkpoints = Table(
    "analytics_checkpoints",
    metadata,
    Column("deployment_id", String(26), primary_key=True),
    Column("device_id", String(64), primary_key=True),
    Column("state", JSON, nullable=False),
    Column("last_ts", UtcDateTime(), nullable=True),
    Column("points", BigInteger, nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)

analyses = Table(
    "analytics_analyses",
    metadata,
    Column("id", String(26), primary_key=True),
    Column("model_id", String(26), nullable=False),
    Column("input", JSON, nullable=False),
    Column("summary", JSON, nullable=False),
    Column("anomalies", JSON, nullable=False),
    Column("timing", JSON, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
)

anomalies = Table(
    "analytics_anomalies",
    metadata,
    Column("id", String(26), primary_key=True),
    Column("source_key", String(64), nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("metric", String(128), nullable=False),
    Column("ts", UtcDateTime(), nullable=False),
    Column("value", Float, nullable=False),
    Column("score", Float, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("model_id", String(26), nullable=False),
    Column("deployment_id", String(26), nullable=True),
    Column("analysis_id", String(26), nullable=True),
    Column("source", String(16), nullable=False),
    Column("detected_at", UtcDateTime(), nullable=False),
    UniqueConstraint(
        "source_key", "device_id", "metric", "ts", name="uq_analytics_anomalies_source_point"
    ),
    Index("ix_analytics_anomalies_device_ts", "device_id", "ts"),
    Index("ix_analytics_anomalies_ts", "ts"),
)

devices = Table(
    "analytics_devices",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("type_name", String(63), nullable=False),
    Column("active", Boolean, nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)

dead_letters = Table(
    "analytics_dead_letters",
    metadata,
    Column("id", String(26), primary_key=True),
    Column("consumer", String(100), nullable=False),
    Column("subject", String(255), nullable=False),
    Column("stream_sequence", BigInteger, nullable=False),
    Column("deliveries", Integer, nullable=False),
    Column("payload", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("failed_at", UtcDateTime(), nullable=False),
)

# Everything but the (large) fitted state, for lists and progress polling.
_MODEL_SUMMARY_COLUMNS = [c for c in models.c if c.name != "fitted_state"]


@dataclass(frozen=True, slots=True)
class AnomalyQuery:
    device_id: str | None = None
    metric: str | None = None
    model_id: str | None = None
    source: AnomalySource | None = None
    time_from: datetime | None = None
    time_to: datetime | None = None
    before: tuple[datetime, str] | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class Checkpoint:
    deployment_id: str
    device_id: str
    state: dict[str, Any]
    last_ts_ms: int | None
    points: int


class SqlAnalyticsRepository:
    """Models, deployments, checkpoints, analyses, anomalies and the device projection."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # ------------------------------------------------------------------ models

    async def next_version(self, name: str) -> int:
        current = await self.session.scalar(
            select(func.max(models.c.version)).where(models.c.name == name)
        )
        return int(current or 0) + 1

    async def add_model(self, model: Model) -> None:
        await self.session.execute(insert(models).values(**_model_row(model)))

    async def get_model(self, model_id: str, *, with_state: bool = True) -> Model | None:
        columns = list(models.c) if with_state else _MODEL_SUMMARY_COLUMNS
        row = (await self.session.execute(select(*columns).where(models.c.id == model_id))).first()
        return _model_from_row(row) if row else None

    async def list_models(
        self, *, name: str | None, status: ModelStatus | None, before_id: str | None, limit: int
    ) -> list[Model]:
        statement = select(*_MODEL_SUMMARY_COLUMNS).order_by(models.c.id.desc()).limit(limit)
        if name is not None:
            statement = statement.where(models.c.name == name)
        if status is not None:
            statement = statement.where(models.c.status == status.value)
        if before_id is not None:
            statement = statement.where(models.c.id < before_id)
        rows = (await self.session.execute(statement)).all()
        return [_model_from_row(row) for row in rows]

    async def update_model(self, model_id: str, **values: Any) -> None:
        await self.session.execute(update(models).where(models.c.id == model_id).values(**values))

    async def training_models(self) -> list[tuple[str, datetime]]:
        rows = await self.session.execute(
            select(models.c.id, models.c.updated_at).where(
                models.c.status == ModelStatus.training.value
            )
        )
        return [(row.id, row.updated_at) for row in rows]

    # ------------------------------------------------------------------ deployments

    async def add_deployment(self, deployment: Deployment) -> None:
        await self.session.execute(insert(deployments).values(**_deployment_row(deployment)))

    async def get_deployment(self, deployment_id: str) -> Deployment | None:
        row = (
            await self.session.execute(select(deployments).where(deployments.c.id == deployment_id))
        ).first()
        return _deployment_from_row(row) if row else None

    async def list_deployments(
        self,
        *,
        model_id: str | None = None,
        status: DeploymentStatus | None = None,
        after_id: str | None = None,
        limit: int = 1000,
    ) -> list[Deployment]:
        statement = select(deployments).order_by(deployments.c.id).limit(limit)
        if model_id is not None:
            statement = statement.where(deployments.c.model_id == model_id)
        if status is not None:
            statement = statement.where(deployments.c.status == status.value)
        if after_id is not None:
            statement = statement.where(deployments.c.id > after_id)
        rows = (await self.session.execute(statement)).all()
        return [_deployment_from_row(row) for row in rows]

    async def save_deployment(self, deployment: Deployment) -> None:
        row = _deployment_row(deployment)
        del row["id"]
        await self.session.execute(
            update(deployments).where(deployments.c.id == deployment.id).values(**row)
        )

    # ------------------------------------------------------------------ checkpoints

    async def get_checkpoint(self, deployment_id: str, device_id: str) -> Checkpoint | None:
        row = (
            await self.session.execute(
                select(checkpoints).where(
                    checkpoints.c.deployment_id == deployment_id,
                    checkpoints.c.device_id == device_id,
                )
            )
        ).first()
        if row is None:
            return None
        last = to_ms(row.last_ts) if row.last_ts is not None else None
        return Checkpoint(row.deployment_id, row.device_id, row.state, last, int(row.points))

    async def save_checkpoint(self, checkpoint: Checkpoint, *, now: datetime) -> None:
        values = {
            "state": checkpoint.state,
            "last_ts": from_ms(checkpoint.last_ts_ms)
            if checkpoint.last_ts_ms is not None
            else None,
            "points": checkpoint.points,
            "updated_at": now,
        }
        result = await self.session.execute(
            update(checkpoints)
            .where(
                checkpoints.c.deployment_id == checkpoint.deployment_id,
                checkpoints.c.device_id == checkpoint.device_id,
            )
            .values(**values)
        )
        if getattr(result, "rowcount", 0) == 0:
            await self.session.execute(
                insert(checkpoints).values(
                    deployment_id=checkpoint.deployment_id,
                    device_id=checkpoint.device_id,
                    **values,
                )
            )

    # ------------------------------------------------------------------ analyses

    async def add_analysis(self, analysis: Analysis) -> None:
        await self.session.execute(
            insert(analyses).values(
                id=analysis.id,
                model_id=analysis.model_id,
                input=analysis.input,
                summary=analysis.summary,
                anomalies=analysis.anomalies,
                timing=analysis.timing,
                created_at=analysis.created_at,
            )
        )

    async def get_analysis(self, analysis_id: str) -> Analysis | None:
        row = (
            await self.session.execute(select(analyses).where(analyses.c.id == analysis_id))
        ).first()
        if row is None:
            return None
        return Analysis(
            id=row.id,
            model_id=row.model_id,
            input=row.input,
            summary=row.summary,
            anomalies=row.anomalies,
            created_at=row.created_at,
            timing=row.timing,
        )

    # ------------------------------------------------------------------ anomalies

    async def existing_anomaly_times(
        self, source_key: str, device_id: str, metric: str, times: Sequence[datetime]
    ) -> set[datetime]:
        found: set[datetime] = set()
        for start in range(0, len(times), 500):
            chunk = times[start : start + 500]
            rows = await self.session.execute(
                select(anomalies.c.ts).where(
                    anomalies.c.source_key == source_key,
                    anomalies.c.device_id == device_id,
                    anomalies.c.metric == metric,
                    anomalies.c.ts.in_(chunk),
                )
            )
            found.update(row.ts for row in rows)
        return found

    async def add_anomalies(self, new: Sequence[Anomaly]) -> None:
        if new:
            await self.session.execute(insert(anomalies), [_anomaly_row(a) for a in new])

    async def list_anomalies(self, query: AnomalyQuery) -> list[Anomaly]:
        statement = (
            select(anomalies)
            .order_by(anomalies.c.ts.desc(), anomalies.c.id.desc())
            .limit(query.limit)
        )
        if query.device_id is not None:
            statement = statement.where(anomalies.c.device_id == query.device_id)
        if query.metric is not None:
            statement = statement.where(anomalies.c.metric == query.metric)
        if query.model_id is not None:
            statement = statement.where(anomalies.c.model_id == query.model_id)
        if query.source is not None:
            statement = statement.where(anomalies.c.source == query.source.value)
        if query.time_from is not None:
            statement = statement.where(anomalies.c.ts >= query.time_from)
        if query.time_to is not None:
            statement = statement.where(anomalies.c.ts <= query.time_to)
        if query.before is not None:
            ts, anomaly_id = query.before
            statement = statement.where(
                or_(anomalies.c.ts < ts, and_(anomalies.c.ts == ts, anomalies.c.id < anomaly_id))
            )
        rows = (await self.session.execute(statement)).all()
        return [_anomaly_from_row(row) for row in rows]

    # ------------------------------------------------------------------ device projection

    async def device_type(self, device_id: str) -> tuple[str, bool] | None:
        row = (
            await self.session.execute(
                select(devices.c.type_name, devices.c.active).where(
                    devices.c.device_id == device_id
                )
            )
        ).first()
        return (str(row.type_name), bool(row.active)) if row else None

    async def put_device(
        self, device_id: str, type_name: str, *, active: bool, now: datetime
    ) -> None:
        result = await self.session.execute(
            update(devices)
            .where(devices.c.device_id == device_id)
            .values(type_name=type_name, active=active, updated_at=now)
        )
        if getattr(result, "rowcount", 0) == 0:
            await self.session.execute(
                insert(devices).values(
                    device_id=device_id, type_name=type_name, active=active, updated_at=now
                )
            )

    # ------------------------------------------------------------------ dead letters

    async def add_dead_letter(self, **values: Any) -> None:
        await self.session.execute(insert(dead_letters).values(**values))


def _model_row(model: Model) -> dict[str, Any]:
    return {
        "id": model.id,
        "name": model.name,
        "version": model.version,
        "algorithm": model.algorithm,
        "parameters": model.parameters,
        "threshold": model.threshold,
        "training_device_id": model.training.device_id,
        "training_metric": model.training.metric,
        "training_from": from_ms(model.training.start_ms),
        "training_to": from_ms(model.training.end_ms),
        "training_points": model.training_points,
        "training_summary": model.training_summary,
        "evaluation": model.evaluation,
        "status": model.status.value,
        "progress": model.progress,
        "error": model.error,
        "fitted_state": model.fitted_state,
        "created_at": model.created_at,
        "updated_at": model.updated_at,
        "completed_at": model.completed_at,
    }


def _model_from_row(row: Any) -> Model:
    mapping = row._mapping
    return Model(
        id=row.id,
        name=row.name,
        version=int(row.version),
        algorithm=row.algorithm,
        parameters=dict(row.parameters),
        threshold=float(row.threshold),
        training=SeriesRef(
            row.training_device_id,
            row.training_metric,
            to_ms(row.training_from),
            to_ms(row.training_to),
        ),
        status=ModelStatus(row.status),
        created_at=row.created_at,
        updated_at=row.updated_at,
        progress=float(row.progress),
        error=row.error,
        training_points=int(row.training_points),
        training_summary=row.training_summary,
        evaluation=row.evaluation,
        fitted_state=mapping.get("fitted_state"),
        completed_at=row.completed_at,
    )


def _deployment_row(deployment: Deployment) -> dict[str, Any]:
    return {
        "id": deployment.id,
        "model_id": deployment.model_id,
        "metric": deployment.metric,
        "device_ids": list(deployment.device_ids) if deployment.device_ids is not None else None,
        "device_type": deployment.device_type,
        "status": deployment.status.value,
        "created_at": deployment.created_at,
        "undeployed_at": deployment.undeployed_at,
    }


def _deployment_from_row(row: Any) -> Deployment:
    return Deployment(
        id=row.id,
        model_id=row.model_id,
        metric=row.metric,
        device_ids=tuple(row.device_ids) if row.device_ids is not None else None,
        device_type=row.device_type,
        status=DeploymentStatus(row.status),
        created_at=row.created_at,
        undeployed_at=row.undeployed_at,
    )


def _anomaly_row(anomaly: Anomaly) -> dict[str, Any]:
    return {
        "id": anomaly.id,
        "source_key": anomaly.source_key,
        "device_id": anomaly.device_id,
        "metric": anomaly.metric,
        "ts": anomaly.ts,
        "value": anomaly.value,
        "score": anomaly.score,
        "threshold": anomaly.threshold,
        "model_id": anomaly.model_id,
        "deployment_id": anomaly.deployment_id,
        "analysis_id": anomaly.analysis_id,
        "source": anomaly.source.value,
        "detected_at": anomaly.detected_at,
    }


def _anomaly_from_row(row: Any) -> Anomaly:
    return Anomaly(
        id=row.id,
        device_id=row.device_id,
        metric=row.metric,
        ts=row.ts,
        value=float(row.value),
        score=float(row.score),
        threshold=float(row.threshold),
        model_id=row.model_id,
        source=AnomalySource(row.source),
        detected_at=row.detected_at,
        deployment_id=row.deployment_id,
        analysis_id=row.analysis_id,
    )
