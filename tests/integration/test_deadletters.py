"""The dead-letter keeper on the real PostgreSQL: what a consumer gives up on is stored with its reason,
listed, shown, replayed to the consumer (fixed by then) and purged, through the operator's bus commands;
a depth over the threshold is announced once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from schemas.envelope import Envelope, ReplyStatus
from services.core.auth import InMemoryAuthenticator
from services.core.bus.abc import ConsumerOptions
from services.core.bus.bus import Bus, Message
from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from services.core.db.outbox import Outbox
from services.core.deadletters import DeadLetterKeeper, DepthAlarm, record_from
from services.core.host import ServiceContext
from services.core.settings import load_settings
from services.core.system import CoreService
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with fresh_database() as url, pool_on(url) as pool:
        yield pool


class Site:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.broker = InMemoryBroker()
        self.auth = InMemoryAuthenticator()
        self.admin = self.auth.issue("operator", "admin")
        self.reader = self.auth.issue("viewer", "reader")
        self.pool = pool
        self.buses: list[Bus] = []

    async def bus(self, token: str | None = None) -> Bus:
        bus = Bus(InMemoryTransport(self.broker), source="roost/test", authenticator=self.auth, token=token)
        await bus.connect()
        self.buses.append(bus)
        return bus

    async def command(self, type: str, data: dict[str, Any], token: str | None = None) -> Any:
        client = await self.bus(token or self.admin)
        return await client.request(Envelope.command(type, data, source="roost/cli"), timeout=10)


@pytest.fixture
async def site(pool: asyncpg.Pool) -> AsyncIterator[Site]:
    s = Site(pool)
    yield s
    for bus in s.buses:
        await bus.close()


async def test_a_dead_letter_is_kept_listed_replayed_and_purged(site: Site) -> None:
    core = CoreService()
    await core.start(ServiceContext("core", load_settings(dlq_alarm_threshold=1), site.pool, await site.bus(),
                                    Outbox("core")))
    announced: list[str] = []
    watcher = await site.bus()

    faults: list[str] = []

    async def on_system(m: Message) -> None:
        if "dead_letters" in m.envelope.type:
            announced.append(m.envelope.type)

    async def on_fault(m: Message) -> None:
        faults.append(f"{m.envelope.type} {m.envelope.data['alarm_id']} {m.envelope.data['entity_instance_id']}")

    await watcher.subscribe("roost.system.>", "test-watch", on_system)
    await watcher.subscribe("roost.fault.>", "test-faults", on_fault)

    broken = True
    handled: list[int] = []
    consumer = await site.bus()

    async def handle(m: Message) -> None:
        if broken:
            raise RuntimeError("database of record unreachable")
        handled.append(m.envelope.data["version"])

    await consumer.subscribe("roost.system.service_started", "fragile", handle,
                             options=ConsumerOptions(max_attempts=2))
    for n in (1, 2):
        await consumer.publish(consumer.envelope("roost.system.service_started",
                                                 {"service": "inventory", "version": str(n), "instance": "i-1"}))
    await wait_until(lambda: len(announced) >= 1, what="the depth announcement")
    assert announced[0] == "roost.system.dead_letters_high"

    listed = await site.command("roost.cmd.dlq.list", {"group": "fragile"}, token=site.reader)
    assert listed.status is ReplyStatus.COMPLETED, listed
    items = listed.result["items"]
    assert len(items) == 2
    assert REGISTRY.get_sample_value("roost_dead_letters_waiting_messages", {"group": "fragile"}) == 2
    assert "RuntimeError: database of record unreachable" in items[0]["reason"]
    assert items[0]["attempts"] == 2

    shown = await site.command("roost.cmd.dlq.show", {"id": items[0]["id"]}, token=site.reader)
    assert shown.result["envelope"]["type"] == "roost.system.service_started"
    assert "authorization" not in shown.result["headers"]

    denied = await site.command("roost.cmd.dlq.replay", {"all": True}, token=site.reader)
    assert denied.status is ReplyStatus.REJECTED, "a reader cannot replay"

    broken = False
    replayed = await site.command("roost.cmd.dlq.replay", {"ids": [items[0]["id"]]})
    assert replayed.result == {"replayed": 1}
    await wait_until(lambda: handled == ["1"], what="the replayed event handled")
    left = await site.command("roost.cmd.dlq.list", {})
    assert [i["id"] for i in left.result["items"]] == [items[1]["id"]]

    purged = await site.command("roost.cmd.dlq.purge", {"group": "fragile"})
    assert purged.result == {"purged": 1}
    await wait_until(lambda: "roost.system.dead_letters_normal" in announced, what="back to normal")
    await wait_until(lambda: len(faults) == 2, what="the alarm raised and cleared")
    assert faults == ["roost.fault.set 950.301 system=roost.dead_letters=all",
                      "roost.fault.clear 950.301 system=roost.dead_letters=all"]
    assert (await site.command("roost.cmd.dlq.list", {})).result["items"] == []
    assert REGISTRY.get_sample_value("roost_dead_letters_waiting_messages", {"group": "fragile"}) == 0


async def test_a_dead_letter_delivered_twice_is_stored_once(site: Site) -> None:
    keeper = DeadLetterKeeper(site.pool, await site.bus(site.admin))
    await keeper.start()
    publisher = await site.bus()
    from services.core.bus.abc import H_DLQ_GROUP, H_DLQ_REASON, H_DLQ_TIME, OutgoingMessage

    headers = {H_DLQ_REASON: "boom", H_DLQ_GROUP: "g", H_DLQ_TIME: "2026-11-21T00:00:00+00:00"}
    for _ in range(2):
        await publisher.transport.publish(OutgoingMessage("roost.dlq.g", b"not json", "m-1", headers))
    await wait_until(lambda: not any(g.pending for g in site.broker.groups.values()), what="both drained")
    assert await keeper.depth() == {"g": 1}
    shown = await keeper.show((await site.pool.fetchval("SELECT id FROM core.dead_letters")).__str__())
    assert shown.envelope is None and shown.body == "not json", "a malformed body is kept as text"


def test_records_tolerate_missing_headers_and_the_alarm_has_hysteresis() -> None:
    record = record_from("roost.dlq.grp", "m", {}, b"x")
    assert record.consumer_group == "grp" and record.reason == "(no reason recorded)"
    alarm = DepthAlarm(threshold=10)
    assert [alarm.observe(d) for d in (5, 11, 12, 9, 5, 11)] == [None, "high", None, None, "normal", "high"]
