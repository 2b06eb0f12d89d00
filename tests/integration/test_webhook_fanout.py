"""The lazy fan-out of webhook notifications on the real PostgreSQL.

Covers: a notification whose transaction commits after a later one is never skipped by a cursor (the
fan-out waits for writers that hold a seq), and one rolled back holds nothing up; with every window full the
fan-out does not wait for the writers at all; a new subscriber gets
what follows its creation only; two fan-outs at once make each delivery once; the migration from a queue
of delivery rows with their own bodies (rows queued before 0101 are sent, in order, before what follows,
and signed); purging notifications nobody needs; queue depth counting what is not fanned out yet; the
service's retention pass.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from services.alarms.service import AlarmsService
from services.alarms.webhooks import dispatcher as dispatcher_module
from services.alarms.webhooks import store
from services.alarms.webhooks.dispatcher import DispatcherSettings, WebhookDispatcher
from services.alarms.webhooks.formats import EventKind, Format, render
from services.alarms.webhooks.signing import verify
from services.core.db.migrations import migrate
from services.core.db.outbox import Outbox
from services.core.host import ServiceContext
from services.core.settings import load_settings
from tests.integration.test_webhook_delivery import FAST, MIGRATIONS, enqueue, lifecycle, notification
from tests.support.http_receiver import HttpReceiver
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until as until

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with fresh_database() as url, pool_on(url, migrate_core=False) as pool:
        await migrate(pool, "alarms", MIGRATIONS)
        yield pool


async def delivered_ids(pool: asyncpg.Pool, subscription_id: str) -> list[str]:
    rows = await pool.fetch("SELECT webhook_id FROM alarms.webhook_deliveries WHERE subscription_id = $1 ORDER BY id",
                            uuid.UUID(subscription_id))
    return [r["webhook_id"] for r in rows]


async def test_a_notification_committing_late_is_not_skipped(pool: asyncpg.Pool) -> None:
    sub, _ = await store.create_subscription(pool, "http://127.0.0.1:9/")
    early, late = notification(entity="host=a"), notification(entity="host=b")
    rolled_back = notification(entity="host=c")
    async with pool.acquire() as slow:
        tx = slow.transaction()
        await tx.start()
        assert await store.enqueue(slow, early) == 1           # takes seq 1, does not commit yet
        await enqueue(pool, [late])                            # seq 2, committed
        started = asyncio.get_running_loop().time()
        assert await store.fan_out(pool) == 0, "seq 2 is not fanned out while seq 1 may still commit"
        assert asyncio.get_running_loop().time() - started >= 0.4, "it waited for the writer (half a second)"
        assert await pool.fetchval("SELECT fanned_out_seq FROM alarms.webhook_subscriptions") == 0
        fan_out = asyncio.create_task(store.fan_out(pool))
        await until(lambda: pool.fetchval(
            """SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                              AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                              AND (classid::bigint << 32) + objid::bigint = $1)""", store.FANOUT_LOCK),
            timeout=5, what="the fan-out waiting for the writer's lock")
        await tx.commit()                                      # the waiting fan-out goes on at once
        assert await fan_out == 2
    assert await delivered_ids(pool, sub.id) == [early.id, late.id]
    async with pool.acquire() as conn:                         # a writer that rolls back holds nothing up
        tx = conn.transaction()
        await tx.start()
        await store.enqueue(conn, rolled_back)
        await tx.rollback()
    await enqueue(pool, [notification(entity="host=d")])
    assert await asyncio.wait_for(store.fan_out(pool), 5) == 1
    assert len(await delivered_ids(pool, sub.id)) == 3
    assert await pool.fetchval("SELECT fanned_out_seq FROM alarms.webhook_subscriptions") == 4


async def test_a_held_connection_stays_usable_after_the_barrier_gave_up(pool: asyncpg.Pool) -> None:
    """The dispatcher fans out on a connection it keeps: a barrier that timed out must not leave it in an
    aborted transaction (every later fan-out on it would fail)."""
    sub, _ = await store.create_subscription(pool, "http://127.0.0.1:9/")
    async with pool.acquire() as slow, pool.acquire() as held:
        tx = slow.transaction()
        await tx.start()
        await store.enqueue(slow, notification(entity="host=a"))         # holds the writers' lock
        assert await store.fan_out(held) == 0, "gave up after half a second"
        assert not held.is_in_transaction()
        await tx.commit()
        assert await store.fan_out(held) == 1
    assert len(await delivered_ids(pool, sub.id)) == 1


async def test_full_windows_take_no_writers_lock(pool: asyncpg.Pool) -> None:
    """A subscriber that is down has its window full: the fan-out can make nothing for it, so it must not take
    the writers' lock (exclusive, it holds up every alarm transaction for an instant) at every commit."""
    sub, _ = await store.create_subscription(pool, "http://127.0.0.1:9/")
    await enqueue(pool, [notification(entity=f"host=a-{i}") for i in range(3)])
    assert await store.fan_out(pool, ahead=2) == 2                          # the window: two pending rows
    async with pool.acquire() as writer, pool.acquire() as held:
        tx = writer.transaction()
        await tx.start()
        await store.enqueue(writer, notification(entity="host=b"))          # a writer in flight, holding its seq
        # Waiting for the writers' lock could only end in its lock timeout here (the writer commits after this
        # returns), and a fan-out that waited in vain says so: again=True.  again=False: it did not wait.
        assert await store.fan_out_once(held, ahead=2) == store.FanOut(made=0, again=False, full=True)
        assert not held.is_in_transaction()
        await tx.commit()
    await pool.execute("UPDATE alarms.webhook_deliveries SET state = 'delivered' WHERE id = "
                       "(SELECT min(id) FROM alarms.webhook_deliveries)")    # one delivered: room for one
    assert await store.fan_out(pool, ahead=2) == 1
    assert len(await delivered_ids(pool, sub.id)) == 3


