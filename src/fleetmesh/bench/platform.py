"""A `fleetmesh up` subprocess for benchmarks, and what /proc says about processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from fleetmesh.core.auth import ApiKeyStore, Role
from fleetmesh.core.database import Database
from fleetmesh.core.nats_server import die_with_parent
from fleetmesh.core.ports import free_port
from fleetmesh.core.settings import to_async_url

_PORT_IN_USE_EXIT = 2


class BenchError(RuntimeError):
    """The benchmark could not run (the platform did not start, a request failed)."""


def percentile(ordered: list[float], share: float) -> float:
    """The `share` quantile (0..1) of an ascending list (nearest rank); 0 when empty."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


class PlatformProcess:
    """A `fleetmesh up` subprocess on free loopback ports, for benchmarks.

    It dies with the benchmark process (PR_SET_PDEATHSIG), like its own
    nats-server child dies with it; `stop()` ends it with SIGTERM and makes
    sure no process of its tree is left.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        base_url: str,
        data_dir: Path,
        log_path: Path,
        database_url: str | None = None,
        nats_port: int = 0,
    ) -> None:
        self.process = process
        self.base_url = base_url
        self.nats_url = f"nats://127.0.0.1:{nats_port}"
        self.data_dir = data_dir
        self.log_path = log_path
        self.database_url = database_url
        self.api_key = ""
        self.tree: list[int] = []
        self._own_key_id: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    @classmethod
    async def start(
        cls,
        work_dir: Path,
        *,
        database_url: str | None = None,
        extra_args: tuple[str, ...] = (),
        timeout: float = 90.0,
    ) -> PlatformProcess:
        """Start `fleetmesh up` and wait until `/readyz` answers 200 (retrying taken ports)."""
        for attempt in range(3):
            data_dir = work_dir / f"data-{attempt}"
            log_path = work_dir / f"platform-{attempt}.log"
            platform = cls._spawn(data_dir, log_path, database_url, extra_args)
            try:
                ready = await platform._wait_ready(timeout)
            except BaseException:
                await platform.stop()
                raise
            if ready:
                platform.tree = descendants(platform.pid)
                try:
                    await platform._obtain_key()
                except BaseException:
                    await platform.stop()
                    raise
                return platform
            await platform.stop()
        raise BenchError("fleetmesh up could not bind free ports three times")

    @classmethod
    def _spawn(
        cls,
        data_dir: Path,
        log_path: Path,
        database_url: str | None,
        extra_args: tuple[str, ...] = (),
    ) -> PlatformProcess:
        http_port = free_port()
        nats_port = free_port()
        command = [
            sys.executable,
            "-m",
            "fleetmesh.cli",
            "up",
            "--data-dir",
            str(data_dir),
            "--http-port",
            str(http_port),
            "--nats-port",
            str(nats_port),
            "--mqtt-port",
            str(free_port()),
            "--log-level",
            "WARNING",
            *extra_args,
        ]
        if database_url:
            command += ["--database-url", database_url]
        # Only the flags configure it: no FLEETMESH_* variable of this shell leaks in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMESH_")}
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=die_with_parent,
                start_new_session=True,
            )
        base_url = f"http://127.0.0.1:{http_port}"
        return cls(process, base_url, data_dir, log_path, database_url, nats_port)

    async def _obtain_key(self) -> None:
        """The admin key of a fresh data dir; on a database that has keys, an operator key."""
        key_file = self.data_dir / "admin.key"
        if key_file.exists():
            self.api_key = key_file.read_text().strip()
            return
        database = Database(to_async_url(self.database_url or self._sqlite_url()))
        try:
            record, self.api_key = await ApiKeyStore(database).create(
                role=Role.operator, name="fleetmesh bench"
            )
            self._own_key_id = record.id
        finally:
            await database.dispose()

    async def _revoke_own_key(self) -> None:
        key_id, self._own_key_id = self._own_key_id, None
        if key_id is None:
            return
        database = Database(to_async_url(self.database_url or self._sqlite_url()))
        try:
            await ApiKeyStore(database).revoke(key_id)
        finally:
            await database.dispose()

    def _sqlite_url(self) -> str:
        return f"sqlite+aiosqlite:///{(self.data_dir / 'fleetmesh.db').resolve()}"

    async def _wait_ready(self, timeout: float) -> bool:
        """True once ready; False if it exited because a port was taken; raises otherwise."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2) as client:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code == _PORT_IN_USE_EXIT:
                    return False
                if code is not None:
                    raise BenchError(f"fleetmesh up exited with {code}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/readyz")).status_code == 200:
                        return True
                await asyncio.sleep(0.1)
        raise BenchError(f"fleetmesh up was not ready within {timeout}s:\n{self.log_tail()}")

    def log_tail(self, size: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-size:]

    def client(self, **extra: Any) -> httpx.AsyncClient:
        """An HTTP client of the platform with an operator (or the admin) key."""
        return httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=httpx.Timeout(120.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
            **extra,
        )

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time used so far by (the platform process, its child processes)."""
        children = sum(cpu_seconds(pid) for pid in descendants(self.pid))
        return cpu_seconds(self.pid), children

    def rss(self) -> tuple[int, int]:
        """Resident bytes of (the platform process, its child processes)."""
        children = sum(rss_bytes(pid) for pid in descendants(self.pid))
        return rss_bytes(self.pid), children

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait (SIGKILL after `timeout`); then no process of its tree is left.

        A key the bench created in a reused database is revoked.
        """
        try:
            await self._revoke_own_key()
        finally:
            await self._end_processes(timeout)

    async def _end_processes(self, timeout: float) -> None:
        tree = sorted(set(self.tree) | set(descendants(self.pid)))
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(self._ours(pid) for pid in tree):
            await asyncio.sleep(0.1)
        for pid in tree:
            if self._ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _ours(self, pid: int) -> bool:
        """Still alive and still one of this platform's (its command line names our data dir)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z" and str(self.data_dir).encode() in cmdline


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from /proc."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                children = [int(child) for child in task.read_text().split()]
                found.extend(children)
                pending.extend(children)
    return found


def rss_bytes(pid: int) -> int:
    """The resident set size of one process (VmRSS), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far, 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
