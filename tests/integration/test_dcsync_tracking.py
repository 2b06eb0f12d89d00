"""dcsync's triggers, digests and apply on real PostgreSQL, on a small keystone-shaped schema (the real
keystone and glance schemas are in test_dcsync_keystone.py): capture in commit order, local-state columns
ignored, digests equal when the rows are, version guard, tombstones, TRUNCATE, re-digest of missed writes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.dcsync.tables import Endpoint, EndpointSpec, TableSpec, resolve
from services.dcsync.tracking import Tracker
from services.dcsync.tracking_sql import Place
from tests.support.postgres import fresh_database
from tests.support.waiting import wait_until

SCHEMA = """
CREATE TABLE "user" (id varchar(64) PRIMARY KEY, enabled boolean, extra text, last_active_at date);
CREATE TABLE local_user (id serial PRIMARY KEY, user_id varchar(64) NOT NULL REFERENCES "user"(id) ON DELETE CASCADE,
                         name varchar(255) NOT NULL, failed_auth_count int, UNIQUE (name));
CREATE TABLE password (id serial PRIMARY KEY, local_user_id int NOT NULL REFERENCES local_user(id) ON DELETE CASCADE,
                       password_hash varchar(255), created_at timestamp NOT NULL DEFAULT now());
CREATE TABLE revocation_event (id serial PRIMARY KEY, user_id varchar(64), issued_before timestamp NOT NULL);
CREATE TABLE unsynced (id int PRIMARY KEY, note text);
"""

SPEC = EndpointSpec(Endpoint.IDENTITY, (
    TableSpec("user", ("id",), frozenset({"last_active_at"})),
    TableSpec("local_user", ("id",), frozenset({"failed_auth_count"}), natural_key=("name",)),
    TableSpec("password", ("id",)),
    TableSpec("revocation_event", ("id",), lane="revocation"),
))


@pytest.fixture
async def pair() -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Pool]]:
    async with fresh_database("roost_dcs_c") as central_url, fresh_database("roost_dcs_s") as sub_url:
        central = await asyncpg.create_pool(central_url, min_size=1, max_size=4)
        sub = await asyncpg.create_pool(sub_url, min_size=1, max_size=4)
        try:
            for pool in (central, sub):
                await pool.execute(SCHEMA)
            yield central, sub
        finally:
            await central.close()
            await sub.close()


async def _install(pool: asyncpg.Pool, *, capture: bool) -> Tracker:
    tracker = Tracker()
    tables = resolve(SPEC, await tracker.reflect(pool))
    async with pool.acquire() as conn:
        await tracker.install(conn, tables, capture=capture)
    return tracker


async def _sync(central: asyncpg.Pool, sub: asyncpg.Pool, tracker: Tracker, lane: str = "main",
                after: int = 0) -> int:
    changes = await tracker.changes(central, lane, after, 10_000)
    async with sub.acquire() as conn, conn.transaction():
        result = await tracker.apply(conn, [c.wire() for c in changes])
    assert not result.failed
    return changes[-1].seq if changes else after


async def _roots(pool: asyncpg.Pool, tracker: Tracker) -> dict[str, tuple[int, int]]:
    roots = await tracker.roots(pool, [t.name for t in SPEC.tables])
    return {k: (v.digest, v.rows) for k, v in roots.items()}


async def test_capture_apply_and_digests_agree(pair: tuple[asyncpg.Pool, asyncpg.Pool]) -> None:
    central, sub = pair
    tc = await _install(central, capture=True)
    ts = await _install(sub, capture=False)
    await central.execute("""INSERT INTO "user" VALUES ('u1', true, '{}', NULL);
        INSERT INTO local_user (user_id, name) VALUES ('u1', 'alice');
        INSERT INTO password (local_user_id, password_hash) VALUES (1, '$2b$12$abc');
        INSERT INTO unsynced VALUES (1, 'not mine')""")
    changes = await tc.changes(central, "main", 0, 100)
    assert [(c.table, c.op) for c in changes] == [("user", "U"), ("local_user", "U"), ("password", "U")]
    assert "last_active_at" not in (changes[0].row or {})
    await _sync(central, sub, tc)
    assert await sub.fetchval("SELECT password_hash FROM password WHERE id = 1") == "$2b$12$abc"
    assert await _roots(central, tc) == await _roots(sub, ts)
    assert (await _roots(central, tc))["user"][1] == 1

    # a local-state column changes on either side: no change, digests still equal
    await central.execute("UPDATE \"user\" SET last_active_at = '2026-01-01'")
    await sub.execute("UPDATE local_user SET failed_auth_count = 3")
    assert await tc.head(central) == changes[-1].seq
    assert await _roots(central, tc) == await _roots(sub, ts)

    # a local edit at the subcloud shows in its digest and keeps its version
    await sub.execute("UPDATE \"user\" SET enabled = false WHERE id = 'u1'")
    assert (await _roots(central, tc))["user"] != (await _roots(sub, ts))["user"]
    version = await sub.fetchval("SELECT version FROM roost_dcsync.row_state WHERE tbl = 'user'")
    assert version == changes[0].seq
    # a replayed stream change does not overwrite it; a repair of equal version does
    async with sub.acquire() as conn, conn.transaction():
        stale = await ts.apply(conn, [changes[0].wire()])
    assert (stale.applied, stale.stale) == (0, 1)
    async with sub.acquire() as conn, conn.transaction():
        repaired = await ts.apply(conn, [changes[0].wire()], repair=True)
    assert repaired.applied == 1
    assert await sub.fetchval("SELECT enabled FROM \"user\"") is True
    assert await _roots(central, tc) == await _roots(sub, ts)


async def test_delete_cascades_and_tombstone_guards(pair: tuple[asyncpg.Pool, asyncpg.Pool]) -> None:
    central, sub = pair
    tc = await _install(central, capture=True)
    ts = await _install(sub, capture=False)
    await central.execute("""INSERT INTO "user" VALUES ('u1', true, NULL, NULL);
        INSERT INTO local_user (user_id, name) VALUES ('u1', 'alice');
        INSERT INTO password (local_user_id, password_hash) VALUES (1, 'h')""")
    upto = await _sync(central, sub, tc)
    first = await tc.changes(central, "main", 0, 1)
    await central.execute("DELETE FROM \"user\" WHERE id = 'u1'")
    deletes = await tc.changes(central, "main", upto, 100)
    assert sorted(c.table for c in deletes) == ["local_user", "password", "user"]
    assert all(c.op == "D" for c in deletes)
    await _sync(central, sub, tc, after=upto)
    assert await sub.fetchval("SELECT count(*) FROM \"user\"") == 0
    assert await _roots(central, tc) == await _roots(sub, ts)
    # an old insert arriving again never brings the row back
    async with sub.acquire() as conn, conn.transaction():
        result = await ts.apply(conn, [first[0].wire()])
    assert result.stale == 1
    assert await sub.fetchval("SELECT count(*) FROM \"user\"") == 0


async def test_truncate_is_captured_as_deletes_and_the_digests_follow(pair: tuple[asyncpg.Pool, asyncpg.Pool]) -> None:
    """TRUNCATE fires no row trigger: the statement trigger logs a delete per row it knows of (no write is
    missed, whoever makes it), and at a subcloud it empties the digests, so the audit sees what is gone."""
    central, sub = pair
    tc = await _install(central, capture=True)
    ts = await _install(sub, capture=False)
    await central.execute("""INSERT INTO "user" VALUES ('u1', true, NULL, NULL), ('u2', true, NULL, NULL);
        INSERT INTO local_user (user_id, name) VALUES ('u1', 'alice'), ('u2', 'bob');
        INSERT INTO password (local_user_id, password_hash) VALUES (1, 'h1'), (2, 'h2')""")
    upto = await _sync(central, sub, tc)
    await central.execute('TRUNCATE "user" CASCADE')        # local_user and password with it
    deletes = await tc.changes(central, "main", upto, 100)
    assert sorted((c.table, c.op) for c in deletes) == [(t, "D") for t in ("local_user", "local_user", "password",
                                                                            "password", "user", "user")]
    assert sorted(c.pk["id"] for c in deletes if c.table == "user") == ["u1", "u2"]
    assert await _roots(central, tc) == {t.name: (0, 0) for t in SPEC.tables}
    upto = await _sync(central, sub, tc, after=upto)
    assert await sub.fetchval('SELECT count(*) FROM "user"') == 0
    assert await _roots(sub, ts) == await _roots(central, tc)

    # a TRUNCATE at the subcloud: its digests say the rows are gone, and differ from the controller's
    await central.execute("INSERT INTO \"user\" VALUES ('u3', true, NULL, NULL)")
    await _sync(central, sub, tc, after=upto)
    assert await _roots(sub, ts) == await _roots(central, tc)
    await sub.execute('TRUNCATE "user" CASCADE')
    assert (await _roots(sub, ts))["user"] == (0, 0) != (await _roots(central, tc))["user"]

    # a table tracked without it (before the TRUNCATE trigger existed) counts as missing its triggers
    tables = resolve(SPEC, await tc.reflect(central))
    await central.execute("DROP TRIGGER roost_dcsync_truncate ON password")
    assert await tc.missing_triggers(central, tables, capture=True) == ["password"]
    async with central.acquire() as conn:
        assert (await tc.install(conn, tables, capture=True)).retracked == ["password"]
    assert await tc.missing_triggers(central, tables, capture=True) == []


async def _clashing_alice(central: asyncpg.Pool, sub: asyncpg.Pool) -> tuple[Tracker, Tracker]:
    """Two users and a local user 'alice' at the controller; the subcloud has its own 'alice' (another id)."""
    tc = await _install(central, capture=True)
    ts = await _install(sub, capture=False)
    await sub.execute("""INSERT INTO "user" VALUES ('local', true, NULL, NULL);
        INSERT INTO local_user (id, user_id, name) VALUES (100, 'local', 'alice')""")
    await central.execute("""INSERT INTO "user" VALUES ('u1', true, NULL, NULL), ('u2', true, NULL, NULL);
        INSERT INTO local_user (user_id, name) VALUES ('u1', 'alice')""")
    return tc, ts


async def test_failed_change_is_reported_others_apply(pair: tuple[asyncpg.Pool, asyncpg.Pool]) -> None:
    central, sub = pair
    tc, ts = await _clashing_alice(central, sub)
    changes = await tc.changes(central, "main", 0, 100)
    async with sub.acquire() as conn, conn.transaction():
        result = await ts.apply(conn, [c.wire() for c in changes])
    assert result.applied == 2
    assert [(f.table, f.pk) for f in result.failed] == [("local_user", {"id": 1})]
    assert "duplicate key" in result.failed[0].error
    assert await sub.fetchval("SELECT count(*) FROM \"user\"") == 3


async def test_receive_is_one_transaction_with_inbox_and_cursor(pair: tuple[asyncpg.Pool, asyncpg.Pool]) -> None:
    """The agent's message in one statement: a failing change reported while the rest lands and the cursor
    moves; the same message again changes nothing and answers the cursor; set_cursor moves it back."""
    central, sub = pair
    tc, ts = await _clashing_alice(central, sub)
    wire = [c.wire() for c in await tc.changes(central, "main", 0, 100)]
    upto = wire[-1]["seq"]
    first = await ts.receive(sub, "m1", "identity", "main", wire, upto=upto)
    assert not first.duplicate and first.cursor == upto and first.result.applied == 2
    assert [(f.table, f.pk) for f in first.result.failed] == [("local_user", {"id": 1})]
    await central.execute("""UPDATE "user" SET extra = 'new' WHERE id = 'u1'""")
    newer = [c.wire() for c in await tc.changes(central, "main", upto, 9)]
    again = await ts.receive(sub, "m1", "identity", "main", newer, upto=upto + 1)
    assert again.duplicate and again.cursor == upto and again.result.applied == 0
    assert await sub.fetchval("""SELECT extra FROM "user" WHERE id = 'u1'""") is None
    assert (await ts.cursors(sub, "identity"))["main"] == upto
    back = await ts.receive(sub, "resync", "identity", "main", [], upto=1, set_cursor=True)
    assert back.cursor == 1 and (await ts.cursors(sub, "identity"))["main"] == 1
    assert await sub.fetchval("SELECT count(*) FROM roost_dcsync.inbox") == 2


async def test_lanes_and_commit_order(pair: tuple[asyncpg.Pool, asyncpg.Pool]) -> None:
    central, _ = pair
    tc = await _install(central, capture=True)
    # two writers at once: the one that commits first has the lower numbers
    a = await central.acquire()
    b = await central.acquire()
    try:
        ta = a.transaction()
        await ta.start()
        await a.execute("INSERT INTO \"user\" VALUES ('a', true, NULL, NULL)")
        tb = b.transaction()
        await tb.start()
        blocked = asyncio.create_task(b.execute("INSERT INTO \"user\" VALUES ('b', true, NULL, NULL)"))
        b_pid = b.get_server_pid()

        async def b_waits_for_the_order_lock() -> bool:
            return bool(await central.fetchval(
                "SELECT count(*) FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' AND NOT granted", b_pid))
        await wait_until(b_waits_for_the_order_lock, timeout=10, what="b waiting for a's commit")
        assert not blocked.done()   # waits for a's commit to draw its number
        assert await tc.head(central) == 0
        await ta.commit()
        await blocked
        await tb.commit()
    finally:
        await central.release(a)
        await central.release(b)
    changes = await tc.changes(central, "main", 0, 10)
    assert [c.pk["id"] for c in changes] == ["a", "b"]
    await central.execute("INSERT INTO revocation_event (user_id, issued_before) VALUES ('a', now())")
    assert [c.table for c in await tc.changes(central, "revocation", 0, 10)] == ["revocation_event"]
    assert [c.table for c in await tc.changes(central, "main", changes[-1].seq, 10)] == []


async def test_missing_trigger_found_and_redigest_logs_missed_writes(pair: tuple[asyncpg.Pool, asyncpg.Pool]) -> None:
    central, _ = pair
    tc = await _install(central, capture=True)
    tables = resolve(SPEC, await tc.reflect(central))
    await central.execute("INSERT INTO \"user\" VALUES ('u1', true, NULL, NULL)")
    await central.execute("DROP TRIGGER roost_dcsync_track ON \"user\"")
    assert await tc.missing_triggers(central, tables, capture=True) == ["user"]
    await central.execute("INSERT INTO \"user\" VALUES ('u2', true, NULL, NULL); UPDATE \"user\" SET extra = 'x' "
                          "WHERE id = 'u1'")
    head = await tc.head(central)
    async with central.acquire() as conn:
        report = await tc.install(conn, tables, capture=True)
    assert report.retracked == ["user"]
    assert [(r.added, r.changed, r.removed) for r in report.redigested] == [(1, 1, 0)]
    missed = await tc.changes(central, "main", head, 10)
    assert sorted(c.pk["id"] for c in missed) == ["u1", "u2"]
    assert await tc.missing_triggers(central, tables, capture=True) == []


async def test_sequences_move_past_applied_ids(pair: tuple[asyncpg.Pool, asyncpg.Pool]) -> None:
    central, sub = pair
    tc = await _install(central, capture=True)
    await _install(sub, capture=False)
    await central.execute("""INSERT INTO "user" VALUES ('u1', true, NULL, NULL);
        INSERT INTO local_user (id, user_id, name) VALUES (41, 'u1', 'alice')""")
    await _sync(central, sub, tc)
    # a row made at the subcloud afterwards does not collide with the controller's id
    assert await sub.fetchval("INSERT INTO local_user (user_id, name) VALUES ('u1', 'bob') RETURNING id") == 42


async def test_purge_keeps_each_lanes_newest_and_notes_how_far(pair: tuple[asyncpg.Pool, asyncpg.Pool]) -> None:
    from datetime import UTC, datetime, timedelta
    central, _ = pair
    tc = await _install(central, capture=True)
    await central.execute("INSERT INTO revocation_event (user_id, issued_before) VALUES ('a', now())")
    for i in range(5):
        await central.execute("INSERT INTO \"user\" VALUES ($1, true, NULL, NULL)", f"u{i}")
    heads = {lane: await tc.head(central, lane) for lane in ("main", "revocation")}
    later = datetime.now(UTC) + timedelta(days=1)          # everything is older than the retention
    assert await tc.purge(central, "main", below=0, before=later) == 4
    assert await tc.purge(central, "revocation", below=0, before=later) == 0     # its only change stays
    assert {lane: await tc.head(central, lane) for lane in ("main", "revocation")} == heads
    assert await tc.purged_through(central) == {"main": heads["main"] - 1}
    # the cursor rule alone: nothing a subcloud lacks goes
    await central.execute("INSERT INTO \"user\" VALUES ('u9', true, NULL, NULL)")
    assert await tc.purge(central, "main", below=heads["main"], before=datetime(2000, 1, 1, tzinfo=UTC)) == 0
    assert await tc.purge(central, "main", below=heads["main"] + 1, before=datetime(2000, 1, 1, tzinfo=UTC)) == 1


async def test_a_write_touches_its_own_row_state_not_the_tables(pair: tuple[asyncpg.Pool, asyncpg.Pool]) -> None:
    """The trigger finds a row's state and digest bucket by their keys: a write costs the same with 3,000 rows
    as with 3 (it once compared the table's name as a ``name`` with the text column, and read every row state
    of the table on every write)."""
    central, sub = pair
    for pool, capture in ((central, True), (sub, False)):
        await _install(pool, capture=capture)
        await pool.execute("""INSERT INTO "user" SELECT 'u' || i, true, '{}', NULL FROM generate_series(1, 3000) i""")
        await pool.execute("ANALYZE")
        async with pool.acquire() as conn, conn.transaction():
            before = await _tuples_read(conn)     # this session's counts not yet flushed are in the view too
            written = await _row_writes(conn)
            await conn.execute("""UPDATE "user" SET extra = '{"x": 1}' WHERE id = 'u1500'""")
            after = await _tuples_read(conn)
            writes = {t: tuple(a - b for a, b in zip(n, written.get(t, (0, 0, 0)), strict=True))
                      for t, n in (await _row_writes(conn)).items()}
        touched = {t: after.get(t, 0) - before.get(t, 0) for t in ("row_state", "digest")}
        assert touched["row_state"] <= 3 and touched["digest"] <= 3, (capture, touched)
        # the row's state is updated where it is, not deleted and inserted again
        assert writes["row_state"] == (0, 1, 0) and writes["digest"] == (0, 1, 0), (capture, writes)


async def _tuples_read(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT relname, coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) AS tuples "
                            "FROM pg_stat_xact_user_tables WHERE schemaname = 'roost_dcsync'")
    return {r["relname"]: int(r["tuples"]) for r in rows}


async def _row_writes(conn: asyncpg.Connection) -> dict[str, tuple[int, int, int]]:
    """This transaction's (inserts, updates, deletes) per bookkeeping table."""
    rows = await conn.fetch("SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_xact_user_tables "
                            "WHERE schemaname = 'roost_dcsync'")
    return {r["relname"]: (int(r["n_tup_ins"]), int(r["n_tup_upd"]), int(r["n_tup_del"])) for r in rows}


