"""The telemetry domain: decode → transform → validate → derive, pure Python, hot path.

The pipeline for one request body (``process_batch``):

1. ``decode_points`` (domain_parsing): body → ``RawPoint``s + per-item ``Rejected``;
2. ``transform_data`` (domain_transforms): rename, scale/offset, default unit, conversion to
   the schema's unit (so ranges are checked in the schema's unit);
3. ``validate_batch`` (domain_validation): schema, range with margin, timestamps, duplicates,
   quality score;
4. ``derive_metrics`` (domain_transforms) from the accepted values, then ``validate_batch`` on
   the derived points (indices continue after the body's items).

The modules: domain_model (value objects, errors), domain_parsing, domain_transform_specs,
domain_transforms, domain_units (pint, cached), domain_expressions (simpleeval),
domain_validation. This module re-exports their public API; the service layer imports from here.
None of them does I/O or imports sqlalchemy, fastapi, nats or httpx.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetmesh.telemetry.domain_expressions import EvaluationError, Expression, ExpressionError
from fleetmesh.telemetry.domain_model import (
    DAY_MS,
    HOUR_MS,
    MINUTE_MS,
    SECOND_MS,
    Accepted,
    BatchTooLarge,
    InvalidPolicy,
    InvalidSchema,
    InvalidSpec,
    InvalidTransform,
    MalformedBatch,
    MetricSpec,
    MetricType,
    QualityReason,
    RawPoint,
    Rejected,
    RejectReason,
    Scalar,
    TelemetryDomainError,
    TelemetrySchema,
    UnknownMetricPolicy,
    ValidationPolicy,
)
from fleetmesh.telemetry.domain_parsing import MAX_BATCH_POINTS, ParsedBatch, decode_points
from fleetmesh.telemetry.domain_transform_specs import (
    EMPTY_TRANSFORMS,
    DefaultUnit,
    DeriveMetric,
    RenameMetric,
    ScaleOffset,
    Transform,
    TransformSpec,
)
from fleetmesh.telemetry.domain_transforms import (
    TransformResult,
    derive_metrics,
    transform_data,
)
from fleetmesh.telemetry.domain_units import UnitConversion, UnitProblem, resolve_conversion
from fleetmesh.telemetry.domain_validation import validate_batch

__all__ = [
    "DAY_MS",
    "EMPTY_TRANSFORMS",
    "HOUR_MS",
    "MAX_BATCH_POINTS",
    "MINUTE_MS",
    "SECOND_MS",
    "Accepted",
    "BatchOutcome",
    "BatchTooLarge",
    "DefaultUnit",
    "DeriveMetric",
    "EvaluationError",
    "Expression",
    "ExpressionError",
    "InvalidPolicy",
    "InvalidSchema",
    "InvalidSpec",
    "InvalidTransform",
    "MalformedBatch",
    "MetricSpec",
    "MetricType",
    "ParsedBatch",
    "QualityReason",
    "RawPoint",
    "Rejected",
    "RejectReason",
    "RenameMetric",
    "Scalar",
    "ScaleOffset",
    "TelemetryDomainError",
    "TelemetrySchema",
    "Transform",
    "TransformResult",
    "TransformSpec",
    "UnitConversion",
    "UnitProblem",
    "UnknownMetricPolicy",
    "ValidationPolicy",
    "decode_points",
    "derive_metrics",
    "process_batch",
    "process_points",
    "resolve_conversion",
    "transform_data",
    "validate_batch",
]


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What became of a batch: accepted points (to store) and rejections sorted by index.

    ``item_count`` counts the body's items; derived points come on top of it.
    """

    accepted: list[Accepted]
    rejected: list[Rejected]
    item_count: int


def process_batch(
    raw: bytes,
    *,
    schema: TelemetrySchema,
    policy: ValidationPolicy,
    now_ms: int,
    transforms: TransformSpec = EMPTY_TRANSFORMS,
    max_points: int = MAX_BATCH_POINTS,
) -> BatchOutcome:
    """Decode, transform, validate and derive; raises ``TelemetryDomainError`` on a bad body."""
    parsed = decode_points(raw, now_ms=now_ms, max_points=max_points)
    return process_points(
        parsed, schema=schema, policy=policy, now_ms=now_ms, transforms=transforms
    )


def process_points(
    parsed: ParsedBatch,
    *,
    schema: TelemetrySchema,
    policy: ValidationPolicy,
    now_ms: int,
    transforms: TransformSpec = EMPTY_TRANSFORMS,
) -> BatchOutcome:
    """Steps 2-4 of the pipeline on an already decoded batch."""
    transformed = transform_data(parsed.points, transforms, schema)
    accepted, rejected = _split(validate_batch(transformed.points, schema, policy, now_ms))
    rejected.extend(parsed.rejected)
    rejected.extend(transformed.rejected)
    if transforms.derivations:
        _add_derived(accepted, rejected, parsed.item_count, schema, policy, now_ms, transforms)
    if parsed.rejected or transformed.rejected or transforms.derivations:
        rejected.sort(key=_by_index)
    return BatchOutcome(accepted, rejected, parsed.item_count)


def _add_derived(
    accepted: list[Accepted],
    rejected: list[Rejected],
    first_index: int,
    schema: TelemetrySchema,
    policy: ValidationPolicy,
    now_ms: int,
    transforms: TransformSpec,
) -> None:
    derived = derive_metrics(accepted, transforms, schema, first_index=first_index)
    keys = [(point.metric, point.ts_ms) for point in accepted]
    results = validate_batch(derived.points, schema, policy, now_ms, already_accepted=keys)
    derived_accepted, derived_rejected = _split(results)
    accepted.extend(derived_accepted)
    rejected.extend(derived_rejected)
    rejected.extend(derived.rejected)


def _split(results: list[Accepted | Rejected]) -> tuple[list[Accepted], list[Rejected]]:
    accepted: list[Accepted] = []
    rejected: list[Rejected] = []
    for result in results:
        if isinstance(result, Accepted):
            accepted.append(result)
        else:
            rejected.append(result)
    return accepted, rejected


def _by_index(rejection: Rejected) -> int:
    return rejection.index
