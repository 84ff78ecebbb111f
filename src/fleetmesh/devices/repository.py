"""Ports and SQLAlchemy adapters of the device registry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import (
    JSON,
    Column,
    Float,
    Index,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.core.sqltypes import UtcDateTime
from fleetmesh.devices.domain import Device, DeviceType, Lifecycle, MetricSpec, ValueType

metadata = MetaData()

device_types = Table(
    "device_types",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("description", Text, nullable=False, default=""),
    Column("capabilities", JSON, nullable=False),
    Column("telemetry_schema", JSON, nullable=False),
    Column("offline_timeout_s", Float, nullable=True),
    Column("expected_interval_s", Float, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
)

devices = Table(
    "devices",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("type_name", String(63), nullable=False),
    Column("name", String(200), nullable=True),
    Column("lifecycle", String(20), nullable=False),
    Column("capabilities", JSON, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("offline_timeout_s", Float, nullable=True),
    Column("credential_hash", String(200), nullable=False),
    Column("registered_at", UtcDateTime(), nullable=False),
    Column("deregistered_at", UtcDateTime(), nullable=True),
    Column("credentials_rotated_at", UtcDateTime(), nullable=True),
    Index("ix_devices_type_name", "type_name"),
    Index("ix_devices_lifecycle", "lifecycle"),
    Index("ix_devices_name", "name"),
)


@dataclass(frozen=True, slots=True)
class DeviceQuery:
    """Filters and a keyset position for listing devices."""

    type_name: str | None = None
    lifecycle: Lifecycle | None = None
    name_prefix: str | None = None
    after_id: str | None = None
    limit: int = 100


class DeviceRepository(Protocol):
    """Devices and device types, inside one unit of work."""

    async def add_type(self, device_type: DeviceType, *, created_at: Any) -> None:
        """Store a new device type."""

    async def get_type(self, name: str) -> DeviceType | None:
        """The device type, or None."""

    async def list_types(self) -> list[DeviceType]:
        """Every device type by name."""

    async def add(self, device: Device) -> None:
        """Store a new device."""

    async def add_many(self, new_devices: Sequence[Device]) -> None:
        """Store many new devices in one statement."""

    async def get(self, device_id: str) -> Device | None:
        """The device, or None."""

    async def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of these ids are taken."""

    async def existing_names(self, names: Sequence[str]) -> set[str]:
        """Which of these names are used by active devices."""

    async def save(self, device: Device) -> None:
        """Persist changes to a loaded device."""

    async def list(self, query: DeviceQuery) -> list[Device]:
        """Devices matching the query, ordered by id."""


class SqlDeviceRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add_type(self, device_type: DeviceType, *, created_at: Any) -> None:
        await self.session.execute(
            insert(device_types).values(**_type_row(device_type), created_at=created_at)
        )

    async def get_type(self, name: str) -> DeviceType | None:
        row = (
            await self.session.execute(select(device_types).where(device_types.c.name == name))
        ).first()
        return _type_from_row(row) if row else None

    async def list_types(self) -> list[DeviceType]:
        rows = (
            await self.session.execute(select(device_types).order_by(device_types.c.name))
        ).all()
        return [_type_from_row(row) for row in rows]

    async def add(self, device: Device) -> None:
        await self.session.execute(insert(devices).values(**_device_row(device)))

    async def add_many(self, new_devices: Sequence[Device]) -> None:
        if new_devices:
            await self.session.execute(insert(devices), [_device_row(d) for d in new_devices])

    async def get(self, device_id: str) -> Device | None:
        row = (await self.session.execute(select(devices).where(devices.c.id == device_id))).first()
        return _device_from_row(row) if row else None

    async def existing_ids(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(ids, 500):
            rows = await self.session.execute(select(devices.c.id).where(devices.c.id.in_(chunk)))
            found.update(row.id for row in rows)
        return found

    async def existing_names(self, names: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(names, 500):
            rows = await self.session.execute(
                select(devices.c.name)
                .where(devices.c.name.in_(chunk))
                .where(devices.c.lifecycle == Lifecycle.registered.value)
            )
            found.update(str(row.name) for row in rows)
        return found

    async def save(self, device: Device) -> None:
        row = _device_row(device)
        del row["id"]
        await self.session.execute(update(devices).where(devices.c.id == device.id).values(**row))

    async def list(self, query: DeviceQuery) -> list[Device]:
        statement = select(devices).order_by(devices.c.id).limit(query.limit)
        if query.type_name:
            statement = statement.where(devices.c.type_name == query.type_name)
        if query.lifecycle:
            statement = statement.where(devices.c.lifecycle == query.lifecycle.value)
        if query.name_prefix:
            escaped = (
                query.name_prefix.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_")
            )
            statement = statement.where(devices.c.name.like(escaped + "%", escape="\\"))
        if query.after_id:
            statement = statement.where(devices.c.id > query.after_id)
        rows = (await self.session.execute(statement)).all()
        return [_device_from_row(row) for row in rows]


def _chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _type_row(device_type: DeviceType) -> dict[str, Any]:
    return {
        "name": device_type.name,
        "description": device_type.description,
        "capabilities": list(device_type.capabilities),
        "telemetry_schema": device_type.schema_as_dict(),
        "offline_timeout_s": device_type.offline_timeout_s,
        "expected_interval_s": device_type.expected_interval_s,
    }


def _type_from_row(row: Any) -> DeviceType:
    return DeviceType(
        name=row.name,
        description=row.description,
        capabilities=tuple(row.capabilities),
        telemetry_schema={
            metric: MetricSpec(
                type=ValueType(spec["type"]),
                unit=spec.get("unit"),
                min=spec.get("min"),
                max=spec.get("max"),
            )
            for metric, spec in row.telemetry_schema.items()
        },
        offline_timeout_s=row.offline_timeout_s,
        expected_interval_s=row.expected_interval_s,
    )


def _device_row(device: Device) -> dict[str, Any]:
    return {
        "id": device.id,
        "type_name": device.type_name,
        "name": device.name,
        "lifecycle": device.lifecycle.value,
        "capabilities": list(device.capabilities),
        "metadata": device.metadata,
        "offline_timeout_s": device.offline_timeout_s,
        "credential_hash": device.credential_hash,
        "registered_at": device.registered_at,
        "deregistered_at": device.deregistered_at,
        "credentials_rotated_at": device.credentials_rotated_at,
    }


def _device_from_row(row: Any) -> Device:
    return Device(
        id=row.id,
        type_name=row.type_name,
        name=row.name,
        registered_at=row.registered_at,
        credential_hash=row.credential_hash,
        capabilities=tuple(row.capabilities),
        metadata=dict(row.metadata),
        offline_timeout_s=row.offline_timeout_s,
        lifecycle=Lifecycle(row.lifecycle),
        deregistered_at=row.deregistered_at,
        credentials_rotated_at=row.credentials_rotated_at,
    )
