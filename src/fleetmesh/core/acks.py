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

Atomic batches (`publish(..., atomic=True)`, a stream with `allow_atomic`, nats-server
2.12 or later) carry up to `ATOMIC_LIMIT` messages that JetStream stores all or none,
with one PubAck for the whole batch: reading a PubAck per message cost the outbox relay
8 µs of its 11 µs per event. The batches go one at a time, so the stream keeps the
order given. A batch JetStream refuses is published again message by message: one that
holds a message id it stored before (a relay's republish after a crash) is refused
whole, where single publishes drop just the duplicates. A server that does not take
atomic batches (refused as disabled, or answered without the batch's count) gets single
publishes from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from fleetmesh.core.logging import get_logger

log = get_logger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
STATUS_HEADER = "Status"
NO_RESPONDERS = "503"
PENDING_LIMIT = 1_000_000
YIELD_EVERY = 100
"""Messages published between two turns given to the rest of the event loop: a batch of
thousands would otherwise hold it for tens of milliseconds."""
ATOMIC_LIMIT = 1_000
"""Messages in one atomic batch: the server's limit."""
DUPLICATE_IN_BATCH = 10201
"""JetStream's error code for an atomic batch holding a message id it stored before."""


_SUBJECT = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")
"""A subject one can publish to: tokens without white space or wildcards."""
_HEADER_START = b"NATS/1.0\r\n" + MSG_ID_HEADER.encode() + b": "


def hpub_frame(
    subject: str, reply: str, msg_id: str, payload: bytes, more_headers: bytes = b""
) -> bytes:
    """`HPUB <subject> [<reply>] <header size> <total size>` with a `Nats-Msg-Id` header
    and `more_headers` (whole header lines); no reply subject when `reply` is empty."""
    header = b"%s%s\r\n%s\r\n" % (_HEADER_START, msg_id.encode(), more_headers)
    size = len(header)
    return b"HPUB %s%s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        b" " + reply.encode() if reply else b"",
        size,
        size + len(payload),
        header,
        payload,
    )


def atomic_hpub_frame(
    subject: str, msg_id: str, payload: bytes, batch: str, sequence: int, commit_reply: str
) -> bytes:
    """A message of an atomic batch: its `Nats-Msg-Id`, the batch's id and its place in it;
    the last one (given a reply subject, where the batch's PubAck goes) commits it."""
    batch_headers = b"Nats-Batch-Id: %s\r\nNats-Batch-Sequence: %d\r\n" % (
        batch.encode(),
        sequence,
    )
    if commit_reply:
        batch_headers += b"Nats-Batch-Commit: 1\r\n"
    return hpub_frame(subject, commit_reply, msg_id, payload, batch_headers)


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


class AtomicBatchRefused(PublishRejected):
    """JetStream refused an atomic batch as a whole: none of its messages was stored."""

    def __init__(self, reason: str, *, duplicate: bool) -> None:
        super().__init__(reason)
        self.duplicate = duplicate
        """The batch holds a message id stored before (else: the server takes no batches)."""


class _PubAck(msgspec.Struct):
    stream: str | None = None
    seq: int | None = None
    error: dict[str, object] | None = None
    batch: str | None = None
    count: int | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode


@dataclass(eq=False)
class _Batch:
    outcomes: list[BaseException | None]
    """Per message: `no_ack` until answered, then None (stored) or the failure."""
    no_ack: TimeoutError
    missing: int
    """Answers still to come."""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    atomic_id: str = ""
    """The atomic batch these messages make up: one answer, for all of them."""

    def answer(self, index: int, outcome: BaseException | None) -> None:
        if 0 <= index < len(self.outcomes) and self.outcomes[index] is self.no_ack:
            self.outcomes[index] = outcome
            self._count_down(1)

    def answer_all(self, outcome: BaseException | None) -> None:
        if self.missing > 0:
            self.outcomes = [outcome] * len(self.outcomes)
            self._count_down(self.missing)

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
        self._token = self._prefix.rsplit(".", 1)[-1]
        """Unique to this publisher: the start of its atomic batches' ids."""
        self.atomic_batches = True
        """False once the server showed it takes no atomic batches."""
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
        self, messages: Sequence[OrderedPublish], *, timeout: float, atomic: bool = False
    ) -> list[BaseException | None]:
        """Per message: None once JetStream stored it, else why not. A PubAck that did not
        come within `timeout` counts as a failure (the message may still have been stored,
        which its `msg_id` makes harmless to publish again). With `atomic`, in atomic
        batches while the server takes them; a batch that failed ends the publish."""
        await self.start()
        if not (atomic and self.atomic_batches):
            return await self._publish_singly(messages, timeout)
        outcomes: list[BaseException | None] = []
        for start in range(0, len(messages), ATOMIC_LIMIT):
            answered = await self._publish_group(messages[start : start + ATOMIC_LIMIT], timeout)
            outcomes += answered
            if any(outcome is not None for outcome in answered):
                break
        return outcomes + [_not_published() for _ in range(len(messages) - len(outcomes))]

    async def _publish_group(
        self, group: Sequence[OrderedPublish], timeout: float
    ) -> list[BaseException | None]:
        """One atomic batch; message by message when JetStream refused it as a whole."""
        if self.atomic_batches:
            outcomes = await self._publish_atomically(group, timeout)
            refused = outcomes[0]
            if not isinstance(refused, AtomicBatchRefused):
                return outcomes
            if not refused.duplicate:
                self.atomic_batches = False
                log.warning("atomic_batches_unavailable", reason=str(refused))
        return await self._publish_singly(group, timeout)

    async def _publish_atomically(
        self, group: Sequence[OrderedPublish], timeout: float
    ) -> list[BaseException | None]:
        """The group as one atomic batch, up to a message that cannot be sent."""
        count = next((i for i, message in enumerate(group) if not self._sendable(message)), None)
        count = len(group) if count is None else count
        if not count:
            return [_not_published() for _ in group]
        number = next(self._numbers)
        no_ack = TimeoutError("no PubAck in time")
        batch = _Batch([no_ack] * count, no_ack, count, atomic_id=f"{self._token}-{number}")
        with self._awaiting(number, batch):
            if await self._send_atomically(number, batch.atomic_id, group[:count]):
                await _answered(batch, timeout)
            else:  # no commit went out: the server drops what it got of the batch
                batch.outcomes = [_not_published() for _ in range(count)]
        return batch.outcomes + [_not_published() for _ in range(len(group) - count)]

    async def _send_atomically(
        self, number: int, batch_id: str, messages: Sequence[OrderedPublish]
    ) -> bool:
        """Write the batch, its last message committing it; False if not all went out."""
        commit_reply = f"{self._prefix}.{number}.0"
        last = len(messages)
        for start in range(0, last, YIELD_EVERY):
            if start:
                await asyncio.sleep(0)
            if self._nc.is_closed or self._nc.is_draining_pubs:
                return False
            frames = [
                atomic_hpub_frame(
                    message.subject,
                    message.msg_id,
                    message.payload,
                    batch_id,
                    sequence,
                    commit_reply if sequence == last else "",
                )
                for sequence, message in enumerate(messages[start : start + YIELD_EVERY], start + 1)
            ]
            if not await self._write(frames):
                return False
        return True

    async def _publish_singly(
        self, messages: Sequence[OrderedPublish], timeout: float
    ) -> list[BaseException | None]:
        number = next(self._numbers)
        no_ack = TimeoutError("no PubAck in time")
        batch = _Batch([no_ack] * len(messages), no_ack, len(messages))
        with self._awaiting(number, batch):
            sent = await self._send(number, messages)
            batch.not_sent(len(messages) - sent)
            await _answered(batch, timeout)
        return batch.outcomes[:sent] + [_not_published() for _ in range(len(messages) - sent)]

    @contextlib.contextmanager
    def _awaiting(self, number: int, batch: _Batch) -> Iterator[None]:
        """While its messages are published and answered, PubAcks to `number` go to `batch`."""
        self._batches[number] = batch
        try:
            yield
        finally:
            del self._batches[number]

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
        """The message's HPUB frame, or None when it cannot be sent."""
        if not self._sendable(message):
            return None
        return hpub_frame(message.subject, reply, message.msg_id, message.payload)

    def _sendable(self, message: OrderedPublish) -> bool:
        """False when the message is too big for the server, or its subject or id would
        break the protocol line."""
        if len(message.payload) > self._nc.max_payload or not _safe_id(message.msg_id):
            return False
        if message.subject not in self._subjects:
            if not _SUBJECT.fullmatch(message.subject):
                return False
            self._subjects.add(message.subject)
        return True

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
        if batch is None:
            return
        if batch.atomic_id:
            batch.answer_all(_atomic_outcome(message, batch.atomic_id, len(batch.outcomes)))
        else:
            batch.answer(int(index), _outcome(message))


