"""The dcsync service with subcloud agents, on real PostgreSQL and the in-memory bus, on a small
keystone-shaped schema (the real keystone and glance schemas: test_dcsync_keystone.py): join, stream,
deletes, an offline subcloud catching up, audits repairing local edits, duplicates, mass silence, missing
triggers, join conflicts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import asyncpg
import pytest

from schemas import dcsync as msg
from schemas.envelope import Role, utcnow
from services.core.bus.bus import Reject
from services.dcsync import store
from services.dcsync.agent import command_subject, heartbeat_subject
from tests.support.dcsync_site import DcSite, dc_site, mini_db, mini_spec
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres


@pytest.fixture
async def site() -> AsyncIterator[DcSite]:
    async with dc_site(mini_spec(), mini_db) as s:
        yield s


async def _user(central: asyncpg.Pool, uid: str, name: str, password: str = "hash") -> None:
    async with central.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO \"user\" (id, enabled) VALUES ($1, true)", uid)
        lid = await conn.fetchval("INSERT INTO local_user (user_id, name) VALUES ($1, $2) RETURNING id", uid, name)
        await conn.execute("INSERT INTO password (local_user_id, password_hash) VALUES ($1, $2)", lid, password)


async def _rows(pool: asyncpg.Pool, table: str) -> list[dict[str, object]]:
    cols = {"user": "id, enabled, extra", "local_user": "id, user_id, name",
            "password": "id, local_user_id, password_hash", "project": "id, name, domain_id, enabled",
            "revocation_event": "id, user_id"}[table]
    return [dict(r) for r in await pool.fetch(f'SELECT {cols} FROM "{table}" ORDER BY 1')]


async def _same(site: DcSite, name: str, tables: tuple[str, ...] = ("user", "local_user", "password")) -> None:
    sc = site.subclouds[name]

    async def equal() -> bool:
        return all([await _rows(site.central, t) == await _rows(sc.pool, t) for t in tables])
    await wait_until(equal, timeout=30, what=f"{name} has the controller's rows")


async def test_join_stream_delete(site: DcSite) -> None:
    await _user(site.central, "u1", "alice")
    await site.central.execute("INSERT INTO project VALUES ('p1', 'admin', 'default', true)")
    await site.add("sc1")
    shown = await site.wait_status("sc1")
    assert shown["join_state"] == "joined" and shown["availability"] == "online"
    await _same(site, "sc1", ("project", "user", "local_user", "password"))
    # a change streams; a change to a table that is not synced goes nowhere
    await _user(site.central, "u2", "bob")
    await site.central.execute("INSERT INTO unsynced VALUES (1, 'local matter')")
    await _same(site, "sc1")
    assert await site.subclouds["sc1"].pool.fetchval("SELECT count(*) FROM unsynced") == 0
    # a delete propagates (with its cascade)
    await site.central.execute("DELETE FROM \"user\" WHERE id = 'u1'")
    await _same(site, "sc1")
    assert await site.subclouds["sc1"].pool.fetchval("SELECT count(*) FROM local_user") == 1
    await site.wait_status("sc1")
    events = await site.outbox("roost.subcloud.state_changed")
    versions = [e["data"]["version"] for e in events]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)


async def test_offline_subcloud_catches_up(site: DcSite) -> None:
    sc = await site.add("sc1")
    await site.wait_status("sc1")
    sc.served.beating = False        # the agent falls silent ...
    await wait_until(lambda: _availability(site, "sc1", "offline"), timeout=30, what="sc1 offline")
    assert [a["type"] for a in await site.alarms("950.101")][-1] == "roost.fault.set"
    assert (await site.show("sc1"))["sync"]["identity"] == "unknown"
    for i in range(1000):              # ... 1,000 changes meanwhile
        await site.central.execute("INSERT INTO project VALUES ($1, $2, 'default', true)", f"p{i}", f"project-{i}")
    assert await sc.pool.fetchval("SELECT count(*) FROM project") == 0
    sc.served.beating = True
    await site.wait_status("sc1")
    await site.wait_cursor_at_head("sc1")
    await _same(site, "sc1", ("project",))
    assert [a["type"] for a in await site.alarms("950.101")][-1] == "roost.fault.clear"


async def test_a_subcloud_whose_clock_is_behind_is_heard_on_our_clock(site: DcSite) -> None:
    """An edge site's clock two minutes behind (offline_after is 1.5 s here): its heartbeats carry its clock, yet
    it is online, stays so, and when it was last heard is told on the controller's clock."""
    sc = await site.start_subcloud("sc1")
    behind = timedelta(minutes=2)
    agent = sc.served

    async def beat_two_minutes_behind() -> None:
        envelope = sc.bus.envelope("roost.dcagent.heartbeat", msg.DcAgentHeartbeat(
            subcloud="sc1", cursors=await agent.sync.cursors(), fernet_fingerprint=agent.sync.fernet_fingerprint),
            time=utcnow() - behind)
        await sc.bus.publish(envelope, subject=heartbeat_subject("sc1"))

    agent.beat = beat_two_minutes_behind  # type: ignore[method-assign]
    await site.add("sc1")
    await site.wait_status("sc1")
    online_since = utcnow()

    async def heard_after(at: datetime) -> bool:
        last = (await site.show("sc1"))["last_heard_at"]
        return last is not None and datetime.fromisoformat(last) > at

    # heard on our clock (its own says two minutes ago), and after three times offline_after still online
    await wait_until(lambda: heard_after(online_since + timedelta(seconds=4.5)), timeout=30,
                     what="heartbeats heard 4.5 s after it came online")
    shown = await site.show("sc1")
    assert shown["availability"] == "online"
    assert datetime.fromisoformat(shown["last_heard_at"]) <= utcnow()
    assert not [a for a in await site.alarms("950.101") if a["type"] == "roost.fault.set"]


