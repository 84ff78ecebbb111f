"""`fleetmesh up --distributed` on PostgreSQL while its processes die: nothing acknowledged is
lost or doubled.

Twenty devices register and send telemetry through the gateway, as a real client would
(retrying 502/503/504 and lost connections; a telemetry batch carries an `Idempotency-Key`
so its retries are stored once; some requests are sent twice on purpose, as after a lost
answer). Meanwhile one instance of every context is killed with SIGKILL, one NATS node is
stopped, and the gateway is killed with requests under way; the supervisor starts them
again. Afterwards every acknowledged device exists exactly once, every acknowledged point is
stored exactly once, and SIGTERM leaves no process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import httpx
import nats
import nats.errors
import pytest
from ulid import ULID

from fleetmesh.bootstrap import CONTEXTS
from fleetmesh.core.ports import free_port
from fleetmesh.telemetry.contracts import TELEMETRY_STREAM
from fleetmesh.telemetry.writer import WRITER_DURABLE

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(480)]

FLEETMESH = str(Path(sys.executable).with_name("fleetmesh"))
PG_ADMIN_URL = os.environ.get("FLEETMESH_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432")
DEVICE_COUNT = 20
POINTS_PER_BATCH = 15
BATCH_PAUSE_S = 1.0
BATCHES_AFTER_CHAOS = 5
REGISTRATION_GAP_S = 0.3
LOST_ANSWER_EVERY = 4  # every 4th registration and batch is sent twice, as after a lost answer
DEVICE_TYPE = {"name": "chaos-meter", "telemetry_schema": {"temp": {"type": "number"}}}
NATS_NODE_STOPPED = "nats-1"
RETRYABLE = frozenset({502, 503, 504})


# --------------------------------------------------------------------------- processes


def _parent_and_argv(pid: int) -> tuple[int, list[str]] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie is dead, only not reaped yet
        return None
    return int(fields[1]), argv


def _role(argv: list[str]) -> str | None:
    """`telemetry`, `gateway`, ... for a service process, `nats-<n>` for a cluster node."""
    if "service" in argv and "run" in argv:
        return argv[argv.index("run") + 1]
    node = re.search(r"/cluster/node-(\d+)/", " ".join(argv))
    if argv and argv[0].endswith("nats-server") and node:
        return f"nats-{node.group(1)}"
    return None


def _alive(pid: int) -> bool:
    return _parent_and_argv(pid) is not None


def _pids_of_this_data_dir(data_dir: Path) -> list[int]:
    """Every live process started for this data dir (by environment or command line)."""
    marker = str(data_dir.resolve()).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (
                marker in (entry / "environ").read_bytes()
                or marker in (entry / "cmdline").read_bytes()
            ):
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return [pid for pid in found if _alive(pid)]


class Platform:
    """The `fleetmesh up --distributed` process, its children and its API."""

    def __init__(self, process: subprocess.Popen[bytes], data_dir: Path, api: str) -> None:
        self.process = process
        self.data_dir = data_dir
        self.api = api
        self.seen: set[int] = set()

    @property
    def stderr_path(self) -> Path:
        return self.data_dir.parent / "up.stderr"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def admin_key(self) -> str:
        return (self.data_dir / "admin.key").read_text().strip()

    def nats_urls(self) -> list[str]:
        return sorted(set(re.findall(r"nats://127\.0\.0\.1:\d+", self.stderr())))

    def mqtt_ports(self) -> list[int]:
        """The MQTT listeners of the cluster's nodes, in node order (from the banner)."""
        return [int(port) for port in re.findall(r"mqtt://127\.0\.0\.1:(\d+)", self.stderr())]

    def nats_password(self) -> str:
        secrets = json.loads((self.data_dir / "nats" / "secrets.json").read_text())
        return str(secrets["service_password"])

    def children(self) -> dict[str, list[int]]:
        """Live children of the supervisor by role."""
        roles: dict[str, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            found = _parent_and_argv(int(entry.name))
            if found is None or found[0] != self.process.pid:
                continue
            role = _role(found[1])
            if role is not None:
                roles.setdefault(role, []).append(int(entry.name))
                self.seen.add(int(entry.name))
        return roles

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.stderr().splitlines()[-lines:])


