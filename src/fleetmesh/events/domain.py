"""Pure domain of the event bus: errors, event type names, contracts, retry policy.

The other pure modules of this context build on this one:

* :mod:`fleetmesh.events.cloudevents` -- CloudEvents 1.0 envelopes (structured and HTTP binary),
* :mod:`fleetmesh.events.compatibility` -- JSON Schema compatibility between contract versions,
* :mod:`fleetmesh.events.filters` -- subscription filters, type patterns and NATS subjects,
* :mod:`fleetmesh.events.signing` -- Standard Webhooks signatures,
* :mod:`fleetmesh.events.asyncapi` -- AsyncAPI 3.0 documents generated from contracts.

Event type names
    Built-in event types are named ``fleetmesh.<context>.<event>.v<N>`` (for example
    ``fleetmesh.devices.registered.v1``); the whole ``fleetmesh.`` namespace is reserved for
    them. Any other non-empty string is a valid user type. The ``v<N>`` suffix is the *major*
    version of the event: a breaking change publishes a new type. A :class:`Contract`
    ``version`` is the revision of the schema of one type, checked for compatibility against
    the earlier revisions.

Contracts
    The JSON Schema of a contract's ``data`` must be a valid Draft 2020-12 schema whose
    ``$ref`` are all local (``#...``) and resolvable: contracts are self-contained, so
    validating data never fetches anything. ``validate_data`` asserts ``format`` (``date-time``
    always, formats whose checks need optional packages when those are installed) and caches
    one compiled validator per distinct schema.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import cached_property, lru_cache
from typing import Any, Protocol

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.protocols import Validator
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from fleetmesh.core.errors import Conflict, FieldError, InvalidInput, Unauthorized

JsonSchema = Mapping[str, Any] | bool

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
BUILTIN_NAMESPACE = "fleetmesh"

_BUILTIN_TYPE = re.compile(
    r"fleetmesh\.(?P<context>[a-z][a-z0-9_]*)\.(?P<name>[a-z][a-z0-9_]*)\.v(?P<major>[1-9][0-9]*)"
)
_RFC3339 = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[Tt ](?P<clock>\d{2}:\d{2}:\d{2})(?P<fraction>\.\d+)?"
    r"(?P<offset>[Zz]|[+-]\d{2}:\d{2})"
)
_NON_SCHEMA_VALUES = frozenset({"enum", "const", "default", "examples"})
_CONTRACT_BASE_URI = "urn:fleetmesh:contract"


# --------------------------------------------------------------------------- errors
# The errors derive from the shared kernel's hierarchy, so the HTTP edge maps them to
# problem details (422 with per-field errors, 409, 401) without knowing this context.


class ValidationFailed(InvalidInput):
    """Input was rejected; ``errors`` lists every failing field, not just the first."""

    summary = "Invalid input."

    def __init__(self, errors: Iterable[FieldError | tuple[str, str]]) -> None:
        field_errors = [
            error if isinstance(error, FieldError) else FieldError(*error) for error in errors
        ]
        details = "; ".join(f"{error.field or '(root)'}: {error.message}" for error in field_errors)
        super().__init__(f"{self.summary} {details}", errors=field_errors)


class InvalidCloudEvent(ValidationFailed):
    """A CloudEvent envelope violates CloudEvents 1.0."""

    summary = "The CloudEvent is not valid."


class InvalidContract(ValidationFailed):
    """An event contract is malformed (bad type name, version or schema)."""

    summary = "The event contract is not valid."


class InvalidFilter(ValidationFailed):
    """A subscription filter or type pattern is malformed; fields are JSON Pointers."""

    summary = "The subscription filter is not valid."


class InvalidRetryPolicy(ValidationFailed):
    """A retry policy has out-of-range settings."""

    summary = "The retry policy is not valid."


class InvalidWebhookSecret(ValidationFailed):
    """A webhook secret is empty or not ``whsec_<base64>``."""

    summary = "The webhook secret is not valid."


class ContractConflict(Conflict):
    """A candidate contract does not fit the existing versions (other type, stale version)."""


class SignatureVerificationFailed(Unauthorized):
    """A webhook signature is missing, malformed, stale or does not match."""


# --------------------------------------------------------------------------- event types


@dataclass(frozen=True)
class BuiltinEventType:
    """The parts of a built-in type name ``fleetmesh.<context>.<name>.v<major>``."""

    context: str
    name: str
    major: int

    def __str__(self) -> str:
        return f"{BUILTIN_NAMESPACE}.{self.context}.{self.name}.v{self.major}"


def parse_builtin_type(event_type: str) -> BuiltinEventType | None:
    """Split a built-in type name into its parts; ``None`` for user (or malformed) types."""
    match = _BUILTIN_TYPE.fullmatch(event_type)
    if match is None:
        return None
    return BuiltinEventType(match["context"], match["name"], int(match["major"]))


def is_reserved_type(event_type: str) -> bool:
    """Whether the name lies in the namespace reserved for built-in types."""
    return event_type == BUILTIN_NAMESPACE or event_type.startswith(BUILTIN_NAMESPACE + ".")


def event_type_problem(event_type: object) -> str | None:
    """Why ``event_type`` is not a valid event type name, or ``None`` when it is."""
    if not isinstance(event_type, str):
        return "must be a string"
    if not event_type:
        return "must not be empty"
    if is_reserved_type(event_type) and parse_builtin_type(event_type) is None:
        return (
            "types in the reserved 'fleetmesh.' namespace must be named "
            "fleetmesh.<context>.<event>.v<N> (lowercase letters, digits and '_')"
        )
    return None


def parse_time(text: str) -> datetime | None:
    """Parse an RFC 3339 timestamp (offset required); ``None`` if the text is not one."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    fraction = (match["fraction"] or "")[:7]
    offset = "+00:00" if match["offset"] in ("Z", "z") else match["offset"]
    try:
        return datetime.fromisoformat(f"{match['date']}T{match['clock']}{fraction}{offset}")
    except ValueError:
        return None


