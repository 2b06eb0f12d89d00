"""Group commit in the alarms service, on the real PostgreSQL: several fault messages in one transaction
(``AlarmsService.handle`` / ``AlarmStore.apply_many``) do exactly what the same messages do one by one,
keep the order per alarm instance, drop duplicates, and a bad message or a conflict costs only itself."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from schemas.catalog import load as load_registry
from schemas.envelope import Envelope
from services.alarms.model import SetRequest
from services.alarms.service import FAULTS, GROUP, MIGRATIONS, AlarmsService
from services.alarms.store import Origin
from services.alarms.webhooks import store as webhooks
from services.alarms.webhooks.dispatcher import alertmanager_body
from services.core.auth import InMemoryAuthenticator
from services.core.bus.bus import Bus, Message, Reject
from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from services.core.db.migrations import migrate
from services.core.db.outbox import Outbox
from services.core.host import ServiceContext
from services.core.settings import load_settings
from tests.support.postgres import fresh_database, lock_waiters, pool_on
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres

REGISTRY = load_registry()


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with fresh_database() as url, pool_on(url) as pool:
        await migrate(pool, "alarms", MIGRATIONS)
        await pool.execute("SELECT core.ensure_outbox_inbox('alarms')")
        yield pool


class Site:
    def __init__(self, pool: asyncpg.Pool, batch_size: int) -> None:
        self.pool = pool
        self.broker = InMemoryBroker()
        self.service = AlarmsService(batch_size=batch_size, webhooks=False)
        self.buses: list[Bus] = []

    async def start(self) -> None:
        bus = Bus(InMemoryTransport(self.broker), source="roost/alarms", authenticator=InMemoryAuthenticator())
        await bus.connect()
        self.buses.append(bus)
        await self.service.start(ServiceContext("alarms", load_settings(), self.pool, bus, Outbox("alarms")))
        self.service.store.webhooks = True       # queue deliveries (no dispatcher sends them)

    async def raiser(self) -> Bus:
        bus = Bus(InMemoryTransport(self.broker), source="roost/heartbeat")
        await bus.connect()
        self.buses.append(bus)
        return bus

    async def close(self) -> None:
        for bus in self.buses:
            await bus.stop_consuming()
        await self.service.stop()
        for bus in self.buses:
            await bus.close()


@pytest.fixture
async def site(pool: asyncpg.Pool) -> AsyncIterator[Site]:
    s = Site(pool, batch_size=64)
    await s.start()
    yield s
    await s.close()


def envelope(type: str, data: dict[str, Any]) -> Envelope:
    return REGISTRY.envelope(type, data, source="roost/heartbeat")


def message(env: Envelope) -> Message:
    return Message(env, REGISTRY.validate(env), env.type, GROUP, 1)


def script(host: str) -> list[Envelope]:
    """Raise, the same again, change, a customer log, clear, clear again, raise again: every path."""
    entity = f"host={host}"
    return [
        envelope("roost.fault.set", {"alarm_id": "950.006", "entity_instance_id": entity, "severity": "minor",
                                     "reason_text": "slow"}),
        envelope("roost.fault.set", {"alarm_id": "950.006", "entity_instance_id": entity, "severity": "minor",
                                     "reason_text": "slow"}),
        envelope("roost.fault.set", {"alarm_id": "950.006", "entity_instance_id": entity, "severity": "major",
                                     "reason_text": "slower", "proposed_repair_action": "look at it"}),
        envelope("roost.fault.log", {"log_id": "950.501", "entity_instance_id": entity, "severity": "warning",
                                     "reason_text": "someone: did something: ok"}),
        envelope("roost.fault.set", {"alarm_id": "950.003", "entity_instance_id": f"{entity}.network=mgmt",
                                     "severity": "major"}),
        envelope("roost.fault.clear", {"alarm_id": "950.006", "entity_instance_id": entity}),
        envelope("roost.fault.clear", {"alarm_id": "950.006", "entity_instance_id": entity}),
        envelope("roost.fault.set", {"alarm_id": "950.006", "entity_instance_id": entity, "severity": "minor",
                                     "reason_text": "again"}),
    ]


async def effects(pool: asyncpg.Pool, host: str) -> dict[str, Any]:
    """What a script left on ``host``, with the host's name and the per-run ids taken out."""
    def norm(value: Any) -> Any:
        return json.loads(json.dumps(value, default=str).replace(host, "HOST"))

    history = await pool.fetch(
        """SELECT event_log_id, state, change, changes::text AS changes, cause, severity, reason_text,
                  proposed_repair_action, owner, version, alarm_uuid FROM alarms.event_log
           WHERE entity_instance_id LIKE $1 ORDER BY seq""", f"host={host}%")
    uuids = {r["alarm_uuid"]: f"alarm-{i}" for i, r in enumerate(history) if r["alarm_uuid"] is not None}
    await webhooks.fan_out(pool)        # the deliveries, as the dispatcher's fan-out makes them
    events = [json.loads(bytes(r["body"])) for r in await pool.fetch("SELECT body FROM alarms.outbox ORDER BY id")]
    mine = [e for e in events if host in json.dumps(e["data"])]
    deliveries = await pool.fetch(
        """SELECT d.event_type, d.ordering_key, coalesce(d.body, n.body) AS body, d.body IS NULL AS rendered, s.name,
                  s.format
           FROM alarms.webhook_deliveries d
           JOIN alarms.webhook_subscriptions s ON s.id = d.subscription_id
           LEFT JOIN alarms.webhook_notifications n ON n.seq = d.notification_seq
           WHERE d.ordering_key LIKE $1 ORDER BY d.id""", f"%host={host}%")
    active = await pool.fetch("""SELECT alarm_id, severity, reason_text, version, owner, uuid FROM alarms.active_alarms
                                 WHERE entity_instance_id LIKE $1 ORDER BY alarm_id""", f"host={host}%")

    def sent(row: asyncpg.Record) -> bytes:
        """The bytes the dispatcher sends for a delivery row (an Alertmanager body is rendered at sending)."""
        raw = bytes(row["body"])
        return alertmanager_body(raw, row["name"]) if row["rendered"] and row["format"] == "alertmanager" else raw

    def body(raw: bytes) -> Any:
        data = json.loads(raw)
        alarm = data["data"]["alarm"] if "data" in data else data["alerts"][0]
        return {"type": data.get("type", data.get("status")),
                "alarm": {k: v for k, v in alarm.items() if k not in ("uuid", "timestamp", "created_at", "updated_at",
                                                                     "annotations", "startsAt", "endsAt",
                                                                     "generatorURL", "fingerprint")}}

    return norm({
        "history": [{**{k: v for k, v in dict(r).items() if k != "alarm_uuid"}, "alarm": uuids.get(r["alarm_uuid"])}
                    for r in history],
        "events": [{"type": e["type"], "subject": e["subject"].split("/")[0],
                    "version": e["data"]["version"], "owner": e["data"]["owner"],
                    "changes": e["data"].get("changes"), "cause": e["data"].get("cause"),
                    "state": (e["data"].get("alarm") or e["data"].get("log") or {}).get("alarm_state")
                    or e["data"]["log"]["state"]} for e in mine],
        "deliveries": [(r["event_type"], r["ordering_key"], r["name"], body(sent(r))) for r in deliveries],
        "active": [{**{k: v for k, v in dict(r).items() if k != "uuid"}, "alarm": uuids.get(r["uuid"])}
                   for r in active],
    })


