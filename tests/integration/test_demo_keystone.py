"""The demo's keystone-shaped schema (``services.dcsync.minikeystone``) against the real keystone schema, made by
keystone's own migrations (``tests.support.openstack``): its tables and columns are keystone's (dcsync's
configuration for them resolves against a real keystone database), and a user created by its ``add_user`` (what
`roost demo user add` runs) in a real keystone database logs in through keystone's own API, with the password
it was given and not another."""

from __future__ import annotations

import asyncpg
import pytest

from services.dcsync.minikeystone import SCHEMA, SPEC, TABLES, UserError, add_user, list_users
from services.dcsync.tables import resolve
from tests.support import openstack
from tests.support.postgres import database_url, fresh_database

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

COLUMNS = """SELECT table_name, column_name FROM information_schema.columns
              WHERE table_schema = 'public' AND table_name = ANY($1::text[])"""


async def columns(url: str) -> dict[str, set[str]]:
    conn = await asyncpg.connect(url)
    try:
        out: dict[str, set[str]] = {}
        for row in await conn.fetch(COLUMNS, list(TABLES)):
            out.setdefault(row["table_name"], set()).add(row["column_name"])
        return out
    finally:
        await conn.close()


async def test_the_demo_schema_is_a_subset_of_keystones_and_its_users_log_in_with_keystone() -> None:
    async with openstack.openstack_database("keystone", "roost_test_minikeystone") as name:
        url = database_url(name)
        real = await columns(url)
        async with fresh_database("roost_minikeystone") as mini_url:
            conn = await asyncpg.connect(mini_url)
            try:
                await conn.execute(SCHEMA)
            finally:
                await conn.close()
            mini = await columns(mini_url)
        assert set(mini) == set(TABLES)
        for table, names in mini.items():
            assert names <= real[table], f"{table}: not keystone's columns: {sorted(names - real[table])}"
        resolve(SPEC, {t: sorted(c) for t, c in real.items()})     # dcsync's configuration fits the real one

        await openstack.keystone_bootstrap(name, user="admin", password="s3cret-admin", project="admin",
                                           role="admin")
        conn = await asyncpg.connect(url)
        try:
            alice = await add_user(conn, "alice", "s3cret-alice", project="admin", role="member")
            with pytest.raises(UserError, match="exists already"):
                await add_user(conn, "alice", "other", project="admin", role="member")
            with pytest.raises(UserError, match="no project"):
                await add_user(conn, "bob", "pw", project="nope")
            listed = {u["name"]: u for u in await list_users(conn)}
        finally:
            await conn.close()
        assert listed["alice"] == alice and alice["roles"] == "member@admin"
        assert alice["password"].startswith("pbkdf2-sha512:")
        ids = await openstack.keystone_lookup(name, user="alice", project="admin", role="member")
        assert ids.user_id == alice["id"]
        assert await openstack.keystone_authenticate(name, "alice", "s3cret-alice")
        assert not await openstack.keystone_authenticate(name, "alice", "s3cret-wrong")
