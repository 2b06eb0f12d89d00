"""The inbox on the real PostgreSQL: duplicates dropped per consumer, effects and inbox commit together."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.core.db.inbox import Inbox
from tests.support.postgres import fresh_database, lock_waiters, pool_on

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with fresh_database() as url, pool_on(url) as pool:
        await pool.execute("CREATE TABLE core.effects (message_id text, consumer text)")
        yield pool


async def handle(pool: asyncpg.Pool, consumer: str, message_id: str, *, fail: bool = False) -> bool:
    """A consumer: applies its effect once per message, in one transaction with the inbox row."""
    async with pool.acquire() as conn, Inbox().receive(conn, consumer, message_id) as fresh:
        if fresh:
            await conn.execute("INSERT INTO core.effects VALUES ($1, $2)", message_id, consumer)
            if fail:
                raise RuntimeError("handler failed after its effect")
        return fresh


async def effects(pool: asyncpg.Pool) -> list[tuple[str, str]]:
    return [(r["message_id"], r["consumer"]) for r in
            await pool.fetch("SELECT message_id, consumer FROM core.effects ORDER BY 1, 2")]


async def test_duplicates_are_dropped_per_consumer(pool: asyncpg.Pool) -> None:
    assert await handle(pool, "alarms-hosts", "m1")
    assert not await handle(pool, "alarms-hosts", "m1")
    assert await handle(pool, "inventory-hosts", "m1")        # another consumer sees it once too
    assert await handle(pool, "alarms-hosts", "m2")
    assert await effects(pool) == [("m1", "alarms-hosts"), ("m1", "inventory-hosts"), ("m2", "alarms-hosts")]
    assert await Inbox().seen(pool, "alarms-hosts", "m1")
    assert not await Inbox().seen(pool, "alarms-hosts", "m3")


async def test_a_failed_handling_rolls_back_the_inbox_row_so_the_redelivery_runs(pool: asyncpg.Pool) -> None:
    with pytest.raises(RuntimeError):
        await handle(pool, "c", "m1", fail=True)
    assert await effects(pool) == []
    assert not await Inbox().seen(pool, "c", "m1")
    assert await handle(pool, "c", "m1")
    assert await effects(pool) == [("m1", "c")]


async def test_first_time_inside_an_outer_transaction(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        async with conn.transaction():
            assert await Inbox().first_time(conn, "c", "m1")
            assert not await Inbox().first_time(conn, "c", "m1")
        with pytest.raises(RuntimeError, match="transaction"):
            await Inbox().first_time(conn, "c", "m2")


async def test_concurrent_deliveries_of_one_message_apply_it_once(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as first, pool.acquire() as second:
        tx1 = first.transaction()
        await tx1.start()
        assert await Inbox().first_time(first, "c", "m1")
        await first.execute("INSERT INTO core.effects VALUES ('m1', 'c')")

        async def redelivery() -> bool:
            async with second.transaction():
                fresh = await Inbox().first_time(second, "c", "m1")
                if fresh:
                    await second.execute("INSERT INTO core.effects VALUES ('m1', 'c')")
                return fresh

        other = asyncio.create_task(redelivery())
        await lock_waiters(pool, 1)        # the redelivery waits on the uncommitted inbox row
        assert not other.done()
        await tx1.commit()
        assert await asyncio.wait_for(other, 10) is False
    assert await effects(pool) == [("m1", "c")]


async def test_many_concurrent_redeliveries(pool: asyncpg.Pool) -> None:
    results = await asyncio.gather(*(handle(pool, "c", f"m{i % 5}") for i in range(40)))
    assert sum(results) == 5
    assert len(await effects(pool)) == 5
