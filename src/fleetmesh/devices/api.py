"""HTTP API of the device registry; request and response schemas live here, at the edge."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from fleetmesh.core.auth import Role
from fleetmesh.core.clock import Clock
from fleetmesh.core.http import decode_cursor, encode_cursor, require_role
from fleetmesh.devices.credentials import CredentialHasher
from fleetmesh.devices.domain import (
    MAX_BULK_DEVICES,
    Device,
    DeviceType,
    Lifecycle,
    MetricSpec,
    ValueType,
)
from fleetmesh.devices.repository import DeviceQuery
from fleetmesh.devices.service import (
    BulkFailure,
    DeviceQueries,
    RegisterDevice,
    Registration,
    UnitOfWorkFactory,
    define_device_type,
    deregister_device,
    register_device,
    register_many,
    rotate_credentials,
)

Strict = ConfigDict(extra="forbid")


class MetricSpecIn(BaseModel):
    model_config = Strict
    type: ValueType
    unit: str | None = Field(default=None, max_length=32)
    min: float | None = None
    max: float | None = None


class DeviceTypeIn(BaseModel):
    model_config = Strict
    name: str = Field(max_length=63)
    description: str = Field(default="", max_length=2000)
    capabilities: list[str] = Field(default_factory=list, max_length=100)
    telemetry_schema: dict[str, MetricSpecIn] = Field(default_factory=dict, max_length=500)
    offline_timeout_s: float | None = Field(
        default=None,
        description="Seconds without a message before the device is offline; "
        "none: the platform default (live configuration `status/offline_timeout_s`, 300 s).",
    )
    expected_interval_s: float = 60.0

    def to_domain(self) -> DeviceType:
        return DeviceType(
            name=self.name,
            description=self.description,
            capabilities=tuple(self.capabilities),
            telemetry_schema={
                metric: MetricSpec(spec.type, spec.unit, spec.min, spec.max)
                for metric, spec in self.telemetry_schema.items()
            },
            offline_timeout_s=self.offline_timeout_s,
            expected_interval_s=self.expected_interval_s,
        )


class DeviceTypeOut(BaseModel):
    name: str
    description: str
    capabilities: list[str]
    telemetry_schema: dict[str, dict[str, Any]]
    offline_timeout_s: float | None
    expected_interval_s: float

    @classmethod
    def of(cls, device_type: DeviceType) -> DeviceTypeOut:
        return cls(
            name=device_type.name,
            description=device_type.description,
            capabilities=list(device_type.capabilities),
            telemetry_schema=device_type.schema_as_dict(),
            offline_timeout_s=device_type.offline_timeout_s,
            expected_interval_s=device_type.expected_interval_s,
        )


class DeviceIn(BaseModel):
    model_config = Strict
    type: str = Field(max_length=63)
    id: str | None = Field(default=None, max_length=64)
    name: str | None = Field(default=None, max_length=200)
    capabilities: list[str] = Field(default_factory=list, max_length=100)
    metadata: dict[str, str] = Field(default_factory=dict)
    offline_timeout_s: float | None = None

    def to_command(self) -> RegisterDevice:
        return RegisterDevice(
            type_name=self.type,
            id=self.id,
            name=self.name,
            capabilities=tuple(self.capabilities),
            metadata=self.metadata,
            offline_timeout_s=self.offline_timeout_s,
        )


class DeviceOut(BaseModel):
    id: str
    name: str | None
    type: str
    status: Lifecycle
    capabilities: list[str]
    metadata: dict[str, str]
    offline_timeout_s: float | None
    registered_at: datetime
    deregistered_at: datetime | None
    credentials_rotated_at: datetime | None

    @classmethod
    def of(cls, device: Device) -> DeviceOut:
        return cls(
            id=device.id,
            name=device.name,
            type=device.type_name,
            status=device.lifecycle,
            capabilities=list(device.capabilities),
            metadata=device.metadata,
            offline_timeout_s=device.offline_timeout_s,
            registered_at=device.registered_at,
            deregistered_at=device.deregistered_at,
            credentials_rotated_at=device.credentials_rotated_at,
        )


class Credentials(BaseModel):
    device_id: str
    secret: str = Field(description="Shown once; only its hash is stored.")
    http_basic: str = Field(description="`Authorization: Basic` value for HTTP telemetry")
    mqtt_username: str
    mqtt_password: str

    @classmethod
    def of(cls, registration: Registration) -> Credentials:
        import base64

        device_id = registration.device.id
        token = base64.b64encode(f"{device_id}:{registration.secret}".encode()).decode()
        return cls(
            device_id=device_id,
            secret=registration.secret,
            http_basic=f"Basic {token}",
            mqtt_username=device_id,
            mqtt_password=registration.secret,
        )


class RegisteredDevice(BaseModel):
    device: DeviceOut
    credentials: Credentials


class DevicePage(BaseModel):
    items: list[DeviceOut]
    next_cursor: str | None


class BulkIn(BaseModel):
    model_config = Strict
    devices: list[DeviceIn] = Field(max_length=MAX_BULK_DEVICES)


class BulkItem(BaseModel):
    index: int
    status: str
    id: str | None = None
    device: DeviceOut | None = None
    credentials: Credentials | None = None
    error: dict[str, Any] | None = None


class BulkOut(BaseModel):
    created: int
    failed: int
    items: list[BulkItem]


def _bulk_item(index: int, result: Registration | BulkFailure) -> BulkItem:
    if isinstance(result, Registration):
        return BulkItem(
            index=index,
            status="created",
            id=result.device.id,
            device=DeviceOut.of(result.device),
            credentials=Credentials.of(result),
        )
    return BulkItem(index=index, status="failed", id=result.id, error=result.error.to_problem())


def create_router(
    *,
    uow_factory: UnitOfWorkFactory,
    queries: DeviceQueries,
    hasher: CredentialHasher,
    clock: Clock,
) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["devices"])
    viewer = Depends(require_role(Role.viewer))
    operator = Depends(require_role(Role.operator))

    @router.post("/device-types", status_code=201, dependencies=[operator])
    async def create_device_type(body: DeviceTypeIn) -> DeviceTypeOut:
        created = await define_device_type(body.to_domain(), uow=uow_factory(), clock=clock)
        return DeviceTypeOut.of(created)

    @router.get("/device-types", dependencies=[viewer])
    async def list_device_types() -> list[DeviceTypeOut]:
        return [DeviceTypeOut.of(t) for t in await queries.list_types()]

    @router.get("/device-types/{name}", dependencies=[viewer])
    async def get_device_type(name: str) -> DeviceTypeOut:
        return DeviceTypeOut.of(await queries.get_type(name))

    @router.post("/devices", status_code=201, dependencies=[operator])
    async def create_device(body: DeviceIn, response: Response) -> RegisteredDevice:
        registration = await register_device(
            body.to_command(), uow=uow_factory(), hasher=hasher, clock=clock
        )
        response.headers["Location"] = f"/api/v1/devices/{registration.device.id}"
        return RegisteredDevice(
            device=DeviceOut.of(registration.device), credentials=Credentials.of(registration)
        )

    @router.post("/devices:bulk", dependencies=[operator])
    async def create_devices_in_bulk(body: BulkIn, response: Response) -> BulkOut:
        results = await register_many(
            [d.to_command() for d in body.devices],
            uow_factory=uow_factory,
            hasher=hasher,
            clock=clock,
        )
        items = [_bulk_item(i, r) for i, r in enumerate(results)]
        created = sum(1 for item in items if item.status == "created")
        response.status_code = 201 if created == len(items) else 207
        return BulkOut(created=created, failed=len(items) - created, items=items)

    @router.get("/devices", dependencies=[viewer])
    async def list_devices(
        type: Annotated[str | None, Query(max_length=63)] = None,
        status: Lifecycle | None = None,
        name_prefix: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> DevicePage:
        position = decode_cursor(cursor) or {}
        found = await queries.list(
            DeviceQuery(
                type_name=type,
                lifecycle=status,
                name_prefix=name_prefix,
                after_id=position.get("after"),
                limit=limit + 1,
            )
        )
        page = found[:limit]
        next_cursor = encode_cursor({"after": page[-1].id}) if len(found) > limit else None
        return DevicePage(items=[DeviceOut.of(d) for d in page], next_cursor=next_cursor)

    @router.get("/devices/{device_id}", dependencies=[viewer])
    async def get_device(device_id: str) -> DeviceOut:
        return DeviceOut.of(await queries.get(device_id))

    async def deregister(device_id: str) -> DeviceOut:
        device = await deregister_device(device_id, uow=uow_factory(), hasher=hasher, clock=clock)
        return DeviceOut.of(device)

    router.add_api_route(
        "/devices/{device_id}", deregister, methods=["DELETE"], dependencies=[operator]
    )
    router.add_api_route(
        "/devices/{device_id}:deregister", deregister, methods=["POST"], dependencies=[operator]
    )

    @router.post("/devices/{device_id}/credentials:rotate", dependencies=[operator])
    async def rotate(device_id: str) -> RegisteredDevice:
        registration = await rotate_credentials(
            device_id, uow=uow_factory(), hasher=hasher, clock=clock
        )
        return RegisteredDevice(
            device=DeviceOut.of(registration.device), credentials=Credentials.of(registration)
        )

    return router
