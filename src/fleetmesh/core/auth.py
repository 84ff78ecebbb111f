"""Operator API keys with roles, and the principals a request can act as.

An operator key looks like `fm_<prefix>_<secret>`; only its SHA-256 is stored
(the key is 190 random bits, so a slow hash would add latency to every
request without adding safety). Device secrets are different: they are
shorter-lived in practice, reused on MQTT, and are stored as argon2 hashes by
the devices context, which plugs its verifier in here.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from typing import Protocol

from sqlalchemy import insert, select, update

from fleetmesh.core.clock import utcnow
from fleetmesh.core.database import Database
from fleetmesh.core.errors import Conflict, NotFound
from fleetmesh.core.ids import new_id
from fleetmesh.core.tables import api_keys

KEY_PREFIX = "fm"
CACHE_SECONDS = 2.0


class Role(IntEnum):
    """Operator roles; a higher role can do everything a lower one can."""

    viewer = 1
    operator = 2
    admin = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name]
        except KeyError:
            raise ValueError(f"unknown role {name!r}; use admin, operator or viewer") from None


@dataclass(frozen=True, slots=True)
class Operator:
    """A request authenticated with an operator API key."""

    key_id: str
    name: str
    role: Role


@dataclass(frozen=True, slots=True)
class DevicePrincipal:
    """A request authenticated with a device's own credentials."""

    device_id: str


Principal = Operator | DevicePrincipal


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    id: str
    name: str
    role: Role
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class DeviceVerifier(Protocol):
    """Checks a device id and secret (provided by the devices context)."""

    async def verify_device(self, device_id: str, secret: str) -> bool:
        """True if the secret is the device's current, unrevoked credential."""


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new key and its public prefix."""
    prefix = secrets.token_hex(4)
    return f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(24)}", prefix


class ApiKeyStore:
    """Creates, verifies, lists and revokes operator API keys."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._cache: dict[str, tuple[float, Operator | None]] = {}
        self._in_memory: dict[str, Operator] = {}

    def create_in_memory(self, *, role: Role, name: str) -> str:
        """A key that lives only in this process (contexts calling the platform's own API)."""
        plaintext, prefix = generate_key()
        self._in_memory[hash_key(plaintext)] = Operator(
            key_id=f"internal-{prefix}", name=name, role=role
        )
        return plaintext

    async def create(self, *, role: Role, name: str) -> tuple[ApiKeyRecord, str]:
        """Create a key; the plaintext is returned once and never stored."""
        plaintext, prefix = generate_key()
        record = ApiKeyRecord(new_id(), name, role, prefix, utcnow(), None, None)
        async with self.database.writing(), self.database.session() as session:
            await session.execute(
                insert(api_keys).values(
                    id=record.id,
                    name=name,
                    role=role.name,
                    prefix=prefix,
                    key_hash=hash_key(plaintext),
                    created_at=record.created_at,
                )
            )
            await session.commit()
        return record, plaintext

    async def authenticate(self, plaintext: str) -> Operator | None:
        digest = hash_key(plaintext)
        internal = self._in_memory.get(digest)
        if internal is not None:
            return internal
        cached = self._cache.get(digest)
        if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
            return cached[1]
        operator = await self._lookup(digest)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (time.monotonic(), operator)
        return operator

    async def _lookup(self, digest: str) -> Operator | None:
        async with self.database.session() as session:
            row = (
                await session.execute(
                    select(api_keys.c.id, api_keys.c.name, api_keys.c.role, api_keys.c.key_hash)
                    .where(api_keys.c.key_hash == digest)
                    .where(api_keys.c.revoked_at.is_(None))
                )
            ).first()
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            return None
        return Operator(key_id=row.id, name=row.name, role=Role[row.role])

    async def list(self) -> list[ApiKeyRecord]:
        async with self.database.session() as session:
            rows = (await session.execute(select(api_keys).order_by(api_keys.c.id))).all()
        return [
            ApiKeyRecord(
                r.id, r.name, Role[r.role], r.prefix, r.created_at, r.revoked_at, r.last_used_at
            )
            for r in rows
        ]

    async def revoke(self, key_id: str) -> None:
        async with self.database.writing(), self.database.session() as session:
            row = (
                await session.execute(select(api_keys.c.revoked_at).where(api_keys.c.id == key_id))
            ).first()
            if row is None:
                raise NotFound(f"API key {key_id} does not exist")
            if row.revoked_at is not None:
                raise Conflict(f"API key {key_id} is already revoked")
            await session.execute(
                update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=utcnow())
            )
            await session.commit()
        self._cache.clear()

    async def count_active_admins(self) -> int:
        async with self.database.session() as session:
            rows = (
                await session.execute(
                    select(api_keys.c.id)
                    .where(api_keys.c.role == Role.admin.name)
                    .where(api_keys.c.revoked_at.is_(None))
                )
            ).all()
        return len(rows)
