"""Subscription filters (CloudEvents Subscriptions API dialects) and event type patterns.

Filters
    A filter is a JSON object with exactly one dialect key; a list of filters means all of
    them (an empty list matches every event)::

        {"exact":  {"type": "fleetmesh.devices.registered.v1", "source": "/devices"}}
        {"prefix": {"subject": "site-7/"}}
        {"suffix": {"subject": ".jpg"}}
        {"all":    [<filter>, ...]}        # non-empty; every one matches
        {"any":    [<filter>, ...]}        # non-empty; at least one matches
        {"not":    <filter>}
        {"jmespath": "data.temp > `30`"}   # fleetmesh extension dialect

    ``exact``/``prefix``/``suffix`` take one or more attributes (all must match) and compare
    the canonical string form of the attribute (booleans ``true``/``false``, RFC 3339 times);
    an absent attribute never matches. An empty prefix or suffix therefore tests presence.
    ``sql`` (CESQL) is not supported.

    ``jmespath`` evaluates the expression over the event's JSON (structured mode) document,
    so it sees the attributes at the top level and the payload under ``data``. The event
    matches when the result is truthy in the JMESPath sense: ``false``, ``null``, ``""``,
    ``[]`` and ``{}`` are false, every number (``0`` included) is true. An expression that
    fails at run time (for example a function given the wrong type) does not match.

    Parsing reports every bad filter at once, each with the JSON Pointer of the bad part
    within the given filter (``/0/all/1/exact/Type``). Parsed filters are immutable objects
    with a ``matches(event)`` method: JMESPath expressions are compiled once.

Type patterns
    NATS-style: the type is split on ``.``; ``*`` matches exactly one token and ``>`` matches
    one or more trailing tokens (only as the last token). As in the event store, a *trailing*
    ``*`` also reads as ``>``: every built-in type ends with its version token, so
    ``fleetmesh.devices.*`` means "every devices event". A pattern without wildcards matches
    that type only.

NATS subjects
    Events travel on the subject given by :func:`fleetmesh.core.envelope.subject_for_type`
    (``events.`` plus the type without its ``fleetmesh.`` prefix, unsafe characters replaced).
    :func:`subject_filter` gives the narrowest subject filter that includes the subjects of
    every type a pattern matches (``events.>`` when the pattern starts with a wildcard).
    Different types can share a subject, so consumers still apply ``TypePattern.matches``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import jmespath
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult

from fleetmesh.core.envelope import EVENTS_SUBJECT_PREFIX, subject_for_type
from fleetmesh.core.errors import FieldError
from fleetmesh.events.cloudevents import CloudEvent
from fleetmesh.events.domain import InvalidFilter, json_pointer

ATTRIBUTE_DIALECTS = ("exact", "prefix", "suffix")
DIALECTS = ("all", "any", "exact", "jmespath", "not", "prefix", "suffix")

_ATTRIBUTE_NAME = re.compile(r"[a-z0-9]+")
_WILDCARDS = ("*", ">")
_ALL_EVENTS_SUBJECT = EVENTS_SUBJECT_PREFIX + ">"
_PLACEHOLDER = "x"

Path = tuple[str | int, ...]


class EventFilter(Protocol):
    """A compiled filter."""

    def matches(self, event: CloudEvent) -> bool:
        """Whether the event passes the filter."""


# --------------------------------------------------------------------------- filter kinds


@dataclass(frozen=True)
class ExactFilter:
    """Every listed attribute is present and equal to the value."""

    attributes: tuple[tuple[str, str], ...]

    def matches(self, event: CloudEvent) -> bool:
        present = event.attribute_strings
        return all(present.get(name) == value for name, value in self.attributes)


@dataclass(frozen=True)
class PrefixFilter:
    """Every listed attribute is present and starts with the value."""

    attributes: tuple[tuple[str, str], ...]

    def matches(self, event: CloudEvent) -> bool:
        present = event.attribute_strings
        return all(
            name in present and present[name].startswith(value) for name, value in self.attributes
        )


@dataclass(frozen=True)
class SuffixFilter:
    """Every listed attribute is present and ends with the value."""

    attributes: tuple[tuple[str, str], ...]

    def matches(self, event: CloudEvent) -> bool:
        present = event.attribute_strings
        return all(
            name in present and present[name].endswith(value) for name, value in self.attributes
        )


@dataclass(frozen=True)
class AllFilter:
    """Every nested filter matches (an empty list matches everything)."""

    filters: tuple[EventFilter, ...]

    def matches(self, event: CloudEvent) -> bool:
        return all(nested.matches(event) for nested in self.filters)


@dataclass(frozen=True)
class AnyFilter:
    """At least one nested filter matches."""

    filters: tuple[EventFilter, ...]

    def matches(self, event: CloudEvent) -> bool:
        return any(nested.matches(event) for nested in self.filters)


@dataclass(frozen=True)
class NotFilter:
    """The nested filter does not match."""

    filter: EventFilter

    def matches(self, event: CloudEvent) -> bool:
        return not self.filter.matches(event)


@dataclass(frozen=True)
class JmesPathFilter:
    """A JMESPath expression over the event document evaluates truthy."""

    expression: str
    compiled: ParsedResult

    def matches(self, event: CloudEvent) -> bool:
        try:
            result = self.compiled.search(event.document)
        except JMESPathError:
            return False
        return _jmespath_truthy(result)


def _jmespath_truthy(value: object) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, str | list | dict):
        return len(value) > 0
    return True


# --------------------------------------------------------------------------- parsing


def parse_filter(spec: object) -> EventFilter:
    """Parse and validate one filter; raise :class:`InvalidFilter` listing every bad part."""
    parser = _FilterParser()
    parsed = parser.parse(spec, ())
    parser.raise_if_failed()
    return parsed


def parse_filters(specs: object) -> EventFilter:
    """Parse a list of filters that must all match; paths start with the list index."""
    parser = _FilterParser()
    parsed = parser.parse_list(specs, (), allow_empty=True)
    parser.raise_if_failed()
    return AllFilter(parsed)


class _FilterParser:
    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def fail(self, path: Path, message: str) -> None:
        self.errors.append(FieldError(json_pointer(path), message))

    def raise_if_failed(self) -> None:
        if self.errors:
            raise InvalidFilter(self.errors)

    def parse(self, spec: object, path: Path) -> EventFilter:
        if not isinstance(spec, Mapping) or len(spec) != 1:
            self.fail(path, "a filter must be an object with exactly one dialect key")
            return AllFilter(())
        ((dialect, argument),) = spec.items()
        where = (*path, str(dialect))
        if dialect in ATTRIBUTE_DIALECTS:
            return self.parse_attributes(dialect, argument, where)
        if dialect in ("all", "any"):
            nested = self.parse_list(argument, where, allow_empty=False)
            return AllFilter(nested) if dialect == "all" else AnyFilter(nested)
        if dialect == "not":
            return NotFilter(self.parse(argument, where))
        if dialect == "jmespath":
            return self.parse_jmespath(argument, where)
        if dialect == "sql":
            self.fail(where, "the CloudEvents SQL dialect is not supported; use jmespath")
        else:
            self.fail(where, f"unknown filter dialect; expected one of {', '.join(DIALECTS)}")
        return AllFilter(())

    def parse_list(
        self, specs: object, path: Path, *, allow_empty: bool
    ) -> tuple[EventFilter, ...]:
        if not isinstance(specs, list):
            self.fail(path, "must be an array of filters")
            return ()
        if not specs and not allow_empty:
            self.fail(path, "must list at least one filter")
        return tuple(self.parse(spec, (*path, index)) for index, spec in enumerate(specs))

    def parse_attributes(self, dialect: str, argument: object, path: Path) -> EventFilter:
        if not isinstance(argument, Mapping) or not argument:
            self.fail(path, "must be an object mapping at least one attribute to a string")
            return AllFilter(())
        pairs = tuple(
            (str(name), value)
            for name, value in argument.items()
            if self.check_attribute(name, value, (*path, str(name)))
        )
        if dialect == "exact":
            return ExactFilter(pairs)
        return PrefixFilter(pairs) if dialect == "prefix" else SuffixFilter(pairs)

    def check_attribute(self, name: object, value: object, path: Path) -> bool:
        if not isinstance(name, str) or not _ATTRIBUTE_NAME.fullmatch(name):
            self.fail(path, "attribute names use only lowercase letters a-z and digits 0-9")
            return False
        if name == "data":
            self.fail(path, "data is not an attribute; filter on it with the jmespath dialect")
            return False
        if not isinstance(value, str):
            self.fail(path, "the value must be a string")
            return False
        return True

    def parse_jmespath(self, expression: object, path: Path) -> EventFilter:
        if not isinstance(expression, str) or not expression.strip():
            self.fail(path, "must be a non-empty JMESPath expression")
            return AllFilter(())
        try:
            compiled = jmespath.compile(expression)
        except JMESPathError as error:
            self.fail(path, f"invalid JMESPath expression: {error}")
            return AllFilter(())
        return JmesPathFilter(expression, compiled)


# --------------------------------------------------------------------------- type patterns


@dataclass(frozen=True)
class TypePattern:
    """A NATS-style event type pattern (see the module docstring)."""

    pattern: str
    regex: re.Pattern[str]

    @classmethod
    def parse(cls, pattern: str) -> TypePattern:
        """Validate and compile a pattern; raise :class:`InvalidFilter` when it is malformed."""
        problem = type_pattern_problem(pattern)
        if problem is not None:
            raise InvalidFilter([FieldError("", problem)])
        return cls(pattern, _compile_pattern(_tokens(pattern)))

    def matches(self, event_type: str) -> bool:
        """Whether the event type matches the pattern."""
        return self.regex.fullmatch(event_type) is not None

    @property
    def subject_filter(self) -> str:
        """The narrowest NATS subject filter covering every matching type."""
        return subject_filter(self.pattern)


def type_pattern_problem(pattern: object) -> str | None:
    """Why the text is not a valid type pattern, or ``None`` when it is."""
    if not isinstance(pattern, str) or not pattern:
        return "a type pattern must be a non-empty string"
    if any(character.isspace() for character in pattern):
        return "a type pattern must not contain whitespace"
    tokens = pattern.split(".")
    if "" in tokens:
        return "a type pattern must not contain empty tokens"
    for index, token in enumerate(tokens):
        if token not in _WILDCARDS and any(wildcard in token for wildcard in _WILDCARDS):
            return "'*' and '>' must stand alone as whole tokens"
        if token == ">" and index != len(tokens) - 1:
            return "'>' may only be the last token"
    return None


def _tokens(pattern: str) -> list[str]:
    tokens = pattern.split(".")
    if tokens[-1] == "*":
        tokens[-1] = ">"
    return tokens


def _compile_pattern(tokens: Sequence[str]) -> re.Pattern[str]:
    pieces = {"*": r"[^.]*", ">": r".*"}
    return re.compile(r"\.".join(pieces.get(token, re.escape(token)) for token in tokens))


def subject_filter(pattern: str) -> str:
    """The NATS subject filter over ``events.>`` that covers every type the pattern matches."""
    problem = type_pattern_problem(pattern)
    if problem is not None:
        raise InvalidFilter([FieldError("", problem)])
    tokens = _tokens(pattern)
    placeholders = [_PLACEHOLDER if token in _WILDCARDS else token for token in tokens]
    subject_tokens = subject_for_type(".".join(placeholders)).split(".")[1:]
    pattern_tokens = tokens[len(tokens) - len(subject_tokens) :]
    if tokens[0] in _WILDCARDS:
        return _ALL_EVENTS_SUBJECT
    merged = (
        token if token in _WILDCARDS else subject_token
        for token, subject_token in zip(pattern_tokens, subject_tokens, strict=True)
    )
    return EVENTS_SUBJECT_PREFIX + ".".join(merged)


@dataclass(frozen=True)
class SubscriptionFilter:
    """What a subscription receives: any of its type patterns, then all of its filters."""

    type_patterns: tuple[TypePattern, ...]
    filter: EventFilter

    def matches(self, event: CloudEvent) -> bool:
        """Whether the event is delivered to the subscription."""
        type_ok = not self.type_patterns or any(
            pattern.matches(event.type) for pattern in self.type_patterns
        )
        return type_ok and self.filter.matches(event)

    @property
    def subject_filters(self) -> tuple[str, ...]:
        """Distinct NATS subject filters to consume (``events.>`` when no pattern is given)."""
        if not self.type_patterns:
            return (_ALL_EVENTS_SUBJECT,)
        return tuple(dict.fromkeys(pattern.subject_filter for pattern in self.type_patterns))


def parse_subscription(type_patterns: Iterable[object], filters: object) -> SubscriptionFilter:
    """Validate a subscription's type patterns and filters together.

    Errors point at ``/types/<i>`` and ``/filters/<i>/...``; an empty pattern list means every
    type.
    """
    errors: list[FieldError] = []
    patterns: list[TypePattern] = []
    for index, pattern in enumerate(type_patterns):
        problem = type_pattern_problem(pattern)
        if problem is None and isinstance(pattern, str):
            patterns.append(TypePattern.parse(pattern))
        else:
            errors.append(FieldError(json_pointer(("types", index)), problem or "invalid"))
    parser = _FilterParser()
    compiled = parser.parse_list(filters, ("filters",), allow_empty=True)
    errors.extend(parser.errors)
    if errors:
        raise InvalidFilter(errors)
    return SubscriptionFilter(tuple(patterns), AllFilter(compiled))
