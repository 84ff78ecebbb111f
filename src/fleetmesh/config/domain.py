"""Configuration center domain: versioned JSON entries with optional JSON Schema.

Pure domain logic: no I/O; time is passed in as an aware ``datetime``.

Behaviour
---------
* An entry is identified by :class:`ConfigRef` (namespace, service, key); the
  namespace is the environment and defaults to ``default``.
* Every change appends a new :class:`ConfigVersion` (1, 2, 3, ...) with author,
  time and comment. History is complete, never capped or compacted. Setting
  the same value again is still a change (a new version).
* Rollback to version k appends a new version whose value equals version k's,
  with the comment ``rollback to vK`` (plus ``: <reason>`` when one is given).
  The value is validated against the *current* schema, so a rollback can be
  refused with :class:`SchemaViolation`. Rolling back to a deletion is refused
  (use :meth:`ConfigEntry.delete`).
* Deleting is a version too: a tombstone (``deleted=True``, value ``None``).
  A deleted entry has no value; a later ``set`` revives it with a new version.
  Tombstones keep version numbers monotonic, which is what lets clients
  (:class:`ConfigCache`) tell an old value from a deletion.
* Optimistic concurrency: ``set``, ``rollback`` and ``delete`` accept
  ``expected_version`` (``0`` means "the entry must not have any version yet");
  on mismatch they raise :class:`VersionConflict` and change nothing.
* The JSON Schema (Draft 2020-12) is per entry, checked against the meta-schema
  when set, and every new value is validated against it; errors carry JSON
  Pointer paths, e.g. ``/retry/max_attempts: 0 is less than the minimum of 1``.
  Setting a schema the current value does not satisfy is refused. Schema
  changes are not value versions; they record :class:`ConfigSchemaChanged`.
  Remote ``$ref`` are never fetched.
* Every value version records a :class:`ConfigChanged` event in ``events``.
* Errors derive from :mod:`fleetmesh.core.errors`: invalid input (422, with
  per-path ``errors``), not found (404), :class:`VersionConflict` (409).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol, TypeAlias

import referencing
import referencing.exceptions
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing.jsonschema import DRAFT202012

from fleetmesh.core.errors import Conflict, FieldError, InvalidInput, NotFound

JsonValue: TypeAlias = (
    None | bool | int | float | str | Sequence["JsonValue"] | Mapping[str, "JsonValue"]
)
JsonSchema: TypeAlias = Mapping[str, JsonValue] | bool

DEFAULT_NAMESPACE = "default"
NAME_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,62}")
# Dot-separated segments, none empty: the key is part of the KV key `<ns>.<service>.<key>`.
KEY_PATTERN = re.compile(r"(?=.{1,128}\Z)[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")
MAX_AUTHOR_LENGTH = 128
MAX_COMMENT_LENGTH = 1024
DRAFT_2020_12_URIS = frozenset(
    {
        "https://json-schema.org/draft/2020-12/schema",
        "https://json-schema.org/draft/2020-12/schema#",
    }
)
DEFAULT_STALE_AFTER = 30.0


SCHEMA_ERROR_CODE = "schema"
NOT_JSON_CODE = "not_json"


def describe_errors(errors: Iterable[FieldError]) -> str:
    """``/path: message; ...`` with the document root shown as ``/``."""
    return "; ".join(f"{error.field or '/'}: {error.message}" for error in errors)


class InvalidConfigRef(InvalidInput):
    problem = "invalid-config-ref"

    def __init__(self, errors: Sequence[FieldError]) -> None:
        super().__init__("invalid config reference: " + describe_errors(errors), errors=[*errors])


class InvalidChange(InvalidInput):
    """The author or comment of a change is not acceptable."""

    problem = "invalid-config-change"


class InvalidValue(InvalidInput):
    """The value is not JSON (NaN, a set, a non-string object key, ...)."""

    problem = "invalid-config-value"

    def __init__(self, path: str, message: str) -> None:
        error = FieldError(path, message, NOT_JSON_CODE)
        super().__init__("value is not JSON: " + describe_errors([error]), errors=[error])


class InvalidSchema(InvalidInput):
    """The schema itself is not a valid Draft 2020-12 JSON Schema; paths point into it."""

    problem = "invalid-json-schema"

    def __init__(self, errors: Sequence[FieldError]) -> None:
        super().__init__("invalid JSON Schema: " + describe_errors(errors), errors=[*errors])


class SchemaViolation(InvalidInput):
    """A value does not satisfy the entry's schema; ``errors`` lists every failure."""

    problem = "config-schema-violation"

    def __init__(self, ref: ConfigRef, errors: Sequence[FieldError]) -> None:
        detail = f"{ref} violates its schema: " + describe_errors(errors)
        super().__init__(detail, errors=[*errors])
        self.ref = ref


