"""Shared fixtures for the analytics unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def nab_dataset_dir() -> Path:
    """`$FLEETMESH_NAB_DIR`: a NAB corpus (data/, labels/, reference_results/)."""
    return Path(os.environ.get("FLEETMESH_NAB_DIR", "nab-dataset-not-configured"))


@pytest.fixture(scope="session")
def nab_dir() -> Path:
    root = nab_dataset_dir()
    if not (root / "labels" / "combined_windows.json").is_file():
        pytest.skip(
            f"NAB dataset not found at {root}; set FLEETMESH_NAB_DIR to a directory "
            "holding data/, labels/combined_windows.json and reference_results/"
        )
    return root
