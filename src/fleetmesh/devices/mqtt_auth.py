"""Answers the nats-server auth callout, so MQTT devices log in with their id and secret.

nats-server sends every login that is not one of fleetmesh's own users to
`$SYS.REQ.USER.AUTH` as an authorization request JWT; this responder checks
the device and answers with an authorization response JWT, signed by the
callout issuer, that carries a user JWT for the IOT account. A device may only
publish and subscribe under `devices.<id>.>` (MQTT `devices/<id>/...`), only
over MQTT, and only with client id = device id, so no device can take over
another's session ("Duplicate Client ID").

A user JWT lives `login_ttl_s` (1 h by default, less up to 10 % jitter so a
fleet that connected together does not reconnect together): permissions are
fixed for a connection's life, so this bounds how long a deregistered or
rotated device stays connected; at expiry the server disconnects the client
and a well-behaved client logs in again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import nkeys

from fleetmesh.core.backbone import Backbone
from fleetmesh.core.logging import get_logger
from fleetmesh.core.nats_server import SERVICE_ACCOUNT
from fleetmesh.devices.service import DeviceQueries

log = get_logger(__name__)

CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"
CALLOUT_QUEUE = "devices-auth-callout"
LOGIN_TTL_S = 3600.0
MAX_CONCURRENT_LOGINS = 16
TTL_JITTER = 0.1
JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
BAD_CREDENTIALS = "invalid device credentials"


class _ServerId(msgspec.Struct):
    id: str


class _ClientInfo(msgspec.Struct):
    type: str = ""
    mqtt_id: str = ""


class _ConnectOpts(msgspec.Struct):
    user: str = ""
    password: str = msgspec.field(name="pass", default="")


class _RequestBody(msgspec.Struct):
    server_id: _ServerId
    user_nkey: str
    client_info: _ClientInfo = msgspec.field(default_factory=_ClientInfo)
    connect_opts: _ConnectOpts = msgspec.field(default_factory=_ConnectOpts)


class _RequestClaims(msgspec.Struct):
    nats: _RequestBody
    exp: int = 0


@dataclass(frozen=True, slots=True)
class LoginRequest:
    """What a connecting client presented, from the server's authorization request."""

    server_id: str
    user_nkey: str
    client_type: str
    client_id: str
    device_id: str
    secret: str
    expires_at: int = 0
    """When the server stops waiting for the answer (epoch seconds; 0: not said)."""

    def expired(self, now: float) -> bool:
        return 0 < self.expires_at < now


def decode_request(token: bytes) -> LoginRequest:
    """The claims of an authorization request JWT (raises `ValueError` if malformed).

    The signature is not checked: only the server and fleetmesh's own service
    user can publish on the callout subject (devices may publish under
    `devices.<id>.>` only), and a forged request gains nothing without the
    device's secret.
    """
    parts = token.split(b".")
    if len(parts) != 3:
        raise ValueError("not a JWT")
    try:
        claims = msgspec.json.decode(_b64decode(parts[1]), type=_RequestClaims)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise ValueError(f"bad authorization request: {error}") from None
    body = claims.nats
    return LoginRequest(
        server_id=body.server_id.id,
        user_nkey=body.user_nkey,
        client_type=body.client_info.type,
        client_id=body.client_info.mqtt_id,
        device_id=body.connect_opts.user,
        secret=body.connect_opts.password,
        expires_at=claims.exp,
    )


def refusal(request: LoginRequest) -> str | None:
    """Why a login is refused before its secret is even checked, or None."""
    if request.client_type != "mqtt":
        return "only MQTT clients can log in as devices"
    if not request.device_id or not request.secret:
        return BAD_CREDENTIALS
    if request.client_id != request.device_id:
        return "the MQTT client id must be the device id"
    return None


def device_permissions(device_id: str) -> dict[str, Any]:
    """The NATS side of `devices/<id>/#`: the bare subject is what MQTT's `#` also matches."""
    own = f"devices.{device_id}.>"
    return {
        "pub": {"allow": [own]},
        "sub": {"allow": [own, f"devices.{device_id}"]},
    }


