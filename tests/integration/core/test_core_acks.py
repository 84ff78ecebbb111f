"""AckedPublisher against a real nats-server: stored in order, refusals, silence, a closed link."""

from __future__ import annotations

from dataclasses import replace

import pytest
from nats.aio.msg import Msg
from nats.js.api import DiscardPolicy, StreamConfig

from fleetmesh.bootstrap import Platform
from fleetmesh.core.acks import AckedPublisher, OrderedPublish, PublishRejected

pytestmark = pytest.mark.integration

STREAM = "ACKTEST"


@pytest.fixture
async def publisher(sqlite_platform: Platform) -> AckedPublisher:
    await sqlite_platform.backbone.ensure_stream(StreamConfig(name=STREAM, subjects=["acktest.>"]))
    acked = AckedPublisher(sqlite_platform.backbone.nc)
    await acked.start()
    return acked


def messages(count: int, subject: str = "acktest.a", prefix: str = "m") -> list[OrderedPublish]:
    return [OrderedPublish(subject, str(n).encode(), f"{prefix}-{n}") for n in range(count)]


async def test_a_batch_is_stored_in_order_and_each_message_answered(
    sqlite_platform: Platform, publisher: AckedPublisher
) -> None:
    outcomes = await publisher.publish(messages(300), timeout=10)

    assert outcomes == [None] * 300
    js = sqlite_platform.backbone.js
    assert (await js.stream_info(STREAM)).state.messages == 300
    stored = [(await js.get_msg(STREAM, seq)).data for seq in (1, 150, 300)]
    assert stored == [b"0", b"149", b"299"]


async def test_a_message_published_again_is_stored_once(
    sqlite_platform: Platform, publisher: AckedPublisher
) -> None:
    await publisher.publish(messages(10), timeout=10)
    again = await publisher.publish(messages(10), timeout=10)

    assert again == [None] * 10  # a duplicate is acknowledged, not stored twice
    assert (await sqlite_platform.backbone.js.stream_info(STREAM)).state.messages == 10


async def test_a_subject_no_stream_stores_is_refused(publisher: AckedPublisher) -> None:
    outcomes = await publisher.publish(messages(2, subject="nowhere.a"), timeout=5)

    assert all(isinstance(outcome, PublishRejected) for outcome in outcomes)


async def test_jetstream_refusing_a_message_is_reported_for_that_message(
    sqlite_platform: Platform,
) -> None:
    full = StreamConfig(
        name="ACKFULL", subjects=["ackfull.>"], max_msgs=2, discard=DiscardPolicy.NEW
    )
    await sqlite_platform.backbone.ensure_stream(full)
    publisher = AckedPublisher(sqlite_platform.backbone.nc)

    outcomes = await publisher.publish(messages(3, subject="ackfull.a"), timeout=5)

    assert outcomes[:2] == [None, None]
    assert isinstance(outcomes[2], PublishRejected)
    assert "maximum messages" in str(outcomes[2])


async def test_a_publish_nobody_answers_times_out(sqlite_platform: Platform) -> None:
    nc = sqlite_platform.backbone.nc
    silent = await nc.subscribe("silent.>")  # receives, never answers: no "no responders"
    publisher = AckedPublisher(nc)

    outcomes = await publisher.publish(messages(3, subject="silent.a"), timeout=0.3)

    assert all(isinstance(outcome, TimeoutError) for outcome in outcomes)
    await silent.unsubscribe()


async def test_messages_that_cannot_be_sent_are_reported_not_published(
    sqlite_platform: Platform, publisher: AckedPublisher
) -> None:
    await sqlite_platform.backbone.nc.close()

    outcomes = await publisher.publish(messages(3), timeout=1)

    assert [str(outcome) for outcome in outcomes] == ["not published"] * 3


@pytest.mark.parametrize(
    "bad",
    [
        OrderedPublish("acktest.with space", b"x", "bad-subject"),
        OrderedPublish("acktest.*", b"x", "wildcard"),
        OrderedPublish("acktest.a", b"x", "line\r\nbreak"),
        OrderedPublish("acktest.a", b"", "too-big"),
    ],
)
async def test_a_message_that_cannot_be_framed_ends_the_batch_unsent(
    sqlite_platform: Platform, publisher: AckedPublisher, bad: OrderedPublish
) -> None:
    if bad.msg_id == "too-big":
        bad = replace(bad, payload=b"x" * (sqlite_platform.backbone.nc.max_payload + 1))
    batch = [*messages(150), bad, *messages(3, prefix="after")]

    outcomes = await publisher.publish(batch, timeout=10)

    assert outcomes[:150] == [None] * 150
    assert [str(outcome) for outcome in outcomes[150:]] == ["not published"] * 4
    assert (await sqlite_platform.backbone.js.stream_info(STREAM)).state.messages == 150
    assert await publisher.publish(messages(1, prefix="next"), timeout=10) == [None]


