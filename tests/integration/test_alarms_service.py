"""The alarms service on the real PostgreSQL with the in-memory bus: faults in, active alarms, history,
``roost.alarm.*`` events in the outbox and webhook deliveries out, each message applied once, bad input
dead-lettered with its reason."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY as PROMETHEUS

from schemas.envelope import CommandReply, Envelope, ReplyStatus
from services.alarms import store as alarm_store
from services.alarms.catalogue import ROOST_CATALOGUE
from services.alarms.model import SetRequest
from services.alarms.service import CATALOGUES_ENV, FAULTS, GROUP, MIGRATIONS, AlarmsService, default_catalogue_paths
from services.alarms.store import Origin
from services.alarms.webhooks import store as webhooks
from services.core.auth import InMemoryAuthenticator
from services.core.bus.abc import H_DLQ_REASON, OutgoingMessage
from services.core.bus.bus import Bus, Message
from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from services.core.db.migrations import migrate
from services.core.db.outbox import Outbox
from services.core.db.relay import OutboxRelay
from services.core.host import ServiceContext
from services.core.settings import load_settings
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres

STARLINGX = Path(__file__).resolve().parents[3] / "shared" / "starlingx-fault" / "events.yaml"


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with fresh_database() as url, pool_on(url) as pool:
        await migrate(pool, "alarms", MIGRATIONS)
        await pool.execute("SELECT core.ensure_outbox_inbox('alarms')")
        yield pool


class Site:
    """One in-memory broker, the alarms service on it, and a service that raises faults."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.broker = InMemoryBroker()
        self.auth = InMemoryAuthenticator()
        self.buses: list[Bus] = []
        self.service = AlarmsService([ROOST_CATALOGUE, STARLINGX])
        self.raiser: Bus | None = None

    async def bus(self, source: str) -> Bus:
        bus = Bus(InMemoryTransport(self.broker), source=source, authenticator=self.auth)
        await bus.connect()
        self.buses.append(bus)
        return bus

    async def start(self, **settings: Any) -> None:
        bus = await self.bus("roost/alarms")
        await self.service.start(ServiceContext("alarms", load_settings(**settings), self.pool, bus, Outbox("alarms")))
        self.raiser = await self.bus("roost/inventory")

    def settled(self) -> bool:
        return not self.broker.groups[(GROUP, FAULTS)].pending

    async def send(self, type: str, data: dict[str, Any], *, source: Bus | None = None) -> Envelope:
        """Publish a fault (as the raiser unless said) and wait until the alarms service settled it."""
        bus = source or self.raiser
        assert bus is not None
        envelope = bus.envelope(type, data)
        await bus.publish(envelope)
        await wait_until(self.settled, what=f"{type} settled")
        return envelope

    async def send_raw(self, envelope: Envelope) -> None:
        assert self.raiser is not None
        await self.raiser.publish(envelope)
        await wait_until(self.settled, what=f"{envelope.type} settled")

    async def events(self) -> list[dict[str, Any]]:
        """The envelopes the alarms service wrote to its outbox, in order."""
        rows = await self.pool.fetch("SELECT body FROM alarms.outbox ORDER BY id")
        return [json.loads(bytes(r["body"])) for r in rows]

    async def active(self) -> dict[tuple[str, str], alarm_store.StoredAlarm]:
        return {(s.alarm.alarm_id, s.alarm.entity_instance_id): s for s in await self.service.store.active(self.pool)}

    def dead_letters(self) -> list[OutgoingMessage]:
        return [m for m in self.broker.unrouted if m.subject.startswith("roost.dlq.")]


@pytest.fixture
async def site(pool: asyncpg.Pool) -> AsyncIterator[Site]:
    s = Site(pool)
    await s.start()
    yield s
    await s.service.stop()
    for bus in s.buses:
        await bus.close()


def fault(alarm_id: str, entity: str, severity: str, reason: str = "") -> dict[str, Any]:
    return {"alarm_id": alarm_id, "entity_instance_id": entity, "severity": severity, "reason_text": reason}


