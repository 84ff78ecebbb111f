"""Tables and the SQLAlchemy adapter of the configuration center.

`config_versions` is the complete history (one row per version, never
rewritten); `config_entries` holds each entry's current version number and
schema. A save is conditional on the version that was loaded, so two writers
racing on PostgreSQL cannot both append the same version: the loser gets
`ConcurrentChange` and the use case retries on fresh state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from fleetmesh.config.domain import ChangeKind, ConfigEntry, ConfigRef, ConfigVersion
from fleetmesh.core.sqltypes import UtcDateTime

metadata = MetaData()

config_entries = Table(
    "config_entries",
    metadata,
    Column("namespace", String(63), primary_key=True),
    Column("service", String(63), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("current_version", Integer, nullable=False),
    Column("schema_json", Text, nullable=True),
    Column("updated_at", UtcDateTime(), nullable=False),
)

config_versions = Table(
    "config_versions",
    metadata,
    Column("namespace", String(63), primary_key=True),
    Column("service", String(63), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("value_json", Text, nullable=True),
    Column("author", String(128), nullable=False),
    Column("at", UtcDateTime(), nullable=False),
    Column("comment", Text, nullable=False),
)


class ConcurrentChange(Exception):
    """The entry moved on since it was loaded."""


@dataclass(frozen=True, slots=True)
class LatestVersion:
    """The current version of an entry, as the KV mirror needs it."""

    ref: ConfigRef
    version: int
    value_json: str | None


def _is(table: Table, ref: ConfigRef) -> Any:
    return and_(
        table.c.namespace == ref.namespace,
        table.c.service == ref.service,
        table.c.key == ref.key,
    )


def _ref_of(row: Any) -> ConfigRef:
    return ConfigRef(namespace=row.namespace, service=row.service, key=row.key)


def _version_of(row: Any) -> ConfigVersion:
    return ConfigVersion(
        version=row.version,
        kind=ChangeKind(row.kind),
        value_json=row.value_json,
        author=row.author,
        at=row.at,
        comment=row.comment,
    )


class SqlConfigRepository:
    """Config entries inside one unit of work."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, ref: ConfigRef) -> ConfigEntry | None:
        """The entry with its whole history and schema, or None; its row is locked till commit.

        On PostgreSQL the `FOR UPDATE` lock queues concurrent writers of one entry instead of
        letting them race (SQLite has one writer at a time anyway).
        """
        statement = select(config_entries).where(_is(config_entries, ref)).with_for_update()
        row = (await self.session.execute(statement)).first()
        if row is None:
            return None
        rows = await self.session.execute(
            select(config_versions)
            .where(_is(config_versions, ref))
            .order_by(config_versions.c.version)
        )
        versions = [_version_of(version_row) for version_row in rows]
        schema = None if row.schema_json is None else _load_json(row.schema_json)
        return ConfigEntry.from_history(ref, versions, schema)

    async def save(self, entry: ConfigEntry, *, loaded_version: int | None, now: datetime) -> None:
        """Append the versions above `loaded_version` (None: the entry is new) and its schema."""
        ref = entry.ref
        schema = entry.schema
        schema_json = None if schema is None else _dump_json(schema)
        values = {
            "current_version": entry.current_version,
            "schema_json": schema_json,
            "updated_at": now,
        }
        if loaded_version is None:
            await self.session.execute(
                insert(config_entries).values(
                    namespace=ref.namespace, service=ref.service, key=ref.key, **values
                )
            )
        else:
            result = await self.session.execute(
                update(config_entries)
                .where(_is(config_entries, ref))
                .where(config_entries.c.current_version == loaded_version)
                .values(**values)
            )
            if getattr(result, "rowcount", 1) != 1:
                raise ConcurrentChange(str(ref))
        added = [v for v in entry.history() if v.version > (loaded_version or 0)]
        if added:
            await self.session.execute(
                insert(config_versions),
                [
                    {
                        "namespace": ref.namespace,
                        "service": ref.service,
                        "key": ref.key,
                        "version": version.version,
                        "kind": version.kind.value,
                        "value_json": version.value_json,
                        "author": version.author,
                        "at": version.at,
                        "comment": version.comment,
                    }
                    for version in added
                ],
            )


class ConfigReads:
    """Read-only queries, each in its own short session."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def version(self, ref: ConfigRef) -> ConfigVersion | None:
        """The current version of an entry (tombstones included), or None if never set."""
        current = select(config_entries.c.current_version).where(_is(config_entries, ref))
        row = (
            await self.session.execute(
                select(config_versions)
                .where(_is(config_versions, ref))
                .where(config_versions.c.version == current.scalar_subquery())
            )
        ).first()
        return None if row is None else _version_of(row)

    async def schema(self, ref: ConfigRef) -> tuple[bool, Any]:
        """(whether the entry exists, its schema or None)."""
        row = (
            await self.session.execute(
                select(config_entries.c.schema_json).where(_is(config_entries, ref))
            )
        ).first()
        if row is None:
            return False, None
        return True, None if row.schema_json is None else _load_json(row.schema_json)

    async def history(
        self, ref: ConfigRef, *, before: int | None, limit: int
    ) -> list[ConfigVersion]:
        """Versions newest first, below `before` when given."""
        statement = (
            select(config_versions)
            .where(_is(config_versions, ref))
            .order_by(config_versions.c.version.desc())
            .limit(limit)
        )
        if before is not None:
            statement = statement.where(config_versions.c.version < before)
        return [_version_of(row) for row in await self.session.execute(statement)]

    async def latest_all(self) -> list[LatestVersion]:
        """The current version of every entry that has one (for the KV reconciler)."""
        joined = config_entries.join(
            config_versions,
            and_(
                config_versions.c.namespace == config_entries.c.namespace,
                config_versions.c.service == config_entries.c.service,
                config_versions.c.key == config_entries.c.key,
                config_versions.c.version == config_entries.c.current_version,
            ),
        )
        rows = await self.session.execute(
            select(
                config_entries.c.namespace,
                config_entries.c.service,
                config_entries.c.key,
                config_versions.c.version,
                config_versions.c.value_json,
            ).select_from(joined)
        )
        return [LatestVersion(_ref_of(row), row.version, row.value_json) for row in rows]

    async def entries(self, *, namespace: str, service: str | None) -> list[tuple[ConfigRef, int]]:
        """Entries of a namespace (and service), with their current version."""
        statement = (
            select(config_entries)
            .where(config_entries.c.namespace == namespace)
            .order_by(config_entries.c.service, config_entries.c.key)
        )
        if service is not None:
            statement = statement.where(config_entries.c.service == service)
        rows = await self.session.execute(statement)
        return [(_ref_of(row), row.current_version) for row in rows]


def _dump_json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _load_json(text: str) -> Any:
    return json.loads(text)
