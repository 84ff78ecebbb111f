"""HTTP edge helpers shared by every context's router.

Errors become RFC 9457 problem details here, once; authentication turns the
`Authorization` header into a principal; pagination cursors are opaque.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetmesh.core.auth import ApiKeyStore, DevicePrincipal, DeviceVerifier, Operator, Role
from fleetmesh.core.errors import (
    PROBLEM_BASE,
    FieldError,
    FleetmeshError,
    Forbidden,
    InvalidInput,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
)
from fleetmesh.core.logging import get_logger
from fleetmesh.core.metrics import Metrics

log = get_logger(__name__)

PROBLEM_JSON = "application/problem+json"


def problem_response(error: FleetmeshError, request: Request | None = None) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(error, Unavailable):
        headers["Retry-After"] = str(error.retry_after_s)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="fleetmesh", Basic realm="fleetmesh-devices"'
    instance = request.url.path if request is not None else None
    return JSONResponse(
        error.to_problem(instance),
        status_code=error.status,
        headers=headers,
        media_type=PROBLEM_JSON,
    )


def _field_name(location: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(part) for part in location if part not in ("body",)]
    return ".".join(parts) or "body"


def _validation_problem(error: RequestValidationError) -> InvalidInput:
    fields: list[FieldError] = []
    for item in error.errors():
        kind = str(item.get("type", "invalid"))
        if kind == "json_invalid":
            return InvalidInput(
                "The request body is not valid JSON: " + str(item.get("ctx", {}).get("error", "")),
                errors=[FieldError("body", "malformed JSON", "json_invalid")],
            )
        fields.append(FieldError(_field_name(item.get("loc", ())), str(item.get("msg")), kind))
    return InvalidInput("The request has invalid fields.", errors=fields)


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to problem+json; never a stack trace, never a 500 for bad input."""

    async def on_fleetmesh_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, FleetmeshError)
        return problem_response(error, request)

    async def on_validation_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        return problem_response(_validation_problem(error), request)

    async def on_http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        problem = FleetmeshError(str(error.detail))
        problem.status = error.status_code
        problem.title = str(error.detail)
        problem.problem = {404: "not-found", 405: "method-not-allowed"}.get(
            error.status_code, "http-error"
        )
        response = problem_response(problem, request)
        for name, value in (error.headers or {}).items():
            response.headers[name] = value
        return response

    async def on_unexpected(request: Request, error: Exception) -> Response:
        log.exception("unhandled_error", path=request.url.path, error=repr(error))
        body = {
            "type": PROBLEM_BASE + "internal-error",
            "title": "Internal error",
            "status": 500,
            "detail": "The server failed to answer this request; it has been logged.",
        }
        return JSONResponse(body, status_code=500, media_type=PROBLEM_JSON)

    app.add_exception_handler(FleetmeshError, on_fleetmesh_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


class BodySizeLimit:
    """Refuse request bodies above a limit with 413, counting streamed bytes too."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLarge(f"The request body is larger than {self.max_bytes} bytes.")
        response = JSONResponse(
            error.to_problem(scope.get("path")), status_code=413, media_type=PROBLEM_JSON
        )
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class AssumeJson:
    """Treat a request body sent without a Content-Type as JSON (curl's default is a form)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = list(scope.get("headers", []))
            names = {name.lower() for name, _ in headers}
            if b"content-type" not in names or self._is_curl_form(headers):
                kept = [(n, v) for n, v in headers if n.lower() != b"content-type"]
                scope = {**scope, "headers": [*kept, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)

    @staticmethod
    def _is_curl_form(headers: list[tuple[bytes, bytes]]) -> bool:
        content_type = dict(headers).get(b"content-type", b"")
        return content_type == b"application/x-www-form-urlencoded"


def install_metrics_middleware(app: FastAPI, metrics: Metrics) -> None:
    app.add_middleware(RequestMetrics, metrics=metrics)


class RequestMetrics:
    """Counts requests and times them to the start of the response, per route template.

    A plain ASGI middleware: Starlette's `BaseHTTPMiddleware` runs every
    request in an extra task with wrapped streams, which cost more CPU than
    most endpoints themselves.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._observe(scope, message["status"], time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, timed_send)

    def _observe(self, scope: Scope, status: int, elapsed: float) -> None:
        template = getattr(scope.get("route"), "path", "unmatched")
        method = scope["method"]
        self.metrics.http_requests.labels(method, template, str(status)).inc()
        self.metrics.http_latency.labels(method, template).observe(elapsed)


@dataclass
class Authenticator:
    """Turns an `Authorization` header into an operator or a device."""

    keys: ApiKeyStore
    devices: DeviceVerifier | None = None

    async def principal(self, request: Request) -> Operator | DevicePrincipal:
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and credentials:
            operator = await self.keys.authenticate(credentials.strip())
            if operator is None:
                raise Unauthorized("The API key is unknown or revoked.")
            return operator
        if scheme == "basic" and credentials:
            return await self._device(credentials.strip())
        raise Unauthorized("Send an operator API key as `Authorization: Bearer <key>`.")

    async def _device(self, credentials: str) -> DevicePrincipal:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("Malformed Basic credentials.") from None
        device_id, _, secret = decoded.partition(":")
        if self.devices is None or not await self.devices.verify_device(device_id, secret):
            raise Unauthorized("The device credentials are not valid.")
        return DevicePrincipal(device_id)


def authenticator(request: Request) -> Authenticator:
    auth = getattr(request.app.state, "authenticator", None)
    if not isinstance(auth, Authenticator):
        raise RuntimeError("the app was built without an authenticator")
    return auth


def require_role(minimum: Role) -> Callable[[Request], Awaitable[Operator]]:
    """A dependency: an operator key of at least this role."""

    async def dependency(request: Request) -> Operator:
        principal = await authenticator(request).principal(request)
        if not isinstance(principal, Operator):
            raise Forbidden("This endpoint needs an operator API key.")
        if principal.role < minimum:
            raise Forbidden(
                f"This needs the {minimum.name} role; the key has {principal.role.name}."
            )
        return principal

    return dependency


def require_device_or_role(
    minimum: Role,
) -> Callable[[Request], Awaitable[Operator | DevicePrincipal]]:
    """A dependency: the device's own credentials, or an operator key of at least this role."""

    async def dependency(request: Request) -> Operator | DevicePrincipal:
        principal = await authenticator(request).principal(request)
        if isinstance(principal, Operator) and principal.role < minimum:
            raise Forbidden(
                f"This needs the {minimum.name} role; the key has {principal.role.name}."
            )
        return principal

    return dependency


def encode_cursor(position: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(position, separators=(",", ":")).encode()).decode()


def decode_cursor(cursor: str | None) -> dict[str, Any] | None:
    if not cursor:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidInput(
            "The cursor is not one this API issued.",
            errors=[FieldError("cursor", "invalid cursor")],
        ) from None
    if not isinstance(value, dict):
        raise InvalidInput(
            "The cursor is not one this API issued.",
            errors=[FieldError("cursor", "invalid cursor")],
        )
    return value