async def test_a_set_raises_records_and_announces(site: Site) -> None:
    sub, _ = await webhooks.create_subscription(site.pool, "http://127.0.0.1:9/hook")
    sent = await site.send("roost.fault.set", fault("950.003", "host=controller-0.network=mgmt", "major",
                                                    "Heartbeat lost on mgmt"))
    active = await site.active()
    stored = active[("950.003", "host=controller-0.network=mgmt")]
    assert stored.owner == "roost/inventory" and stored.version == 1
    assert stored.alarm.entity_type_id == "host.network" and stored.alarm.severity.value == "major"
    [event] = await site.events()
    assert event["type"] == "roost.alarm.raised" and event["source"] == "roost/alarms"
    assert event["subject"] == f"alarm/{stored.alarm.uuid}"
    assert event["correlationid"] == sent.correlationid and event["causationid"] == sent.id
    assert event["data"]["entity_id"] == str(stored.alarm.uuid) and event["data"]["version"] == 1
    assert event["data"]["alarm"]["reason_text"] == "Heartbeat lost on mgmt"
    assert event["data"]["alarm"]["alarm_state"] == "set"
    [record] = await site.service.store.history(site.pool)
    assert (record.state, record.change, record.alarm_uuid) == ("set", "raised", stored.alarm.uuid)
    # the deliveries are made by the dispatcher's fan-out, after the commit
    await wait_until(lambda: site.pool.fetchval("SELECT count(*) FROM alarms.webhook_deliveries"),
                     what="the raise fanned out to the subscriber")
    queued = await site.pool.fetch("SELECT subscription_id, event_type FROM alarms.webhook_deliveries")
    assert [(str(r["subscription_id"]), r["event_type"]) for r in queued] == [(sub.id, "alarm.raised")]


async def test_a_re_set_keeps_the_uuid_and_records_the_change(site: Site) -> None:
    await site.send("roost.fault.set", fault("950.006", "host=compute-1", "minor", "slow"))
    first = (await site.active())[("950.006", "host=compute-1")]
    await site.send("roost.fault.set", fault("950.006", "host=compute-1", "minor", "slow"))
    assert len(await site.events()) == 1, "the same set again changes nothing and announces nothing"
    assert len(await site.service.store.history(site.pool)) == 1

    await site.send("roost.fault.set", fault("950.006", "host=compute-1", "major", "slower"))
    second = (await site.active())[("950.006", "host=compute-1")]
    assert second.alarm.uuid == first.alarm.uuid and second.version == 2
    assert second.alarm.created_at == first.alarm.created_at
    changed = (await site.events())[-1]
    assert changed["type"] == "roost.alarm.changed" and changed["data"]["version"] == 2
    assert changed["data"]["changes"] == [{"field": "severity", "old": "minor", "new": "major"},
                                          {"field": "reason_text", "old": "slow", "new": "slower"}]
    newest = (await site.service.store.history(site.pool, alarm_uuid=first.alarm.uuid))[0]
    assert newest.change == "changed" and newest.severity == "major" and newest.changes[0]["old"] == "minor"


async def test_an_exact_clear_never_touches_a_longer_name(site: Site) -> None:
    for host in ("controller-1", "controller-10"):
        await site.send("roost.fault.set", fault("950.002", f"host={host}", "critical"))
    await site.send("roost.fault.clear", {"alarm_id": "950.002", "entity_instance_id": "host=controller-1"})
    assert list(await site.active()) == [("950.002", "host=controller-10")]
    cleared = (await site.events())[-1]
    assert cleared["type"] == "roost.alarm.cleared" and cleared["data"]["version"] == 2
    assert cleared["data"]["alarm"]["alarm_state"] == "clear" and cleared["data"]["cause"] == "cleared"
    assert cleared["data"]["alarm"]["entity_instance_id"] == "host=controller-1"
    assert [h.change for h in await site.service.store.history(site.pool)] == ["cleared", "raised", "raised"]