async def _availability(site: DcSite, name: str, value: str) -> bool:
    return bool((await site.show(name))["availability"] == value)


async def test_audit_repairs_local_edits_and_reports(site: DcSite) -> None:
    await _user(site.central, "u1", "alice")
    await _user(site.central, "u2", "bob")
    sc = await site.add("sc1")
    await site.wait_status("sc1")
    await _same(site, "sc1")
    # an in-sync audit is clean
    result = msg.AuditResult.model_validate(await site.ok("roost.cmd.subcloud.audit", {"name": "sc1"}))
    assert [r.clean for r in result.reports] == [True]
    # edits made directly at the subcloud: a change, a delete, a row of its own
    await sc.pool.execute("UPDATE password SET password_hash = 'tampered' WHERE local_user_id = 1")
    await sc.pool.execute("DELETE FROM \"user\" WHERE id = 'u2'")
    await sc.pool.execute("INSERT INTO project VALUES ('mine', 'local', 'default', true)")
    result = msg.AuditResult.model_validate(await site.ok("roost.cmd.subcloud.audit", {"name": "sc1"}))
    report = result.reports[0]
    assert not report.clean
    repaired = {r.table: r for r in report.repairs}
    assert repaired["password"].upserted == 2 and repaired["user"].upserted == 1
    assert repaired["project"].local_only == 1 and repaired["project"].deleted == 0
    await _same(site, "sc1")
    assert await sc.pool.fetchval("SELECT count(*) FROM project WHERE id = 'mine'") == 1
    raised = (await site.alarms("950.105"))[-1]
    assert raised["type"] == "roost.fault.set" and "password" in raised["reason_text"]
    # the next audit is clean (the local-only row is reported, not repaired) and clears the alarm
    result = msg.AuditResult.model_validate(await site.ok("roost.cmd.subcloud.audit", {"name": "sc1"}))
    assert result.reports[0].clean
    assert (await site.alarms("950.105"))[-1]["type"] == "roost.fault.clear"