async def test_a_new_subscriber_gets_what_follows_only(pool: asyncpg.Pool) -> None:
    first, _ = await store.create_subscription(pool, "http://127.0.0.1:9/")
    before, after = notification(entity="host=a"), notification(entity="host=b")
    await enqueue(pool, [before])
    second, _ = await store.create_subscription(pool, "http://127.0.0.1:9/")
    await enqueue(pool, [after])
    assert await store.queue_depth(pool) == {first.id: 2, second.id: 1}
    assert await store.fan_out(pool) == 3
    assert await delivered_ids(pool, first.id) == [before.id, after.id]
    assert await delivered_ids(pool, second.id) == [after.id]
    assert await store.queue_depth(pool) == {first.id: 2, second.id: 1}
    assert await store.delete_subscription(pool, first.id)
    assert await pool.fetchval("SELECT count(*) FROM alarms.webhook_deliveries") == 1


async def test_no_subscriber_no_notification(pool: asyncpg.Pool) -> None:
    assert await enqueue(pool, [notification()]) == 0
    assert await pool.fetchval("SELECT count(*) FROM alarms.webhook_notifications") == 0


async def test_concurrent_fan_outs_make_each_delivery_once(pool: asyncpg.Pool) -> None:
    subs = [(await store.create_subscription(pool, "http://127.0.0.1:9/"))[0] for _ in range(3)]
    notes = [notification(entity=f"host=h{i}") for i in range(60)]

    async def writer() -> None:
        for i in range(0, len(notes), 3):
            await enqueue(pool, notes[i:i + 3])

    async def fan_outs() -> int:
        made = 0
        for _ in range(30):
            made += await store.fan_out(pool)
            await asyncio.sleep(0.005)
        return made

    results = await asyncio.gather(writer(), fan_outs(), fan_outs())
    made = results[1] + results[2] + await store.fan_out(pool)
    assert made == 3 * len(notes)
    for sub in subs:
        assert await delivered_ids(pool, sub.id) == [n.id for n in notes]


