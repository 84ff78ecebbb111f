"""JetStream publishes in batches, their PubAcks collected through one inbox subscription.

nats-py's `publish_async` costs about 15 µs a message beyond the publish itself (a
future, a semaphore taken through `wait_for`, random reply tokens): as much as the
outbox relay spends on everything else of an event. `AckedPublisher` publishes each
message of a batch with the reply subject `<inbox>.<batch>.<index>` and counts the
answers of the batch into one list; one event wakes the caller when the last came.

The frames themselves are written here too, a hundred at a time into the client's
write buffer: nats-py's `publish` checks the subject and builds the header block from
a dict with a regular expression per key for every message, which cost as much again
as everything else of a publish. Subjects are checked once each, ids every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
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


_SUBJECT = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")
"""A subject one can publish to: tokens without white space or wildcards."""
_HEADER_START = b"NATS/1.0\r\n" + MSG_ID_HEADER.encode() + b": "


def hpub_frame(subject: str, reply: str, msg_id: str, payload: bytes) -> bytes:
    """`HPUB <subject> <reply> <header size> <total size>` with one `Nats-Msg-Id` header."""
    header = b"%s%s\r\n\r\n" % (_HEADER_START, msg_id.encode())
    size = len(header)
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        reply.encode(),
        size,
        size + len(payload),
        header,
        payload,
    )


def _safe_id(msg_id: str) -> bool:
    return bool(msg_id) and msg_id.isprintable() and msg_id.strip() == msg_id


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
        self._subjects: set[str] = set()
        """Subjects already checked to be safe on the protocol line."""

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
        """Publish in order until one cannot be sent; how many were sent. Each turn of the
        event loop writes up to `YIELD_EVERY` messages as one buffer of HPUB frames."""
        reply = f"{self._prefix}.{number}."
        for start in range(0, len(messages), YIELD_EVERY):
            if start:
                await asyncio.sleep(0)
            if self._nc.is_closed or self._nc.is_draining_pubs:
                return start
            frames: list[bytes] = []
            for index, message in enumerate(messages[start : start + YIELD_EVERY], start):
                frame = self._frame(message, f"{reply}{index}")
                if frame is None:
                    return index if await self._write(frames) else start
                frames.append(frame)
            if not await self._write(frames):
                return start
        return len(messages)

    def _frame(self, message: OrderedPublish, reply: str) -> bytes | None:
        """The message's HPUB frame, or None when it cannot be sent (too big for the server,
        a subject or id that would break the protocol line)."""
        if len(message.payload) > self._nc.max_payload or not _safe_id(message.msg_id):
            return None
        if message.subject not in self._subjects:
            if not _SUBJECT.fullmatch(message.subject):
                return None
            self._subjects.add(message.subject)
        return hpub_frame(message.subject, reply, message.msg_id, message.payload)

    async def _write(self, frames: list[bytes]) -> bool:
        """Hand the frames to the client's write buffer, as its own publish does (which
        builds each frame in Python through a dict of headers, at twice the cost). False
        when the client refused them: they count as not sent (a resend is harmless)."""
        if not frames:
            return True
        nc = self._nc
        try:
            await nc._send_command(b"".join(frames))
            if nc._flush_queue is not None and nc._flush_queue.empty():
                await nc._flush_pending()
        except Exception:
            return False
        return True

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
