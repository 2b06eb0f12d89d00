"""The transactional outbox: events written in the same transaction as the change they announce.

A service changes its tables and calls ``await outbox.add(conn, envelope)`` on the same connection,
inside the same transaction.  Both commit or neither does.  The insert also sends a ``NOTIFY`` on
``roost_outbox_<schema>``, which PostgreSQL delivers at commit, so the relay (``relay.py``) wakes at
once; a rolled-back transaction notifies nobody.

Each service has its own ``<schema>.outbox`` (created by ``core.ensure_outbox_inbox``).  A row keeps the
exact bytes that will be published (the codec's CloudEvents JSON), the subject, the transport headers,
the message id (= envelope id, the broker-side dedup key) and an ordering key: the entity the event is
about (``envelope.subject``, e.g. ``host/controller-0``) or, when it has none, the bus subject.  The relay
publishes the rows of one ordering key in ``id`` order.

Adding the same envelope id twice keeps the first row (``add`` returns False): a handler that is
retried and emits the same event again does not announce it twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from schemas.envelope import Envelope
from schemas.registry import Registry
from services.core.bus.abc import OutgoingMessage
from services.core.bus.codec import encode
from services.core.db.migrations import check_schema
from services.core.db.pool import AnyConnection


class OutboxError(Exception):
    """The outbox was used in a way that could lose or invent events."""


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel the outbox of ``schema`` wakes its relay on."""
    return f"roost_outbox_{check_schema(schema)}"


def ordering_key(envelope: Envelope, subject: str) -> str:
    """Rows with the same key are published in the order they were written; pure."""
    return f"entity:{envelope.subject}" if envelope.subject else f"subject:{subject}"


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One pending outbox row, as the relay reads it."""

    id: int
    message_id: str
    subject: str
    ordering_key: str
    headers: Mapping[str, str]
    body: bytes
    attempts: int = 0

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | asyncpg.Record) -> OutboxRow:
        """From a row selected with ``headers::text AS headers``; pure."""
        headers = record["headers"]
        parsed = json.loads(headers) if isinstance(headers, str) else dict(headers)
        return cls(id=record["id"], message_id=record["message_id"], subject=record["subject"],
                   ordering_key=record["ordering_key"], headers={str(k): str(v) for k, v in parsed.items()},
                   body=bytes(record["body"]), attempts=record["attempts"])

    def to_message(self) -> OutgoingMessage:
        """What the relay hands the transport: exactly what was written; pure."""
        return OutgoingMessage(subject=self.subject, body=self.body, message_id=self.message_id,
                               headers=dict(self.headers))


class Outbox:
    """Writes events into ``<schema>.outbox`` inside the caller's transaction."""

    def __init__(self, schema: str = "core", *, registry: Registry | None = None) -> None:
        self.schema = check_schema(schema)
        self.channel = notify_channel(schema)
        self.registry = registry
        self._insert_one = f"""
            WITH ins AS (
                INSERT INTO {self.schema}.outbox (message_id, subject, ordering_key, headers, body)
                VALUES ($1, $2, $3, $4::text::jsonb, $5)
                ON CONFLICT (message_id) DO NOTHING
                RETURNING id)
            SELECT id, pg_notify($6, '') FROM ins"""
        self._insert_many = f"""
            WITH ins AS (
                INSERT INTO {self.schema}.outbox (message_id, subject, ordering_key, headers, body)
                SELECT m, s, k, h::jsonb, b
                FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[]) WITH ORDINALITY
                     AS t(m, s, k, h, b, n)
                ORDER BY n
                ON CONFLICT (message_id) DO NOTHING
                RETURNING id)
            SELECT count(*) FROM ins"""

    def message(self, envelope: Envelope, subject: str | None = None,
                headers: Mapping[str, str] | None = None) -> OutgoingMessage:
        """The message a row will hold (validated against the registry when one was given); pure."""
        if self.registry is not None:
            self.registry.validate(envelope)
        return encode(envelope, subject=subject, headers=headers)

    def columns(self, envelopes: Sequence[Envelope], subject: str | None = None,
                ) -> tuple[list[str], list[str], list[str], list[str], list[bytes]]:
        """The rows of ``envelopes`` as the outbox's columns, in order (what ``unnest`` takes): message id,
        subject, ordering key, headers (JSON), body; pure.  ``add_many`` writes them, and so does a caller
        that folds them into a statement of its own."""
        messages = [self.message(e, subject) for e in envelopes]
        return ([m.message_id for m in messages], [m.subject for m in messages],
                [ordering_key(e, m.subject) for e, m in zip(envelopes, messages, strict=True)],
                [orjson.dumps(m.headers).decode() for m in messages], [m.body for m in messages])

    @staticmethod
    def _check_transaction(conn: AnyConnection) -> None:
        if not conn.is_in_transaction():
            raise OutboxError("outbox.add needs the caller's transaction: call it inside "
                              "`async with conn.transaction():` with the change it announces")

    async def add(self, conn: AnyConnection, envelope: Envelope, subject: str | None = None,
                  headers: Mapping[str, str] | None = None, *, key: str | None = None) -> bool:
        """Write ``envelope`` for publication on ``subject`` (default: its type) when ``conn`` commits.

        ``key`` overrides the ordering key.  Returns False if this envelope id is already in the outbox.
        """
        self._check_transaction(conn)
        message = self.message(envelope, subject, headers)
        row = await conn.fetchrow(
            self._insert_one, message.message_id, message.subject, key or ordering_key(envelope, message.subject),
            json.dumps(dict(message.headers)), message.body, self.channel)
        return row is not None

    async def add_many(self, conn: AnyConnection, envelopes: Sequence[Envelope],
                       subject: str | None = None) -> int:
        """Write several envelopes in one round trip, in order.  Returns how many were new."""
        self._check_transaction(conn)
        if not envelopes:
            return 0
        count: int = await conn.fetchval(self._insert_many, *self.columns(envelopes, subject))
        if count:
            await conn.execute("SELECT pg_notify($1, '')", self.channel)
        return count
