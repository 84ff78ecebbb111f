"""The physical-limit probes and the process helpers (small counts; no timing asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleetmesh.bench import limits
from fleetmesh.bench.platform import descendants, rss_bytes

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("indexed", [False, True])
def test_sqlite_probe_writes_every_row_and_cleans_up(tmp_path: Path, indexed: bool) -> None:
    seen: list[int] = []
    rate = limits.sqlite_executemany_rows_per_s(
        2500, indexed=indexed, batch=1000, directory=tmp_path, on_progress=seen.append
    )
    assert rate > 0
    assert seen == [1000, 1000, 500]
    assert list(tmp_path.iterdir()) == []


def test_argon2_probe_hashes_the_requested_count_on_its_threads() -> None:
    seen: list[int] = []
    rate = limits.argon2_hashes_per_s(45, threads=2, on_progress=seen.append)
    assert rate > 0
    assert sum(seen) == 45


def test_sample_rows_have_unique_ordered_keys() -> None:
    rows = limits.sample_rows(100)
    keys = [row[0] for row in rows]
    assert keys == sorted(set(keys))


@pytest.mark.parametrize(
    ("given", "plain"),
    [
        ("postgresql+asyncpg://u@h:5432/db", "postgresql://u@h:5432/db"),
        ("postgres://u@h/db", "postgresql://u@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_postgres_urls_become_plain_for_asyncpg(given: str, plain: str) -> None:
    assert limits.plain_postgres_url(given) == plain


def test_rss_and_descendants_come_from_proc() -> None:
    assert rss_bytes(os.getpid()) > 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in descendants(os.getpid())
        assert rss_bytes(child.pid) >= 0
    finally:
        child.kill()
        child.wait()
    assert rss_bytes(child.pid) == 0