def _start(data_dir: Path, database_url: str) -> Platform:
    data_dir.mkdir(parents=True)
    port = free_port()
    with (data_dir.parent / "up.stderr").open("wb") as stderr:
        process = subprocess.Popen(
            [
                FLEETMESH, "up", "--distributed", "--replicas", "2",
                "--database-url", database_url, "--data-dir", str(data_dir),
                "--http-port", str(port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )  # fmt: skip
    return Platform(process, data_dir, f"http://127.0.0.1:{port}")


def _wait_until_serving(platform: Platform, timeout: float = 240) -> None:
    """The banner is printed: every process, the gateway included, is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if platform.process.poll() is not None:
            raise AssertionError(f"fleetmesh up exited:\n{platform.log_tail()}")
        if "Ctrl-C stops everything" in platform.stderr():
            return
        time.sleep(0.5)
    raise AssertionError(f"the distributed platform did not start:\n{platform.log_tail()}")


def _stop(platform: Platform) -> int | None:
    if platform.process.poll() is None:
        platform.process.send_signal(signal.SIGTERM)
    try:
        return platform.process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        platform.process.kill()
        platform.process.wait(timeout=10)
        return None


def _kill_leftovers(data_dir: Path) -> None:
    for pid in _pids_of_this_data_dir(data_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """An empty PostgreSQL database of its own, dropped at the end."""
    name = f"fleetmesh_dist_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(PG_ADMIN_URL + "/postgres", timeout=5)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_ADMIN_URL}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def platform(tmp_path: Path, fresh_pg_url: str) -> Iterator[Platform]:
    started = _start(tmp_path / "data", fresh_pg_url)
    try:
        _wait_until_serving(started)
        yield started
    finally:
        _stop(started)
        _kill_leftovers(started.data_dir)


# --------------------------------------------------------------------------- the client


@dataclass
class Device:
    name: str
    id: str = ""
    secret: str = ""
    acked_ts: list[int] = field(default_factory=list)


class Fleet:
    """Devices registering and sending telemetry through the gateway, retrying as clients do."""

    def __init__(self, api: str, admin_key: str) -> None:
        self.http = httpx.AsyncClient(base_url=api + "/api/v1", timeout=20)
        self.admin = {"Authorization": f"Bearer {admin_key}"}
        self.devices = [Device(f"chaos-{index:02d}") for index in range(DEVICE_COUNT)]
        self.retries: Counter[str] = Counter()
        self.resent: Counter[str] = Counter()
        self.posts_in_flight = 0
        self.sending = asyncio.Event()
        self.chaos_over = asyncio.Event()

    async def close(self) -> None:
        await self.http.aclose()

    async def call(
        self, method: str, path: str, *, done: set[int], deadline_s: float = 120, **options: Any
    ) -> httpx.Response:
        """Send until the answer is one of `done` (or not a transient failure)."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            try:
                response = await self.http.request(method, path, **options)
            except httpx.TransportError as error:
                self.retries[type(error).__name__] += 1
                await asyncio.sleep(0.3)
                continue
            if response.status_code in done or response.status_code not in RETRYABLE:
                return response
            self.retries[str(response.status_code)] += 1
            retry_after = float(response.headers.get("Retry-After", "0.3"))
            await asyncio.sleep(min(retry_after, 2.0))
        raise AssertionError(f"{method} {path} never got through in {deadline_s}s")

    async def register(self, device: Device, *, resend: bool) -> None:
        """Register by name; `resend`: the first answer is taken as lost, so it is sent again."""
        for _ in range(2 if resend else 1):
            created = await self.call(
                "POST",
                "/devices",
                done={201, 409},
                json={"type": DEVICE_TYPE["name"], "name": device.name},
                headers=self.admin,
            )
        if created.status_code == 201:
            body = created.json()
            device.id, device.secret = body["device"]["id"], body["credentials"]["secret"]
            return
        # 409: an attempt whose answer was lost created it; find it and take new credentials
        assert created.status_code == 409, created.text
        self.resent["registration"] += 1
        listed = await self.call(
            "GET", "/devices", done={200}, params={"name_prefix": device.name}, headers=self.admin
        )
        (found,) = [d for d in listed.json()["items"] if d["name"] == device.name]
        rotated = await self.call(
            "POST", f"/devices/{found['id']}/credentials:rotate", done={200}, headers=self.admin
        )
        assert rotated.status_code == 200, rotated.text
        device.id, device.secret = found["id"], rotated.json()["credentials"]["secret"]

    async def send_batch(self, device: Device, first_ts: int, *, resend: bool) -> None:
        """One batch, retried with its key until acknowledged; `resend` as in `register`."""
        points = [
            {"metric": "temp", "value": float(first_ts % 1000 + i), "ts": first_ts + i}
            for i in range(POINTS_PER_BATCH)
        ]
        body, key = json.dumps(points).encode(), str(ULID())
        answers = [await self._post_points(device, body, key) for _ in range(2 if resend else 1)]
        for answer in answers:
            assert answer.status_code == 202, f"{device.id}: {answer.status_code} {answer.text}"
        assert len({answer.json()["message_id"] for answer in answers}) == 1, "one batch"
        self.resent["batch"] += len(answers) - 1
        accepted = [item["index"] for item in answers[-1].json()["items"]]
        assert accepted == list(range(POINTS_PER_BATCH)), answers[-1].text
        device.acked_ts.extend(first_ts + index for index in accepted)

    async def _post_points(self, device: Device, body: bytes, key: str) -> httpx.Response:
        self.posts_in_flight += 1
        try:
            return await self.call(
                "POST",
                f"/devices/{device.id}/telemetry",
                done={202},
                content=body,
                headers={"Content-Type": "application/json", "Idempotency-Key": key},
                auth=(device.id, device.secret),
            )
        finally:
            self.posts_in_flight -= 1

    async def run_device(self, device: Device, number: int) -> None:
        await asyncio.sleep(REGISTRATION_GAP_S * number)
        await self.register(device, resend=number % LOST_ANSWER_EVERY == 0)
        next_ts = int(time.time() * 1000) - 60_000
        sent = after_chaos = 0
        while after_chaos < BATCHES_AFTER_CHAOS:
            sent += 1
            await self.send_batch(device, next_ts, resend=sent % LOST_ANSWER_EVERY == 0)
            next_ts += POINTS_PER_BATCH
            self.sending.set()
            if self.chaos_over.is_set():
                after_chaos += 1
            await asyncio.sleep(BATCH_PAUSE_S)

    async def stored_ts(self, device: Device) -> list[int]:
        found: list[int] = []
        params: dict[str, Any] = {"metric": "temp", "from": "0", "limit": 10_000}
        while True:
            page = await self.call(
                "GET", f"/devices/{device.id}/telemetry", done={200}, params=params,
                headers=self.admin,
            )  # fmt: skip
            assert page.status_code == 200, page.text
            body = page.json()
            found.extend(_epoch_ms(item["ts"]) for item in body["items"])
            if not body.get("next_cursor"):
                return found
            params["cursor"] = body["next_cursor"]

    async def registered_names(self) -> list[str]:
        names: list[str] = []
        params: dict[str, Any] = {"limit": 1000}
        while True:
            page = await self.call("GET", "/devices", done={200}, params=params, headers=self.admin)
            assert page.status_code == 200, page.text
            body = page.json()
            names.extend(item["name"] for item in body["items"])
            if not body.get("next_cursor"):
                return names
            params["cursor"] = body["next_cursor"]

    async def healthy_instances(self, service: str) -> int:
        answer = await self.call(
            "GET", f"/services/{service}/instances", done={200}, params={"healthy": "true"},
            headers=self.admin,
        )  # fmt: skip
        return len(answer.json()["instances"]) if answer.status_code == 200 else -1


def _epoch_ms(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)


# --------------------------------------------------------------------------- chaos


@dataclass
class Chaos:
    killed: dict[str, int] = field(default_factory=dict)
    stopped_node: int = 0


async def _cause_chaos(platform: Platform, fleet: Fleet) -> Chaos:
    """SIGKILL one instance of every context, and stop one NATS node, while the load runs."""
    chaos = Chaos()
    await fleet.sending.wait()
    for index, context in enumerate(["telemetry", "devices", "registry", *_others()]):
        pid = min(platform.children()[context])
        os.kill(pid, signal.SIGKILL)
        chaos.killed[context] = pid
        await asyncio.sleep(1.0)
        if index == 1:
            chaos.stopped_node = platform.children()[NATS_NODE_STOPPED][0]
            os.kill(chaos.stopped_node, signal.SIGTERM)
            await asyncio.sleep(1.0)
    await _kill_gateway_mid_requests(platform, fleet, chaos)
    await _wait_for_restarts(platform, chaos)
    healthy = await _wait_for_registrations(fleet)
    assert healthy == dict.fromkeys(CONTEXTS, 2), healthy
    fleet.chaos_over.set()
    return chaos


async def _kill_gateway_mid_requests(platform: Platform, fleet: Fleet, chaos: Chaos) -> None:
    """The one gateway dies with telemetry requests under way: clients must retry them."""
    while fleet.posts_in_flight < 2:
        await asyncio.sleep(0.005)
    (pid,) = platform.children()["gateway"]
    os.kill(pid, signal.SIGKILL)
    chaos.killed["gateway"] = pid


def _others() -> list[str]:
    return [c for c in CONTEXTS if c not in ("telemetry", "devices", "registry")]


async def _wait_for_restarts(platform: Platform, chaos: Chaos, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _restarted(platform.children(), chaos):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"not restarted: {platform.children()}\n{platform.log_tail()}")


def _restarted(children: dict[str, list[int]], chaos: Chaos) -> bool:
    gone = set(chaos.killed.values()) | {chaos.stopped_node}
    services = all(
        len(children.get(context, [])) == 2 and not gone & set(children[context])
        for context in CONTEXTS
    )
    singles = [children.get(role, []) for role in ("gateway", NATS_NODE_STOPPED)]
    return services and all(len(pids) == 1 and pids[0] not in gone for pids in singles)


async def _wait_for_registrations(fleet: Fleet, timeout: float = 90) -> dict[str, int]:
    """Each context has two healthy instances in the registry (the restarted ones included)."""
    deadline = time.monotonic() + timeout
    healthy: dict[str, int] = {}
    while time.monotonic() < deadline:
        healthy = {c: await fleet.healthy_instances(c) for c in CONTEXTS}
        if all(count == 2 for count in healthy.values()):
            break
        await asyncio.sleep(1.0)
    return healthy


async def _writer_drained(platform: Platform, timeout: float = 120) -> dict[str, int]:
    """Wait until the telemetry writer has acked every message (so everything is stored)."""
    nc = await nats.connect(
        platform.nats_urls(), user="fleetmesh", password=platform.nats_password()
    )
    try:
        js = nc.jetstream(timeout=5)
        deadline = time.monotonic() + timeout
        backlog: dict[str, int] = {}
        while time.monotonic() < deadline:
            try:
                info = await js.consumer_info(TELEMETRY_STREAM, WRITER_DURABLE)
            except nats.errors.Error:
                await asyncio.sleep(0.5)
                continue
            backlog = {"pending": info.num_pending or 0, "ack_pending": info.num_ack_pending or 0}
            if not any(backlog.values()):
                break
            await asyncio.sleep(0.5)
        return backlog
    finally:
        await nc.close()


# --------------------------------------------------------------------------- the test


@pytest.fixture
async def fleet(platform: Platform) -> AsyncIterator[Fleet]:
    client = Fleet(platform.api, platform.admin_key())
    try:
        yield client
    finally:
        await client.close()


async def _mqtt_presence_is_followed(platform: Platform, fleet: Fleet, device: Device) -> None:
    """The status processes see MQTT sessions open and close on the cluster's listeners."""
    port = platform.mqtt_ports()[0]  # a node that was not stopped
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=device.id, username=device.id, password=device.secret
    ):
        await _status_becomes(fleet, device, lambda s: s["mqtt_connected"] is True)
    await _status_becomes(
        fleet, device, lambda s: (s["status"], s["cause"]) == ("offline", "mqtt_disconnect")
    )


async def _status_becomes(
    fleet: Fleet, device: Device, wanted: Callable[[dict[str, Any]], bool], timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        answer = await fleet.call(
            "GET", f"/devices/{device.id}/status", done={200}, headers=fleet.admin
        )
        status = answer.json()
        if wanted(status):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{device.id}: status stayed {status}")


async def test_nothing_acknowledged_is_lost_or_doubled_while_processes_die(
    platform: Platform, fleet: Fleet
) -> None:
    created = await fleet.call("POST", "/device-types", done={201}, json=DEVICE_TYPE,
                               headers=fleet.admin)  # fmt: skip
    assert created.status_code == 201, created.text

    async with asyncio.TaskGroup() as group:
        for index, device in enumerate(fleet.devices):
            group.create_task(fleet.run_device(device, index))
        chaos_task = group.create_task(_cause_chaos(platform, fleet))
    chaos = chaos_task.result()

    backlog = await _writer_drained(platform)
    assert backlog == {"pending": 0, "ack_pending": 0}

    names = Counter(await fleet.registered_names())
    assert names == Counter(device.name for device in fleet.devices), names
    for device in fleet.devices:
        stored = await fleet.stored_ts(device)
        duplicated = [ts for ts, count in Counter(stored).items() if count > 1]
        assert not duplicated, f"{device.id}: stored twice: {duplicated[:10]}"
        assert sorted(stored) == sorted(device.acked_ts), (
            f"{device.id}: {len(device.acked_ts)} acknowledged, {len(stored)} stored"
        )
    acknowledged = sum(len(device.acked_ts) for device in fleet.devices)
    # the numbers of the run, shown with -s
    print(  # noqa: T201
        f"\nacknowledged points: {acknowledged}, retries: {dict(fleet.retries)}, "
        f"sent again: {dict(fleet.resent)}, "
        f"killed: {chaos.killed}, stopped nats node pid: {chaos.stopped_node}"
    )

    await _mqtt_presence_is_followed(platform, fleet, fleet.devices[0])

    seen = set(platform.seen)
    assert _stop(platform) == 0, platform.log_tail()
    assert not [pid for pid in seen if _alive(pid)], "a child outlived fleetmesh up"
    assert not _pids_of_this_data_dir(platform.data_dir), "a process of this data dir is left"