async def test_rows_queued_before_the_migration_are_sent_first_and_signed(tmp_path: Path) -> None:
    """A deployment upgraded with deliveries pending (their bodies in the rows) loses none of them."""
    old = tmp_path / "migrations"
    old.mkdir()
    for name in ("0001_alarms.sql", "0100_webhooks.sql"):
        shutil.copy(MIGRATIONS / name, old / name)
    async with HttpReceiver() as receiver, fresh_database() as url, pool_on(url, migrate_core=False) as pool:
        await migrate(pool, "alarms", old)
        secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        roost_id, am_id = uuid.uuid4(), uuid.uuid4()
        for sub_id, fmt in ((roost_id, Format.ROOST), (am_id, Format.ALERTMANAGER)):
            await pool.execute(
                """INSERT INTO alarms.webhook_subscriptions (id, name, url, secrets, format)
                   VALUES ($1, $2, $3, ARRAY[$4], $5)""", sub_id, fmt.value, receiver.url(f"/{fmt.value}"), secret,
                fmt.value)
        raised, changed, *_ = lifecycle("200.004", "host=controller-0")
        for sub_id, fmt in ((roost_id, Format.ROOST), (am_id, Format.ALERTMANAGER)):
            await pool.execute(
                """INSERT INTO alarms.webhook_deliveries (subscription_id, webhook_id, ordering_key, event_type, body)
                   VALUES ($1, $2, $3, $4, $5)""", sub_id, raised.id, raised.instance_key, raised.type,
                render(raised, fmt, receiver=fmt.value))
        await migrate(pool, "alarms", MIGRATIONS)             # 0101: the old rows stay as they are
        assert await pool.fetchval("SELECT count(*) FROM alarms.webhook_deliveries WHERE body IS NOT NULL") == 2
        await enqueue(pool, [changed])                        # then a notification of the same alarm
        async with WebhookDispatcher(pool, FAST) as dispatcher:
            await until(lambda: dispatcher.stats.delivered == 4, what="both rows and the new notification, twice")
    by_path: dict[str, list[bytes]] = {}
    for r in receiver.requests:
        verify(r.headers, r.body, secret)
        by_path.setdefault(r.path, []).append(r.body)
    assert [data_of(b) for b in by_path["/roost"]] == [1, 2]
    assert by_path["/roost"] == [render(raised, Format.ROOST), render(changed, Format.ROOST)]
    assert by_path["/alertmanager"] == [render(raised, Format.ALERTMANAGER, receiver="alertmanager"),
                                        render(changed, Format.ALERTMANAGER, receiver="alertmanager")]
    assert [r.headers["webhook-id"] for r in receiver.requests if r.path == "/roost"] == [raised.id, changed.id]


def data_of(body: bytes) -> int:
    version: int = json.loads(body)["data"]["version"]
    return version


async def test_purge_keeps_what_a_delivery_or_a_dead_letter_needs(pool: asyncpg.Pool) -> None:
    sub, _ = await store.create_subscription(pool, "http://127.0.0.1:9/")
    notes = [notification(entity=f"host=h{i}", event=EventKind.RAISED) for i in range(4)]
    await enqueue(pool, notes)
    assert await store.purge_notifications(pool) == 0, "not fanned out yet"
    await store.fan_out(pool)
    assert await store.purge_notifications(pool) == 0, "all pending"
    await pool.execute("UPDATE alarms.webhook_deliveries SET state = 'delivered', delivered_at = now() "
                       "WHERE webhook_id = ANY($1::text[])", [notes[0].id, notes[2].id])
    await pool.execute("UPDATE alarms.webhook_deliveries SET state = 'dead', dead_at = now() WHERE webhook_id = $1",
                       notes[1].id)
    assert await store.purge_notifications(pool) == 2, "the first and the third: the dead letter's and the pending stay"
    await pool.execute("UPDATE alarms.webhook_deliveries SET state = 'delivered', delivered_at = now() "
                       "WHERE webhook_id = $1", notes[3].id)
    assert await store.purge_notifications(pool) == 1, "the fourth; the dead letter's stays"
    assert await store.replay(pool, sub.id) == 1
    body = await pool.fetchval("""SELECT n.body FROM alarms.webhook_deliveries d
                                  JOIN alarms.webhook_notifications n ON n.seq = d.notification_seq
                                  WHERE d.state = 'pending'""")
    assert bytes(body) == render(notes[1], Format.ROOST)


