"""Device secrets: generated once, shown once, stored as argon2 hashes.

Secrets are 256 random bits, so no one guesses them; argon2 protects a stolen
database, and its cost is paid on every login. The parameters (1 pass, 4 MiB)
keep registration of 10,000 devices in seconds; they are a choice, named here.
A successful verification is remembered (as a SHA-256 of the secret) for a
short time, so a device posting telemetry every second is not re-hashed every
second; rotation and deregistration forget it at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

SECRET_BYTES = 32
VERIFIED_TTL_S = 300.0
RECENT_TTL_S = 2.0
"""A device that just passed a full check is not read again for this long: telemetry at
high rates would otherwise read the device row on every request. Rotation or
deregistration in another process takes effect within it (at once in this one)."""
MAX_CACHED = 200_000


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


class CredentialHasher:
    """Hashes and verifies device secrets off the event loop."""

    def __init__(
        self, *, time_cost: int = 1, memory_cost_kib: int = 4096, workers: int = 2
    ) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_cost_kib, parallelism=1
        )
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argon2")
        self._workers = workers
        self._verified: dict[str, tuple[float, bytes, str]] = {}
        self._confirmed: dict[str, tuple[float, bytes]] = {}

    def hash_now(self, secret: str) -> str:
        return self._hasher.hash(secret)

    async def hash(self, secret: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.hash_now, secret)

    async def hash_many(self, secrets_: list[str]) -> list[str]:
        """Hash on every worker thread at once (argon2 releases the GIL)."""
        if not secrets_:
            return []
        loop = asyncio.get_running_loop()
        size = max(1, -(-len(secrets_) // self._workers))
        chunks = [secrets_[i : i + size] for i in range(0, len(secrets_), size)]
        results = await asyncio.gather(
            *(loop.run_in_executor(self._pool, self._hash_chunk, chunk) for chunk in chunks)
        )
        return [hashed for chunk in results for hashed in chunk]

    def _hash_chunk(self, chunk: list[str]) -> list[str]:
        return [self._hasher.hash(secret) for secret in chunk]

    async def verify(self, device_id: str, stored_hash: str, secret: str) -> bool:
        """Whether `secret` matches `stored_hash`; argon2 runs once per (hash, secret) pair
        within `VERIFIED_TTL_S`, and a new hash (a rotation elsewhere) is checked afresh."""
        if not stored_hash or not secret:
            return False
        fingerprint = hashlib.sha256(secret.encode()).digest()
        cached = self._verified.get(device_id)
        if cached and cached[2] == stored_hash and time.monotonic() - cached[0] < VERIFIED_TTL_S:
            return hmac.compare_digest(cached[1], fingerprint)
        ok = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._verify_now, stored_hash, secret
        )
        if ok:
            if len(self._verified) >= MAX_CACHED:
                self._verified.clear()
            self._verified[device_id] = (time.monotonic(), fingerprint, stored_hash)
        return ok

    def confirmed_recently(self, device_id: str, secret: str) -> bool:
        """This secret passed a full check (device read + hash) within `RECENT_TTL_S`."""
        confirmed = self._confirmed.get(device_id)
        if confirmed is None or time.monotonic() - confirmed[0] >= RECENT_TTL_S:
            return False
        return hmac.compare_digest(confirmed[1], hashlib.sha256(secret.encode()).digest())

    def note_confirmed(self, device_id: str, secret: str) -> None:
        if len(self._confirmed) >= MAX_CACHED:
            self._confirmed.clear()
        self._confirmed[device_id] = (time.monotonic(), hashlib.sha256(secret.encode()).digest())

    def _verify_now(self, stored_hash: str, secret: str) -> bool:
        try:
            return self._hasher.verify(stored_hash, secret)
        except (VerificationError, InvalidHashError):
            return False

    def forget(self, device_id: str) -> None:
        self._verified.pop(device_id, None)
        self._confirmed.pop(device_id, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
