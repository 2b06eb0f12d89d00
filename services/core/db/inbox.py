"""The inbox: a consumer handles each message once, however often the broker delivers it.

Inside the transaction that applies a message's effects, record ``(consumer, message_id)`` in
``<schema>.inbox``; if it was already there, this delivery is a duplicate: skip the effects, commit,
ack.  Ack only after the commit: a crash before it rolls the inbox row back with the effects, and the
redelivery is handled as the first time.

    async with pool.acquire() as conn:
        async with inbox.receive(conn, "inventory-hosts", message.envelope.id) as fresh:
            if fresh:
                ...apply the effects on conn, outbox.add(conn, ...) for follow-up events...
    # ack after the block: it has committed

``consumer`` names the handler (one per consumer group and handler), so two handlers of one service
each see every message once.  Rows are kept for the retention period (``retention.py``, 14 days by
default), longer than any redelivery horizon.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from services.core.db.migrations import check_schema
from services.core.db.pool import AnyConnection


class Inbox:
    """Duplicate detection in ``<schema>.inbox``, inside the consumer's transaction."""

    def __init__(self, schema: str = "core") -> None:
        self.schema = check_schema(schema)
        self._insert = (f"INSERT INTO {self.schema}.inbox (consumer, message_id) VALUES ($1, $2) "
                        "ON CONFLICT DO NOTHING")

    async def first_time(self, conn: AnyConnection, consumer: str, message_id: str) -> bool:
        """Record the message for ``consumer``; True the first time, False for a duplicate.

        Call it inside the transaction that applies the effects (a concurrent delivery of the same
        message waits here until the first one's transaction ends, then sees it as a duplicate).
        """
        if not conn.is_in_transaction():
            raise RuntimeError("inbox.first_time needs the consumer's transaction: call it inside "
                               "`async with conn.transaction():` with the effects")
        status = await conn.execute(self._insert, consumer, message_id)
        return bool(status == "INSERT 0 1")

    @contextlib.asynccontextmanager
    async def receive(self, conn: AnyConnection, consumer: str, message_id: str) -> AsyncIterator[bool]:
        """A transaction (a savepoint inside an outer one) that yields whether the message is fresh.

        Whatever the block does on ``conn`` commits with the inbox row; an exception rolls both back.
        """
        async with conn.transaction():
            yield await self.first_time(conn, consumer, message_id)

    async def seen(self, conn: AnyConnection | asyncpg.Pool, consumer: str, message_id: str) -> bool:
        """Whether ``consumer`` has handled the message (committed)."""
        return bool(await conn.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {self.schema}.inbox WHERE consumer = $1 AND message_id = $2)",
            consumer, message_id))
