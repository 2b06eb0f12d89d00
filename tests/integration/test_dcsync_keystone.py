"""dcsync on the real keystone and glance schemas (made by ``keystone-manage db_sync`` / ``glance-manage
db_sync`` in their own virtualenv: tests.support.openstack): what keystone writes at the controller is there
at every subcloud with the same ids and hashes, and keystone's own code accepts the password and the
controller's Fernet tokens at the subcloud; an in-sync audit reads no row of a synced table; a subcloud on
another schema version converges on the columns both sides have."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from schemas import dcsync as msg
from schemas.envelope import Role
from services.dcsync.agent import command_subject
from services.dcsync.tables import GLANCE, KEYSTONE
from tests.support import openstack
from tests.support.dcsync_site import DcSite, dc_site
from tests.support.postgres import database_url
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(900)]


@contextlib.asynccontextmanager
async def keystone_db(prefix: str) -> AsyncIterator[str]:
    async with openstack.openstack_database("keystone", prefix) as name:
        yield database_url(name)


@contextlib.asynccontextmanager
async def glance_db(prefix: str) -> AsyncIterator[str]:
    async with openstack.openstack_database("glance", prefix) as name:
        yield database_url(name)


def _db(url: str) -> str:
    return url.rsplit("/", 1)[1]


IDENTITY_CHECK = {
    "user": "SELECT id, enabled, domain_id FROM \"user\" ORDER BY id",
    "local_user": "SELECT id, user_id, name FROM local_user ORDER BY id",
    "password": "SELECT id, local_user_id, password_hash FROM password ORDER BY id",
    "project": "SELECT id, name, domain_id, is_domain FROM project ORDER BY id",
    "role": "SELECT id, name FROM role ORDER BY id",
    "assignment": "SELECT type::text, actor_id, target_id, role_id, inherited FROM assignment ORDER BY 2, 3, 4",
}


async def _same_rows(site: DcSite, name: str, checks: dict[str, str]) -> None:
    sc = site.subclouds[name]

    async def equal() -> bool:
        for query in checks.values():
            if [dict(r) for r in await site.central.fetch(query)] != [dict(r) for r in await sc.pool.fetch(query)]:
                return False
        return True
    await wait_until(equal, timeout=60, what=f"{name} has the controller's rows")


async def test_keystone_users_passwords_and_tokens_reach_every_subcloud(tmp_path: Path) -> None:
    central_keys = await openstack.keystone_fernet_setup(tmp_path / "central-keys")
    async with dc_site(KEYSTONE, keystone_db, fernet_repo=central_keys, fernet_check_interval=0.5) as site:
        admin = await openstack.keystone_bootstrap(_db(site.central_url), user="admin", password="s3cret-admin",
                                                   project="admin", role="admin", key_repository=central_keys)
        for name in ("sc1", "sc2"):
            await site.start_subcloud(name, fernet_repo=tmp_path / f"{name}-keys")
            await site.ok("roost.cmd.subcloud.add", {"name": name})
        alice = await openstack.keystone_create_user(_db(site.central_url), user="alice", password="alice-pw-1",
                                                     project="demo", role="member")
        for name in ("sc1", "sc2"):
            await site.wait_status(name)
            await _same_rows(site, name, IDENTITY_CHECK)
            hash_here = await site.subclouds[name].pool.fetchval(
                "SELECT p.password_hash FROM password p JOIN local_user l ON l.id = p.local_user_id "
                "WHERE l.user_id = $1", alice.user_id)
            assert hash_here == await site.central.fetchval(
                "SELECT p.password_hash FROM password p JOIN local_user l ON l.id = p.local_user_id "
                "WHERE l.user_id = $1", alice.user_id)
        token = await openstack.keystone_issue_token(_db(site.central_url), central_keys, "alice", "alice-pw-1", "demo")

        async def keys_arrived(name: str) -> bool:
            return bool((await site.show(name))["fernet_fingerprint"]
                        and (tmp_path / f"{name}-keys").is_dir()
                        and sorted(p.name for p in (tmp_path / f"{name}-keys").iterdir()) ==
                        sorted(p.name for p in central_keys.iterdir()))

        for name in ("sc1", "sc2"):
            await wait_until(lambda n=name: keys_arrived(n), timeout=60, what=f"fernet keys at {name}")
            sub_db = _db(site.subclouds[name].url)
            logins, tokens = await openstack.keystone_check(
                sub_db, logins=[("alice", "alice-pw-1"), ("alice", "wrong"), ("admin", "s3cret-admin")],
                tokens=[token], repo_dir=tmp_path / f"{name}-keys")
            assert [bool(v) for v in logins] == [True, False, True], [v.reason for v in logins]
            assert tokens[0], tokens[0].reason
            assert tokens[0].details["user_id"] == alice.user_id
        # the controller rotates its keys: the subclouds follow, and a token signed with the new primary works
        await openstack.keystone_fernet_rotate(central_keys)
        new_token = await openstack.keystone_issue_token(_db(site.central_url), central_keys, "admin",
                                                         "s3cret-admin", "admin")
        for name in ("sc1", "sc2"):
            await wait_until(lambda n=name: keys_arrived(n), timeout=60, what=f"rotated keys at {name}")
            assert await openstack.keystone_validate_token(_db(site.subclouds[name].url), tmp_path / f"{name}-keys",
                                                           new_token)
        assert admin.user_id


async def _table_reads(pool: asyncpg.Pool, tables: list[str]) -> dict[str, int]:
    rows = await pool.fetch("SELECT relname, coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) AS n "
                            "FROM pg_stat_user_tables WHERE schemaname = 'public' AND relname = ANY($1)", tables)
    return {r["relname"]: int(r["n"]) for r in rows}


async def _flush_stats(pool: asyncpg.Connection, url: str) -> None:
    """End every other session on the database (a backend reports its table statistics when it exits; pools
    open new sessions, which are ended by the next flush)."""
    db = _db(url)
    pids = [r["pid"] for r in await pool.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1 "
                                                 "AND pid <> pg_backend_pid()", db)]
    await pool.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)

    async def gone() -> bool:
        return not await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", pids)
    await wait_until(gone, timeout=30, what="sessions ended")
    await pool.execute("SELECT pg_stat_force_next_flush()")


async def test_in_sync_audit_reads_no_table_rows_and_repairs_edits() -> None:
    async with dc_site(KEYSTONE, keystone_db) as site:
        await openstack.keystone_create_user(_db(site.central_url), user="alice", password="pw-alice-0",
                                             project="demo", role="member")
        sc = await site.start_subcloud("sc1")
        await site.ok("roost.cmd.subcloud.add", {"name": "sc1"})
        await site.wait_status("sc1")
        await _same_rows(site, "sc1", IDENTITY_CHECK)
        tables = [t.name for t in KEYSTONE.tables]
        # audits now and then, until one compares digests only (a first one may still see the join's heads)
        result = msg.AuditResult.model_validate(await site.ok("roost.cmd.subcloud.audit", {"name": "sc1"}))
        assert result.reports[0].clean
        # a separate, unpooled connection reads the statistics (its own reads are of catalog tables only)
        watcher_c = await asyncpg.connect(site.central_url)
        watcher_s = await asyncpg.connect(sc.url)
        try:
            await _flush_stats(watcher_c, site.central_url)
            await _flush_stats(watcher_s, sc.url)
            before = (await _table_reads(watcher_c, tables), await _table_reads(watcher_s, tables))
            result = msg.AuditResult.model_validate(await site.ok("roost.cmd.subcloud.audit", {"name": "sc1"}))
            assert result.reports[0].clean and result.reports[0].rows_compared == 0
            await _flush_stats(watcher_c, site.central_url)
            await _flush_stats(watcher_s, sc.url)
            after = (await _table_reads(watcher_c, tables), await _table_reads(watcher_s, tables))
            assert after == before
            # the check can fail: reading a table does show
            reader = await asyncpg.connect(sc.url)
            await reader.fetch('SELECT * FROM "user"')
            await reader.close()
            await _flush_stats(watcher_s, sc.url)
            assert (await _table_reads(watcher_s, tables))["user"] > before[1]["user"]
        finally:
            await watcher_c.close()
            await watcher_s.close()
        for pool in (sc.pool, site.central):
            await pool.expire_connections()
        # a row edited directly at the subcloud, and one deleted there: the audit repairs both
        await sc.pool.execute("UPDATE project SET description = 'edited here' WHERE name = 'demo'")
        await sc.pool.execute("DELETE FROM assignment")
        result = msg.AuditResult.model_validate(await site.ok("roost.cmd.subcloud.audit", {"name": "sc1"}))
        repaired = {r.table: r.upserted for r in result.reports[0].repairs}
        assert repaired.get("project") == 1 and repaired.get("assignment", 0) >= 1
        await _same_rows(site, "sc1", IDENTITY_CHECK)
        assert await openstack.keystone_authenticate(_db(sc.url), "alice", "pw-alice-0")
        # a delete at the controller propagates
        await site.central.execute("DELETE FROM \"user\" WHERE id = (SELECT user_id FROM local_user "
                                   "WHERE name = 'alice')")
        await _same_rows(site, "sc1", IDENTITY_CHECK)
        assert not await openstack.keystone_authenticate(_db(sc.url), "alice", "pw-alice-0")


async def test_subcloud_on_another_schema_version_converges() -> None:
    async with dc_site(KEYSTONE, keystone_db) as site:
        await openstack.keystone_create_user(_db(site.central_url), user="alice", password="pw", project="demo",
                                             role="member")

        async def older_keystone(pool: asyncpg.Pool) -> None:
            await pool.execute("ALTER TABLE project DROP COLUMN description; "
                               "ALTER TABLE \"user\" ADD COLUMN legacy_flag boolean DEFAULT false")

        await site.start_subcloud("sc1", prepare=older_keystone)
        await site.ok("roost.cmd.subcloud.add", {"name": "sc1"})
        shown = await site.wait_status("sc1")
        await _same_rows(site, "sc1", IDENTITY_CHECK)
        shown = await site.show("sc1")
        skew = {s["table"]: s for s in shown["skew"]}
        assert skew["project"]["only_central"] == ["description"]
        assert skew["user"]["only_subcloud"] == ["legacy_flag"]
        await site.central.execute("UPDATE project SET description = 'central only', enabled = false "
                                   "WHERE name = 'demo'")
        enabled = "SELECT id, name, enabled FROM project ORDER BY id"   # the change made where both sides agree
        await _same_rows(site, "sc1", {**IDENTITY_CHECK, "project": enabled})
        for _ in range(2):   # audits agree on the shared columns: no repair loop
            result = msg.AuditResult.model_validate(await site.ok("roost.cmd.subcloud.audit", {"name": "sc1"}))
            assert result.reports[0].clean, result.reports[0]


async def test_glance_images_sync() -> None:
    async with dc_site(GLANCE, glance_db) as site:
        image = await openstack.glance_create_image(_db(site.central_url), "cirros", properties={"os": "linux"},
                                                    tags=["small", "test"], disk_format="qcow2",
                                                    container_format="bare", size=12345)
        await site.start_subcloud("sc1")
        await site.ok("roost.cmd.subcloud.add", {"name": "sc1"})
        await site.wait_status("sc1", endpoint="image")
        checks = {
            "images": "SELECT id, name, size, status, disk_format, visibility::text FROM images ORDER BY id",
            "image_properties": "SELECT id, image_id, name, value FROM image_properties ORDER BY id",
            "image_tags": "SELECT id, image_id, value FROM image_tags ORDER BY id",
        }
        await _same_rows(site, "sc1", checks)
        got = await openstack.glance_get_image(_db(site.subclouds["sc1"].url), image)
        assert got["name"] == "cirros" and sorted(got["tags"]) == ["small", "test"]
        await openstack.glance_create_image(_db(site.central_url), "fedora", tags=["big"])
        await site.central.execute("DELETE FROM image_tags WHERE value = 'test'")
        await _same_rows(site, "sc1", checks)


async def test_offline_subcloud_catches_up_1000_keystone_changes_and_replays_change_nothing() -> None:
    async with dc_site(KEYSTONE, keystone_db) as site:
        sc = await site.start_subcloud("sc1")
        await site.ok("roost.cmd.subcloud.add", {"name": "sc1"})
        await site.wait_status("sc1")
        sc.served.beating = False

        async def offline() -> bool:
            return bool((await site.show("sc1"))["availability"] == "offline")
        await wait_until(offline, timeout=30, what="sc1 offline")
        async with site.central.acquire() as conn:
            for i in range(1000):   # one transaction each, as keystone's API would
                await conn.execute("INSERT INTO project (id, name, domain_id, is_domain, enabled) "
                                   "VALUES ($1, $2, '<<keystone.domain.root>>', true, true)", f"d{i:04}", f"dom-{i}")
        await site.central.execute("INSERT INTO region (id, description, extra) VALUES ('RegionTwo', '', '{}')")
        assert await sc.pool.fetchval("SELECT count(*) FROM project WHERE id LIKE 'd%'") == 0
        sc.served.beating = True
        await site.wait_status("sc1")
        await site.wait_cursor_at_head("sc1")
        await _same_rows(site, "sc1", IDENTITY_CHECK)
        assert await sc.pool.fetchval("SELECT count(*) FROM project WHERE id LIKE 'd%'") == 1000
        assert await sc.pool.fetchval("SELECT count(*) FROM region WHERE id = 'RegionTwo'") == 0   # not synced
        # the whole stream sent again, under the keys it had and under new ones: nothing changes
        await sc.pool.execute("UPDATE project SET description = 'local edit' WHERE id = 'd0001'")
        source = site.service.sources["identity"]
        changes = await source.tracker.changes(site.central, "main", 0, 5000)
        bus = await site.bus("roost/replayer", site.auth.issue("replayer", Role.ADMIN, kind="service"))
        before = {t: [dict(r) for r in await sc.pool.fetch(q)] for t, q in IDENTITY_CHECK.items()}
        for key in (None, "replay-1"):
            data = msg.SyncApply(endpoint="identity", lane="main", upto=changes[-1].seq,
                                 changes=[msg.ChangeWire.model_validate(c.wire()) for c in changes[:1000]])
            envelope = bus.envelope("roost.cmd.sync.apply", data, idempotencykey=key or "identity:main:0-x")
            reply = await bus.request(envelope, subject=command_subject("sc1", "apply"), timeout=30)
            assert reply.ok and reply.result["stale"] >= 999, reply
        assert await sc.pool.fetchval("SELECT description FROM project WHERE id = 'd0001'") == "local edit"
        assert {t: [dict(r) for r in await sc.pool.fetch(q)] for t, q in IDENTITY_CHECK.items()} == before
