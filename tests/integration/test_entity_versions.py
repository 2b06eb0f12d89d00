"""The version guard on the real PostgreSQL: redelivered and reordered events never roll an entity back."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core.versions import advance, applied_version, is_newer
from tests.support.postgres import fresh_database, pool_on

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with fresh_database() as url, pool_on(url) as pool:
        yield pool


@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=30))
def test_the_pure_rule_keeps_the_maximum(versions: list[int]) -> None:
    applied: int | None = None
    for v in versions:
        if is_newer(applied, v):
            applied = v
    assert applied == max(versions)


async def test_reordered_and_repeated_deliveries_end_at_the_newest(pool: asyncpg.Pool) -> None:
    rng = random.Random(7)
    for entity in range(20):
        deliveries = [v for v in range(1, 8) for _ in range(rng.randint(1, 3))]
        rng.shuffle(deliveries)
        applied: list[int] = []
        for version in deliveries:
            async with pool.acquire() as conn, conn.transaction():
                if await advance(conn, "inventory", "host", f"h{entity}", version):
                    applied.append(version)
        assert applied == sorted(set(applied)), "every applied version is newer than the last"
        async with pool.acquire() as conn:
            assert await applied_version(conn, "inventory", "host", f"h{entity}") == 7


async def test_concurrent_transactions_serialise_and_the_newest_wins(pool: asyncpg.Pool) -> None:
    release = asyncio.Event()
    holding = asyncio.Event()

    async def apply(version: int, hold: bool) -> bool:
        async with pool.acquire() as conn, conn.transaction():
            ok = await advance(conn, "alarms", "host", "c0", version)
            if hold:
                holding.set()              # the row is locked by this transaction now
                await release.wait()
            return ok

    newer = asyncio.create_task(apply(5, True))
    await holding.wait()
    older = asyncio.create_task(apply(3, False))
    done, _ = await asyncio.wait({older}, timeout=0.5)
    assert not done, "the older version waits for the row the newer one holds"
    release.set()
    assert await newer is True
    assert await older is False
    async with pool.acquire() as conn:
        assert await applied_version(conn, "alarms", "host", "c0") == 5
        assert await applied_version(conn, "inventory", "host", "c0") is None, "per consumer"
