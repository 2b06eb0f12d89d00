"""Standard Webhooks (v1.0.0) signing and verification; pure.

Every request carries three headers:

* ``webhook-id``: the notification's id, the same on every retry (the receiver's idempotency key);
* ``webhook-timestamp``: integer Unix seconds of this attempt (changes on each retry);
* ``webhook-signature``: a space-separated list of ``v1,<base64 HMAC-SHA256>``, one per current secret,
  each over the bytes ``f"{id}.{timestamp}.".encode() + body`` (the exact body sent).

Secrets are written in the spec's form ``whsec_<base64 of 24..64 random bytes>``.  During a rotation a
subscription has two secrets, both sign, and a receiver that knows either one verifies the request.

``verify`` is what a receiver runs (our tests, and later ``roost webhook listen``): the timestamp must be
within ``tolerance`` seconds of now (either way), and at least one ``v1`` signature must match one of
the receiver's secrets, compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _random
import time
from collections.abc import Mapping, Sequence

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
H_ID = "webhook-id"
H_TIMESTAMP = "webhook-timestamp"
H_SIGNATURE = "webhook-signature"
DEFAULT_TOLERANCE = 300.0          # seconds, as the spec's reference libraries
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64


class WebhookSecretError(ValueError):
    """A secret is not in the ``whsec_<base64>`` form or has the wrong length.  Never quotes the secret."""


class WebhookVerificationError(Exception):
    """A request failed verification: a header is missing, the timestamp is off, or no signature matches."""


def generate_secret(nbytes: int = 32) -> str:
    """A new random secret in the ``whsec_`` form."""
    if not MIN_SECRET_BYTES <= nbytes <= MAX_SECRET_BYTES:
        raise ValueError(f"a secret has {MIN_SECRET_BYTES}..{MAX_SECRET_BYTES} bytes, not {nbytes}")
    return SECRET_PREFIX + base64.b64encode(_random.token_bytes(nbytes)).decode("ascii")


def decode_secret(secret: str) -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret (missing base64 padding is tolerated); pure."""
    if not secret.startswith(SECRET_PREFIX):
        raise WebhookSecretError("a webhook secret must start with 'whsec_'")
    text = secret[len(SECRET_PREFIX):].strip()
    text += "=" * (-len(text) % 4)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WebhookSecretError("a webhook secret must be 'whsec_' followed by base64") from None
    if not key:
        raise WebhookSecretError("a webhook secret must not be empty")
    return key


def check_secret(secret: str) -> str:
    """``secret`` if it is usable for signing (spec form, 24..64 bytes); pure."""
    key = decode_secret(secret)
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise WebhookSecretError(f"a webhook secret must hold {MIN_SECRET_BYTES}..{MAX_SECRET_BYTES} bytes "
                                 f"(this one has {len(key)})")
    return secret


def _check_part(name: str, value: str) -> None:
    if not value or "." in value or any(c.isspace() for c in value):
        raise ValueError(f"{name} must be non-empty, without '.' or spaces")


def signed_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    """The bytes a signature covers: ``{id}.{timestamp}.{body}``; pure."""
    _check_part("webhook-id", msg_id)
    return f"{msg_id}.{timestamp}.".encode() + body


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One signature entry ``v1,<base64>``; pure."""
    digest = hmac.new(decode_secret(secret), signed_content(msg_id, timestamp, body), hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signature_header(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one entry per secret, space-separated, in the order given; pure."""
    if not secrets:
        raise WebhookSecretError("at least one secret is needed to sign")
    return " ".join(sign(s, msg_id, timestamp, body) for s in secrets)


def sign_headers(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt; pure."""
    return {H_ID: msg_id, H_TIMESTAMP: str(timestamp), H_SIGNATURE: signature_header(secrets, msg_id, timestamp, body)}


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    raise WebhookVerificationError(f"missing header {name}")


def verify(headers: Mapping[str, str], body: bytes, secrets: str | Sequence[str], *,
           tolerance: float = DEFAULT_TOLERANCE, now: float | None = None) -> str:
    """Check a received request; return its ``webhook-id``.  Raises ``WebhookVerificationError``.

    ``headers`` are matched case-insensitively; ``secrets`` are the receiver's (any one may match);
    ``now`` defaults to the current time.  Entries of other versions (``v1a``) are ignored.
    """
    wanted = [secrets] if isinstance(secrets, str) else list(secrets)
    if not wanted:
        raise WebhookVerificationError("no secret to verify with")
    msg_id = _header(headers, H_ID)
    raw_timestamp = _header(headers, H_TIMESTAMP)
    signatures = _header(headers, H_SIGNATURE)
    try:
        timestamp = int(raw_timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if timestamp < current - tolerance:
        raise WebhookVerificationError("webhook-timestamp is too old")
    if timestamp > current + tolerance:
        raise WebhookVerificationError("webhook-timestamp is too far in the future")
    try:
        content = signed_content(msg_id, timestamp, body)
    except ValueError as exc:
        raise WebhookVerificationError(str(exc)) from None
    received: list[bytes] = []
    for entry in signatures.split():
        version, sep, value = entry.partition(",")
        if sep and version == SIGNATURE_VERSION:
            received.append(value.encode("ascii", "replace"))
    if not received:
        raise WebhookVerificationError("no v1 signature in webhook-signature")
    matched = False
    for secret in wanted:
        expected = base64.b64encode(hmac.new(decode_secret(secret), content, hashlib.sha256).digest())
        for candidate in received:
            # Every pair is compared (no early exit) so timing says nothing about which one matched.
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise WebhookVerificationError("no signature matches")
    return msg_id
