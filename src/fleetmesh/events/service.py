"""Use cases of the event bus: contracts and subscriptions; the only place that commits.

Contracts
    A new version is registered only when it is compatible with the earlier ones
    under its mode (given, else the mode of the latest version, else BACKWARD);
    otherwise 409 with every incompatibility. Registering the latest schema
    again (same schema and mode, no version given) answers the existing version.
    The `fleetmesh.` namespace is the platform's: its contracts come from the
    contexts' `contracts.SCHEMAS` at start (registered without publishing
    `contract_registered`, so the event store holds only the contexts' events).
    A user type must not travel on a subject of the platform's own contexts
    either (`device.registered.v1` would be stored on `events.device.registered.v1`,
    next to the real ones).

Subscriptions
    Creating one creates its durable JetStream consumer first (new events
    only), then commits; so every event published after the 201 is delivered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.core.clock import Clock
from fleetmesh.core.database import Database
from fleetmesh.core.envelope import subject_for_type
from fleetmesh.core.errors import Conflict, FieldError, NotFound
from fleetmesh.core.ids import new_id
from fleetmesh.core.logging import get_logger
from fleetmesh.core.uow import SqlUnitOfWork
from fleetmesh.events import contracts
from fleetmesh.events.compatibility import Incompatibility, check_new_version
from fleetmesh.events.domain import (
    CompatibilityMode,
    Contract,
    InvalidContract,
    JsonSchema,
    canonical_json,
    is_reserved_type,
    parse_builtin_type,
)
from fleetmesh.events.guard import HostGuard
from fleetmesh.events.repository import (
    ContractRecord,
    DeadLetter,
    DeliveryRecord,
    SqlContractRepository,
    SqlDeliveryRepository,
    SqlSubscriptionRepository,
)
from fleetmesh.events.signing import decode_secret, generate_secret
from fleetmesh.events.subscription import (
    DeliveryOptions,
    Endpoint,
    Subscription,
    SubscriptionNotFound,
    SubscriptionStatus,
)

log = get_logger(__name__)

DELIVERY_LOG_RETENTION = timedelta(days=7)
CONTRACT_CACHE_TTL_S = 2.0


class ContractNotFound(NotFound):
    """No contract (version) for this event type."""


class IncompatibleContract(Conflict):
    """The candidate version breaks the compatibility mode; `incompatibilities` says where."""

    def __init__(self, event_type: str, mode: CompatibilityMode, found: list[Incompatibility]):
        super().__init__(
            f"The new version of {event_type!r} is not {mode.value} compatible: "
            + "; ".join(str(item) for item in found[:10]),
            extra={
                "compatibility": mode.value,
                "incompatibilities": [
                    {
                        "path": item.path,
                        "message": item.message,
                        "version": item.version,
                        "direction": item.direction,
                    }
                    for item in found
                ],
            },
        )


class DeadLetterNotFound(NotFound):
    """No dead letter has this id."""


class EventsUnitOfWork(SqlUnitOfWork):
    contracts: SqlContractRepository
    subscriptions: SqlSubscriptionRepository
    deliveries: SqlDeliveryRepository

    def _open(self, session: AsyncSession) -> None:
        self.contracts = SqlContractRepository(session)
        self.subscriptions = SqlSubscriptionRepository(session)
        self.deliveries = SqlDeliveryRepository(session)


UnitOfWorkFactory = Callable[[], EventsUnitOfWork]


class DeliveryControl(Protocol):
    """What the use cases need from the delivery engine."""

    async def prepare(self, subscription: Subscription) -> None:
        """Create the subscription's durable consumer, starting with the next event."""

    async def discard(self, subscription_id: str) -> None:
        """Stop delivering and delete the subscription's consumer."""

    async def changed(self) -> None:
        """Subscriptions changed: reconcile workers here and in other processes."""


# --------------------------------------------------------------------------- contracts


@dataclass(frozen=True, slots=True)
class RegisterContract:
    event_type: str
    schema: JsonSchema
    publisher: str
    version: int | None = None
    description: str = ""
    compatibility: CompatibilityMode | None = None


