"""CPU-bound detector runs, off the event loop, in a small pool of worker threads.

A run starts from a detector's JSON state and returns the state it ends in with
the scores, so the stored model is never shared with a run. Points go through in
chunks, with the event loop free between chunks (progress is reported there).

Threads rather than processes: a process pool would have to be spawned (forking a
process that runs NATS and database threads is unsafe), and spawned workers
re-import the main module, which breaks embedding fleetmesh in scripts without a
`__main__` guard. The interpreter switches threads every few milliseconds
(`sys.getswitchinterval()`), so the event loop stays responsive while a worker scores.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fleetmesh.analytics.detectors import Detector, create_detector, detector_from_state

JsonDict = dict[str, Any]
CHUNK_POINTS = 20_000
WORKERS = 2
ProgressCallback = Callable[[int], None]


def initial_state(algorithm: str, parameters: JsonDict) -> JsonDict:
    """The state of a fresh, untrained detector."""
    return create_detector(algorithm, **parameters).get_state()


def score_points(detector: Detector, ts_ms: Sequence[int], values: Sequence[float]) -> list[float]:
    """Score then learn each point in order (the detector is updated in place)."""
    update = detector.update
    return [update(ts / 1000.0, value) for ts, value in zip(ts_ms, values, strict=True)]


class ScoringPool:
    """Worker threads for detector runs (training, evaluation, analysis, streaming)."""

    def __init__(self, workers: int = WORKERS) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="analytics")

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def detector(self, state: JsonDict) -> Detector:
        detector: Detector = await self.call(detector_from_state, state)
        return detector

    async def score(
        self, detector: Detector, ts_ms: Sequence[int], values: Sequence[float]
    ) -> list[float]:
        """Score points with a live detector (updated in place)."""
        scores: list[float] = await self.call(score_points, detector, ts_ms, values)
        return scores

    async def run(
        self,
        state: JsonDict,
        ts_ms: Sequence[int],
        values: Sequence[float],
        *,
        progress: ProgressCallback | None = None,
    ) -> tuple[JsonDict, list[float]]:
        """Stream the points through a detector built from `state`; return its end state, scores."""
        detector = await self.detector(state)
        scores = await self.run_detector(detector, ts_ms, values, progress=progress)
        end_state: JsonDict = await self.call(detector.get_state)
        return end_state, scores

    async def run_detector(
        self,
        detector: Detector,
        ts_ms: Sequence[int],
        values: Sequence[float],
        *,
        progress: ProgressCallback | None = None,
    ) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(ts_ms), CHUNK_POINTS):
            end = start + CHUNK_POINTS
            scores.extend(await self.score(detector, ts_ms[start:end], values[start:end]))
            if progress is not None:
                progress(len(scores))
        return scores

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
