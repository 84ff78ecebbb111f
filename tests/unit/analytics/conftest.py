"""Shared fixtures for the analytics unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]


def nab_dataset_dir() -> Path:
    """`$FLEETMESH_NAB_DIR`, else `<repo>/../shared/datasets/nab` (how CI lays out clones)."""
    configured = os.environ.get("FLEETMESH_NAB_DIR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "datasets" / "nab"


@pytest.fixture(scope="session")
def nab_dir() -> Path:
    root = nab_dataset_dir()
    if not (root / "labels" / "combined_windows.json").is_file():
        pytest.skip(
            f"NAB dataset not found at {root}; set FLEETMESH_NAB_DIR to a directory "
            "holding data/, labels/combined_windows.json and reference_results/"
        )
    return root
