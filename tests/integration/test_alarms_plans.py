"""The alarms service's batches read active_alarms through its indexes however the table grew.

A prepared statement's generic plan is made once, for the table as PostgreSQL knew it: a service that starts
on an empty table (a new installation, or a quiet day after a purge) must not go on scanning every active alarm
for each key it locks once an alarm storm has filled it (the alarms bench: 151,000 key comparisons and 49 ms in
one batch's lock, half of PostgreSQL's time per op).  Table statistics are read after the service's sessions
have ended (a backend reports them when it exits).
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from services.alarms.service import MIGRATIONS
from services.core.db.migrations import migrate
from tests.integration.test_alarms_batching import Site, envelope, message
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres

APPLICATION = "roost-alarms-plans"
ROUNDS, PER_ROUND = 8, 6     # batches while the table is small: more than PostgreSQL's custom plans (5)
STORM = 20_000               # active alarms added once the batches' statements are planned


async def _rows_scanned(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT coalesce(seq_tup_read, 0) FROM pg_stat_user_tables "
                                   "WHERE schemaname = 'alarms' AND relname = 'active_alarms'"))


async def _round(site: Site, entities: list[str], kind: str) -> None:
    """The faults of one round handled together: one batch (the committer takes what is queued)."""
    data = [{"alarm_id": "950.003", "entity_instance_id": e, "severity": "major"} if kind == "set"
            else {"alarm_id": "950.003", "entity_instance_id": e} for e in entities]
    await asyncio.gather(*(site.service.handle(message(envelope(f"roost.fault.{kind}", d))) for d in data))


@pytest.mark.parametrize("batch_size", [64, 1], ids=["batches", "one-by-one"])
async def test_a_table_that_grew_from_empty_is_not_scanned_for_each_batch(batch_size: int) -> None:
    """Batches (group commit), and messages applied one by one (``batch_size`` 1, and a batch's fallback)."""
    async with fresh_database() as url, pool_on(url) as admin:
        await migrate(admin, "alarms", MIGRATIONS)
        await admin.execute("SELECT core.ensure_outbox_inbox('alarms')")
        await admin.execute("VACUUM ANALYZE alarms.active_alarms")       # PostgreSQL has seen it empty
        async with pool_on(url, migrate_core=False, application_name=APPLICATION) as own:
            site = Site(own, batch_size=batch_size)
            await site.start()
            try:
                for i in range(ROUNDS):
                    hosts = [f"host=compute-{i}-{k}.network=mgmt" for k in range(PER_ROUND)]
                    await _round(site, hosts, "set")
                    await _round(site, hosts[:PER_ROUND // 2], "clear")
                await admin.execute(
                    """INSERT INTO alarms.active_alarms (uuid, alarm_id, entity_instance_id, entity_type_id,
                                                         timestamp, severity, alarm_type, probable_cause,
                                                         created_at, updated_at, owner, version)
                       SELECT gen_random_uuid(), '950.003', 'host=storm-' || g || '.network=mgmt', 'host.network',
                              now(), 'major', 'communication', 'loss-of-signal', now(), now(), 'roost/heartbeat', 1
                       FROM generate_series(1, $1) AS g""", STORM)
                for i in range(3):
                    storm = [f"host=storm-{i * PER_ROUND + k + 1}.network=mgmt" for k in range(PER_ROUND)]
                    await _round(site, storm, "clear")
                    await _round(site, [*storm[:2], f"host=compute-{i}-0.network=mgmt"], "set")
            finally:
                await site.close()

        async def ended() -> bool:
            return not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                                            APPLICATION)
        await wait_until(ended, what="the service's sessions ended")
        await admin.execute("SELECT pg_stat_clear_snapshot()")
        scanned = await _rows_scanned(admin)
        # each storm round: PER_ROUND cleared, two of them raised again and a cleared compute alarm too
        assert await admin.fetchval("SELECT count(*) FROM alarms.active_alarms") == \
            ROUNDS * (PER_ROUND - PER_ROUND // 2) + STORM - 3 * (PER_ROUND - 3)
    # the locks, updates and deletes after the storm read their rows by index: one statement scanning the
    # table would have read all of it (with generic plans: every batch, 120,000 rows)
    assert scanned < STORM, f"{scanned} rows of active_alarms read by sequential scans"