async def test_the_service_retention_pass_purges_the_webhook_queue(pool: asyncpg.Pool) -> None:
    await store.create_subscription(pool, "http://127.0.0.1:9/")
    await enqueue(pool, [notification(entity="host=a"), notification(entity="host=b")])
    await store.fan_out(pool)
    await pool.execute("UPDATE alarms.webhook_deliveries SET state = 'delivered', "
                       "delivered_at = now() - interval '8 days'")
    service = AlarmsService()
    service._ctx = ServiceContext("alarms", load_settings(), pool, None, Outbox("alarms"))  # type: ignore[arg-type]
    assert await service.purge_webhooks() == (2, 2)
    assert await pool.fetchval("SELECT count(*) FROM alarms.webhook_notifications") == 0


async def test_the_dispatcher_fans_out_and_sends(pool: asyncpg.Pool) -> None:
    async with HttpReceiver() as receiver:
        sub, secret = await store.create_subscription(pool, receiver.url("/hook"), format="alertmanager")
        async with WebhookDispatcher(pool, FAST) as dispatcher:
            notes = lifecycle("200.004", "host=controller-0")
            await enqueue(pool, notes)
            await until(lambda: dispatcher.stats.delivered == 4, what="the lifecycle")
    assert dispatcher.stats.fanned_out == 4
    assert [r.headers["webhook-id"] for r in receiver.requests] == [n.id for n in notes]
    for r, n in zip(receiver.requests, notes, strict=True):
        verify(r.headers, r.body, secret)
        assert r.body == render(n, Format.ALERTMANAGER, receiver=sub.name)
    assert await store.queue_depth(pool) == {sub.id: 0}


async def test_a_small_window_keeps_the_order_per_alarm(pool: asyncpg.Pool) -> None:
    """The claim looks at the oldest ``window`` pending rows only: every alarm still goes in order."""
    async with HttpReceiver() as receiver:
        await store.create_subscription(pool, receiver.url("/hook"))
        notes = [n for i in range(4) for n in lifecycle("200.004", f"host=compute-{i}")]
        notes.sort(key=lambda n: (n.version, n.alarm.entity_instance_id))      # interleaved instances
        await enqueue(pool, notes)
        settings = DispatcherSettings(timeout=1.0, lease=1.5, per_subscription=2, window=3, poll_interval=0.2)
        async with WebhookDispatcher(pool, settings) as dispatcher:
            await until(lambda: dispatcher.stats.delivered == len(notes), what="everything")
    got: dict[str, list[int]] = {}
    for r in receiver.requests:
        body = json.loads(r.body)["data"]
        got.setdefault(body["alarm"]["entity_instance_id"], []).append(body["version"])
    assert got == {f"host=compute-{i}": [1, 2, 3, 4] for i in range(4)}


