"""The simulator's HTTP sender: a resent batch is the same request, so it is stored once."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from ulid import ULID

from fleetmesh.telemetry.simulator import Counters, HttpSender, sender_session

pytestmark = pytest.mark.unit

ITEMS = [{"ts": 1_700_000_000_000, "values": {"temperature": 21.5, "humidity": 40.0}}]
ACCEPTED = (202, {"accepted": 2, "rejected": 0}, {})


@dataclass
class Seen:
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeIngest:
    """Answers each post with the next of `answers` (status, JSON body, headers)."""

    answers: list[tuple[int, dict[str, object], dict[str, str]]]
    seen: list[Seen] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(dict(request.headers), await request.read()))
        status, body, headers = self.answers.pop(0)
        return web.json_response(body, status=status, headers=headers)


MakeSender = Callable[[FakeIngest], Awaitable[HttpSender]]


@pytest.fixture
async def sender_for() -> AsyncIterator[MakeSender]:
    servers: list[TestServer] = []
    session = sender_session()

    async def make(ingest: FakeIngest) -> HttpSender:
        app = web.Application()
        app.router.add_post("/api/v1/devices/{device_id}/telemetry", ingest.handle)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return HttpSender(session, str(server.make_url("/")), Counters(), give_up_s=5.0)

    yield make
    await session.close()
    for server in servers:
        await server.close()


async def test_a_resent_batch_carries_the_same_bytes_and_idempotency_key(
    sender_for: MakeSender,
) -> None:
    ingest = FakeIngest([(503, {}, {"Retry-After": "0.05"}), ACCEPTED])
    sender = await sender_for(ingest)

    await sender.send("d-1", "secret", ITEMS)

    first, second = ingest.seen
    key = first.headers["Idempotency-Key"]
    assert ULID.from_str(key)  # the server derives the batch id from it
    assert second.headers["Idempotency-Key"] == key
    assert first.body == second.body
    assert json.loads(first.body) == ITEMS
    assert first.headers["Authorization"].startswith("Basic ")
    assert (sender.counters.accepted, sender.counters.retries) == (2, 1)


async def test_every_batch_gets_a_key_of_its_own(sender_for: MakeSender) -> None:
    ingest = FakeIngest([ACCEPTED, ACCEPTED])
    sender = await sender_for(ingest)

    await sender.send("d-1", "secret", ITEMS)
    await sender.send("d-1", "secret", ITEMS)

    assert ingest.seen[0].headers["Idempotency-Key"] != ingest.seen[1].headers["Idempotency-Key"]


async def test_an_unknown_device_is_waited_for_and_a_refused_batch_counted(
    sender_for: MakeSender,
) -> None:
    not_yet = (404, {"type": "https://fleetmesh.dev/problems/device-not-found"}, {})
    refused = (400, {"type": "https://fleetmesh.dev/problems/malformed-batch"}, {})
    ingest = FakeIngest([not_yet, ACCEPTED, refused])
    sender = await sender_for(ingest)

    await sender.send("d-1", "secret", ITEMS)
    await sender.send("d-1", "secret", ITEMS)

    counters = sender.counters
    assert (counters.accepted, counters.retries, counters.messages) == (2, 1, 2)
    assert (counters.rejected, counters.refused_messages) == (2, 1)


async def test_a_batch_already_encoded_is_sent_as_it_is(sender_for: MakeSender) -> None:
    ingest = FakeIngest([(207, {"accepted": 1, "rejected": 1}, {})])
    sender = await sender_for(ingest)

    await sender.send_encoded("d-1", "secret", b'[{"metric": "t", "value": 1}, 2]', 2)

    assert ingest.seen[0].body == b'[{"metric": "t", "value": 1}, 2]'
    assert (sender.counters.accepted, sender.counters.rejected) == (1, 1)
