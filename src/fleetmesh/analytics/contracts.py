"""Integration events of the analytics service, and the ones it consumes.

Published (versioned, stable for consumers):

* `fleetmesh.analysis.completed.v1` once per stored analysis;
* `fleetmesh.anomaly.detected.v1` once per anomaly: from streaming detection, and
  from analyses of a stored range (inline series belong to no device: their
  anomalies are kept in the analysis record only).
"""

from __future__ import annotations

from typing import Any

from fleetmesh.analytics.domain import Analysis, Anomaly, Model
from fleetmesh.core.clock import to_rfc3339
from fleetmesh.core.envelope import CloudEvent, subject_for_type

SOURCE = "/fleetmesh/analytics"
ANALYSIS_COMPLETED = "fleetmesh.analysis.completed.v1"
ANOMALY_DETECTED = "fleetmesh.anomaly.detected.v1"

# Consumed.
TELEMETRY_COLLECTED = "fleetmesh.telemetry.collected.v1"
DEVICE_REGISTERED = "fleetmesh.device.registered.v1"
DEVICE_DEREGISTERED = "fleetmesh.device.deregistered.v1"
TELEMETRY_COLLECTED_SUBJECT = subject_for_type(TELEMETRY_COLLECTED)
DEVICE_EVENTS_SUBJECT = "events.device.>"

_STRING = {"type": "string"}
_OPTIONAL_STRING = {"type": ["string", "null"]}
_TIME = {"type": "string", "format": "date-time"}
_NUMBER = {"type": "number"}
_SCORE = {"type": "number", "minimum": 0, "maximum": 1}

SCHEMAS: dict[str, dict[str, Any]] = {
    ANALYSIS_COMPLETED: {
        "type": "object",
        "required": [
            "analysis_id",
            "model_id",
            "input",
            "points",
            "anomalies",
            "threshold",
            "duration_s",
            "completed_at",
        ],
        "properties": {
            "analysis_id": _STRING,
            "model_id": _STRING,
            "model_name": _STRING,
            "model_version": {"type": "integer", "minimum": 1},
            "algorithm": _STRING,
            "input": {
                "type": "object",
                "required": ["kind"],
                "properties": {
                    "kind": {"enum": ["series", "range"]},
                    "device_id": _STRING,
                    "metric": _STRING,
                    "from": _TIME,
                    "to": _TIME,
                    "points": {"type": "integer", "minimum": 0},
                },
            },
            "points": {"type": "integer", "minimum": 0},
            "anomalies": {"type": "integer", "minimum": 0},
            "max_score": {"type": ["number", "null"]},
            "threshold": _SCORE,
            "duration_s": {"type": "number", "minimum": 0},
            "points_per_s": {"type": ["number", "null"]},
            "completed_at": _TIME,
        },
    },
    ANOMALY_DETECTED: {
        "type": "object",
        "required": [
            "anomaly_id",
            "device_id",
            "metric",
            "ts",
            "value",
            "score",
            "threshold",
            "model_id",
            "deployment_id",
            "source",
        ],
        "properties": {
            "anomaly_id": _STRING,
            "device_id": _STRING,
            "metric": _STRING,
            "ts": _TIME,
            "value": _NUMBER,
            "score": _SCORE,
            "threshold": _SCORE,
            "model_id": _STRING,
            "deployment_id": _OPTIONAL_STRING,
            "analysis_id": _OPTIONAL_STRING,
            "source": {"enum": ["streaming", "analysis"]},
            "detected_at": _TIME,
        },
    },
}


def analysis_completed(analysis: Analysis, model: Model) -> CloudEvent:
    summary = analysis.summary
    return CloudEvent(
        type=ANALYSIS_COMPLETED,
        source=SOURCE,
        subject=analysis.id,
        data={
            "analysis_id": analysis.id,
            "model_id": model.id,
            "model_name": model.name,
            "model_version": model.version,
            "algorithm": model.algorithm,
            "input": analysis.input,
            "points": int(summary.get("points", 0)),
            "anomalies": int(summary.get("anomalies", 0)),
            "max_score": summary.get("max"),
            "threshold": model.threshold,
            "duration_s": float(analysis.timing.get("duration_s", 0.0)),
            "points_per_s": analysis.timing.get("points_per_s"),
            "completed_at": to_rfc3339(analysis.created_at),
        },
    )


def anomaly_detected(
    anomaly: Anomaly, *, correlation_id: str | None = None, causation_id: str | None = None
) -> CloudEvent:
    return CloudEvent(
        type=ANOMALY_DETECTED,
        source=SOURCE,
        subject=anomaly.device_id,
        correlationid=correlation_id,
        causationid=causation_id,
        data={
            "anomaly_id": anomaly.id,
            "device_id": anomaly.device_id,
            "metric": anomaly.metric,
            "ts": to_rfc3339(anomaly.ts),
            "value": anomaly.value,
            "score": anomaly.score,
            "threshold": anomaly.threshold,
            "model_id": anomaly.model_id,
            "deployment_id": anomaly.deployment_id,
            "analysis_id": anomaly.analysis_id,
            "source": anomaly.source.value,
            "detected_at": to_rfc3339(anomaly.detected_at),
        },
    )
