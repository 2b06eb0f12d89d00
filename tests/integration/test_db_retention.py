"""Retention on the real PostgreSQL: what is old and done goes, what is pending or recent stays."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from services.core.db.migrations import migrate
from services.core.db.retention import Retention, RetentionPolicy, lock_key, purge
from tests.support.postgres import fresh_database, pool_on

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[asyncpg.Pool]:
    async with fresh_database() as url, pool_on(url) as pool:
        (tmp_path / "0001_messaging.sql").write_text("SELECT core.ensure_outbox_inbox('svc');")
        await migrate(pool, "svc", tmp_path)
        yield pool


async def fill(pool: asyncpg.Pool, schema: str) -> None:
    """Per state, rows 10 days old and 1 hour old."""
    for age in (timedelta(days=10), timedelta(hours=1)):
        for n in range(3):
            for state, sent in (("sent", "now() - interval '1 minute'"), ("pending", "NULL")):
                mid = f"{schema}-{state}-{age}-{n}"
                await pool.execute(f"""
                    INSERT INTO {schema}.outbox (message_id, subject, ordering_key, body, created_at, sent_at)
                    VALUES ($1, 'roost.test.x', 'k', '\\x00', now() - $2::interval,
                            CASE WHEN {sent} IS NULL THEN NULL ELSE now() - $2::interval END)""", mid, age)
        for n in range(3):
            await pool.execute(f"INSERT INTO {schema}.inbox (consumer, message_id, received_at) "
                               f"VALUES ('c', $1, now() - $2::interval)", f"{age}-{n}", age * 2)


async def counts(pool: asyncpg.Pool, schema: str) -> tuple[int, int, int]:
    return (int(await pool.fetchval(f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NOT NULL")),
            int(await pool.fetchval(f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NULL")),
            int(await pool.fetchval(f"SELECT count(*) FROM {schema}.inbox")))


async def test_purge_deletes_only_old_sent_rows_old_inbox_entries_and_old_replies(pool: asyncpg.Pool) -> None:
    for schema in ("core", "svc"):
        await fill(pool, schema)
    await pool.execute("""
        INSERT INTO core.idempotency (key, command_type, reply, created_at) VALUES
            ('old', 'roost.cmd.x', '{}', now() - interval '8 days'),
            ('new', 'roost.cmd.x', '{}', now() - interval '1 day')""")
    assert await counts(pool, "svc") == (6, 6, 6)
    result = await purge(pool, ["core", "svc"], RetentionPolicy(batch_size=2))
    assert (result.outbox, result.inbox, result.idempotency, result.skipped) == (6, 6, 1, [])
    for schema in ("core", "svc"):
        # sent 10 days ago: gone; sent 1 hour ago: kept; pending (however old): kept.
        # inbox 20 days old: gone (older than 14 days); 20 hours: kept.
        assert await counts(pool, schema) == (3, 6, 3)
    assert [r["key"] for r in await pool.fetch("SELECT key FROM core.idempotency")] == ["new"]


async def test_a_shorter_policy_deletes_more(pool: asyncpg.Pool) -> None:
    await fill(pool, "svc")
    policy = RetentionPolicy(outbox_sent=timedelta(minutes=30), inbox=timedelta(minutes=30))
    result = await purge(pool, ["svc"], policy, idempotency_schema=None)
    assert (result.outbox, result.inbox) == (6, 6)
    assert await counts(pool, "svc") == (0, 6, 0)


async def test_a_schema_another_replica_is_purging_is_skipped(pool: asyncpg.Pool) -> None:
    await fill(pool, "svc")
    await fill(pool, "core")
    async with pool.acquire() as other:
        await other.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", lock_key("svc"))
        try:
            result = await purge(pool, ["core", "svc"])
        finally:
            await other.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", lock_key("svc"))
    assert result.skipped == ["svc"]
    assert await counts(pool, "svc") == (6, 6, 6)      # left to the replica that holds it
    assert await counts(pool, "core") == (3, 6, 3)     # another schema is not held up
    assert (await purge(pool, ["svc"])).skipped == []


async def test_retention_runs_periodically_until_stopped(pool: asyncpg.Pool) -> None:
    await fill(pool, "svc")
    worker = Retention(pool, ["svc"], interval=0.05)
    task = asyncio.create_task(worker.run())
    deadline = asyncio.get_running_loop().time() + 10
    while worker.last is None:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    await worker.stop()
    await asyncio.wait_for(task, 5)
    assert await counts(pool, "svc") == (3, 6, 3)