async def _answered(batch: _Batch, timeout: float) -> None:
    """Until every message of the batch is answered, at most `timeout` seconds."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await batch.done.wait()


def _not_published() -> TimeoutError:
    return TimeoutError("not published")


def _atomic_outcome(message: Msg, batch_id: str, count: int) -> BaseException | None:
    """None when JetStream stored the whole batch (its PubAck names it and its count)."""
    ack = _read_ack(message)
    if isinstance(ack, BaseException):
        return ack
    if ack.error is not None:
        duplicate = ack.error.get("err_code") == DUPLICATE_IN_BATCH
        return AtomicBatchRefused(f"JetStream refused the batch: {ack.error}", duplicate=duplicate)
    if ack.batch != batch_id or ack.count != count:
        # A server that knows no batches stored the messages one by one, unanswered.
        return AtomicBatchRefused(f"not stored as an atomic batch: {ack}", duplicate=False)
    return None


def _read_ack(message: Msg) -> _PubAck | PublishRejected:
    headers = message.headers
    if headers and headers.get(STATUS_HEADER) == NO_RESPONDERS:
        return PublishRejected("no stream stores this subject")
    try:
        return _decode_ack(message.data)
    except msgspec.DecodeError as error:
        return PublishRejected(f"unreadable PubAck: {error}")


def _outcome(message: Msg) -> BaseException | None:
    ack = _read_ack(message)
    if isinstance(ack, BaseException):
        return ack
    if ack.error is not None or ack.seq is None:
        return PublishRejected(f"JetStream refused the message: {ack.error}")
    return None
