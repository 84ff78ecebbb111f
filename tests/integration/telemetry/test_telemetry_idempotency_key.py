"""`Idempotency-Key` on telemetry POSTs: a batch sent again after a lost answer is stored once."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from ulid import ULID

from support import known_to_telemetry

pytestmark = pytest.mark.integration

METER = {"name": "key-meter", "telemetry_schema": {"temp": {"type": "number"}}}


async def _device(client: httpx.AsyncClient, device_id: str) -> tuple[str, str]:
    if (await client.get(f"/api/v1/device-types/{METER['name']}")).status_code == 404:
        assert (await client.post("/api/v1/device-types", json=METER)).status_code == 201
    created = await client.post("/api/v1/devices", json={"type": METER["name"], "id": device_id})
    assert created.status_code == 201, created.text
    await known_to_telemetry(client, device_id)
    return device_id, created.json()["credentials"]["secret"]


def _batch(first_ts: int, count: int = 3) -> bytes:
    return json.dumps(
        [{"metric": "temp", "value": i, "ts": first_ts + i} for i in range(count)]
    ).encode()


async def _send(
    client: httpx.AsyncClient, device: tuple[str, str], body: bytes, key: str
) -> httpx.Response:
    return await client.post(
        f"/api/v1/devices/{device[0]}/telemetry",
        content=body,
        params={"wait": "stored"},
        headers={"Idempotency-Key": key},
        auth=device,
    )


async def _stored(client: httpx.AsyncClient, device_id: str) -> list[int]:
    answer = await client.get(
        f"/api/v1/devices/{device_id}/telemetry", params={"metric": "temp", "from": "0"}
    )
    assert answer.status_code == 200, answer.text
    return [item["value"] for item in answer.json()["items"]]


async def test_the_same_batch_sent_again_with_its_key_is_stored_once(
    client: httpx.AsyncClient,
) -> None:
    device = await _device(client, "key-1")
    body, key = _batch(time.time_ns() // 1_000_000 - 10_000), str(ULID())

    first = await _send(client, device, body, key)
    again = await _send(client, device, body, key)

    assert first.status_code == again.status_code == 202, again.text
    assert first.json()["message_id"] == again.json()["message_id"]
    assert [i["id"] for i in first.json()["items"]] == [i["id"] for i in again.json()["items"]]
    assert again.json()["stored"] is True
    assert sorted(await _stored(client, "key-1")) == [0, 1, 2]


async def test_another_key_or_other_bytes_make_another_batch(client: httpx.AsyncClient) -> None:
    device = await _device(client, "key-2")
    at = time.time_ns() // 1_000_000 - 10_000
    key = str(ULID())

    first = await _send(client, device, _batch(at), key)
    other_key = await _send(client, device, _batch(at), str(ULID()))
    other_bytes = await _send(client, device, _batch(at + 100, count=2), key)

    ids = {answer.json()["message_id"] for answer in (first, other_key, other_bytes)}
    assert len(ids) == 3
    assert len(await _stored(client, "key-2")) == 3 + 3 + 2


async def test_the_same_key_of_another_device_is_another_batch(client: httpx.AsyncClient) -> None:
    one, two = await _device(client, "key-3"), await _device(client, "key-4")
    body, key = _batch(time.time_ns() // 1_000_000 - 10_000), str(ULID())

    first = await _send(client, one, body, key)
    second = await _send(client, two, body, key)

    assert (first.status_code, second.status_code) == (202, 202), (first.text, second.text)
    assert first.json()["message_id"] != second.json()["message_id"]
    assert len(await _stored(client, "key-4")) == 3


async def test_a_key_that_is_not_a_ulid_is_refused(client: httpx.AsyncClient) -> None:
    device = await _device(client, "key-5")

    answer = await _send(client, device, _batch(time.time_ns() // 1_000_000), "not-a-ulid")

    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"][0]["field"] == "Idempotency-Key"
    assert await _stored(client, "key-5") == []
