"""Envelope <-> transport message, pure.

The body is the whole envelope as CloudEvents structured-mode JSON, so a message is self-describing on
every broker and in every dead-letter place.  A few attributes are copied into transport headers for
broker-side dedup and for inspection without parsing.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from schemas.envelope import Envelope
from services.core.bus.abc import (
    H_ATTEMPT,
    H_DLQ_ATTEMPTS,
    H_DLQ_GROUP,
    H_DLQ_REASON,
    H_DLQ_SUBJECT,
    H_DLQ_TIME,
    H_MESSAGE_ID,
    H_TYPE,
    STRIPPED_ON_DEAD_LETTER,
    OutgoingMessage,
    RawDelivery,
)
from services.core.bus.subjects import check_subject, dlq_subject

REASON_LIMIT = 1000


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
        body=envelope_json(envelope),
        message_id=envelope.id,
        headers=all_headers,
    )


_ENVELOPE_FIELDS = tuple(Envelope.model_fields)


def envelope_json(envelope: Envelope) -> bytes:
    """``envelope.model_dump_json(exclude_none=True)``, the same bytes, written by orjson in about two thirds of
    pydantic's time (every message published and every outbox row pays it).  What orjson does not write as
    pydantic does, or not at all (a model or bytes in ``data``, a key that is not text, an int beyond 64
    bits), is left to pydantic."""
    fields: dict[str, Any] = {}
    for name in _ENVELOPE_FIELDS:
        value = getattr(envelope, name)
        if value is None:
            continue
        if name == "principal":
            value = {k: v for k, v in value.__dict__.items() if v is not None}
        fields[name] = value
    try:
        return orjson.dumps(fields, option=orjson.OPT_UTC_Z)
    except TypeError:
        return envelope.model_dump_json(exclude_none=True).encode()


def decode(body: bytes) -> Envelope:
    try:
        return Envelope.model_validate_json(body)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise MalformedMessage(f"not a valid envelope: {errors}") from exc


def dead_letter_copy(delivery: RawDelivery, reason: str) -> OutgoingMessage:
    """What every transport publishes to ``roost.dlq.<group>`` when it gives a delivery up.

    The original body and message id; its headers minus secrets and the retry counter; and why, where
    from and when.  Header values cannot hold line breaks, so the reason is flattened to one line.
    """
    headers = {k: v for k, v in delivery.headers.items() if k not in STRIPPED_ON_DEAD_LETTER and k != H_ATTEMPT}
    headers.setdefault(H_MESSAGE_ID, delivery.message_id)
    headers.update({
        H_DLQ_REASON: " ".join(reason.split())[:REASON_LIMIT] or "(no reason given)",
        H_DLQ_SUBJECT: delivery.subject,
        H_DLQ_GROUP: delivery.group,
        H_DLQ_ATTEMPTS: str(delivery.attempt),
        H_DLQ_TIME: datetime.now(UTC).isoformat(),
    })
    return OutgoingMessage(dlq_subject(delivery.group), delivery.body, delivery.message_id, headers)