async def test_a_prefix_clear_takes_the_entity_and_its_children_only_when_asked(site: Site) -> None:
    for entity in ("host=controller-1", "host=controller-1.network=mgmt", "host=controller-1.network=oam",
                   "host=controller-10.network=mgmt"):
        alarm_id = "950.002" if entity.count("=") == 1 else "950.003"
        await site.send("roost.fault.set", fault(alarm_id, entity, "critical" if alarm_id == "950.002" else "major"))
    await site.send("roost.fault.clear", {"entity_instance_id": "host=controller-1.network=mgmt"})
    assert ("950.003", "host=controller-1.network=mgmt") not in await site.active()
    await site.send("roost.fault.clear", {"alarm_id": "950.003", "entity_instance_id": "host=controller-1"})
    assert len(await site.active()) == 3, "exact: no 950.003 on host=controller-1 itself"
    await site.send("roost.fault.clear", {"entity_instance_id": "host=controller-1", "prefix": True})
    assert list(await site.active()) == [("950.003", "host=controller-10.network=mgmt")]


async def test_a_reassertion_clears_what_its_owner_no_longer_has(site: Site) -> None:
    heartbeat = await site.bus("roost/heartbeat")
    await site.send("roost.fault.set", fault("950.003", "host=controller-0.network=mgmt", "major"))
    await site.send("roost.fault.set", fault("950.003", "host=controller-0.network=oam", "major"))
    await site.send("roost.fault.set", fault("950.003", "host=compute-0.network=mgmt", "major"))
    await site.send("roost.fault.set", fault("950.002", "host=controller-0", "critical"), source=heartbeat)

    await site.send("roost.fault.reassert", {"scope": "host=controller-0", "alarms": [
        fault("950.003", "host=controller-0.network=oam", "major"),
        fault("950.004", "host=controller-0", "major", "BMC unreachable")]})
    active = await site.active()
    assert set(active) == {("950.003", "host=controller-0.network=oam"), ("950.004", "host=controller-0"),
                           ("950.003", "host=compute-0.network=mgmt"), ("950.002", "host=controller-0")}, \
        "mgmt cleared; outside the scope and other owners' alarms stay"
    assert active[("950.002", "host=controller-0")].owner == "roost/heartbeat"
    types = [e["type"] for e in await site.events()][-2:]
    assert sorted(types) == ["roost.alarm.cleared", "roost.alarm.raised"]
    cleared = [e for e in await site.events() if e["type"] == "roost.alarm.cleared"]
    assert [c["data"]["cause"] for c in cleared] == ["reasserted"]

    await site.send("roost.fault.reassert", {"alarms": []})
    assert set(await site.active()) == {("950.002", "host=controller-0")}, "everything inventory had is gone"


async def test_a_duplicate_delivery_is_applied_once(site: Site) -> None:
    assert site.raiser is not None
    envelope = site.raiser.envelope("roost.fault.set", fault("950.005", "host=storage-0", "major"))
    await site.send_raw(envelope)
    await site.send_raw(envelope)
    await site.send("roost.fault.clear", {"entity_instance_id": "host=storage-0"})
    await site.send_raw(envelope)
    assert await site.active() == {}, "the redelivered set did not raise the alarm again"
    assert [e["type"] for e in await site.events()] == ["roost.alarm.raised", "roost.alarm.cleared"]


@pytest.mark.parametrize(("data", "reason"), [
    (fault("999.999", "host=a", "major"), "unknown alarm id '999.999'"),
    (fault("950.001", "host=a", "critical"), "950.001 may be raised as warning, not critical"),
    (fault("950.001", "host=a..b", "warning"), "stray dot"),
    (fault("950.001", "controller-0", "warning"), "is not key=value"),
    (fault("950.501", "system=roost", "warning"), "customer log, not an alarm"),
    (fault("950.001", "host=a", "warning", "x" * 256), "reason_text"),
    (fault("950.001", "host=a", "fatal"), "severity"),
])
async def test_invalid_input_is_dead_lettered_with_the_reason(site: Site, data: dict[str, Any], reason: str) -> None:
    await site.send_raw(Envelope(type="roost.fault.set", source="roost/inventory", data=data))
    [dead] = site.dead_letters()
    assert reason in dead.headers[H_DLQ_REASON]
    assert await site.active() == {} and await site.events() == []
    assert await site.pool.fetchval("SELECT count(*) FROM alarms.inbox") == 0, "a replay is applied afresh"


