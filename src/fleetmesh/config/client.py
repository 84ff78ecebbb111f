"""A client of the configuration center for services outside fleetmesh (HTTP only).

Values are kept in a `ConfigCache` (from the domain): a change is applied only
if its version is newer, deletions are remembered, and when the center is
briefly unreachable the last known values keep being served (`is_stale` says
for how long it has not been heard from). `follow()` keeps entries fresh with
a blocking-query loop, so a change arrives within milliseconds.

    async with ConfigClient("http://127.0.0.1:8080", key) as config:
        await config.follow("billing", "retry")
        retry = config.cached("billing", "retry", default={"max_attempts": 3})
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from fleetmesh.config.domain import DEFAULT_NAMESPACE, ConfigCache, ConfigRef, JsonValue
from fleetmesh.core.logging import get_logger

log = get_logger(__name__)

INDEX_HEADER = "X-Fleetmesh-Index"
Listener = Callable[[JsonValue], None]


class ConfigClientError(Exception):
    """The center refused a request; `problem` is its problem+json body."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(f"{status}: {problem.get('detail') or problem.get('title')}")
        self.status = status
        self.problem = problem


@dataclass(frozen=True, slots=True)
class _Notification:
    namespace: str
    service: str
    key: str
    version: int
    value: JsonValue
    deleted: bool


def _now() -> datetime:
    return datetime.now(UTC)


class ConfigClient:
    """Reads configuration over HTTP with a last-known-good cache and live updates."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        stale_after: float = 30.0,
        wait_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.namespace = namespace
        self.wait_s = wait_s
        self.cache = ConfigCache(stale_after=stale_after)
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            transport=transport,
            timeout=httpx.Timeout(timeout, read=wait_s + timeout),
        )
        self._follows: dict[ConfigRef, asyncio.Task[None]] = {}
        self._listeners: dict[ConfigRef, list[Listener]] = {}
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> ConfigClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        tasks = list(self._follows.values())
        self._follows.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._http.aclose()

    def ref(self, service: str, key: str) -> ConfigRef:
        return ConfigRef(namespace=self.namespace, service=service, key=key)

    @property
    def is_stale(self) -> bool:
        return self.cache.is_stale(_now())

    # -- reads -----------------------------------------------------------------

    async def get(self, service: str, key: str, default: JsonValue = None) -> JsonValue:
        """The current value from the center; the last known one if it cannot be reached."""
        ref = self.ref(service, key)
        try:
            await self._fetch(ref, index=None)
        except (httpx.HTTPError, _Unavailable) as error:
            log.warning("config_center_unreachable", ref=str(ref), error=repr(error))
        return self.cache.get(ref, default)

    def cached(self, service: str, key: str, default: JsonValue = None) -> JsonValue:
        """The last known value, without any request."""
        return self.cache.get(self.ref(service, key), default)

    def version(self, service: str, key: str) -> int:
        return self.cache.version_of(self.ref(service, key))

    async def follow(self, service: str, key: str, *, timeout: float = 10.0) -> JsonValue:
        """Keep this entry fresh in the background; returns its value once first loaded."""
        ref = self.ref(service, key)
        if ref not in self._follows:
            loaded = asyncio.Event()
            self._follows[ref] = asyncio.create_task(
                self._long_poll(ref, loaded), name=f"config-follow-{ref}"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(loaded.wait(), timeout)
        return self.cache.get(ref)

    def on_change(self, service: str, key: str, listener: Listener) -> Callable[[], None]:
        """Call `listener(value)` (None if deleted) at every newer version; returns unsubscribe."""
        ref = self.ref(service, key)
        self._listeners.setdefault(ref, []).append(listener)
        return lambda: self._listeners[ref].remove(listener)

    async def watch(self, service: str, key: str) -> AsyncIterator[JsonValue]:
        """Follow an entry and yield its value at every new version (None when deleted)."""
        ref = self.ref(service, key)
        await self.follow(service, key)
        seen = 0
        while True:
            version = self.cache.version_of(ref)
            if version > seen:
                seen = version
                yield self.cache.get(ref)
            await self._wait_newer(ref, seen)

    async def _wait_newer(self, ref: ConfigRef, version: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.cache.version_of(ref) > version)

    # -- writes ----------------------------------------------------------------

    async def set(
        self,
        service: str,
        key: str,
        value: JsonValue,
        *,
        comment: str = "",
        expected_version: int | None = None,
    ) -> int:
        """Store a new version; returns its number."""
        ref = self.ref(service, key)
        headers = {"If-Match": str(expected_version)} if expected_version is not None else {}
        response = await self._http.put(
            f"/api/v1/config/{ref.service}/{ref.key}",
            params={"namespace": ref.namespace},
            json={"value": value, "comment": comment},
            headers=headers,
        )
        body = _body(response)
        await self._apply(ref, int(body["version"]), body["value"], deleted=False)
        return int(body["version"])

    # -- internals ---------------------------------------------------------------

    async def _fetch(self, ref: ConfigRef, *, index: int | None) -> int:
        """One GET (a blocking query with `index`); returns the entry's version."""
        params: dict[str, str | int] = {"namespace": ref.namespace}
        if index is not None:
            params.update(index=index, wait=f"{self.wait_s:g}s")
        response = await self._http.get(f"/api/v1/config/{ref.service}/{ref.key}", params=params)
        if response.status_code >= 500:
            raise _Unavailable(response.status_code)
        version = int(response.headers.get(INDEX_HEADER, "0"))
        if response.status_code == 404:
            self.cache.mark_reachable(_now())
            if version > 0:
                await self._apply(ref, version, None, deleted=True)
            return version
        body = _body(response)
        await self._apply(ref, int(body["version"]), body["value"], deleted=False)
        return int(body["version"])

    async def _apply(
        self, ref: ConfigRef, version: int, value: JsonValue, *, deleted: bool
    ) -> None:
        change = _Notification(ref.namespace, ref.service, ref.key, version, value, deleted)
        if not self.cache.apply(change, now=_now()):
            return
        for listener in list(self._listeners.get(ref, [])):
            try:
                listener(None if deleted else value)
            except Exception as error:  # one failing listener never stops the others
                log.warning("config_listener_failed", ref=str(ref), error=repr(error))
        async with self._changed:
            self._changed.notify_all()

    async def _long_poll(self, ref: ConfigRef, loaded: asyncio.Event) -> None:
        backoff = 0.1
        while True:
            try:
                await self._fetch(
                    ref, index=self.cache.version_of(ref) if loaded.is_set() else None
                )
                loaded.set()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as error:  # keep serving the last known value
                log.warning("config_follow_failed", ref=str(ref), error=repr(error))
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)


class _Unavailable(Exception):
    """The center answered 5xx: treat it like unreachable."""


def _body(response: httpx.Response) -> dict[str, Any]:
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        body = {"title": response.text}
    if response.status_code >= 400:
        raise ConfigClientError(response.status_code, body)
    return body
