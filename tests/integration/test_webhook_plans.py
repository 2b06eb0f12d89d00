"""The dispatcher's statements read the queue through its indexes however the queue grew.

A prepared statement's generic plan is made once, for the table as it was: a dispatcher that starts on an
empty queue (a new installation) must not go on scanning the whole table at every claim once the delivered
rows pile up.  Table statistics are read after the dispatcher's sessions have ended (a backend reports them
when it exits).
"""

from __future__ import annotations

import dataclasses

import asyncpg
import pytest

from services.alarms.webhooks import store
from services.alarms.webhooks.dispatcher import WebhookDispatcher
from services.core.db.migrations import migrate
from tests.integration.test_webhook_delivery import FAST, MIGRATIONS, enqueue, notification
from tests.support.http_receiver import HttpReceiver
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until as until

pytestmark = pytest.mark.postgres

# The queue-depth gauge's statement has no parameters: PostgreSQL plans it once per session whatever the setting
# (every 15 s by default, replanned when autovacuum analyzes the table); kept out of the count here.
SETTINGS = dataclasses.replace(FAST, depth_interval=3600.0)

ROUNDS, PER_ROUND = 8, 5
HISTORY = 20_000         # delivered rows added once the dispatcher's statements are planned


async def _rows_scanned(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT coalesce(seq_tup_read, 0) FROM pg_stat_user_tables "
                                   "WHERE schemaname = 'alarms' AND relname = 'webhook_deliveries'"))


async def _sessions_ended(pool: asyncpg.Pool, application_name: str) -> None:
    async def gone() -> bool:
        return not await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                                       application_name)
    await until(gone, what="the dispatcher's sessions ended")
    await pool.execute("SELECT pg_stat_clear_snapshot()")


async def test_a_queue_that_grew_from_empty_is_not_scanned_at_each_claim() -> None:
    receiver = HttpReceiver()
    await receiver.start()
    async with fresh_database() as url, pool_on(url, migrate_core=False) as pool:
        await migrate(pool, "alarms", MIGRATIONS)
        sub, _ = await store.create_subscription(pool, receiver.url("/hook"), name="ops")
        # an empty queue that PostgreSQL has seen (vacuumed): as after a purge of the delivered rows on a quiet day
        await pool.execute("VACUUM ANALYZE alarms.webhook_deliveries")
        async with (pool_on(url, migrate_core=False, application_name="roost-dispatcher") as own,
                    WebhookDispatcher(own, SETTINGS) as dispatcher):
            # a few at a time, so that the claim runs more often than PostgreSQL's custom plans before it
            # may settle on a generic one (5), all on a queue of some dozens of rows
            for i in range(ROUNDS):
                await enqueue(pool, [notification(entity=f"host=compute-{i}-{k}") for k in range(PER_ROUND)])
                await until(lambda n=(i + 1) * PER_ROUND: dispatcher.stats.delivered == n, what=f"round {i + 1}")
            await pool.execute(
                """INSERT INTO alarms.webhook_deliveries (subscription_id, webhook_id, ordering_key, event_type,
                                                          body, state, delivered_at)
                   SELECT $1::uuid, 'history-' || g, 'history', 'alarm.raised', '{}'::bytea, 'delivered', now()
                   FROM generate_series(1, $2) AS g""", sub.id, HISTORY)
            for i in range(3):
                await enqueue(pool, [notification(entity=f"host=storage-{i}")])
                await until(lambda n=ROUNDS * PER_ROUND + i + 1: dispatcher.stats.delivered == n,
                            what=f"delivery {i + 1} after the history")
        await _sessions_ended(pool, "roost-dispatcher")
        scanned = await _rows_scanned(pool)
    await receiver.stop()
    assert len(receiver.requests) == ROUNDS * PER_ROUND + 3
    # the claims, outcomes and fan-outs after the history was added read pending rows by index: a single
    # statement scanning the table would have read all of the history (with generic plans: 600,000 rows)
    assert scanned < HISTORY, f"{scanned} rows of webhook_deliveries read by sequential scans"
