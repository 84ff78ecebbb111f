"""Live-tunable settings of the status service, read from the configuration center.

Keys (service `status`, KV `config` under `default.status.<key>`, JSON
`{"version": N, "value": ...}`), each read when it is needed, so a change
applies to the next deadline or check it concerns:

| key                            | default | meaning                                          |
|--------------------------------|---------|--------------------------------------------------|
| `offline_timeout_s`            | 300     | inactivity timeout when neither the device nor   |
|                                |         | its (projected) type has one                     |
| `health_check_initial_s`       | 30      | first ping this long after a device went offline |
| `health_check_factor`          | 2       | each next ping waits this many times longer      |
| `health_check_max_s`           | 3600    | ... but never longer than this                   |
| `health_check_reply_timeout_s` | 10      | an unanswered ping counts as failed after this   |

A value that is not a positive number (or is out of range) is ignored with a
warning and the default applies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fleetmesh.core.live_config import LiveConfig
from fleetmesh.core.logging import get_logger
from fleetmesh.status.deadlines import BackoffPolicy
from fleetmesh.status.domain import MAX_OFFLINE_TIMEOUT_S

log = get_logger(__name__)

SERVICE = "status"
OFFLINE_TIMEOUT_KEY = "offline_timeout_s"
DEFAULT_OFFLINE_TIMEOUT_S = 300.0
DEFAULT_CHECK_INITIAL_S = 30.0
DEFAULT_CHECK_FACTOR = 2.0
DEFAULT_CHECK_MAX_S = 3600.0
DEFAULT_REPLY_TIMEOUT_S = 10.0


class StatusOptions:
    """Typed, validated reads of the status service's live settings."""

    def __init__(self, live_config: LiveConfig) -> None:
        self.live_config = live_config

    def offline_timeout_s(self) -> float:
        return self._number(
            OFFLINE_TIMEOUT_KEY, DEFAULT_OFFLINE_TIMEOUT_S, maximum=MAX_OFFLINE_TIMEOUT_S
        )

    def backoff(self) -> BackoffPolicy:
        initial = self._number("health_check_initial_s", DEFAULT_CHECK_INITIAL_S)
        maximum = max(initial, self._number("health_check_max_s", DEFAULT_CHECK_MAX_S))
        factor = self._number("health_check_factor", DEFAULT_CHECK_FACTOR, minimum=1.0)
        return BackoffPolicy(
            initial=timedelta(seconds=initial),
            factor=factor,
            maximum=timedelta(seconds=maximum),
        )

    def reply_timeout(self) -> timedelta:
        return timedelta(
            seconds=self._number("health_check_reply_timeout_s", DEFAULT_REPLY_TIMEOUT_S)
        )

    def on_offline_timeout_change(self, listener: Callable[[Any], None]) -> Callable[[], None]:
        return self.live_config.on_change(SERVICE, OFFLINE_TIMEOUT_KEY, listener)

    def _number(
        self,
        key: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float = MAX_OFFLINE_TIMEOUT_S,
    ) -> float:
        value = self.live_config.get(SERVICE, key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            log.warning("status_setting_ignored", key=key, value=repr(value))
            return default
        number = float(value)
        low_ok = number >= minimum if minimum is not None else number > 0
        if not math.isfinite(number) or not low_ok or number > maximum:
            log.warning("status_setting_ignored", key=key, value=number)
            return default
        return number
