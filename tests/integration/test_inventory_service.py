"""The inventory service on the real PostgreSQL with the in-memory bus: host commands with their replies,
agents announcing themselves, the orchestrator and heartbeat services it talks to (played here by test
servers on the bus), and what it announces (events, alarms, customer logs) through its outbox."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from schemas import heartbeat as hb
from schemas import orchestrator as orch
from schemas.envelope import ReplyStatus
from services.core.bus.bus import Message, Reject
from tests.support.inventory_site import (
    Site,
    hello,
    inventory_database,
    is_available,
    provisioned,
    running_site,
    unlocked,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres



@pytest.fixture
async def site() -> AsyncIterator[Site]:
    async with inventory_database() as pool, running_site(pool) as s:
        yield s


async def test_add_names_controllers_and_refuses_duplicates(site: Site) -> None:
    c0 = await site.ok("roost.cmd.host.add", {"personality": "controller", "mgmt_mac": "52:54:00:00:00:01"})
    c1 = await site.ok("roost.cmd.host.add", {"personality": "controller", "mgmt_mac": "52:54:00:00:00:02"})
    assert (c0["hostname"], c1["hostname"]) == ("controller-0", "controller-1")
    assert c0["node_id"] < c1["node_id"]
    assert (c0["administrative"], c0["operational"], c0["availability"]) == ("locked", "disabled", "offline")
    no_name = await site.command("roost.cmd.host.add", {"personality": "worker", "mgmt_mac": "52:54:00:00:00:03"})
    assert no_name.status is ReplyStatus.REJECTED and "hostname" in (no_name.reason or "")
    dup_mac = await site.command("roost.cmd.host.add", {"personality": "worker", "hostname": "worker-0",
                                                        "mgmt_mac": "52:54:00:00:00:01"})
    assert dup_mac.status is ReplyStatus.REJECTED and "MAC" in (dup_mac.reason or "")
    dup_name = await site.command("roost.cmd.host.add", {"personality": "worker", "hostname": "controller-0",
                                                         "mgmt_mac": "52:54:00:00:00:09"})
    assert dup_name.status is ReplyStatus.REJECTED and "hostname" in (dup_name.reason or "")
    bad = await site.command("roost.cmd.host.add", {"personality": "router", "mgmt_mac": "52:54:00:00:00:04"},
                             unchecked=True)
    assert bad.status is ReplyStatus.REJECTED and "personality" in (bad.reason or "")
    unknown = await site.command("roost.cmd.host.lock", {"host": "worker-9"})
    assert unknown.status is ReplyStatus.REJECTED and "worker-9" in (unknown.reason or "")
    reader = await site.command("roost.cmd.host.add", {"personality": "controller", "mgmt_mac": "52:54:00:00:00:05"},
                                token=site.reader)
    assert reader.status is ReplyStatus.REJECTED
    assert len((await site.ok("roost.cmd.host.list", {}))["items"]) == 2
    added = await site.outbox("roost.host.added")
    assert [e["data"]["host"]["hostname"] for e in added] == ["controller-0", "controller-1"]


async def test_an_unknown_agent_becomes_an_unprovisioned_host_that_add_adopts(site: Site) -> None:
    await site.agent_says("roost.agent.hello", "node-17", hello("node-17", "52:54:00:aa:00:17"))
    [found] = (await site.ok("roost.cmd.host.list", {}))["items"]
    assert (found["hostname"], found["personality"], found["provision"], found["agent"]) == (
        None, None, "unprovisioned", "node-17")
    assert found["availability"] == "online"
    assert [e["data"]["host"]["uuid"] for e in await site.outbox("roost.host.discovered")] == [found["uuid"]]
    refused = await site.command("roost.cmd.host.unlock", {"host": found["uuid"], "force": True})
    assert refused.status is ReplyStatus.REJECTED and "unprovisioned" in (refused.reason or "")
    await site.ok("roost.cmd.host.update", {"host": found["uuid"], "hostname": "worker-7"})
    adopted = await site.ok("roost.cmd.host.add", {"personality": "worker", "hostname": "worker-7",
                                                   "mgmt_mac": "52:54:00:AA:00:17"})
    assert adopted["uuid"] == found["uuid"] and adopted["provision"] == "provisioned"
    assert len((await site.ok("roost.cmd.host.list", {}))["items"]) == 1


async def test_an_agent_may_only_speak_for_itself(site: Site) -> None:
    await site.agent_says("roost.agent.hello", "worker-1", hello("worker-2", "52:54:00:00:01:02"),
                          subject_agent="worker-1")
    assert (await site.ok("roost.cmd.host.list", {}))["items"] == []
    assert any(m.subject == "roost.dlq.inventory" for m in site.broker.unrouted)


async def test_unlock_passes_through_intest_and_lock_without_orchestrator_says_so(site: Site) -> None:
    await provisioned(site, "controller-0", "controller", "52:54:00:00:00:01")
    controller = await unlocked(site, "controller-0")
    assert controller["active"] is True            # the bootstrap controller, until heartbeat says otherwise
    await provisioned(site, "worker-0", "worker", "52:54:00:00:00:10")
    assert (await site.ok("roost.cmd.host.hardware", {"host": "worker-0"}))["hardware"]["memory"]["total_mib"] == 16384
    worker = await unlocked(site, "worker-0")
    assert (worker["administrative"], worker["operational"]) == ("unlocked", "enabled")
    states = [(e["data"]["previous"]["availability"], e["data"]["host"]["availability"])
              for e in await site.outbox("roost.host.state_changed") if e["data"]["host"]["hostname"] == "worker-0"]
    assert ("online", "intest") in states and ("intest", "available") in states

    refused = await site.command("roost.cmd.host.lock", {"host": "controller-0", "force": True})
    assert refused.status is ReplyStatus.REJECTED and "active controller" in (refused.reason or "")

    locked = await site.ok("roost.cmd.host.lock", {"host": "worker-0"})
    assert locked["host"]["administrative"] == "locked" and locked["host"]["availability"] == "online"
    assert "no orchestrator" in locked["detail"]
    faults = [(e["type"], e["data"].get("alarm_id") or e["data"].get("log_id"), e["data"]["entity_instance_id"])
              for e in await site.outbox() if e["type"] in ("roost.fault.set", "roost.fault.clear", "roost.fault.log")]
    assert ("roost.fault.set", "950.001", "host=worker-0") in faults      # locked, after unlock cleared it
    assert ("roost.fault.clear", "950.001", "host=worker-0") in faults
    logs = [e["data"]["reason_text"] for e in await site.outbox("roost.fault.log")]
    assert any(t.startswith("ops-admin: lock worker-0: accepted") for t in logs)
    assert any("lock --force controller-0: rejected" in t for t in logs)
    nul = await site.command("roost.cmd.host.update", {"host": "worker-0", "location": "rack\x001"}, unchecked=True)
    assert nul.status is ReplyStatus.REJECTED and "NUL" in (nul.reason or "")


async def test_lock_waits_for_the_orchestrator_and_fails_cleanly_when_it_cannot_drain(site: Site) -> None:
    await provisioned(site, "controller-0", "controller", "52:54:00:00:00:01")
    await unlocked(site, "controller-0")
    await provisioned(site, "worker-0", "worker", "52:54:00:00:00:10")
    await unlocked(site, "worker-0")
    asked: list[tuple[str, str]] = []
    drainable = {"worker-0": False}

    async def orchestrator(message: Message) -> BaseModel:
        data = message.data
        assert isinstance(data, orch.HostServices)
        asked.append((message.envelope.type, data.action))
        if drainable[data.hostname]:
            return orch.HostServicesResult(done=True, detail="cordoned and drained 3 pods")
        return orch.HostServicesResult(done=False, detail="pod web-1 is protected by its disruption budget")

    await site.serve("roost.cmd.hostservices.>", "orchestrator", orchestrator)
    failed = await site.command("roost.cmd.host.lock", {"host": "worker-0"})
    assert failed.status is ReplyStatus.REJECTED and "disruption budget" in (failed.reason or "")
    host = await site.host("worker-0")
    assert (host["administrative"], host["availability"], host["task"], host["action"]) == (
        "unlocked", "available", "", "none")
    drainable["worker-0"] = True
    locked = await site.ok("roost.cmd.host.lock", {"host": "worker-0"})
    assert locked["host"]["administrative"] == "locked" and "drained 3 pods" in locked["detail"]
    assert asked[-2:] == [("roost.cmd.hostservices.disable", "lock"), ("roost.cmd.hostservices.disable", "lock")]
    await site.ok("roost.cmd.host.unlock", {"host": "worker-0"})
    await wait_until(lambda: ("roost.cmd.hostservices.enable", "unlock") in asked, what="services enabled")


async def test_power_actions_need_a_locked_host_and_a_bmc(site: Site) -> None:
    await provisioned(site, "controller-0", "controller", "52:54:00:00:00:01")
    await unlocked(site, "controller-0")
    await provisioned(site, "worker-0", "worker", "52:54:00:00:00:10")
    await unlocked(site, "worker-0")
    for verb in ("power_off", "reset", "reboot", "reinstall"):
        reply = await site.command(f"roost.cmd.host.{verb}", {"host": "worker-0"})
        assert reply.status is ReplyStatus.REJECTED and "lock" in (reply.reason or "").lower(), verb
    await site.ok("roost.cmd.host.lock", {"host": "worker-0"})
    no_bmc = await site.command("roost.cmd.host.power_off", {"host": "worker-0"})
    assert no_bmc.status is ReplyStatus.REJECTED and "BMC" in (no_bmc.reason or "")
    before = await site.host("worker-0")
    assert before["task"] == "" and before["action"] == "none"


async def test_degrade_reasons_and_heartbeat_verdicts_drive_availability(site: Site) -> None:
    await provisioned(site, "controller-0", "controller", "52:54:00:00:00:01")
    await unlocked(site, "controller-0")
    w0 = await provisioned(site, "worker-0", "worker", "52:54:00:00:00:10")
    await unlocked(site, "worker-0")
    await site.publish("roost/orchestrator", "roost.degrade.set",
                       {"host": "worker-0", "key": "k8s.kubelet", "text": "kubelet not ready"}, "roost.degrade.>")
    host = await site.host("worker-0")
    assert host["availability"] == "degraded" and host["degrade_reasons"] == ["k8s.kubelet: kubelet not ready"]
    await site.publish("roost/orchestrator", "roost.degrade.clear", {"host": "worker-0", "key": "k8s.kubelet"},
                       "roost.degrade.>")
    assert (await site.host("worker-0"))["availability"] == "available"

    def health(version: int, state: str, *down: str) -> dict[str, Any]:
        return {"entity_id": w0["uuid"], "version": version, "hostname": "worker-0", "state": state,
                "networks_down": list(down)}

    await site.publish("roost/heartbeat", "roost.heartbeat.host_health", health(1, "degraded", "oam"),
                       "roost.heartbeat.host_health")
    assert (await site.host("worker-0"))["availability"] == "degraded"
    await site.publish("roost/heartbeat", "roost.heartbeat.host_health", health(2, "failed", "mgmt", "oam"),
                       "roost.heartbeat.host_health")
    failed = await site.host("worker-0")
    assert (failed["operational"], failed["availability"]) == ("disabled", "failed")
    await site.publish("roost/heartbeat", "roost.heartbeat.host_health", health(1, "healthy"),
                       "roost.heartbeat.host_health")          # an old verdict changes nothing
    assert (await site.host("worker-0"))["availability"] == "failed"
    await site.publish("roost/heartbeat", "roost.heartbeat.host_health", health(3, "healthy"),
                       "roost.heartbeat.host_health")
    await wait_until(lambda: is_available(site, "worker-0"), what="worker-0 recovered through intest")
    faults = [(e["type"], e["data"]["alarm_id"]) for e in await site.outbox() if e["type"] in (
        "roost.fault.set", "roost.fault.clear") and e["data"]["entity_instance_id"] == "host=worker-0"]
    assert faults[-2:] == [("roost.fault.set", "950.002"), ("roost.fault.clear", "950.002")]


async def test_swact_is_carried_out_by_the_heartbeat_service(site: Site) -> None:
    c0 = await provisioned(site, "controller-0", "controller", "52:54:00:00:00:01")
    await unlocked(site, "controller-0")
    c1 = await provisioned(site, "controller-1", "controller", "52:54:00:00:00:02")
    await unlocked(site, "controller-1")
    before = await site.host("controller-0")
    nobody = await site.command("roost.cmd.host.swact", {"host": "controller-0"})
    assert nobody.status is ReplyStatus.REJECTED and "heartbeat" in (nobody.reason or "")
    assert await site.host("controller-0") == before              # a refused swact changes nothing
    standby = await site.command("roost.cmd.host.swact", {"host": "controller-1"})
    assert standby.status is ReplyStatus.REJECTED

    heartbeat = await site.bus("roost/heartbeat")

    async def swact(message: Message) -> BaseModel:
        data = message.data
        assert isinstance(data, hb.Swact)
        if data.to_host != "controller-1":
            raise Reject("wrong peer")
        await heartbeat.publish(heartbeat.envelope("roost.heartbeat.active_controller", {
            "entity_id": "controller-pair", "version": 5, "active": "controller-1", "standby": "controller-0"}))
        return hb.SwactResult(active="controller-1")

    await heartbeat.serve("roost.cmd.heartbeat.>", "heartbeat", swact)
    await site.ok("roost.cmd.host.swact", {"host": "controller-0"})
    await site.settle("roost.heartbeat.active_controller")
    assert (await site.host(c1["uuid"]))["active"] is True
    assert (await site.host(c0["uuid"]))["active"] is False
    locked = await site.ok("roost.cmd.host.lock", {"host": "controller-0"})      # the standby now
    assert locked["host"]["administrative"] == "locked"


async def test_delete_needs_a_locked_host_and_is_announced(site: Site) -> None:
    await provisioned(site, "controller-0", "controller", "52:54:00:00:00:01")
    await unlocked(site, "controller-0")
    await provisioned(site, "worker-0", "worker", "52:54:00:00:00:10")
    await unlocked(site, "worker-0")
    refused = await site.command("roost.cmd.host.delete", {"host": "worker-0"})
    assert refused.status is ReplyStatus.REJECTED and "lock" in (refused.reason or "")
    await site.ok("roost.cmd.host.lock", {"host": "worker-0"})
    deleted = await site.ok("roost.cmd.host.delete", {"host": "worker-0"})
    assert deleted["hostname"] == "worker-0"
    [event] = await site.outbox("roost.host.deleted")
    assert event["data"]["hostname"] == "worker-0" and event["data"]["entity_id"] == deleted["uuid"]
    gone = await site.command("roost.cmd.host.show", {"host": "worker-0"})
    assert gone.status is ReplyStatus.REJECTED


async def test_a_silent_agent_goes_offline_and_an_unlock_without_agent_fails_its_test(site: Site) -> None:
    await site.ok("roost.cmd.host.add", {"personality": "controller", "mgmt_mac": "52:54:00:00:00:01"})
    await site.agent_says("roost.agent.hello", "controller-0", hello("controller-0", "52:54:00:00:00:01",
                                                                     interval=0.1))
    assert (await site.host("controller-0"))["availability"] == "online"

    async def offline() -> bool:
        return (await site.host("controller-0"))["availability"] == "offline"

    await wait_until(offline, what="a silent agent marked offline")
    reply = await site.ok("roost.cmd.host.unlock", {"host": "controller-0", "force": True})
    assert reply["host"]["availability"] == "intest"

    async def failed() -> bool:
        return (await site.host("controller-0"))["availability"] == "failed"

    await wait_until(failed, what="the in-test check failed without an agent")