def user_claims(
    *, device_id: str, user_nkey: str, issuer: str, now: int, expires: int
) -> dict[str, Any]:
    return {
        "iat": now,
        "exp": expires,
        "iss": issuer,
        "sub": user_nkey,
        "aud": SERVICE_ACCOUNT,
        "name": device_id,
        "nats": {
            **device_permissions(device_id),
            "subs": -1,
            "data": -1,
            "payload": -1,
            "allowed_connection_types": ["MQTT"],
            "type": "user",
            "version": 2,
        },
    }


def response_claims(
    request: LoginRequest, *, issuer: str, now: int, user_jwt: str | None, error: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "authorization_response", "version": 2}
    if user_jwt is not None:
        body["jwt"] = user_jwt
    if error is not None:
        body["error"] = error
    return {
        "iat": now,
        "iss": issuer,
        "sub": request.user_nkey,
        "aud": request.server_id,
        "nats": body,
    }


def encode_jwt(claims: dict[str, Any], signer: Any) -> str:
    """A NATS v2 JWT: base64url JSON header and claims, ed25519 signature by an nkey."""
    identified = {**claims, "jti": ""}
    digest = hashlib.sha256(_json(identified)).digest()
    identified["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signing_input = _b64encode(_json(JWT_HEADER)) + "." + _b64encode(_json(identified))
    signature: bytes = signer.sign(signing_input.encode())
    return signing_input + "." + _b64encode(signature)


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _b64decode(text: bytes) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except ValueError as error:
        raise ValueError(f"bad base64url: {error}") from None


class MqttAuthResponder:
    """Answers auth callout requests in a queue group: replicas share the logins."""

    def __init__(
        self,
        backbone: Backbone,
        queries: DeviceQueries,
        issuer_seed: str,
        *,
        login_ttl_s: float = LOGIN_TTL_S,
    ) -> None:
        self.backbone = backbone
        self.queries = queries
        self.login_ttl_s = login_ttl_s
        self._signer = nkeys.from_seed(issuer_seed.encode())
        self._issuer = self._signer.public_key.decode()
        self._subscription: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_LOGINS)

    async def start(self) -> None:
        self._subscription = await self.backbone.nc.subscribe(
            CALLOUT_SUBJECT, queue=CALLOUT_QUEUE, cb=self._dispatch
        )

    async def stop(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)

    async def _dispatch(self, message: Any) -> None:
        # nats-py awaits a subscription's callback before the next message: one
        # task per login lets logins wait for argon2 side by side.
        task = asyncio.create_task(self._answer(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, message: Any) -> None:
        try:
            request = decode_request(message.data)
        except ValueError as error:
            log.warning("mqtt_auth_bad_request", error=str(error))
            return
        async with self._slots:
            # In a reconnect storm, work on a login the server gave up on (it
            # waits ~2 s) would only make the next ones late too: skip it.
            if request.expired(time.time()):
                log.info("mqtt_login_too_late", device_id=request.device_id)
                return
            reason = await self._check(request)
        if reason is not None:
            log.info("mqtt_login_refused", device_id=request.device_id, reason=reason)
        with contextlib.suppress(Exception):
            await message.respond(self._response(request, reason).encode())

    async def _check(self, request: LoginRequest) -> str | None:
        reason = refusal(request)
        if reason is not None:
            return reason
        try:
            ok = await self.queries.verify_device(request.device_id, request.secret)
        except Exception as error:
            log.warning("mqtt_auth_verify_failed", error=repr(error))
            return "device registry unavailable"
        return None if ok else BAD_CREDENTIALS

    def _response(self, request: LoginRequest, error: str | None) -> str:
        # Wall-clock seconds: the server checks `exp` against its own clock.
        now = int(time.time())
        user_jwt = None
        if error is None:
            lifetime = self.login_ttl_s * (1 - TTL_JITTER * random.random())
            claims = user_claims(
                device_id=request.device_id,
                user_nkey=request.user_nkey,
                issuer=self._issuer,
                now=now,
                expires=now + max(1, int(lifetime)),
            )
            user_jwt = encode_jwt(claims, self._signer)
        claims = response_claims(
            request, issuer=self._issuer, now=now, user_jwt=user_jwt, error=error
        )
        return encode_jwt(claims, self._signer)
