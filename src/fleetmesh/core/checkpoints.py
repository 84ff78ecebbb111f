"""SQLite WAL checkpoints from a thread of their own, off the writers' commits.

A commit that finds the WAL past `wal_autocheckpoint` pages copies it into the
database file itself, inside the commit. With thousands of rows a transaction
(a fleet's timeouts, a burst of telemetry) that copy took two thirds of a
commit's time: 13 of 20 ms for 2,000 status transitions on a 100,000-device
store. The platform's connections leave it to `WalCheckpointer`, which runs a
passive checkpoint (it waits for no reader or writer) every half second; their
own threshold stays, raised, as a safety net should this task stall.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from fleetmesh.core.logging import get_logger
from fleetmesh.core.tasks import stop_task

log = get_logger(__name__)

INTERVAL_S = 0.5
SAFETY_NET_PAGES = 50_000
"""`wal_autocheckpoint` of the platform's connections: 200 MB of WAL at 4 KiB a page."""


class WalCheckpointer:
    """Checkpoints one SQLite database's WAL every `interval_s` until stopped."""

    def __init__(self, path: Path, *, interval_s: float = INTERVAL_S) -> None:
        self.path = path
        self.interval_s = interval_s
        self._connection: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self.checkpoints = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sqlite-checkpoints")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self.checkpoint)
            except sqlite3.Error as error:  # busy with another checkpoint, a file gone
                log.debug("sqlite_checkpoint_failed", error=repr(error))

    def checkpoint(self) -> tuple[int, int, int]:
        """One passive checkpoint: (busy, WAL frames, frames copied into the database)."""
        if self._connection is None:
            self._connection = sqlite3.connect(self.path, timeout=5, check_same_thread=False)
        busy, frames, copied = self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.checkpoints += 1
        return int(busy), int(frames), int(copied)