async def test_a_key_change_a_delete_and_a_return_keep_the_digests_equal(
        pair: tuple[asyncpg.Pool, asyncpg.Pool]) -> None:
    central, sub = pair
    tc = await _install(central, capture=True)
    ts = await _install(sub, capture=False)
    await central.execute("""INSERT INTO "user" VALUES ('u1', true, NULL, NULL), ('u2', true, NULL, NULL);
        INSERT INTO revocation_event (id, user_id, issued_before) VALUES (1, 'u1', '2026-01-01')""")
    main, rev = await _sync(central, sub, tc), await _sync(central, sub, tc, "revocation")
    # the primary key changes: a delete of the old key and an upsert of the new one
    await central.execute("UPDATE revocation_event SET id = 7 WHERE id = 1")
    moved = await tc.changes(central, "revocation", rev, 10)
    assert [(c.op, c.pk) for c in moved] == [("D", {"id": 1}), ("U", {"id": 7})]
    rev = await _sync(central, sub, tc, "revocation", after=rev)
    assert await sub.fetchval("SELECT array_agg(id) FROM revocation_event") == [7]
    # deleted, then made again with the same key: back at the subcloud, its tombstone gone
    await central.execute("DELETE FROM \"user\" WHERE id = 'u2'")
    main = await _sync(central, sub, tc, after=main)
    assert await sub.fetchval("SELECT count(*) FROM roost_dcsync.tombstone WHERE tbl = 'user'") == 1
    await central.execute("INSERT INTO \"user\" VALUES ('u2', false, 'again', NULL)")
    await _sync(central, sub, tc, after=main)
    assert await sub.fetchval("SELECT extra FROM \"user\" WHERE id = 'u2'") == "again"
    assert await sub.fetchval("SELECT count(*) FROM roost_dcsync.tombstone WHERE tbl = 'user'") == 0
    assert await _roots(central, tc) == await _roots(sub, ts)


