"""Use cases of the device registry: the only place that commits."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.core.clock import Clock
from fleetmesh.core.database import Database
from fleetmesh.core.errors import FieldError, FleetmeshError
from fleetmesh.core.ids import new_id
from fleetmesh.core.uow import SqlUnitOfWork
from fleetmesh.devices import contracts
from fleetmesh.devices.credentials import CredentialHasher, new_secret
from fleetmesh.devices.domain import (
    MAX_BULK_DEVICES,
    Device,
    DeviceNotFound,
    DeviceType,
    DeviceTypeNotFound,
    DuplicateDevice,
    DuplicateDeviceType,
    InvalidDevice,
)
from fleetmesh.devices.repository import DeviceQuery, SqlDeviceRepository


class DevicesUnitOfWork(SqlUnitOfWork):
    devices: SqlDeviceRepository

    def _open(self, session: AsyncSession) -> None:
        self.devices = SqlDeviceRepository(session)


UnitOfWorkFactory = Callable[[], DevicesUnitOfWork]


@dataclass(frozen=True, slots=True)
class RegisterDevice:
    type_name: str
    id: str | None = None
    name: str | None = None
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    offline_timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class Registration:
    """A device just registered, with its secret: the only time the secret is seen."""

    device: Device
    secret: str


@dataclass(frozen=True, slots=True)
class BulkFailure:
    index: int
    id: str | None
    error: FleetmeshError


BulkResult = Registration | BulkFailure


def generated_device_id() -> str:
    return "dev-" + new_id().lower()


async def define_device_type(
    device_type: DeviceType, *, uow: DevicesUnitOfWork, clock: Clock
) -> DeviceType:
    """Create a device type."""
    device_type.validate()
    async with uow:
        if await uow.devices.get_type(device_type.name) is not None:
            raise DuplicateDeviceType(f"Device type {device_type.name!r} already exists.")
        await uow.devices.add_type(device_type, created_at=clock.now())
        uow.emit(contracts.type_defined(device_type))
        await uow.commit()
    return device_type


async def register_device(
    command: RegisterDevice, *, uow: DevicesUnitOfWork, hasher: CredentialHasher, clock: Clock
) -> Registration:
    """Register one device and issue its credentials."""
    secret = new_secret()
    credential_hash = await hasher.hash(secret)
    async with uow:
        device_type = await _require_type(uow, command.type_name)
        device = _new_device(command, device_type, credential_hash, clock)
        if await uow.devices.existing_ids([device.id]):
            raise DuplicateDevice(f"Device {device.id!r} already exists.")
        if device.name and await uow.devices.existing_names([device.name]):
            raise DuplicateDevice(f"A device named {device.name!r} already exists.")
        await uow.devices.add(device)
        uow.emit(contracts.registered(device))
        try:
            await uow.commit()
        except IntegrityError:
            raise DuplicateDevice(f"Device {device.id!r} already exists.") from None
    return Registration(device, secret)


async def register_many(
    commands: list[RegisterDevice],
    *,
    uow_factory: UnitOfWorkFactory,
    hasher: CredentialHasher,
    clock: Clock,
) -> list[BulkResult]:
    """Register up to MAX_BULK_DEVICES devices; bad items fail alone, good ones are kept."""
    if len(commands) > MAX_BULK_DEVICES:
        raise InvalidDevice(
            f"At most {MAX_BULK_DEVICES} devices per bulk call.",
            errors=[FieldError("devices", f"{len(commands)} items", "too_many")],
        )
    secrets_ = [new_secret() for _ in commands]
    hashes = await hasher.hash_many(secrets_)
    async with uow_factory() as uow:
        results = await _bulk_candidates(commands, hashes, secrets_, uow=uow, clock=clock)
        created = [r.device for r in results if isinstance(r, Registration)]
        await uow.devices.add_many(created)
        for device in created:
            uow.emit(contracts.registered(device))
        try:
            await uow.commit()
            return results
        except IntegrityError:
            await uow.rollback()
    # Lost a race with a concurrent registration: fall back to one by one.
    return [
        await _register_one_of_many(i, c, uow_factory=uow_factory, hasher=hasher, clock=clock)
        for i, c in enumerate(commands)
    ]


async def _register_one_of_many(
    index: int,
    command: RegisterDevice,
    *,
    uow_factory: UnitOfWorkFactory,
    hasher: CredentialHasher,
    clock: Clock,
) -> BulkResult:
    try:
        return await register_device(command, uow=uow_factory(), hasher=hasher, clock=clock)
    except FleetmeshError as error:
        return BulkFailure(index, command.id, error)


async def _bulk_candidates(
    commands: list[RegisterDevice],
    hashes: list[str],
    secrets_: list[str],
    *,
    uow: DevicesUnitOfWork,
    clock: Clock,
) -> list[BulkResult]:
    types = {t.name: t for t in await uow.devices.list_types()}
    ids = [c.id or generated_device_id() for c in commands]
    taken_ids = await uow.devices.existing_ids(ids)
    taken_names = await uow.devices.existing_names([c.name for c in commands if c.name])
    results: list[BulkResult] = []
    for index, (command, device_id) in enumerate(zip(commands, ids, strict=True)):
        try:
            device_type = types.get(command.type_name)
            if device_type is None:
                raise DeviceTypeNotFound(f"Device type {command.type_name!r} does not exist.")
            if device_id in taken_ids:
                raise DuplicateDevice(f"Device {device_id!r} already exists.")
            if command.name and command.name in taken_names:
                raise DuplicateDevice(f"A device named {command.name!r} already exists.")
            fixed = dataclasses.replace(command, id=device_id)
            device = _new_device(fixed, device_type, hashes[index], clock)
        except FleetmeshError as error:
            results.append(BulkFailure(index, command.id, error))
            continue
        taken_ids.add(device_id)
        if command.name:
            taken_names.add(command.name)
        results.append(Registration(device, secrets_[index]))
    return results


def _new_device(
    command: RegisterDevice, device_type: DeviceType, credential_hash: str, clock: Clock
) -> Device:
    return Device.register(
        device_id=command.id or generated_device_id(),
        device_type=device_type,
        name=command.name,
        capabilities=command.capabilities,
        metadata=command.metadata,
        offline_timeout_s=command.offline_timeout_s,
        credential_hash=credential_hash,
        now=clock.now(),
    )


async def _require_type(uow: DevicesUnitOfWork, name: str) -> DeviceType:
    device_type = await uow.devices.get_type(name)
    if device_type is None:
        raise DeviceTypeNotFound(
            f"Device type {name!r} does not exist.",
            errors=[FieldError("type", f"unknown device type {name!r}", "unknown")],
        )
    return device_type


async def _require_device(uow: DevicesUnitOfWork, device_id: str) -> Device:
    device = await uow.devices.get(device_id)
    if device is None:
        raise DeviceNotFound(f"Device {device_id!r} does not exist.")
    return device


async def deregister_device(
    device_id: str, *, uow: DevicesUnitOfWork, hasher: CredentialHasher, clock: Clock
) -> Device:
    """Deregister a device: its record stays, its credentials stop working."""
    async with uow:
        device = await _require_device(uow, device_id)
        device.deregister(clock.now())
        await uow.devices.save(device)
        uow.emit(contracts.deregistered(device))
        await uow.commit()
    hasher.forget(device_id)
    return device


async def rotate_credentials(
    device_id: str, *, uow: DevicesUnitOfWork, hasher: CredentialHasher, clock: Clock
) -> Registration:
    """Issue a new secret; the old one stops working at once."""
    secret = new_secret()
    new_hash = await hasher.hash(secret)
    async with uow:
        device = await _require_device(uow, device_id)
        device.rotate_credentials(new_hash, clock.now())
        await uow.devices.save(device)
        uow.emit(contracts.credentials_rotated(device))
        await uow.commit()
    hasher.forget(device_id)
    return Registration(device, secret)


class DeviceQueries:
    """Read side: lookups that change nothing."""

    def __init__(self, database: Database, hasher: CredentialHasher) -> None:
        self.database = database
        self.hasher = hasher

    async def get(self, device_id: str) -> Device:
        async with self.database.session() as session:
            device = await SqlDeviceRepository(session).get(device_id)
        if device is None:
            raise DeviceNotFound(f"Device {device_id!r} does not exist.")
        return device

    async def get_type(self, name: str) -> DeviceType:
        async with self.database.session() as session:
            device_type = await SqlDeviceRepository(session).get_type(name)
        if device_type is None:
            raise DeviceTypeNotFound(f"Device type {name!r} does not exist.")
        return device_type

    async def list_types(self) -> list[DeviceType]:
        async with self.database.session() as session:
            return await SqlDeviceRepository(session).list_types()

    async def list(self, query: DeviceQuery) -> list[Device]:
        async with self.database.session() as session:
            return await SqlDeviceRepository(session).list(query)

    async def verify_device(self, device_id: str, secret: str) -> bool:
        """True if the secret is the device's current credential and it is registered."""
        if self.hasher.confirmed_recently(device_id, secret):
            return True
        async with self.database.session() as session:
            device = await SqlDeviceRepository(session).get(device_id)
        if device is None or not device.is_active:
            return False
        ok = await self.hasher.verify(device_id, device.credential_hash, secret)
        if ok:
            self.hasher.note_confirmed(device_id, secret)
        return ok
