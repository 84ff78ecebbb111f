"""Delivery of stored events to one subscription: pull, send, record, then ack.

Each subscription has its own durable pull consumer on `EVENTS` (filtered on the
subjects of its type patterns) and its own worker, HTTP connection pool and
in-flight limit, so a slow or dead endpoint never delays another subscription.

The worker keeps one pull request open at a time (batch = free capacity, 30 s
expiry, 5 s idle heartbeats) and dispatches each message as it arrives, so a
published event is on its way within a round trip. A delivery is

1. matched against the subscription's type patterns and filters (a miss is acked);
2. sent: webhooks as a POST in the CloudEvents HTTP *binary* mode (`ce-*`
   headers, the data as the body) or, with `batch_size` > 1, the *batched*
   mode (`application/cloudevents-batch+json`), signed with the Standard
   Webhooks headers (`webhook-id` = the event id, stable across retries); NATS
   endpoints get the structured JSON (JetStream-acknowledged when a stream
   captures the subject, else a plain publish accepted by the server);
3. recorded in `event_deliveries` (rows of all workers are written together,
   one transaction per flush: group commit) and, when given up, in
   `event_dead_letters` with the payload;
4. then acked, or nak'ed with the retry delay (exponential backoff with full
   jitter, `RetryPolicy`). Acking only after the outcome is written means a
   crash loses nothing: the event comes again (at-least-once; receivers
   deduplicate on `webhook-id`).

2xx is success; anything else (status, timeout, connection error, a host the
SSRF guard refuses) is a failed attempt. Attempts are counted by JetStream
(`num_delivered`); once `max_attempts` is reached the event is dead-lettered.
Ordered subscriptions have `max_ack_pending` = one unit, so the next event is
only handed out once the previous one is delivered or dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import aiohttp
import msgspec
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from fleetmesh.core.backbone import EVENTS_STREAM, Backbone
from fleetmesh.core.clock import Clock
from fleetmesh.core.ids import new_id
from fleetmesh.core.logging import get_logger
from fleetmesh.events.cloudevents import (
    STRUCTURED_CONTENT_TYPE,
    CloudEvent,
    parse_structured,
    to_binary,
    to_structured,
)
from fleetmesh.events.domain import RetryPolicy, ValidationFailed, delay_for
from fleetmesh.events.guard import BlockedDestination, HostGuard
from fleetmesh.events.repository import DeadLetter, DeliveryLogWriter, DeliveryRecord
from fleetmesh.events.signing import signature_headers
from fleetmesh.events.subscription import Subscription

log = get_logger(__name__)

OUTCOME_HEADER = "Fleetmesh-Outcomes"
"""A NATS header of a stored event: the subject its publisher waits for outcomes on."""
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
USER_AGENT = "fleetmesh-webhooks/1"
PULL_EXPIRES_S = 30.0
PULL_HEARTBEAT_S = 5.0
BATCH_LINGER_S = 0.005
ACK_WAIT_S = 5.0
KEEP_ALIVE_S = 1.5
IDLE_CONNECTION_S = 30.0
MAX_ERROR_TEXT = 300
MAX_RESPONSE_READ = 4096
MAX_KEY = 255
"""Event ids and types are kept to this length in the delivery log."""
RECORDER_MAX_BATCH = 2000
RECORDING_LIMIT = 2000
"""Events of one worker whose outcome may wait to be written before it stops pulling."""
STREAM_LOOKUP_TTL_S = 30.0
FLUSH_INTERVAL_S = 0.05

DELIVERED = "delivered"
FAILED = "failed"
DEAD_LETTERED = "dead_lettered"


@dataclass(frozen=True, slots=True)
class Attempt:
    """The result of one request to an endpoint."""

    ok: bool
    http_status: int | None = None
    error: str | None = None
    latency_ms: float = 0.0


class Outcome(msgspec.Struct, frozen=True):
    """What a worker tells a publisher waiting with `?ack=delivered`."""

    subscription_id: str
    event_id: str
    status: str
    attempt: int
    final: bool
    http_status: int | None = None
    error: str | None = None


# --------------------------------------------------------------------------- senders


class Sender(Protocol):
    async def send(self, events: Sequence[CloudEvent]) -> Attempt:
        """Deliver the events in one request."""

    async def aclose(self) -> None:
        """Release connections."""


def new_ssl_context() -> ssl.SSLContext:
    """One TLS context shared by every sender (loading the CA bundle is expensive)."""
    return ssl.create_default_context()


def batch_id(events: Sequence[CloudEvent]) -> str:
    """A stable `webhook-id` for a batch: the same events give the same id."""
    digest = hashlib.sha256("\n".join(event.id for event in events).encode()).hexdigest()
    return f"batch_{digest[:32]}"


def encode_request(
    events: Sequence[CloudEvent], *, batched: bool
) -> tuple[str, dict[str, str], bytes]:
    """The message id, headers and body of a delivery (binary mode, or batched mode)."""
    if not batched and len(events) == 1:
        headers, body = to_binary(events[0])
        return events[0].id, headers, body
    body = json.dumps([to_structured(e) for e in events], separators=(",", ":")).encode()
    return batch_id(events), {"content-type": BATCH_CONTENT_TYPE}, body


class WebhookSender:
    """POSTs deliveries of one subscription over its own keep-alive connection pool.

    The client is aiohttp: a request costs it about a tenth of the CPU that
    httpx spends, and this runs once per delivery.
    """

    def __init__(
        self, subscription: Subscription, *, guard: HostGuard, ssl_context: ssl.SSLContext
    ) -> None:
        self.subscription = subscription
        self.guard = guard
        self._ssl = ssl_context
        self._timeout = subscription.options.timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        """The session, made on first use: aiohttp binds it to the running loop."""
        if self._session is None:
            options = self.subscription.options
            connector = aiohttp.TCPConnector(
                limit=1 if options.ordered else options.max_in_flight,
                ssl=self._ssl,
                keepalive_timeout=IDLE_CONNECTION_S,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={"user-agent": USER_AGENT},
            )
        return self._session

    async def send(self, events: Sequence[CloudEvent]) -> Attempt:
        endpoint = self.subscription.endpoint
        started = time.perf_counter()
        try:
            assert endpoint.host is not None and endpoint.port is not None
            await self.guard.check(endpoint.host, endpoint.port)
        except BlockedDestination as error:
            return Attempt(False, None, f"blocked: {error}", 0.0)
        batched = self.subscription.options.batch_size > 1
        message_id, headers, body = encode_request(events, batched=batched)
        headers.update(
            signature_headers(self.subscription.secret, message_id, int(time.time()), body)
        )
        try:
            status, text = await self._post(endpoint.url, headers, body)
        except TimeoutError:
            return Attempt(False, None, f"timeout after {self._timeout:g} s", _since(started))
        except aiohttp.ClientError as error:
            return Attempt(False, None, _describe(error), _since(started))
        latency = _since(started)
        if 200 <= status < 300:
            return Attempt(True, status, None, latency)
        return Attempt(False, status, f"HTTP {status}: {text}".strip(), latency)

    async def _post(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        """The status and the start of the body; a longer body than that closes the connection."""
        async with self._client().post(
            url, data=body, headers=headers, allow_redirects=False
        ) as response:
            read = await response.content.read(MAX_RESPONSE_READ)
            if 200 <= response.status < 300:
                return response.status, ""
            return response.status, read[:MAX_ERROR_TEXT].decode("utf-8", "replace")

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class NatsSender:
    """Publishes deliveries (structured JSON) on a NATS subject.

    When a JetStream stream captures the subject (looked up every
    `STREAM_LOOKUP_TTL_S`), the publish waits for the stream's ack and is
    deduplicated on `<subscription>:<event id>`; otherwise it is a plain
    publish, delivered once the server has it.
    """

    def __init__(self, subscription: Subscription, *, backbone: Backbone) -> None:
        assert subscription.endpoint.subject is not None
        self.subscription = subscription
        self.subject = subscription.endpoint.subject
        self.backbone = backbone
        self._stream: tuple[float, bool] | None = None

    async def _captured(self) -> bool:
        now = time.monotonic()
        if self._stream is None or self._stream[0] < now:
            try:
                await self.backbone.js.find_stream_name_by_subject(self.subject)
                captured = True
            except NotFoundError:
                captured = False
            self._stream = (now + STREAM_LOOKUP_TTL_S, captured)
        return self._stream[1]

    async def send(self, events: Sequence[CloudEvent]) -> Attempt:
        started = time.perf_counter()
        if len(events) == 1 and self.subscription.options.batch_size == 1:
            message_id = events[0].id
            body = msgspec.json.encode(to_structured(events[0]))
            content_type = STRUCTURED_CONTENT_TYPE
        else:
            message_id, _, body = encode_request(events, batched=True)
            content_type = BATCH_CONTENT_TYPE
        headers = {
            "content-type": content_type,
            **signature_headers(self.subscription.secret, message_id, int(time.time()), body),
        }
        timeout = self.subscription.options.timeout_s
        try:
            if await self._captured():
                dedup = {"Nats-Msg-Id": f"{self.subscription.id}:{message_id}"}
                await self.backbone.js.publish(
                    self.subject, body, headers={**headers, **dedup}, timeout=timeout
                )
            else:
                await self.backbone.nc.publish(self.subject, body, headers=headers)
                await self.backbone.nc.flush(timeout=max(1, math.ceil(timeout)))
        except Exception as error:
            return Attempt(False, None, _describe(error), _since(started))
        return Attempt(True, None, None, _since(started))

    async def aclose(self) -> None:
        return None


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:MAX_ERROR_TEXT]


# --------------------------------------------------------------------------- recorder


class DeliveryRecorder:
    """Writes outcomes of every worker in shared transactions (group commit).

    `record()` returns once the rows are committed. A flush starts at once when
    the previous one is older than `FLUSH_INTERVAL_S`, else when that interval
    is over: a lone delivery waits for one short commit, and under load the
    rows of every worker go together, one transaction per interval (on SQLite
    each transaction opens a connection). `urgent` rows (ordered subscriptions,
    whose next event waits for this ack) are flushed at once.
    A failed flush is retried; its callers keep waiting (nothing is acked).
    """

    def __init__(self, writer: DeliveryLogWriter) -> None:
        self.writer = writer
        self._pending: list[tuple[list[DeliveryRecord], list[DeadLetter], asyncio.Future[None]]]
        self._pending = []
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._last_flush = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-delivery-recorder")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._drain(), 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.writer.close()

    async def record(
        self, records: list[DeliveryRecord], letters: list[DeadLetter], *, urgent: bool = False
    ) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((records, letters, future))
        self._wake.set()
        if urgent:
            self._urgent.set()
        await asyncio.shield(future)

    async def _drain(self) -> None:
        while self._pending:
            await self._flush()

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            wait = self._last_flush + FLUSH_INTERVAL_S - time.monotonic()
            if wait > 0 and not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), wait)
            self._urgent.clear()
            self._last_flush = time.monotonic()
            try:
                await self._flush()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as error:
                failures += 1
                delay = min(5.0, 0.05 * 2**failures)
                log.warning("delivery_log_write_failed", error=repr(error), retry_in_s=delay)
                await asyncio.sleep(delay)

    async def _flush(self) -> None:
        batch: list[tuple[list[DeliveryRecord], list[DeadLetter], asyncio.Future[None]]] = []
        rows = 0
        while self._pending and rows < RECORDER_MAX_BATCH:
            item = self._pending.pop(0)
            batch.append(item)
            rows += len(item[0]) + len(item[1])
        try:
            await self.writer.write(
                [r for records, _, _ in batch for r in records],
                [letter for _, letters, _ in batch for letter in letters],
            )
        except BaseException:
            self._pending[:0] = batch
            raise
        for _, _, future in batch:
            if not future.done():
                future.set_result(None)


# --------------------------------------------------------------------------- worker


class ConsumerGone(Exception):
    """The consumer was deleted under the worker."""


@dataclass(eq=False, slots=True)
class Held:
    """A message handed to a worker, with its stream position read once."""

    message: Msg
    sequence: int
    tries: int
    since: float = 0.0
    sent: bool = False
    """Its outcome is known and waits to be recorded: it no longer takes send capacity."""


PolicySource = Callable[[], RetryPolicy]


class SubscriptionWorker:
    """Pulls one consumer and delivers what it gets to one subscription."""

    def __init__(
        self,
        subscription: Subscription,
        *,
        consumer: str,
        backbone: Backbone,
        recorder: DeliveryRecorder,
        sender: Sender,
        policy: PolicySource,
        clock: Clock,
        end_sequence: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.subscription = subscription
        self.consumer = consumer
        self.backbone = backbone
        self.recorder = recorder
        self.sender = sender
        self.policy = policy
        self.clock = clock
        self.end_sequence = end_sequence
        self.rng = rng or random.Random()
        self._capacity = subscription.options.capacity
        self._sending = asyncio.Semaphore(subscription.options.max_in_flight)
        self._in_hand = 0
        self._recording = 0
        self._freed = asyncio.Event()
        self._incoming: asyncio.Queue[Held] = asyncio.Queue()
        self._unsettled: set[Held] = set()
        self._units: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._inbox: Any = None
        self._requested = 0
        self._served = asyncio.Event()
        self._heard = 0.0
        self.gone = False

    @property
    def running(self) -> bool:
        return any(not task.done() for task in self._tasks)

    async def start(self) -> None:
        nc = self.backbone.nc
        self._inbox = await nc.subscribe(nc.new_inbox(), cb=self._on_message)
        name = f"deliver-{self.consumer}"
        self._tasks = [
            asyncio.create_task(self._pull_forever(), name=f"{name}-pull"),
            asyncio.create_task(self._dispatch_forever(), name=f"{name}-dispatch"),
            asyncio.create_task(self._keep_alive(), name=f"{name}-keep-alive"),
        ]

    async def stop(self, grace: float = 2.0) -> None:
        """Stop pulling, let deliveries in flight finish (up to `grace`), nak the rest."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._units:
            await asyncio.wait(set(self._units), timeout=grace)
        for unit in list(self._units):
            unit.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await unit
        for held in list(self._unsettled):
            with contextlib.suppress(Exception):
                await held.message.nak()
        self._unsettled.clear()
        if self._inbox is not None:
            with contextlib.suppress(Exception):
                await self._inbox.unsubscribe()
            self._inbox = None

    async def _keep_alive(self) -> None:
        """Tell JetStream every event in hand is still being worked on (+WPI).

        The ack wait stays short (`ACK_WAIT_S`), so after a crash the events a
        process held are handed out again within seconds, however long the
        subscription's timeout.
        """
        while True:
            await asyncio.sleep(KEEP_ALIVE_S)
            due = time.monotonic() - KEEP_ALIVE_S
            for held in list(self._unsettled):
                if held.since < due:
                    with contextlib.suppress(Exception):
                        await held.message.in_progress()

    # ------------------------------------------------------------------ pulling

    async def _pull_forever(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._pull()
            except asyncio.CancelledError:
                raise
            except ConsumerGone:
                log.warning("delivery_consumer_gone", consumer=self.consumer)
                return
            except Exception as error:
                log.warning("delivery_pull_failed", consumer=self.consumer, error=repr(error))
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)

    async def _pull(self) -> None:
        """One pull request at a time; the next one as soon as it is served or expires."""
        nc = self.backbone.nc
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{self.consumer}"
        while True:
            while self._capacity - self._in_hand <= 0 or self._recording >= RECORDING_LIMIT:
                self._freed.clear()
                await self._freed.wait()
            want = self._capacity - self._in_hand
            request = {
                "batch": want,
                "expires": int(PULL_EXPIRES_S * 1e9),
                "idle_heartbeat": int(PULL_HEARTBEAT_S * 1e9),
            }
            self._requested = want
            self._served.clear()
            self._heard = time.monotonic()
            await nc.publish(subject, json.dumps(request).encode(), reply=self._inbox.subject)
            while not self._served.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._served.wait(), PULL_HEARTBEAT_S)
                if time.monotonic() - self._heard > PULL_HEARTBEAT_S * 3:
                    break  # no heartbeat: the request was lost (a reconnect), ask again
            if self.gone:
                raise ConsumerGone(self.consumer)

    async def _on_message(self, message: Msg) -> None:
        """Messages and status notices of the pull requests (in arrival order)."""
        self._heard = time.monotonic()
        status = message.headers.get("Status") if message.headers else None
        if status is None:
            self._in_hand += 1
            metadata = message.metadata
            held = Held(message, metadata.sequence.stream, metadata.num_delivered, self._heard)
            self._unsettled.add(held)
            self._incoming.put_nowait(held)
            self._requested -= 1
            if self._requested <= 0:
                self._served.set()
            return
        if status == "100":
            return  # idle heartbeat
        description = message.headers.get("Description", "").lower() if message.headers else ""
        if (status == "409" and "deleted" in description) or (
            status == "404" and "consumer" in description
        ):
            self.gone = True
        self._served.set()  # 408 expired, 409 max waiting or leadership change: ask again

    # ------------------------------------------------------------------ dispatching

    async def _dispatch_forever(self) -> None:
        size = self.subscription.options.batch_size
        ordered = self.subscription.options.ordered
        while True:
            unit = [await self._incoming.get()]
            while len(unit) < size and not self._incoming.empty():
                unit.append(self._incoming.get_nowait())
            if len(unit) < size:
                await self._linger(unit, size)
            if ordered:
                await self._deliver_unit(unit)
            else:
                task = asyncio.create_task(self._deliver_unit(unit))
                self._units.add(task)
                task.add_done_callback(self._units.discard)

    async def _linger(self, unit: list[Held], size: int) -> None:
        deadline = time.monotonic() + BATCH_LINGER_S
        while len(unit) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                unit.append(await asyncio.wait_for(self._incoming.get(), left))
            except TimeoutError:
                return

    async def _deliver_unit(self, unit: list[Held]) -> None:
        try:
            await self._handle(unit)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.exception("delivery_failed_unexpectedly", consumer=self.consumer, error=repr(error))
        finally:
            for held in unit:
                if held in self._unsettled:
                    self._unsettled.discard(held)
                    with contextlib.suppress(Exception):
                        await held.message.nak(delay=1.0)
            recorded = sum(1 for held in unit if held.sent)
            self._recording -= recorded
            self._in_hand -= len(unit) - recorded
            self._freed.set()

    def _to_recording(self, unit: list[Held]) -> None:
        """The unit's outcome is known: pulling goes on while it is written.

        Group commit makes an outcome wait up to a flush interval for its
        transaction; counted against the send capacity, those waiting events
        would stall the pull at a few hundred events/s.
        """
        for held in unit:
            held.sent = True
        self._in_hand -= len(unit)
        self._recording += len(unit)
        self._freed.set()

    async def _handle(self, unit: list[Held]) -> None:
        now = self.clock.now()
        records: list[DeliveryRecord] = []
        letters: list[DeadLetter] = []
        settle: list[tuple[Held, float | None]] = []
        outcomes: list[tuple[Held, Outcome]] = []
        to_send: list[tuple[Held, CloudEvent]] = []
        for held in unit:
            if self.end_sequence is not None and held.sequence > self.end_sequence:
                settle.append((held, None))
                continue
            event = decode_stored(held.message.data)
            if isinstance(event, str):
                letters.append(self._letter(held, None, event, None, now))
                records.append(self._record(held, None, DEAD_LETTERED, Attempt(False), now))
                settle.append((held, None))
            elif self.subscription.matcher.matches(event):
                to_send.append((held, event))
            else:
                settle.append((held, None))
        if to_send:
            attempt = await self._send([event for _, event in to_send])
            policy = self.policy()
            for held, event in to_send:
                if attempt.ok:
                    status, delay = DELIVERED, None
                elif held.tries >= policy.max_attempts:
                    status, delay = DEAD_LETTERED, None
                    letters.append(self._letter(held, event, attempt.error, attempt, now))
                else:
                    status, delay = FAILED, delay_for(held.tries, policy, self.rng)
                records.append(self._record(held, event, status, attempt, now))
                settle.append((held, delay))
                outcome = _outcome(self.subscription.id, event, status, held.tries, attempt)
                outcomes.append((held, outcome))
        self._to_recording(unit)
        if records or letters:
            ordered = self.subscription.options.ordered
            await self.recorder.record(records, letters, urgent=ordered)
        for held, delay in settle:
            self._unsettled.discard(held)
            if delay is None:
                await held.message.ack()
            else:
                await held.message.nak(delay=max(delay, 0.001))
        for held, outcome in outcomes:
            await self._tell(held.message, outcome)

    async def _send(self, events: list[CloudEvent]) -> Attempt:
        try:
            async with self._sending:
                return await self.sender.send(events)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("delivery_send_crashed", consumer=self.consumer, error=repr(error))
            return Attempt(False, None, _describe(error), 0.0)

    def _record(
        self, held: Held, event: CloudEvent | None, status: str, attempt: Attempt, now: datetime
    ) -> DeliveryRecord:
        return DeliveryRecord(
            subscription_id=self.subscription.id,
            event_id=(event.id if event else _message_id(held))[:MAX_KEY],
            event_type=(event.type if event else "")[:MAX_KEY],
            sequence=held.sequence,
            attempt=held.tries,
            status=status,
            http_status=attempt.http_status,
            latency_ms=attempt.latency_ms if event else None,
            error=attempt.error if event else "the stored event is not a valid CloudEvent",
            created_at=now,
        )

    def _letter(
        self,
        held: Held,
        event: CloudEvent | None,
        error: str | None,
        attempt: Attempt | None,
        now: datetime,
    ) -> DeadLetter:
        return DeadLetter(
            id=new_id(),
            subscription_id=self.subscription.id,
            event_id=(event.id if event else _message_id(held))[:MAX_KEY],
            event_type=(event.type if event else "")[:MAX_KEY],
            sequence=held.sequence,
            payload=bytes(held.message.data),
            last_status=attempt.http_status if attempt else None,
            error=error or "failed",
            attempts=held.tries,
            status="dead",
            created_at=now,
        )

    async def _tell(self, message: Msg, outcome: Outcome) -> None:
        reply = message.headers.get(OUTCOME_HEADER) if message.headers else None
        if reply:
            with contextlib.suppress(Exception):
                await self.backbone.nc.publish(reply, msgspec.json.encode(outcome))


def _outcome(
    subscription_id: str, event: CloudEvent, status: str, tries: int, attempt: Attempt
) -> Outcome:
    return Outcome(
        subscription_id=subscription_id,
        event_id=event.id,
        status=status,
        attempt=tries,
        final=status != FAILED,
        http_status=attempt.http_status,
        error=attempt.error,
    )


def _message_id(held: Held) -> str:
    headers = held.message.headers or {}
    return str(headers.get("Nats-Msg-Id", f"seq-{held.sequence}"))


def decode_stored(payload: bytes) -> CloudEvent | str:
    """A dead letter's payload as an event, or why it cannot be read."""
    try:
        return parse_structured(msgspec.json.decode(payload))
    except msgspec.DecodeError as error:
        return f"the stored event is not JSON: {error}"
    except ValidationFailed as error:
        return error.detail[:MAX_ERROR_TEXT]