async def test_a_row_without_every_synced_column_writes_only_those_it_has(
        pair: tuple[asyncpg.Pool, asyncpg.Pool]) -> None:
    """The static writer of a table takes whole rows; a row cut short (a controller with fewer columns) goes
    the dynamic way and leaves the other columns as they are."""
    _, sub = pair
    ts = await _install(sub, capture=False)
    await sub.execute("""INSERT INTO "user" VALUES ('u1', true, 'kept', NULL)""")
    async with sub.acquire() as conn, conn.transaction():
        result = await ts.apply(conn, [{"seq": 5, "tbl": "user", "op": "U", "pk": {"id": "u1"},
                                        "row": {"id": "u1", "enabled": False}, "version": 5},
                                       {"seq": 6, "tbl": "user", "op": "U", "pk": {"id": "u2"},
                                        "row": {"id": "u2", "enabled": True, "extra": "whole"}, "version": 6}])
    assert (result.applied, result.failed) == (2, ())
    assert [tuple(r) for r in await sub.fetch('SELECT id, enabled, extra FROM "user" ORDER BY id')] == [
        ("u1", False, "kept"), ("u2", True, "whole")]
    assert await sub.fetchval("SELECT version FROM roost_dcsync.row_state WHERE pk = '{\"id\": \"u1\"}'") == 5


