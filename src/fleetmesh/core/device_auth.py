"""Device credential checks across processes: a request/reply contract on NATS.

The devices context owns credentials and answers `rpc.devices.verify`
(`{"device_id", "secret"}` → `{"ok": bool}`) in a queue group, so any process
(telemetry, status, a gateway) can authenticate a device without holding its
hash. Positive answers are cached for a short time; rotation or deregistration
takes effect within that time in other processes, at once in the devices one.
When the question cannot be answered (no devices instance within the timeout,
a NATS reconnect, the devices database failing) the request gets 503 with
Retry-After, not 401: the credentials may well be valid.
"""

from __future__ import annotations

import hashlib
import time

import msgspec

from fleetmesh.core.backbone import Backbone
from fleetmesh.core.errors import Unavailable
from fleetmesh.core.logging import get_logger

log = get_logger(__name__)

VERIFY_SUBJECT = "rpc.devices.verify"
VERIFY_QUEUE = "devices-verify"
CACHE_SECONDS = 30.0


class VerifyRequest(msgspec.Struct):
    device_id: str
    secret: str


class VerifyReply(msgspec.Struct):
    ok: bool
    unavailable: bool = False
    """The devices service could not check (its database failed): neither yes nor no."""


class NatsDeviceVerifier:
    """Asks the devices service over NATS whether a device id and secret match."""

    def __init__(self, backbone: Backbone, *, timeout: float = 2.0) -> None:
        self.backbone = backbone
        self.timeout = timeout
        self._ok: dict[str, float] = {}

    async def verify_device(self, device_id: str, secret: str) -> bool:
        fingerprint = hashlib.sha256(f"{device_id}\0{secret}".encode()).hexdigest()
        verified_at = self._ok.get(fingerprint)
        if verified_at is not None and time.monotonic() - verified_at < CACHE_SECONDS:
            return True
        payload = msgspec.json.encode(VerifyRequest(device_id, secret))
        try:
            reply = await self.backbone.nc.request(VERIFY_SUBJECT, payload, timeout=self.timeout)
            answer = msgspec.json.decode(reply.data, type=VerifyReply)
        except Exception as error:
            log.warning("device_verify_unavailable", error=repr(error))
            raise Unavailable("Device credentials cannot be checked right now; retry.") from None
        if answer.unavailable:
            raise Unavailable("Device credentials cannot be checked right now; retry.")
        ok = answer.ok
        if ok:
            if len(self._ok) > 100_000:
                self._ok.clear()
            self._ok[fingerprint] = time.monotonic()
        return ok
