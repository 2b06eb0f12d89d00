"""Outbox and relay on the real PostgreSQL, publishing to a recording transport.

Covers: rows written in the caller's transaction (rollback = nothing published); NOTIFY wakes the relay
and polling covers a missed notification; rows whose ids commit out of order are not skipped; a broker
that is down or does not confirm loses nothing; a poison row delays only its own key; two relays side
by side (SKIP LOCKED) publish each row once and keep a key's order; stop() flushes within its deadline;
lag numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import asyncpg
import pytest
from pydantic import BaseModel, ConfigDict

from schemas.envelope import Envelope
from schemas.registry import InvalidMessage, Registry
from services.core.bus.abc import H_MESSAGE_ID, H_TYPE
from services.core.bus.codec import decode, encode
from services.core.db.migrations import migrate
from services.core.db.outbox import Outbox, OutboxError, notify_channel
from services.core.db.relay import OutboxRelay
from tests.support.postgres import fresh_database, pool_on
from tests.support.recording_transport import RecordingTransport

pytestmark = pytest.mark.postgres

TYPE = "roost.test.thing_changed"


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


@pytest.fixture
async def pool(url: str) -> AsyncIterator[asyncpg.Pool]:
    async with pool_on(url) as pool:
        yield pool


@pytest.fixture
def transport() -> RecordingTransport:
    return RecordingTransport()


def event(n: int, entity: str | None = None) -> Envelope:
    return Envelope(type=TYPE, source="roost/test", subject=entity, data={"n": n})


async def write(pool: asyncpg.Pool, envelopes: Sequence[Envelope], outbox: Outbox | None = None) -> None:
    outbox = outbox or Outbox()
    async with pool.acquire() as conn, conn.transaction():
        for env in envelopes:
            await outbox.add(conn, env)


async def until(condition: Callable[[], Awaitable[object]] | Callable[[], object], timeout: float = 10.0,
                what: str = "condition") -> None:
    """Poll ``condition`` until true (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(relay: OutboxRelay) -> AsyncIterator[OutboxRelay]:
    task = asyncio.create_task(relay.run())
    try:
        yield relay
    finally:
        await relay.stop(flush=False, timeout=5)
        await asyncio.wait_for(task, 10)


async def pending(pool: asyncpg.Pool, schema: str = "core") -> int:
    return int(await pool.fetchval(f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NULL"))


async def _zero_pending(pool: asyncpg.Pool) -> bool:
    return await pending(pool) == 0


# -- the writer ------------------------------------------------------------------------------------


async def test_add_needs_the_callers_transaction(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(OutboxError, match="transaction"):
            await Outbox().add(conn, event(1))


async def test_a_rolled_back_transaction_publishes_nothing(pool: asyncpg.Pool, transport: RecordingTransport) -> None:
    async with pool.acquire() as conn:
        with contextlib.suppress(RuntimeError):
            async with conn.transaction():
                await Outbox().add(conn, event(1))
                raise RuntimeError("the business change failed")
    relay = OutboxRelay(pool, transport)
    assert await relay.relay_once() == 0
    assert transport.published == []


async def test_the_published_message_is_exactly_what_was_written(pool: asyncpg.Pool,
                                                                   transport: RecordingTransport) -> None:
    env = Envelope(type=TYPE, source="roost/test", subject="thing/ü", data={"n": 1, "text": "∑ \x00 \"q\""})
    async with pool.acquire() as conn, conn.transaction():
        assert await Outbox().add(conn, env, subject="roost.test.custom", headers={"x-trace": "t1"})
        assert not await Outbox().add(conn, env, subject="roost.test.custom")     # same id: kept once
    assert await OutboxRelay(pool, transport).relay_once() == 1
    [message] = transport.published
    assert message == encode(env, subject="roost.test.custom", headers={"x-trace": "t1"})
    assert message.headers[H_MESSAGE_ID] == env.id and message.headers[H_TYPE] == TYPE
    assert decode(message.body) == env
    assert await pending(pool) == 0


async def test_add_many_keeps_order_and_drops_known_ids(pool: asyncpg.Pool, transport: RecordingTransport) -> None:
    envs = [event(i, "thing/1") for i in range(5)]
    async with pool.acquire() as conn, conn.transaction():
        assert await Outbox().add_many(conn, envs[:3]) == 3
        assert await Outbox().add_many(conn, envs) == 2
        assert await Outbox().add_many(conn, []) == 0
    await OutboxRelay(pool, transport).relay_once()
    assert transport.ids() == [e.id for e in envs]


async def test_with_a_registry_invalid_data_is_refused_at_write_time(pool: asyncpg.Pool) -> None:
    class Thing(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n: int

    registry = Registry()
    registry.event(TYPE, "core", Thing, "a test event")
    outbox = Outbox(registry=registry)
    async with pool.acquire() as conn, conn.transaction():
        assert await outbox.add(conn, event(1))
        with pytest.raises(InvalidMessage):
            await outbox.add(conn, Envelope(type=TYPE, source="roost/test", data={"n": "x"}))


# -- waking ----------------------------------------------------------------------------------------


async def test_notify_wakes_the_relay_at_commit(pool: asyncpg.Pool, transport: RecordingTransport) -> None:
    relay = OutboxRelay(pool, transport, poll_interval=60.0)     # polling would be far too slow
    async with running(relay):
        await until(lambda: relay.listening, what="listener")
        await write(pool, [event(1)])
        await transport.wait_until(lambda t: len(t.published) == 1, timeout=5)


async def test_polling_finds_rows_written_without_a_notification(pool: asyncpg.Pool,
                                                                   transport: RecordingTransport) -> None:
    relay = OutboxRelay(pool, transport, poll_interval=0.3)
    async with running(relay):
        await until(lambda: relay.listening, what="listener")
        msg = encode(event(1))
        await pool.execute(  # as a writer that bypasses Outbox.add would: no NOTIFY
            "INSERT INTO core.outbox (message_id, subject, ordering_key, headers, body) VALUES ($1, $2, 'k', '{}', $3)",
            msg.message_id, msg.subject, msg.body)
        await transport.wait_until(lambda t: len(t.published) == 1, timeout=5)


async def test_out_of_order_commits_are_not_skipped(pool: asyncpg.Pool, transport: RecordingTransport) -> None:
    """The earlier id commits last: a watermark relay would skip it forever."""
    relay = OutboxRelay(pool, transport, poll_interval=0.2)
    first, second = event(1, "thing/a"), event(2, "thing/b")
    async with running(relay), pool.acquire() as slow, pool.acquire() as fast:
        slow_tx = slow.transaction()
        await slow_tx.start()
        await Outbox().add(slow, first)                          # gets the lower id, stays uncommitted
        async with fast.transaction():
            await Outbox().add(fast, second)                     # higher id, commits first
        ids = await pool.fetch("SELECT id, message_id FROM core.outbox ORDER BY id")
        assert [r["message_id"] for r in ids] == [second.id]     # the slow row is not visible yet
        await transport.wait_until(lambda t: t.ids() == [second.id])
        await slow_tx.commit()
        await transport.wait_until(lambda t: t.ids() == [second.id, first.id])
    rows = await pool.fetch("SELECT id, message_id FROM core.outbox ORDER BY id")
    assert [r["message_id"] for r in rows] == [first.id, second.id]          # ids were in the other order
    assert await pending(pool) == 0


# -- broker trouble --------------------------------------------------------------------------------


@pytest.mark.parametrize("trouble", ["disconnected", "nacking"])
async def test_broker_down_backs_off_and_loses_nothing(pool: asyncpg.Pool, transport: RecordingTransport,
                                                       trouble: str) -> None:
    setattr(transport, trouble, True)
    envs = [event(i, f"thing/{i % 3}") for i in range(30)]
    relay = OutboxRelay(pool, transport, poll_interval=0.1, min_backoff=0.05, max_backoff=0.2)
    async with running(relay):
        await write(pool, envs)
        await until(lambda: relay.stats.consecutive_failures >= 4, what="failures")
        assert transport.published == []
        assert await pending(pool) == 30
        lag = await relay.lag()
        assert lag.pending == 30 and lag.oldest_pending_age() >= 0
        # rows are untouched while the whole broker is in trouble (no attempts burnt)
        assert await pool.fetchval("SELECT max(attempts) FROM core.outbox") == 0
        setattr(transport, trouble, False)
        await transport.wait_until(lambda t: len(t.published) == 30)
    assert sorted(transport.ids()) == sorted(e.id for e in envs) and len(set(transport.ids())) == 30
    assert await pending(pool) == 0
    assert relay.stats.consecutive_failures == 0 and relay.stats.published == 30


async def test_backoff_is_not_cut_short_by_notifications(pool: asyncpg.Pool, transport: RecordingTransport) -> None:
    transport.disconnected = True
    relay = OutboxRelay(pool, transport, poll_interval=0.05, min_backoff=1.0, max_backoff=1.0)
    async with running(relay):
        await until(lambda: relay.stats.consecutive_failures >= 1, what="first failure")
        failures = relay.stats.consecutive_failures
        for i in range(20):
            await write(pool, [event(i)])          # each commit notifies
        assert relay.stats.consecutive_failures <= failures + 1


async def test_a_poison_row_delays_only_its_own_key(pool: asyncpg.Pool, transport: RecordingTransport) -> None:
    a = [event(i, "thing/a") for i in range(3)]
    b = [event(10 + i, "thing/b") for i in range(3)]
    await write(pool, [a[0], b[0], a[1], b[1], a[2], b[2]])
    transport.fail_ids = {a[1].id}
    relay = OutboxRelay(pool, transport, min_row_delay=0.01, max_row_delay=0.05)
    assert await relay.relay_once() == 4                  # a0, b0, b1, b2; a2 confirmed but held back
    row = await pool.fetchrow("SELECT attempts, last_error FROM core.outbox WHERE message_id = $1", a[1].id)
    assert row is not None and row["attempts"] == 1 and "PublishFailed" in row["last_error"]
    assert await pending(pool) == 2
    transport.fail_ids.clear()
    await until(relay.relay_once, what="retry of the poison row")   # due after its short delay
    assert await pending(pool) == 0
    ids = transport.ids()
    # the broker got a's rows in order: a0, (a2 held back), then a1, a2 again
    last_a = sorted(range(3), key=lambda i: max(j for j, x in enumerate(ids) if x == a[i].id))
    assert last_a == [0, 1, 2]
    assert [x for x in ids if x in {e.id for e in b}] == [e.id for e in b]


async def test_the_relay_survives_losing_its_database_sessions(url: str, pool: asyncpg.Pool,
                                                               transport: RecordingTransport) -> None:
    async with pool_on(url, migrate_core=False, application_name="relay-under-test") as relay_pool:
        relay = OutboxRelay(relay_pool, transport, poll_interval=60, min_backoff=0.05, max_backoff=0.2)
        async with running(relay):
            await until(lambda: relay.listening, what="listener")
            first = event(1)
            await write(pool, [first])
            await transport.wait_until(lambda t: len(t.published) == 1)
            listener = relay._listener
            # the database drops every session of the relay (a restart, a failover, an operator)
            killed = await pool.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'relay-under-test'")
            assert killed >= 1
            await until(lambda: relay.listening and relay._listener is not listener, what="listening again")
            second = event(2)
            await write(pool, [second])                      # woken by NOTIFY on the new listener
            await transport.wait_until(lambda t: second.id in t.ids(), timeout=10)
        await until(lambda: _zero_pending(pool), what="all sent")
        # At least once: a cycle whose session died between publish and commit publishes again.
        assert set(transport.ids()) == {first.id, second.id}


# -- replicas --------------------------------------------------------------------------------------


async def test_a_second_relay_skips_rows_the_first_holds_and_keeps_key_order(url: str) -> None:
    async with pool_on(url) as pool1, pool_on(url, migrate_core=False) as pool2:
        t1, t2 = RecordingTransport(), RecordingTransport()
        r1, r2 = OutboxRelay(pool1, t1, batch_size=2), OutboxRelay(pool2, t2, batch_size=100)
        k = [event(i, "thing/k") for i in range(3)]
        other = event(99, "thing/other")
        await write(pool1, [k[0], k[1]])
        t1.hold()
        first = asyncio.create_task(r1.relay_once())        # holds k0, k1 mid-publish
        await asyncio.wait_for(t1.holding.wait(), 5)
        await write(pool1, [k[2], other])
        assert await r2.relay_once() == 1                    # only `other`: k2 must not overtake k0, k1
        assert t2.ids() == [other.id]
        t1.release()
        assert await first == 2
        assert await r2.relay_once() == 1
        assert t1.ids() + t2.ids() == [k[0].id, k[1].id, other.id, k[2].id]


async def test_two_relays_running_publish_every_row_once(url: str) -> None:
    async with pool_on(url) as pool1, pool_on(url, migrate_core=False) as pool2:
        t1, t2 = RecordingTransport(), RecordingTransport()
        r1 = OutboxRelay(pool1, t1, batch_size=7, poll_interval=0.1)
        r2 = OutboxRelay(pool2, t2, batch_size=7, poll_interval=0.1)
        envs = [event(i, f"thing/{i % 10}") for i in range(400)]
        async with running(r1), running(r2):
            for chunk in range(0, 400, 20):
                await write(pool1, envs[chunk:chunk + 20])
            await until(lambda: len(t1.published) + len(t2.published) >= 400, what="all published")
        ids = t1.ids() + t2.ids()
        assert len(ids) == 400 and set(ids) == {e.id for e in envs}
        assert t1.published and t2.published, "both relays should have taken a share"
        assert await pending(pool1) == 0


# -- stopping, lag, schemas ------------------------------------------------------------------------


async def test_stop_flushes_what_is_pending(pool: asyncpg.Pool, transport: RecordingTransport) -> None:
    relay = OutboxRelay(pool, transport, batch_size=10)
    await write(pool, [event(i) for i in range(25)])
    await relay.stop(flush=True, timeout=5)               # never ran: stop() flushes by itself
    assert len(transport.published) == 25 and await pending(pool) == 0


async def test_stop_gives_up_at_its_deadline_and_leaves_rows_pending(pool: asyncpg.Pool,
                                                                       transport: RecordingTransport) -> None:
    transport.disconnected = True
    relay = OutboxRelay(pool, transport, min_backoff=0.05, max_backoff=0.1)
    task = asyncio.create_task(relay.run())
    await write(pool, [event(i) for i in range(3)])
    await until(lambda: relay.stats.consecutive_failures >= 1, what="a failure")
    started = time.monotonic()
    await relay.stop(flush=True, timeout=0.5)
    assert time.monotonic() - started < 3
    await asyncio.wait_for(task, 5)
    assert await pending(pool) == 3
    transport.disconnected = False
    assert await OutboxRelay(pool, transport).flush(timeout=5) == 3


async def test_lag_counts_pending_rows_and_the_oldest_age(pool: asyncpg.Pool, transport: RecordingTransport) -> None:
    relay = OutboxRelay(pool, transport)
    empty = await relay.lag()
    assert empty.pending == 0 and empty.oldest_created_at is None and empty.oldest_pending_age() == 0
    await write(pool, [event(1)])
    await pool.execute("UPDATE core.outbox SET created_at = now() - interval '90 seconds'")
    await write(pool, [event(2)])
    lag = await relay.lag()
    assert lag.pending == 2 and 89 < lag.oldest_pending_age() < 150
    assert relay.last_lag == lag
    await relay.relay_once()
    assert (await relay.lag()).pending == 0


async def test_a_service_schema_has_its_own_outbox_and_channel(pool: asyncpg.Pool, transport: RecordingTransport,
                                                                tmp_path: Path) -> None:
    (tmp_path / "0001_messaging.sql").write_text("SELECT core.ensure_outbox_inbox('inventory');")
    await migrate(pool, "inventory", tmp_path)
    assert notify_channel("inventory") == "roost_outbox_inventory"
    await write(pool, [event(1)], Outbox("inventory"))
    assert await OutboxRelay(pool, transport, "core").relay_once() == 0
    relay = OutboxRelay(pool, transport, "inventory", poll_interval=60)
    async with running(relay):
        await until(lambda: relay.listening, what="listener")
        await write(pool, [event(2)], Outbox("inventory"))
        await transport.wait_until(lambda t: len(t.published) == 2, timeout=5)
