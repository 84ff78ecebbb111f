"""ULIDs: the table-based writer agrees with the ulid library and sorts by time."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ulid import ULID

from fleetmesh.core.ids import new_id, ulid_of

pytestmark = pytest.mark.unit


@given(st.integers(min_value=0, max_value=2**48 - 1), st.binary(min_size=10, max_size=32))
def test_ulid_of_is_the_ulid_of_that_time_and_entropy(milliseconds: int, entropy: bytes) -> None:
    expected = ULID.from_bytes(milliseconds.to_bytes(6, "big") + entropy[:10])
    assert ulid_of(milliseconds, entropy) == str(expected)


def test_new_ids_are_ulids_of_now_and_differ() -> None:
    before = time.time_ns() // 1_000_000
    first, second = new_id(), new_id()
    after = time.time_ns() // 1_000_000
    assert first != second
    assert before <= ULID.from_str(first).milliseconds <= after
    assert ulid_of(before - 1, b"\xff" * 10) < first  # the time part sorts first


def test_a_hundred_thousand_ids_do_not_collide() -> None:
    assert len({new_id() for _ in range(100_000)}) == 100_000


def test_a_forked_child_draws_other_random_bits_than_its_parent() -> None:
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        os.write(write_end, new_id().encode())
        os._exit(0)
    os.close(write_end)
    parent_id = new_id()
    child_id = os.read(read_end, 26).decode()
    os.close(read_end)
    os.waitpid(child, 0)
    assert len(child_id) == 26
    assert child_id[10:] != parent_id[10:]  # the random part, after the time
