"""The connection to NATS JetStream that every context uses.

Streams and KV buckets are created idempotently: a context declares what it
needs and `ensure_stream` creates it or updates it to the declared config.
In a cluster these requests go through the meta leader and, for three
replicas, wait for the new stream's own election: on a busy machine, or while
a node restarts, they can time out. They are retried for up to a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck, StorageType, StreamConfig
from nats.js.errors import NotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from fleetmesh.core.acks import MSG_ID_HEADER, AckedPublisher, OrderedPublish
from fleetmesh.core.logging import get_logger

log = get_logger(__name__)

EVENTS_STREAM = "EVENTS"
SETTLE_TIMEOUT_S = 60.0
_NOT_SETTLED = (nats.errors.TimeoutError, nats.errors.NoRespondersError, ServiceUnavailableError)


def _while_settling(what: str) -> AsyncRetrying:
    """Retries of a JetStream API request that timed out or found JetStream unavailable."""

    def note(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("jetstream_request_retried", what=what, error=repr(error))

    return AsyncRetrying(
        retry=retry_if_exception_type(_NOT_SETTLED),
        stop=stop_after_delay(SETTLE_TIMEOUT_S),
        wait=wait_exponential(multiplier=0.2, max=2.0),
        before_sleep=note,
        reraise=True,
    )


@dataclass(frozen=True, slots=True)
class NatsEndpoint:
    """Where and as whom to connect."""

    servers: list[str]
    user: str | None = None
    password: str | None = None
    replicas: int = 1


class Backbone:
    """One NATS connection with its JetStream context, shared by the contexts of a process."""

    def __init__(self, endpoint: NatsEndpoint, *, name: str = "fleetmesh") -> None:
        self.endpoint = endpoint
        self.name = name
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._acked: AckedPublisher | None = None

    async def connect(self) -> None:
        self._nc = await nats.connect(
            servers=self.endpoint.servers,
            user=self.endpoint.user,
            password=self.endpoint.password,
            name=self.name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        self._js = self._nc.jetstream(timeout=10)
        self._acked = AckedPublisher(self._nc)

    async def wait_for_jetstream(self, timeout: float = 30.0) -> None:
        """Wait until JetStream answers (a cluster elects its meta leader first)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await self.js.account_info()
                return
            except Exception:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.2)

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        self._acked = None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.drain()

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise RuntimeError("backbone not connected")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("backbone not connected")
        return self._js

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def ensure_stream(self, config: StreamConfig) -> None:
        """Create the stream, or bring an existing one to this config."""
        if config.storage is None:
            config.storage = StorageType.FILE
        if config.num_replicas is None:
            config.num_replicas = self.endpoint.replicas
        await _while_settling(f"stream {config.name}")(self._ensure_stream_once, config)

    async def _ensure_stream_once(self, config: StreamConfig) -> None:
        try:
            await self.js.stream_info(str(config.name))
        except NotFoundError:
            await self.js.add_stream(config)
            log.info("stream_created", stream=config.name)
            return
        await self.js.update_stream(config)

    async def ensure_kv(self, bucket: str, **options: Any) -> KeyValue:
        """Open a KV bucket, creating it on first use."""
        kv: KeyValue = await _while_settling(f"bucket {bucket}")(
            self._ensure_kv_once, bucket, **options
        )
        return kv

    async def _ensure_kv_once(self, bucket: str, **options: Any) -> KeyValue:
        try:
            return await self.js.key_value(bucket)
        except (NotFoundError, nats.js.errors.BucketNotFoundError):
            return await self.js.create_key_value(
                bucket=bucket, replicas=self.endpoint.replicas, **options
            )

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> PubAck:
        """Publish durably: returns once JetStream stored it; duplicates by `msg_id` are dropped."""
        all_headers = {MSG_ID_HEADER: msg_id, **(headers or {})}
        return await self.js.publish(subject, payload, headers=all_headers, timeout=timeout)

    async def publish_in_order(
        self, messages: Sequence[OrderedPublish], *, timeout: float = 10.0, atomic: bool = False
    ) -> list[BaseException | None]:
        """Publish durably in this order without waiting for each PubAck in turn; with
        `atomic` (a stream with `allow_atomic`), in atomic batches (see `core.acks`).

        Per message: None once JetStream stored it, else why not (a PubAck that did not come
        within `timeout` counts as a failure; the message may still have been stored, which
        its `msg_id` makes harmless to publish again).
        """
        if self._acked is None:
            raise RuntimeError("backbone not connected")
        return await self._acked.publish(messages, timeout=timeout, atomic=atomic)

    async def ping(self) -> bool:
        try:
            await self.nc.flush(timeout=2)
            return True
        except Exception:
            return False

    async def _on_error(self, error: Exception) -> None:
        log.warning("nats_error", error=str(error))

    async def _on_disconnected(self) -> None:
        log.warning("nats_disconnected")

    async def _on_reconnected(self) -> None:
        log.info("nats_reconnected")
