"""Event contracts over HTTP: versions, compatibility (409), the AsyncAPI document."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft7Validator

pytestmark = pytest.mark.integration

ASYNCAPI_SCHEMA = Path(__file__).parents[2] / "unit" / "events" / "asyncapi-3.0.0.schema.json"
DOOR = "com.acme.door.opened"
V1 = {
    "type": "object",
    "required": ["door"],
    "properties": {"door": {"type": "string"}, "floor": {"type": "integer"}},
}
V2_WIDER = {
    "type": "object",
    "required": ["door"],
    "properties": {"door": {"type": "string"}, "floor": {"type": "number"}},
}
V3_STRICTER = {**V2_WIDER, "required": ["door", "floor"]}


@cache
def asyncapi_validator() -> Draft7Validator:
    return Draft7Validator(json.loads(ASYNCAPI_SCHEMA.read_text()))


async def post(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/api/v1/event-contracts", json=body)


async def test_versions_are_registered_only_when_compatible(client: httpx.AsyncClient) -> None:
    first = await post(client, type=DOOR, schema=V1, description="A door opened")
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1 and first.json()["compatibility"] == "BACKWARD"
    assert first.headers["location"] == f"/api/v1/event-contracts/{DOOR}/versions/1"
    same = await post(client, type=DOOR, schema=V1)
    assert same.status_code == 200 and same.json()["version"] == 1

    wider = await post(client, type=DOOR, schema=V2_WIDER)
    assert wider.status_code == 201 and wider.json()["version"] == 2

    stricter = await post(client, type=DOOR, schema=V3_STRICTER)
    assert stricter.status_code == 409
    assert stricter.headers["content-type"] == "application/problem+json"
    problem = stricter.json()
    assert problem["compatibility"] == "BACKWARD"
    assert problem["incompatibilities"][0]["path"] == "/properties/floor"
    assert problem["incompatibilities"][0]["version"] == 2
    assert problem["incompatibilities"][0]["message"] == "property became required"

    anyway = await post(client, type=DOOR, schema=V3_STRICTER, compatibility="NONE")
    assert anyway.status_code == 201 and anyway.json()["version"] == 3
    stale = await post(client, type=DOOR, schema=V1, version=2)
    assert stale.status_code == 409

    listed = (await client.get("/api/v1/event-contracts", params={"type": DOOR})).json()
    assert [c["version"] for c in listed["items"]] == [1, 2, 3]
    latest = await client.get(f"/api/v1/event-contracts/{DOOR}/versions/latest")
    assert latest.json()["version"] == 3 and latest.json()["schema"] == V3_STRICTER
    second = await client.get(f"/api/v1/event-contracts/{DOOR}/versions/2")
    assert second.json()["schema"]["properties"]["floor"] == {"type": "number"}
    missing = await client.get(f"/api/v1/event-contracts/{DOOR}/versions/9")
    assert missing.status_code == 404


BAD_CONTRACTS: list[tuple[dict[str, Any], str]] = [
    ({"type": "fleetmesh.devices.hacked.v1", "schema": True}, "type"),
    ({"type": "device.registered.v1", "schema": True}, "type"),
    ({"type": "com.acme.x", "schema": {"type": "temperature"}}, "schema/type"),
    ({"type": "com.acme.x", "schema": {"$ref": "https://example.com/s.json"}}, "schema/$ref"),
    ({"type": "com.acme.x", "schema": True, "compatibility": "SOMETIMES"}, "compatibility"),
    ({"type": "", "schema": True}, "type"),
]


async def test_bad_contracts_are_422(sqlite_client: httpx.AsyncClient) -> None:
    for body, field in BAD_CONTRACTS:
        response = await post(sqlite_client, **body)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert field in [error["field"] for error in response.json()["errors"]], body


async def test_the_asyncapi_document_describes_every_contract(
    sqlite_client: httpx.AsyncClient,
) -> None:
    await post(sqlite_client, type=DOOR, schema=V1)
    response = await sqlite_client.get("/asyncapi.json", headers={"authorization": ""})
    assert response.status_code == 200
    document = response.json()
    errors = [error.message for error in asyncapi_validator().iter_errors(document)]
    assert errors == []
    assert document["asyncapi"] == "3.0.0"
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert "events.com.acme.door.opened" in addresses
    assert "events.device.registered.v1" in addresses
    assert document["servers"]["nats"]["host"].startswith("127.0.0.1:")
