"""The collector's settings once a platform process has started."""

from __future__ import annotations

import gc

import pytest

from fleetmesh.core.heap import OLDER_THRESHOLD, YOUNG_THRESHOLD, release_heap, settle_heap

pytestmark = pytest.mark.unit


def test_settling_freezes_the_start_and_release_restores_the_collector() -> None:
    before = gc.get_threshold()
    built_at_start = [object() for _ in range(1_000)]
    replaced = settle_heap()
    try:
        assert replaced == before
        assert gc.get_freeze_count() >= len(built_at_start)
        assert gc.get_threshold() == (YOUNG_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD)
    finally:
        release_heap(replaced)
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


class _Node:
    partner: object = None


def _make_cycles(pairs: int) -> None:
    for _ in range(pairs):
        first, second = _Node(), _Node()
        first.partner, second.partner = second, first


def test_cyclic_garbage_made_after_the_start_is_still_collected_without_asking() -> None:
    replaced = settle_heap()
    try:
        made = 3 * YOUNG_THRESHOLD
        _make_cycles(made // 2)
        left = sum(isinstance(o, _Node) for o in gc.get_objects())
    finally:
        release_heap(replaced)
    assert left < made / 2
