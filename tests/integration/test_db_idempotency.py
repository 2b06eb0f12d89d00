"""Command idempotency in PostgreSQL: one execution per key, across tasks and replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from services.core.db.idempotency import CommandInProgress, IdempotencyKeyReused, PgIdempotencyStore
from tests.support.postgres import fresh_database, lock_waiters, pool_on

pytestmark = pytest.mark.postgres


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


@pytest.fixture
async def pool(url: str) -> AsyncIterator[asyncpg.Pool]:
    async with pool_on(url, max_size=30) as pool:
        yield pool


class Command:
    """A command handler that counts its executions and can be held mid-execution."""

    def __init__(self) -> None:
        self.executions = 0
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_executions: set[int] = set()

    async def __call__(self) -> dict[str, Any]:
        self.executions += 1
        execution = self.executions
        self.started.set()
        await self.gate.wait()
        if execution in self.fail_executions:
            raise RuntimeError("the command failed")
        return {"status": "completed", "result": {"execution": self.executions, "text": "é"}}


async def test_a_key_runs_once_and_repeats_get_the_first_reply(pool: asyncpg.Pool) -> None:
    store, cmd = PgIdempotencyStore(pool), Command()
    first = await store.run_once("key-1", "roost.cmd.host.lock", cmd)
    assert first == {"status": "completed", "result": {"execution": 1, "text": "é"}}
    assert await store.run_once("key-1", "roost.cmd.host.lock", cmd) == first
    assert cmd.executions == 1
    assert await store.run_once("key-2", "roost.cmd.host.lock", cmd) != first
    assert cmd.executions == 2


async def test_concurrent_executions_of_one_key_run_it_once(pool: asyncpg.Pool) -> None:
    store, cmd = PgIdempotencyStore(pool), Command()
    cmd.gate.clear()
    first = asyncio.create_task(store.run_once("k", "roost.cmd.x", cmd))
    await asyncio.wait_for(cmd.started.wait(), 5)
    repeats = [asyncio.create_task(store.run_once("k", "roost.cmd.x", cmd)) for _ in range(10)]
    await lock_waiters(pool, 10)      # the repeats wait on the claim
    assert not any(r.done() for r in repeats)
    cmd.gate.set()
    replies = await asyncio.wait_for(asyncio.gather(first, *repeats), 10)
    assert all(r == replies[0] for r in replies)
    assert cmd.executions == 1


async def test_replicas_with_their_own_pools_run_it_once(url: str) -> None:
    cmd = Command()
    cmd.gate.clear()
    async with pool_on(url) as p1, pool_on(url, migrate_core=False) as p2:
        s1, s2 = PgIdempotencyStore(p1), PgIdempotencyStore(p2)
        tasks = [asyncio.create_task(s.run_once("k", "roost.cmd.x", cmd)) for s in (s1, s2, s1, s2)]
        await asyncio.wait_for(cmd.started.wait(), 5)
        await lock_waiters(p1, 3)
        cmd.gate.set()
        replies = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert cmd.executions == 1 and all(r == replies[0] for r in replies)


async def test_a_failed_execution_stores_nothing_and_a_waiter_then_runs_it(pool: asyncpg.Pool) -> None:
    store, cmd = PgIdempotencyStore(pool), Command()
    cmd.gate.clear()
    cmd.fail_executions = {1}
    first = asyncio.create_task(store.run_once("k", "roost.cmd.x", cmd))
    await asyncio.wait_for(cmd.started.wait(), 5)
    second = asyncio.create_task(store.run_once("k", "roost.cmd.x", cmd))
    await lock_waiters(pool, 1)       # the repeat waits on the claim
    cmd.gate.set()
    with pytest.raises(RuntimeError):
        await first
    assert (await asyncio.wait_for(second, 10))["result"]["execution"] == 2
    assert await pool.fetchval("SELECT count(*) FROM core.idempotency") == 1


async def test_a_waiter_gives_up_with_in_progress(pool: asyncpg.Pool) -> None:
    cmd = Command()
    cmd.gate.clear()
    first = asyncio.create_task(PgIdempotencyStore(pool).run_once("k", "roost.cmd.x", cmd))
    await asyncio.wait_for(cmd.started.wait(), 5)
    with pytest.raises(CommandInProgress):
        await PgIdempotencyStore(pool, wait=0.2).run_once("k", "roost.cmd.x", cmd)
    cmd.gate.set()
    await first
    assert cmd.executions == 1


async def test_a_key_reused_for_another_command_is_refused(pool: asyncpg.Pool) -> None:
    store, cmd = PgIdempotencyStore(pool), Command()
    await store.run_once("k", "roost.cmd.host.lock", cmd)
    with pytest.raises(IdempotencyKeyReused, match=r"roost\.cmd\.host\.lock"):
        await store.run_once("k", "roost.cmd.host.unlock", cmd)


async def test_a_crashed_execution_releases_its_claim(pool: asyncpg.Pool) -> None:
    store, cmd = PgIdempotencyStore(pool), Command()
    cmd.gate.clear()
    first = asyncio.create_task(store.run_once("k", "roost.cmd.x", cmd))
    await asyncio.wait_for(cmd.started.wait(), 5)
    # the process holding the claim dies: its session goes away
    await pool.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND pid <> pg_backend_pid() AND state = 'idle in transaction'")
    cmd.gate.set()
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
        await asyncio.wait_for(first, 10)
    reply = await store.run_once("k", "roost.cmd.x", cmd)
    assert reply["result"]["execution"] == 2