class VersionConflict(Conflict):
    """Optimistic concurrency: the entry is not at the version the writer expected."""

    problem = "config-version-conflict"

    def __init__(self, current: int, expected: int) -> None:
        super().__init__(
            f"version conflict: expected version {expected}, current is {current}",
            extra={"current_version": current, "expected_version": expected},
        )
        self.current = current
        self.expected = expected


class UnknownVersion(NotFound):
    problem = "config-version-not-found"

    def __init__(self, ref: ConfigRef, version: int) -> None:
        super().__init__(f"{ref} has no version {version}")
        self.ref = ref
        self.version = version


class CannotRollbackToDeletion(Conflict):
    """Version k is a tombstone; delete the entry instead."""

    problem = "config-rollback-to-deletion"


class ConfigNotFound(NotFound):
    """The entry has no value: never set, or deleted."""

    problem = "config-not-found"


class ChangeKind(StrEnum):
    SET = "set"
    ROLLBACK = "rollback"
    DELETE = "delete"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigRef:
    """Identity of an entry: namespace (environment), service and key."""

    namespace: str = DEFAULT_NAMESPACE
    service: str
    key: str

    def __post_init__(self) -> None:
        errors = []
        if not NAME_PATTERN.fullmatch(self.namespace):
            errors.append(FieldError("namespace", f"must match {NAME_PATTERN.pattern}"))
        if not NAME_PATTERN.fullmatch(self.service):
            errors.append(FieldError("service", f"must match {NAME_PATTERN.pattern}"))
        if not KEY_PATTERN.fullmatch(self.key):
            errors.append(FieldError("key", f"must match {KEY_PATTERN.pattern}"))
        if errors:
            raise InvalidConfigRef(errors)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service}/{self.key}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigVersion:
    """One immutable version of an entry. The value is stored as JSON text."""

    version: int
    kind: ChangeKind
    value_json: str | None
    author: str
    at: datetime
    comment: str = ""

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError("versions start at 1")
        if self.deleted != (self.value_json is None):
            raise ValueError("a version has no value exactly when it is a deletion")

    @property
    def deleted(self) -> bool:
        return self.kind is ChangeKind.DELETE

    @property
    def value(self) -> JsonValue:
        """A fresh copy of the value (``None`` for a tombstone)."""
        return None if self.value_json is None else _decode(self.value_json)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigChanged:
    """Domain event: a new version of an entry (set, rollback or deletion)."""

    namespace: str
    service: str
    key: str
    version: int
    kind: ChangeKind
    value: JsonValue
    deleted: bool
    author: str
    at: datetime
    comment: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigSchemaChanged:
    """Domain event: the entry's schema was set (``schema``) or removed (``None``)."""

    namespace: str
    service: str
    key: str
    schema: JsonSchema | None
    author: str
    at: datetime


ConfigEvent: TypeAlias = ConfigChanged | ConfigSchemaChanged


