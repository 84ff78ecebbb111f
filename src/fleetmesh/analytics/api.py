"""HTTP API of the analytics service; request and response schemas live here, at the edge.

Times in requests are epoch milliseconds or RFC 3339 strings; responses use RFC 3339.

* `POST /models` answers 202: the model is `training`; poll `GET /models/{id}`
  (`progress` 0..1) until `ready` or `failed` (with `error`).
* `POST /models/{id}:evaluate`: `series` or `range`, labelled by `windows` or
  `labels`; top-level precision/recall/F1 are window-wise, point-wise ones are
  beside them, with the NAB standard score (see `domain`).
* `POST /analyses` runs synchronously and answers 201 with the stored result.
* `GET /anomalies` lists newest first (by point time), keyset-paginated.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from fleetmesh.analytics.detectors import ALIASES, DETECTORS, create_detector
from fleetmesh.analytics.domain import (
    Analysis,
    Anomaly,
    AnomalySource,
    Deployment,
    DeploymentStatus,
    InvalidAnalyticsInput,
    Model,
    ModelStatus,
    SeriesRef,
    default_threshold,
    from_ms,
    parse_ts,
)
from fleetmesh.analytics.jobs import TrainingJobs
from fleetmesh.analytics.repository import AnomalyQuery
from fleetmesh.analytics.service import (
    MAX_SERIES_POINTS,
    AnalyticsQueries,
    AnalyticsService,
    CreateModel,
    DeploySelector,
    InlineSeries,
    Labels,
    SeriesSource,
    UnitOfWorkFactory,
    create_model,
)
from fleetmesh.core.auth import Role
from fleetmesh.core.clock import Clock
from fleetmesh.core.errors import FieldError
from fleetmesh.core.http import decode_cursor, encode_cursor, require_role

Strict = ConfigDict(extra="forbid", populate_by_name=True)
TimeIn = Annotated[int | float | str, Field(description="epoch milliseconds or RFC 3339")]
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
MetricName = Annotated[str, Field(min_length=1, max_length=128)]
DeviceId = Annotated[str, Field(min_length=1, max_length=64)]


class RangeIn(BaseModel):
    """A stored time range of one device's metric (inclusive)."""

    model_config = Strict
    device_id: DeviceId
    metric: MetricName
    from_: TimeIn = Field(alias="from")
    to: TimeIn

    def to_ref(self, prefix: str) -> SeriesRef:
        ref = SeriesRef(
            self.device_id,
            self.metric,
            parse_ts(self.from_, f"{prefix}from"),
            parse_ts(self.to, f"{prefix}to"),
        )
        ref.validate(prefix)
        return ref


class TrainingIn(BaseModel):
    model_config = Strict
    device_id: DeviceId
    metric: MetricName
    from_: TimeIn = Field(alias="from")
    to: TimeIn | None = Field(default=None, description="default: now")


class ModelIn(BaseModel):
    model_config = Strict
    name: Name
    algorithm: str = Field(max_length=64, description="a detector name, or `best`")
    parameters: dict[str, Any] = Field(default_factory=dict)
    training: TrainingIn
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)


class PointIn(BaseModel):
    model_config = Strict
    ts: TimeIn
    value: float


class EvaluateIn(BaseModel):
    """Labelled validation data: inline `series` or a stored `range`; `windows` or `labels`."""

    model_config = Strict
    series: list[PointIn] | None = Field(default=None, max_length=MAX_SERIES_POINTS)
    range: RangeIn | None = None
    windows: list[tuple[TimeIn, TimeIn]] | None = Field(default=None, max_length=10_000)
    labels: list[Annotated[int, Field(ge=0, le=1)]] | None = Field(
        default=None, max_length=MAX_SERIES_POINTS
    )


class AnalysisIn(BaseModel):
    model_config = Strict
    model_id: str = Field(max_length=26)
    series: list[PointIn] | None = Field(default=None, max_length=MAX_SERIES_POINTS)
    range: RangeIn | None = None


