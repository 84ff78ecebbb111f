"""HTTP API of the service registry: registration, heartbeats, discovery and watches.

Discovery is a Consul-style blocking query: `GET .../instances?index=N&wait=30s`
answers at once when the service's index (the highest KV revision of its keys,
sent as `X-Fleetmesh-Index`) is above N, else when it changes or the wait runs
out. `GET .../watch` is the same as a Server-Sent Events stream.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from fleetmesh.core.auth import Operator, Role
from fleetmesh.core.errors import FieldError, InvalidInput
from fleetmesh.core.http import require_role
from fleetmesh.registry.domain import (
    DEFAULT_CHECK_INTERVAL,
    DEFAULT_CHECK_TIMEOUT,
    DEFAULT_DEREGISTER_CRITICAL_AFTER,
    DEFAULT_FAILURES_BEFORE_CRITICAL,
    DEFAULT_TTL,
    DEFAULT_WEIGHT,
    CheckKind,
    HealthCheck,
    HealthState,
)
from fleetmesh.registry.repository import RegistryView
from fleetmesh.registry.service import (
    Discovery,
    RegisterInstance,
    RegistryQueries,
    RegistryService,
    public_document,
)

INDEX_HEADER = "X-Fleetmesh-Index"
DEFAULT_WAIT_S = 30.0
MAX_WAIT_S = 300.0
SSE_KEEPALIVE_S = 15.0
_WAIT = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}

Strict = ConfigDict(extra="forbid")


def parse_wait(text: str | None) -> float:
    """`30s`, `500ms`, `2m` or plain seconds; at most five minutes."""
    if text is None or text == "":
        return DEFAULT_WAIT_S
    match = _WAIT.fullmatch(text.strip())
    if match is None:
        raise InvalidInput(
            "`wait` is a duration such as 30s, 500ms or 2m.",
            errors=[FieldError("wait", "not a duration", "invalid")],
        )
    return min(MAX_WAIT_S, float(match.group(1)) * _UNITS[match.group(2)])


class CheckIn(BaseModel):
    model_config = Strict
    kind: CheckKind = CheckKind.TCP
    http_path: str | None = Field(default=None, max_length=1024)
    interval: float | None = Field(default=None, description="Seconds; the TTL for TTL checks.")
    timeout: float = DEFAULT_CHECK_TIMEOUT
    ttl: float | None = Field(default=None, description="Alias of `interval` for TTL checks.")
    deregister_critical_after: float = DEFAULT_DEREGISTER_CRITICAL_AFTER
    failures_before_critical: int = DEFAULT_FAILURES_BEFORE_CRITICAL

    def to_domain(self) -> HealthCheck:
        if self.kind is CheckKind.TTL:
            return HealthCheck.ttl_heartbeat(
                self.ttl or self.interval or DEFAULT_TTL,
                deregister_critical_after=self.deregister_critical_after,
            )
        return HealthCheck(
            kind=self.kind,
            interval=self.interval or DEFAULT_CHECK_INTERVAL,
            timeout=self.timeout,
            deregister_critical_after=self.deregister_critical_after,
            http_path=(self.http_path or "/health") if self.kind is CheckKind.HTTP else None,
            failures_before_critical=self.failures_before_critical,
        )


class InstanceIn(BaseModel):
    model_config = Strict
    instance_id: str | None = Field(
        default=None, max_length=128, description="Default: `address:port`."
    )
    address: str = Field(max_length=253)
    port: int
    version: str = Field(default="", max_length=64)
    zone: str = Field(default="", max_length=63)
    tags: list[str] = Field(default_factory=list, max_length=64)
    metadata: dict[str, str] = Field(default_factory=dict)
    weight: int = DEFAULT_WEIGHT
    check: CheckIn = Field(default_factory=CheckIn)

    def to_command(self, service: str) -> RegisterInstance:
        return RegisterInstance(
            service=service,
            instance_id=self.instance_id,
            address=self.address,
            port=self.port,
            version=self.version,
            zone=self.zone,
            tags=tuple(self.tags),
            metadata=self.metadata,
            weight=self.weight,
            check=self.check.to_domain(),
        )


class CheckOut(BaseModel):
    kind: CheckKind
    interval: float
    timeout: float | None = None
    deregister_critical_after: float
    failures_before_critical: int | None = None
    http_path: str | None = None


class HealthOut(BaseModel):
    state: HealthState
    consecutive_failures: int
    critical_since: datetime | None
    last_heartbeat: datetime | None
    last_check_at: datetime | None
    output: str


class InstanceOut(BaseModel):
    service: str
    instance_id: str
    address: str
    port: int
    version: str
    zone: str
    tags: list[str]
    metadata: dict[str, str]
    weight: int
    check: CheckOut
    registered_at: datetime
    health: HealthOut
    revision: int


class DiscoveryOut(BaseModel):
    service: str
    index: int
    instances: list[InstanceOut]

    @classmethod
    def of(cls, found: Discovery) -> DiscoveryOut:
        return cls(
            service=found.service,
            index=found.index,
            instances=[InstanceOut.model_validate(doc) for doc in found.instances],
        )


class ServiceSummary(BaseModel):
    name: str
    instances: int
    passing: int
    warning: int
    critical: int
    index: int


class ServicesOut(BaseModel):
    services: list[ServiceSummary]


def create_router(
    *, service: RegistryService, queries: RegistryQueries, view: RegistryView
) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["registry"])
    viewer = Depends(require_role(Role.viewer))
    operator = require_role(Role.operator)

    @router.post("/services/{name}/instances", status_code=201)
    async def register_instance(
        name: str, body: InstanceIn, response: Response, _: Operator = Depends(operator)
    ) -> InstanceOut:
        """Register (or replace) an instance once its health check passes."""
        registered = await service.register(body.to_command(name))
        record = registered.record
        response.status_code = 200 if registered.replaced else 201
        response.headers["Location"] = (
            f"/api/v1/services/{name}/instances/{record.instance.instance_id}"
        )
        document = public_document(record, None, queries.clock.now())
        return InstanceOut.model_validate(document)

    @router.get("/services", dependencies=[viewer])
    async def list_services() -> ServicesOut:
        """Every service with its instance counts by health."""
        return ServicesOut(services=[ServiceSummary(**row) for row in queries.summary()])

    @router.get("/services/{name}/instances", dependencies=[viewer])
    async def discover(
        name: str,
        response: Response,
        healthy: bool = True,
        tag: Annotated[str | None, Query(max_length=64)] = None,
        zone: Annotated[str | None, Query(max_length=63)] = None,
        index: Annotated[int | None, Query(ge=0)] = None,
        wait: Annotated[str | None, Query(max_length=16)] = None,
    ) -> DiscoveryOut:
        """Instances of a service (healthy only by default; critical ones never then)."""
        if index is not None:
            await view.wait_for_change(name, index, parse_wait(wait))
        found = queries.discover(name, healthy=healthy, tag=tag, zone=zone)
        response.headers[INDEX_HEADER] = str(found.index)
        return DiscoveryOut.of(found)

    @router.get("/services/{name}/instances/{instance_id}", dependencies=[viewer])
    async def get_instance(name: str, instance_id: str) -> InstanceOut:
        return InstanceOut.model_validate(queries.instance(name, instance_id))

    @router.put(
        "/services/{name}/instances/{instance_id}/heartbeat", dependencies=[Depends(operator)]
    )
    async def heartbeat(name: str, instance_id: str) -> InstanceOut:
        """A TTL heartbeat: the instance is passing until the TTL runs out again."""
        record = await service.heartbeat(name, instance_id)
        view_record = view.get(record.key) or record
        document = public_document(
            view_record, view.last_heartbeat(record.key), queries.clock.now()
        )
        return InstanceOut.model_validate(document)

    @router.delete("/services/{name}/instances/{instance_id}")
    async def deregister(
        name: str, instance_id: str, who: Operator = Depends(operator)
    ) -> dict[str, Any]:
        """Remove an instance now (404 if unknown)."""
        removed = await service.deregister(name, instance_id, reason=f"deregistered by {who.name}")
        return {
            "service": removed.service,
            "instance_id": removed.instance_id,
            "deregistered": True,
        }

    @router.get("/services/{name}/watch", dependencies=[viewer])
    async def watch(
        name: str,
        healthy: bool = True,
        tag: Annotated[str | None, Query(max_length=64)] = None,
        zone: Annotated[str | None, Query(max_length=63)] = None,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> StreamingResponse:
        """Server-Sent Events: an `instances` event with the service's instances on every change."""
        start = int(last_event_id) if last_event_id and last_event_id.isdigit() else -1

        def snapshot() -> tuple[int, str]:
            found = queries.discover(name, healthy=healthy, tag=tag, zone=zone)
            body = DiscoveryOut.of(found).model_dump_json()
            return found.index, f"event: instances\nid: {found.index}\ndata: {body}\n\n"

        return StreamingResponse(
            sse_stream(view, name, start, snapshot),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router


async def sse_stream(
    view: RegistryView,
    service: str,
    last_sent: int,
    snapshot: Callable[[], tuple[int, str]],
) -> AsyncIterator[str]:
    """Send a snapshot whenever the index moves; a comment line keeps idle connections open."""
    yield "retry: 1000\n\n"
    while not view.closed:
        if last_sent < 0 or view.index(service) != last_sent:
            last_sent, event = snapshot()
            yield event
        index = await view.wait_for_change(service, last_sent, SSE_KEEPALIVE_S)
        if index == last_sent and not view.closed:
            yield ": keepalive\n\n"