async def test_a_reassertion_outside_its_scope_is_refused_whole(site: Site) -> None:
    await site.send("roost.fault.set", fault("950.003", "host=controller-0.network=mgmt", "major"))
    await site.send("roost.fault.reassert", {"scope": "host=controller-0", "alarms": [
        fault("950.002", "host=controller-1", "critical")]})
    [dead] = site.dead_letters()
    assert "outside the re-asserted scope host=controller-0" in dead.headers[H_DLQ_REASON]
    assert list(await site.active()) == [("950.003", "host=controller-0.network=mgmt")], "nothing applied"


async def test_racing_sets_of_one_alarm_share_one_row(site: Site) -> None:
    store = site.service.store

    async def set_(severity: str) -> alarm_store.Applied:
        async with site.pool.acquire() as conn, conn.transaction():
            return await store.set(conn, SetRequest(alarm_id="950.006", entity_instance_id="host=compute-2",
                                                    severity=severity), Origin("roost/inventory"))

    for _ in range(5):
        results = await asyncio.gather(set_("major"), set_("minor"))
        assert all(r.outcome.alarm.uuid == results[0].outcome.alarm.uuid for r in results)
        async with site.pool.acquire() as conn, conn.transaction():
            await store.clear_entity(conn, "host=compute-2", Origin("roost/inventory"))
    changes = [h.change for h in reversed(await store.history(site.pool))]
    assert changes == ["raised", "changed", "cleared"] * 5


async def test_deleting_a_host_clears_its_alarms(site: Site) -> None:
    await site.send("roost.fault.set", fault("950.002", "host=compute-3", "critical"))
    await site.send("roost.fault.set", fault("950.003", "host=compute-3.network=mgmt", "major"))
    await site.send("roost.fault.set", fault("950.002", "host=compute-30", "critical"))
    inventory = site.raiser
    assert inventory is not None
    deleted = inventory.envelope("roost.host.deleted", {"entity_id": "2b0d8a0e-0000-4000-8000-000000000003",
                                                        "version": 7, "hostname": "compute-3",
                                                        "personality": "worker"})
    for _ in range(2):          # a redelivered event clears nothing more and records nothing twice
        await inventory.publish(deleted)
        await wait_until(lambda: not site.broker.groups[(GROUP, "roost.host.deleted")].pending,
                         what="host deletion settled")
    assert list(await site.active()) == [("950.002", "host=compute-30")]
    cleared = [e["data"] for e in await site.events() if e["type"] == "roost.alarm.cleared"]
    assert sorted(c["alarm"]["entity_instance_id"] for c in cleared) == ["host=compute-3",
                                                                         "host=compute-3.network=mgmt"]
    assert {c.get("cause") for c in cleared} == {"entity_deleted"}


async def test_starlingx_alarms_and_customer_logs(site: Site) -> None:
    await site.send("roost.fault.set", fault("100.101", "host=controller-0", "critical", "Platform CPU 95%"))
    await site.send("roost.fault.set", fault("200.010", "host=controller-1", "warning", "BMC access not provisioned"))
    await site.send("roost.fault.set", {**fault("200.001", "host=controller-1", "warning", "locked"),
                                        "proposed_repair_action": "Unlock host after maintenance."})
    active = await site.active()
    assert set(active) == {("100.101", "host=controller-0"), ("200.010", "host=controller-1"),
                           ("200.001", "host=controller-1")}
    assert active[("200.001", "host=controller-1")].alarm.proposed_repair_action == "Unlock host after maintenance."
    assert active[("200.001", "host=controller-1")].alarm.inhibit_alarms is True
    await site.send("roost.fault.set", fault("100.101", "host=controller-0", "minor"))
    [dead] = site.dead_letters()
    assert "100.101 may be raised as critical, major, not minor" in dead.headers[H_DLQ_REASON]

    await site.send("roost.fault.log", {"log_id": "950.503", "entity_instance_id": "host=controller-1",
                                        "severity": "warning", "reason_text": "admin locked controller-1: ok"})
    [logged] = [e for e in await site.events() if e["type"] == "roost.alarm.logged"]
    assert logged["data"]["log"]["event_log_id"] == "950.503" and logged["data"]["version"] == 1
    [record] = await site.service.store.history(site.pool, event_log_id="950.503")
    assert record.state == "log" and record.reason_text == "admin locked controller-1: ok"


