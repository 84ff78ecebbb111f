"""The status domain modules stay pure: no database, web, messaging or HTTP client imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fleetmesh.status

pytestmark = pytest.mark.unit

PURE_MODULES = ["domain", "uptime", "health", "deadlines"]
FORBIDDEN = {"sqlalchemy", "fastapi", "nats", "httpx", "asyncio", "time", "random"}


def imported_top_levels(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", PURE_MODULES)
def test_domain_module_imports_no_io_or_clock(module: str) -> None:
    path = Path(fleetmesh.status.__file__).parent / f"{module}.py"
    assert imported_top_levels(path.read_text()) & FORBIDDEN == set()
