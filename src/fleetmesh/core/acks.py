"""JetStream publishes in batches, their PubAcks collected through one inbox subscription.

nats-py's `publish_async` costs about 15 µs a message beyond the publish itself (a
future, a semaphore taken through `wait_for`, random reply tokens): as much as the
outbox relay spends on everything else of an event. `AckedPublisher` publishes each
message of a batch with the reply subject `<inbox>.<batch>.<index>` and counts the
answers of the batch into one list; one event wakes the caller when the last came.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

MSG_ID_HEADER = "Nats-Msg-Id"
STATUS_HEADER = "Status"
NO_RESPONDERS = "503"
PENDING_LIMIT = 1_000_000
YIELD_EVERY = 100
"""Messages published between two turns given to the rest of the event loop: a batch of
thousands would otherwise hold it for tens of milliseconds."""


class PublishRejected(RuntimeError):
    """JetStream answered a publish with an error (or nothing stores the subject)."""


@dataclass(frozen=True, slots=True)
class OrderedPublish:
    """One message of a batch: published with `msg_id` as its `Nats-Msg-Id`."""

    subject: str
    payload: bytes
    msg_id: str


class _PubAck(msgspec.Struct):
    stream: str | None = None
    seq: int | None = None
    error: dict[str, object] | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode


@dataclass(eq=False)
class _Batch:
    outcomes: list[BaseException | None]
    """Per message: `no_ack` until answered, then None (stored) or the failure."""
    no_ack: TimeoutError
    missing: int
    """Answers still to come."""
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def answer(self, index: int, outcome: BaseException | None) -> None:
        if 0 <= index < len(self.outcomes) and self.outcomes[index] is self.no_ack:
            self.outcomes[index] = outcome
            self._count_down(1)

    def not_sent(self, count: int) -> None:
        """The last `count` messages were not published: no answer will come for them."""
        self._count_down(count)

    def _count_down(self, count: int) -> None:
        self.missing -= count
        if self.missing <= 0:
            self.done.set()


class AckedPublisher:
    """Publishes batches to JetStream and waits for their PubAcks; `start` first."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._batches: dict[int, _Batch] = {}
        self._numbers = itertools.count()
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        if self._subscription is None:
            self._subscription = await self._nc.subscribe(
                f"{self._prefix}.>", cb=self._on_ack, pending_msgs_limit=PENDING_LIMIT
            )

    async def stop(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.unsubscribe()

    async def publish(
        self, messages: Sequence[OrderedPublish], *, timeout: float
    ) -> list[BaseException | None]:
        """Per message: None once JetStream stored it, else why not. A PubAck that did not
        come within `timeout` counts as a failure (the message may still have been stored,
        which its `msg_id` makes harmless to publish again)."""
        await self.start()
        number = next(self._numbers)
        no_ack = TimeoutError("no PubAck in time")
        batch = _Batch([no_ack] * len(messages), no_ack, len(messages))
        self._batches[number] = batch
        try:
            sent = await self._send(number, messages)
            batch.not_sent(len(messages) - sent)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await batch.done.wait()
        finally:
            del self._batches[number]
        return batch.outcomes[:sent] + [TimeoutError("not published")] * (len(messages) - sent)

    async def _send(self, number: int, messages: Sequence[OrderedPublish]) -> int:
        """Publish in order until one cannot be sent; how many were sent."""
        reply = f"{self._prefix}.{number}."
        for index, message in enumerate(messages):
            if index and index % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            try:
                await self._nc.publish(
                    message.subject,
                    message.payload,
                    reply=f"{reply}{index}",
                    headers={MSG_ID_HEADER: message.msg_id},
                )
            except Exception:
                return index
        return len(messages)

    async def _on_ack(self, message: Msg) -> None:
        _, number, index = message.subject.rsplit(".", 2)
        batch = self._batches.get(int(number))
        if batch is not None:
            batch.answer(int(index), _outcome(message))


def _outcome(message: Msg) -> BaseException | None:
    headers = message.headers
    if headers and headers.get(STATUS_HEADER) == NO_RESPONDERS:
        return PublishRejected("no stream stores this subject")
    try:
        ack = _decode_ack(message.data)
    except msgspec.DecodeError as error:
        return PublishRejected(f"unreadable PubAck: {error}")
    if ack.error is not None or ack.seq is None:
        return PublishRejected(f"JetStream refused the message: {ack.error}")
    return None
