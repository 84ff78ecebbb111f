"""Retention: a background job deleting expired raw points in bounded batches.

How long raw points live: the device type's ``retention_days`` (``PUT
/api/v1/device-types/{name}/retention``), else the live global default
``telemetry.retention_days`` (30). A type with ``rollup_days`` has its expiring numeric points
folded into hourly roll-ups (``telemetry_rollups``: count, sum, min, max, last) in the same
transaction that deletes them; roll-ups are kept ``rollup_days``.

Each statement deletes about ``telemetry.retention_batch_rows`` rows (5,000) of one series,
then the job pauses ``telemetry.retention_pause_s`` (0.05 s), so writers (SQLite has one at a
time) are never blocked for long. The job runs every ``telemetry.retention_interval_s``
(3,600 s), the first time a minute after start; ``run_once()`` runs one pass. It also
forgets processed message ids older than the stream's redelivery horizon.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from ulid import ULID

from fleetmesh.core.clock import Clock
from fleetmesh.core.database import Database
from fleetmesh.core.live_config import LiveConfig
from fleetmesh.core.logging import get_logger
from fleetmesh.telemetry.domain import DAY_MS
from fleetmesh.telemetry.metrics import TelemetryMetrics
from fleetmesh.telemetry.projection import DeviceDirectory
from fleetmesh.telemetry.service import (
    UnitOfWorkFactory,
    expire_rollups,
    expire_series,
    forget_batches,
    series_to_expire,
)
from fleetmesh.telemetry.writer import STREAM_MAX_AGE_S

log = get_logger(__name__)

SERVICE: Final = "telemetry"
DEFAULT_RETENTION_DAYS: Final = 30.0
DEFAULT_BATCH_ROWS: Final = 5_000
DEFAULT_PAUSE_S: Final = 0.05
DEFAULT_INTERVAL_S: Final = 3_600.0
FIRST_PASS_AFTER_S: Final = 60.0
BATCH_IDS_KEPT: Final = timedelta(seconds=STREAM_MAX_AGE_S) + timedelta(days=1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class RetentionReport:
    rows_deleted: int = 0
    statements: int = 0
    rollups_deleted: int = 0
    batch_ids_forgotten: int = 0
    series: int = 0
    per_statement: list[int] = field(default_factory=list)


class RetentionJob:
    def __init__(
        self,
        *,
        database: Database,
        directory: DeviceDirectory,
        uow_factory: UnitOfWorkFactory,
        clock: Clock,
        live_config: LiveConfig,
        metrics: TelemetryMetrics,
    ) -> None:
        self.database = database
        self.directory = directory
        self.uow_factory = uow_factory
        self.clock = clock
        self.live_config = live_config
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def _number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value: Any = self.live_config.get(SERVICE, key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= minimum:
            return default
        return float(value)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="telemetry-retention")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        await asyncio.sleep(FIRST_PASS_AFTER_S)
        while True:
            try:
                report = await self.run_once()
                log.info("telemetry_retention_done", rows=report.rows_deleted)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("telemetry_retention_failed", error=repr(error))
            await asyncio.sleep(self._number("retention_interval_s", DEFAULT_INTERVAL_S))

    async def run_once(self) -> RetentionReport:
        """One pass over every series; see the module docstring."""
        async with self._lock:
            return await self._pass()

    async def _pass(self) -> RetentionReport:
        report = RetentionReport()
        now = self.clock.now()
        now_ms = (now - _EPOCH) // timedelta(milliseconds=1)
        default_days = self._number("retention_days", DEFAULT_RETENTION_DAYS)
        batch_rows = int(self._number("retention_batch_rows", DEFAULT_BATCH_ROWS, minimum=0.5))
        pause_s = self._number("retention_pause_s", DEFAULT_PAUSE_S, minimum=-1.0)
        for series in await series_to_expire(self.database, None):
            report.series += 1
            days, rollup_days = self._retention_of(series.device_id, default_days)
            cutoff_ms = now_ms - int(days * DAY_MS)
            while True:
                deleted = await expire_series(
                    series,
                    cutoff_ms=cutoff_ms,
                    batch_rows=batch_rows,
                    roll_up=rollup_days is not None,
                    uow=self.uow_factory(),
                )
                if deleted == 0:
                    break
                report.rows_deleted += deleted
                report.statements += 1
                report.per_statement.append(deleted)
                self.metrics.rows_deleted.inc(deleted)
                await asyncio.sleep(pause_s)
                if deleted < batch_rows:
                    break
            keep_rollups_ms = int((rollup_days if rollup_days is not None else days) * DAY_MS)
            report.rollups_deleted += await expire_rollups(
                series, before_ms=now_ms - keep_rollups_ms, uow=self.uow_factory()
            )
        horizon = str(ULID.from_datetime(now - BATCH_IDS_KEPT))[:10] + "0" * 16
        while True:
            forgotten = await forget_batches(horizon, limit=batch_rows, uow=self.uow_factory())
            report.batch_ids_forgotten += forgotten
            if forgotten < batch_rows:
                break
            await asyncio.sleep(pause_s)
        return report

    def _retention_of(self, device_id: str, default_days: float) -> tuple[float, float | None]:
        device = self.directory.device(device_id)
        profile = self.directory.device_type(device.type_name) if device else None
        if profile is None:
            return default_days, None
        return profile.retention_days or default_days, profile.rollup_days
