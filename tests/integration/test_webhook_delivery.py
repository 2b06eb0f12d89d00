"""Webhook delivery on the real PostgreSQL to a real HTTP receiver on loopback.

Covers: a receiver down then up (everything delivered, in order per alarm, signatures verify); a
dispatcher killed mid-request (nothing lost, the duplicate has the same webhook-id); a hanging receiver
times out and is retried while another subscriber keeps receiving, with bounded concurrency; 429 with
Retry-After; 4xx dead-letters, the failing hook, replay with the same id, recovery; max age; secret
rotation; Alertmanager format on the wire; filters; two dispatcher replicas; enqueue in the caller's
transaction; metrics.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from services.alarms.webhooks import store
from services.alarms.webhooks.dispatcher import DispatcherSettings, WebhookDispatcher
from services.alarms.webhooks.formats import AlarmFields, EventKind, Notification
from services.alarms.webhooks.signing import WebhookVerificationError, generate_secret, verify
from services.core.db.migrations import migrate
from services.core.logging import redact_text
from tests.support.http_receiver import HttpReceiver, Reply, Request, hang
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until as until
from tests.unit.test_webhook_formats import validate_alertmanager_v4

pytestmark = pytest.mark.postgres

MIGRATIONS = Path(store.__file__).resolve().parent.parent / "migrations"
FAST = DispatcherSettings(timeout=1.0, lease=1.5, min_backoff=0.05, max_backoff=0.2, poll_interval=0.2,
                          depth_interval=0.05, grace=1.0)


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with fresh_database() as url, pool_on(url, migrate_core=False) as pool:
        await migrate(pool, "alarms", MIGRATIONS)
        yield pool


def notification(alarm_id: str = "200.004", entity: str = "host=controller-1", version: int = 1,
                 event: EventKind = EventKind.RAISED, severity: str = "critical") -> Notification:
    alarm = AlarmFields(uuid=f"00000000-0000-4000-8000-{abs(hash((alarm_id, entity))) % 10**12:012d}",
                        alarm_id=alarm_id, entity_type_id="host", entity_instance_id=entity,
                        timestamp=datetime.now(UTC), severity=severity,
                        reason_text=f"{alarm_id} on {entity} v{version}",
                        alarm_state="clear" if event is EventKind.CLEARED else "set")
    return Notification(event=event, version=version, alarm=alarm)


async def enqueue(pool: asyncpg.Pool, notes: Sequence[Notification]) -> int:
    total = 0
    for n in notes:
        async with pool.acquire() as conn, conn.transaction():
            total += await store.enqueue(conn, n)
    return total


def lifecycle(alarm_id: str, entity: str) -> list[Notification]:
    return [notification(alarm_id, entity, 1, EventKind.RAISED, "minor"),
            notification(alarm_id, entity, 2, EventKind.CHANGED, "major"),
            notification(alarm_id, entity, 3, EventKind.CHANGED, "critical"),
            notification(alarm_id, entity, 4, EventKind.CLEARED, "critical")]


def data(request: Request) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(request.body)["data"]
    return body


def versions_by_instance(requests: Sequence[Request]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in requests:
        d = data(r)
        out.setdefault(f'{d["alarm"]["alarm_id"]}|{d["alarm"]["entity_instance_id"]}', []).append(d["version"])
    return out


async def states(pool: asyncpg.Pool, subscription_id: str | None = None) -> dict[str, int]:
    rows = await pool.fetch("SELECT state, count(*) AS n FROM alarms.webhook_deliveries "
                            "WHERE $1::uuid IS NULL OR subscription_id = $1::uuid GROUP BY state", subscription_id)
    return {r["state"]: r["n"] for r in rows}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_receiver_down_then_up_everything_in_order_and_signed(pool: asyncpg.Pool) -> None:
    receiver = HttpReceiver()
    await receiver.start()
    await receiver.stop()  # its port is now known and nothing listens on it
    sub, secret = await store.create_subscription(pool, receiver.url("/hook"), name="ops")
    notes = [n for parts in zip(*(lifecycle("200.004", f"host=controller-{i}") for i in range(3)), strict=True)
             for n in parts]
    assert await enqueue(pool, notes) == 12
    delivered_before = sample("roost_webhook_deliveries_total", outcome="delivered")
    retried_before = sample("roost_webhook_deliveries_total", outcome="retry")
    async with WebhookDispatcher(pool, FAST) as dispatcher:
        await until(lambda: dispatcher.stats.retried >= 6, what="attempts failing while the receiver is down")
        await until(lambda: sample("roost_webhook_queue_depth_messages", subscription=sub.id) == 12,
                    what="queue depth gauge")
        assert await states(pool) == {"pending": 12}
        await receiver.start()
        await receiver.wait_for(lambda: len({r.headers["webhook-id"] for r in receiver.requests}) == 12)
        await until(lambda: dispatcher.stats.delivered == 12, what="12 delivered")
        await receiver.stop()
    assert await states(pool) == {"delivered": 12}
    assert len(receiver.requests) == 12  # no duplicate without a crash
    assert versions_by_instance(receiver.requests) == {f"200.004|host=controller-{i}": [1, 2, 3, 4] for i in range(3)}
    ids = {n.id for n in notes}
    for r in receiver.requests:
        assert r.method == "POST" and r.headers["content-type"] == "application/json"
        assert verify(r.headers, r.body, secret) == r.headers["webhook-id"] == data(r)["id"]
        assert r.headers["webhook-id"] in ids
        with pytest.raises(WebhookVerificationError):
            verify(r.headers, r.body, generate_secret())
    assert sample("roost_webhook_deliveries_total", outcome="delivered") - delivered_before == 12
    assert sample("roost_webhook_deliveries_total", outcome="retry") - retried_before >= 6
    assert sample("roost_webhook_delivery_latency_seconds_count") >= 12
    assert sample("roost_webhook_delivery_duration_seconds_count") >= 18


async def test_dispatcher_killed_mid_delivery_loses_nothing_duplicate_has_same_id(pool: asyncpg.Pool) -> None:
    async def first_request_hangs(request: Request) -> Reply:
        if request is receiver.requests[0]:
            return await hang()
        return Reply()

    settings = FAST
    receiver = HttpReceiver(first_request_hangs)
    async with receiver:
        sub, secret = await store.create_subscription(pool, receiver.url("/hook"))
        notes = lifecycle("100.101", "host=compute-0")[:3]
        await enqueue(pool, notes)
        first = WebhookDispatcher(pool, settings)
        task = first.start()
        await receiver.wait_for(lambda: len(receiver.requests) == 1)
        task.cancel()  # killed mid-request: nothing is recorded, the claim is left to expire
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await states(pool) == {"pending": 3}
        assert await pool.fetchval("SELECT count(*) FROM alarms.webhook_deliveries "
                                   "WHERE claimed_until > now()") == 1
        # the restarted dispatcher sends it again once the dead one's lease (1.5 s here) runs out
        async with WebhookDispatcher(pool, settings) as second:
            await receiver.wait_for(lambda: len(receiver.requests) == 4, what="the cut one again, then the rest")
            await until(lambda: second.stats.delivered == 3, what="all delivered")
    assert await states(pool) == {"delivered": 3}
    received = [r.headers["webhook-id"] for r in receiver.requests]
    # the request cut by the kill comes again with the same webhook-id, and before the later versions
    assert received == [notes[0].id, notes[0].id, notes[1].id, notes[2].id]
    for r in receiver.requests:
        verify(r.headers, r.body, secret)
    assert sub.id


async def test_hanging_receiver_times_out_and_retries_while_another_keeps_receiving(pool: asyncpg.Pool) -> None:
    async def route(request: Request) -> Reply:
        return await hang() if request.path == "/hang" else Reply()

    settings = DispatcherSettings(timeout=0.5, lease=1.0, per_subscription=2, min_backoff=0.05, max_backoff=0.1,
                                  poll_interval=0.2)
    async with HttpReceiver(route) as receiver:
        slow, _ = await store.create_subscription(pool, receiver.url("/hang"))
        fast, _ = await store.create_subscription(pool, receiver.url("/ok"))
        async with WebhookDispatcher(pool, settings):
            await enqueue(pool, [notification("200.004", f"host=compute-{i}") for i in range(5)])
            await receiver.wait_for(lambda: len(receiver.on("/ok")) == 5, what="fast subscriber got all 5")
            await enqueue(pool, [notification("200.004", f"host=compute-{i}", 2, EventKind.CLEARED) for i in range(5)])
            await receiver.wait_for(lambda: len(receiver.on("/ok")) == 10, what="and the next 5")
            await receiver.wait_for(lambda: len({r.headers["webhook-id"] for r in receiver.on("/hang")})
                                    < len(receiver.on("/hang")), what="a hung request retried")
            attempts = await pool.fetchval("SELECT max(attempts) FROM alarms.webhook_deliveries "
                                           "WHERE subscription_id = $1", slow.id)
            assert attempts >= 1
            last_error = await pool.fetchval("SELECT last_error FROM alarms.webhook_deliveries "
                                             "WHERE subscription_id = $1 AND attempts > 0 LIMIT 1", slow.id)
            assert last_error == "timed out"
    assert receiver.max_open["/hang"] <= 2  # per-subscription concurrency bound
    assert await states(pool, fast.id) == {"delivered": 10}
    assert (await states(pool, slow.id)).get("delivered", 0) == 0
    assert versions_by_instance(receiver.on("/ok")) == {f"200.004|host=compute-{i}": [1, 2] for i in range(5)}


async def test_429_retry_after_is_honoured(pool: asyncpg.Pool) -> None:
    answers = [Reply(429, {"Retry-After": "1"}), Reply()]

    async def limited(_: Request) -> Reply:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    async with HttpReceiver(limited) as receiver:
        await store.create_subscription(pool, receiver.url("/hook"))
        await enqueue(pool, [notification()])
        async with WebhookDispatcher(pool, FAST) as dispatcher:
            await receiver.wait_for(lambda: len(receiver.requests) == 2)
            await until(lambda: dispatcher.stats.delivered == 1)
    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert second.at - first.at >= 0.95  # backoff alone would have been <= 0.2 s
    assert dispatcher.stats.retried == 1


async def test_4xx_dead_letters_marks_failing_and_replay_resends_same_id(pool: asyncpg.Pool) -> None:
    status = {"code": 400}
    failing: list[tuple[str, str]] = []
    recovered: list[str] = []

    async def on_failing(subscription_id: str, reason: str) -> None:
        failing.append((subscription_id, reason))

    async def on_recovered(subscription_id: str, _: str) -> None:
        recovered.append(subscription_id)

    async def answer(_: Request) -> Reply:
        return Reply(status["code"])

    async with HttpReceiver(answer) as receiver:
        sub, secret = await store.create_subscription(pool, receiver.url("/hook"))
        notes = lifecycle("200.004", "host=controller-0")[:2]
        await enqueue(pool, notes)
        async with WebhookDispatcher(pool, FAST, on_subscription_failing=on_failing,
                                     on_subscription_recovered=on_recovered) as dispatcher:
            await until(lambda: dispatcher.stats.dead_lettered == 2, what="both dead-lettered")
            assert len(receiver.requests) == 2  # a 4xx is not retried
            assert failing == [(sub.id, "HTTP 400: refused by the receiver, not retried")]
            current = await store.get_subscription(pool, sub.id)
            assert current.failing and current.failing_reason is not None
            dead = await store.dead_letters(pool, sub.id)
            assert [d.webhook_id for d in dead] == [n.id for n in notes]
            assert all(d.last_status == 400 and d.attempts == 1 for d in dead)

            status["code"] = 204
            assert await store.replay(pool, sub.id, webhook_ids=[notes[0].id]) == 1
            await until(lambda: dispatcher.stats.delivered == 1)
            assert recovered == []  # one dead letter is left
            assert await store.replay(pool, sub.id) == 1
            await until(lambda: dispatcher.stats.delivered == 2)
            await until(lambda: recovered == [sub.id], what="recovered hook")
    assert [r.headers["webhook-id"] for r in receiver.requests] == [notes[0].id, notes[1].id,
                                                                     notes[0].id, notes[1].id]
    assert receiver.requests[0].body == receiver.requests[2].body
    verify(receiver.requests[2].headers, receiver.requests[2].body, secret)
    assert not (await store.get_subscription(pool, sub.id)).failing
    assert await states(pool) == {"delivered": 2}
    assert await store.replay(pool, sub.id) == 0


async def test_max_age_dead_letters_and_calls_the_failing_hook(pool: asyncpg.Pool) -> None:
    receiver = HttpReceiver()
    await receiver.start()
    await receiver.stop()
    failing: list[tuple[str, str]] = []

    async def on_failing(subscription_id: str, reason: str) -> None:
        failing.append((subscription_id, reason))

    sub, _ = await store.create_subscription(pool, receiver.url("/gone"), max_age=0.5)
    other, _ = await store.create_subscription(pool, receiver.url("/gone"), max_age=3600)
    await enqueue(pool, [notification()])
    async with WebhookDispatcher(pool, FAST, on_subscription_failing=on_failing) as dispatcher:
        await until(lambda: dispatcher.stats.dead_lettered == 1, what="dead after max age")
    assert len(failing) == 1 and failing[0][0] == sub.id
    assert failing[0][1].startswith("max age 0.5s reached after ")
    assert await states(pool, sub.id) == {"dead": 1}
    assert await states(pool, other.id) == {"pending": 1}


async def test_secret_rotation_both_sign_then_only_the_new(pool: asyncpg.Pool) -> None:
    async with HttpReceiver() as receiver:
        sub, old = await store.create_subscription(pool, receiver.url("/hook"))
        new = await store.add_secret(pool, sub.id)
        assert (await store.get_subscription(pool, sub.id)).secret_count == 2
        async with WebhookDispatcher(pool, FAST):
            await enqueue(pool, [notification(version=1)])
            await receiver.wait_for(lambda: len(receiver.requests) == 1)
            await store.retire_secret(pool, sub.id, old)
            await enqueue(pool, [notification(version=2, event=EventKind.CHANGED)])
            await receiver.wait_for(lambda: len(receiver.requests) == 2)
    during, after = receiver.requests
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    assert verify(during.headers, during.body, old) and verify(during.headers, during.body, new)
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    assert verify(after.headers, after.body, new)
    with pytest.raises(WebhookVerificationError):
        verify(after.headers, after.body, old)
    with pytest.raises(store.SubscriptionError, match="only secret"):
        await store.retire_secret(pool, sub.id, new)
    # secrets never come back from the list API and are masked in logs
    listed = await store.list_subscriptions(pool)
    assert old not in repr(listed) and new not in repr(listed)
    assert new not in redact_text(f"signing with {new}")


async def test_alertmanager_subscriber_gets_the_v4_payload(pool: asyncpg.Pool) -> None:
    async with HttpReceiver() as receiver:
        sub, _ = await store.create_subscription(pool, receiver.url("/am"), name="team-x", format="alertmanager")
        await enqueue(pool, lifecycle("200.004", "host=controller-0")[::3])  # raised, cleared
        async with WebhookDispatcher(pool, FAST):
            await receiver.wait_for(lambda: len(receiver.requests) == 2)
    payloads = [json.loads(r.body) for r in receiver.requests]
    for p in payloads:
        validate_alertmanager_v4(p)
        assert p["receiver"] == "team-x"
    assert [p["status"] for p in payloads] == ["firing", "resolved"]
    assert payloads[0]["alerts"][0]["fingerprint"] == payloads[1]["alerts"][0]["fingerprint"]
    assert sub.format == "alertmanager"


async def test_filters_by_severity_alarm_id_and_entity_prefix(pool: asyncpg.Pool) -> None:
    url = "http://127.0.0.1:9/"
    by_sev, _ = await store.create_subscription(pool, url, severities=["critical", "major"])
    by_id, _ = await store.create_subscription(pool, url, alarm_ids=["100.101"])
    by_prefix, _ = await store.create_subscription(pool, url, entity_prefix="host=controller-1")
    everything, _ = await store.create_subscription(pool, url)
    notes = [
        notification("200.004", "host=controller-1", severity="critical"),          # sev, prefix, all
        notification("100.101", "host=controller-10", severity="minor"),           # id, all
        notification("100.101", "host=controller-1.port=eth0", severity="warning"),  # id, prefix, all
        notification("300.001", "host=compute-0", severity="major"),               # sev, all
    ]
    assert await enqueue(pool, notes) == 3 + 2 + 3 + 2
    assert await store.queue_depth(pool) == {by_sev.id: 2, by_id.id: 2, by_prefix.id: 2, everything.id: 4}
    assert await pool.fetchval("SELECT count(*) FROM alarms.webhook_deliveries") == 0, "made by the fan-out"
    assert await store.fan_out(pool) == 3 + 2 + 3 + 2
    assert await store.fan_out(pool) == 0

    async def got(sub: store.Subscription) -> list[str]:
        rows = await pool.fetch("SELECT webhook_id FROM alarms.webhook_deliveries WHERE subscription_id = $1 "
                                "ORDER BY id", sub.id)
        return [r["webhook_id"] for r in rows]

    assert await got(by_sev) == [notes[0].id, notes[3].id]
    assert await got(by_id) == [notes[1].id, notes[2].id]
    assert await got(by_prefix) == [notes[0].id, notes[2].id]
    assert await got(everything) == [n.id for n in notes]
    # the prefix is text, not a pattern: no LIKE wildcard in it matches anything but itself
    wild, _ = await store.create_subscription(pool, url, entity_prefix="host=contr_ller-%")
    odd = [notification("200.004", "host=controller-1"), notification("200.004", "host=contr_ller-%.port=x")]
    await enqueue(pool, odd)
    await store.fan_out(pool)
    assert await got(wild) == [odd[1].id]
    with pytest.raises(store.SubscriptionError, match="severities"):
        await store.create_subscription(pool, url, severities=["fatal"])
    with pytest.raises(store.SubscriptionError, match="URL"):
        await store.create_subscription(pool, "ftp://x")
    with pytest.raises(store.SubscriptionError, match="format"):
        await store.create_subscription(pool, url, format="slack")


async def test_enqueue_is_transactional_and_idempotent(pool: asyncpg.Pool) -> None:
    await store.create_subscription(pool, "http://127.0.0.1:9/")
    n = notification()
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError, match="transaction"):
            await store.enqueue(conn, n)
        with pytest.raises(ZeroDivisionError):
            async with conn.transaction():
                assert await store.enqueue(conn, n) == 1
                raise ZeroDivisionError
    assert await store.fan_out(pool) == 0
    assert await states(pool) == {}
    assert await enqueue(pool, [n]) == 1
    assert await enqueue(pool, [n]) == 0
    assert await store.fan_out(pool) == 1
    assert await states(pool) == {"pending": 1}


async def test_two_dispatchers_deliver_each_once_in_order(pool: asyncpg.Pool) -> None:
    async with HttpReceiver() as receiver:
        a, _ = await store.create_subscription(pool, receiver.url("/a"))
        b, _ = await store.create_subscription(pool, receiver.url("/b"))
        notes = [n for parts in zip(*(lifecycle("200.004", f"host=compute-{i}") for i in range(10)), strict=True)
                 for n in parts]
        await enqueue(pool, notes)
        # two requests in flight each at most: neither replica can take every head at once
        narrow = DispatcherSettings(timeout=1.0, lease=1.5, max_in_flight=2, min_backoff=0.05, max_backoff=0.2,
                                    poll_interval=0.2)
        first, second = WebhookDispatcher(pool, narrow), WebhookDispatcher(pool, narrow)
        first.start()
        second.start()
        try:
            await receiver.wait_for(lambda: len(receiver.requests) == 80)
            await until(lambda: first.stats.delivered + second.stats.delivered == 80)
        finally:
            await first.stop()
            await second.stop()
    assert first.stats.delivered > 0 and second.stats.delivered > 0
    for path in ("/a", "/b"):
        assert versions_by_instance(receiver.on(path)) == {f"200.004|host=compute-{i}": [1, 2, 3, 4]
                                                          for i in range(10)}
    assert await states(pool) == {"delivered": 80}
    assert a.id != b.id


async def test_garbage_answer_is_retried_and_others_unaffected(pool: asyncpg.Pool) -> None:
    garbage = {"left": 2}

    async def route(request: Request) -> Reply:
        if request.path == "/garbage" and garbage["left"] > 0:
            garbage["left"] -= 1
            return Reply(raw=b"\x00\xffnot http at all\r\n\r\n")
        return Reply()

    async with HttpReceiver(route) as receiver:
        bad, _ = await store.create_subscription(pool, receiver.url("/garbage"))
        good, _ = await store.create_subscription(pool, receiver.url("/ok"))
        await enqueue(pool, lifecycle("200.004", "host=controller-0"))
        async with WebhookDispatcher(pool, FAST) as dispatcher:
            await until(lambda: dispatcher.stats.delivered == 8, what="all 8 delivered")
    assert dispatcher.stats.retried == 2
    assert versions_by_instance(receiver.on("/ok")) == {"200.004|host=controller-0": [1, 2, 3, 4]}
    assert [data(r)["version"] for r in receiver.on("/garbage")] == [1, 1, 1, 2, 3, 4]
    assert await states(pool, bad.id) == await states(pool, good.id) == {"delivered": 4}


async def test_waiting_behind_a_retry_does_not_spin(pool: asyncpg.Pool) -> None:
    answers = [Reply(503, {"Retry-After": "2"})]

    async def answer(_: Request) -> Reply:
        return answers.pop() if answers else Reply()

    async with HttpReceiver(answer) as receiver:
        await store.create_subscription(pool, receiver.url("/hook"))
        await enqueue(pool, lifecycle("200.004", "host=controller-0")[:3])  # two wait behind the first
        async with WebhookDispatcher(pool, DispatcherSettings(timeout=1.0, lease=1.5, poll_interval=5.0)) as dispatcher:
            await until(lambda: dispatcher.stats.retried == 1)
            cycles = dispatcher.stats.cycles
            await receiver.wait_for(lambda: len(receiver.requests) == 2, what="the retry after 2 s")
            assert dispatcher.stats.cycles - cycles < 10
            await until(lambda: dispatcher.stats.delivered == 3)
    assert [data(r)["version"] for r in receiver.requests] == [1, 1, 2, 3]


async def test_graceful_stop_releases_claims_for_an_immediate_resend(pool: asyncpg.Pool) -> None:
    async def first_hangs(request: Request) -> Reply:
        return await hang() if request is receiver.requests[0] else Reply()

    receiver = HttpReceiver(first_hangs)
    async with receiver:
        await store.create_subscription(pool, receiver.url("/hook"))
        await enqueue(pool, [notification()])
        settings = DispatcherSettings(timeout=30.0, lease=60.0, grace=0.1, poll_interval=0.2)
        first = WebhookDispatcher(pool, settings)
        first.start()
        await receiver.wait_for(lambda: len(receiver.requests) == 1)
        await first.stop()
        assert await pool.fetchval("SELECT claimed_until FROM alarms.webhook_deliveries") is None
        async with WebhookDispatcher(pool, settings) as second:
            await until(lambda: second.stats.delivered == 1, timeout=10, what="sent again well within the lease")
    assert receiver.requests[0].headers["webhook-id"] == receiver.requests[1].headers["webhook-id"]


async def test_subscription_management(pool: asyncpg.Pool) -> None:
    secret = generate_secret()
    sub, returned = await store.create_subscription(pool, "https://example.invalid/hook", secret=secret,
                                                    name="noc", max_age=60)
    assert returned == secret and sub.name == "noc" and sub.max_age == 60 and sub.secret_count == 1
    assert not hasattr(sub, "secrets")
    assert [s.id for s in await store.list_subscriptions(pool)] == [sub.id]
    updated = await store.update_filters(pool, sub.id, severities=["critical"], entity_prefix="host=controller-0")
    assert updated.filters == store.Filters(frozenset({"critical"}), frozenset(), "host=controller-0")
    await enqueue(pool, [notification("200.004", "host=controller-0"), notification("200.004", "host=compute-0")])
    assert await store.queue_depth(pool) == {sub.id: 1}      # not fanned out yet: counted all the same
    assert await store.fan_out(pool) == 1
    assert await store.queue_depth(pool) == {sub.id: 1}
    await pool.execute("UPDATE alarms.webhook_deliveries SET state = 'delivered', "
                       "delivered_at = now() - interval '2 hours'")
    assert await store.purge_delivered(pool, 3600) == 1
    assert await store.queue_depth(pool) == {sub.id: 0}
    assert await store.delete_subscription(pool, sub.id)
    assert not await store.delete_subscription(pool, sub.id)
    with pytest.raises(store.UnknownSubscription):
        await store.get_subscription(pool, sub.id)
    with pytest.raises(store.UnknownSubscription):
        await store.replay(pool, "not-a-uuid")
    with pytest.raises(store.UnknownSubscription):
        await store.add_secret(pool, sub.id)
    with pytest.raises(store.SubscriptionError, match="bytes"):
        await store.create_subscription(pool, "https://example.invalid/", secret="whsec_c2hvcnQ=")
    with pytest.raises(store.SubscriptionError, match="entity prefix"):
        await store.create_subscription(pool, "https://example.invalid/", entity_prefix="host=controller-1.")



async def test_failing_endpoint_is_paused_for_every_alarm(pool: asyncpg.Pool) -> None:
    """Circuit breaker: a 503 with Retry-After on one alarm's delivery holds the whole endpoint back."""
    answers = [Reply(503, {"Retry-After": "1"})]

    async def answer(_: Request) -> Reply:
        return answers.pop() if answers else Reply()

    async with HttpReceiver(answer) as receiver:
        sub, _ = await store.create_subscription(pool, receiver.url("/hook"))
        await enqueue(pool, [notification("200.004", f"host=compute-{i}") for i in range(10)])
        settings = DispatcherSettings(timeout=1.0, lease=1.5, per_subscription=1, min_backoff=0.05,
                                      max_backoff=0.2, poll_interval=0.2)
        async with WebhookDispatcher(pool, settings) as dispatcher:
            await until(lambda: dispatcher.stats.retried == 1)
            assert await pool.fetchval("SELECT consecutive_failures FROM alarms.webhook_subscriptions "
                                       "WHERE id = $1 AND paused_until > now()", sub.id) == 1
            await until(lambda: dispatcher.stats.delivered == 10, what="everything after the pause")
    first, *rest = receiver.requests
    assert len(rest) == 10
    assert all(r.at - first.at >= 0.95 for r in rest)  # no other alarm's delivery during the pause
    assert await pool.fetchval("SELECT consecutive_failures FROM alarms.webhook_subscriptions") == 0
