"""The simulator's HTTP sender: a resent batch is the same request, so it is stored once."""

from __future__ import annotations

import json

import httpx
import pytest
from ulid import ULID

from fleetmesh.telemetry.simulator import Counters, HttpSender

pytestmark = pytest.mark.unit

ITEMS = [{"ts": 1_700_000_000_000, "values": {"temperature": 21.5, "humidity": 40.0}}]


def sender_with(answers: list[httpx.Response], seen: list[httpx.Request]) -> HttpSender:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    http = httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://x")
    return HttpSender(http, Counters(), give_up_s=5.0)


async def test_a_resent_batch_carries_the_same_bytes_and_idempotency_key() -> None:
    seen: list[httpx.Request] = []
    busy = httpx.Response(503, headers={"Retry-After": "0.05"})
    accepted = httpx.Response(202, json={"accepted": 2, "rejected": 0})
    sender = sender_with([busy, accepted], seen)

    await sender.send("d-1", "secret", ITEMS)

    first, second = seen
    key = first.headers["Idempotency-Key"]
    assert ULID.from_str(key)  # the server derives the batch id from it
    assert second.headers["Idempotency-Key"] == key
    assert first.content == second.content
    assert json.loads(first.content) == ITEMS
    assert (sender.counters.accepted, sender.counters.retries) == (2, 1)


async def test_every_batch_gets_a_key_of_its_own() -> None:
    seen: list[httpx.Request] = []
    answers = [httpx.Response(202, json={"accepted": 2, "rejected": 0}) for _ in range(2)]
    sender = sender_with(answers, seen)

    await sender.send("d-1", "secret", ITEMS)
    await sender.send("d-1", "secret", ITEMS)

    assert seen[0].headers["Idempotency-Key"] != seen[1].headers["Idempotency-Key"]
