"""The writer's plan of a transaction, made in one pass, tells what a pass per figure
over the points would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fleetmesh.telemetry.contracts import IngestMessage, WirePoint, ms_to_rfc3339
from fleetmesh.telemetry.service import _StorePlan

points = st.lists(
    st.builds(
        WirePoint,
        index=st.integers(0, 100),
        metric=st.sampled_from(["t", "h", "b"]),
        value=st.floats(-10, 10),
        ts_ms=st.integers(0, 50),
        quality=st.floats(0, 1),
    ),
    min_size=1,
    max_size=20,
)
messages = st.lists(
    st.builds(
        IngestMessage,
        id=st.uuids().map(str),
        device_id=st.sampled_from(["d1", "d2", "d3"]),
        received_at_ms=st.integers(0, 10**6),
        source=st.just("test"),
        points=points,
    ),
    min_size=1,
    max_size=8,
)


@given(messages)
def test_the_plan_counts_times_metrics_and_quality_as_the_points_do(
    batch: list[IngestMessage],
) -> None:
    plan = _StorePlan.of(batch)

    assert plan.points == sum(len(m.points) for m in batch)
    assert [tuple(b) for b in plan.batches] == [
        (
            m.id,
            m.device_id,
            len(m.points),
            min(p.ts_ms for p in m.points),
            max(p.ts_ms for p in m.points),
        )
        for m in batch
    ]
    devices = list(dict.fromkeys(m.device_id for m in batch))
    assert [event.data for event in plan.events] == [_expected(batch, d) for d in devices]


def _span(found: list[WirePoint]) -> tuple[int, int]:
    return min(p.ts_ms for p in found), max(p.ts_ms for p in found)


def _expected(batch: list[IngestMessage], device_id: str) -> dict[str, object]:
    mine = [m for m in batch if m.device_id == device_id]
    found = [p for m in mine for p in m.points]
    first, last = _span(found)
    return {
        "device_id": device_id,
        "count": len(found),
        "first_ts": ms_to_rfc3339(first),
        "last_ts": ms_to_rfc3339(last),
        "metrics": sorted({p.metric for p in found}),
        "received_at": ms_to_rfc3339(max(m.received_at_ms for m in mine)),
        "quality_mean": min(1.0, max(0.0, sum(p.quality for p in found) / len(found))),
        "message_id": mine[0].id,
    }


def test_messages_of_numbers_only_are_told_from_those_with_booleans_or_text() -> None:
    def message(*values: bool | int | float | str) -> IngestMessage:
        points = [WirePoint(i, f"m{i}", v, i, 1.0) for i, v in enumerate(values)]
        return IngestMessage(str(len(values)) + repr(values), "d1", 0, "test", points)

    numbers = [message(1, 2.5), message(0.0)]
    other = [message(1, True), message(2.5, "on"), message(False)]

    plan = _StorePlan.of([other[0], numbers[0], other[1], numbers[1], other[2]])

    assert plan.numbers_only == numbers
    assert plan.other == other
