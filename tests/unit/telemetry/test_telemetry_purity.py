"""The telemetry domain stays pure and fast: no I/O imports, and a throughput floor."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fleetmesh.telemetry

pytestmark = pytest.mark.unit

TELEMETRY_DIR = Path(fleetmesh.telemetry.__file__).parent
DOMAIN_MODULES = sorted(path.name for path in TELEMETRY_DIR.glob("domain*.py"))
FORBIDDEN = {"sqlalchemy", "fastapi", "nats", "httpx", "asyncio", "time", "random", "pydantic"}
NOW_MS = 1_760_000_000_000


def imported_top_levels(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", DOMAIN_MODULES)
def test_domain_module_imports_no_io_or_clock(module: str) -> None:
    assert imported_top_levels((TELEMETRY_DIR / module).read_text()) & FORBIDDEN == set()


def test_domain_modules_are_found() -> None:
    assert "domain.py" in DOMAIN_MODULES and len(DOMAIN_MODULES) > 1
