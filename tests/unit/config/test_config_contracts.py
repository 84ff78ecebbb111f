"""The config center's KV documents, as LiveConfig reads them."""

from __future__ import annotations

import json

import pytest

from fleetmesh.config.contracts import kv_tombstone, kv_value, kv_version
from fleetmesh.config.domain import ConfigRef, InvalidConfigRef
from fleetmesh.core.live_config import LiveConfig

pytestmark = pytest.mark.unit


def test_kv_documents_carry_their_version_and_live_config_reads_them() -> None:
    document = kv_value(3, '{"max_attempts":5}')
    assert json.loads(document) == {"version": 3, "value": {"max_attempts": 5}}
    assert kv_version(document) == 3
    assert kv_version(kv_tombstone(4)) == 4
    assert kv_version(b"") == kv_version(b"not json") == 0

    live = LiveConfig(backbone=None)  # type: ignore[arg-type]  # apply() needs no connection
    assert live.apply("default.billing.retry", document)
    assert live.get("billing", "retry") == {"max_attempts": 5}
    assert not live.apply("default.billing.retry", kv_value(2, "1"))  # older: ignored
    assert live.apply("default.billing.retry", kv_tombstone(4), deleted=True)
    assert live.get("billing", "retry", "fallback") == "fallback"


@pytest.mark.parametrize("key", ["a..b", "retry.", ".retry", "a b", "x" * 129])
def test_keys_that_cannot_be_kv_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidConfigRef):
        ConfigRef(service="billing", key=key)


@pytest.mark.parametrize("key", ["retry", "ingest.retry.max", "a-b_c.d9", "x" * 128])
def test_dotted_keys_are_accepted(key: str) -> None:
    assert ConfigRef(service="billing", key=key).key == key
