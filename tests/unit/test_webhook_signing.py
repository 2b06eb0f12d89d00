"""Standard Webhooks signing: the spec's published vector, rotation, tampering, old timestamps."""

from __future__ import annotations

import base64

import pytest

from services.alarms.webhooks.signing import (
    WebhookSecretError,
    WebhookVerificationError,
    check_secret,
    decode_secret,
    generate_secret,
    sign,
    sign_headers,
    verify,
)

# From the Standard Webhooks reference libraries' tests (also in Svix's docs).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_spec_vector() -> None:
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE


def test_spec_vector_verifies() -> None:
    headers = {"webhook-id": SPEC_ID, "webhook-timestamp": str(SPEC_TS), "webhook-signature": SPEC_SIGNATURE}
    assert verify(headers, SPEC_BODY, SPEC_SECRET, now=SPEC_TS + 10) == SPEC_ID


def test_headers_case_insensitive_and_roundtrip() -> None:
    secret = generate_secret()
    headers = sign_headers([secret], "msg_1", 1_700_000_000, b"{}")
    upper = {k.upper(): v for k, v in headers.items()}
    assert verify(upper, b"{}", [secret], now=1_700_000_000) == "msg_1"


def test_tampered_body_fails() -> None:
    secret = generate_secret()
    headers = sign_headers([secret], "msg_1", 1_700_000_000, b'{"severity":"minor"}')
    with pytest.raises(WebhookVerificationError, match="no signature matches"):
        verify(headers, b'{"severity":"critical"}', secret, now=1_700_000_000)


def test_tampered_id_or_timestamp_fails() -> None:
    secret = generate_secret()
    headers = sign_headers([secret], "msg_1", 1_700_000_000, b"{}")
    with pytest.raises(WebhookVerificationError):
        verify({**headers, "webhook-id": "msg_2"}, b"{}", secret, now=1_700_000_000)
    with pytest.raises(WebhookVerificationError):
        verify({**headers, "webhook-timestamp": "1700000001"}, b"{}", secret, now=1_700_000_000)


def test_old_and_future_timestamps_rejected() -> None:
    secret = generate_secret()
    headers = sign_headers([secret], "msg_1", 1_700_000_000, b"{}")
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(headers, b"{}", secret, now=1_700_000_000 + 301)
    with pytest.raises(WebhookVerificationError, match="future"):
        verify(headers, b"{}", secret, now=1_700_000_000 - 301)
    assert verify(headers, b"{}", secret, now=1_700_000_000 + 299) == "msg_1"
    assert verify(headers, b"{}", secret, tolerance=1000, now=1_700_000_000 + 900) == "msg_1"


def test_rotation_both_signatures_verify_each() -> None:
    old, new = generate_secret(), generate_secret()
    headers = sign_headers([old, new], "msg_1", 1_700_000_000, b"body")
    entries = headers["webhook-signature"].split(" ")
    assert len(entries) == 2 and all(e.startswith("v1,") for e in entries)
    assert verify(headers, b"body", old, now=1_700_000_000) == "msg_1"
    assert verify(headers, b"body", new, now=1_700_000_000) == "msg_1"
    with pytest.raises(WebhookVerificationError):
        verify(headers, b"body", generate_secret(), now=1_700_000_000)


def test_other_versions_ignored_and_garbage_rejected() -> None:
    secret = generate_secret()
    headers = sign_headers([secret], "msg_1", 1_700_000_000, b"x")
    headers["webhook-signature"] = "v1a,AAAA " + headers["webhook-signature"]
    assert verify(headers, b"x", secret, now=1_700_000_000) == "msg_1"
    with pytest.raises(WebhookVerificationError, match="no v1"):
        verify({**headers, "webhook-signature": "v1a,AAAA"}, b"x", secret, now=1_700_000_000)
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify({"webhook-id": "msg_1"}, b"x", secret)
    with pytest.raises(WebhookVerificationError, match="integer"):
        verify({**headers, "webhook-timestamp": "soon"}, b"x", secret)


def test_secrets() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_") and len(decode_secret(secret)) == 32
    assert decode_secret(SPEC_SECRET) == base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert decode_secret("whsec_" + base64.b64encode(b"x" * 25).decode().rstrip("=")) == b"x" * 25
    with pytest.raises(WebhookSecretError):
        decode_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    with pytest.raises(WebhookSecretError):
        decode_secret("whsec_!!!not base64!!!")
    with pytest.raises(WebhookSecretError, match="bytes"):
        check_secret("whsec_" + base64.b64encode(b"short").decode())
    with pytest.raises(WebhookSecretError) as info:
        check_secret("whsec_" + base64.b64encode(b"short").decode())
    assert "c2hvcnQ" not in str(info.value)


def test_id_with_dot_refused() -> None:
    with pytest.raises(ValueError):
        sign(generate_secret(), "msg.1", 1, b"")