async def test_history_is_kept_for_the_retention_only(site: Site) -> None:
    await site.send("roost.fault.set", fault("950.002", "host=compute-4", "critical"))
    await site.send("roost.fault.clear", {"entity_instance_id": "host=compute-4"})
    await site.pool.execute("UPDATE alarms.event_log SET recorded_at = now() - interval '31 days' "
                            "WHERE change = 'raised'")
    assert await site.service.purge_history() == 1
    assert [h.change for h in await site.service.store.history(site.pool)] == ["cleared"]


async def test_the_history_retention_is_a_setting(pool: asyncpg.Pool) -> None:
    site = Site(pool)
    await site.start(alarm_history_retention_days=60)
    try:
        await site.send("roost.fault.set", fault("950.002", "host=compute-5", "critical"))
        await site.pool.execute("UPDATE alarms.event_log SET recorded_at = now() - interval '31 days'")
        assert await site.service.purge_history() == 0, "31 days is within ROOST_ALARM_HISTORY_RETENTION_DAYS=60"
        await site.pool.execute("UPDATE alarms.event_log SET recorded_at = now() - interval '61 days'")
        assert await site.service.purge_history() == 1
    finally:
        await site.service.stop()
        for bus in site.buses:
            await bus.close()


async def test_operator_suppression_is_recorded_per_alarm_id(site: Site) -> None:
    store = site.service.store
    await store.set_suppressed(site.pool, "950.003", True, by="operator")
    assert await store.suppressed_ids(site.pool) == {"950.003"}
    await site.send("roost.fault.set", fault("950.003", "host=compute-5.network=mgmt", "major"))
    assert ("950.003", "host=compute-5.network=mgmt") in await site.active(), "still active and recorded"
    await store.set_suppressed(site.pool, "950.003", False, by="operator")
    assert await store.suppressed_ids(site.pool) == frozenset()


def test_default_catalogues_add_the_configured_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    paths = default_catalogue_paths({CATALOGUES_ENV: f"{STARLINGX}{os.pathsep}{missing}"})
    assert paths == [ROOST_CATALOGUE, STARLINGX]
    assert default_catalogue_paths({}) == [ROOST_CATALOGUE]


async def command(site: Site, type: str, data: dict[str, Any], *, role: str = "admin") -> CommandReply:
    client = await site.bus("roost/cli")
    token = site.auth.issue(f"{role}-user", role)
    return await client.request(Envelope.command(type, data, source="roost/cli"), token=token, timeout=10)