async def test_deliveries_fan_out_again_only_when_a_window_was_full(pool: asyncpg.Pool) -> None:
    """A delivery that ends makes room in its subscription's window: that calls for a fan-out only when the
    window was full with notifications behind the cursor (else each delivery cost a fan-out, one more check
    statement at least, for nothing); when it was, the deliveries alone (no poll) keep the rows coming."""
    slow = DispatcherSettings(timeout=1.0, lease=1.5, poll_interval=30.0)
    async with HttpReceiver() as receiver:
        await store.create_subscription(pool, receiver.url("/hook"))
        async with WebhookDispatcher(pool, slow) as dispatcher:
            await until(lambda: dispatcher.stats.fan_outs >= 1, what="the first fan-out")
            for i in range(8):                  # one at a time: the window (128) never fills
                await enqueue(pool, [notification(entity=f"host=one-{i}")])
                await until(lambda i=i: dispatcher.stats.delivered == i + 1, what="the delivery")
            assert dispatcher.stats.fan_outs <= 1 + 8 + 2, dispatcher.stats
        small = DispatcherSettings(timeout=1.0, lease=1.5, poll_interval=30.0, per_subscription=2, window=2, ahead=2)
        notes = [notification(entity=f"host=many-{i}") for i in range(12)]
        await enqueue(pool, notes)
        async with WebhookDispatcher(pool, small) as dispatcher:
            await until(lambda: dispatcher.stats.delivered == 12, timeout=10, what="all, two rows at a time")
    # Two in flight at a time, on different alarm instances: no order between them is promised, each once is.
    assert sorted(r.headers["webhook-id"] for r in receiver.requests[8:]) == sorted(n.id for n in notes)


def _scans(plan: dict[str, object]) -> list[dict[str, object]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan that reads webhook_deliveries."""
    found = [plan] if plan.get("Relation Name") == "webhook_deliveries" else []
    for child in plan.get("Plans", []):  # type: ignore[attr-defined]
        found += _scans(child)
    return found


async def test_the_queue_statements_read_pending_rows_only_whatever_the_statistics_say(pool: asyncpg.Pool) -> None:
    """Statistics taken while a backlog was queued (most rows pending) stay until the next ANALYZE (a TRUNCATE
    and an ANALYZE of the empty table keep them; autovacuum may be off): the claim's window, the fan-out's room
    and the delivered statement's look for more must still read the pending rows through their index, never
    walk the primary key or the table through the delivered rows kept for the retention."""
    sub, _ = await store.create_subscription(pool, "http://127.0.0.1:9/")
    await pool.execute(
        """INSERT INTO alarms.webhook_deliveries (subscription_id, webhook_id, ordering_key, event_type, body)
           SELECT $1, 'w' || g, 'k' || (g % 50), 'alarm.raised', '{}'::bytea FROM generate_series(1, 5000) g""",
        uuid.UUID(sub.id))
    await pool.execute("ANALYZE alarms.webhook_deliveries")          # 100 % pending, as the planner will believe
    await pool.execute(
        "UPDATE alarms.webhook_deliveries SET state = 'delivered', delivered_at = now() WHERE id <= 4990")
    settings = DispatcherSettings()
    ids = [int(r["id"]) for r in await pool.fetch("SELECT id FROM alarms.webhook_deliveries WHERE id > 4990")]
    statements = {
        "claim": (dispatcher_module._CLAIM, settings.per_subscription, settings.max_in_flight, uuid.uuid4(),
                  settings.window, settings.effective_lease),
        "fan-out": (store._FAN_OUT, 10_000, store.FANOUT_CHUNK, settings.ahead),
        "delivered": (dispatcher_module._DELIVERED_MANY, ids, [uuid.uuid4()] * len(ids), [200] * len(ids),
                      store.NOTIFY_CHANNEL, dispatcher_module.DELIVERED_PAYLOAD),
    }
    for name, (sql, *args) in statements.items():
        plan = json.loads(await pool.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args))[0]["Plan"]
        for node in _scans(plan):
            assert node["Node Type"] != "Seq Scan", f"{name}: a scan of the whole table"
            if node.get("Index Name") == "webhook_deliveries_pkey":
                assert "Index Cond" in node, f"{name}: the primary key walked from the oldest row"
