"""MQTT presence from the NATS system account: connect and disconnect events.

nats-server publishes `$SYS.ACCOUNT.<account>.CONNECT` / `.DISCONNECT` for every
client of the account to system-account users only, so this listens on a
second NATS connection as the system user. MQTT clients carry
`client_type: "mqtt"` and the MQTT client id (= the device id, which the auth
callout enforces) in `client.client_id`; a disconnect has a `reason`
("Client Closed", "Read Error" for a keepalive timeout, "Duplicate Client ID"
when the same device connected again).

A device may briefly hold two connections (a reconnect overtaking the old
session): each open connection is tracked by `(server id, client id)` and the
device goes offline only when its last one closes.

Events are missed while nothing listens, so at start and after every reconnect
of this connection the presence is reconciled with `$SYS.REQ.SERVER.PING.CONNZ`
(every server answers with its open connections): devices connected now are
reported online, devices stored as connected that are not are reported offline.
Events that arrive while a reconciliation runs are held back and applied after
it, unless the snapshot already reflects them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats
from nats.aio.client import Client

from fleetmesh.core.backbone import NatsEndpoint
from fleetmesh.core.clock import Clock, from_rfc3339
from fleetmesh.core.logging import get_logger
from fleetmesh.core.tasks import stop_task
from fleetmesh.status.domain import DeviceState, StatusCause, StatusReport
from fleetmesh.status.liveness import ReportBatcher
from fleetmesh.status.service import StatusService

log = get_logger(__name__)

CONNZ_PING = "$SYS.REQ.SERVER.PING.CONNZ"
CONNZ_PAGE = 10_000
CONNZ_FIRST_REPLY_S = 2.0
CONNZ_MORE_REPLIES_S = 0.25

ConnectionKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    connected: bool
    device_id: str
    key: ConnectionKey
    at: datetime
    reason: str = ""


def parse_presence_event(subject: str, data: bytes) -> PresenceEvent | None:
    """An MQTT client's connect or disconnect, or None for anything else."""
    try:
        body = json.loads(data)
        client = body["client"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(client, dict) or client.get("client_type") != "mqtt":
        return None
    device_id = client.get("client_id") or client.get("name") or client.get("user")
    if not isinstance(device_id, str) or not device_id:
        return None
    try:
        at = from_rfc3339(str(body.get("timestamp") or client.get("stop") or client["start"]))
    except (KeyError, ValueError):
        return None
    server = body.get("server") or {}
    key = (str(server.get("id", "")), int(client.get("id", 0)))
    connected = subject.endswith(".CONNECT")
    if not connected and not subject.endswith(".DISCONNECT"):
        return None
    return PresenceEvent(connected, device_id, key, at, str(body.get("reason", "")))


class MqttPresence:
    """Turns MQTT connections into online/offline reports for the devices they belong to."""

    def __init__(
        self,
        endpoint: NatsEndpoint | None,
        *,
        account: str,
        batcher: ReportBatcher,
        service: StatusService,
        clock: Clock,
    ) -> None:
        self.endpoint = endpoint
        self.account = account
        self.batcher = batcher
        self.service = service
        self.clock = clock
        self._nc: Client | None = None
        self._connections: dict[str, set[ConnectionKey]] = {}
        self._reconciling = False
        self._held: list[PresenceEvent] = []
        self._reconcile_task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.endpoint is not None

    def connected_devices(self) -> set[str]:
        return set(self._connections)

    async def start(self) -> None:
        if self.endpoint is None:
            log.info("mqtt_presence_disabled", reason="no system-account NATS credentials")
            return
        try:
            await self._connect(self.endpoint)
        except Exception as error:  # status works without it: timeouts still apply
            log.warning("mqtt_presence_unavailable", error=repr(error))
            await self.stop()

    async def _connect(self, endpoint: NatsEndpoint) -> None:
        self._nc = await nats.connect(
            servers=endpoint.servers,
            user=endpoint.user,
            password=endpoint.password,
            name="fleetmesh-status-presence",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            reconnected_cb=self._on_reconnected,
            error_cb=self._on_error,
        )
        for kind in ("CONNECT", "DISCONNECT"):
            await self._nc.subscribe(f"$SYS.ACCOUNT.{self.account}.{kind}", cb=self._on_message)
        await self._nc.flush()
        self._reconciling = True  # hold events from now until the snapshot is applied
        self._reconcile_task = asyncio.create_task(self.reconcile(), name="status-reconcile")

    async def stop(self) -> None:
        task, self._reconcile_task = self._reconcile_task, None
        await stop_task(task)
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _on_message(self, message: Any) -> None:
        self.handle(message.subject, message.data)

    def handle(self, subject: str, data: bytes) -> None:
        """Take one `$SYS.ACCOUNT.<acc>.CONNECT|DISCONNECT` message."""
        event = parse_presence_event(subject, data)
        if event is None:
            return
        if self._reconciling:
            self._held.append(event)
            return
        self._apply(event)

    def _apply(self, event: PresenceEvent) -> None:
        open_connections = self._connections.setdefault(event.device_id, set())
        if event.connected:
            open_connections.add(event.key)
            self.batcher.submit(
                event.device_id,
                StatusReport(
                    DeviceState.ONLINE, StatusCause.MQTT_CONNECT, event.at, detail="MQTT connected"
                ),
                mqtt_connected=True,
            )
            return
        open_connections.discard(event.key)
        if open_connections:
            return  # another session of the same device is still open
        del self._connections[event.device_id]
        reason = f"MQTT disconnected: {event.reason}" if event.reason else "MQTT disconnected"
        self.batcher.submit(
            event.device_id,
            StatusReport(DeviceState.OFFLINE, StatusCause.MQTT_DISCONNECT, event.at, detail=reason),
            mqtt_connected=False,
        )

    async def wait_reconciled(self) -> None:
        """Wait for the reconciliation in progress, if any (tests, orderly start)."""
        task = self._reconcile_task
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def reconcile(self) -> None:
        """Align stored MQTT presence with the connections the servers hold right now."""
        if self._nc is None:
            return
        self._reconciling = True
        snapshot_at: datetime | None = None
        try:
            connections, snapshot_at = await self._connz()
            stored = await self.service.mqtt_connected_ids()
            self._connections = connections
            for device_id in connections:
                self.batcher.submit(
                    device_id,
                    StatusReport(
                        DeviceState.ONLINE,
                        StatusCause.MQTT_CONNECT,
                        snapshot_at,
                        detail="MQTT connection open",
                    ),
                    mqtt_connected=True,
                )
            for device_id in stored - set(connections):
                self.batcher.submit(
                    device_id,
                    StatusReport(
                        DeviceState.OFFLINE,
                        StatusCause.MQTT_DISCONNECT,
                        snapshot_at,
                        detail="no MQTT connection (reconciled)",
                    ),
                    mqtt_connected=False,
                )
            log.info("mqtt_presence_reconciled", connected=len(connections))
        except Exception as error:
            log.warning("mqtt_presence_reconcile_failed", error=repr(error))
        finally:
            self._reconciling = False
            held, self._held = self._held, []
            for event in held:
                if snapshot_at is None or event.at > snapshot_at:
                    self._apply(event)

    async def _connz(self) -> tuple[dict[str, set[ConnectionKey]], datetime]:
        """Every open MQTT connection of the account, on every server, with paging."""
        assert self._nc is not None
        connections: dict[str, set[ConnectionKey]] = {}
        replies = await self._gather(CONNZ_PING, self._connz_request(0))
        snapshot_at = self.clock.now()
        for reply in replies:
            server_id = str(reply.get("server", {}).get("id", ""))
            data = reply.get("data") or {}
            if data.get("now"):
                snapshot_at = min(snapshot_at, from_rfc3339(str(data["now"])))
            self._collect(connections, server_id, data)
            offset = int(data.get("offset", 0)) + len(data.get("connections") or [])
            while offset < int(data.get("total", 0)):
                answer = await self._nc.request(
                    f"$SYS.REQ.SERVER.{server_id}.CONNZ", self._connz_request(offset), timeout=5
                )
                data = json.loads(answer.data).get("data") or {}
                page = data.get("connections") or []
                if not page:
                    break
                self._collect(connections, server_id, data)
                offset += len(page)
        return connections, snapshot_at

    def _connz_request(self, offset: int) -> bytes:
        return json.dumps({"acc": self.account, "offset": offset, "limit": CONNZ_PAGE}).encode()

    @staticmethod
    def _collect(
        connections: dict[str, set[ConnectionKey]], server_id: str, data: dict[str, Any]
    ) -> None:
        for connection in data.get("connections") or []:
            device_id = connection.get("mqtt_client")
            if connection.get("type") == "mqtt" and device_id:
                connections.setdefault(str(device_id), set()).add(
                    (server_id, int(connection.get("cid", 0)))
                )

    async def _gather(self, subject: str, payload: bytes) -> list[dict[str, Any]]:
        """Publish a request every server answers; collect answers until they stop coming."""
        assert self._nc is not None
        inbox = self._nc.new_inbox()
        subscription = await self._nc.subscribe(inbox)
        replies: list[dict[str, Any]] = []
        try:
            await self._nc.publish(subject, payload, reply=inbox)
            wait = CONNZ_FIRST_REPLY_S
            while True:
                try:
                    message = await subscription.next_msg(timeout=wait)
                except nats.errors.TimeoutError:
                    break
                replies.append(json.loads(message.data))
                wait = CONNZ_MORE_REPLIES_S
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        if not replies:
            raise TimeoutError("no server answered the CONNZ request")
        return replies

    async def _on_reconnected(self) -> None:
        if self._reconcile_task is None or self._reconcile_task.done():
            self._reconcile_task = asyncio.create_task(self.reconcile(), name="status-reconcile")

    async def _on_error(self, error: Exception) -> None:
        log.warning("mqtt_presence_nats_error", error=str(error))
