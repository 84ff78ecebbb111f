"""Service registry domain: service instances, their health and discovery filtering.

Pure domain logic: no I/O, time is always passed in as an aware ``datetime``
and durations are plain seconds (``float``).

Health state machine
--------------------
States: ``passing``, ``warning``, ``critical``.

* A new instance starts ``passing``: registering is the instance's own proof of
  life (it registers once it is ready to serve). For TTL checks the
  registration time counts as the first heartbeat.
* Active checks (HTTP, TCP) report a :class:`CheckOutcome`:

  - ``success`` -> ``passing``; the failure counter and ``critical_since`` reset.
  - ``failure`` or ``timeout`` -> the consecutive failure counter grows;
    below ``failures_before_critical`` (default 3) the state is ``warning``,
    at or above it the state is ``critical``.

  So with the defaults: 1 failure -> warning, 3 consecutive failures ->
  critical, 1 success -> passing.
* TTL checks: :meth:`ServiceInstance.heartbeat` -> ``passing``. An instance
  whose last heartbeat is older than the TTL is *expired* and therefore
  ``critical``; its ``critical_since`` is the expiry moment (last heartbeat +
  TTL), not the moment someone noticed, so deregistration timing does not
  depend on how often expiry is evaluated.
* ``critical_since`` is set when the state becomes ``critical`` and is kept
  while it stays critical. :meth:`ServiceInstance.should_deregister` is true
  once an instance has been critical for at least ``deregister_critical_after``.

Discovery
---------
:func:`select_instances` never returns ``critical`` instances when
``healthy_only`` is set. ``warning`` instances count as healthy: a single
failed probe is not enough evidence to stop sending traffic, and removing them
would concentrate load on the remaining instances.

Errors derive from :mod:`fleetmesh.core.errors`: :class:`InvalidInstance` (422,
every failing field), :class:`CheckKindMismatch` (409), and
:class:`NoHealthyInstance` / :class:`ProtectionThresholdReached` (503).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from fleetmesh.core.errors import Conflict, FieldError, InvalidInput, Overloaded

SERVICE_NAME_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,62}")
INSTANCE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
ZONE_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/=-]{0,63}")
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}")
HOSTNAME_LABEL_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_HOSTNAME_LENGTH = 253

MIN_PORT, MAX_PORT = 1, 65535
MIN_WEIGHT, MAX_WEIGHT, DEFAULT_WEIGHT = 1, 1000, 100
MAX_TAGS = 32
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_LENGTH = 128
MAX_METADATA_VALUE_LENGTH = 512
MAX_METADATA_TOTAL_BYTES = 4096

DEFAULT_CHECK_INTERVAL = 10.0
DEFAULT_CHECK_TIMEOUT = 2.0
DEFAULT_TTL = 30.0
DEFAULT_DEREGISTER_CRITICAL_AFTER = 90.0
DEFAULT_FAILURES_BEFORE_CRITICAL = 3


def _describe(errors: Sequence[FieldError]) -> str:
    return "; ".join(f"{error.field}: {error.message}" for error in errors)


class InvalidInstance(InvalidInput):
    """An instance (or its health check) failed validation; ``errors`` lists every failure."""

    problem = "invalid-service-instance"

    def __init__(self, errors: Sequence[FieldError]) -> None:
        super().__init__("invalid service instance: " + _describe(errors), errors=list(errors))


class CheckKindMismatch(Conflict):
    """A heartbeat was sent to an active check, or a probe result to a TTL check."""

    problem = "check-kind-mismatch"


class NoHealthyInstance(Overloaded):
    """There is no healthy instance to send a request to (503)."""

    problem = "no-healthy-instance"

    def __init__(self, service: str | None) -> None:
        super().__init__(f"no healthy instance of service {service or '(none registered)'}")
        self.service = service
        self.extra = {"service": service}


class ProtectionThresholdReached(Overloaded):
    """Too few healthy instances: the healthy fraction is below the protection threshold (503)."""

    problem = "protection-threshold-reached"

    def __init__(self, service: str, healthy: int, total: int, threshold: float) -> None:
        super().__init__(
            f"too few healthy instances of service {service}: {healthy}/{total} healthy "
            f"is below the protection threshold {threshold:.0%}"
        )
        self.service = service
        self.healthy = healthy
        self.total = total
        self.threshold = threshold
        self.extra = {
            "service": service,
            "healthy": healthy,
            "total": total,
            "protection_threshold": threshold,
        }


class CheckKind(StrEnum):
    HTTP = "http"
    TCP = "tcp"
    TTL = "ttl"


class CheckOutcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    TIMEOUT = "timeout"


class HealthState(StrEnum):
    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"


def outcome_of_http_status(status_code: int) -> CheckOutcome:
    """HTTP checks expect a 2xx answer; anything else is a failure."""
    return CheckOutcome.SUCCESS if 200 <= status_code < 300 else CheckOutcome.FAILURE


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheck:
    """How an instance's health is established. Durations are in seconds.

    For TTL checks ``interval`` is the TTL (the heartbeat deadline) and
    ``timeout`` is unused.
    """

    kind: CheckKind
    interval: float
    timeout: float = 0.0
    deregister_critical_after: float = DEFAULT_DEREGISTER_CRITICAL_AFTER
    http_path: str | None = None
    failures_before_critical: int = DEFAULT_FAILURES_BEFORE_CRITICAL

    @classmethod
    def http(
        cls,
        path: str = "/health",
        *,
        interval: float = DEFAULT_CHECK_INTERVAL,
        timeout: float = DEFAULT_CHECK_TIMEOUT,
        deregister_critical_after: float = DEFAULT_DEREGISTER_CRITICAL_AFTER,
        failures_before_critical: int = DEFAULT_FAILURES_BEFORE_CRITICAL,
    ) -> HealthCheck:
        return cls(
            kind=CheckKind.HTTP,
            http_path=path,
            interval=interval,
            timeout=timeout,
            deregister_critical_after=deregister_critical_after,
            failures_before_critical=failures_before_critical,
        )

    @classmethod
    def tcp(
        cls,
        *,
        interval: float = DEFAULT_CHECK_INTERVAL,
        timeout: float = DEFAULT_CHECK_TIMEOUT,
        deregister_critical_after: float = DEFAULT_DEREGISTER_CRITICAL_AFTER,
        failures_before_critical: int = DEFAULT_FAILURES_BEFORE_CRITICAL,
    ) -> HealthCheck:
        return cls(
            kind=CheckKind.TCP,
            interval=interval,
            timeout=timeout,
            deregister_critical_after=deregister_critical_after,
            failures_before_critical=failures_before_critical,
        )

    @classmethod
    def ttl_heartbeat(
        cls,
        ttl: float = DEFAULT_TTL,
        *,
        deregister_critical_after: float = DEFAULT_DEREGISTER_CRITICAL_AFTER,
    ) -> HealthCheck:
        return cls(
            kind=CheckKind.TTL,
            interval=ttl,
            deregister_critical_after=deregister_critical_after,
        )

    @property
    def is_active(self) -> bool:
        """Active checks are probes run by the registry (HTTP, TCP)."""
        return self.kind is not CheckKind.TTL

    def problems(self, prefix: str = "check") -> list[FieldError]:
        """Every failing field of this check, with field names under ``prefix``."""
        found = [*self._timing_problems(), *self._path_problems()]
        return [FieldError(f"{prefix}.{name}", message) for name, message in found]

    def _timing_problems(self) -> list[tuple[str, str]]:
        found = []
        if self.interval <= 0:
            found.append(("interval", "must be positive"))
        if self.deregister_critical_after <= 0:
            found.append(("deregister_critical_after", "must be positive"))
        if not self.is_active:
            return found
        if self.timeout <= 0:
            found.append(("timeout", "must be positive"))
        if self.interval <= self.timeout:
            found.append(("interval", "must be greater than the timeout"))
        if self.failures_before_critical < 1:
            found.append(("failures_before_critical", "must be at least 1"))
        return found

    def _path_problems(self) -> list[tuple[str, str]]:
        if self.kind is CheckKind.HTTP:
            if not self.http_path or not self.http_path.startswith("/"):
                return [("http_path", "an HTTP check needs a path starting with '/'")]
        elif self.http_path is not None:
            return [("http_path", f"only HTTP checks have a path, not {self.kind} checks")]
        return []


@dataclass(frozen=True, slots=True)
class InstanceHealthChanged:
    """Domain event: an instance moved from one health state to another."""

    service: str
    instance_id: str
    previous: HealthState
    current: HealthState
    at: datetime
    reason: str


@dataclass(eq=False, kw_only=True)
class ServiceInstance:
    """One registered instance of a service, together with its health.

    Construction validates every field and raises :class:`InvalidInstance`
    listing all failures. Identity is ``(service, instance_id)``; see
    :attr:`qualified_id`.
    """

    service: str
    instance_id: str
    address: str
    port: int
    registered_at: datetime
    check: HealthCheck = field(default_factory=HealthCheck.tcp)
    version: str = ""
    zone: str = ""
    tags: Sequence[str] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    weight: int = DEFAULT_WEIGHT
    state: HealthState = HealthState.PASSING
    consecutive_failures: int = 0
    critical_since: datetime | None = None
    last_heartbeat: datetime | None = None
    events: list[InstanceHealthChanged] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.tags = tuple(self.tags)
        self.metadata = dict(self.metadata)
        if self.check.kind is CheckKind.TTL and self.last_heartbeat is None:
            self.last_heartbeat = self.registered_at
        errors = instance_problems(self)
        if errors:
            raise InvalidInstance(errors)

    @property
    def qualified_id(self) -> str:
        """``service/instance_id``: unique across the whole registry."""
        return f"{self.service}/{self.instance_id}"

    # -- active checks -------------------------------------------------

    def apply_check_result(self, outcome: CheckOutcome, now: datetime) -> HealthState:
        """Apply the result of an HTTP or TCP probe and return the new state."""
        if not self.check.is_active:
            raise CheckKindMismatch(
                f"{self.qualified_id} uses a TTL check: send heartbeats, not probe results"
            )
        if outcome is CheckOutcome.SUCCESS:
            self.consecutive_failures = 0
            self._move_to(HealthState.PASSING, now, reason="check succeeded")
            return self.state
        self.consecutive_failures += 1
        reason = f"check {outcome} ({self.consecutive_failures} in a row)"
        if self.consecutive_failures >= self.check.failures_before_critical:
            self._move_to(HealthState.CRITICAL, now, reason=reason)
        else:
            self._move_to(HealthState.WARNING, now, reason=reason)
        return self.state

    # -- TTL checks ----------------------------------------------------

    def heartbeat(self, now: datetime) -> HealthState:
        """Record a TTL heartbeat: the instance is passing again."""
        if self.check.is_active:
            raise CheckKindMismatch(
                f"{self.qualified_id} uses an active {self.check.kind} check: heartbeats "
                "are only for TTL checks"
            )
        self.last_heartbeat = now
        self.consecutive_failures = 0
        self._move_to(HealthState.PASSING, now, reason="heartbeat received")
        return self.state

    def ttl_expires_at(self) -> datetime | None:
        """When the current TTL runs out; ``None`` for active checks."""
        if self.check.is_active or self.last_heartbeat is None:
            return None
        return self.last_heartbeat + timedelta(seconds=self.check.interval)

    def expired(self, now: datetime) -> bool:
        """A TTL instance whose last heartbeat is older than the TTL."""
        expires_at = self.ttl_expires_at()
        return expires_at is not None and now > expires_at

    def check_ttl(self, now: datetime) -> HealthState:
        """Turn an expired TTL instance critical (since the expiry moment)."""
        expires_at = self.ttl_expires_at()
        if expires_at is not None and now > expires_at:
            self._move_to(HealthState.CRITICAL, expires_at, reason="TTL expired")
        return self.state

    # -- queries -------------------------------------------------------

    def health_at(self, now: datetime | None = None) -> HealthState:
        """The state, taking TTL expiry into account when ``now`` is given (no mutation)."""
        if now is not None and self.expired(now):
            return HealthState.CRITICAL
        return self.state

    def is_healthy(self, now: datetime | None = None) -> bool:
        """Passing or warning (warning still receives traffic)."""
        return self.health_at(now) is not HealthState.CRITICAL

    def should_deregister(self, now: datetime) -> bool:
        """Critical for at least ``deregister_critical_after`` seconds."""
        since = self._critical_since_at(now)
        if since is None:
            return False
        return now - since >= timedelta(seconds=self.check.deregister_critical_after)

    def _critical_since_at(self, now: datetime) -> datetime | None:
        if self.state is HealthState.CRITICAL:
            return self.critical_since
        expires_at = self.ttl_expires_at()
        if expires_at is not None and now > expires_at:
            return expires_at
        return None

    def _move_to(self, new_state: HealthState, at: datetime, *, reason: str) -> None:
        previous = self.state
        if new_state is previous:
            return
        self.state = new_state
        self.critical_since = at if new_state is HealthState.CRITICAL else None
        self.events.append(
            InstanceHealthChanged(
                service=self.service,
                instance_id=self.instance_id,
                previous=previous,
                current=new_state,
                at=at,
                reason=reason,
            )
        )


def instance_problems(instance: ServiceInstance) -> list[FieldError]:
    """Every failing field of ``instance`` (empty when valid)."""
    return [
        *_identity_problems(instance),
        *_address_problems(instance.address, instance.port),
        *_label_problems(instance),
        *_metadata_problems(instance.metadata),
        *_weight_problems(instance.weight),
        *instance.check.problems(),
        *_health_problems(instance),
    ]


def _identity_problems(instance: ServiceInstance) -> list[FieldError]:
    errors = []
    if not SERVICE_NAME_PATTERN.fullmatch(instance.service):
        errors.append(FieldError("service", f"must match {SERVICE_NAME_PATTERN.pattern}"))
    if not INSTANCE_ID_PATTERN.fullmatch(instance.instance_id):
        errors.append(FieldError("instance_id", f"must match {INSTANCE_ID_PATTERN.pattern}"))
    return errors


def _address_problems(address: str, port: int) -> list[FieldError]:
    errors = []
    if not _is_host(address):
        errors.append(FieldError("address", "must be an IP address or a host name"))
    if isinstance(port, bool) or not MIN_PORT <= port <= MAX_PORT:
        errors.append(FieldError("port", f"must be between {MIN_PORT} and {MAX_PORT}"))
    return errors


def _is_host(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        labels = address.removesuffix(".").split(".")
        return 0 < len(address) <= MAX_HOSTNAME_LENGTH and all(
            HOSTNAME_LABEL_PATTERN.fullmatch(label) for label in labels
        )
    return True


def _label_problems(instance: ServiceInstance) -> list[FieldError]:
    errors = []
    if instance.version and not VERSION_PATTERN.fullmatch(instance.version):
        errors.append(FieldError("version", f"must match {VERSION_PATTERN.pattern}"))
    if instance.zone and not ZONE_PATTERN.fullmatch(instance.zone):
        errors.append(FieldError("zone", f"must match {ZONE_PATTERN.pattern}"))
    if len(instance.tags) > MAX_TAGS:
        errors.append(FieldError("tags", f"at most {MAX_TAGS} tags"))
    for index, tag in enumerate(instance.tags):
        if not TAG_PATTERN.fullmatch(tag):
            errors.append(FieldError(f"tags.{index}", f"must match {TAG_PATTERN.pattern}"))
    if len(set(instance.tags)) != len(instance.tags):
        errors.append(FieldError("tags", "must not repeat a tag"))
    return errors


def _metadata_problems(metadata: Mapping[str, str]) -> list[FieldError]:
    errors = []
    if len(metadata) > MAX_METADATA_ENTRIES:
        errors.append(
            FieldError("metadata", f"at most {MAX_METADATA_ENTRIES} entries", "too_large")
        )
    total_bytes = 0
    for key, value in metadata.items():
        if not 0 < len(key) <= MAX_METADATA_KEY_LENGTH:
            errors.append(
                FieldError(f"metadata.{key}", f"key must be 1..{MAX_METADATA_KEY_LENGTH} chars")
            )
        if len(value) > MAX_METADATA_VALUE_LENGTH:
            errors.append(
                FieldError(
                    f"metadata.{key}",
                    f"value must be at most {MAX_METADATA_VALUE_LENGTH} chars",
                    "too_large",
                )
            )
        total_bytes += len(key.encode()) + len(value.encode())
    if total_bytes > MAX_METADATA_TOTAL_BYTES:
        errors.append(
            FieldError(
                "metadata", f"must total at most {MAX_METADATA_TOTAL_BYTES} bytes", "too_large"
            )
        )
    return errors


def _weight_problems(weight: int) -> list[FieldError]:
    if isinstance(weight, bool) or not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        return [FieldError("weight", f"must be between {MIN_WEIGHT} and {MAX_WEIGHT}")]
    return []


def _health_problems(instance: ServiceInstance) -> list[FieldError]:
    errors = []
    if instance.consecutive_failures < 0:
        errors.append(FieldError("consecutive_failures", "must not be negative"))
    is_critical = instance.state is HealthState.CRITICAL
    if is_critical != (instance.critical_since is not None):
        errors.append(FieldError("critical_since", "is set exactly when the state is critical"))
    return errors


def select_instances(
    instances: Iterable[ServiceInstance],
    healthy_only: bool = True,
    tag: str | None = None,
    zone: str | None = None,
    *,
    now: datetime | None = None,
) -> list[ServiceInstance]:
    """Discovery filter, keeping the input order.

    ``healthy_only`` drops critical instances (warning ones stay, see the module
    docs); with ``now`` expired TTL instances count as critical too.
    """
    return [
        instance
        for instance in instances
        if (not healthy_only or instance.is_healthy(now))
        and (tag is None or tag in instance.tags)
        and (zone is None or instance.zone == zone)
    ]


def healthy_fraction(instances: Sequence[ServiceInstance], now: datetime | None = None) -> float:
    """Share of healthy instances (0.0 for an empty list)."""
    if not instances:
        return 0.0
    return sum(instance.is_healthy(now) for instance in instances) / len(instances)
