"""A client of the service registry for services that call each other, and for fleetmesh itself.

`RegistryClient` keeps a local cache of each service it has been asked about,
fed by a blocking-query loop (`?index=N&wait=30s`), so `pick()` costs no
request and sees a change within milliseconds of the registry. While the
registry is unreachable the last known instances keep being served.

    async with RegistryClient("http://127.0.0.1:8080", key, strategy="least_outstanding") as reg:
        async with reg.acquire("telemetry-ingest") as instance:
            ...  # send the request to instance.address:instance.port

Strategies (see `balancing`): `round_robin`, `random`, `weighted`,
`least_outstanding` (count requests with `acquire()`), `consistent_hash`
(`pick(service, key=...)`). The protection threshold makes `pick` raise
`ProtectionThresholdReached` when too few instances are healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from fleetmesh.core.logging import get_logger
from fleetmesh.registry.balancing import (
    ConsistentHashBalancer,
    LeastOutstandingBalancer,
    LoadBalancer,
    RandomBalancer,
    RoundRobinBalancer,
    WeightedRandomBalancer,
)
from fleetmesh.registry.contracts import instance_from_document
from fleetmesh.registry.domain import NoHealthyInstance, ProtectionThresholdReached, ServiceInstance

log = get_logger(__name__)

STRATEGIES: dict[str, type[LoadBalancer]] = {
    "round_robin": RoundRobinBalancer,
    "random": RandomBalancer,
    "weighted": WeightedRandomBalancer,
    "least_outstanding": LeastOutstandingBalancer,
    "consistent_hash": ConsistentHashBalancer,
}
INDEX_HEADER = "X-Fleetmesh-Index"
DEFAULT_SELF_CHECK: dict[str, Any] = {
    "kind": "http",
    "http_path": "/healthz",
    "interval": 10,
    "timeout": 2,
}


class RegistryClientError(Exception):
    """The registry refused a request; `problem` is its problem+json body."""

    def __init__(self, status: int, problem: Mapping[str, Any]) -> None:
        super().__init__(f"{status}: {problem.get('detail') or problem.get('title')}")
        self.status = status
        self.problem = dict(problem)


@dataclass
class _Cached:
    index: int = 0
    instances: list[ServiceInstance] = field(default_factory=list)
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class RegistryClient:
    """Discovery with a watched local cache, client-side load balancing, and self-registration."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        strategy: str = "round_robin",
        protection_threshold: float = 0.0,
        wait_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; use one of {sorted(STRATEGIES)}")
        self.strategy = strategy
        self.protection_threshold = protection_threshold
        self.wait_s = wait_s
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            transport=transport,
            timeout=httpx.Timeout(timeout, read=wait_s + timeout),
        )
        self._cache: dict[str, _Cached] = {}
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._balancers: dict[str, LoadBalancer] = {}

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        watches = list(self._watches.values())
        self._watches.clear()
        for task in watches:
            task.cancel()
        for task in watches:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._http.aclose()

    # -- discovery -----------------------------------------------------------

    async def instances(
        self, service: str, *, healthy: bool = True, tag: str | None = None, zone: str | None = None
    ) -> list[ServiceInstance]:
        """One discovery request, bypassing the cache."""
        params: dict[str, str] = {"healthy": str(healthy).lower()}
        if tag:
            params["tag"] = tag
        if zone:
            params["zone"] = zone
        body = await self._call("GET", f"/api/v1/services/{service}/instances", params=params)
        return [instance_from_document(doc) for doc in body["instances"]]

    async def watch(self, service: str, *, timeout: float = 10.0) -> list[ServiceInstance]:
        """Start following a service (if not yet) and return its instances once loaded."""
        cached = self._follow(service)
        if not cached.loaded.is_set():  # the hot path (pick) skips the timed wait
            await asyncio.wait_for(cached.loaded.wait(), timeout)
        return list(cached.instances)

    def cached(self, service: str) -> list[ServiceInstance]:
        """The last known instances (critical ones included), without any request."""
        cached = self._cache.get(service)
        return list(cached.instances) if cached else []

    def index(self, service: str) -> int:
        cached = self._cache.get(service)
        return cached.index if cached else 0

    async def wait_for_change(self, service: str, after: int, timeout: float) -> int:
        """Wait until the cached index of a followed service passes `after`."""
        cached = self._follow(service)
        async with cached.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    cached.changed.wait_for(lambda: cached.index > after), timeout
                )
        return cached.index

    def balancer(self, service: str) -> LoadBalancer:
        if service not in self._balancers:
            kind = STRATEGIES[self.strategy]
            self._balancers[service] = kind(protection_threshold=self.protection_threshold)
        return self._balancers[service]

    async def pick(self, service: str, key: str | None = None) -> ServiceInstance:
        """One healthy instance by the strategy (NoHealthyInstance / ProtectionThresholdReached)."""
        instances = await self.watch(service)
        return self.balancer(service).pick(instances, key)

    @contextlib.asynccontextmanager
    async def acquire(self, service: str, key: str | None = None) -> AsyncIterator[ServiceInstance]:
        """Pick an instance and count the request as outstanding until the block ends."""
        instance = await self.pick(service, key)
        balancer = self.balancer(service)
        if not isinstance(balancer, LeastOutstandingBalancer):
            yield instance
            return
        balancer.acquire(instance)
        try:
            yield instance
        finally:
            balancer.release(instance)

    def candidates(self, service: str, *, key: str | None = None) -> list[str]:
        """Base URLs of healthy instances, the picked one first (the gateway's InstancePicker)."""
        instances = self._follow(service).instances
        try:
            first = self.balancer(service).pick(instances, key)
        except (NoHealthyInstance, ProtectionThresholdReached):
            return []
        others = sorted(
            (i for i in instances if i.is_healthy() and i is not first),
            key=lambda i: i.qualified_id,
        )
        return [base_url(instance) for instance in [first, *others]]

    # -- registering fleetmesh's own services ------------------------------------

    async def register_self(
        self,
        service: str,
        *,
        address: str,
        port: int,
        instance_id: str | None = None,
        check: Mapping[str, Any] | None = None,
        version: str = "",
        zone: str = "",
        tags: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
        weight: int = 100,
    ) -> dict[str, Any]:
        """Register this process (default check: HTTP GET /healthz every 10 s)."""
        body: dict[str, Any] = {
            "address": address,
            "port": port,
            "check": dict(check or DEFAULT_SELF_CHECK),
            "version": version,
            "zone": zone,
            "tags": list(tags),
            "metadata": dict(metadata or {}),
            "weight": weight,
        }
        if instance_id:
            body["instance_id"] = instance_id
        registered: dict[str, Any] = await self._call(
            "POST", f"/api/v1/services/{service}/instances", json=body
        )
        return registered

    async def heartbeat(self, service: str, instance_id: str) -> dict[str, Any]:
        """Renew a TTL check."""
        path = f"/api/v1/services/{service}/instances/{instance_id}/heartbeat"
        renewed: dict[str, Any] = await self._call("PUT", path)
        return renewed

    async def deregister(self, service: str, instance_id: str) -> bool:
        """Remove an instance; False if the registry did not know it."""
        try:
            await self._call("DELETE", f"/api/v1/services/{service}/instances/{instance_id}")
        except RegistryClientError as error:
            if error.status == 404:
                return False
            raise
        return True

    async def keep_alive(self, service: str, instance_id: str, *, every: float) -> None:
        """Heartbeat forever (run it as a task; cancel it before deregistering)."""
        while True:
            try:
                await self.heartbeat(service, instance_id)
            except (httpx.HTTPError, RegistryClientError) as error:
                log.warning("registry_heartbeat_failed", service=service, error=str(error))
            await asyncio.sleep(every)

    # -- internals -------------------------------------------------------------

    async def _call(self, method: str, path: str, **options: Any) -> Any:
        response = await self._http.request(method, path, **options)
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"title": response.text}
            raise RegistryClientError(response.status_code, problem)
        return response.json() if response.content else None

    def _follow(self, service: str) -> _Cached:
        cached = self._cache.setdefault(service, _Cached())
        if service not in self._watches:
            self._watches[service] = asyncio.create_task(
                self._long_poll(service, cached), name=f"registry-watch-{service}"
            )
        return cached

    async def _long_poll(self, service: str, cached: _Cached) -> None:
        backoff = 0.1
        path = f"/api/v1/services/{service}/instances"
        while True:
            params = {"healthy": "false"}
            if cached.loaded.is_set():  # the first answer comes at once, even for no instance
                params.update(index=str(cached.index), wait=f"{self.wait_s:g}s")
            try:
                response = await self._http.get(path, params=params)
                response.raise_for_status()
                index = int(response.headers.get(INDEX_HEADER, "0"))
                documents = response.json()["instances"]
                instances = [instance_from_document(document) for document in documents]
            except asyncio.CancelledError:
                raise
            except Exception as error:  # keep serving the last known instances
                log.warning("registry_watch_failed", service=service, error=repr(error))
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            backoff = 0.1
            if index != cached.index or not cached.loaded.is_set():
                async with cached.changed:
                    cached.index = index
                    cached.instances = instances
                    cached.loaded.set()
                    cached.changed.notify_all()


def base_url(instance: ServiceInstance) -> str:
    host = f"[{instance.address}]" if ":" in instance.address else instance.address
    return f"http://{host}:{instance.port}"
