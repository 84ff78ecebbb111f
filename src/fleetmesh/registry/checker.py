"""The active health checker: one scheduler task with a heap, probes with bounded concurrency.

Every instance has one due time in a heap: its next probe (HTTP/TCP), its TTL
expiry (TTL checks), or, once critical, the moment it has been critical for
`deregister_critical_after`. One task sleeps until the earliest due time and
starts a short-lived probe task for each instance that is due, holding a
semaphore, so 1,000 instances checked every 10 s cost one sleeping task and
about 100 short probes a second, never 1,000 sleeping tasks.

Results go through the domain (`apply_check_result`, `check_ttl`,
`should_deregister`) and are written to KV only when the health changes, with
the revision read before (`kv.update(..., last=revision)`). With several
registry replicas each one probes; a failure is counted once per interval:
a result is dropped when another replica recorded one less than half an
interval ago, and a write that lost the race (stale revision) is dropped too.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
from datetime import datetime, timedelta

import httpx

from fleetmesh.core.clock import Clock
from fleetmesh.core.logging import get_logger
from fleetmesh.registry.domain import CheckKind, CheckOutcome, HealthState, ServiceInstance
from fleetmesh.registry.repository import InstanceRecord, RegistryView
from fleetmesh.registry.service import RegistryService

log = get_logger(__name__)

DEFAULT_CONCURRENCY = 128


class Prober:
    """Runs one HTTP or TCP check against an instance."""

    def __init__(self, *, max_connections: int = DEFAULT_CONCURRENCY) -> None:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=32)
        self._http = httpx.AsyncClient(limits=limits, follow_redirects=False)

    async def close(self) -> None:
        await self._http.aclose()

    async def probe(self, instance: ServiceInstance) -> tuple[CheckOutcome, str]:
        """The outcome and a short human description of it."""
        check = instance.check
        if check.kind is CheckKind.HTTP:
            return await self._http_probe(instance)
        if check.kind is CheckKind.TCP:
            return await self._tcp_probe(instance)
        return CheckOutcome.SUCCESS, "TTL checks start passing"

    def target(self, instance: ServiceInstance) -> str:
        host = f"[{instance.address}]" if ":" in instance.address else instance.address
        if instance.check.kind is CheckKind.HTTP:
            return f"http://{host}:{instance.port}{instance.check.http_path}"
        return f"{host}:{instance.port}"

    async def _http_probe(self, instance: ServiceInstance) -> tuple[CheckOutcome, str]:
        url = self.target(instance)
        try:
            response = await self._http.get(url, timeout=instance.check.timeout)
        except httpx.TimeoutException:
            return CheckOutcome.TIMEOUT, f"GET {url}: no answer within {instance.check.timeout}s"
        except httpx.HTTPError as error:
            return CheckOutcome.FAILURE, f"GET {url}: {type(error).__name__}: {error}"
        outcome = CheckOutcome.SUCCESS if response.is_success else CheckOutcome.FAILURE
        return outcome, f"GET {url}: HTTP {response.status_code}"

    async def _tcp_probe(self, instance: ServiceInstance) -> tuple[CheckOutcome, str]:
        target = self.target(instance)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(instance.address, instance.port), instance.check.timeout
            )
        except TimeoutError:
            return CheckOutcome.TIMEOUT, f"TCP {target}: no connection within the timeout"
        except OSError as error:
            return CheckOutcome.FAILURE, f"TCP {target}: {error.strerror or error}"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return CheckOutcome.SUCCESS, f"TCP {target}: connected"


class HealthChecker:
    """Schedules every instance of the view and applies what the checks find."""

    def __init__(
        self,
        view: RegistryView,
        service: RegistryService,
        prober: Prober,
        clock: Clock,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self.view = view
        self.service = service
        self.prober = prober
        self.clock = clock
        self._slots = asyncio.Semaphore(concurrency)
        self._heap: list[tuple[datetime, int, str]] = []
        self._due: dict[str, tuple[datetime, int]] = {}
        self._in_flight: set[str] = set()
        self._probed: dict[str, datetime] = {}
        self._probe_tasks: set[asyncio.Task[None]] = set()
        self._sequence = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._unsubscribe = view.on_change(self._on_view_change)

    def start(self) -> None:
        now = self.clock.now()
        for key in self.view.keys():
            record = self.view.get(key)
            if record is None:
                continue
            due = self._next_due(record, now)
            if due <= now and record.instance.check.is_active:
                # Spread the overdue probes of a (re)start over one interval instead of a burst.
                spread = random.uniform(0, record.instance.check.interval)
                due = now + timedelta(seconds=spread)
            self._schedule(key, due)
        self._task = asyncio.create_task(self._run(), name="registry-checker")

    async def stop(self) -> None:
        # The flag as well as the cancel: a cancel that lands as the wait ends can be lost.
        self._stopping = True
        self._wakeup.set()
        self._unsubscribe()
        task, self._task = self._task, None
        tasks = [t for t in (task, *self._probe_tasks) if t is not None]
        for pending in tasks:
            pending.cancel()
        for pending in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await pending

    @property
    def scheduled(self) -> int:
        return len(self._due)

    # -- scheduling ------------------------------------------------------

    def _on_view_change(self, key: str) -> None:
        record = self.view.get(key)
        if record is None:
            self._due.pop(key, None)
            self._probed.pop(key, None)
            return
        if key in self._due and record.instance.check.is_active:
            return  # its next probe is already planned; a TTL expiry may have moved
        self._schedule(key, self._next_due(record, self.clock.now()))

    def _schedule(self, key: str, when: datetime) -> None:
        entry = (when, next(self._sequence))
        self._due[key] = entry
        heapq.heappush(self._heap, (when, entry[1], key))
        if self._heap[0][2] == key:
            self._wakeup.set()

    def _next_due(self, record: InstanceRecord, now: datetime) -> datetime:
        instance = record.instance
        check = instance.check
        candidates: list[datetime] = []
        if check.is_active:
            known = (record.last_check_at, instance.registered_at, self._probed.get(record.key))
            last = max(moment for moment in known if moment is not None)
            candidates.append(max(now, last + timedelta(seconds=check.interval)))
        else:
            expires = self._ttl_expiry(record)
            if expires is not None and instance.state is not HealthState.CRITICAL:
                candidates.append(expires + timedelta(milliseconds=1))
        if instance.critical_since is not None:
            after = timedelta(seconds=check.deregister_critical_after)
            candidates.append(instance.critical_since + after)
        return min(candidates) if candidates else now + timedelta(seconds=check.interval)

    def _ttl_expiry(self, record: InstanceRecord) -> datetime | None:
        beats = [record.instance.last_heartbeat, self.view.last_heartbeat(record.key)]
        known = [beat for beat in beats if beat is not None]
        if not known:
            return None
        return max(known) + timedelta(seconds=record.instance.check.interval)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._dispatch_due()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the scheduler must outlive any one bad record
                log.warning("registry_checker_failed", error=repr(error))
                await asyncio.sleep(0.5)

    async def _dispatch_due(self) -> None:
        if not self._heap:
            await self._wait(None)
            return
        when, sequence, key = self._heap[0]
        if self._due.get(key) != (when, sequence):
            heapq.heappop(self._heap)  # superseded by a later schedule
            return
        delay = (when - self.clock.now()).total_seconds()
        if delay > 0:
            await self._wait(delay)
            return
        heapq.heappop(self._heap)
        del self._due[key]
        if key in self._in_flight or self._stopping:
            return  # the running check reschedules it when done
        await self._slots.acquire()
        self._in_flight.add(key)
        task = asyncio.create_task(self._check(key), name=f"registry-check-{key}")
        self._probe_tasks.add(task)
        task.add_done_callback(self._probe_tasks.discard)

    async def _wait(self, delay: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), delay)
        self._wakeup.clear()

    # -- one check -------------------------------------------------------

    async def _check(self, key: str) -> None:
        try:
            await self._check_once(key)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("registry_check_failed", key=key, error=repr(error))
        finally:
            self._in_flight.discard(key)
            self._slots.release()
            record = self.view.get(key)
            if record is not None:
                self._schedule(key, self._next_due(record, self.clock.now()))

    async def _check_once(self, key: str) -> None:
        record = self.view.get(key)
        if record is None:
            return
        now = self.clock.now()
        if record.instance.should_deregister(now):
            await self.service.remove_critical(record, now=now)
            return
        if record.instance.check.is_active:
            await self._probe(record)
        else:
            await self.service.expire_ttl(record, self.view.last_heartbeat(key), now=now)

    async def _probe(self, record: InstanceRecord) -> None:
        interval = record.instance.check.interval
        if _recently_checked(record, self.clock.now(), interval):
            return
        self._probed[record.key] = self.clock.now()
        outcome, output = await self.prober.probe(record.instance)
        latest = self.view.get(record.key)
        if latest is None or _recently_checked(latest, self.clock.now(), interval):
            return
        now = self.clock.now()
        updated = await self.service.apply_check(latest, outcome, output, now=now)
        if updated is not None and updated.instance.should_deregister(now):
            await self.service.remove_critical(updated, now=now)


def _recently_checked(record: InstanceRecord, now: datetime, interval: float) -> bool:
    """Another replica recorded a result less than half an interval ago."""
    last = record.last_check_at
    return last is not None and now - last < timedelta(seconds=interval / 2)
