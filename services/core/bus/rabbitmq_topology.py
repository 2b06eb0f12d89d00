"""Where roost's messages live on RabbitMQ, as pure names and arguments (no I/O).

    roost.events    topic, durable, alternate exchange roost.unrouted: every event and dead letter
    roost.commands  topic, durable, no alternate exchange: roost.cmd.* (published mandatory, so a
                    command nobody is bound to comes back as an error)
    roost.unrouted  fanout, durable -> quorum queue roost.unrouted: events no group was bound to, kept
                    -> headers exchange roost.unrouted.notify -> one exclusive queue per transport,
                       bound on its publisher id, so each publisher counts its own unrouted events
    <group>__<pattern>__<hash>            quorum queue per (group, pattern), bound with the pattern
    <group>__<pattern>__<hash>.retry.<ms> classic durable TTL queue per retry delay bucket, which
                                          dead-letters back into that one queue (not to other groups)
    roost.reply.<transport id>            exclusive queue per transport for replies to its requests
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from services.core.bus.abc import (
    H_ATTEMPT,
    H_DLQ_GROUP,
    H_DLQ_REASON,
    H_DLQ_SUBJECT,
    H_DLQ_TIME,
)
from services.core.bus.subjects import RETRY_BUCKETS, dlq_subject, is_command, is_dead_letter, retry_bucket

EVENTS_EXCHANGE = "roost.events"
COMMANDS_EXCHANGE = "roost.commands"
UNROUTED_EXCHANGE = "roost.unrouted"
UNROUTED_QUEUE = "roost.unrouted"
UNROUTED_NOTIFY_EXCHANGE = "roost.unrouted.notify"
REPLY_QUEUE_PREFIX = "roost.reply."

# Transport-internal headers.  The publisher id has no ``x-`` prefix on purpose: a headers exchange
# ignores binding arguments that start with ``x-``, so such a binding would match every message.
H_PUBLISHER = "roost-publisher"
H_SUBJECT = "x-roost-subject"        # the original subject of a retried message or of a reply
H_NOT_BEFORE = "x-roost-not-before"  # a retry delay longer than the longest TTL queue: when it is due
                                     # (UNIX time); earlier deliveries wait another round, unseen
INTERNAL_HEADERS = frozenset({H_PUBLISHER, H_SUBJECT, H_NOT_BEFORE})

# Headers the broker adds; they describe one trip through one queue and never travel further.
BROKER_HEADERS = frozenset({
    "x-delivery-count", "x-death", "x-first-death-exchange", "x-first-death-queue",
    "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason",
})

# The broker dead-letters a message of a group queue after this many redeliveries more than the
# consumer's own limit: a backstop for consumers that crash before they can dead-letter it themselves.
DELIVERY_LIMIT_MARGIN = 5

_REPLY_SEPARATOR = "#"


def exchange_for(subject_or_pattern: str) -> str:
    """Commands travel on ``roost.commands``; everything else (events, dead letters) on ``roost.events``."""
    return COMMANDS_EXCHANGE if is_command(subject_or_pattern) else EVENTS_EXCHANGE


def group_queue_arguments(group: str, max_attempts: int) -> dict[str, Any]:
    """A quorum queue whose backstop dead-lettering is at-least-once into ``roost.dlq.<group>``."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": max(1, max_attempts) + DELIVERY_LIMIT_MARGIN,
        "x-dead-letter-exchange": EVENTS_EXCHANGE,
        "x-dead-letter-routing-key": dlq_subject(group),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",      # at-least-once dead-lettering requires it
    }


def bucket_millis(bucket: float) -> int:
    return round(bucket * 1000)


def retry_queue_name(queue: str, delay: float) -> str:
    """The TTL queue holding ``queue``'s messages for the retry bucket of ``delay``."""
    return f"{queue}.retry.{bucket_millis(retry_bucket(delay))}"


def retry_queue_names(queue: str) -> list[str]:
    return [f"{queue}.retry.{bucket_millis(bucket)}" for bucket in RETRY_BUCKETS]


def retry_queue_arguments(queue: str, delay: float) -> dict[str, Any]:
    """Messages wait ``bucket`` ms, then the default exchange routes them back into ``queue`` alone."""
    return {
        "x-message-ttl": bucket_millis(retry_bucket(delay)),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
    }


def reply_address(queue: str, token: str) -> str:
    return f"{queue}{_REPLY_SEPARATOR}{token}"


def parse_reply_address(address: str) -> tuple[str, str]:
    """``(queue, token)`` of a reply address, or ``ValueError`` for anything else."""
    queue, sep, token = address.partition(_REPLY_SEPARATOR)
    if not sep or not queue.startswith(REPLY_QUEUE_PREFIX) or not token:
        raise ValueError(f"not a RabbitMQ reply address: {address!r}")
    return queue, token


def header_text(value: object) -> str | None:
    """An AMQP header value as text, or None for structured values (tables, arrays)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, bool | int | float):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return None


def _count(value: object) -> int:
    with contextlib.suppress(TypeError, ValueError):
        return max(0, int(header_text(value) or 0))
    return 0


def attempt_of(raw: Mapping[str, Any]) -> int:
    """1 + deliveries before a republished retry (``x-roost-attempt``) + redeliveries of this copy
    by the quorum queue (``x-delivery-count``: nacks, and consumers that died holding it)."""
    return 1 + _count(raw.get(H_ATTEMPT)) + _count(raw.get("x-delivery-count"))


def not_before_of(raw: Mapping[str, Any]) -> float | None:
    """When a long-delayed retry is due (UNIX time), if it carries that."""
    text = header_text(raw.get(H_NOT_BEFORE))
    try:
        return float(text) if text else None
    except ValueError:
        return None


def subject_of(raw: Mapping[str, Any], routing_key: str | None) -> str:
    """The subject a message was published on (a retried copy travels under its queue's name)."""
    return header_text(raw.get(H_SUBJECT)) or routing_key or ""


def incoming_headers(raw: Mapping[str, Any], subject: str) -> dict[str, str]:
    """The headers a consumer sees: the publisher's, without broker and transport bookkeeping.

    A message the broker itself dead-lettered (the delivery-limit backstop) gets the ``x-roost-dlq-*``
    headers from its ``x-death`` record, so the dead-letter keeper can show why.
    """
    headers: dict[str, str] = {}
    for key, value in raw.items():
        if key in BROKER_HEADERS or key in INTERNAL_HEADERS:
            continue
        text = header_text(value)
        if text is not None:
            headers[key] = text
    if is_dead_letter(subject) and H_DLQ_REASON not in headers:
        headers.update(_from_x_death(raw, subject))
    return headers


def _from_x_death(raw: Mapping[str, Any], subject: str) -> dict[str, str]:
    x_death = raw.get("x-death")
    if not isinstance(x_death, list):
        return {}
    for record in x_death:
        if not isinstance(record, Mapping):
            continue
        reason = header_text(record.get("reason")) or "unknown"
        if reason == "expired":            # a pass through a retry queue, not the death itself
            continue
        keys = record.get("routing-keys")
        original = header_text(raw.get(H_SUBJECT)) or (
            header_text(keys[0]) if isinstance(keys, list) and keys else None)
        when = record.get("time")
        out = {
            H_DLQ_REASON: f"dead-lettered by the broker ({reason}) from queue "
                          f"{header_text(record.get('queue')) or '?'}",
            H_DLQ_GROUP: subject.removeprefix(dlq_subject("")),
        }
        if original:
            out[H_DLQ_SUBJECT] = original
        if isinstance(when, datetime):
            out[H_DLQ_TIME] = when.isoformat()
        return out
    return {}
