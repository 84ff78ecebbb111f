"""`fleetmesh config ...` and `fleetmesh services` against the platform served on a real port."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
from typer.testing import CliRunner, Result

from fleetmesh.bootstrap import Platform
from fleetmesh.cli.governance import config_app, services_app
from support import admin_key

pytestmark = pytest.mark.integration

# The in-process server may log while CliRunner holds sys.stdout: leave its lines out.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")


def stdout_of(result: Result) -> str:
    return "".join(
        line for line in result.stdout.splitlines(keepends=True) if not LOG_LINE.match(line)
    )


async def test_config_commands(sqlite_platform: Platform, live_url: str) -> None:
    runner = CliRunner()
    common = ["--api", live_url, "--key", admin_key(sqlite_platform)]

    async def cli(*args: str) -> str:
        result = await asyncio.to_thread(runner.invoke, config_app, [*args, *common])
        assert result.exit_code == 0, result.output
        return stdout_of(result)

    assert "version 1" in await cli("set", "billing", "retry", '{"max_attempts": 3}', "-m", "first")
    assert "version 1" in await cli("set", "billing", "currency", "EUR")
    assert json.loads(await cli("get", "billing", "currency")) == "EUR"
    await cli("set", "billing", "retry", '{"max_attempts": 5}')
    assert json.loads(await cli("get", "billing", "retry")) == {"max_attempts": 5}
    history = json.loads(await cli("history", "billing", "retry", "--json"))
    assert [(v["version"], v["value"], v["comment"]) for v in history] == [
        (2, {"max_attempts": 5}, ""),
        (1, {"max_attempts": 3}, "first"),
    ]
    assert "rollback" not in await cli("history", "billing", "retry")  # the table form
    assert "version 3 (rollback to v1)" in await cli("rollback", "billing", "retry", "1")

    refused = await asyncio.to_thread(
        runner.invoke, config_app, ["set", "billing", "retry", "4", "--if-match", "1", *common]
    )
    assert refused.exit_code == 1
    assert "412" in refused.output

    watching = asyncio.create_task(
        asyncio.to_thread(
            runner.invoke, config_app, ["watch", "billing", "retry", "--count", "2", *common]
        )
    )
    await asyncio.sleep(0.5)
    headers = {"Authorization": f"Bearer {admin_key(sqlite_platform)}"}
    async with httpx.AsyncClient(base_url=live_url, headers=headers) as http:
        await http.put("/api/v1/config/billing/retry", json={"value": {"max_attempts": 9}})
    watched = await asyncio.wait_for(watching, 10)
    assert watched.exit_code == 0, watched.output
    lines = [json.loads(line) for line in stdout_of(watched).splitlines()]
    assert [line["version"] for line in lines] == [3, 4]
    assert lines[-1]["value"] == {"max_attempts": 9}


async def test_services_lists_instances_with_their_health(
    sqlite_platform: Platform, live_url: str
) -> None:
    headers = {"Authorization": f"Bearer {admin_key(sqlite_platform)}"}
    async with httpx.AsyncClient(base_url=live_url, headers=headers) as http:
        registered = await http.post(
            "/api/v1/services/ingest/instances",
            json={
                "instance_id": "in-1",
                "address": "127.0.0.1",
                "port": 7600,
                "check": {"kind": "ttl"},
            },
        )
        assert registered.status_code == 201
    runner = CliRunner()
    common = ["--api", live_url, "--key", admin_key(sqlite_platform)]
    listed = await asyncio.to_thread(runner.invoke, services_app, common)
    assert listed.exit_code == 0, listed.output
    assert "in-1" in listed.output and "passing" in listed.output
    as_json = await asyncio.to_thread(runner.invoke, services_app, ["list", "--json", *common])
    assert json.loads(stdout_of(as_json))[0]["instance_id"] == "in-1"
    removed = await asyncio.to_thread(
        runner.invoke, services_app, ["deregister", "ingest", "in-1", *common]
    )
    assert removed.exit_code == 0, removed.output