class DeployIn(BaseModel):
    model_config = Strict
    device_ids: list[DeviceId] | None = Field(default=None, max_length=1000)
    device_type: str | None = Field(default=None, min_length=1, max_length=63)
    metric: MetricName | None = Field(default=None, description="default: the training metric")


class UndeployIn(BaseModel):
    model_config = Strict
    deployment_id: str | None = Field(default=None, max_length=26)


class TrainingOut(BaseModel):
    device_id: str
    metric: str
    from_: datetime = Field(serialization_alias="from")
    to: datetime
    points: int


class ModelOut(BaseModel):
    id: str
    name: str
    version: int
    algorithm: str
    parameters: dict[str, Any]
    threshold: float
    training: TrainingOut
    status: ModelStatus
    progress: float
    error: str | None
    training_summary: dict[str, Any] | None
    evaluation: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    fitted_state: dict[str, Any] | None = None

    @classmethod
    def of(cls, model: Model, *, include_state: bool = False) -> ModelOut:
        return cls(
            id=model.id,
            name=model.name,
            version=model.version,
            algorithm=model.algorithm,
            parameters=model.parameters,
            threshold=model.threshold,
            training=TrainingOut(
                device_id=model.training.device_id,
                metric=model.training.metric,
                from_=from_ms(model.training.start_ms),
                to=from_ms(model.training.end_ms),
                points=model.training_points,
            ),
            status=model.status,
            progress=model.progress,
            error=model.error,
            training_summary=model.training_summary,
            evaluation=model.evaluation,
            created_at=model.created_at,
            updated_at=model.updated_at,
            completed_at=model.completed_at,
            fitted_state=model.fitted_state if include_state else None,
        )


class ModelPage(BaseModel):
    items: list[ModelOut]
    next_cursor: str | None


class DeploymentOut(BaseModel):
    id: str
    model_id: str
    metric: str
    device_ids: list[str] | None
    device_type: str | None
    status: DeploymentStatus
    created_at: datetime
    undeployed_at: datetime | None

    @classmethod
    def of(cls, deployment: Deployment) -> DeploymentOut:
        return cls(
            id=deployment.id,
            model_id=deployment.model_id,
            metric=deployment.metric,
            device_ids=list(deployment.device_ids) if deployment.device_ids is not None else None,
            device_type=deployment.device_type,
            status=deployment.status,
            created_at=deployment.created_at,
            undeployed_at=deployment.undeployed_at,
        )


class DeploymentPage(BaseModel):
    items: list[DeploymentOut]
    next_cursor: str | None


class UndeployOut(BaseModel):
    undeployed: list[DeploymentOut]


class AnalysisOut(BaseModel):
    id: str
    model_id: str
    status: str = "completed"
    input: dict[str, Any]
    summary: dict[str, Any]
    timing: dict[str, Any]
    anomalies: list[dict[str, Any]]
    created_at: datetime

    @classmethod
    def of(cls, analysis: Analysis) -> AnalysisOut:
        return cls(
            id=analysis.id,
            model_id=analysis.model_id,
            input=analysis.input,
            summary=analysis.summary,
            timing=analysis.timing,
            anomalies=analysis.anomalies,
            created_at=analysis.created_at,
        )


class AnomalyOut(BaseModel):
    id: str
    device_id: str
    metric: str
    ts: datetime
    value: float
    score: float
    threshold: float
    model_id: str
    deployment_id: str | None
    analysis_id: str | None
    source: AnomalySource
    detected_at: datetime

    @classmethod
    def of(cls, anomaly: Anomaly) -> AnomalyOut:
        return cls(
            id=anomaly.id,
            device_id=anomaly.device_id,
            metric=anomaly.metric,
            ts=anomaly.ts,
            value=anomaly.value,
            score=anomaly.score,
            threshold=anomaly.threshold,
            model_id=anomaly.model_id,
            deployment_id=anomaly.deployment_id,
            analysis_id=anomaly.analysis_id,
            source=anomaly.source,
            detected_at=anomaly.detected_at,
        )


class AnomalyPage(BaseModel):
    items: list[AnomalyOut]
    next_cursor: str | None


