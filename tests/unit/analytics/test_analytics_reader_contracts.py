"""The telemetry reader against a fake HTTP API, the scoring pool, and the event contracts."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import httpx
import jsonschema
import pytest

from fleetmesh.analytics import contracts
from fleetmesh.analytics.detectors import create_detector
from fleetmesh.analytics.domain import (
    Analysis,
    Anomaly,
    AnomalySource,
    Model,
    ModelStatus,
    SeriesRef,
    TelemetryNotFound,
    from_ms,
)
from fleetmesh.analytics.reader import HttpTelemetryReader, TelemetryUnavailable
from fleetmesh.analytics.scoring import ScoringPool, score_points
from fleetmesh.core.clock import to_rfc3339

pytestmark = pytest.mark.unit

T0 = 1_790_000_000_000


def fake_telemetry(points: list[tuple[int, Any]], page: int = 3) -> httpx.MockTransport:
    """A telemetry API serving `points` in pages, `ts` alternating between ms and RFC 3339."""
    seen: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        seen.append(params)
        if "unknown" in request.url.path:
            return httpx.Response(404, json={"detail": "no such device"})
        if "broken" in request.url.path:
            return httpx.Response(500, json={"detail": "boom"})
        start = int(params.get("cursor", "0"))
        chunk = points[start : start + page]
        items = [
            {
                "ts": ts if i % 2 else to_rfc3339(from_ms(ts)),
                "metric": params["metric"],
                "value": value,
                "quality": 1.0,
            }
            for i, (ts, value) in enumerate(chunk)
        ]
        more = start + page < len(points)
        return httpx.Response(
            200, json={"items": items, "next_cursor": str(start + page) if more else None}
        )

    transport = httpx.MockTransport(handler)
    transport.seen = seen  # type: ignore[attr-defined]
    return transport


def reader_for(transport: httpx.MockTransport) -> HttpTelemetryReader:
    return HttpTelemetryReader(
        lambda: httpx.AsyncClient(transport=transport, base_url="http://fleetmesh.test")
    )


async def test_reader_pages_through_the_range_and_keeps_numeric_points_in_order() -> None:
    points: list[tuple[int, Any]] = [(T0 + i * 1000, float(i)) for i in range(8)]
    points[2] = (points[2][0], "text")  # not numeric: skipped
    points[3] = (points[3][0], True)  # a boolean counts as 1.0
    transport = fake_telemetry(points)
    pages = [page async for page in reader_for(transport).read("d1", "temp", T0, T0 + 6 * 1000)]
    assert len(pages) == 3
    ts = [t for page in pages for t in page.ts_ms]
    values = [v for page in pages for v in page.values]
    assert ts == [T0 + i * 1000 for i in range(7) if i != 2]  # the 8th point is after `to`
    assert values == [0.0, 1.0, 1.0, 4.0, 5.0, 6.0]
    assert pages[-1].covered_to_ms == T0 + 6000
    first_query = transport.seen[0]  # type: ignore[attr-defined]
    assert first_query["metric"] == "temp"
    assert first_query["from"] == to_rfc3339(from_ms(T0))
    assert first_query["to"] == to_rfc3339(from_ms(T0 + 6001))  # one ms past the inclusive end
    assert transport.seen[1]["cursor"] == "3"  # type: ignore[attr-defined]


async def test_reader_errors_map_to_problems() -> None:
    reader = reader_for(fake_telemetry([]))
    with pytest.raises(TelemetryNotFound):
        [page async for page in reader.read("unknown", "temp", T0, T0 + 1)]
    with pytest.raises(TelemetryUnavailable):
        [page async for page in reader.read("broken", "temp", T0, T0 + 1)]


async def test_scoring_pool_matches_a_detector_run_inline_and_leaves_the_input_state() -> None:
    trained = create_detector("best")
    score_points(
        trained, [T0 + i * 60_000 for i in range(500)], [math.sin(i / 9) for i in range(500)]
    )
    state = trained.get_state()
    ts = [T0 + (500 + i) * 60_000 for i in range(300)]
    values = [math.sin((500 + i) / 9) + (6.0 if i == 150 else 0.0) for i in range(300)]
    pool = ScoringPool()
    try:
        end_state, scores = await pool.run(state, ts, values)
    finally:
        pool.shutdown()
    assert scores == score_points(trained, ts, values)
    assert end_state == trained.get_state()
    assert max(range(300), key=scores.__getitem__) == 150
    assert state != end_state


def _model() -> Model:
    now = datetime.now(UTC)
    return Model(
        id="01M8CHFN2C95Y3E7VNZ95Q6S3R",
        name="temp-model",
        version=2,
        algorithm="fleetmesh_novelty",
        parameters={},
        threshold=0.7,
        training=SeriesRef("d1", "temp", T0, T0 + 1000),
        status=ModelStatus.ready,
        created_at=now,
        updated_at=now,
    )


def test_events_match_their_published_schemas() -> None:
    now = datetime.now(UTC)
    anomaly = Anomaly(
        id="01M8CHFNTF0A5CPMQ4AD46FGNR",
        device_id="d1",
        metric="temp",
        ts=now,
        value=60.0,
        score=0.99,
        threshold=0.7,
        model_id="01M8CHFN2C95Y3E7VNZ95Q6S3R",
        source=AnomalySource.streaming,
        detected_at=now,
        deployment_id="01M8CHFNJJF2QPTB952N20XCFD",
    )
    detected = contracts.anomaly_detected(anomaly, causation_id="01M8CHFNJJF2QPTB952N20XCFE")
    assert detected.type == contracts.ANOMALY_DETECTED
    assert detected.nats_subject == "events.anomaly.detected.v1"
    assert detected.subject == "d1"
    jsonschema.validate(detected.to_dict()["data"], contracts.SCHEMAS[contracts.ANOMALY_DETECTED])
    analysis = Analysis(
        id="01M8CHFNHVJ188ZF26QB04AV80",
        model_id=_model().id,
        input={"kind": "range", **SeriesRef("d1", "temp", T0, T0 + 10).as_dict(), "points": 3},
        summary={"points": 3, "anomalies": 1, "max": 0.9},
        anomalies=[],
        created_at=now,
        timing={"duration_s": 0.01, "points_per_s": 300.0},
    )
    completed = contracts.analysis_completed(analysis, _model())
    assert completed.nats_subject == "events.analysis.completed.v1"
    schema = contracts.SCHEMAS[contracts.ANALYSIS_COMPLETED]
    jsonschema.validate(completed.to_dict()["data"], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**completed.to_dict()["data"], "points": -1}, schema)
    for schema in contracts.SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)
