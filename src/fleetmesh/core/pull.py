"""Batches from a durable JetStream pull consumer, read through one inbox subscription.

nats-py's `PullSubscription.fetch` waits for every message of a batch with a task of its
own (about 30 µs a message): more than fleetmesh spends validating a one-point MQTT
message. `BatchPull` sends the same pull requests (`$JS.API.CONSUMER.MSG.NEXT`) to the
same kind of durable consumer, but the messages land in a buffer from the inbox
subscription's callback (about 6 µs a message). They are ordinary JetStream messages:
`ack`, `nak` and `metadata` work as on those `fetch` returns.

Requests and answers:

* `fetch(n, timeout)` hands out what is buffered. With nothing buffered it asks for `n`
  messages without waiting (`no_wait`: the answer is what is pending, ended by a 404
  status); if none was pending, it asks again with an expiry just before `timeout` and
  returns as soon as the first messages came, or raises `TimeoutError`.
* That second request stays open on the server until it got `n` messages or expired:
  what arrives after its fetch returned stays in the buffer for the next fetch.
  `unsubscribe` waits until that request expired and naks what is buffered, so
  nothing is left to wait out its ack wait.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError

STATUS_HEADER = "Status"
EXPIRY_MARGIN_S = 0.01
PENDING_LIMIT = 1_000_000
MAX_CLOSE_WAIT_S = 5.0


class BatchPull:
    """A durable pull consumer's messages in batches; `subscribe`, then `fetch`."""

    def __init__(self, nc: Client, stream: str, durable: str) -> None:
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._buffer: deque[Msg] = deque()
        self._ended = 0
        """Requests answered by a status (no more messages, expired) not yet seen."""
        self._arrived = asyncio.Event()
        self._subscription: Subscription | None = None
        self._open_until = 0.0
        """When the last waiting request expires (event loop time)."""

    @classmethod
    async def subscribe(
        cls, nc: Client, js: JetStreamContext, stream: str, config: ConsumerConfig
    ) -> BatchPull:
        """Create the durable consumer unless it exists (as it is), then listen."""
        durable = str(config.durable_name)
        try:
            await js.consumer_info(stream, durable)
        except NotFoundError:
            await js.add_consumer(stream, config)
        pull = cls(nc, stream, durable)
        pull._subscription = await nc.subscribe(
            pull._inbox, cb=pull._on_message, pending_msgs_limit=PENDING_LIMIT
        )
        return pull

    @property
    def pending_msgs(self) -> int:
        return len(self._buffer)

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to `batch` messages: what is pending, else the first to come within `timeout`
        (raises `TimeoutError` if none came)."""
        if not self._buffer:
            deadline = asyncio.get_running_loop().time() + timeout
            await self._request({"batch": batch, "no_wait": True})
            await self._receive(batch, deadline, until_any=False)
            remaining = deadline - asyncio.get_running_loop().time()
            if not self._buffer and remaining > EXPIRY_MARGIN_S:
                expires_s = remaining - EXPIRY_MARGIN_S
                self._open_until = asyncio.get_running_loop().time() + expires_s
                await self._request({"batch": batch, "expires": int(expires_s * 1e9)})
                await self._receive(batch, deadline, until_any=True)
        taken = [self._buffer.popleft() for _ in range(min(batch, len(self._buffer)))]
        if not taken:
            raise TimeoutError
        return taken

    async def unsubscribe(self) -> None:
        """Wait for the open request to expire, nak what is buffered, stop listening."""
        subscription, self._subscription = self._subscription, None
        if subscription is None:
            return
        open_s = self._open_until - asyncio.get_running_loop().time()
        if open_s > 0:
            await asyncio.sleep(min(open_s, MAX_CLOSE_WAIT_S))
        while self._buffer:
            await self._buffer.popleft().nak()
        await subscription.unsubscribe()

    async def _request(self, request: dict[str, Any]) -> None:
        self._ended = 0
        await self._nc.publish(self._next_subject, json.dumps(request).encode(), self._inbox)

    async def _receive(self, batch: int, deadline: float, *, until_any: bool) -> None:
        """Until `batch` messages are buffered (or any, `until_any`), the request ended, or
        the deadline passed."""
        loop = asyncio.get_running_loop()
        while len(self._buffer) < batch and not self._ended:
            if until_any and self._buffer:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    async def _on_message(self, message: Msg) -> None:
        headers = message.headers
        if headers and STATUS_HEADER in headers and not message.data:
            self._ended += 1  # 404 no messages, 408 expired, 409 ...: this request is over
        else:
            self._buffer.append(message)
        self._arrived.set()
