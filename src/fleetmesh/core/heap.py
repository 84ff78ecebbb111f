"""The garbage collector's settings for a platform process that has started.

What the start built (imports, the wired platform) lives as long as the process.
Frozen, it is left out of the collector's full passes, each of which otherwise
paused the event loop for ~100 ms (the p99 of every request and delivery).

With the start frozen, CPython's rule for full passes (once a quarter of the
unfrozen heap is new) fires after almost every tenth young pass, and a young
pass comes every 700 allocations: when 100,000 devices fall silent at once,
the status context paused for 609 passes (211 ms) in the first 3 s. With young
passes every `YOUNG_THRESHOLD` allocations, and the older generations' passes
following at the same ratio, it paused for 9 (102 ms). Cyclic garbage waits a
little longer for its pass; reference counting frees everything else at once.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000
"""Allocations (less deallocations) between two passes over the youngest objects."""
OLDER_THRESHOLD = 20
"""Passes of a generation between two passes over the next older one."""


def settle_heap() -> tuple[int, int, int]:
    """Freeze what exists now and collect young objects less often; once started.
    Returns the thresholds it replaced."""
    replaced = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD)
    return replaced


def release_heap(thresholds: tuple[int, int, int]) -> None:
    """Undo `settle_heap` (a bench that started a platform in its own process)."""
    gc.unfreeze()
    gc.set_threshold(*thresholds)