async def test_replayed_sync_message_changes_nothing(site: DcSite) -> None:
    await _user(site.central, "u1", "alice")
    sc = await site.add("sc1")
    await site.wait_status("sc1")
    changes = await site.service.sources["identity"].tracker.changes(site.central, "main", 0, 100)
    data = msg.SyncApply(endpoint="identity", lane="main", upto=changes[-1].seq,
                         changes=[msg.ChangeWire.model_validate(c.wire()) for c in changes])
    before = await _rows(sc.pool, "password")
    await sc.pool.execute("UPDATE \"user\" SET extra = 'newer local'")   # would be overwritten by a re-apply
    bus = await site.bus("roost/replayer", site.auth.issue("replayer", Role.ADMIN, kind="service"))
    for key in ("identity:main:0-3", "another-key"):     # the same key again, and a new one: both change nothing
        reply = await bus.request(bus.envelope("roost.cmd.sync.apply", data, idempotencykey=key),
                                  subject=command_subject("sc1", "apply"), timeout=10)
        assert reply.ok, reply.reason
        assert reply.result["applied"] == 0
    assert await _rows(sc.pool, "password") == before
    assert await sc.pool.fetchval("SELECT extra FROM \"user\"") == "newer local"


async def test_revocations_travel_in_their_own_lane(site: DcSite) -> None:
    await site.add("sc1")
    await site.wait_status("sc1")
    await site.central.execute("INSERT INTO revocation_event (user_id, issued_before) VALUES ('u1', now())")
    await _same(site, "sc1", ("revocation_event",))
    await site.wait_cursor_at_head("sc1")
    shown = await site.show("sc1")
    ep = shown["endpoints"][0]
    assert ep["cursors"]["revocation"] == ep["head"]["revocation"] > 0


async def test_mass_silence_raises_one_alarm_instead_of_offline(site: DcSite) -> None:
    names = ["sc1", "sc2", "sc3", "sc4"]
    for n in names:
        await site.add(n)
    for n in names:
        await site.wait_status(n)
    for n in names[:3]:
        site.subclouds[n].served.beating = False
    await wait_until(lambda: _raised(site, "950.103"), timeout=30, what="mass silence alarm")
    for n in names:
        assert (await site.show(n))["availability"] == "online"
    assert not [a for a in await site.alarms("950.101") if a["type"] == "roost.fault.set"]
    for n in names[:3]:
        site.subclouds[n].served.beating = True
    await wait_until(lambda: _cleared(site, "950.103"), timeout=30, what="mass silence cleared")


async def _raised(site: DcSite, alarm: str) -> bool:
    faults = await site.alarms(alarm)
    return bool(faults) and faults[-1]["type"] == "roost.fault.set"


async def _cleared(site: DcSite, alarm: str) -> bool:
    faults = await site.alarms(alarm)
    return bool(faults) and faults[-1]["type"] == "roost.fault.clear"


async def test_unmanaged_is_skipped_and_audited_when_managed(site: DcSite) -> None:
    sc = await site.add("sc1")
    await site.wait_status("sc1")
    refused = await site.command("roost.cmd.subcloud.delete", {"name": "sc1"})
    assert not refused.ok and "unmanage" in (refused.reason or "")
    await site.ok("roost.cmd.subcloud.unmanage", {"name": "sc1"})
    await _user(site.central, "u1", "alice")
    await sc.pool.execute("INSERT INTO project VALUES ('p9', 'stray', 'default', true)")
    await site.wait_status("sc1", "unknown")
    assert await sc.pool.fetchval("SELECT count(*) FROM \"user\"") == 0
    # a change at the controller does not wake the worker of a subcloud that cannot stream (a thousand of them
    # woken for nothing held up the managed ones)
    wake = site.service._runtimes["sc1"].wake = _CountingEvent()
    source = site.service.sources["identity"]
    head = source.head
    await _user(site.central, "u2", "bob")
    await wait_until(lambda: source.head > head, timeout=30, what="the change seen by the service")
    await site.service._refresh_heads()     # after the refresh that saw it, and its wake-ups
    assert wake.sets == 0
    await site.ok("roost.cmd.subcloud.manage", {"name": "sc1"})
    await site.wait_status("sc1")
    await _same(site, "sc1")
    await wait_until(lambda: _audited(site, "sc1"), timeout=30, what="an audit after manage")


