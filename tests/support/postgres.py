"""A fresh database per test on the machine's real PostgreSQL (127.0.0.1:5432).

``fresh_database()`` creates a uniquely named database through the ``postgres`` database and drops it
afterwards (``WITH (FORCE)``: connections a test left open do not keep it alive).  When PostgreSQL is
down the test FAILS with a clear message: it never skips.

Test modules use it through small local fixtures (importing fixtures by name trips ruff's F811):

    @pytest.fixture
    async def pool() -> AsyncIterator[asyncpg.Pool]:
        async with fresh_database() as url, pool_on(url) as pool:
            yield pool

``ROOST_TEST_PG_ADMIN_URL`` overrides the admin URL (default ``postgresql://postgres@127.0.0.1:5432/postgres``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from services.core.db.migrations import migrate
from services.core.db.pool import create_pool

ADMIN_URL = os.environ.get("ROOST_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def database_url(name: str, admin_url: str = ADMIN_URL) -> str:
    """The admin URL pointed at database ``name``."""
    parts = urlsplit(admin_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


async def _admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(ADMIN_URL, timeout=10)
    except Exception as exc:
        pytest.fail(f"PostgreSQL is needed for this test and is not reachable at {ADMIN_URL}: "
                    f"{type(exc).__name__}: {exc} (start it: pg_ctlcluster 15 main start)", pytrace=False)


@contextlib.asynccontextmanager
async def fresh_database(prefix: str = "roost_test") -> AsyncIterator[str]:
    """Create a new empty database; yield its URL; drop it."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    admin = await _admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield database_url(name)
    finally:
        admin = await _admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@contextlib.asynccontextmanager
async def pool_on(url: str, *, max_size: int = 10, migrate_core: bool = True,
                  application_name: str = "roost-test") -> AsyncIterator[asyncpg.Pool]:
    """A pool on ``url`` (core migrated unless told otherwise), closed afterwards."""
    pool = await create_pool(url, min_size=1, max_size=max_size, connect_timeout=10,
                             application_name=application_name)
    try:
        if migrate_core:
            await migrate(pool, "core")
        yield pool
    finally:
        try:
            async with asyncio.timeout(10):
                await pool.close()
        except TimeoutError:
            pool.terminate()


async def lock_waiters(pool: asyncpg.Pool, count: int, timeout: float = 10.0) -> None:
    """Wait until ``count`` sessions of this database wait on a lock (a row, a claim, an advisory lock)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    query = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
             "AND datname = current_database()")
    while (waiting := await pool.fetchval(query)) < count:
        if loop.time() > deadline:
            raise AssertionError(f"{waiting} sessions wait on locks after {timeout}s, expected {count}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh, empty database's URL (for a future conftest: ``pytest_plugins``)."""
    async with fresh_database() as url:
        yield url


@pytest.fixture
async def pg_pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh database with core's migrations applied."""
    async with pool_on(pg_url) as pool:
        yield pool
