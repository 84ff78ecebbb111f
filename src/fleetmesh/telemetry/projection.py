"""What telemetry knows about device types and devices, cached in memory for the hot path.

The projection consumer (``consumers.ProjectionConsumer``) keeps the tables
``telemetry_device_types``/``telemetry_devices`` in step with the registry's events; this
directory holds them in memory, so ingesting a batch never queries SQL to find a device's
schema. Several replicas share one durable consumer (each event is applied once, by one of
them); the replica that applied a change broadcasts the changed keys on
``telemetry.directory.changed`` (core NATS, best effort) and every replica reloads them. A
missed broadcast heals on the next cache miss (a miss reloads from the tables).

A device registered a few milliseconds before its first telemetry may not be projected yet:
the outbox relay publishes within ~50-500 ms. A miss therefore waits (``wait_s``, 2 s by
default) for the projection to change, re-reading the tables every 250 ms, before answering
404 ``device-not-found``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import msgspec

from fleetmesh.core.backbone import Backbone
from fleetmesh.core.database import Database
from fleetmesh.core.errors import Conflict, NotFound
from fleetmesh.core.ids import new_id
from fleetmesh.core.logging import get_logger
from fleetmesh.telemetry.domain import (
    EMPTY_TRANSFORMS,
    InvalidSpec,
    TelemetrySchema,
    TransformSpec,
)
from fleetmesh.telemetry.repository import DeviceRow, ProjectionRepository, TypeRow

log = get_logger(__name__)

CHANGED_SUBJECT: Final = "telemetry.directory.changed"
RELOAD_EVERY_S: Final = 0.25

T = TypeVar("T")


class DeviceNotFound(NotFound):
    problem = "device-not-found"
    title = "Device not found"


class DeviceNotActive(Conflict):
    problem = "device-not-active"
    title = "Device deregistered"


class DeviceTypeNotFound(NotFound):
    problem = "device-type-not-found"
    title = "Device type not found"


@dataclass(frozen=True, slots=True)
class TypeProfile:
    """A device type as the hot path needs it: parsed schema and transforms."""

    name: str
    schema: TelemetrySchema
    schema_raw: dict[str, Any]
    transforms: TransformSpec
    transforms_raw: list[dict[str, Any]]
    retention_days: float | None
    rollup_days: float | None

    @classmethod
    def of(cls, row: TypeRow) -> TypeProfile:
        try:
            schema = TelemetrySchema.from_dict(row.telemetry_schema)
        except InvalidSpec as error:
            log.warning("telemetry_schema_unusable", device_type=row.name, error=str(error))
            schema = TelemetrySchema({})
        try:
            transforms = TransformSpec.from_dicts(row.transforms)
        except InvalidSpec as error:
            log.warning("telemetry_transforms_unusable", device_type=row.name, error=str(error))
            transforms = EMPTY_TRANSFORMS
        return cls(
            name=row.name,
            schema=schema,
            schema_raw=row.telemetry_schema,
            transforms=transforms,
            transforms_raw=list(row.transforms or []),
            retention_days=row.retention_days,
            rollup_days=row.rollup_days,
        )

    def metric_type(self, metric: str) -> str | None:
        spec = self.schema.metrics.get(metric)
        return spec.type.value if spec is not None else None


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    device_id: str
    type_name: str
    active: bool


class _Changed(msgspec.Struct, frozen=True):
    origin: str
    types: list[str] = []
    devices: list[str] = []


class DeviceDirectory:
    """The in-memory projection, loaded from the tables and kept current by the consumer."""

    def __init__(self, database: Database, backbone: Backbone | None = None) -> None:
        self.database = database
        self.backbone = backbone
        self.origin = new_id()
        self._types: dict[str, TypeProfile] = {}
        self._devices: dict[str, DeviceProfile] = {}
        self._changed = asyncio.Event()
        self._subscription: Any = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.load_all()
        if self.backbone is not None:
            self._subscription = await self.backbone.nc.subscribe(
                CHANGED_SUBJECT, cb=self._on_broadcast
            )

    async def stop(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def load_all(self) -> None:
        async with self.database.session() as session:
            repository = ProjectionRepository(session)
            types = await repository.all_types()
            devices = await repository.all_devices()
        self._types = {row.name: TypeProfile.of(row) for row in types}
        self._devices = {row.device_id: _device(row) for row in devices}
        self._notify()

    # ------------------------------------------------------------------ reads (hot path)

    def device(self, device_id: str) -> DeviceProfile | None:
        return self._devices.get(device_id)

    def device_type(self, name: str) -> TypeProfile | None:
        return self._types.get(name)

    def resolve(self, device_id: str) -> tuple[DeviceProfile, TypeProfile] | None:
        device = self._devices.get(device_id)
        if device is None:
            return None
        device_type = self._types.get(device.type_name)
        if device_type is None and device.active:
            return None
        return device, device_type or _UNKNOWN_TYPE

    async def require_device(
        self, device_id: str, *, wait_s: float, active: bool = True
    ) -> tuple[DeviceProfile, TypeProfile]:
        """The device and its type, waiting up to ``wait_s`` for the projection to catch up."""
        found = self.resolve(device_id)
        if found is None:
            found = await self._wait(
                lambda: self.resolve(device_id),
                reload=lambda: self.reload(devices=[device_id]),
                wait_s=wait_s,
            )
        if found is None:
            raise DeviceNotFound(f"Device {device_id!r} does not exist.")
        if active and not found[0].active:
            raise DeviceNotActive(f"Device {device_id!r} is deregistered.")
        return found

    async def require_type(self, name: str, *, wait_s: float) -> TypeProfile:
        found = self._types.get(name)
        if found is None:
            found = await self._wait(
                lambda: self._types.get(name),
                reload=lambda: self.reload(types=[name]),
                wait_s=wait_s,
            )
        if found is None:
            raise DeviceTypeNotFound(f"Device type {name!r} does not exist.")
        return found

    async def _wait(
        self,
        probe: Callable[[], T | None],
        *,
        reload: Callable[[], Any],
        wait_s: float,
    ) -> T | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            await reload()
            found = probe()
            remaining = deadline - loop.time()
            if found is not None or remaining <= 0:
                return found
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, RELOAD_EVERY_S))
            found = probe()
            if found is not None:
                return found

    # ------------------------------------------------------------------ writes

    async def reload(self, *, types: Iterable[str] = (), devices: Iterable[str] = ()) -> None:
        """Re-read these keys from the tables (after a change here or in another replica)."""
        type_names, device_ids = list(types), list(devices)
        async with self.database.session() as session:
            repository = ProjectionRepository(session)
            device_rows = await repository.devices_with_ids(device_ids)
            wanted = set(type_names) | {
                row.type_name for row in device_rows if row.type_name not in self._types
            }
            type_rows = await repository.types_named(sorted(wanted))
        for type_row in type_rows:
            self._types[type_row.name] = TypeProfile.of(type_row)
        for device_row in device_rows:
            self._devices[device_row.device_id] = _device(device_row)
        if type_rows or device_rows:
            self._notify()

    async def changed(self, *, types: Iterable[str] = (), devices: Iterable[str] = ()) -> None:
        """A change committed here: reload it, and tell the other replicas."""
        type_names, device_ids = sorted(set(types)), sorted(set(devices))
        await self.reload(types=type_names, devices=device_ids)
        if self.backbone is None or not (type_names or device_ids):
            return
        payload = msgspec.json.encode(_Changed(self.origin, type_names, device_ids))
        try:
            await self.backbone.nc.publish(CHANGED_SUBJECT, payload)
        except Exception as error:  # best effort: other replicas heal on their next miss
            log.warning("telemetry_directory_broadcast_failed", error=repr(error))

    async def _on_broadcast(self, message: Any) -> None:
        try:
            change = msgspec.json.decode(message.data, type=_Changed)
        except msgspec.DecodeError:
            return
        if change.origin == self.origin:
            return
        try:
            await self.reload(types=change.types, devices=change.devices)
        except Exception as error:
            log.warning("telemetry_directory_reload_failed", error=repr(error))

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


def _device(row: DeviceRow) -> DeviceProfile:
    return DeviceProfile(row.device_id, row.type_name, row.active)


_UNKNOWN_TYPE: Final = TypeProfile(
    name="",
    schema=TelemetrySchema({}),
    schema_raw={},
    transforms=EMPTY_TRANSFORMS,
    transforms_raw=[],
    retention_days=None,
    rollup_days=None,
)
