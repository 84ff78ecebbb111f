"""The HTTP server of `fleetmesh up` and `service run` freezes the heap its start built."""

from __future__ import annotations

import asyncio
import gc

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from fleetmesh.cli.up import QuietExitServer

pytestmark = pytest.mark.integration


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})


async def test_the_started_heap_is_left_out_of_garbage_collection() -> None:
    gc.unfreeze()
    server = QuietExitServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done(), "the server stopped while starting"
            await asyncio.sleep(0.01)
        assert gc.get_freeze_count() > 0
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        gc.unfreeze()
