"""A subscription worker on a real JetStream consumer, with the delivery log write held back.

Sending goes on while outcomes wait for their (group) commit, yet nothing is
acked before its outcome is written; and the events waiting for the write are
bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import msgspec
import pytest
from nats.js.api import DeliverPolicy

from fleetmesh.bootstrap import Platform
from fleetmesh.core.backbone import EVENTS_STREAM
from fleetmesh.core.clock import SystemClock
from fleetmesh.core.envelope import subject_for_type
from fleetmesh.events import delivery
from fleetmesh.events.cloudevents import CloudEvent, parse_structured, to_structured
from fleetmesh.events.delivery import Attempt, DeliveryRecorder, SubscriptionWorker
from fleetmesh.events.domain import RetryPolicy
from fleetmesh.events.repository import DeadLetter, DeliveryRecord
from fleetmesh.events.subscription import DeliveryOptions, Endpoint, Subscription
from fleetmesh.events.supervisor import consumer_config

pytestmark = pytest.mark.integration

EVENT_TYPE = "com.acme.pipeline.checked"
EVENTS = 20


class HeldBackLog:
    """A delivery log whose writes wait until `release()`."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        self.records: list[DeliveryRecord] = []

    def release(self) -> None:
        self.released.set()

    async def write(self, records: Sequence[DeliveryRecord], letters: Sequence[DeadLetter]) -> None:
        await self.released.wait()
        self.records.extend(records)

    async def close(self) -> None:
        return None


class CountingSender:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, events: Sequence[CloudEvent]) -> Attempt:
        self.sent.extend(event.id for event in events)
        return Attempt(True, 204)

    async def aclose(self) -> None:
        return None


@dataclass
class Pipeline:
    platform: Platform
    log: HeldBackLog
    sender: CountingSender
    consumer: str

    async def publish(self, count: int) -> None:
        for number in range(count):
            event = parse_structured(
                {
                    "specversion": "1.0",
                    "id": f"pipeline-{number}",
                    "source": "/tests",
                    "type": EVENT_TYPE,
                    "data": {"n": number},
                }
            )
            await self.platform.backbone.publish(
                subject_for_type(EVENT_TYPE),
                msgspec.json.encode(to_structured(event)),
                msg_id=event.id,
            )

    async def unacked(self) -> int:
        info = await self.platform.backbone.js.consumer_info(EVENTS_STREAM, self.consumer)
        return int(info.num_ack_pending or 0)


@pytest.fixture
async def pipeline(sqlite_platform: Platform) -> AsyncIterator[Pipeline]:
    subscription = Subscription(
        id="01PIPELINETEST00000000000",
        endpoint=Endpoint.parse("http://127.0.0.1:9/hook"),
        secret="whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=",
        types=(EVENT_TYPE,),
        options=DeliveryOptions(max_in_flight=1),
    )
    consumer = "pipeline_test"
    await sqlite_platform.backbone.js.add_consumer(
        EVENTS_STREAM,
        consumer_config(subscription, name=consumer, deliver={"deliver_policy": DeliverPolicy.NEW}),
    )
    log = HeldBackLog()
    recorder = DeliveryRecorder(log)  # type: ignore[arg-type]
    recorder.start()
    sender = CountingSender()
    worker = SubscriptionWorker(
        subscription,
        consumer=consumer,
        backbone=sqlite_platform.backbone,
        recorder=recorder,
        sender=sender,
        policy=RetryPolicy,
        clock=SystemClock(),
    )
    await worker.start()
    try:
        yield Pipeline(sqlite_platform, log, sender, consumer)
    finally:
        log.release()
        await worker.stop()
        await recorder.stop()


Wait = Callable[..., Awaitable[None]]


async def test_sending_goes_on_while_outcomes_wait_to_be_written(
    pipeline: Pipeline, wait_until: Wait
) -> None:
    assert DeliveryOptions(max_in_flight=1).capacity < EVENTS

    await pipeline.publish(EVENTS)

    await wait_until(lambda: len(pipeline.sender.sent) == EVENTS)
    assert pipeline.log.records == []
    assert await pipeline.unacked() == EVENTS

    pipeline.log.release()

    await wait_until(lambda: len(pipeline.log.records) == EVENTS)

    async def all_acked() -> bool:
        return await pipeline.unacked() == 0

    await wait_until(all_acked)
    assert sorted(r.event_id for r in pipeline.log.records) == sorted(pipeline.sender.sent)


async def test_events_waiting_for_their_write_are_bounded(
    pipeline: Pipeline, wait_until: Wait, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 5
    monkeypatch.setattr(delivery, "RECORDING_LIMIT", limit)
    bound = limit + DeliveryOptions(max_in_flight=1).capacity

    await pipeline.publish(EVENTS)

    await wait_until(lambda: len(pipeline.sender.sent) >= limit)
    await asyncio.sleep(0.3)
    assert len(pipeline.sender.sent) <= bound

    pipeline.log.release()

    await wait_until(lambda: len(pipeline.log.records) == EVENTS)
