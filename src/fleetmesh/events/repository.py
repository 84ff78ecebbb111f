"""Tables of the event bus and their SQLAlchemy adapters.

`event_contracts` (one row per contract version), `event_subscriptions`,
`event_deliveries` (the delivery log, one row per attempt) and
`event_dead_letters` (events given up on, with their payload so a redrive does
not depend on the stream's retention). Created by the `events` Alembic branch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from fleetmesh.core.database import Database
from fleetmesh.core.sqltypes import UtcDateTime
from fleetmesh.events.domain import CompatibilityMode, Contract, RetryPolicy
from fleetmesh.events.subscription import (
    DeliveryOptions,
    Endpoint,
    Subscription,
    SubscriptionStatus,
    retry_policy_dict,
    retry_policy_from,
)

metadata = MetaData()

contracts_table = Table(
    "event_contracts",
    metadata,
    Column("event_type", String(255), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("schema", JSON, nullable=False),
    Column("publisher", String(200), nullable=False),
    Column("description", Text, nullable=False),
    Column("compatibility", String(32), nullable=False),
    Column("builtin", Boolean, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
)

subscriptions_table = Table(
    "event_subscriptions",
    metadata,
    Column("id", String(26), primary_key=True),
    Column("name", String(200), nullable=True),
    Column("types", JSON, nullable=False),
    Column("filters", JSON, nullable=False),
    Column("endpoint", Text, nullable=False),
    Column("secret", String(200), nullable=False),
    Column("timeout_s", Float, nullable=False),
    Column("retry", JSON, nullable=True),
    Column("ordered", Boolean, nullable=False),
    Column("batch_size", Integer, nullable=False),
    Column("max_in_flight", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)

deliveries_table = Table(
    "event_deliveries",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("subscription_id", String(26), nullable=False),
    Column("event_id", String(255), nullable=False),
    Column("event_type", String(255), nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("http_status", Integer, nullable=True),
    Column("latency_ms", Float, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Index("ix_event_deliveries_subscription", "subscription_id", "id"),
    Index("ix_event_deliveries_created_at", "created_at"),
)

dead_letters_table = Table(
    "event_dead_letters",
    metadata,
    Column("id", String(26), primary_key=True),
    Column("subscription_id", String(26), nullable=False),
    Column("event_id", String(255), nullable=False),
    Column("event_type", String(255), nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("last_status", Integer, nullable=True),
    Column("error", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("resolved_at", UtcDateTime(), nullable=True),
    Index("ix_event_dead_letters_subscription", "subscription_id", "status"),
)


@dataclass(frozen=True, slots=True)
class ContractRecord:
    """A registered contract version."""

    contract: Contract
    builtin: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One delivery attempt of one event to one subscription."""

    subscription_id: str
    event_id: str
    event_type: str
    sequence: int
    attempt: int
    status: str
    http_status: int | None
    latency_ms: float | None
    error: str | None
    created_at: datetime
    id: int | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event a subscription gave up on, with why."""

    id: str
    subscription_id: str
    event_id: str
    event_type: str
    sequence: int
    payload: bytes
    last_status: int | None
    error: str
    attempts: int
    status: str
    created_at: datetime
    resolved_at: datetime | None = None


class SqlContractRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def versions(self, event_type: str) -> list[ContractRecord]:
        query = (
            select(contracts_table)
            .where(contracts_table.c.event_type == event_type)
            .order_by(contracts_table.c.version)
        )
        return [_contract_from_row(row) for row in (await self.session.execute(query)).all()]

    async def get(self, event_type: str, version: int) -> ContractRecord | None:
        query = select(contracts_table).where(
            contracts_table.c.event_type == event_type, contracts_table.c.version == version
        )
        row = (await self.session.execute(query)).first()
        return _contract_from_row(row) if row is not None else None

    async def latest(self, event_type: str) -> ContractRecord | None:
        versions = await self.versions(event_type)
        return versions[-1] if versions else None

    async def page(
        self, *, event_type: str | None, after: tuple[str, int] | None, limit: int
    ) -> list[ContractRecord]:
        query = select(contracts_table).order_by(
            contracts_table.c.event_type, contracts_table.c.version
        )
        if event_type is not None:
            query = query.where(contracts_table.c.event_type == event_type)
        if after is not None:
            after_type, after_version = after
            query = query.where(
                (contracts_table.c.event_type > after_type)
                | (
                    (contracts_table.c.event_type == after_type)
                    & (contracts_table.c.version > after_version)
                )
            )
        rows = (await self.session.execute(query.limit(limit))).all()
        return [_contract_from_row(row) for row in rows]

    async def all(self) -> list[ContractRecord]:
        query = select(contracts_table).order_by(
            contracts_table.c.event_type, contracts_table.c.version
        )
        return [_contract_from_row(row) for row in (await self.session.execute(query)).all()]

    async def add(self, record: ContractRecord) -> None:
        contract = record.contract
        await self.session.execute(
            insert(contracts_table).values(
                event_type=contract.event_type,
                version=contract.version,
                schema=contract.schema,
                publisher=contract.publisher,
                description=contract.description,
                compatibility=contract.compatibility.value,
                builtin=record.builtin,
                created_at=record.created_at,
            )
        )


def _contract_from_row(row: Any) -> ContractRecord:
    contract = Contract(
        event_type=row.event_type,
        version=row.version,
        schema=row.schema,
        publisher=row.publisher,
        description=row.description,
        compatibility=CompatibilityMode(row.compatibility),
    )
    return ContractRecord(contract, bool(row.builtin), row.created_at)


class SqlSubscriptionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, subscription_id: str) -> Subscription | None:
        query = select(subscriptions_table).where(subscriptions_table.c.id == subscription_id)
        row = (await self.session.execute(query)).first()
        return subscription_from_row(row) if row is not None else None

    async def page(
        self, *, after: str | None = None, limit: int | None = None
    ) -> list[Subscription]:
        query = select(subscriptions_table).order_by(subscriptions_table.c.id)
        if after is not None:
            query = query.where(subscriptions_table.c.id > after)
        if limit is not None:
            query = query.limit(limit)
        return [subscription_from_row(row) for row in (await self.session.execute(query)).all()]

    async def add(self, subscription: Subscription) -> None:
        await self.session.execute(
            insert(subscriptions_table).values(**_subscription_row(subscription))
        )

    async def set_status(
        self, subscription_id: str, status: SubscriptionStatus, at: datetime
    ) -> None:
        await self.session.execute(
            update(subscriptions_table)
            .where(subscriptions_table.c.id == subscription_id)
            .values(status=status.value, updated_at=at)
        )

    async def remove(self, subscription_id: str) -> None:
        await self.session.execute(
            delete(subscriptions_table).where(subscriptions_table.c.id == subscription_id)
        )


def _subscription_row(subscription: Subscription) -> dict[str, Any]:
    options = subscription.options
    return {
        "id": subscription.id,
        "name": subscription.name,
        "types": list(subscription.types),
        "filters": subscription.filters,
        "endpoint": subscription.endpoint.url,
        "secret": subscription.secret,
        "timeout_s": options.timeout_s,
        "retry": retry_policy_dict(options.retry) if options.retry else None,
        "ordered": options.ordered,
        "batch_size": options.batch_size,
        "max_in_flight": options.max_in_flight,
        "status": subscription.status.value,
        "created_at": subscription.created_at,
        "updated_at": subscription.updated_at,
    }


def subscription_from_row(row: Any) -> Subscription:
    retry = retry_policy_from(row.retry, RetryPolicy()) if row.retry else None
    return Subscription(
        id=row.id,
        endpoint=Endpoint.parse(row.endpoint),
        secret=row.secret,
        types=tuple(row.types),
        filters=list(row.filters),
        name=row.name,
        options=DeliveryOptions(
            timeout_s=row.timeout_s,
            retry=retry,
            ordered=bool(row.ordered),
            batch_size=row.batch_size,
            max_in_flight=row.max_in_flight,
        ),
        status=SubscriptionStatus(row.status),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


class SqlDeliveryRepository:
    """The delivery log and the dead letters."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add_records(self, records: Sequence[DeliveryRecord]) -> None:
        if records:
            await self.session.execute(
                insert(deliveries_table), [_delivery_row(record) for record in records]
            )

    async def add_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        if letters:
            await self.session.execute(
                insert(dead_letters_table), [_letter_row(letter) for letter in letters]
            )

    async def records(
        self,
        subscription_id: str,
        *,
        status: str | None,
        event_id: str | None,
        before: int | None,
        limit: int,
    ) -> list[DeliveryRecord]:
        query = (
            select(deliveries_table)
            .where(deliveries_table.c.subscription_id == subscription_id)
            .order_by(deliveries_table.c.id.desc())
            .limit(limit)
        )
        if status is not None:
            query = query.where(deliveries_table.c.status == status)
        if event_id is not None:
            query = query.where(deliveries_table.c.event_id == event_id)
        if before is not None:
            query = query.where(deliveries_table.c.id < before)
        return [_delivery_from_row(row) for row in (await self.session.execute(query)).all()]

    async def counts(self, subscription_id: str) -> dict[str, int]:
        query = (
            select(deliveries_table.c.status, func.count())
            .where(deliveries_table.c.subscription_id == subscription_id)
            .group_by(deliveries_table.c.status)
        )
        return {status: int(count) for status, count in (await self.session.execute(query)).all()}

    async def purge_records(self, older_than: datetime) -> None:
        await self.session.execute(
            delete(deliveries_table).where(deliveries_table.c.created_at < older_than)
        )

    async def dead_letters(
        self, subscription_id: str, *, status: str | None, after: str | None, limit: int
    ) -> list[DeadLetter]:
        query = (
            select(dead_letters_table)
            .where(dead_letters_table.c.subscription_id == subscription_id)
            .order_by(dead_letters_table.c.id)
            .limit(limit)
        )
        if status is not None:
            query = query.where(dead_letters_table.c.status == status)
        if after is not None:
            query = query.where(dead_letters_table.c.id > after)
        return [_letter_from_row(row) for row in (await self.session.execute(query)).all()]

    async def dead_letter(self, letter_id: str) -> DeadLetter | None:
        query = select(dead_letters_table).where(dead_letters_table.c.id == letter_id)
        row = (await self.session.execute(query)).first()
        return _letter_from_row(row) if row is not None else None

    async def update_dead_letter(
        self,
        letter_id: str,
        *,
        status: str,
        attempts: int,
        last_status: int | None,
        error: str,
        resolved_at: datetime | None,
    ) -> None:
        await self.session.execute(
            update(dead_letters_table)
            .where(dead_letters_table.c.id == letter_id)
            .values(
                status=status,
                attempts=attempts,
                last_status=last_status,
                error=error,
                resolved_at=resolved_at,
            )
        )


