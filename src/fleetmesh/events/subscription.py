"""Subscriptions: where matching events go, and how they are delivered (pure Python).

Endpoints
    ``http://`` or ``https://`` URLs (webhooks), or ``nats:<subject>``: a NATS subject of
    plain tokens (``[A-Za-z0-9_-]``, no wildcards). Subjects the platform uses itself
    (``events.``, ``telemetry.``, ``devices.``, ``rpc.``, ``$...``, ``_INBOX``...) are refused,
    so a subscription can neither loop events back into the event store nor talk to devices.
    Whether a webhook host may be reached (the SSRF guard) is decided at the edge, by
    resolving it: see :mod:`fleetmesh.events.guard`.

Delivery options
    ``timeout_s`` per HTTP request; ``retry`` (a :class:`~fleetmesh.events.domain.RetryPolicy`,
    or ``None`` to follow the live default ``events/webhook_retry`` of the configuration
    center); ``ordered``: one delivery at a time, in stream order (so per CloudEvents subject
    too); ``batch_size`` > 1 sends up to that many events per request in the CloudEvents
    batched content mode; ``max_in_flight``: concurrent requests of an unordered subscription.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

from fleetmesh.core.errors import FieldError, NotFound
from fleetmesh.events.domain import RetryPolicy, ValidationFailed
from fleetmesh.events.filters import SubscriptionFilter, parse_subscription

NATS_SCHEME = "nats:"
MAX_URL_LENGTH = 2048
RESERVED_SUBJECT_ROOTS = frozenset(
    {
        "events",
        "eventbus",
        "telemetry",
        "devices",
        "device",
        "status",
        "routing",
        "dlq",
        "rpc",
        "config",
        "registry",
        "analytics",
        "mqtt",
    }
)
_SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


class InvalidSubscription(ValidationFailed):
    """A subscription's endpoint or delivery options are malformed."""

    summary = "The subscription is not valid."


class SubscriptionNotFound(NotFound):
    """No subscription has this id."""


class SubscriptionStatus(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"


@dataclass(frozen=True)
class Endpoint:
    """Where deliveries go: a webhook URL or a NATS subject."""

    url: str
    host: str | None = None
    port: int | None = None
    subject: str | None = None

    @property
    def is_nats(self) -> bool:
        return self.subject is not None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Validate an endpoint; raise :class:`InvalidSubscription` when it is malformed."""
        problem = _endpoint_problem(text)
        if problem is not None:
            raise InvalidSubscription([FieldError("endpoint", problem)])
        if text.startswith(NATS_SCHEME):
            return cls(url=text, subject=text[len(NATS_SCHEME) :])
        parts = urlsplit(text)
        default_port = 443 if parts.scheme == "https" else 80
        return cls(url=text, host=parts.hostname, port=parts.port or default_port)


def _endpoint_problem(text: str) -> str | None:
    if not text or len(text) > MAX_URL_LENGTH:
        return f"must be 1 to {MAX_URL_LENGTH} characters"
    if any(character.isspace() for character in text):
        return "must not contain whitespace"
    if text.startswith(NATS_SCHEME):
        return _subject_problem(text[len(NATS_SCHEME) :])
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as error:
        return f"is not a valid URL: {error}"
    if parts.scheme not in ("http", "https"):
        return "must be an http(s) URL or nats:<subject>"
    if not parts.hostname:
        return "the URL has no host"
    return None


def _subject_problem(subject: str) -> str | None:
    tokens = subject.split(".")
    if not subject or not all(_SUBJECT_TOKEN.fullmatch(token) for token in tokens):
        return "nats:<subject> needs a subject of tokens [A-Za-z0-9_-] separated by '.'"
    if tokens[0] in RESERVED_SUBJECT_ROOTS or tokens[0].startswith(("_", "$")):
        return f"subjects under {tokens[0]!r} are reserved for the platform"
    return None


@dataclass(frozen=True)
class DeliveryOptions:
    timeout_s: float = 10.0
    retry: RetryPolicy | None = None
    ordered: bool = False
    batch_size: int = 1
    max_in_flight: int = 8

    @property
    def max_ack_pending(self) -> int:
        """Messages the consumer may hand out before acks: one unit at a time when ordered."""
        return self.batch_size if self.ordered else 10_000

    @property
    def capacity(self) -> int:
        """Messages a worker holds on their way to the endpoint (queued or being sent).

        Unordered: twice what the requests in flight carry, so the next
        requests are ready when one ends. Events whose outcome waits to be
        written are not counted (the worker bounds those on its own).
        """
        if self.ordered:
            return self.batch_size
        return self.max_in_flight * self.batch_size * 2


@dataclass
class Subscription:
    """An endpoint with the event types and filters it receives."""

    id: str
    endpoint: Endpoint
    secret: str
    types: tuple[str, ...] = ()
    filters: list[Any] = field(default_factory=list)
    name: str | None = None
    options: DeliveryOptions = field(default_factory=DeliveryOptions)
    status: SubscriptionStatus = SubscriptionStatus.ACTIVE
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @cached_property
    def matcher(self) -> SubscriptionFilter:
        return parse_subscription(self.types, self.filters)

    @property
    def consumer_name(self) -> str:
        return consumer_name(self.id)

    @property
    def is_active(self) -> bool:
        return self.status is SubscriptionStatus.ACTIVE


def consumer_name(subscription_id: str) -> str:
    """The durable JetStream consumer of a subscription."""
    return f"sub_{subscription_id}"


def retry_policy_from(value: object, fallback: RetryPolicy) -> RetryPolicy:
    """A retry policy from a JSON object (missing fields from ``fallback``)."""
    if not isinstance(value, dict):
        return fallback
    known = ("max_attempts", "base_delay", "max_delay", "multiplier")
    fields = {name: value.get(name, getattr(fallback, name)) for name in known}
    return RetryPolicy(**fields)


def retry_policy_dict(policy: RetryPolicy) -> dict[str, Any]:
    return {
        "max_attempts": policy.max_attempts,
        "base_delay": policy.base_delay,
        "max_delay": policy.max_delay,
        "multiplier": policy.multiplier,
    }