class _CountingEvent(asyncio.Event):
    def __init__(self) -> None:
        super().__init__()
        self.sets = 0

    def set(self) -> None:
        self.sets += 1
        super().set()


async def _audited(site: DcSite, name: str) -> bool:
    return bool((await site.show(name))["last_audit_at"])


async def test_rows_equal_at_join_count_as_the_controllers_and_the_subclouds_own_stay_its_own() -> None:
    """A subcloud that joins holding rows equal to the controller's: those came from the controller, so the
    audit of a subcloud that fell behind the change log deletes one the controller deleted meanwhile; a row only
    the subcloud has stays its own (version 0: reported, and kept under the default policy)."""
    async with dc_site(mini_spec(), mini_db, change_retention_days=1e-9) as site:
        await site.central.execute("INSERT INTO project VALUES ('p1', 'one', 'default', true), "
                                   "('p2', 'two', 'default', true)")

        async def same_and_own(pool: asyncpg.Pool) -> None:
            await pool.execute("INSERT INTO project VALUES ('p1', 'one', 'default', true), "
                               "('mine', 'local', 'default', true)")

        sc = await site.start_subcloud("sc1", prepare=same_and_own)
        await site.ok("roost.cmd.subcloud.add", {"name": "sc1"})
        await site.wait_status("sc1")
        versions = {r["id"]: r["version"] for r in await sc.pool.fetch(
            "SELECT pk->>'id' AS id, version FROM roost_dcsync.row_state WHERE tbl = 'project'")}
        assert versions["mine"] == 0
        assert versions["p1"] > 0 and versions["p2"] > 0, versions
        # offline past the change log's retention, it misses the delete of p1
        sc.served.beating = False
        await wait_until(lambda: _availability(site, "sc1", "offline"), timeout=30, what="sc1 offline")
        await site.central.execute("DELETE FROM project WHERE id = 'p1'")
        await site.central.execute("INSERT INTO project VALUES ('p3', 'three', 'default', true)")
        source = site.service.sources["identity"]
        await site.service._purge(source)
        assert source.missed({"main": 0, "revocation": 0}, await source.purged_through())
        sc.served.beating = True
        await site.wait_status("sc1")
        await site.wait_cursor_at_head("sc1")
        assert await _rows(sc.pool, "project") == [
            {"id": "mine", "name": "local", "domain_id": "default", "enabled": True},
            {"id": "p2", "name": "two", "domain_id": "default", "enabled": True},
            {"id": "p3", "name": "three", "domain_id": "default", "enabled": True}]


async def test_an_agent_that_refuses_the_adoption_still_joins() -> None:
    """An agent of an earlier roost refuses the fields it does not know (the controller is upgraded before the
    subclouds): the join completes as it did, and the rows the subcloud had keep version 0."""
    async with dc_site(mini_spec(), mini_db) as site:
        await site.central.execute("INSERT INTO project VALUES ('p1', 'one', 'default', true)")

        async def same(pool: asyncpg.Pool) -> None:
            await pool.execute("INSERT INTO project VALUES ('p1', 'one', 'default', true)")

        sc = await site.start_subcloud("sc1", prepare=same)
        real_apply = sc.served.sync.apply
        refused: list[int] = []

        async def earlier(data: msg.SyncApply, key: str) -> msg.SyncApplied:
            if data.adopt_version is not None:
                refused.append(data.adopt_version)
                raise Reject("1 validation error for SyncApply: adopt_version: Extra inputs are not permitted")
            return await real_apply(data, key)

        sc.served.sync.apply = earlier  # type: ignore[method-assign]
        await site.ok("roost.cmd.subcloud.add", {"name": "sc1"})
        await site.wait_status("sc1")
        assert refused
        assert await sc.pool.fetchval("SELECT version FROM roost_dcsync.row_state WHERE tbl = 'project'") == 0