class AlgorithmOut(BaseModel):
    name: str
    aliases: list[str]
    parameters: dict[str, Any]
    default_threshold: float


def _source(
    series: list[PointIn] | None,
    stored: RangeIn | None,
    labels: list[int] | None = None,
) -> SeriesSource:
    if (series is None) == (stored is None):
        raise InvalidAnalyticsInput(
            "Give the data as exactly one of `series` (inline points) or `range` (stored).",
            errors=[FieldError("series", "give series or range", "source")],
        )
    if stored is not None:
        return stored.to_ref("range.")
    assert series is not None
    points = [(parse_ts(p.ts, f"series.{i}.ts"), p.value) for i, p in enumerate(series)]
    return InlineSeries.of(points, labels)


def _truth(body: EvaluateIn) -> Labels:
    if (body.windows is None) == (body.labels is None):
        raise InvalidAnalyticsInput(
            "Label the data with exactly one of `windows` or `labels`.",
            errors=[FieldError("windows", "give windows or labels", "labels")],
        )
    if body.labels is not None:
        return Labels(labels=tuple(body.labels))
    windows = []
    for i, (start, end) in enumerate(body.windows or []):
        first, last = parse_ts(start, f"windows.{i}.0"), parse_ts(end, f"windows.{i}.1")
        if first > last:
            raise InvalidAnalyticsInput(
                f"Window {i} starts after it ends.",
                errors=[FieldError(f"windows.{i}", "start after end", "invalid_range")],
            )
        windows.append((first, last))
    return Labels(windows_ms=tuple(windows))


def _optional_time(value: str | None, name: str) -> datetime | None:
    return from_ms(parse_ts(value, name)) if value is not None else None


