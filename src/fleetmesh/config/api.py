"""HTTP API of the configuration center.

Versions are the concurrency tokens: `GET` answers with `ETag: "<version>"`,
and `PUT`, `DELETE` and `:rollback` honour `If-Match: <version>` (quoted or
not; `*` = "it must exist"), answering 412 when the entry has moved on. Watches:
`GET ...?index=N&wait=30s` (blocking query on the version, `X-Fleetmesh-Index`)
and `GET .../watch` (Server-Sent Events).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from fleetmesh.config.domain import (
    DEFAULT_NAMESPACE,
    ChangeKind,
    ConfigNotFound,
    ConfigRef,
    ConfigVersion,
    VersionConflict,
)
from fleetmesh.config.service import (
    Change,
    Command,
    ConfigQueries,
    ConfigWatch,
    DeleteConfig,
    KvMirror,
    RollbackConfig,
    SetConfig,
    SetSchema,
    UnitOfWorkFactory,
    change_config,
)
from fleetmesh.core.auth import Operator, Role
from fleetmesh.core.clock import Clock
from fleetmesh.core.errors import FieldError, InvalidInput, PreconditionFailed
from fleetmesh.core.http import decode_cursor, encode_cursor, problem_response, require_role

INDEX_HEADER = "X-Fleetmesh-Index"
DEFAULT_WAIT_S = 30.0
MAX_WAIT_S = 300.0
SSE_KEEPALIVE_S = 15.0
_WAIT = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}
_ETAG = re.compile(r'(?:W/)?"?(\d+)"?')

Namespace = Annotated[str, Query(max_length=63)]


class ConfigPreconditionFailed(PreconditionFailed):
    problem = "config-precondition-failed"


def parse_wait(text: str | None) -> float:
    """`30s`, `500ms`, `2m` or plain seconds; at most five minutes."""
    if not text:
        return DEFAULT_WAIT_S
    match = _WAIT.fullmatch(text.strip())
    if match is None:
        raise InvalidInput(
            "`wait` is a duration such as 30s, 500ms or 2m.",
            errors=[FieldError("wait", "not a duration", "invalid")],
        )
    return min(MAX_WAIT_S, float(match.group(1)) * _UNITS[match.group(2)])


def etag(version: int) -> str:
    return f'"{version}"'


class ConfigIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    value: Any = Field(description="Any JSON value.")
    comment: str = Field(default="", max_length=1024)
    json_schema: Any = Field(
        default=None,
        alias="schema",
        description="Optional JSON Schema (Draft 2020-12) the value must satisfy from now on.",
    )


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    reason: str = Field(default="", max_length=900)


class SchemaIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_schema: Any = Field(alias="schema", description="A JSON Schema, or null to remove it.")


class SchemaOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)
    namespace: str
    service: str
    key: str
    json_schema: Any = Field(alias="schema")


class VersionOut(BaseModel):
    version: int
    kind: ChangeKind
    value: Any
    deleted: bool
    author: str
    at: datetime
    comment: str

    @classmethod
    def of(cls, version: ConfigVersion) -> VersionOut:
        return cls(
            version=version.version,
            kind=version.kind,
            value=version.value,
            deleted=version.deleted,
            author=version.author,
            at=version.at,
            comment=version.comment,
        )


class EntryOut(VersionOut):
    namespace: str
    service: str
    key: str

    @classmethod
    def of_ref(cls, ref: ConfigRef, version: ConfigVersion) -> EntryOut:
        return cls(
            namespace=ref.namespace,
            service=ref.service,
            key=ref.key,
            **VersionOut.of(version).model_dump(),
        )


class HistoryOut(BaseModel):
    namespace: str
    service: str
    key: str
    items: list[VersionOut]
    next_cursor: str | None


class EntrySummary(BaseModel):
    namespace: str
    service: str
    key: str
    version: int


def _expected_version(if_match: str | None, current: ConfigVersion | None) -> int | None:
    if if_match is None:
        return None
    if if_match.strip() == "*":
        if current is None or current.deleted:
            raise ConfigPreconditionFailed("If-Match: * but the entry has no value.")
        return current.version
    match = _ETAG.fullmatch(if_match.strip())
    if match is None:
        raise InvalidInput(
            "If-Match takes the entry's version, e.g. `If-Match: 3`.",
            errors=[FieldError("If-Match", "not a version", "invalid")],
        )
    return int(match.group(1))


def create_router(
    *,
    uow_factory: UnitOfWorkFactory,
    queries: ConfigQueries,
    mirror: KvMirror,
    watch: ConfigWatch,
    clock: Clock,
) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["config"])
    viewer = Depends(require_role(Role.viewer))
    operator = require_role(Role.operator)

    async def run(command: Command) -> Change:
        try:
            return await change_config(command, uow_factory=uow_factory, clock=clock, mirror=mirror)
        except VersionConflict as conflict:
            raise ConfigPreconditionFailed(conflict.detail, extra=conflict.extra) from None

    async def run_versioned(command: Command) -> ConfigVersion:
        change = await run(command)
        if change.version is None:
            raise RuntimeError("a value change always creates a version")
        return change.version

    def answer(response: Response, ref: ConfigRef, version: ConfigVersion) -> EntryOut:
        response.headers["ETag"] = etag(version.version)
        response.headers[INDEX_HEADER] = str(version.version)
        return EntryOut.of_ref(ref, version)

    @router.get("/config", dependencies=[viewer])
    async def list_entries(
        namespace: Namespace = DEFAULT_NAMESPACE,
        service: Annotated[str | None, Query(max_length=63)] = None,
    ) -> list[EntrySummary]:
        """Entries of a namespace (optionally one service) with their current version."""
        found = await queries.entries(namespace=namespace, service=service)
        return [
            EntrySummary(namespace=r.namespace, service=r.service, key=r.key, version=v)
            for r, v in found
        ]

    @router.put("/config/{service}/{key}")
    async def put_value(
        service: str,
        key: str,
        body: ConfigIn,
        response: Response,
        namespace: Namespace = DEFAULT_NAMESPACE,
        if_match: Annotated[str | None, Header()] = None,
        who: Operator = Depends(operator),
    ) -> EntryOut:
        """Set a value (a new version); with `schema`, the value must satisfy it from now on."""
        ref = ConfigRef(namespace=namespace, service=service, key=key)
        current = await queries.current(ref) if if_match else None
        command = SetConfig(
            ref=ref,
            value=body.value,
            author=who.name,
            comment=body.comment,
            expected_version=_expected_version(if_match, current),
            **({"schema": body.json_schema} if "json_schema" in body.model_fields_set else {}),
        )
        version = await run_versioned(command)
        response.status_code = 201 if version.version == 1 else 200
        return answer(response, ref, version)

    @router.get("/config/{service}/{key}", dependencies=[viewer])
    async def get_value(
        service: str,
        key: str,
        request: Request,
        response: Response,
        namespace: Namespace = DEFAULT_NAMESPACE,
        index: Annotated[int | None, Query(ge=0)] = None,
        wait: Annotated[str | None, Query(max_length=16)] = None,
    ) -> Any:
        """The current value; with `index`, a blocking query that waits for a newer version."""
        ref = ConfigRef(namespace=namespace, service=service, key=key)
        version = await queries.current(ref)
        if index is not None and (version.version if version else 0) <= index:
            await watch.wait(ref, index, parse_wait(wait))
            version = await queries.current(ref)
        if version is None or version.deleted:
            number = version.version if version else 0
            missing = ConfigNotFound(f"{ref} has no value", extra={"version": number})
            answer_404 = problem_response(missing, request)
            answer_404.headers[INDEX_HEADER] = str(number)
            return answer_404
        return answer(response, ref, version)

    @router.delete("/config/{service}/{key}")
    async def delete_value(
        service: str,
        key: str,
        response: Response,
        namespace: Namespace = DEFAULT_NAMESPACE,
        if_match: Annotated[str | None, Header()] = None,
        who: Operator = Depends(operator),
    ) -> EntryOut:
        """Delete the value (a tombstone version; history stays)."""
        ref = ConfigRef(namespace=namespace, service=service, key=key)
        current = await queries.current(ref) if if_match else None
        expected = _expected_version(if_match, current)
        version = await run_versioned(
            DeleteConfig(ref=ref, author=who.name, expected_version=expected)
        )
        return answer(response, ref, version)

    @router.post("/config/{service}/{key}:rollback")
    async def rollback(
        service: str,
        key: str,
        body: RollbackIn,
        response: Response,
        namespace: Namespace = DEFAULT_NAMESPACE,
        if_match: Annotated[str | None, Header()] = None,
        who: Operator = Depends(operator),
    ) -> EntryOut:
        """A new version carrying an earlier version's value (checked against today's schema)."""
        ref = ConfigRef(namespace=namespace, service=service, key=key)
        current = await queries.current(ref) if if_match else None
        command = RollbackConfig(
            ref=ref,
            to_version=body.version,
            author=who.name,
            reason=body.reason,
            expected_version=_expected_version(if_match, current),
        )
        return answer(response, ref, await run_versioned(command))

    @router.get("/config/{service}/{key}/history", dependencies=[viewer])
    async def history(
        service: str,
        key: str,
        namespace: Namespace = DEFAULT_NAMESPACE,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> HistoryOut:
        """Every version, newest first, paginated."""
        ref = ConfigRef(namespace=namespace, service=service, key=key)
        position = decode_cursor(cursor) or {}
        before = position.get("before")
        found = await queries.history(
            ref, before=before if isinstance(before, int) else None, limit=limit + 1
        )
        page = found[:limit]
        next_cursor = encode_cursor({"before": page[-1].version}) if len(found) > limit else None
        return HistoryOut(
            namespace=ref.namespace,
            service=ref.service,
            key=ref.key,
            items=[VersionOut.of(v) for v in page],
            next_cursor=next_cursor,
        )

    @router.get("/config/{service}/{key}/schema", dependencies=[viewer])
    async def get_schema(
        service: str, key: str, namespace: Namespace = DEFAULT_NAMESPACE
    ) -> SchemaOut:
        ref = ConfigRef(namespace=namespace, service=service, key=key)
        schema = await queries.schema(ref)
        return SchemaOut(namespace=namespace, service=service, key=key, json_schema=schema)

    @router.put("/config/{service}/{key}/schema")
    async def put_schema(
        service: str,
        key: str,
        body: SchemaIn,
        namespace: Namespace = DEFAULT_NAMESPACE,
        who: Operator = Depends(operator),
    ) -> SchemaOut:
        """Set (or, with null, remove) the schema; the current value must satisfy it."""
        ref = ConfigRef(namespace=namespace, service=service, key=key)
        change = await run(SetSchema(ref=ref, schema=body.json_schema, author=who.name))
        return SchemaOut(namespace=namespace, service=service, key=key, json_schema=change.schema)

    @router.get("/config/{service}/{key}/watch", dependencies=[viewer])
    async def watch_value(
        service: str,
        key: str,
        namespace: Namespace = DEFAULT_NAMESPACE,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> StreamingResponse:
        """Server-Sent Events: a `change` event with the entry at every new version."""
        ref = ConfigRef(namespace=namespace, service=service, key=key)
        start = int(last_event_id) if last_event_id and last_event_id.isdigit() else -1
        return StreamingResponse(
            _sse(ref, start, queries, watch),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router


async def _sse(
    ref: ConfigRef, last_sent: int, queries: ConfigQueries, watch: ConfigWatch
) -> AsyncIterator[str]:
    yield "retry: 1000\n\n"
    while not watch.closed:
        # Shielded: a client that goes away cancels the stream, never a query half-way.
        version = await asyncio.shield(queries.current(ref))
        number = 0 if version is None else version.version
        if version is not None and number != last_sent:
            body = EntryOut.of_ref(ref, version).model_dump_json()
            yield f"event: change\nid: {number}\ndata: {body}\n\n"
        last_sent = max(last_sent, number)
        if await watch.wait(ref, last_sent, SSE_KEEPALIVE_S) <= last_sent and not watch.closed:
            yield ": keepalive\n\n"