@dataclass(eq=False, kw_only=True)
class ConfigEntry:
    """Aggregate: the versioned value of one configuration key."""

    ref: ConfigRef
    events: list[ConfigEvent] = field(default_factory=list, init=False, repr=False)
    _versions: list[ConfigVersion] = field(default_factory=list, init=False, repr=False)
    _schema_json: str | None = field(default=None, init=False, repr=False)

    @classmethod
    def create(cls, *, service: str, key: str, namespace: str = DEFAULT_NAMESPACE) -> ConfigEntry:
        """A new entry with no version yet."""
        return cls(ref=ConfigRef(namespace=namespace, service=service, key=key))

    @classmethod
    def from_history(
        cls,
        ref: ConfigRef,
        versions: Iterable[ConfigVersion],
        schema: JsonSchema | None = None,
    ) -> ConfigEntry:
        """Rebuild a stored entry (no events). Versions must be 1..n in order."""
        entry = cls(ref=ref)
        entry._versions = list(versions)
        numbers = [version.version for version in entry._versions]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"{ref}: versions must be numbered 1..n in order, got {numbers}")
        if schema is not None:
            entry._schema_json = _encode(schema)
        return entry

    # -- queries -------------------------------------------------------

    @property
    def current_version(self) -> int:
        """The latest version number, 0 before the first change."""
        return len(self._versions)

    @property
    def exists(self) -> bool:
        """Has a value: set at least once and not deleted since."""
        return bool(self._versions) and not self._versions[-1].deleted

    @property
    def value(self) -> JsonValue:
        """A copy of the current value; :class:`ConfigNotFound` if never set or deleted."""
        if not self.exists:
            raise ConfigNotFound(f"{self.ref} has no value")
        return self._versions[-1].value

    @property
    def schema(self) -> JsonSchema | None:
        if self._schema_json is None:
            return None
        decoded = _decode(self._schema_json)
        if isinstance(decoded, bool | Mapping):
            return decoded
        raise ValueError(f"{self.ref}: the stored schema is neither an object nor a boolean")

    def history(self) -> tuple[ConfigVersion, ...]:
        """Every version, oldest first."""
        return tuple(self._versions)

    def get_version(self, version: int) -> ConfigVersion:
        if not 1 <= version <= len(self._versions):
            raise UnknownVersion(self.ref, version)
        return self._versions[version - 1]

    def validate(self, value: JsonValue) -> list[FieldError]:
        """Schema failures ``value`` would cause (empty when it would be accepted)."""
        _check_json(value)
        schema = self.schema
        return [] if schema is None else schema_violations(schema, value)

    # -- commands ------------------------------------------------------

    def set(
        self,
        value: JsonValue,
        *,
        author: str,
        now: datetime,
        comment: str = "",
        expected_version: int | None = None,
    ) -> ConfigVersion:
        """Store a new value as a new version."""
        self._check_expected(expected_version)
        value_json = self._accept(value)
        return self._append(ChangeKind.SET, value_json, author=author, at=now, comment=comment)

    def rollback(
        self,
        to_version: int,
        *,
        author: str,
        now: datetime,
        reason: str = "",
        expected_version: int | None = None,
    ) -> ConfigVersion:
        """A new version carrying version ``to_version``'s value."""
        self._check_expected(expected_version)
        target = self.get_version(to_version)
        if target.value_json is None:
            raise CannotRollbackToDeletion(f"{self.ref} v{to_version} is a deletion")
        value_json = self._accept(target.value)
        comment = f"rollback to v{to_version}" + (f": {reason}" if reason else "")
        return self._append(ChangeKind.ROLLBACK, value_json, author=author, at=now, comment=comment)

    def delete(
        self,
        *,
        author: str,
        now: datetime,
        comment: str = "",
        expected_version: int | None = None,
    ) -> ConfigVersion:
        """Append a tombstone version."""
        self._check_expected(expected_version)
        if not self.exists:
            raise ConfigNotFound(f"{self.ref} has no value to delete")
        return self._append(ChangeKind.DELETE, None, author=author, at=now, comment=comment)

    def set_schema(self, schema: JsonSchema | None, *, author: str, now: datetime) -> None:
        """Set (or remove, with ``None``) the schema; the current value must satisfy it."""
        _check_author(author)
        if schema is not None:
            _check_json(schema)
            problems = schema_problems(schema)
            if problems:
                raise InvalidSchema(problems)
            if self.exists:
                violations = schema_violations(schema, self.value)
                if violations:
                    raise SchemaViolation(self.ref, violations)
        self._schema_json = None if schema is None else _encode(schema)
        self.events.append(
            ConfigSchemaChanged(
                namespace=self.ref.namespace,
                service=self.ref.service,
                key=self.ref.key,
                schema=self.schema,
                author=author,
                at=now,
            )
        )

    # -- internals -----------------------------------------------------

    def _check_expected(self, expected_version: int | None) -> None:
        if expected_version is not None and expected_version != self.current_version:
            raise VersionConflict(current=self.current_version, expected=expected_version)

    def _accept(self, value: JsonValue) -> str:
        violations = self.validate(value)
        if violations:
            raise SchemaViolation(self.ref, violations)
        return _encode(value)

    def _append(
        self, kind: ChangeKind, value_json: str | None, *, author: str, at: datetime, comment: str
    ) -> ConfigVersion:
        _check_author(author)
        if len(comment) > MAX_COMMENT_LENGTH:
            raise InvalidChange(f"comment must be at most {MAX_COMMENT_LENGTH} characters")
        version = ConfigVersion(
            version=self.current_version + 1,
            kind=kind,
            value_json=value_json,
            author=author,
            at=at,
            comment=comment,
        )
        self._versions.append(version)
        self.events.append(
            ConfigChanged(
                namespace=self.ref.namespace,
                service=self.ref.service,
                key=self.ref.key,
                version=version.version,
                kind=kind,
                value=version.value,
                deleted=version.deleted,
                author=author,
                at=at,
                comment=comment,
            )
        )
        return version