def create_router(
    *,
    uow_factory: UnitOfWorkFactory,
    service: AnalyticsService,
    queries: AnalyticsQueries,
    jobs: TrainingJobs,
    clock: Clock,
) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["analytics"])
    viewer = Depends(require_role(Role.viewer))
    operator = Depends(require_role(Role.operator))

    @router.get("/algorithms", dependencies=[viewer])
    async def list_algorithms() -> list[AlgorithmOut]:
        return [
            AlgorithmOut(
                name=name,
                aliases=[alias for alias, target in ALIASES.items() if target == name],
                parameters=create_detector(name).params,
                default_threshold=default_threshold(name),
            )
            for name in DETECTORS
        ]

    @router.post("/models", status_code=202, dependencies=[operator])
    async def train_model(body: ModelIn, response: Response) -> ModelOut:
        to = body.training.to
        training = SeriesRef(
            body.training.device_id,
            body.training.metric,
            parse_ts(body.training.from_, "training.from"),
            parse_ts(to, "training.to") if to is not None else parse_ts(clock.now()),
        )
        command = CreateModel(
            name=body.name,
            algorithm=body.algorithm,
            parameters=body.parameters,
            training=training,
            threshold=body.threshold,
        )
        model = await create_model(command, uow=uow_factory(), clock=clock)
        jobs.start_training(model)
        response.headers["Location"] = f"/api/v1/models/{model.id}"
        return ModelOut.of(model)

    @router.get("/models", dependencies=[viewer])
    async def list_models(
        name: Annotated[str | None, Query(max_length=200)] = None,
        status: ModelStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> ModelPage:
        position = decode_cursor(cursor) or {}
        found = await queries.list_models(
            name=name, status=status, before_id=position.get("before"), limit=limit + 1
        )
        page = found[:limit]
        next_cursor = encode_cursor({"before": page[-1].id}) if len(found) > limit else None
        return ModelPage(items=[ModelOut.of(m) for m in page], next_cursor=next_cursor)

    @router.get("/models/{model_id}", dependencies=[viewer])
    async def get_model(model_id: str, include_state: bool = False) -> ModelOut:
        model = await queries.get_model(model_id, with_state=include_state)
        return ModelOut.of(model, include_state=include_state)

    @router.post("/models/{model_id}:evaluate", dependencies=[operator])
    async def evaluate_model(model_id: str, body: EvaluateIn) -> dict[str, Any]:
        truth = _truth(body)
        inline_labels = list(truth.labels) if truth.labels is not None and body.series else None
        source = _source(body.series, body.range, inline_labels)
        return await service.evaluate(model_id, source, truth)

    @router.post("/models/{model_id}:deploy", status_code=201, dependencies=[operator])
    async def deploy_model(model_id: str, body: DeployIn, response: Response) -> DeploymentOut:
        selector = DeploySelector(
            metric=body.metric,
            device_ids=tuple(body.device_ids) if body.device_ids is not None else None,
            device_type=body.device_type,
        )
        deployment, created = await service.deploy(model_id, selector)
        if not created:
            response.status_code = 200
        response.headers["Location"] = f"/api/v1/deployments/{deployment.id}"
        return DeploymentOut.of(deployment)

    @router.post("/models/{model_id}:undeploy", dependencies=[operator])
    async def undeploy_model(
        model_id: str, body: Annotated[UndeployIn | None, Body()] = None
    ) -> UndeployOut:
        undeployed = await service.undeploy(model_id, body.deployment_id if body else None)
        return UndeployOut(undeployed=[DeploymentOut.of(d) for d in undeployed])

    @router.get("/deployments", dependencies=[viewer])
    async def list_deployments(
        model_id: Annotated[str | None, Query(max_length=26)] = None,
        status: DeploymentStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> DeploymentPage:
        position = decode_cursor(cursor) or {}
        found = await queries.list_deployments(
            model_id=model_id, status=status, after_id=position.get("after"), limit=limit + 1
        )
        page = found[:limit]
        next_cursor = encode_cursor({"after": page[-1].id}) if len(found) > limit else None
        return DeploymentPage(items=[DeploymentOut.of(d) for d in page], next_cursor=next_cursor)

    @router.get("/deployments/{deployment_id}", dependencies=[viewer])
    async def get_deployment(deployment_id: str) -> DeploymentOut:
        return DeploymentOut.of(await queries.get_deployment(deployment_id))

    @router.post("/analyses", status_code=201, dependencies=[operator])
    async def run_analysis(body: AnalysisIn, response: Response) -> AnalysisOut:
        analysis = await service.analyze(body.model_id, _source(body.series, body.range))
        response.headers["Location"] = f"/api/v1/analyses/{analysis.id}"
        return AnalysisOut.of(analysis)

    @router.get("/analyses/{analysis_id}", dependencies=[viewer])
    async def get_analysis(analysis_id: str) -> AnalysisOut:
        return AnalysisOut.of(await queries.get_analysis(analysis_id))

    @router.get("/anomalies", dependencies=[viewer])
    async def list_anomalies(
        device: Annotated[str | None, Query(max_length=64)] = None,
        metric: Annotated[str | None, Query(max_length=128)] = None,
        model_id: Annotated[str | None, Query(max_length=26)] = None,
        source: AnomalySource | None = None,
        from_: Annotated[str | None, Query(alias="from", max_length=40)] = None,
        to: Annotated[str | None, Query(max_length=40)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> AnomalyPage:
        position = decode_cursor(cursor)
        before = None
        if position is not None:
            try:
                before = (from_ms(int(position["ts"])), str(position["id"]))
            except (KeyError, TypeError, ValueError):
                raise InvalidAnalyticsInput(
                    "The cursor is not one this API issued.",
                    errors=[FieldError("cursor", "invalid cursor")],
                ) from None
        found = await queries.list_anomalies(
            AnomalyQuery(
                device_id=device,
                metric=metric,
                model_id=model_id,
                source=source,
                time_from=_optional_time(from_, "from"),
                time_to=_optional_time(to, "to"),
                before=before,
                limit=limit + 1,
            )
        )
        page = found[:limit]
        next_cursor = None
        if len(found) > limit:
            last = page[-1]
            next_cursor = encode_cursor({"ts": parse_ts(last.ts), "id": last.id})
        return AnomalyPage(items=[AnomalyOut.of(a) for a in page], next_cursor=next_cursor)

    return router