@pytest.mark.parametrize("policy", ["adopt", "refuse"])
async def test_join_conflicts_by_policy(policy: str) -> None:
    async with dc_site(mini_spec(), mini_db) as site:
        await site.central.execute("INSERT INTO project VALUES ('central-id', 'admin', 'default', true)")

        async def own_admin(pool: asyncpg.Pool) -> None:
            await pool.execute("INSERT INTO project VALUES ('local-id', 'admin', 'default', true)")

        sc = await site.start_subcloud("sc1", prepare=own_admin)
        await site.ok("roost.cmd.subcloud.add", {"name": "sc1", "join_policy": policy})
        if policy == "adopt":
            await site.wait_status("sc1")
            assert await _rows(sc.pool, "project") == [{"id": "central-id", "name": "admin", "domain_id": "default",
                                                        "enabled": True}]
        else:
            async def failed() -> bool:
                return bool((await site.show("sc1"))["join_state"] == "join-failed")
            await wait_until(failed, timeout=30, what="join refused")
            shown = await site.show("sc1")
            assert shown["sync"]["identity"] == "out-of-sync"
            assert "local-id" in shown["endpoints"][0]["detail"]
            assert await sc.pool.fetchval("SELECT id FROM project") == "local-id"


async def test_out_of_sync_past_the_threshold_raises_950_102_and_in_sync_clears_it() -> None:
    async with dc_site(mini_spec(), mini_db, out_of_sync_alarm_after=0.5) as site:
        await site.central.execute("INSERT INTO project VALUES ('central-id', 'admin', 'default', true)")

        async def own_admin(pool: asyncpg.Pool) -> None:
            await pool.execute("INSERT INTO project VALUES ('local-id', 'admin', 'default', true)")

        sc = await site.start_subcloud("sc1", prepare=own_admin)
        await site.ok("roost.cmd.subcloud.add", {"name": "sc1", "join_policy": "refuse"})
        await wait_until(lambda: _raised(site, "950.102"), timeout=30, what="out of sync past the threshold")
        raised = (await site.alarms("950.102"))[-1]
        assert raised["entity_instance_id"] == "subcloud=sc1.endpoint=identity", raised
        await sc.pool.execute("DELETE FROM project WHERE id = 'local-id'")     # the clash is gone: the join goes on
        await site.wait_status("sc1", timeout=90)
        await wait_until(lambda: _cleared(site, "950.102"), timeout=30, what="950.102 cleared once in sync")


async def test_missing_trigger_alarmed_and_repaired_at_start() -> None:
    async def drop_after_install(pool: asyncpg.Pool) -> None:
        from services.dcsync.tables import resolve
        from services.dcsync.tracking import Tracker
        tracker = Tracker()
        async with pool.acquire() as conn:
            await tracker.install(conn, resolve(mini_spec(), await tracker.reflect(pool)), capture=True)
        await pool.execute("DROP TRIGGER roost_dcsync_track ON project")
        await pool.execute("INSERT INTO project VALUES ('p1', 'missed', 'default', true)")

    async with dc_site(mini_spec(), mini_db, prepare_central=drop_after_install) as site:
        faults = await site.alarms("950.104")
        assert [f["type"] for f in faults] == ["roost.fault.set", "roost.fault.clear"]
        assert faults[0]["entity_instance_id"] == "system=roost.table=project"
        sc = await site.add("sc1")
        await site.wait_status("sc1")
        await site.central.execute("INSERT INTO project VALUES ('p2', 'after', 'default', true)")
        await _same(site, "sc1", ("project",))
        assert await sc.pool.fetchval("SELECT count(*) FROM project") == 2


