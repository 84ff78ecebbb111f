"""Identifiers: ULIDs, sortable by creation time."""

from __future__ import annotations

from ulid import ULID


def new_id() -> str:
    """A new ULID as its 26-character string."""
    return str(ULID())