async def test_a_batch_does_exactly_what_the_same_messages_do_one_by_one(site: Site) -> None:
    await webhooks.create_subscription(site.pool, "http://127.0.0.1:9/a", name="roost-json")
    await webhooks.create_subscription(site.pool, "http://127.0.0.1:9/b", name="am", format="alertmanager")
    await webhooks.create_subscription(site.pool, "http://127.0.0.1:9/c", name="majors", severities=["major"])
    await site.service.store.set_suppressed(site.pool, "950.003", True)

    for env in script("alone-1"):
        await site.service.handle_alone(message(env))
    batched = [message(e) for e in script("batch-1")]
    await asyncio.gather(*(site.service.handle(m) for m in batched))

    alone, together = await effects(site.pool, "alone-1"), await effects(site.pool, "batch-1")
    assert together == alone
    assert [h["change"] for h in together["history"]] == ["raised", "changed", "logged", "raised", "cleared",
                                                          "raised"]
    assert together["active"][1]["alarm"] == "alarm-5", "raised again after the clear: a new uuid"
    assert len(together["deliveries"]) == 2 + 3 + 3 + 3 + 2, "each matching subscriber, the majors only majors"
    # one transaction: every row the batch wrote has the same xmin
    xmins = await site.pool.fetch("SELECT DISTINCT xmin::text FROM alarms.event_log WHERE entity_instance_id "
                                  "LIKE 'host=batch-1%'")
    assert len(xmins) == 1