async def test_subcloud_behind_the_retention_is_brought_back_by_an_audit() -> None:
    async with dc_site(mini_spec(), mini_db, change_retention_days=1e-9) as site:
        sc = await site.add("sc1")
        await site.wait_status("sc1")
        sc.served.beating = False
        await wait_until(lambda: _availability(site, "sc1", "offline"), timeout=30, what="sc1 offline")
        for i in range(20):
            await site.central.execute("INSERT INTO project VALUES ($1, $2, 'default', true)", f"p{i}", f"n{i}")
        await site.central.execute("DELETE FROM project WHERE id = 'p3'")
        source = site.service.sources["identity"]
        await site.service._purge(source)      # the maintenance round's purge: all but the newest change go
        head = await source.tracker.head(site.central, "main")
        assert await source.tracker.oldest(site.central) == head          # the lane's newest stays
        assert (await source.purged_through())["main"] == head - 1
        assert source.missed({"main": 0, "revocation": 0}, await source.purged_through())
        sc.served.beating = True
        await site.wait_status("sc1")
        await _same(site, "sc1", ("project",))
        await site.wait_cursor_at_head("sc1")
        result = msg.AuditResult.model_validate(await site.ok("roost.cmd.subcloud.audit", {"name": "sc1"}))
        assert result.reports[0].clean


async def test_delete_clears_the_subclouds_alarms() -> None:
    async with dc_site(mini_spec(), mini_db) as site:
        sc = await site.add("sc1")
        await site.wait_status("sc1")
        sc.served.beating = False
        await wait_until(lambda: _raised(site, "950.101"), timeout=30, what="offline alarm")
        await site.ok("roost.cmd.subcloud.unmanage", {"name": "sc1"})
        await site.ok("roost.cmd.subcloud.delete", {"name": "sc1"})
        listed = await site.ok("roost.cmd.subcloud.list", {})
        assert listed["subclouds"] == []
        clears = [b["data"] for b in await site.outbox("roost.fault.clear")]
        assert any(c["entity_instance_id"] == "subcloud=sc1" and c.get("prefix") and not c.get("alarm_id")
                   for c in clears)
        assert (await site.outbox("roost.subcloud.deleted"))[-1]["data"]["entity_id"] == "sc1"
        missing = await site.command("roost.cmd.subcloud.show", {"name": "sc1"})
        assert not missing.ok and "no subcloud" in (missing.reason or "")


async def test_revocation_lane_goes_ahead_of_a_backlog() -> None:
    async with dc_site(mini_spec(), mini_db, batch_size=10) as site:
        sc = await site.add("sc1")
        await site.wait_status("sc1")
        applied: list[str] = []
        real_apply = sc.served.sync.apply

        async def recording(data: msg.SyncApply, key: str) -> msg.SyncApplied:
            result = await real_apply(data, key)
            if data.changes:
                applied.append(data.lane)
            return result

        sc.served.sync.apply = recording  # type: ignore[method-assign]
        sc.served.beating = False
        await wait_until(lambda: _availability(site, "sc1", "offline"), timeout=30, what="sc1 offline")
        for i in range(200):                 # a backlog of 20 batches ...
            await site.central.execute("INSERT INTO project VALUES ($1, $2, 'default', true)", f"p{i}", f"n{i}")
        await site.central.execute("INSERT INTO revocation_event (user_id, issued_before) VALUES ('u1', now())")
        sc.served.beating = True               # ... and the revocation that came last goes first
        await site.wait_cursor_at_head("sc1")
        assert applied[0] == "revocation" and applied.count("main") == 20, applied


async def test_the_redigest_backstop_finds_writes_a_subclouds_trigger_missed(site: DcSite) -> None:
    await site.central.execute("INSERT INTO project VALUES ('p1', 'one', 'default', true)")
    sc = await site.add("sc1")
    await site.wait_status("sc1")
    await _same(site, "sc1", ("project",))
    await sc.pool.execute("ALTER TABLE project DISABLE TRIGGER roost_dcsync_track")
    await sc.pool.execute("UPDATE project SET enabled = false WHERE id = 'p1'")     # unseen by the digests
    result = msg.AuditResult.model_validate(await site.ok("roost.cmd.subcloud.audit", {"name": "sc1"}))
    assert result.reports[0].clean            # the digests cannot know ...
    rt = site.service._runtimes["sc1"]
    rt.redigest_due = True                    # ... until the periodic re-digest (the maintenance round's flag)
    rt.wake.set()
    await _same(site, "sc1", ("project",))
    assert await sc.pool.fetchval("SELECT enabled FROM project WHERE id = 'p1'") is True
    await wait_until(lambda: _raised(site, "950.105"), timeout=30, what="the repair reported")


