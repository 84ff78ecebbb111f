"""Background task helpers that survive Python 3.11's `asyncio.wait_for` races.

On 3.11, `asyncio.wait_for` can swallow a cancellation when the awaited thing
completes at the same moment (fixed in 3.12); a loop around such a call (ours,
or a library's, e.g. a NATS fetch) then keeps running, and `task.cancel();
await task` waits forever. `stop_task` cancels again until the task is done;
`wait_event` waits with `asyncio.timeout`, which does not swallow cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

CANCEL_RETRY_S = 0.5


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel the task and wait until it is really finished."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_RETRY_S)
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.result()


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until the event is set or `seconds` passed; True if it was set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, seconds)):
            await event.wait()
    return event.is_set()