async def test_a_bad_message_in_a_batch_is_rejected_alone_and_the_others_commit(site: Site) -> None:
    good = [envelope("roost.fault.set", {"alarm_id": "950.003", "entity_instance_id": f"host=h{i}.network=mgmt",
                                         "severity": "major"}) for i in range(5)]
    unknown = envelope("roost.fault.set", {"alarm_id": "950.999", "entity_instance_id": "host=h9",
                                           "severity": "major"})
    wrong_severity = envelope("roost.fault.set", {"alarm_id": "950.002", "entity_instance_id": "host=h8",
                                                  "severity": "warning"})
    batch = [good[0], good[1], unknown, good[2], wrong_severity, good[3], good[4]]
    outcomes = await asyncio.gather(*(site.service.handle(message(e)) for e in batch), return_exceptions=True)

    rejected = [(e.id, str(o)) for e, o in zip(batch, outcomes, strict=True) if o is not None]
    assert [i for i, _ in rejected] == [unknown.id, wrong_severity.id]
    assert all(isinstance(o, Reject) for o in outcomes if o is not None)
    assert "950.999" in rejected[0][1]
    active = {r["entity_instance_id"] for r in await site.pool.fetch("SELECT entity_instance_id FROM "
                                                                      "alarms.active_alarms")}
    assert active == {f"host=h{i}.network=mgmt" for i in range(5)}
    inbox = {r["message_id"] for r in await site.pool.fetch("SELECT message_id FROM alarms.inbox")}
    assert inbox == {e.id for e in good}, "a rejected message is not marked handled: a fixed replay applies"


async def test_a_bad_message_from_the_bus_is_dead_lettered_alone(site: Site) -> None:
    raiser = await site.raiser()
    batch = [envelope("roost.fault.set", {"alarm_id": "950.003", "entity_instance_id": f"host=h{i}.network=mgmt",
                                          "severity": "major"}) for i in range(20)]
    batch.insert(7, envelope("roost.fault.clear", {"alarm_id": "950.999", "entity_instance_id": "host=h1"}))
    for env in batch:
        await raiser.publish(env)
    await wait_until(lambda: not site.broker.groups[(GROUP, FAULTS)].pending, what="all settled")
    dead = [m for m in site.broker.unrouted if m.subject.startswith("roost.dlq.")]
    assert [m.message_id for m in dead] == [batch[7].id]
    assert await site.pool.fetchval("SELECT count(*) FROM alarms.active_alarms") == 20


async def test_duplicates_within_and_across_batches_apply_once(site: Site) -> None:
    first = envelope("roost.fault.set", {"alarm_id": "950.006", "entity_instance_id": "host=d", "severity": "minor",
                                         "reason_text": "one"})
    second = envelope("roost.fault.set", {"alarm_id": "950.006", "entity_instance_id": "host=d", "severity": "major",
                                          "reason_text": "two"})
    await asyncio.gather(*(site.service.handle(message(e)) for e in (first, first, second, first)))
    await asyncio.gather(*(site.service.handle(message(e)) for e in (second, first)))
    history = await site.pool.fetch("SELECT change, reason_text FROM alarms.event_log ORDER BY seq")
    assert [(r["change"], r["reason_text"]) for r in history] == [("raised", "one"), ("changed", "two")]


async def test_the_order_of_each_alarm_instance_is_kept_through_the_consumer(site: Site) -> None:
    raiser = await site.raiser()
    sent = []
    for i in range(150):
        host = f"host=o{i % 3}"
        if i % 2 == 0:
            sent.append(envelope("roost.fault.set", {"alarm_id": "950.006", "entity_instance_id": host,
                                                     "severity": "minor", "reason_text": f"step {i}"}))
        else:
            sent.append(envelope("roost.fault.clear", {"alarm_id": "950.006", "entity_instance_id": host}))
    for env in sent:
        await raiser.publish(env)
    await wait_until(lambda: not site.broker.groups[(GROUP, FAULTS)].pending, what="all settled")
    rows = await site.pool.fetch("SELECT entity_instance_id, change, reason_text FROM alarms.event_log ORDER BY seq")
    for n in range(3):
        mine = [(r["change"], r["reason_text"]) for r in rows if r["entity_instance_id"] == f"host=o{n}"]
        expected, reason = [], None
        for i in range(n, 150, 3):           # what applying this host's messages in the order sent records
            if i % 2 == 0:
                expected.append(("raised", f"step {i}"))
                reason = f"step {i}"
            elif reason is not None:
                expected.append(("cleared", reason))
                reason = None
        assert mine == expected
    transactions = await site.pool.fetchval("SELECT count(DISTINCT xmin::text) FROM alarms.event_log")
    assert transactions < 150, "the consumer's concurrency lets batches gather"


