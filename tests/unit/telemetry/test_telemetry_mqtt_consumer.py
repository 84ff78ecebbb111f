"""The DEVICES_IN consumer with a fake ingestor: ack, nak, quarantine and error messages."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from ulid import ULID

from fleetmesh.core.errors import NotFound, Overloaded
from fleetmesh.telemetry.contracts import IngestMessage, WirePoint
from fleetmesh.telemetry.domain import MalformedBatch, Rejected, RejectReason
from fleetmesh.telemetry.mqtt import (
    MqttTelemetryConsumer,
    backoff_s,
    device_id_of,
    errors_subject,
    is_device_id,
)
from fleetmesh.telemetry.quarantine import QuarantineEntry

pytestmark = pytest.mark.unit

STORED_AT = datetime(2026, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)
STORED_AT_MS = 1_772_366_400_250


class DeviceNotFound(NotFound):
    problem = "device-not-found"


@dataclass
class Report:
    accepted: list[object] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


@dataclass
class Prepared:
    report: Report
    message: IngestMessage | None


def ingest_message(device_id: str, msg_id: str, accepted: int) -> IngestMessage | None:
    points = [WirePoint(i, "t", float(i), i, 1.0) for i in range(accepted)]
    return IngestMessage(msg_id, device_id, 0, "mqtt", points) if points else None


class FakeIngestor:
    """Records calls; answers with a report or raises what it is told to, per device."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.outcomes: dict[str, Any] = {}

    async def prepare(
        self,
        device_id: str,
        raw: bytes,
        *,
        source: str,
        received_at_ms: int | None = None,
        msg_id: str | None = None,
    ) -> Prepared:
        self.calls.append(
            {"device_id": device_id, "raw": raw, "source": source, "at": received_at_ms}
            | {"msg_id": msg_id}
        )
        outcome = self.outcomes.get(device_id)
        if isinstance(outcome, Exception):
            raise outcome
        report = outcome or Report(accepted=[object()])
        assert msg_id is not None
        return Prepared(report, ingest_message(device_id, msg_id, len(report.accepted)))


class FakeStore:
    """Keeps what it stored; fails for the devices it is told to."""

    def __init__(self) -> None:
        self.transactions: list[list[IngestMessage]] = []
        self.failing: dict[str, Exception] = {}

    async def store(self, messages: Sequence[IngestMessage]) -> None:
        for message in messages:
            if message.device_id in self.failing:
                raise self.failing[message.device_id]
        self.transactions.append(list(messages))

    @property
    def stored(self) -> list[IngestMessage]:
        return [m for transaction in self.transactions for m in transaction]


class FakeQuarantine:
    def __init__(self) -> None:
        self.entries: dict[str, QuarantineEntry] = {}

    async def add(self, entry: QuarantineEntry) -> str:
        self.entries.setdefault(entry.message_key, entry)
        return f"q-{entry.sequence}"


class FakeErrors:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def notify(self, device_id: str, body: bytes) -> None:
        self.sent.append((errors_subject(device_id), json.loads(body)))


