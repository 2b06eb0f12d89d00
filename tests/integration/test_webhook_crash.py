"""A dispatcher process SIGKILLed in the middle of a request: nothing is lost, the resend has the same id.

The dispatcher runs in a child Python process on the real PostgreSQL; the receiver (in this process)
holds the first request open, the child is killed with SIGKILL, and a dispatcher started afterwards
sends everything, in order, once its lease on the interrupted row has run out.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from services.alarms.webhooks import store
from services.alarms.webhooks.dispatcher import DispatcherSettings, WebhookDispatcher
from services.alarms.webhooks.signing import verify
from services.core.db.migrations import migrate
from tests.integration.test_webhook_delivery import MIGRATIONS, data, enqueue, lifecycle, until
from tests.support.http_receiver import HttpReceiver, Reply, Request, hang
from tests.support.postgres import fresh_database, pool_on

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import asyncio, sys
from services.alarms.webhooks import DispatcherSettings, WebhookDispatcher
from services.core.db.pool import create_pool

async def main() -> None:
    pool = await create_pool(sys.argv[1])
    dispatcher = WebhookDispatcher(pool, DispatcherSettings(timeout=1.0, lease=1.5, poll_interval=0.2))
    print("ready", flush=True)
    await dispatcher.run()

asyncio.run(main())
"""


@pytest.fixture
async def database() -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    async with fresh_database() as url, pool_on(url, migrate_core=False) as pool:
        await migrate(pool, "alarms", MIGRATIONS)
        yield url, pool


async def test_sigkill_mid_request(database: tuple[str, asyncpg.Pool]) -> None:
    url, pool = database

    async def first_request_hangs(request: Request) -> Reply:
        return await hang() if request is receiver.requests[0] else Reply()

    receiver = HttpReceiver(first_request_hangs)
    async with receiver:
        _, secret = await store.create_subscription(pool, receiver.url("/hook"))
        notes = lifecycle("400.005", "host=controller-0.network=mgmt")
        await enqueue(pool, notes)
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, url, cwd=ROOT,
                                                     stdout=asyncio.subprocess.PIPE)
        try:
            assert child.stdout is not None
            assert (await asyncio.wait_for(child.stdout.readline(), 30)).strip() == b"ready"
            await receiver.wait_for(lambda: len(receiver.requests) == 1, timeout=30)
        finally:
            child.send_signal(signal.SIGKILL)
            assert await child.wait() == -signal.SIGKILL
        assert len(receiver.requests) == 1
        claimed = await pool.fetchval("SELECT count(*) FROM alarms.webhook_deliveries WHERE claimed_until > now()")
        assert claimed == 1
        # the next dispatcher takes the row once the killed one's lease (1.5 s) has run out
        async with WebhookDispatcher(pool, DispatcherSettings(timeout=2.0, lease=3.0, poll_interval=0.2)) as dispatcher:
            await until(lambda: dispatcher.stats.delivered == 4, what="all four delivered")
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert ids == [notes[0].id] + [n.id for n in notes]
    assert [data(r)["version"] for r in receiver.requests] == [1, 1, 2, 3, 4]
    assert receiver.requests[0].body == receiver.requests[1].body
    for r in receiver.requests:
        verify(r.headers, r.body, secret)
    rows = await pool.fetch("SELECT state, attempts FROM alarms.webhook_deliveries ORDER BY id")
    assert [(r["state"], r["attempts"]) for r in rows] == [("delivered", 1)] * 4  # the killed attempt left no trace