async def test_a_concurrent_raise_of_the_same_instance_makes_the_batch_apply_one_by_one(site: Site) -> None:
    others = [envelope("roost.fault.set", {"alarm_id": "950.003", "entity_instance_id": f"host=c{i}.network=mgmt",
                                           "severity": "major"}) for i in range(3)]
    contested = envelope("roost.fault.set", {"alarm_id": "950.006", "entity_instance_id": "host=contested",
                                             "severity": "major", "reason_text": "from the batch"})
    async with site.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await site.service.store.set(conn, SetRequest(alarm_id="950.006", entity_instance_id="host=contested",
                                                      severity="minor", reason_text="elsewhere"),
                                     Origin("roost/other"))
        batch = asyncio.gather(*(site.service.handle(message(e)) for e in [others[0], contested, *others[1:]]))
        await lock_waiters(site.pool, 1)       # the batch waits on our uncommitted raise
        await tx.commit()
    await batch
    history = await site.pool.fetch("SELECT entity_instance_id, change, reason_text FROM alarms.event_log "
                                    "WHERE entity_instance_id = 'host=contested' ORDER BY seq")
    assert [(r["change"], r["reason_text"]) for r in history] == [("raised", "elsewhere"),
                                                                  ("changed", "from the batch")]
    assert await site.pool.fetchval("SELECT count(*) FROM alarms.active_alarms") == 4
    assert await site.pool.fetchval("SELECT count(*) FROM alarms.inbox") == 4


async def test_batch_size_one_applies_each_message_alone(pool: asyncpg.Pool) -> None:
    site = Site(pool, batch_size=1)
    await site.start()
    try:
        assert site.service.consumer_options.concurrency == 1
        assert not site.service.consumer_options.confirm_acks       # idempotent through the inbox
        await asyncio.gather(*(site.service.handle(message(envelope(
            "roost.fault.set", {"alarm_id": "950.003", "entity_instance_id": f"host=s{i}.network=mgmt",
                                "severity": "major"}))) for i in range(4)))
        assert await pool.fetchval("SELECT count(DISTINCT xmin::text) FROM alarms.event_log") == 4
    finally:
        await site.close()
    with pytest.raises(ValueError, match="batch_size"):
        AlarmsService(batch_size=0)


async def test_a_clear_waiting_for_a_batch_that_changes_the_alarm_clears_it_afterwards(site: Site) -> None:
    entity = "host=waited"
    await site.service.handle_alone(message(envelope("roost.fault.set", {
        "alarm_id": "950.006", "entity_instance_id": entity, "severity": "minor", "reason_text": "first"})))
    paused, go = asyncio.Event(), asyncio.Event()
    record_many = site.service.store._record_many

    async def slow_record_many(conn: Any, *args: Any, **kwargs: Any) -> None:
        paused.set()                 # the batch holds the row, changed, in its open transaction
        await go.wait()
        await record_many(conn, *args, **kwargs)

    site.service.store._record_many = slow_record_many  # type: ignore[method-assign]
    change = message(envelope("roost.fault.set", {"alarm_id": "950.006", "entity_instance_id": entity,
                                                  "severity": "major", "reason_text": "second"}))
    other = message(envelope("roost.fault.set", {"alarm_id": "950.003", "entity_instance_id": "host=x.network=a",
                                                 "severity": "major"}))
    batch = asyncio.gather(site.service.handle(change), site.service.handle(other))
    await asyncio.wait_for(paused.wait(), 10)
    cleared = asyncio.create_task(site.service.host_deleted("waited"))
    await lock_waiters(site.pool, 1)
    go.set()
    await batch
    assert [c.alarm.reason_text for c in await cleared] == ["second"], "the clear saw the changed row"
    history = await site.pool.fetch("SELECT change, reason_text, version FROM alarms.event_log "
                                    "WHERE entity_instance_id = $1 ORDER BY seq", entity)
    assert [(r["change"], r["reason_text"], r["version"]) for r in history] == [
        ("raised", "first", 1), ("changed", "second", 2), ("cleared", "second", 3)]
    assert await site.pool.fetchval("SELECT count(*) FROM alarms.active_alarms WHERE entity_instance_id = $1",
                                    entity) == 0


