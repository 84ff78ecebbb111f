"""Webhook signatures in the Standard Webhooks style.

The signed content is ``{webhook-id}.{webhook-timestamp}.{body}`` (the raw body bytes), the
signature is HMAC-SHA256 with the secret's key, sent base64-encoded as ``v1,<signature>`` in
the ``webhook-signature`` header. That header may carry several space-separated signatures
(for example while a secret is rotated); verification passes when any ``v1`` one matches.

Secrets are written ``whsec_<base64 key>`` (a bare base64 key is accepted too); raw ``bytes``
are used as the key as they are. Timestamps are integer Unix seconds; verification rejects
those further than ``tolerance`` seconds from ``now`` in either direction, against replays.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping, Sequence

from fleetmesh.events.domain import InvalidWebhookSecret, SignatureVerificationFailed

SIGNATURE_VERSION = "v1"
SECRET_PREFIX = "whsec_"
HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"
DEFAULT_TOLERANCE_SECONDS = 300.0
SECRET_SIZE_BYTES = 32

Secret = str | bytes


def generate_secret(token_bytes: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """A new random secret in ``whsec_<base64>`` form."""
    return encode_secret(token_bytes(SECRET_SIZE_BYTES))


def encode_secret(key: bytes) -> str:
    """The ``whsec_<base64>`` text form of a raw key."""
    return SECRET_PREFIX + base64.b64encode(key).decode("ascii")


def decode_secret(secret: Secret) -> bytes:
    """The raw HMAC key of a secret; :class:`InvalidWebhookSecret` when empty or not base64."""
    if isinstance(secret, bytes):
        key = secret
    else:
        try:
            key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
        except binascii.Error as error:
            raise InvalidWebhookSecret([("secret", "must be whsec_ followed by base64")]) from error
    if not key:
        raise InvalidWebhookSecret([("secret", "must not be empty")])
    return key


def sign(secret: Secret, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one delivery."""
    content = b".".join((msg_id.encode("utf-8"), str(int(timestamp)).encode("ascii"), body))
    digest = hmac.new(decode_secret(secret), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signature_headers(secret: Secret, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three ``webhook-*`` headers of a signed delivery."""
    return {
        HEADER_ID: msg_id,
        HEADER_TIMESTAMP: str(int(timestamp)),
        HEADER_SIGNATURE: sign(secret, msg_id, timestamp, body),
    }


def verify(
    secret: Secret | Sequence[Secret],
    msg_id: str,
    timestamp: int | str,
    body: bytes,
    signature_header: str,
    *,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> None:
    """Check a delivery's signature; raise :class:`SignatureVerificationFailed` when it fails.

    ``secret`` may be a list of secrets (all currently valid during a rotation). Signatures
    are compared in constant time.
    """
    seconds = _parse_timestamp(timestamp)
    if seconds < now - tolerance:
        raise SignatureVerificationFailed("The webhook timestamp is too old.")
    if seconds > now + tolerance:
        raise SignatureVerificationFailed("The webhook timestamp is too far in the future.")
    offered = _offered_signatures(signature_header)
    candidates = [secret] if isinstance(secret, str | bytes) else list(secret)
    for candidate in candidates:
        expected = sign(candidate, msg_id, seconds, body).encode("ascii")
        if any(hmac.compare_digest(expected, signature) for signature in offered):
            return
    raise SignatureVerificationFailed("No webhook signature matches.")


def verify_headers(
    secret: Secret | Sequence[Secret],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> None:
    """:func:`verify` a delivery from its (case-insensitive) ``webhook-*`` headers."""
    lowered = {name.lower(): value for name, value in headers.items()}
    missing = [
        name for name in (HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE) if name not in lowered
    ]
    if missing:
        raise SignatureVerificationFailed(f"Missing webhook headers: {', '.join(missing)}.")
    verify(
        secret,
        lowered[HEADER_ID],
        lowered[HEADER_TIMESTAMP],
        body,
        lowered[HEADER_SIGNATURE],
        now=now,
        tolerance=tolerance,
    )


def _parse_timestamp(timestamp: int | str) -> int:
    if isinstance(timestamp, int) and not isinstance(timestamp, bool):
        return timestamp
    if isinstance(timestamp, str) and timestamp.isascii() and timestamp.isdigit():
        return int(timestamp)
    raise SignatureVerificationFailed("The webhook timestamp must be integer Unix seconds.")


def _offered_signatures(header: str) -> list[bytes]:
    prefix = SIGNATURE_VERSION + ","
    offered = [entry.encode("utf-8") for entry in header.split() if entry.startswith(prefix)]
    if not offered:
        raise SignatureVerificationFailed("The webhook signature header has no v1 signature.")
    return offered