async def test_operators_list_show_and_summarise_with_suppression_and_masking(site: Site) -> None:
    await site.send("roost.fault.set", fault("950.002", "host=compute-6", "critical"))
    await site.send("roost.fault.set", fault("950.003", "host=compute-7.network=mgmt", "major"))
    await site.send("roost.fault.set", fault("950.006", "host=compute-7", "minor"))

    listed = await command(site, "roost.cmd.alarm.list", {}, role="reader")
    assert listed.status is ReplyStatus.COMPLETED, listed
    assert [(i["alarm_id"], i["severity"]) for i in listed.result["items"]] == [
        ("950.002", "critical"), ("950.003", "major"), ("950.006", "minor")]
    uuid = listed.result["items"][1]["uuid"]
    shown = await command(site, "roost.cmd.alarm.show", {"uuid": uuid}, role="reader")
    assert shown.result["entity_instance_id"] == "host=compute-7.network=mgmt" and shown.result["version"] == 1
    assert shown.result["owner"] == "roost/inventory" and shown.result["masked"] is False
    summary = await command(site, "roost.cmd.alarm.summary", {}, role="reader")
    assert summary.result == {"critical": 1, "major": 1, "minor": 1, "warnings": 0, "status": "critical"}

    denied = await command(site, "roost.cmd.alarm.suppress", {"alarm_id": "950.003"}, role="reader")
    assert denied.status is ReplyStatus.REJECTED
    done = await command(site, "roost.cmd.alarm.suppress", {"alarm_id": "950.003"})
    assert done.result == {"alarm_id": "950.003", "suppression_status": "suppressed"}
    hidden = await command(site, "roost.cmd.alarm.list", {}, role="reader")
    assert [i["alarm_id"] for i in hidden.result["items"]] == ["950.002", "950.006"]
    shown_all = await command(site, "roost.cmd.alarm.list", {"include_suppress": True}, role="reader")
    assert [i["suppression_status"] for i in shown_all.result["items"]] == ["unsuppressed", "suppressed",
                                                                           "unsuppressed"]
    [log] = await site.service.store.history(site.pool, event_log_id="950.502")
    assert log.reason_text == "admin-user: suppressed alarm 950.003: ok"
    assert log.entity_instance_id == "system=roost.alarm=950.003"
    await command(site, "roost.cmd.alarm.unsuppress", {"alarm_id": "950.003"})

    # host locked (950.001 inhibits) masks the suppressible alarms of host=compute-7 and its children
    await site.send("roost.fault.set", fault("950.001", "host=compute-7", "warning"))
    masked = await command(site, "roost.cmd.alarm.list", {"entity_prefix": "host=compute-7"}, role="reader")
    visible = {i["alarm_id"] for i in masked.result["items"]}
    assert "950.001" in visible and "950.003" not in visible
    every = await command(site, "roost.cmd.alarm.list", {"entity_prefix": "host=compute-7", "include_masked": True},
                          role="reader")
    assert {i["alarm_id"]: i["masked"] for i in every.result["items"]}["950.003"] is True

    bad = await command(site, "roost.cmd.alarm.suppress", {"alarm_id": "999.999"})
    assert bad.status is ReplyStatus.REJECTED and "unknown alarm id" in (bad.reason or "")


async def test_an_operator_clears_an_alarm_by_uuid_and_it_is_logged(site: Site) -> None:
    await site.send("roost.fault.set", fault("950.002", "host=compute-8", "critical"))
    [stored] = (await site.active()).values()
    reply = await command(site, "roost.cmd.alarm.clear", {"uuid": str(stored.alarm.uuid)})
    assert reply.result == {"cleared": True}
    assert await site.active() == {}
    cleared = [e for e in await site.events() if e["type"] == "roost.alarm.cleared"]
    assert [c["data"]["cause"] for c in cleared] == ["operator"]
    assert cleared[0]["principal"]["name"] == "admin-user"
    [log] = await site.service.store.history(site.pool, event_log_id="950.501")
    assert log.reason_text == "admin-user: cleared alarm 950.002 on host=compute-8: ok"
    again = await command(site, "roost.cmd.alarm.clear", {"uuid": str(stored.alarm.uuid)})
    assert again.result == {"cleared": False}
    nonsense = await command(site, "roost.cmd.alarm.show", {"uuid": "not-a-uuid"}, role="reader")
    assert nonsense.status is ReplyStatus.REJECTED and "not an alarm uuid" in (nonsense.reason or "")


def sample(name: str, **labels: str) -> float:
    return PROMETHEUS.get_sample_value(name, labels) or 0.0


async def test_metrics_count_what_committed_and_the_active_alarms(site: Site) -> None:
    before = {"raised": sample("roost_alarm_sets_total", change="raised"),
              "changed": sample("roost_alarm_sets_total", change="changed"),
              "reasserted": sample("roost_alarm_clears_total", cause="reasserted"),
              "deleted": sample("roost_alarm_clears_total", cause="entity_deleted")}
    await site.send("roost.fault.set", fault("950.006", "host=compute-9", "minor"))
    await site.send("roost.fault.set", fault("950.006", "host=compute-9", "minor"))
    await site.send("roost.fault.set", fault("950.006", "host=compute-9", "major"))
    await site.send("roost.fault.set", fault("950.002", "host=compute-9", "critical"))
    await site.send("roost.fault.set", fault("999.999", "host=compute-9", "critical"))
    await site.service.refresh_metrics()
    assert sample("roost_alarms_active", severity="major") == 1
    assert sample("roost_alarms_active", severity="critical") == 1
    assert sample("roost_alarms_active", severity="warning") == 0
    await site.send("roost.fault.reassert", {"scope": "host=compute-9", "alarms": [
        fault("950.002", "host=compute-9", "critical")]})
    await site.service.host_deleted("compute-9")
    assert sample("roost_alarm_sets_total", change="raised") - before["raised"] == 2
    assert sample("roost_alarm_sets_total", change="changed") - before["changed"] == 1
    assert sample("roost_alarm_clears_total", cause="reasserted") - before["reasserted"] == 1
    assert sample("roost_alarm_clears_total", cause="entity_deleted") - before["deleted"] == 1
    await site.service.refresh_metrics()
    assert sample("roost_alarms_active", severity="critical") == 0