async def test_the_committer_keeps_its_connection_for_the_next_message_a_moment(site: Site) -> None:
    """One message a batch (a trickle): giving the connection back to the pool after each cost PostgreSQL a
    reset statement per batch.  The committer holds it for ``hold_idle`` once idle, then gives it back; stop
    does not wait for that."""
    service = site.service
    pids = []
    for i in range(3):
        await service.handle(message(envelope("roost.fault.set", {
            "alarm_id": "950.003", "entity_instance_id": f"host=t{i}.network=mgmt", "severity": "major"})))
        await asyncio.sleep(0.05)
        assert len(service._held) == 1, "the connection went back to the pool between two messages"
        pids.append(service._held[0].get_server_pid())
    assert len(set(pids)) == 1
    committer = service._committer
    assert committer is not None
    await wait_until(committer.done, timeout=service.hold_idle + 2, what="the idle committer's end")
    assert service._held == []
    await service.handle(message(envelope("roost.fault.set", {
        "alarm_id": "950.003", "entity_instance_id": "host=t9.network=mgmt", "severity": "major"})))
    started = asyncio.get_running_loop().time()
    await service.stop()
    assert asyncio.get_running_loop().time() - started < service.hold_idle
    assert service._held == []
    assert await site.pool.fetchval("SELECT count(*) FROM alarms.active_alarms") == 4


HARD_TEXT = 'a "quoted" \\path\\ with\ttab, newline\n, line separator \u2028, ünïcödé, 警报 and 🚨'


async def test_a_batch_stores_every_character_and_microsecond_as_one_by_one_does(site: Site) -> None:
    """A batch's rows travel to PostgreSQL as one JSON document (``store._json_rows``), one by one as plain
    parameters: both store the same text and the same instants, to the microsecond, whatever the offset."""
    def faults(host: str) -> list[Envelope]:
        entity = f"host={host}"
        return [
            envelope("roost.fault.set", {"alarm_id": "950.006", "entity_instance_id": entity, "severity": "minor",
                                         "reason_text": HARD_TEXT, "proposed_repair_action": HARD_TEXT[::-1],
                                         "timestamp": "2026-11-22T10:11:12.345678+05:30"}),
            envelope("roost.fault.set", {"alarm_id": "950.006", "entity_instance_id": entity, "severity": "major",
                                         "reason_text": HARD_TEXT + " (worse)",
                                         "timestamp": "1999-12-31T23:59:59.000001-08:00"}),
            envelope("roost.fault.set", {"alarm_id": "950.003", "entity_instance_id": f"{entity}.network=mgmt",
                                         "severity": "major", "reason_text": HARD_TEXT,
                                         "timestamp": "2026-11-22T00:00:00+00:00"}),
            envelope("roost.fault.clear", {"alarm_id": "950.003", "entity_instance_id": f"{entity}.network=mgmt"}),
        ]

    for env in faults("text-alone"):
        await site.service.handle_alone(message(env))
    await asyncio.gather(*(site.service.handle(message(e)) for e in faults("text-batch")))

    async def rows(host: str) -> dict[str, list[dict[str, Any]]]:
        history = await site.pool.fetch(
            """SELECT event_log_id, state, change, changes, cause, entity_type_id, timestamp, severity, reason_text,
                      event_log_type, probable_cause, proposed_repair_action, service_affecting, suppression, owner,
                      version
               FROM alarms.event_log WHERE entity_instance_id LIKE $1 ORDER BY seq""", f"host={host}%")
        active = await site.pool.fetch(
            """SELECT alarm_id, alarm_state, entity_type_id, timestamp, severity, reason_text, alarm_type,
                      probable_cause, proposed_repair_action, service_affecting, suppression, inhibit_alarms,
                      mgmt_affecting, degrade_affecting, owner, version
               FROM alarms.active_alarms WHERE entity_instance_id LIKE $1 ORDER BY alarm_id""", f"host={host}%")
        # the clear's record is stamped when it was applied
        return {"history": [dict(r) for r in history[:3]], "active": [dict(r) for r in active]}

    alone, together = await rows("text-alone"), await rows("text-batch")
    assert together == alone
    assert together["active"][0]["reason_text"] == HARD_TEXT + " (worse)"
    assert together["history"][0]["reason_text"] == HARD_TEXT
    assert together["history"][0]["proposed_repair_action"] == HARD_TEXT[::-1]
    assert together["history"][0]["timestamp"].isoformat() == "2026-11-22T04:41:12.345678+00:00"
    assert together["active"][0]["timestamp"].isoformat() == "2000-01-01T07:59:59.000001+00:00"
    assert together["history"][1]["changes"] is not None and "worse" in together["history"][1]["changes"]