@dataclass(frozen=True, slots=True)
class ContractRegistration:
    record: ContractRecord
    created: bool


def reserved_roots(catalog: Mapping[str, Mapping[str, Any]]) -> frozenset[str]:
    """First subject tokens of the platform's contexts (module names, built-in type contexts)."""
    roots = set(catalog)
    for schemas in catalog.values():
        for event_type in schemas:
            builtin = parse_builtin_type(event_type)
            if builtin is not None:
                roots.add(builtin.context)
    return frozenset(roots | {"device", "devices", "events", "telemetry", "status"})


def _user_type_problem(event_type: str, roots: frozenset[str]) -> str | None:
    if is_reserved_type(event_type):
        return "the fleetmesh. namespace is reserved for the platform's built-in events"
    root = subject_for_type(event_type).split(".")[1]
    if root in roots:
        return f"the subject root {root!r} belongs to a fleetmesh context; choose another prefix"
    return None


async def register_contract(
    command: RegisterContract,
    *,
    uow: EventsUnitOfWork,
    clock: Clock,
    roots: frozenset[str] = frozenset(),
    builtin: bool = False,
) -> ContractRegistration:
    """Register a contract version if it is compatible with the earlier ones."""
    if not builtin:
        problem = _user_type_problem(command.event_type, roots)
        if problem is not None:
            raise InvalidContract([FieldError("type", problem, "reserved")])
    async with uow:
        versions = await uow.contracts.versions(command.event_type)
        latest = versions[-1] if versions else None
        mode = command.compatibility or (
            latest.contract.compatibility if latest else CompatibilityMode.BACKWARD
        )
        same = _same_as_existing(command, versions, mode)
        if same is not None:
            return ContractRegistration(same, created=False)
        contract = Contract(
            event_type=command.event_type,
            version=command.version or (latest.contract.version + 1 if latest else 1),
            schema=command.schema,
            publisher=command.publisher,
            description=command.description,
            compatibility=mode,
        )
        found = check_new_version([v.contract for v in versions], contract, mode)
        if found and not builtin:
            raise IncompatibleContract(contract.event_type, mode, found)
        if found:
            log.warning(
                "builtin_contract_incompatible",
                event_type=contract.event_type,
                incompatibilities=[str(item) for item in found],
            )
        record = ContractRecord(contract, builtin, clock.now())
        try:
            # PostgreSQL refuses the insert itself when another transaction committed the
            # same version first; otherwise the commit does.
            await uow.contracts.add(record)
            if not builtin:  # built-in contracts come with the code, at every start
                uow.emit(contracts.contract_registered(contract, builtin=False))
            await uow.commit()
        except IntegrityError:
            raise Conflict(
                f"Version {contract.version} of {contract.event_type!r} was registered meanwhile."
            ) from None
    return ContractRegistration(record, created=True)


def _same_as_existing(
    command: RegisterContract, versions: list[ContractRecord], mode: CompatibilityMode
) -> ContractRecord | None:
    if not versions:
        return None
    fingerprint = canonical_json(command.schema)
    if command.version is None:
        latest = versions[-1]
        unchanged = latest.contract.fingerprint == fingerprint
        return latest if unchanged and latest.contract.compatibility is mode else None
    for record in versions:
        if record.contract.version == command.version:
            if record.contract.fingerprint == fingerprint:
                return record
            raise Conflict(
                f"Version {command.version} of {command.event_type!r} exists with another schema."
            )
    return None


