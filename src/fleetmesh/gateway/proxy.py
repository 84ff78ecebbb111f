"""The distributed gateway: forwards each API request to a healthy instance of its owner.

A request whose connection attempt fails is retried on the next instance (it
never reached a service); a request that failed after it was sent is retried
only when it is idempotent: by its method, or because it carries an
`Idempotency-Key`. With no healthy instance left the answer is 503 with
`Retry-After`, as problem+json; so is a path no known route matches while the
routes of some service are not known yet (a gateway that just started), since
only a complete table can say 404.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fleetmesh.core.errors import PROBLEM_BASE
from fleetmesh.core.http import PROBLEM_JSON
from fleetmesh.gateway.routes import RouteTable

_DEVICE_IN_PATH = re.compile(r"/devices/([^/:]+)")
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


class InstancePicker(Protocol):
    """Healthy instances of a service, in the order to try them."""

    def candidates(self, service: str, *, key: str | None = None) -> list[str]:
        """Base URLs (`http://host:port`), best first; empty when none is healthy."""


def _problem(status: int, title: str, detail: str, *, retry_after: int | None = None) -> Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    body = {
        "type": PROBLEM_BASE + title.lower().replace(" ", "-"),
        "title": title,
        "status": status,
        "detail": detail,
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def _may_repeat(request: Request) -> bool:
    return request.method in IDEMPOTENT or "idempotency-key" in request.headers


class Forwarder:
    """Forwards one request along the candidates of its owning service."""

    def __init__(
        self,
        routes: RouteTable,
        picker: InstancePicker,
        *,
        client: httpx.AsyncClient | None = None,
        on_forward: Callable[[str, str, int], None] | None = None,
        services: Sequence[str] = (),
    ) -> None:
        self.routes = routes
        self.picker = picker
        self.services = list(services)
        self.client = client or httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=2.0))
        self.on_forward = on_forward

    async def __call__(self, request: Request) -> Response:
        service = self.routes.owner(request.method, request.url.path)
        if service is None:
            return self._no_route(request)
        device = _DEVICE_IN_PATH.search(request.url.path)
        candidates = self.picker.candidates(service, key=device.group(1) if device else None)
        if not candidates:
            return _problem(
                503, "Service unavailable", f"No healthy instance of {service}.", retry_after=1
            )
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        last_error = "no attempt"
        for base in candidates:
            try:
                upstream = await self.client.request(
                    request.method,
                    base + request.url.path,
                    params=str(request.query_params),
                    content=body,
                    headers=headers,
                )
            except httpx.ConnectError as error:
                last_error = repr(error)
                continue
            except httpx.TransportError as error:
                last_error = repr(error)
                if _may_repeat(request):
                    continue
                return _problem(502, "Bad gateway", f"{service} failed mid-request: {error!r}")
            if self.on_forward is not None:
                self.on_forward(service, base, upstream.status_code)
            return Response(
                upstream.content,
                status_code=upstream.status_code,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP},
            )
        return _problem(
            503,
            "Service unavailable",
            f"Every instance of {service} failed: {last_error}",
            retry_after=1,
        )

    def missing_services(self) -> list[str]:
        """The services whose routes are not known yet."""
        known = set(self.routes.services)
        return [service for service in self.services if service not in known]

    def _no_route(self, request: Request) -> Response:
        missing = self.missing_services()
        if missing:
            return _problem(
                503,
                "Service unavailable",
                f"The routes of {', '.join(missing)} are not known yet.",
                retry_after=1,
            )
        return _problem(404, "Not found", f"No service serves {request.method} {request.url.path}.")