# --------------------------------------------------------------------------- contracts


class CompatibilityMode(StrEnum):
    """Schema registry compatibility modes, with Confluent's meanings."""

    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"
    NONE = "NONE"

    @property
    def checks_backward(self) -> bool:
        """New readers must read data written with the earlier schema(s)."""
        return self.value.startswith(("BACKWARD", "FULL"))

    @property
    def checks_forward(self) -> bool:
        """Earlier readers must read data written with the new schema."""
        return self.value.startswith(("FORWARD", "FULL"))

    @property
    def transitive(self) -> bool:
        """Check against every earlier version instead of only the latest."""
        return self.value.endswith("_TRANSITIVE")


@dataclass(frozen=True)
class Contract:
    """The published promise about one event type: the schema of its ``data`` and more.

    Instances are validated on creation and raise :class:`InvalidContract` listing every
    problem. Treat ``schema`` as immutable: compiled validators are cached by its content.
    """

    event_type: str
    version: int
    schema: JsonSchema
    publisher: str
    description: str = ""
    compatibility: CompatibilityMode = CompatibilityMode.BACKWARD

    def __post_init__(self) -> None:
        mode = _coerce_mode(self.compatibility)
        if mode is not None:
            object.__setattr__(self, "compatibility", mode)
        errors = list(_contract_errors(self, mode_is_valid=mode is not None))
        if errors:
            raise InvalidContract(errors)

    @cached_property
    def fingerprint(self) -> str:
        """Canonical JSON of the schema: equal schemas share one fingerprint."""
        return canonical_json(self.schema)

    @property
    def builtin(self) -> BuiltinEventType | None:
        """The parts of the type name when it is a built-in type."""
        return parse_builtin_type(self.event_type)


