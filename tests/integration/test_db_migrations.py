"""Versioned migrations on the real PostgreSQL: order, checksum refusal, failures, replicas at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from services.core.db.migrations import (
    CORE_MIGRATIONS,
    ChecksumMismatch,
    MigrationError,
    applied_versions,
    load_migrations,
    migrate,
)
from tests.support.postgres import fresh_database, pool_on

pytestmark = pytest.mark.postgres


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


@pytest.fixture
async def pool(url: str) -> AsyncIterator[asyncpg.Pool]:
    async with pool_on(url, migrate_core=False) as pool:
        yield pool


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


async def test_core_migrations_create_the_messaging_tables_once(pool: asyncpg.Pool) -> None:
    applied = await migrate(pool)
    assert [m.filename for m in applied] == [m.filename for m in load_migrations(CORE_MIGRATIONS)]
    tables = {r["t"] for r in await pool.fetch(
        "SELECT table_name AS t FROM information_schema.tables WHERE table_schema = 'core'")}
    assert {"schema_migrations", "outbox", "inbox", "idempotency"} <= tables
    assert await migrate(pool) == []
    recorded = await applied_versions(pool, "core")
    assert [a.version for a in recorded] == [m.version for m in applied]


async def test_files_apply_in_version_order_each_in_its_own_transaction(pool: asyncpg.Pool, tmp_path: Path) -> None:
    d = write(tmp_path / "m", {
        "0002_fill.sql": "INSERT INTO things (n) VALUES (2);",
        "0010_more.sql": "INSERT INTO things (n) VALUES (10);",
        "0001_create.sql": "CREATE TABLE things (seq serial PRIMARY KEY, n int NOT NULL);",
    })
    applied = await migrate(pool, "svc", d)
    assert [m.version for m in applied] == [1, 2, 10]
    # unqualified names went into the service schema (search_path), in file order
    assert [r["n"] for r in await pool.fetch("SELECT n FROM svc.things ORDER BY seq")] == [2, 10]
    rows = await pool.fetch("SELECT version, name, checksum, applied_at FROM svc.schema_migrations ORDER BY version")
    assert [(r["version"], r["name"]) for r in rows] == [(1, "create"), (2, "fill"), (10, "more")]
    assert all(len(r["checksum"]) == 64 and r["applied_at"] is not None for r in rows)


async def test_a_failing_migration_rolls_back_alone_and_stops(pool: asyncpg.Pool, tmp_path: Path) -> None:
    d = write(tmp_path / "m", {
        "0001_ok.sql": "CREATE TABLE a (x int);",
        "0002_bad.sql": "CREATE TABLE b (x int); SELECT no_such_function();",
        "0003_never.sql": "CREATE TABLE c (x int);",
    })
    with pytest.raises(MigrationError, match=r"0002_bad\.sql"):
        await migrate(pool, "svc", d)
    assert [a.version for a in await applied_versions(pool, "svc")] == [1]
    assert await pool.fetchval("SELECT to_regclass('svc.b')") is None
    assert await pool.fetchval("SELECT to_regclass('svc.c')") is None
    (d / "0002_bad.sql").write_text("CREATE TABLE b (x int);")
    assert [m.version for m in await migrate(pool, "svc", d)] == [2, 3]


async def test_a_changed_applied_file_is_refused_before_anything_runs(pool: asyncpg.Pool, tmp_path: Path) -> None:
    d = write(tmp_path / "m", {"0001_a.sql": "CREATE TABLE a (x int);"})
    await migrate(pool, "svc", d)
    write(d, {"0001_a.sql": "CREATE TABLE a (x int, y int);", "0002_b.sql": "CREATE TABLE b (x int);"})
    with pytest.raises(ChecksumMismatch, match=r"0001_a\.sql"):
        await migrate(pool, "svc", d)
    assert await pool.fetchval("SELECT to_regclass('svc.b')") is None


async def test_a_late_lower_version_is_applied_and_an_unknown_applied_one_tolerated(
        pool: asyncpg.Pool, tmp_path: Path) -> None:
    d = write(tmp_path / "m", {"0001_a.sql": "CREATE TABLE a (x int);", "0003_c.sql": "CREATE TABLE c (x int);"})
    await migrate(pool, "svc", d)
    write(d, {"0002_b.sql": "CREATE TABLE b (x int);"})
    assert [m.version for m in await migrate(pool, "svc", d)] == [2]
    (d / "0003_c.sql").unlink()           # an older release: it does not know 0003
    assert await migrate(pool, "svc", d) == []


async def test_replicas_migrating_at_once_apply_each_file_once(url: str, tmp_path: Path) -> None:
    d = write(tmp_path / "m", {
        # Not idempotent on purpose: applied twice, these fail (duplicate table) or double the rows.
        "0001_create.sql": "CREATE TABLE runs (n int); SELECT pg_sleep(0.2);",
        "0002_insert.sql": "INSERT INTO runs VALUES (1);",
    })
    pools = [await asyncpg.create_pool(url, min_size=1, max_size=1) for _ in range(5)]
    try:
        results = await asyncio.gather(*(migrate(p, "svc", d) for p in pools))
        assert sorted(len(r) for r in results) == [0, 0, 0, 0, 2]
        assert await pools[0].fetchval("SELECT count(*) FROM svc.runs") == 1
    finally:
        await asyncio.gather(*(p.close() for p in pools))


async def test_a_service_gets_its_outbox_and_inbox_with_one_line(pool: asyncpg.Pool, tmp_path: Path) -> None:
    await migrate(pool)
    d = write(tmp_path / "m", {"0001_messaging.sql": "SELECT core.ensure_outbox_inbox('inventory');"})
    await migrate(pool, "inventory", d)
    for table in ("inventory.outbox", "inventory.inbox", "inventory.schema_migrations"):
        assert await pool.fetchval("SELECT to_regclass($1) IS NOT NULL", table), table


async def test_a_missing_directory_is_a_clear_error(pool: asyncpg.Pool, tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="does not exist"):
        await migrate(pool, "svc", tmp_path / "nope")
