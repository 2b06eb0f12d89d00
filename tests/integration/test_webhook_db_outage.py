"""The database goes away while a request is in flight: the outcome cannot be written, nothing is lost.

The dispatcher reaches PostgreSQL through a TCP proxy that the receiver cuts when it gets the first
request.  The dispatcher survives the outage (claims and records fail, it backs off), keeps the 2xx it
could not write, and writes it once the database is back (its claim still holds: nobody took the row
again), before the later notifications of that alarm go.  Had the lease run out and another dispatcher
taken the row, the request would have been sent again with the same webhook-id (test_webhook_crash).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from services.alarms.webhooks import store
from services.alarms.webhooks.dispatcher import DispatcherSettings, WebhookDispatcher
from services.core.db.migrations import migrate
from tests.integration.test_webhook_delivery import MIGRATIONS, data, enqueue, lifecycle, until
from tests.support.http_receiver import HttpReceiver, Reply, Request
from tests.support.postgres import fresh_database, pool_on
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.postgres


@pytest.fixture
async def database() -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    async with fresh_database() as url, pool_on(url, migrate_core=False) as pool:
        await migrate(pool, "alarms", MIGRATIONS)
        yield url, pool


def through(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
    return urlunsplit((parts.scheme, f"{netloc}:{port}", parts.path, parts.query, parts.fragment))


async def test_database_outage_mid_request(database: tuple[str, asyncpg.Pool]) -> None:
    url, pool = database
    proxy = TcpProxy(target_port=urlsplit(url).port or 5432)
    await proxy.start()
    outage_over = asyncio.Event()

    async def cut_the_database_on_first(request: Request) -> Reply:
        if request is receiver.requests[0]:
            await proxy.disconnect()
        return Reply()

    receiver = HttpReceiver(cut_the_database_on_first)
    try:
        async with receiver, pool_on(through(url, proxy.port), migrate_core=False) as proxied:
            await store.create_subscription(pool, receiver.url("/hook"))
            notes = lifecycle("200.009", "host=controller-1")[:3]
            await enqueue(pool, notes)
            settings = DispatcherSettings(timeout=1.0, lease=1.5, min_backoff=0.05, max_backoff=0.2, poll_interval=0.2,
                                          db_backoff=0.1)
            async with WebhookDispatcher(proxied, settings) as dispatcher:
                await receiver.wait_for(lambda: len(receiver.requests) == 1)
                await until(lambda: not proxy.is_up, what="database cut")
                first = await pool.fetchval("SELECT state FROM alarms.webhook_deliveries ORDER BY id LIMIT 1")
                assert first == "pending"
                await proxy.restore()
                outage_over.set()
                await until(lambda: dispatcher.stats.delivered == 3, timeout=20, what="all three delivered")
    finally:
        await proxy.stop()
    assert outage_over.is_set()
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert ids == [n.id for n in notes]
    assert [data(r)["version"] for r in receiver.requests] == [1, 2, 3]
    rows = await pool.fetch("SELECT state, attempts FROM alarms.webhook_deliveries ORDER BY id")
    assert [(r["state"], r["attempts"]) for r in rows] == [("delivered", 1)] * 3
