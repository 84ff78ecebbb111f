"""Isolation forest over sliding windows ("shingles") of the series."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fleetmesh.analytics.detectors.base import AlarmSpacer, Detector, JsonDict, clamp_unit

EULER_GAMMA = 0.5772156649015329


def average_path_length(samples: NDArray[np.float64]) -> NDArray[np.float64]:
    """c(n): the mean depth of an unsuccessful search in a random binary tree of n keys."""
    lengths = np.zeros_like(samples)
    lengths[samples == 2] = 1.0
    large = samples > 2
    n = samples[large]
    lengths[large] = 2.0 * (np.log(n - 1.0) + EULER_GAMMA) - 2.0 * (n - 1.0) / n
    return lengths


@dataclass(frozen=True)
class FlatForest:
    """All trees of a fitted forest in flat arrays, walked level by level for one point.

    `children[2 * node + go_right]` is the next node; leaves point to themselves
    (threshold +inf), so every tree can take the same number of steps.
    """

    roots: NDArray[np.int64]
    feature: NDArray[np.int64]
    threshold: NDArray[np.float64]
    children: NDArray[np.int64]
    leaf_path: NDArray[np.float64]
    depth: int
    normaliser: float

    @classmethod
    def from_sklearn(cls, forest: Any, max_samples: int) -> FlatForest:
        roots, features, thresholds, children, paths = [], [], [], [], []
        offset, depth = 0, 0
        for tree, columns in zip(forest.estimators_, forest.estimators_features_, strict=True):
            nodes = tree.tree_
            count = int(nodes.node_count)
            left = nodes.children_left.astype(np.int64)
            right = nodes.children_right.astype(np.int64)
            is_leaf = left < 0
            own = np.arange(count, dtype=np.int64)
            node_depth = _node_depths(left, right)
            depth = max(depth, int(node_depth.max()))
            roots.append(offset)
            features.append(np.where(is_leaf, 0, np.asarray(columns)[nodes.feature.clip(0)]))
            thresholds.append(np.where(is_leaf, np.inf, nodes.threshold))
            pairs = np.stack([np.where(is_leaf, own, left), np.where(is_leaf, own, right)], 1)
            children.append(pairs.ravel() + offset)
            samples = nodes.n_node_samples.astype(np.float64)
            paths.append(np.where(is_leaf, node_depth + average_path_length(samples), 0.0))
            offset += count
        normaliser = len(roots) * float(average_path_length(np.array([float(max_samples)]))[0])
        return cls(
            roots=np.array(roots, dtype=np.int64),
            feature=np.concatenate(features).astype(np.int64),
            threshold=np.concatenate(thresholds).astype(np.float64),
            children=np.concatenate(children),
            leaf_path=np.concatenate(paths),
            depth=depth,
            normaliser=max(normaliser, 1e-12),
        )

    def score(self, point: NDArray[np.float64]) -> float:
        """The isolation score 2^(-E[h] / c(n)) in (0, 1]; about 0.5 is ordinary."""
        nodes = self.roots
        for _ in range(self.depth):
            go_right = point[self.feature[nodes]] > self.threshold[nodes]
            nodes = self.children[2 * nodes + go_right]
        return float(2.0 ** (-self.leaf_path[nodes].sum() / self.normaliser))


def _node_depths(left: NDArray[np.int64], right: NDArray[np.int64]) -> NDArray[np.float64]:
    depths = np.zeros(len(left), dtype=np.float64)
    # sklearn numbers children after their parent, so one forward pass suffices.
    for node in range(len(left)):
        if left[node] >= 0:
            depths[left[node]] = depths[node] + 1.0
            depths[right[node]] = depths[node] + 1.0
    return depths


class IsolationForestDetector(Detector):
    """scikit-learn IsolationForest on shingles of the last `shingle` values.

    The forest is refitted every `refit_every` points on the latest
    `train_size` shingles with a fixed `random_state`, so the model is a pure
    function of the recent values: the state stores those values and a restored
    detector refits exactly the same forest. Until `min_train` shingles exist
    the score is 0. Scores map the isolation score s (0.5 = ordinary) to
    `max(0, 2s - 1)`. A shifted level stays "isolated" until the next refit,
    so alarms are spaced (see `AlarmSpacer`): `rest=0` gives the raw scores.
    """

    name = "isolation_forest"
    # Refitting forests makes this detector about a hundred times slower than the others,
    # so held-out evaluation scores its defaults only.
    tuning_grid = ({},)

    def __init__(
        self,
        shingle: int = 4,
        train_size: int = 2000,
        min_train: int = 256,
        refit_every: int = 1000,
        n_estimators: int = 50,
        max_samples: int = 128,
        random_state: int = 0,
        rest: int = 200,
        alarm_score: float = 0.3,
        escalation: float = 1.5,
    ) -> None:
        if shingle < 1 or min_train < 2 or train_size < min_train or refit_every < 1:
            raise ValueError("need shingle >= 1, 2 <= min_train <= train_size, refit_every >= 1")
        self._shingle = shingle
        self._train_size = train_size
        self._min_train = min_train
        self._refit_every = refit_every
        self._n_estimators = n_estimators
        self._max_samples = max_samples
        self._random_state = random_state
        self._values: deque[float] = deque(maxlen=train_size + shingle - 1 + refit_every)
        self._since_fit = 0
        self._forest: FlatForest | None = None
        self._spacing = {"rest": rest, "alarm_score": alarm_score, "escalation": escalation}
        self._spacer = AlarmSpacer(rest, alarm_score, escalation)

    @property
    def params(self) -> JsonDict:
        return {
            "shingle": self._shingle,
            "train_size": self._train_size,
            "min_train": self._min_train,
            "refit_every": self._refit_every,
            "n_estimators": self._n_estimators,
            "max_samples": self._max_samples,
            "random_state": self._random_state,
            **self._spacing,
        }

    def _update(self, ts: float, value: float) -> float:  # noqa: ARG002 - interface
        self._values.append(value)
        score = self._score()
        self._since_fit += 1
        if self._due_for_fit():
            self._fit(list(self._values))
        return self._spacer.filter(score)

    def _score(self) -> float:
        if self._forest is None or len(self._values) < self._shingle:
            return 0.0
        point = np.array(self._latest_shingle(), dtype=np.float32).astype(np.float64)
        return clamp_unit(2.0 * self._forest.score(point) - 1.0)

    def _latest_shingle(self) -> list[float]:
        return [self._values[-1 - lag] for lag in range(self._shingle)]

    def _due_for_fit(self) -> bool:
        shingles = len(self._values) - self._shingle + 1
        if self._forest is None:
            return shingles >= self._min_train
        return self._since_fit >= self._refit_every

    def _fit(self, history: list[float]) -> None:
        values = np.array(history[-(self._train_size + self._shingle - 1) :], dtype=np.float64)
        windows = np.lib.stride_tricks.sliding_window_view(values, self._shingle)[:, ::-1]
        sample_size = min(self._max_samples, len(windows))
        # Imported here: scikit-learn takes ~0.7 s to import, which every CLI call would pay.
        from sklearn.ensemble import IsolationForest as SkIsolationForest

        forest = SkIsolationForest(
            n_estimators=self._n_estimators,
            max_samples=sample_size,
            random_state=self._random_state,
        ).fit(np.ascontiguousarray(windows))
        self._forest = FlatForest.from_sklearn(forest, sample_size)
        self._since_fit = 0

    def _export_state(self) -> JsonDict:
        return {
            "values": list(self._values),
            "since_fit": self._since_fit,
            "fitted": self._forest is not None,
            "spacer": self._spacer.export(),
        }

    def _import_state(self, state: JsonDict) -> None:
        self._values.clear()
        self._values.extend(float(v) for v in state["values"])
        self._forest = None
        self._spacer.restore(state["spacer"])
        if state["fitted"]:
            since_fit = int(state["since_fit"])
            history = list(self._values)
            self._fit(history[: len(history) - since_fit] if since_fit else history)
            self._since_fit = since_fit