async def test_frames_carry_the_message_id_header_and_payload_byte_for_byte(
    sqlite_platform: Platform, publisher: AckedPublisher
) -> None:
    payload = 'quote " ü ✓ \r\n end'.encode()
    await publisher.publish([OrderedPublish("acktest.b", payload, "id-with-dash_1")], timeout=10)

    stored = await sqlite_platform.backbone.js.get_msg(STREAM, 1)
    assert stored.data == payload
    assert stored.headers == {"Nats-Msg-Id": "id-with-dash_1"}


ATOMIC = "ACKATOMIC"


@pytest.fixture
async def atomic_stream(sqlite_platform: Platform) -> str:
    config = StreamConfig(name=ATOMIC, subjects=["ackatomic.>"], allow_atomic=True)
    await sqlite_platform.backbone.ensure_stream(config)
    return "ackatomic.a"


async def test_atomic_batches_store_every_message_in_order_with_one_puback_each(
    sqlite_platform: Platform, publisher: AckedPublisher, atomic_stream: str
) -> None:
    answers = 0
    answer = publisher._on_ack

    async def counted(message: Msg) -> None:
        nonlocal answers
        answers += 1
        await answer(message)

    publisher._on_ack = counted  # type: ignore[method-assign]
    await publisher.stop()
    await publisher.start()

    outcomes = await publisher.publish(messages(2_500, atomic_stream), timeout=10, atomic=True)

    assert outcomes == [None] * 2_500
    assert answers == 3  # batches of 1,000, 1,000 and 500
    js = sqlite_platform.backbone.js
    assert (await js.stream_info(ATOMIC)).state.messages == 2_500
    stored = [await js.get_msg(ATOMIC, seq) for seq in (1, 1_000, 1_001, 2_500)]
    assert [m.data for m in stored] == [b"0", b"999", b"1000", b"2499"]
    assert stored[1].headers is not None and stored[1].headers["Nats-Msg-Id"] == "m-999"
    assert stored[1].headers["Nats-Batch-Commit"] == "1"
    assert publisher.atomic_batches


async def test_a_batch_holding_an_id_stored_before_is_published_again_message_by_message(
    sqlite_platform: Platform, publisher: AckedPublisher, atomic_stream: str
) -> None:
    """What a relay does after a crash between publishing and marking its rows."""
    await publisher.publish(messages(10, atomic_stream), timeout=10)

    again = await publisher.publish(messages(15, atomic_stream), timeout=10, atomic=True)

    assert again == [None] * 15
    js = sqlite_platform.backbone.js
    assert (await js.stream_info(ATOMIC)).state.messages == 15
    assert [(await js.get_msg(ATOMIC, seq)).data for seq in (10, 11, 15)] == [b"9", b"10", b"14"]
    assert publisher.atomic_batches  # a refusal for duplicates is no reason to stop batching


async def test_a_stream_without_atomic_batches_gets_single_publishes_from_then_on(
    sqlite_platform: Platform, publisher: AckedPublisher
) -> None:
    outcomes = await publisher.publish(messages(1_500), timeout=10, atomic=True)

    assert outcomes == [None] * 1_500
    assert not publisher.atomic_batches
    js = sqlite_platform.backbone.js
    assert (await js.stream_info(STREAM)).state.messages == 1_500
    assert (await js.get_msg(STREAM, 1_500)).data == b"1499"


async def test_an_atomic_batch_ends_before_a_message_that_cannot_be_sent(
    sqlite_platform: Platform, publisher: AckedPublisher, atomic_stream: str
) -> None:
    bad = OrderedPublish(atomic_stream, b"x", "line\r\nbreak")
    batch = [*messages(150, atomic_stream), bad, *messages(3, atomic_stream, prefix="after")]

    outcomes = await publisher.publish(batch, timeout=10, atomic=True)

    assert outcomes[:150] == [None] * 150
    assert [str(outcome) for outcome in outcomes[150:]] == ["not published"] * 4
    assert (await sqlite_platform.backbone.js.stream_info(ATOMIC)).state.messages == 150


async def test_an_atomic_batch_nobody_answers_times_out_and_ends_the_publish(
    sqlite_platform: Platform,
) -> None:
    nc = sqlite_platform.backbone.nc
    silent = await nc.subscribe("silent.>")
    publisher = AckedPublisher(nc)

    outcomes = await publisher.publish(
        messages(1_200, subject="silent.a"), timeout=0.3, atomic=True
    )

    assert all(isinstance(outcome, TimeoutError) for outcome in outcomes)
    assert [str(outcome) for outcome in outcomes[1_000:]] == ["not published"] * 200
    await silent.unsubscribe()
