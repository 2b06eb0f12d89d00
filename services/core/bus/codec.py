"""Envelope <-> transport message, pure.

The body is the whole envelope as CloudEvents structured-mode JSON, so a message is self-describing on
every broker and in every dead-letter place.  A few attributes are copied into transport headers for
broker-side dedup and for inspection without parsing.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

from schemas.envelope import Envelope
from services.core.bus.abc import H_MESSAGE_ID, H_TYPE, OutgoingMessage
from services.core.bus.subjects import check_subject


class MalformedMessage(ValueError):
    """A body that is not a valid envelope.  The message says what is wrong, for the dead-letter reason."""


def encode(envelope: Envelope, *, subject: str | None = None,
           headers: Mapping[str, str] | None = None) -> OutgoingMessage:
    """The envelope as a message on ``subject`` (default: its type)."""
    all_headers = {H_MESSAGE_ID: envelope.id, H_TYPE: envelope.type}
    if headers:
        all_headers.update(headers)
    return OutgoingMessage(
        subject=check_subject(subject or envelope.type),
        body=envelope.model_dump_json(exclude_none=True).encode(),
        message_id=envelope.id,
        headers=all_headers,
    )


def decode(body: bytes) -> Envelope:
    try:
        return Envelope.model_validate_json(body)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise MalformedMessage(f"not a valid envelope: {errors}") from exc
