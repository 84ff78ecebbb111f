"""Identifiers: ULIDs, sortable by creation time.

A ULID is 48 bits of Unix time in milliseconds and 80 random bits, written as 26
characters of Crockford's base32. `new_id` writes them two characters (10 bits) at a
time from a table and reuses the time part within a millisecond: about five times as
fast as `ulid.ULID`, which matters where every status change and event gets one.

The random bits come from a generator seeded by the OS (and seeded again in a forked
child), not from a system call per id, which cost 40 % of an id. Identifiers are
not secrets: they must not collide, and 80 bits a millisecond keep them apart.
Secrets (credentials, keys, signing secrets) come from `secrets`.
"""

from __future__ import annotations

import os
import random
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
"""Index: 10 bits; value: their two base32 characters."""
_RANDOM_SHIFTS = (70, 60, 50, 40, 30, 20, 10, 0)

_time_prefix: tuple[int, str] = (-1, "")
_random = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(32)))


def new_id() -> str:
    """A new ULID as its 26-character string."""
    return _ulid(time.time_ns() // 1_000_000, _random.getrandbits(80))


def ulid_of(milliseconds: int, entropy: bytes) -> str:
    """The ULID of a given time (48 bits) and entropy (the first 80 bits are used)."""
    return _ulid(milliseconds, int.from_bytes(entropy[:10]))


def _ulid(milliseconds: int, random_bits: int) -> str:
    return _time_part(milliseconds & 0xFFFF_FFFF_FFFF) + "".join(
        [_PAIRS[random_bits >> shift & 0x3FF] for shift in _RANDOM_SHIFTS]
    )


def _time_part(milliseconds: int) -> str:
    """The 10 characters of a millisecond timestamp (48 bits, 2 leading zero bits)."""
    global _time_prefix
    cached_ms, text = _time_prefix
    if milliseconds != cached_ms:
        text = "".join([_PAIRS[milliseconds >> shift & 0x3FF] for shift in (40, 30, 20, 10, 0)])
        _time_prefix = (milliseconds, text)
    return text