class DeliveryLogWriter:
    """Appends delivery outcomes over one long-lived connection: the delivery hot path.

    Each flush of the delivery recorder is one transaction here; keeping the
    connection saves opening one per flush (on SQLite a new connection is a
    thread, a file open and the pragmas: milliseconds of CPU). Writes hold the
    database's writer lock (SQLite has one writer). After an error the
    connection is dropped and the next write opens a fresh one.
    """

    def __init__(self, database: Database) -> None:
        self.database = database
        self._connection: AsyncConnection | None = None

    async def write(self, records: Sequence[DeliveryRecord], letters: Sequence[DeadLetter]) -> None:
        async with self.database.writing():
            connection = self._connection
            if connection is None:
                connection = self._connection = await self.database.engine.connect()
            try:
                if records:
                    await connection.execute(
                        insert(deliveries_table), [_delivery_row(r) for r in records]
                    )
                if letters:
                    await connection.execute(
                        insert(dead_letters_table), [_letter_row(x) for x in letters]
                    )
                await connection.commit()
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.rollback()
            with contextlib.suppress(Exception):
                await connection.close()


def _delivery_row(record: DeliveryRecord) -> dict[str, Any]:
    return {
        "subscription_id": record.subscription_id,
        "event_id": record.event_id,
        "event_type": record.event_type,
        "sequence": record.sequence,
        "attempt": record.attempt,
        "status": record.status,
        "http_status": record.http_status,
        "latency_ms": record.latency_ms,
        "error": record.error,
        "created_at": record.created_at,
    }


def _delivery_from_row(row: Any) -> DeliveryRecord:
    return DeliveryRecord(
        subscription_id=row.subscription_id,
        event_id=row.event_id,
        event_type=row.event_type,
        sequence=row.sequence,
        attempt=row.attempt,
        status=row.status,
        http_status=row.http_status,
        latency_ms=row.latency_ms,
        error=row.error,
        created_at=row.created_at,
        id=row.id,
    )


def _letter_row(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "subscription_id": letter.subscription_id,
        "event_id": letter.event_id,
        "event_type": letter.event_type,
        "sequence": letter.sequence,
        "payload": letter.payload,
        "last_status": letter.last_status,
        "error": letter.error,
        "attempts": letter.attempts,
        "status": letter.status,
        "created_at": letter.created_at,
        "resolved_at": letter.resolved_at,
    }


def _letter_from_row(row: Any) -> DeadLetter:
    return DeadLetter(
        id=row.id,
        subscription_id=row.subscription_id,
        event_id=row.event_id,
        event_type=row.event_type,
        sequence=row.sequence,
        payload=bytes(row.payload),
        last_status=row.last_status,
        error=row.error,
        attempts=row.attempts,
        status=row.status,
        created_at=row.created_at,
        resolved_at=row.resolved_at,
    )