def canonical_json(value: object) -> str:
    """Deterministic compact JSON (sorted keys) used as a cache key and for equality."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _coerce_mode(value: object) -> CompatibilityMode | None:
    if isinstance(value, CompatibilityMode):
        return value
    if isinstance(value, str) and value in CompatibilityMode.__members__:
        return CompatibilityMode(value)
    return None


def _contract_errors(contract: Contract, *, mode_is_valid: bool) -> Iterator[FieldError]:
    type_problem = event_type_problem(contract.event_type)
    if type_problem is not None:
        yield FieldError("event_type", type_problem)
    version = contract.version
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        yield FieldError("version", "must be an integer >= 1")
    if not isinstance(contract.publisher, str) or not contract.publisher.strip():
        yield FieldError("publisher", "must be a non-empty string")
    if not isinstance(contract.description, str):
        yield FieldError("description", "must be a string")
    if not mode_is_valid:
        allowed = ", ".join(CompatibilityMode.__members__)
        yield FieldError("compatibility", f"must be one of {allowed}")
    yield from _schema_errors(contract.schema)


def _schema_errors(schema: object) -> Iterator[FieldError]:
    if not isinstance(schema, Mapping | bool):
        yield FieldError("schema", "must be a JSON object or a boolean")
        return
    try:
        fingerprint = canonical_json(schema)
    except (TypeError, ValueError) as error:
        yield FieldError("schema", f"is not JSON serialisable: {error}")
        return
    yield from _schema_errors_cached(fingerprint)


@lru_cache(maxsize=1024)
def _schema_errors_cached(fingerprint: str) -> tuple[FieldError, ...]:
    schema = json.loads(fingerprint)
    declared = schema.get("$schema", DRAFT_2020_12) if isinstance(schema, dict) else DRAFT_2020_12
    if not isinstance(declared, str) or declared.rstrip("#") != DRAFT_2020_12:
        return (FieldError("schema/$schema", f"must be {DRAFT_2020_12!r} (got {declared!r})"),)
    meta = Draft202012Validator(
        Draft202012Validator.META_SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    errors = [
        FieldError(_pointer("schema", error.absolute_path), error.message)
        for error in meta.iter_errors(schema)
    ]
    return tuple(errors) if errors else tuple(_reference_errors(schema))


def _reference_errors(schema: object) -> Iterator[FieldError]:
    resolver = _registry_for(schema).resolver(base_uri=_CONTRACT_BASE_URI)
    for location, reference in _references(schema, ("schema",)):
        if not reference.startswith("#"):
            yield FieldError(location, f"only local references are allowed, got {reference!r}")
            continue
        try:
            resolver.lookup(reference)
        except Unresolvable:
            yield FieldError(location, f"unresolvable reference {reference!r}")


def _references(node: object, path: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and isinstance(value, str):
                yield _pointer(path[0], (*path[1:], key)), value
            elif key not in _NON_SCHEMA_VALUES:
                yield from _references(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _references(item, (*path, str(index)))


def _registry_for(schema: object) -> Registry[Any]:
    resource = DRAFT202012.create_resource(schema)
    registry: Registry[Any] = Registry().with_resource(_CONTRACT_BASE_URI, resource)
    return registry


def _pointer(prefix: str, parts: Iterable[object]) -> str:
    escaped = (str(part).replace("~", "~0").replace("/", "~1") for part in parts)
    return "/".join((prefix, *escaped)) if prefix else "".join("/" + part for part in escaped)


def json_pointer(parts: Iterable[object]) -> str:
    """RFC 6901 JSON Pointer for a path; the empty string points at the root."""
    return _pointer("", parts)


def validate_data(contract: Contract, data: object) -> list[FieldError]:
    """Every violation of the contract schema by ``data``.

    Fields are JSON Pointers into ``data``; codes name the failing JSON Schema keyword.
    """
    validator = _compiled_validator(contract.fingerprint)
    errors = (
        FieldError(json_pointer(error.absolute_path), error.message, str(error.validator))
        for error in validator.iter_errors(data)
    )
    return sorted(errors, key=lambda error: (error.field, error.message))


def schema_validator(root: JsonSchema, subschema: object) -> Validator:
    """A validator for a part of a schema, resolving references against the whole document."""
    return _compiled_validator(canonical_json(root)).evolve(schema=subschema)


def _data_format_checker() -> FormatChecker:
    """jsonschema's format checks, with ``date-time`` checked without optional packages."""
    checker = FormatChecker()

    @checker.checks("date-time")
    def is_date_time(instance: object) -> bool:
        return not isinstance(instance, str) or parse_time(instance) is not None

    return checker


_DATA_FORMAT_CHECKER = _data_format_checker()


@lru_cache(maxsize=512)
def _compiled_validator(fingerprint: str) -> Draft202012Validator:
    schema = json.loads(fingerprint)
    return Draft202012Validator(
        schema, registry=_registry_for(schema), format_checker=_DATA_FORMAT_CHECKER
    )


# --------------------------------------------------------------------------- retry policy


class RandomSource(Protocol):
    """Anything with ``random()`` drawing uniformly from [0, 1), e.g. ``random.Random``."""

    def random(self) -> float:
        """Return the next float in [0, 1)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for webhook and consumer deliveries.

    ``max_attempts`` counts every delivery attempt, the first included. The delay before
    attempt ``n + 1`` is drawn uniformly from ``[0, min(max_delay, base_delay * multiplier **
    (n - 1)))`` ("full jitter").
    """

    max_attempts: int = 8
    base_delay: float = 1.0
    max_delay: float = 300.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        errors = list(_retry_policy_errors(self))
        if errors:
            raise InvalidRetryPolicy(errors)


def _retry_policy_errors(policy: RetryPolicy) -> Iterator[FieldError]:
    attempts = policy.max_attempts
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        yield FieldError("max_attempts", "must be an integer >= 1")
    for name in ("base_delay", "max_delay"):
        value = getattr(policy, name)
        if not _is_finite_number(value) or value < 0:
            yield FieldError(name, "must be a finite number >= 0")
    if not _is_finite_number(policy.multiplier) or policy.multiplier < 1:
        yield FieldError("multiplier", "must be a finite number >= 1")


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def backoff_ceiling(attempt: int, policy: RetryPolicy) -> float:
    """The largest delay after failed attempt number ``attempt`` (1-based)."""
    if attempt < 1:
        raise ValueError("attempt numbers start at 1")
    if policy.base_delay == 0:
        return 0.0
    try:
        raw = policy.base_delay * policy.multiplier ** (attempt - 1)
    except OverflowError:
        return float(policy.max_delay)
    return float(min(policy.max_delay, raw))


def delay_for(attempt: int, policy: RetryPolicy, rng: RandomSource) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based), with full jitter."""
    return rng.random() * backoff_ceiling(attempt, policy)


def next_retry_delay(attempts_made: int, policy: RetryPolicy, rng: RandomSource) -> float | None:
    """Delay before the next attempt, or ``None`` once ``max_attempts`` have been made."""
    if attempts_made >= policy.max_attempts:
        return None
    return delay_for(attempts_made, policy, rng)
