"""Retention: delete what the messaging tables no longer need.

* sent outbox rows older than ``outbox_sent`` (7 days by default; pending rows are never deleted);
* inbox entries older than ``inbox`` (14 days: longer than any redelivery horizon, so a message
  redelivered after its entry was deleted is not possible in practice);
* idempotency records (with a reply) older than ``idempotency`` (7 days; far past any command deadline).

Deletes go in batches of ``batch_size`` picked with ``FOR UPDATE SKIP LOCKED``, each its own short
transaction, so it never holds long locks and never waits on the relay.  With several replicas, the
one that gets the session advisory lock of a schema purges it; the others skip it that round.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import asyncpg
import structlog

from services.core.db.migrations import check_schema
from services.core.db.pool import AnyConnection

log = structlog.get_logger("roost.db.retention")

LOCK_KEY = "roost.retention"


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    outbox_sent: timedelta = timedelta(days=7)
    inbox: timedelta = timedelta(days=14)
    idempotency: timedelta = timedelta(days=7)
    batch_size: int = 5000


@dataclass
class Purged:
    outbox: int = 0
    inbox: int = 0
    idempotency: int = 0
    skipped: list[str] = field(default_factory=list)   # purged by another replica at the same time


def _deleted(status: str) -> int:
    """``DELETE 42`` -> 42; pure."""
    return int(status.split()[-1]) if status.startswith("DELETE") else 0


async def _in_batches(conn: AnyConnection, sql: str, older_than: timedelta, batch_size: int) -> int:
    total = 0
    while True:
        n = _deleted(await conn.execute(sql, older_than, batch_size))
        total += n
        if n < batch_size:
            return total


def lock_key(target: str) -> str:
    """The text whose hash keys the advisory lock for purging ``target`` (a schema, or ``idempotency``)."""
    return f"{LOCK_KEY}:{target}"


@contextlib.asynccontextmanager
async def _exclusive(conn: AnyConnection, target: str) -> AsyncIterator[bool]:
    """Try the session advisory lock of ``target``; yield whether this session got it."""
    got = bool(await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", lock_key(target)))
    try:
        yield got
    finally:
        if got and not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", lock_key(target))


async def purge(pool: asyncpg.Pool, schemas: Sequence[str], policy: RetentionPolicy = RetentionPolicy(), *,
                idempotency_schema: str | None = "core") -> Purged:
    """One retention pass over the outbox and inbox of each schema (and the idempotency table).

    A schema whose purge another replica is running now is skipped (listed in ``skipped``).
    """
    for schema in schemas:
        check_schema(schema)
    result = Purged()
    async with pool.acquire() as conn:
        for schema in schemas:
            async with _exclusive(conn, schema) as got:
                if not got:
                    result.skipped.append(schema)
                    continue
                result.outbox += await _in_batches(conn, f"""
                    DELETE FROM {schema}.outbox WHERE id = ANY(ARRAY(
                        SELECT id FROM {schema}.outbox
                        WHERE sent_at IS NOT NULL AND sent_at < now() - $1::interval
                        LIMIT $2 FOR UPDATE SKIP LOCKED))""", policy.outbox_sent, policy.batch_size)
                result.inbox += await _in_batches(conn, f"""
                    DELETE FROM {schema}.inbox AS i USING (
                        SELECT consumer, message_id FROM {schema}.inbox
                        WHERE received_at < now() - $1::interval
                        LIMIT $2 FOR UPDATE SKIP LOCKED) AS d
                    WHERE i.consumer = d.consumer AND i.message_id = d.message_id""",
                    policy.inbox, policy.batch_size)
        if idempotency_schema is not None:
            s = check_schema(idempotency_schema)
            async with _exclusive(conn, f"{s}.idempotency") as got:
                if got:
                    result.idempotency += await _in_batches(conn, f"""
                        DELETE FROM {s}.idempotency WHERE key = ANY(ARRAY(
                            SELECT key FROM {s}.idempotency
                            WHERE reply IS NOT NULL AND created_at < now() - $1::interval
                            LIMIT $2 FOR UPDATE SKIP LOCKED))""", policy.idempotency, policy.batch_size)
                else:
                    result.skipped.append(f"{s}.idempotency")
    if result.outbox or result.inbox or result.idempotency:
        log.info("retention purged", outbox=result.outbox, inbox=result.inbox, idempotency=result.idempotency)
    return result


class Retention:
    """Runs ``purge`` every ``interval`` seconds until ``stop()``; errors are logged and retried next round."""

    def __init__(self, pool: asyncpg.Pool, schemas: Sequence[str], policy: RetentionPolicy = RetentionPolicy(),
                 *, interval: float = 3600.0, idempotency_schema: str | None = "core") -> None:
        self.pool = pool
        self.schemas = [check_schema(s) for s in schemas]
        self.policy = policy
        self.interval = interval
        self.idempotency_schema = idempotency_schema
        self.last: Purged | None = None
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.last = await purge(self.pool, self.schemas, self.policy,
                                        idempotency_schema=self.idempotency_schema)
            except Exception as exc:
                log.warning("retention pass failed; retrying next round", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._stopping.wait()

    async def stop(self) -> None:
        self._stopping.set()
