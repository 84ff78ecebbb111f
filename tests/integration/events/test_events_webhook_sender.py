"""The webhook sender against raw HTTP/1.1 endpoints on loopback: what each answer becomes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from fleetmesh.events.cloudevents import parse_structured
from fleetmesh.events.delivery import (
    MAX_ERROR_TEXT,
    MAX_RESPONSE_READ,
    WebhookSender,
    new_ssl_context,
)
from fleetmesh.events.guard import HostGuard
from fleetmesh.events.subscription import DeliveryOptions, Endpoint, Subscription

pytestmark = pytest.mark.integration

Answer = Callable[[int], bytes]
"""Request number from 0 -> the raw HTTP response to write."""


def answer(status: int, body: bytes = b"", *extra: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class RawEndpoint:
    """A loopback HTTP server counting its connections and requests."""

    reply: Answer
    delay: float = 0.0
    connections: int = 0
    paths: list[str] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next(
                    int(line.split(":", 1)[1])
                    for line in lines
                    if line.lower().startswith("content-length:")
                )
                await reader.readexactly(length)
                number = len(self.paths)
                self.paths.append(lines[0].split(" ")[1])
                await asyncio.sleep(self.delay)
                writer.write(self.reply(number))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@pytest.fixture
async def endpoints() -> AsyncIterator[Callable[..., Awaitable[RawEndpoint]]]:
    started: list[asyncio.Server] = []

    async def start(reply: Answer, delay: float = 0.0) -> RawEndpoint:
        endpoint = RawEndpoint(reply, delay)
        endpoint.server = await asyncio.start_server(endpoint.serve, "127.0.0.1", 0)
        endpoint.port = endpoint.server.sockets[0].getsockname()[1]
        started.append(endpoint.server)
        return endpoint

    yield start
    for server in started:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


@pytest.fixture
async def senders() -> AsyncIterator[Callable[..., WebhookSender]]:
    made: list[WebhookSender] = []

    def make(url: str, *, allow_private: bool = True, **options: object) -> WebhookSender:
        subscription = Subscription(
            id="01SENDERTEST0000000000000",
            endpoint=Endpoint.parse(url),
            secret="whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=",
            options=DeliveryOptions(**options),  # type: ignore[arg-type]
        )
        sender = WebhookSender(
            subscription,
            guard=HostGuard(allow_private=allow_private),
            ssl_context=new_ssl_context(),
        )
        made.append(sender)
        return sender

    yield make
    for sender in made:
        await sender.aclose()


def event(number: int = 1) -> list[object]:
    return [
        parse_structured(
            {
                "specversion": "1.0",
                "id": f"evt-{number}",
                "source": "/tests",
                "type": "com.acme.sender.tested",
                "data": {"n": number},
            }
        )
    ]


async def test_deliveries_reuse_one_keep_alive_connection(
    endpoints: Callable[..., Awaitable[RawEndpoint]], senders: Callable[..., WebhookSender]
) -> None:
    endpoint = await endpoints(lambda _n: answer(204))
    sender = senders(endpoint.url)

    attempts = [await sender.send(event(n)) for n in range(5)]

    assert [a.ok for a in attempts] == [True] * 5
    assert [a.http_status for a in attempts] == [204] * 5
    assert endpoint.connections == 1


async def test_redirects_are_failed_attempts_and_not_followed(
    endpoints: Callable[..., Awaitable[RawEndpoint]], senders: Callable[..., WebhookSender]
) -> None:
    endpoint = await endpoints(lambda _n: answer(302, b"", "location: /elsewhere"))
    sender = senders(endpoint.url)

    attempt = await sender.send(event())

    assert not attempt.ok
    assert attempt.http_status == 302
    assert attempt.error is not None and attempt.error.startswith("HTTP 302")
    assert endpoint.paths == ["/hook"]


async def test_an_error_answer_is_kept_short_and_a_long_success_does_not_stall(
    endpoints: Callable[..., Awaitable[RawEndpoint]], senders: Callable[..., WebhookSender]
) -> None:
    long_body = b"x" * (MAX_RESPONSE_READ * 4)
    replies = [answer(500, b"boom " + long_body), answer(200, long_body), answer(204)]
    endpoint = await endpoints(lambda n: replies[n])
    sender = senders(endpoint.url)

    failed, long_success, next_one = [await sender.send(event(n)) for n in range(3)]

    assert not failed.ok and failed.http_status == 500
    assert failed.error is not None and failed.error.startswith("HTTP 500: boom")
    assert len(failed.error) <= len("HTTP 500: ") + MAX_ERROR_TEXT
    assert long_success.ok and next_one.ok
    assert len(endpoint.paths) == 3


async def test_a_slow_endpoint_times_out(
    endpoints: Callable[..., Awaitable[RawEndpoint]], senders: Callable[..., WebhookSender]
) -> None:
    endpoint = await endpoints(lambda _n: answer(204), delay=2.0)
    sender = senders(endpoint.url, timeout_s=0.2)

    attempt = await sender.send(event())

    assert not attempt.ok
    assert attempt.http_status is None
    assert attempt.error == "timeout after 0.2 s"


async def test_unreachable_and_refused_hosts_are_failed_attempts(
    endpoints: Callable[..., Awaitable[RawEndpoint]], senders: Callable[..., WebhookSender]
) -> None:
    endpoint = await endpoints(lambda _n: answer(204))
    assert endpoint.server is not None
    endpoint.server.close()
    await endpoint.server.wait_closed()

    refused = await senders(endpoint.url).send(event())
    blocked = await senders(endpoint.url, allow_private=False).send(event())

    assert not refused.ok and refused.error is not None
    assert refused.error.startswith("ClientConnectorError")
    assert not blocked.ok and blocked.error is not None
    assert blocked.error.startswith("blocked: ")