def _endpoint_writes(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """The fields of every endpoint row the service stores from now on."""
    writes: list[dict[str, object]] = []
    update_endpoint = store.update_endpoint

    async def counted(*args: object, **fields: object) -> store.EndpointRow:
        writes.append(fields)
        return await update_endpoint(*args, **fields)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "update_endpoint", counted)
    return writes


async def test_a_lagging_subcloud_is_stored_out_of_sync_once_not_at_every_tick(
        site: DcSite, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a subcloud lags, its status and detail stay put: a detail that counted the changes or the seconds
    was stored again at every tick for every lagging subcloud (1,000 writes a second under a fleet-wide lag)."""
    sc = await site.add("sc1")
    await site.wait_status("sc1")
    held = asyncio.Event()
    apply = sc.served.sync.apply

    async def slow_apply(data: msg.SyncApply, key: str) -> msg.SyncApplied:
        await held.wait()
        return await apply(data, key)

    monkeypatch.setattr(sc.served.sync, "apply", slow_apply)
    writes = _endpoint_writes(monkeypatch)
    ticks = 0
    tick = site.service._tick

    async def counted_tick() -> None:
        nonlocal ticks
        await tick()
        ticks += 1

    monkeypatch.setattr(site.service, "_tick", counted_tick)
    await _user(site.central, "u1", "alice")
    shown = await site.wait_status("sc1", "out-of-sync")
    detail = shown["endpoints"][0]["detail"]
    assert "behind" in detail
    stored, seen = len(writes), ticks
    await wait_until(lambda: ticks >= seen + 3, timeout=30, what="three evaluations while it lags")
    assert writes[stored:] == []
    assert (await site.show("sc1"))["endpoints"][0]["detail"] == detail
    held.set()
    await site.wait_status("sc1")
    await _same(site, "sc1")


async def test_a_steady_flow_applied_within_the_grace_keeps_a_subcloud_in_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind at every evaluation is not late: with a commit every 0.25 s and 0.4 s per apply, the subcloud is
    never at the head for twice the grace, yet no change waits longer than the grace.  It was stored out-of-sync
    (and back) over and over: at 1,000 subclouds under a steady flow, a write and an event per flap."""
    async with dc_site(mini_spec(), mini_db, lag_grace=3.0) as site:
        sc = await site.add("sc1")
        await site.wait_status("sc1")
        apply = sc.served.sync.apply

        async def slow_link(data: msg.SyncApply, key: str) -> msg.SyncApplied:
            await asyncio.sleep(0.4)
            return await apply(data, key)

        monkeypatch.setattr(sc.served.sync, "apply", slow_link)
        writes = _endpoint_writes(monkeypatch)
        for i in range(24):
            await _user(site.central, f"u{i}", f"user{i}")
            await asyncio.sleep(0.25)
        behind = site.service._runtimes["sc1"].behind_since
        assert behind and time.monotonic() - min(behind.values()) > 3.0, "behind for longer than the grace"
        await site.wait_cursor_at_head("sc1")
        assert all(w.get("sync_status") != "out-of-sync" for w in writes), writes
        assert (await site.show("sc1"))["endpoints"][0]["sync_status"] == "in-sync"
        await _same(site, "sc1")


async def test_the_agents_heartbeat_cursors_follow_its_applies_without_a_query(site: DcSite) -> None:
    sc = await site.add("sc1")
    await site.wait_status("sc1")
    await _user(site.central, "u1", "alice")
    await site.wait_cursor_at_head("sc1")
    head = (await site.show("sc1"))["endpoints"][0]["head"]
    assert (await sc.served.sync.cursors())["identity"] == head
    # read once: a cursor changed behind the agent's back (nothing but the agent moves it) is not read again
    await sc.pool.execute("UPDATE roost_dcsync.cursor SET applied_seq = 0")
    assert (await sc.served.sync.cursors())["identity"] == head
    await _user(site.central, "u2", "bob")
    await _same(site, "sc1")
    assert (await sc.served.sync.cursors())["identity"]["main"] > head["main"]