async def test_the_outbox_relay_publishes_the_alarm_events_in_order(site: Site) -> None:
    relay_bus = await site.bus("roost/alarms")
    relay = OutboxRelay(site.pool, relay_bus.transport, "alarms")
    task = asyncio.create_task(relay.run())
    seen: list[tuple[str, int]] = []

    async def watch(m: Message) -> None:
        seen.append((m.envelope.type, m.envelope.data["version"]))

    watcher = await site.bus("roost/test")
    await watcher.subscribe("roost.alarm.>", "test-watch", watch)
    try:
        await site.send("roost.fault.set", fault("950.006", "host=compute-11", "minor"))
        await site.send("roost.fault.set", fault("950.006", "host=compute-11", "major"))
        await site.send("roost.fault.clear", {"alarm_id": "950.006", "entity_instance_id": "host=compute-11"})
        await wait_until(lambda: len(seen) == 3, what="three alarm events published")
        assert seen == [("roost.alarm.raised", 1), ("roost.alarm.changed", 2), ("roost.alarm.cleared", 3)]
    finally:
        await relay.stop(flush=False, timeout=5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_two_replicas_apply_racing_and_duplicated_sets_once_each(site: Site) -> None:
    other = AlarmsService([ROOST_CATALOGUE])
    await other.start(ServiceContext("alarms", load_settings(), site.pool, await site.bus("roost/alarms"),
                                     Outbox("alarms")))
    try:
        assert site.raiser is not None
        envelopes = [site.raiser.envelope("roost.fault.set", fault("950.006", "host=compute-12",
                                                                  "major" if i % 2 else "minor", f"reading {i}"))
                     for i in range(40)]
        for envelope in envelopes + envelopes[::4]:
            await site.raiser.publish(envelope)
        await wait_until(site.settled, what="every set settled by one of the two replicas")
    finally:
        await other.stop()
    assert list(await site.active()) == [("950.006", "host=compute-12")]
    versions = sorted(e["data"]["version"] for e in await site.events())
    assert versions == list(range(1, 41)), "every distinct set wrote once, versions without gap or repeat"
    assert len(await site.service.store.history(site.pool, limit=1000)) == 40
    assert await site.pool.fetchval("SELECT count(*) FROM alarms.inbox") == 40


async def test_the_event_log_pages_and_filters_alarms_and_logs(site: Site) -> None:
    for i in range(3):
        await site.send("roost.fault.set", fault("950.006", "host=compute-13", "minor", f"reading {i}"))
    await site.send("roost.fault.clear", {"entity_instance_id": "host=compute-13"})
    await site.send("roost.fault.set", fault("950.002", "host=compute-130", "critical"))
    await site.send("roost.fault.log", {"log_id": "950.503", "entity_instance_id": "host=compute-13",
                                        "severity": "warning", "reason_text": "admin locked compute-13: ok"})

    first = await command(site, "roost.cmd.alarm.history", {"limit": 4, "entity_prefix": "host=compute-13"},
                          role="reader")
    assert first.status is ReplyStatus.COMPLETED, first
    assert [(i["state"], i["change"]) for i in first.result["items"]] == [
        ("log", "logged"), ("clear", "cleared"), ("set", "changed"), ("set", "changed")]
    assert first.result["items"][2]["changes"] == [{"field": "reason_text", "old": "reading 1", "new": "reading 2"}]
    assert first.result["items"][1]["cause"] == "cleared" and first.result["items"][1]["version"] == 4
    second = await command(site, "roost.cmd.alarm.history", {"limit": 4, "entity_prefix": "host=compute-13",
                                                            "marker": first.result["next_marker"]}, role="reader")
    assert [i["change"] for i in second.result["items"]] == ["raised"] and second.result["next_marker"] is None

    logs = await command(site, "roost.cmd.alarm.history", {"alarms": False}, role="reader")
    assert [i["event_log_id"] for i in logs.result["items"]] == ["950.503"]
    alarms = await command(site, "roost.cmd.alarm.history", {"logs": False, "event_log_id": "950.002"},
                           role="reader")
    assert [i["entity_instance_id"] for i in alarms.result["items"]] == ["host=compute-130"]

    await command(site, "roost.cmd.alarm.suppress", {"alarm_id": "950.006"})
    hidden = await command(site, "roost.cmd.alarm.history", {"entity_prefix": "host=compute-13"}, role="reader")
    assert [i["event_log_id"] for i in hidden.result["items"]] == ["950.503"]
    shown = await command(site, "roost.cmd.alarm.history", {"entity_prefix": "host=compute-13",
                                                           "include_suppress": True}, role="reader")
    assert len(shown.result["items"]) == 5


async def test_a_failing_webhook_subscriber_raises_its_alarm_and_recovery_clears_it(site: Site) -> None:
    await failing_subscriber_alarm_raised_and_cleared(site)


async def test_the_webhook_dispatcher_in_a_process_of_its_own_relays_hooks_and_metrics(pool: asyncpg.Pool) -> None:
    """``dispatcher="process"``: the same behaviour, the sending done by a supervised child process."""
    from services.alarms.webhooks.worker import DispatcherProcess

    s = Site(pool)
    s.service = AlarmsService([ROOST_CATALOGUE, STARLINGX], dispatcher="process")
    await s.start()
    try:
        child = s.service._dispatcher
        assert isinstance(child, DispatcherProcess) and child.pid is not None and child.pid != os.getpid()
        dead_before = PROMETHEUS.get_sample_value("roost_webhook_deliveries_total", {"outcome": "dead_letter"}) or 0
        await failing_subscriber_alarm_raised_and_cleared(s)
        # the child's observations reach this process's registry (what /metrics serves)
        await wait_until(lambda: (PROMETHEUS.get_sample_value("roost_webhook_deliveries_total",
                                                              {"outcome": "dead_letter"}) or 0) > dead_before,
                         what="the child's dead letter counted here")
        first = child.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)                 # a crash: the service starts it again
        await wait_until(lambda: child.starts == 2 and child.pid not in (None, first), what="the child restarted")
    finally:
        await s.service.stop()
        for bus in s.buses:
            await bus.close()
    assert child.pid is None and child.starts == 2