async def seed_builtin_contracts(
    catalog: Mapping[str, Mapping[str, JsonSchema]],
    *,
    uow_factory: UnitOfWorkFactory,
    clock: Clock,
) -> int:
    """Register the contexts' published schemas that are new or changed; returns how many."""
    registered = 0
    for module_name, schemas in sorted(catalog.items()):
        for event_type, schema in sorted(schemas.items()):
            if parse_builtin_type(event_type) is None:
                log.warning("builtin_contract_misnamed", event_type=event_type, module=module_name)
                continue
            command = RegisterContract(event_type, schema, publisher=module_name)
            try:
                result = await register_contract(
                    command, uow=uow_factory(), clock=clock, builtin=True
                )
            except Conflict:
                continue  # a replica starting at the same time registered it
            except InvalidContract as error:
                log.error("builtin_contract_invalid", event_type=event_type, error=error.detail)
                continue
            registered += int(result.created)
    return registered


class ContractCache:
    """Latest contract per type for the publish path, re-read after `ttl` seconds.

    Replicas of the events service share the database; the short TTL bounds how
    long a version registered elsewhere goes unnoticed.
    """

    def __init__(self, database: Database, *, ttl: float = CONTRACT_CACHE_TTL_S) -> None:
        self.database = database
        self.ttl = ttl
        self._entries: dict[str, tuple[float, Contract | None]] = {}

    async def latest(self, event_type: str) -> Contract | None:
        cached = self._entries.get(event_type)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self.database.session() as session:
            record = await SqlContractRepository(session).latest(event_type)
        contract = record.contract if record else None
        self._entries[event_type] = (now + self.ttl, contract)
        return contract

    def put(self, contract: Contract) -> None:
        self._entries[contract.event_type] = (time.monotonic() + self.ttl, contract)


# --------------------------------------------------------------------------- subscriptions


@dataclass(frozen=True, slots=True)
class CreateSubscription:
    endpoint: str
    types: tuple[str, ...] = ()
    filters: list[Any] = field(default_factory=list)
    name: str | None = None
    secret: str | None = None
    options: DeliveryOptions = field(default_factory=DeliveryOptions)


async def create_subscription(
    command: CreateSubscription,
    *,
    uow: EventsUnitOfWork,
    clock: Clock,
    guard: HostGuard,
    control: DeliveryControl,
) -> Subscription:
    """Create a subscription and its durable consumer; the secret is only returned here."""
    endpoint = Endpoint.parse(command.endpoint)
    secret = command.secret or generate_secret()
    decode_secret(secret)
    now = clock.now()
    subscription = Subscription(
        id=new_id(),
        endpoint=endpoint,
        secret=secret,
        types=command.types,
        filters=command.filters,
        name=command.name,
        options=command.options,
        created_at=now,
        updated_at=now,
    )
    subscription.matcher  # noqa: B018 - validates types and filters (InvalidFilter, 422)
    await guard.check_endpoint(endpoint)
    await control.prepare(subscription)
    try:
        async with uow:
            await uow.subscriptions.add(subscription)
            uow.emit(contracts.subscription_created(subscription))
            await uow.commit()
    except BaseException:
        await control.discard(subscription.id)
        raise
    await control.changed()
    return subscription


async def set_subscription_status(
    subscription_id: str,
    status: SubscriptionStatus,
    *,
    uow: EventsUnitOfWork,
    clock: Clock,
    control: DeliveryControl,
) -> Subscription:
    """Pause or resume deliveries (the consumer keeps its place while paused)."""
    async with uow:
        subscription = await _require(uow, subscription_id)
        if subscription.status is not status:
            subscription.status = status
            subscription.updated_at = clock.now()
            await uow.subscriptions.set_status(subscription_id, status, subscription.updated_at)
            await uow.commit()
    await control.changed()
    return subscription


async def delete_subscription(
    subscription_id: str, *, uow: EventsUnitOfWork, clock: Clock, control: DeliveryControl
) -> None:
    """Delete a subscription and its consumer; its delivery log ages out."""
    async with uow:
        await _require(uow, subscription_id)
        await uow.subscriptions.remove(subscription_id)
        uow.emit(contracts.subscription_deleted(subscription_id, deleted_at=clock.now()))
        await uow.commit()
    await control.discard(subscription_id)
    await control.changed()


