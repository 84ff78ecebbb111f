"""The error hierarchy, mapped once at the HTTP edge to RFC 9457 problem details.

    FleetmeshError                 base of every error a client can be told about
    ├── InvalidInput (422)         with per-field errors
    ├── NotFound (404)
    ├── Conflict (409)
    ├── PreconditionFailed (412)
    ├── Unauthorized (401)
    ├── Forbidden (403)
    ├── PayloadTooLarge (413)
    └── Overloaded (503)           with a Retry-After

Each context derives its own errors (e.g. `DeviceNotFound(NotFound)`), so the
edge needs no knowledge of the contexts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROBLEM_BASE = "https://fleetmesh.dev/problems/"


@dataclass(frozen=True, slots=True)
class FieldError:
    """One input field at fault: a JSON pointer-like location and what is wrong with it."""

    field: str
    message: str
    code: str = "invalid"

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message, "code": self.code}


class FleetmeshError(Exception):
    """An error the client can be told about, with an HTTP status and a problem type."""

    status: int = 400
    problem: str = "bad-request"
    title: str = "Bad request"

    def __init__(
        self,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []
        self.extra = extra or {}

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.problem,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = [error.as_dict() for error in self.errors]
        body.update(self.extra)
        return body


class InvalidInput(FleetmeshError):
    status = 422
    problem = "validation-error"
    title = "Invalid input"


class NotFound(FleetmeshError):
    status = 404
    problem = "not-found"
    title = "Not found"


class Conflict(FleetmeshError):
    status = 409
    problem = "conflict"
    title = "Conflict"


class PreconditionFailed(FleetmeshError):
    status = 412
    problem = "precondition-failed"
    title = "Precondition failed"


class Unauthorized(FleetmeshError):
    status = 401
    problem = "unauthorized"
    title = "Unauthorized"


class Forbidden(FleetmeshError):
    status = 403
    problem = "forbidden"
    title = "Forbidden"


class PayloadTooLarge(FleetmeshError):
    status = 413
    problem = "payload-too-large"
    title = "Payload too large"


class Unavailable(FleetmeshError):
    """Something the request needs cannot be reached now: 503 with Retry-After."""

    status = 503
    problem = "unavailable"
    title = "Service unavailable"

    def __init__(self, detail: str, *, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class Overloaded(Unavailable):
    problem = "overloaded"
    title = "Service overloaded"
