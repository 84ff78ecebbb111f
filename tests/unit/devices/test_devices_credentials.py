"""Device secrets: argon2 hashes, and what is remembered between verifications."""

from __future__ import annotations

import pytest

from fleetmesh.devices import credentials
from fleetmesh.devices.credentials import CredentialHasher

pytestmark = pytest.mark.unit


@pytest.fixture
def hasher() -> CredentialHasher:
    return CredentialHasher()


async def test_a_secret_verifies_against_its_hash_only(hasher: CredentialHasher) -> None:
    stored = await hasher.hash("right")
    assert await hasher.verify("d-1", stored, "right")
    assert not await hasher.verify("d-1", stored, "wrong")  # served from the cache
    assert not await hasher.verify("d-1", "", "right")


async def test_a_new_hash_is_checked_afresh_so_a_rotation_elsewhere_counts(
    hasher: CredentialHasher,
) -> None:
    old = await hasher.hash("old")
    assert await hasher.verify("d-1", old, "old")
    rotated = await hasher.hash("new")  # stored by another process
    assert not await hasher.verify("d-1", rotated, "old")
    assert await hasher.verify("d-1", rotated, "new")


async def test_a_recent_confirmation_is_remembered_briefly_and_forgotten_on_demand(
    hasher: CredentialHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not hasher.confirmed_recently("d-1", "s")
    hasher.note_confirmed("d-1", "s")
    assert hasher.confirmed_recently("d-1", "s")
    assert not hasher.confirmed_recently("d-1", "other")
    hasher.forget("d-1")  # a rotation or deregistration here
    assert not hasher.confirmed_recently("d-1", "s")
    hasher.note_confirmed("d-1", "s")
    monkeypatch.setattr(credentials, "RECENT_TTL_S", 0.0)
    assert not hasher.confirmed_recently("d-1", "s")
