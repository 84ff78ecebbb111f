"""Standard Webhooks signatures: the published vector, round trips, tampering, replay window."""

from __future__ import annotations

import pytest

from fleetmesh.events.domain import InvalidWebhookSecret, SignatureVerificationFailed
from fleetmesh.events.signing import (
    decode_secret,
    encode_secret,
    generate_secret,
    sign,
    signature_headers,
    verify,
    verify_headers,
)

pytestmark = pytest.mark.unit

# The example from the Standard Webhooks specification.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = b'{"test": 2432232314}'
SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_specification_example_signs_as_published() -> None:
    assert sign(SECRET, MSG_ID, TIMESTAMP, BODY) == SIGNATURE


def test_headers_round_trip() -> None:
    headers = signature_headers(SECRET, MSG_ID, TIMESTAMP, BODY)

    assert headers == {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(TIMESTAMP),
        "webhook-signature": SIGNATURE,
    }
    verify_headers(SECRET, {k.title(): v for k, v in headers.items()}, BODY, now=TIMESTAMP + 5)


@pytest.mark.parametrize(
    ("msg_id", "timestamp", "body", "signature"),
    [
        (MSG_ID, TIMESTAMP, b'{"test": 2432232315}', SIGNATURE),
        ("msg_other", TIMESTAMP, BODY, SIGNATURE),
        (MSG_ID, TIMESTAMP + 1, BODY, SIGNATURE),
        (MSG_ID, TIMESTAMP, BODY, SIGNATURE[:-2] + "A="),
        (MSG_ID, TIMESTAMP, BODY, "v2," + SIGNATURE[3:]),
        (MSG_ID, TIMESTAMP, BODY, ""),
    ],
    ids=["body", "id", "timestamp", "signature", "version", "empty"],
)
def test_tampering_is_detected(msg_id: str, timestamp: int, body: bytes, signature: str) -> None:
    with pytest.raises(SignatureVerificationFailed):
        verify(SECRET, msg_id, timestamp, body, signature, now=TIMESTAMP)


def test_a_different_secret_fails() -> None:
    with pytest.raises(SignatureVerificationFailed):
        verify(generate_secret(), MSG_ID, TIMESTAMP, BODY, SIGNATURE, now=TIMESTAMP)


@pytest.mark.parametrize("offset", [-301, 301])
def test_timestamps_outside_the_tolerance_are_rejected(offset: int) -> None:
    with pytest.raises(SignatureVerificationFailed):
        verify(SECRET, MSG_ID, TIMESTAMP, BODY, SIGNATURE, now=TIMESTAMP - offset)


def test_the_tolerance_is_configurable() -> None:
    verify(SECRET, MSG_ID, TIMESTAMP, BODY, SIGNATURE, now=TIMESTAMP + 3600, tolerance=3600)


@pytest.mark.parametrize("timestamp", ["", "12.5", "-5", "1e9", "١٢"])
def test_malformed_timestamps_are_rejected(timestamp: str) -> None:
    with pytest.raises(SignatureVerificationFailed):
        verify(SECRET, MSG_ID, timestamp, BODY, SIGNATURE, now=TIMESTAMP)


def test_any_listed_signature_and_any_current_secret_may_match() -> None:
    new_secret = generate_secret()
    header = f"v1a,ignored {sign(new_secret, MSG_ID, TIMESTAMP, BODY)} {SIGNATURE}"

    verify(SECRET, MSG_ID, str(TIMESTAMP), BODY, header, now=TIMESTAMP)
    verify([generate_secret(), new_secret], MSG_ID, TIMESTAMP, BODY, header, now=TIMESTAMP)


def test_missing_headers_are_named() -> None:
    with pytest.raises(SignatureVerificationFailed, match="webhook-signature"):
        verify_headers(SECRET, {"webhook-id": MSG_ID, "webhook-timestamp": "1"}, BODY, now=1)


def test_secrets_encode_and_decode() -> None:
    key = bytes(range(32))

    assert decode_secret(encode_secret(key)) == key
    assert decode_secret(encode_secret(key).removeprefix("whsec_")) == key
    assert decode_secret(key) == key
    assert generate_secret(lambda size: b"\x01" * size) == encode_secret(b"\x01" * 32)


@pytest.mark.parametrize("secret", ["whsec_", "whsec_not base64!", b""])
def test_bad_secrets_are_rejected(secret: str | bytes) -> None:
    with pytest.raises(InvalidWebhookSecret):
        decode_secret(secret)
