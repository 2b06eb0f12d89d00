"""Webhook secrets (and credentials in a subscriber's URL) never reach the logs, at DEBUG, across
retries, a dead letter, a rotation and a replay; the list API never returns a secret."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from services.alarms.webhooks import store
from services.alarms.webhooks.dispatcher import DispatcherSettings, WebhookDispatcher
from services.core.db.migrations import migrate
from services.core.logging import configure_logging, reset_logging
from tests.integration.test_webhook_delivery import MIGRATIONS, enqueue, lifecycle, until
from tests.support.http_receiver import HttpReceiver, Reply, Request
from tests.support.postgres import fresh_database, pool_on

pytestmark = pytest.mark.postgres

URL_PASSWORD = "Pl4nted-Url-Passw0rd"


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with fresh_database() as url, pool_on(url, migrate_core=False) as pool:
        await migrate(pool, "alarms", MIGRATIONS)
        yield pool


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    configure_logging("json", "DEBUG", stream=buf)
    try:
        yield buf
    finally:
        reset_logging()


async def test_no_secret_in_logs(pool: asyncpg.Pool, logs: io.StringIO) -> None:
    answers = [Reply(500), Reply(401)]

    async def answer(_: Request) -> Reply:
        return answers.pop(0) if answers else Reply()

    async with HttpReceiver(answer) as receiver:
        url = receiver.url("/hook").replace("http://", f"http://alarms:{URL_PASSWORD}@")
        sub, first = await store.create_subscription(pool, url)
        second = await store.add_secret(pool, sub.id)
        await enqueue(pool, lifecycle("200.004", "host=controller-0")[:2])
        async with WebhookDispatcher(pool, DispatcherSettings(timeout=1.0, lease=1.5, min_backoff=0.05,
                                                              max_backoff=0.1, poll_interval=0.2)) as dispatcher:
            await until(lambda: dispatcher.stats.dead_lettered == 1 and dispatcher.stats.delivered == 1)
            await store.retire_secret(pool, sub.id, first)
            assert await store.replay(pool, sub.id) == 1
            await until(lambda: dispatcher.stats.delivered == 2)
    assert receiver.requests[0].headers["authorization"].startswith("Basic ")  # the URL's credentials were used
    output = logs.getvalue()
    assert "dead-lettered" in output and "will be retried" in output  # the logs were captured
    for secret in (first, second, first.removeprefix("whsec_"), second.removeprefix("whsec_"), URL_PASSWORD):
        assert secret not in output
    listed = repr(await store.list_subscriptions(pool)) + repr(await store.get_subscription(pool, sub.id))
    assert first not in listed and second not in listed and "whsec_" not in listed
    assert URL_PASSWORD not in listed and "alarms:***@" in listed