async def _require(uow: EventsUnitOfWork, subscription_id: str) -> Subscription:
    subscription = await uow.subscriptions.get(subscription_id)
    if subscription is None:
        raise SubscriptionNotFound(f"Subscription {subscription_id!r} does not exist.")
    return subscription


# --------------------------------------------------------------------------- deliveries


async def record_deliveries(
    records: Iterable[DeliveryRecord], letters: Iterable[DeadLetter], *, uow: EventsUnitOfWork
) -> None:
    """Write delivery outcomes (one transaction for a whole batch of them)."""
    async with uow:
        await uow.deliveries.add_records(list(records))
        await uow.deliveries.add_dead_letters(list(letters))
        await uow.commit()


async def resolve_dead_letter(
    letter: DeadLetter,
    *,
    delivered: bool,
    attempts: int,
    last_status: int | None,
    error: str,
    uow: EventsUnitOfWork,
    clock: Clock,
) -> None:
    """After a redelivery: mark the letter redelivered, or keep it with the latest error."""
    async with uow:
        await uow.deliveries.update_dead_letter(
            letter.id,
            status="redelivered" if delivered else "dead",
            attempts=attempts,
            last_status=last_status,
            error=error,
            resolved_at=clock.now() if delivered else None,
        )
        await uow.commit()


async def purge_delivery_log(*, uow: EventsUnitOfWork, clock: Clock) -> None:
    """Forget delivery attempts older than the retention."""
    async with uow:
        await uow.deliveries.purge_records(clock.now() - DELIVERY_LOG_RETENTION)
        await uow.commit()


# --------------------------------------------------------------------------- queries


class EventBusQueries:
    """Read side: lookups that change nothing."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def contract(self, event_type: str, version: int | None) -> ContractRecord:
        async with self.database.session() as session:
            repository = SqlContractRepository(session)
            found = (
                await repository.latest(event_type)
                if version is None
                else await repository.get(event_type, version)
            )
        if found is None:
            which = "any version" if version is None else f"version {version}"
            raise ContractNotFound(f"No contract {which} of {event_type!r}.")
        return found

    async def contracts(
        self, *, event_type: str | None = None, after: tuple[str, int] | None = None, limit: int
    ) -> list[ContractRecord]:
        async with self.database.session() as session:
            return await SqlContractRepository(session).page(
                event_type=event_type, after=after, limit=limit
            )

    async def all_contracts(self) -> list[ContractRecord]:
        async with self.database.session() as session:
            return await SqlContractRepository(session).all()

    async def subscription(self, subscription_id: str) -> Subscription:
        async with self.database.session() as session:
            found = await SqlSubscriptionRepository(session).get(subscription_id)
        if found is None:
            raise SubscriptionNotFound(f"Subscription {subscription_id!r} does not exist.")
        return found

    async def subscriptions(
        self, *, after: str | None = None, limit: int | None = None
    ) -> list[Subscription]:
        async with self.database.session() as session:
            return await SqlSubscriptionRepository(session).page(after=after, limit=limit)

    async def deliveries(
        self,
        subscription_id: str,
        *,
        status: str | None = None,
        event_id: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[DeliveryRecord]:
        async with self.database.session() as session:
            return await SqlDeliveryRepository(session).records(
                subscription_id, status=status, event_id=event_id, before=before, limit=limit
            )

    async def delivery_counts(self, subscription_id: str) -> dict[str, int]:
        async with self.database.session() as session:
            return await SqlDeliveryRepository(session).counts(subscription_id)

    async def dead_letters(
        self,
        subscription_id: str,
        *,
        status: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[DeadLetter]:
        async with self.database.session() as session:
            return await SqlDeliveryRepository(session).dead_letters(
                subscription_id, status=status, after=after, limit=limit
            )

    async def dead_letter(self, subscription_id: str, letter_id: str) -> DeadLetter:
        async with self.database.session() as session:
            found = await SqlDeliveryRepository(session).dead_letter(letter_id)
        if found is None or found.subscription_id != subscription_id:
            raise DeadLetterNotFound(f"Dead letter {letter_id!r} does not exist.")
        return found