async def test_the_generated_writers_survive_the_bookkeeping_script_run_again(
        pair: tuple[asyncpg.Pool, asyncpg.Pool]) -> None:
    """An agent runs the bookkeeping script at every start (``SubcloudSync.prepare``); the static writers
    that ``install`` generated stay (they were reset to the dynamic path once, until the next configure)."""
    from services.dcsync.tracking_sql import Place, install_sql
    _, sub = pair
    await _install(sub, capture=False)
    row = '{"id": "u1", "enabled": true, "extra": null}'
    assert await sub.fetchval("SELECT roost_dcsync.put_row('user', $1::jsonb)", row) is True
    await sub.execute(install_sql(Place()))
    assert await sub.fetchval("SELECT roost_dcsync.put_row('user', $1::jsonb)", row) is True
    assert await sub.fetchval("SELECT roost_dcsync.put_row('unsynced', '{}'::jsonb)") is False
    assert await sub.fetchval("SELECT roost_dcsync.delete_row('user', '{\"id\": \"u1\"}'::jsonb)") is True
    assert await sub.fetchval('SELECT count(*) FROM "user"') == 0


async def test_a_bookkeeping_schema_whose_name_needs_quoting(pair: tuple[asyncpg.Pool, asyncpg.Pool]) -> None:
    """Every statement names the bookkeeping schema quoted: the change sequence too (nextval takes its name as
    text, where an unquoted one was folded to lower case and a quote ended the literal)."""
    central, _ = pair
    tracker = Tracker(Place("public", 'Roost\'s "DC" sync'))
    tables = resolve(SPEC, await tracker.reflect(central))
    async with central.acquire() as conn:
        await tracker.install(conn, tables, capture=True)
    await central.execute("""INSERT INTO "user" VALUES ('u1', true, NULL, NULL), ('u2', true, NULL, NULL);
        UPDATE "user" SET extra = 'x' WHERE id = 'u1'; DELETE FROM "user" WHERE id = 'u2'""")
    await central.execute("DROP TRIGGER roost_dcsync_track ON \"user\"")
    await central.execute("INSERT INTO \"user\" VALUES ('u3', true, NULL, NULL)")      # missed by the trigger
    async with central.acquire() as conn:
        report = await tracker.install(conn, tables, capture=True)                   # the re-digest logs it
    assert [(r.added, r.changed, r.removed) for r in report.redigested] == [(1, 0, 0)]
    await central.execute('TRUNCATE "user" CASCADE')
    changes = await tracker.changes(central, "main", 0, 100)
    assert [(c.op, c.pk["id"]) for c in changes] == [
        ("U", "u1"), ("U", "u2"), ("U", "u1"), ("D", "u2"), ("U", "u3"), ("D", "u1"), ("D", "u3")]
    assert [c.seq for c in changes] == sorted({c.seq for c in changes})
    assert await tracker.head(central) == changes[-1].seq