# -- JSON and JSON Schema helpers --------------------------------------


def _check_author(author: str) -> None:
    if not author.strip() or len(author) > MAX_AUTHOR_LENGTH:
        raise InvalidChange(f"author must be 1..{MAX_AUTHOR_LENGTH} non-blank characters")


def _check_json(value: object, path: str = "") -> None:
    """Raise :class:`InvalidValue` naming the first non-JSON part of ``value``."""
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidValue(path, f"{value} is not a finite number")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidValue(path, f"object key {key!r} is not a string")
            _check_json(item, f"{path}/{_escape_pointer(key)}")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json(item, f"{path}/{index}")
        return
    raise InvalidValue(path, f"{type(value).__name__} is not a JSON type")


def _encode(value: object) -> str:
    _check_json(value)
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _decode(text: str) -> JsonValue:
    decoded: JsonValue = json.loads(text)
    return decoded


def _escape_pointer(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _pointer(parts: Iterable[str | int]) -> str:
    return "".join(f"/{_escape_pointer(str(part))}" for part in parts)


def _sorted_errors(errors: Iterable[ValidationError]) -> list[FieldError]:
    found = {
        FieldError(_pointer(error.absolute_path), error.message, SCHEMA_ERROR_CODE)
        for error in errors
    }
    return sorted(found, key=lambda error: (error.field, error.message))


def _validator(schema: JsonSchema) -> Draft202012Validator:
    # An empty registry: "$ref" resolves inside the schema only, nothing is fetched.
    return Draft202012Validator(
        schema,
        registry=referencing.Registry(),
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


def schema_problems(schema: JsonSchema) -> list[FieldError]:
    """Why ``schema`` is not a valid Draft 2020-12 schema (empty when it is)."""
    if isinstance(schema, Mapping):
        declared = schema.get("$schema")
        if declared is not None and declared not in DRAFT_2020_12_URIS:
            message = "only Draft 2020-12 schemas are supported"
            return [FieldError("/$schema", message, SCHEMA_ERROR_CODE)]
    meta = Draft202012Validator(Draft202012Validator.META_SCHEMA)
    problems = _sorted_errors(meta.iter_errors(schema))
    return problems or _reference_problems(schema)


_NOT_SUBSCHEMAS = frozenset({"const", "enum", "default", "examples"})
_REFERENCE_KEYWORDS = ("$ref", "$dynamicRef")


def _reference_problems(schema: JsonSchema) -> list[FieldError]:
    """References that do not resolve inside the schema (nothing is ever fetched)."""
    if not isinstance(schema, Mapping):
        return []
    root = DRAFT202012.create_resource(schema)
    base_uri = root.id() or ""
    registry: referencing.Registry[JsonValue] = referencing.Registry().with_resource(base_uri, root)
    problems: list[FieldError] = []
    start: JsonValue = schema
    pending = [(start, "", registry.resolver(base_uri=base_uri))]
    while pending:
        node, path, resolver = pending.pop()
        if isinstance(node, list | tuple):
            pending.extend((item, f"{path}/{index}", resolver) for index, item in enumerate(node))
            continue
        if not isinstance(node, Mapping):
            continue
        if path and isinstance(node.get("$id"), str):
            resolver = resolver.in_subresource(DRAFT202012.create_resource(node))
        for keyword in _REFERENCE_KEYWORDS:
            reference = node.get(keyword)
            if isinstance(reference, str) and not _resolves(resolver.lookup, reference):
                problems.append(
                    FieldError(
                        f"{path}/{_escape_pointer(keyword)}",
                        f"{reference!r} does not resolve inside the schema "
                        "(remote references are not fetched)",
                        SCHEMA_ERROR_CODE,
                    )
                )
        pending.extend(
            (child, f"{path}/{_escape_pointer(name)}", resolver)
            for name, child in node.items()
            if name not in _NOT_SUBSCHEMAS
        )
    return sorted(problems, key=lambda problem: problem.field)


def _resolves(lookup: Callable[[str], object], reference: str) -> bool:
    try:
        lookup(reference)
    except referencing.exceptions.Unresolvable:
        return False
    return True


def schema_violations(schema: JsonSchema, value: JsonValue) -> list[FieldError]:
    """Every failure of ``value`` against ``schema``, sorted by JSON Pointer path."""
    try:
        return _sorted_errors(_validator(schema).iter_errors(value))
    except referencing.exceptions.Unresolvable as error:
        problem = FieldError("", f"unresolvable reference: {error}", SCHEMA_ERROR_CODE)
        raise InvalidSchema([problem]) from error


# -- client-side cache -------------------------------------------------


class VersionedChange(Protocol):
    """What a change notification carries; :class:`ConfigChanged` is one."""

    @property
    def namespace(self) -> str:
        """The entry's namespace."""

    @property
    def service(self) -> str:
        """The entry's service."""

    @property
    def key(self) -> str:
        """The entry's key."""

    @property
    def version(self) -> int:
        """The version this change created."""

    @property
    def value(self) -> JsonValue:
        """The new value (ignored for a deletion)."""

    @property
    def deleted(self) -> bool:
        """Whether this change is a deletion."""


@dataclass(frozen=True, slots=True)
class CachedConfig:
    """A last-known version of an entry held by :class:`ConfigCache`."""

    version: int
    value_json: str | None

    @property
    def deleted(self) -> bool:
        return self.value_json is None

    @property
    def value(self) -> JsonValue:
        return None if self.value_json is None else _decode(self.value_json)


class ConfigCache:
    """Client-side last-known configuration, safe against duplicate and late notifications.

    A change is applied only if its version is newer than the cached one, so
    applying the same notifications in any order, any number of times, ends in
    the same state: the highest version of each entry. Deletions are kept as
    tombstones so an older value arriving late cannot resurrect the entry.

    The cache keeps serving its values when the config center is unreachable;
    it is *stale* when it has not heard from the center (a notification, a
    snapshot or :meth:`mark_reachable`) for more than ``stale_after`` seconds.
    """

    def __init__(self, *, stale_after: float = DEFAULT_STALE_AFTER) -> None:
        if stale_after <= 0:
            raise ValueError("stale_after must be positive")
        self.stale_after = stale_after
        self.last_contact: datetime | None = None
        self._entries: dict[ConfigRef, CachedConfig] = {}

    def apply(self, change: VersionedChange, *, now: datetime) -> bool:
        """Apply one notification; True if it was newer and changed the cache."""
        self.mark_reachable(now)
        ref = ConfigRef(namespace=change.namespace, service=change.service, key=change.key)
        if change.version <= self.version_of(ref):
            return False
        value_json = None if change.deleted else _encode(change.value)
        self._entries[ref] = CachedConfig(version=change.version, value_json=value_json)
        return True

    def apply_all(self, changes: Iterable[VersionedChange], *, now: datetime) -> int:
        """Apply a batch (e.g. a snapshot); returns how many changed the cache."""
        self.mark_reachable(now)
        return sum(self.apply(change, now=now) for change in changes)

    def mark_reachable(self, now: datetime) -> None:
        """Record contact with the config center (e.g. a successful poll with no news)."""
        if self.last_contact is None or now > self.last_contact:
            self.last_contact = now

    def is_stale(self, now: datetime) -> bool:
        if self.last_contact is None:
            return True
        return now - self.last_contact > timedelta(seconds=self.stale_after)

    def lookup(self, ref: ConfigRef) -> CachedConfig | None:
        """The cached version, tombstones included; ``None`` if never seen."""
        return self._entries.get(ref)

    def get(self, ref: ConfigRef, default: JsonValue = None) -> JsonValue:
        """The cached value, or ``default`` if unknown or deleted."""
        cached = self._entries.get(ref)
        if cached is None or cached.deleted:
            return default
        return cached.value

    def version_of(self, ref: ConfigRef) -> int:
        """The cached version, 0 if never seen (to ask the center for anything newer)."""
        cached = self._entries.get(ref)
        return 0 if cached is None else cached.version

    def known_versions(self) -> dict[ConfigRef, int]:
        return {ref: cached.version for ref, cached in self._entries.items()}
