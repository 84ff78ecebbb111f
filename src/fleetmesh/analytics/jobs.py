"""Background training: one asyncio task per model, fitting in the scoring pool.

A job reads the training range page by page through the telemetry API, streams
each batch through the detector in the process pool (the event loop only moves
data and writes progress), and stores the fitted JSON state when done.

Jobs are not resumed after a restart; they are marked `failed` with the error
"interrupted by a restart" (train again to retry):

* at start, an embedded platform (one process owns the database) fails every
  model still `training`;
* a service replica (external NATS, maybe others running) fails only models
  whose heartbeat (`updated_at`, refreshed every few seconds by the owner) is
  stale, and keeps doing so periodically, so a crashed replica's jobs are failed
  by the survivors;
* a clean shutdown fails its own running jobs at once ("interrupted by a shutdown").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta
from typing import Any

import numpy as np

from fleetmesh.analytics.domain import Model, ModelStatus, score_summary
from fleetmesh.analytics.reader import TelemetryReader
from fleetmesh.analytics.scoring import CHUNK_POINTS, ScoringPool, initial_state
from fleetmesh.analytics.service import UnitOfWorkFactory
from fleetmesh.core.clock import Clock
from fleetmesh.core.errors import FleetmeshError
from fleetmesh.core.logging import get_logger

log = get_logger(__name__)

HEARTBEAT_S = 5.0
STALE_AFTER = timedelta(seconds=30)
PROGRESS_EVERY_S = 0.5
READ_SHARE = 0.98  # progress while reading and fitting; the last 2% is storing the state
INTERRUPTED_BY_RESTART = "interrupted by a restart; train the model again"
INTERRUPTED_BY_SHUTDOWN = "interrupted by a shutdown; train the model again"


class TrainingJobs:
    """Runs training jobs of this process and fails the ones a dead process left behind."""

    def __init__(
        self,
        *,
        uow_factory: UnitOfWorkFactory,
        reader: TelemetryReader,
        pool: ScoringPool,
        clock: Clock,
        sole_owner: bool,
    ) -> None:
        self.uow_factory = uow_factory
        self.reader = reader
        self.pool = pool
        self.clock = clock
        self.sole_owner = sole_owner
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._watch: asyncio.Task[None] | None = None

    @property
    def running(self) -> set[str]:
        return set(self._tasks)

    async def start(self) -> None:
        await self.fail_abandoned(everything=self.sole_owner)
        self._watch = asyncio.create_task(self._watch_loop(), name="analytics-training-watch")

    async def stop(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def start_training(self, model: Model) -> None:
        task = asyncio.create_task(self._train(model), name=f"analytics-train-{model.id}")
        self._tasks[model.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(model.id, None))

    async def wait(self, model_id: str) -> None:
        """Wait for this process's job of the model, if any (tests, CLI)."""
        task = self._tasks.get(model_id)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)

    async def fail_abandoned(self, *, everything: bool = False) -> list[str]:
        """Fail `training` models nobody runs: all not ours, or those with a stale heartbeat."""
        now = self.clock.now()
        async with self.uow_factory() as uow:
            training = await uow.repo.training_models()
            abandoned = [
                model_id
                for model_id, heartbeat in training
                if model_id not in self._tasks and (everything or heartbeat < now - STALE_AFTER)
            ]
            for model_id in abandoned:
                await uow.repo.update_model(
                    model_id,
                    status=ModelStatus.failed.value,
                    error=INTERRUPTED_BY_RESTART,
                    updated_at=now,
                    completed_at=now,
                )
            if abandoned:
                await uow.commit()
        if abandoned:
            log.warning("analytics_training_abandoned", models=abandoned)
        return abandoned

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._heartbeat()
                await self.fail_abandoned()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("analytics_training_watch_failed", error=repr(error))

    async def _heartbeat(self) -> None:
        running = list(self._tasks)
        if not running:
            return
        async with self.uow_factory() as uow:
            now = self.clock.now()
            for model_id in running:
                await uow.repo.update_model(model_id, updated_at=now)
            await uow.commit()

    async def _train(self, model: Model) -> None:
        try:
            await self._fit(model)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._fail(model.id, INTERRUPTED_BY_SHUTDOWN))
            raise
        except FleetmeshError as error:
            await self._fail(model.id, error.detail)
        except Exception as error:
            log.exception("analytics_training_failed", model=model.id, error=repr(error))
            await self._fail(model.id, f"training failed: {error!r}")

    async def _fit(self, model: Model) -> None:
        source = model.training
        detector = await self.pool.detector(initial_state(model.algorithm, model.parameters))
        progress = _Progress(self, model.id, source.start_ms, source.end_ms)
        scores: list[np.ndarray[Any, np.dtype[np.float64]]] = []
        buffer_ts: list[int] = []
        buffer_values: list[float] = []
        started = time.perf_counter()
        fit_s = 0.0
        points = 0

        async def fit(ts: list[int], values: list[float]) -> None:
            nonlocal fit_s, points
            fit_started = time.perf_counter()
            chunk_scores = await self.pool.run_detector(detector, ts, values)
            fit_s += time.perf_counter() - fit_started
            points += len(ts)
            scores.append(np.asarray(chunk_scores, dtype=np.float64))

        async for page in self.reader.read(
            source.device_id, source.metric, source.start_ms, source.end_ms
        ):
            buffer_ts.extend(page.ts_ms)
            buffer_values.extend(page.values)
            if len(buffer_ts) >= CHUNK_POINTS:
                await fit(buffer_ts, buffer_values)
                buffer_ts, buffer_values = [], []
            await progress.covered(page.covered_to_ms)
        if buffer_ts:
            await fit(buffer_ts, buffer_values)
        if points == 0:
            await self._fail(
                model.id,
                f"no numeric points of {source.metric!r} for device {source.device_id!r} "
                "in the training range",
            )
            return
        state = await self.pool.call(detector.get_state)
        all_scores = np.concatenate(scores)
        summary = score_summary(all_scores.tolist(), model.threshold)
        total_s = time.perf_counter() - started
        summary.update(
            {
                "duration_s": total_s,
                "fit_s": fit_s,
                "points_per_s": points / total_s if total_s > 0 else None,
            }
        )
        now = self.clock.now()
        async with self.uow_factory() as uow:
            await uow.repo.update_model(
                model.id,
                status=ModelStatus.ready.value,
                progress=1.0,
                fitted_state=state,
                training_points=points,
                training_summary=summary,
                updated_at=now,
                completed_at=now,
            )
            await uow.commit()
        log.info("analytics_model_ready", model=model.id, points=points, seconds=round(total_s, 3))

    async def _fail(self, model_id: str, error: str) -> None:
        now = self.clock.now()
        async with self.uow_factory() as uow:
            await uow.repo.update_model(
                model_id,
                status=ModelStatus.failed.value,
                error=error,
                updated_at=now,
                completed_at=now,
            )
            await uow.commit()

    async def set_progress(self, model_id: str, fraction: float) -> None:
        async with self.uow_factory() as uow:
            await uow.repo.update_model(
                model_id, progress=round(fraction, 4), updated_at=self.clock.now()
            )
            await uow.commit()


class _Progress:
    """Progress = share of the training range read, written at most twice a second."""

    def __init__(self, jobs: TrainingJobs, model_id: str, start_ms: int, end_ms: int) -> None:
        self.jobs = jobs
        self.model_id = model_id
        self.start_ms = start_ms
        self.span = max(end_ms - start_ms, 1)
        self.last_write = 0.0

    async def covered(self, up_to_ms: int) -> None:
        now = time.monotonic()
        if now - self.last_write < PROGRESS_EVERY_S:
            return
        self.last_write = now
        fraction = min(max((up_to_ms - self.start_ms) / self.span, 0.0), 1.0) * READ_SHARE
        await self.jobs.set_progress(self.model_id, fraction)