class FakeMessage:
    """A JetStream message as nats-py hands it over, recording how it was settled."""

    def __init__(
        self,
        subject: str,
        data: bytes,
        *,
        sequence: int,
        delivered: int = 1,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.subject = subject
        self.data = data
        self.headers = headers
        self.metadata = SimpleNamespace(
            sequence=SimpleNamespace(stream=sequence, consumer=sequence),
            num_delivered=delivered,
            timestamp=STORED_AT,
        )
        self.settled: list[tuple[str, float | None]] = []

    async def ack(self) -> None:
        self.settled.append(("ack", None))

    async def nak(self, delay: float | None = None) -> None:
        self.settled.append(("nak", delay))


@pytest.fixture
def ingestor() -> FakeIngestor:
    return FakeIngestor()


@pytest.fixture
def quarantine() -> FakeQuarantine:
    return FakeQuarantine()


@pytest.fixture
def errors() -> FakeErrors:
    return FakeErrors()


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


def make_consumer(
    ingestor: Any, quarantine: FakeQuarantine, errors: FakeErrors, store: FakeStore | None = None
) -> Any:
    deps = SimpleNamespace(backbone=None)
    return MqttTelemetryConsumer(
        deps,  # type: ignore[arg-type]
        ingestor,
        store or FakeStore(),
        quarantine,
        errors=errors,
        max_attempts=3,
    )


@pytest.fixture
def consumer(
    ingestor: FakeIngestor, quarantine: FakeQuarantine, errors: FakeErrors, store: FakeStore
) -> Any:
    return make_consumer(ingestor, quarantine, errors, store)


@pytest.mark.parametrize(
    ("subject", "device_id"),
    [
        ("devices.sensor-1.telemetry", "sensor-1"),
        ("devices.A_b-9.telemetry", "A_b-9"),
        ("devices.sensor-1.status", None),
        ("devices.sensor-1.telemetry.extra", None),
        ("things.sensor-1.telemetry", None),
        ("devices.-bad.telemetry", None),
        ("devices." + "x" * 65 + ".telemetry", None),
    ],
)
def test_the_device_id_comes_from_the_subject(subject: str, device_id: str | None) -> None:
    assert device_id_of(subject) == device_id


async def test_a_good_message_is_stored_as_mqtt_and_acked(
    consumer: Any,
    ingestor: FakeIngestor,
    store: FakeStore,
    quarantine: FakeQuarantine,
    errors: FakeErrors,
) -> None:
    message = FakeMessage("devices.s-1.telemetry", b'{"metric":"t","value":1}', sequence=7)
    assert await consumer.process([message]) == 0.0
    assert message.settled == [("ack", None)]
    [call] = ingestor.calls
    assert call["device_id"] == "s-1"
    assert call["raw"] == b'{"metric":"t","value":1}'
    assert call["source"] == "mqtt"
    assert call["at"] == STORED_AT_MS
    assert ULID.from_str(call["msg_id"]).milliseconds == STORED_AT_MS  # a ULID, like HTTP ids
    assert [m.id for m in store.stored] == [call["msg_id"]]
    assert quarantine.entries == {}
    assert errors.sent == []


async def test_the_bridge_source_header_is_passed_on(consumer: Any, ingestor: FakeIngestor) -> None:
    message = FakeMessage(
        "devices.s-1.telemetry", b"{}", sequence=1, headers={"Fleetmesh-Source": "mqtt-bridge"}
    )
    await consumer.process([message])
    assert ingestor.calls[0]["source"] == "mqtt-bridge"


async def test_a_malformed_message_is_quarantined_reported_to_the_device_and_acked(
    consumer: Any, ingestor: FakeIngestor, quarantine: FakeQuarantine, errors: FakeErrors
) -> None:
    ingestor.outcomes["s-1"] = MalformedBatch("the body is not JSON")
    message = FakeMessage("devices.s-1.telemetry", b"not json", sequence=12)
    await consumer.process([message])
    assert message.settled == [("ack", None)]
    [entry] = quarantine.entries.values()
    assert (entry.device_id, entry.sequence, entry.payload) == ("s-1", 12, b"not json")
    assert entry.reason == "malformed-telemetry"
    assert entry.received_at == STORED_AT
    [(subject, body)] = errors.sent
    assert subject == "devices.s-1.errors"
    assert body["reason"] == "malformed-telemetry"
    assert body["detail"] == "the body is not JSON"
    assert body["sequence"] == 12
    assert body["quarantine_id"] == "q-12"


async def test_rejected_points_are_quarantined_with_their_reasons(
    consumer: Any, ingestor: FakeIngestor, quarantine: FakeQuarantine, errors: FakeErrors
) -> None:
    rejection = Rejected(1, "temp", "value", RejectReason.OUT_OF_RANGE, "above 85")
    ingestor.outcomes["s-1"] = Report(accepted=[object(), object()], rejected=[rejection])
    message = FakeMessage("devices.s-1.telemetry", b"[...]", sequence=3)
    await consumer.process([message])
    assert message.settled == [("ack", None)]
    [entry] = quarantine.entries.values()
    assert entry.reason == "points_rejected"
    assert entry.errors == [
        {
            "index": 1,
            "metric": "temp",
            "field": "value",
            "reason": "out_of_range",
            "message": "above 85",
        }
    ]
    [(_, body)] = errors.sent
    assert (body["accepted"], body["rejected"]) == (2, 1)


async def test_an_unknown_device_is_quarantined_and_acked(
    consumer: Any, ingestor: FakeIngestor, quarantine: FakeQuarantine
) -> None:
    ingestor.outcomes["ghost"] = DeviceNotFound("Device 'ghost' does not exist.")
    message = FakeMessage("devices.ghost.telemetry", b"{}", sequence=5)
    await consumer.process([message])
    assert message.settled == [("ack", None)]
    assert quarantine.entries["DEVICES_IN-0-5"].reason == "device-not-found"


async def test_overload_naks_with_the_advised_delay_however_often(
    consumer: Any, ingestor: FakeIngestor, quarantine: FakeQuarantine, errors: FakeErrors
) -> None:
    ingestor.outcomes["s-1"] = Overloaded("busy", retry_after_s=3)
    messages = [
        FakeMessage("devices.s-1.telemetry", b"{}", sequence=9, delivered=n) for n in (1, 50)
    ]
    pause = await consumer.process(messages)
    assert [m.settled for m in messages] == [[("nak", 3.0)], [("nak", 3.0)]]
    assert pause == 3.0  # the consumer waits before fetching more
    assert quarantine.entries == {}
    assert errors.sent == []


async def test_a_failing_handler_is_retried_with_backoff_then_dead_lettered(
    consumer: Any, ingestor: FakeIngestor, quarantine: FakeQuarantine
) -> None:
    ingestor.outcomes["s-1"] = RuntimeError("database is down")
    first = FakeMessage("devices.s-1.telemetry", b"{}", sequence=4, delivered=1)
    second = FakeMessage("devices.s-1.telemetry", b"{}", sequence=4, delivered=2)
    await consumer.process([first])
    await consumer.process([second])
    assert first.settled == [("nak", backoff_s(1))]
    assert second.settled == [("nak", backoff_s(2))]
    assert backoff_s(2) > backoff_s(1)
    assert quarantine.entries == {}
    last = FakeMessage("devices.s-1.telemetry", b"{}", sequence=4, delivered=3)
    await consumer.process([last])
    assert last.settled == [("ack", None)]
    [entry] = quarantine.entries.values()
    assert entry.reason == "processing_failed"
    assert "database is down" in entry.detail


async def test_a_redelivered_message_is_not_ingested_twice(
    consumer: Any, ingestor: FakeIngestor
) -> None:
    first = FakeMessage("devices.s-1.telemetry", b"{}", sequence=21)
    again = FakeMessage("devices.s-1.telemetry", b"{}", sequence=21, delivered=2)
    await consumer.process([first])
    await consumer.process([again])
    assert len(ingestor.calls) == 1
    assert again.settled == [("ack", None)]


async def test_the_msg_id_is_the_same_for_every_delivery_of_a_message(
    ingestor: FakeIngestor, quarantine: FakeQuarantine, errors: FakeErrors
) -> None:
    ids = []
    for _ in range(2):  # two processes: nothing remembered in between
        consumer = make_consumer(ingestor, quarantine, errors)
        await consumer.process([FakeMessage("devices.s-1.telemetry", b"{}", sequence=30)])
        ids.append(ingestor.calls[-1]["msg_id"])
    await consumer.process([FakeMessage("devices.s-1.telemetry", b"{}", sequence=31)])
    assert ids[0] == ids[1]
    assert ingestor.calls[-1]["msg_id"] != ids[0]


async def test_each_devices_messages_are_handled_in_stream_order(
    consumer: Any, ingestor: FakeIngestor
) -> None:
    messages = [
        FakeMessage(f"devices.{device}.telemetry", str(seq).encode(), sequence=seq)
        for seq, device in enumerate(["a", "b", "a", "b", "a"], start=1)
    ]
    await consumer.process(messages)
    order = {
        device: [c["raw"] for c in ingestor.calls if c["device_id"] == device] for device in "ab"
    }
    assert order == {"a": [b"1", b"3", b"5"], "b": [b"2", b"4"]}
    assert all(m.settled == [("ack", None)] for m in messages)


async def test_an_invalid_device_token_is_quarantined_without_ingesting(
    consumer: Any, ingestor: FakeIngestor, quarantine: FakeQuarantine, errors: FakeErrors
) -> None:
    message = FakeMessage("devices.bad:id.telemetry", b"{}", sequence=2)
    await consumer.process([message])
    assert ingestor.calls == []
    assert message.settled == [("ack", None)]
    assert quarantine.entries["DEVICES_IN-0-2"].reason == "invalid_device_id"
    assert errors.sent == []


async def test_a_fetch_is_stored_in_one_transaction_before_anything_is_acked(
    consumer: Any, store: FakeStore
) -> None:
    messages = [
        FakeMessage(f"devices.{device}.telemetry", b"{}", sequence=seq)
        for seq, device in enumerate(["a", "b", "a", "c"], start=1)
    ]
    acked_when_stored: list[int] = []
    original = store.store

    async def store_then_look(batch: Sequence[IngestMessage]) -> None:
        acked_when_stored.append(sum(len(m.settled) for m in messages))
        await original(batch)

    store.store = store_then_look  # type: ignore[method-assign]
    await consumer.process(messages)
    [transaction] = store.transactions
    assert sorted(m.device_id for m in transaction) == ["a", "a", "b", "c"]
    assert acked_when_stored == [0]
    assert all(m.settled == [("ack", None)] for m in messages)


async def test_a_message_the_store_refuses_is_retried_and_its_neighbours_are_stored(
    consumer: Any, store: FakeStore, quarantine: FakeQuarantine
) -> None:
    store.failing["bad"] = RuntimeError("poison row")
    good = FakeMessage("devices.good.telemetry", b"{}", sequence=1)
    bad = FakeMessage("devices.bad.telemetry", b"{}", sequence=2)
    await consumer.process([good, bad])
    assert [m.device_id for m in store.stored] == ["good"]
    assert good.settled == [("ack", None)]
    assert bad.settled == [("nak", backoff_s(1))]
    assert quarantine.entries == {}


async def test_the_accepted_points_of_a_partly_rejected_message_are_stored(
    consumer: Any, ingestor: FakeIngestor, store: FakeStore, quarantine: FakeQuarantine
) -> None:
    rejection = Rejected(0, "temp", "value", RejectReason.OUT_OF_RANGE, "above 85")
    ingestor.outcomes["s-1"] = Report(accepted=[object()], rejected=[rejection])
    message = FakeMessage("devices.s-1.telemetry", b"[...]", sequence=8)
    await consumer.process([message])
    assert [len(m.points) for m in store.stored] == [1]
    assert quarantine.entries["DEVICES_IN-0-8"].reason == "points_rejected"
    assert message.settled == [("ack", None)]


async def test_a_message_without_points_is_acked_without_storing(
    consumer: Any, ingestor: FakeIngestor, store: FakeStore, quarantine: FakeQuarantine
) -> None:
    ingestor.outcomes["s-1"] = Report()
    message = FakeMessage("devices.s-1.telemetry", b"[]", sequence=9)
    await consumer.process([message])
    assert store.transactions == []
    assert quarantine.entries == {}
    assert message.settled == [("ack", None)]


@pytest.mark.parametrize("candidate", ["0\n", "a b", "a.b", "", "x" * 65, "-a"])
def test_what_is_not_a_registrable_device_id_is_not_taken_for_one(candidate: str) -> None:
    assert not is_device_id(candidate)


def test_a_registrable_device_id_is_taken_for_one() -> None:
    assert is_device_id("sensor-01_A")