async def failing_subscriber_alarm_raised_and_cleared(site: Site) -> None:
    from tests.support.http_receiver import HttpReceiver, Reply, Request

    answer = {"status": 400}

    async def receiver_handler(request: Request) -> Reply:
        return Reply(status=answer["status"])

    receiver = await HttpReceiver(receiver_handler).start()
    try:
        subscription, _secret = await webhooks.create_subscription(site.pool, receiver.url("/hook"))
        await site.send("roost.fault.set", fault("950.004", "host=worker-3", "major", "BMC silent"))
        failing = ("950.201", f"webhook={subscription.id}")

        async def failing_is_active() -> bool:
            return failing in await site.active()

        # The dispatcher dead-letters the 400, the subscription turns failing, the hook raises 950.201.
        await wait_until(failing_is_active, what="a subscriber answering 400 has its alarm active")

        answer["status"] = 200
        replayed = 0

        async def replayed_and_recovered() -> bool:
            # Replay until nothing is dead-lettered any more: the notification of 950.201 itself also went
            # to this subscriber and may have been dead-lettered after an earlier replay.  By the operator's
            # command, what `roost webhook replay` sends.
            nonlocal replayed
            reply = await command(site, "roost.cmd.alarm.webhook.replay", {"id": subscription.id})
            assert reply.status is ReplyStatus.COMPLETED, reply
            replayed += reply.result["replayed"]
            return not await failing_is_active()

        await wait_until(replayed_and_recovered, what="the alarm cleared once deliveries succeed again")
        assert replayed >= 1
    finally:
        await receiver.stop()
