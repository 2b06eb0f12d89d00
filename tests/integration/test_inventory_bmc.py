"""The inventory service driving real BMCs: the sushy-tools Redfish emulator (fake driver) behind hosts
added with BMC settings.  Power actions land seconds later and come back as state changes; the audit
raises and clears the BMC alarms; passwords are stored encrypted, never shown, and sealed for the
heartbeat service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.envelope import ReplyStatus
from services.inventory.bmc.abc import Bmc, BmcEndpoint
from services.inventory.bmc.redfish import RedfishBmc
from services.inventory.bmc.vault import FencingSealer
from tests.support.inventory_site import Site, inventory_database, provisioned, running_site, unlocked
from tests.support.sushy import FakeSystem, SushyEmulator, running_sushy
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

USER, PASSWORD = "root", "bmc-secret-Pa55"
CONTROLLER = FakeSystem("33333333-0000-4000-8000-000000000001", "controller-0", "On", ("52:54:00:10:00:01",))
WORKER = FakeSystem("33333333-0000-4000-8000-000000000002", "worker-0", "On", ("52:54:00:10:00:02",))
STORAGE = FakeSystem("33333333-0000-4000-8000-000000000003", "storage-0", "Off", ("52:54:00:10:00:03",))


@pytest.fixture(scope="module")
def sushy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SushyEmulator]:
    with running_sushy(tmp_path_factory.mktemp("sushy-inventory"), (CONTROLLER, WORKER, STORAGE),
                       credentials=(USER, PASSWORD)) as emulator:
        yield emulator


def quick_bmc(endpoint: BmcEndpoint) -> Bmc:
    return RedfishBmc(endpoint, poll_interval=0.2, graceful_timeout=15.0)


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    async with inventory_database() as pool, running_site(pool, bmc_factory=quick_bmc, power_wait=20.0,
                                                          bmc_audit_interval=3600.0) as s:
        yield s


def bmc(emulator: SushyEmulator, system: FakeSystem, password: str = PASSWORD) -> dict[str, Any]:
    return {"type": "redfish", "address": emulator.url, "username": USER, "password": password,
            "system_id": system.uuid}


async def test_power_actions_land_and_come_back_as_states(site: Site, sushy: SushyEmulator) -> None:
    await provisioned(site, "controller-0", "controller", "52:54:00:10:00:01")
    await unlocked(site, "controller-0")
    await provisioned(site, "worker-0", "worker", "52:54:00:10:00:02")
    await site.ok("roost.cmd.host.update", {"host": "worker-0", "bmc": bmc(sushy, WORKER)})   # still locked

    off = await site.ok("roost.cmd.host.power_off", {"host": "worker-0"})
    assert (off["host"]["task"], off["host"]["action"]) == ("Powering-off", "power-off")
    busy = await site.command("roost.cmd.host.power_on", {"host": "worker-0"})
    assert busy.status is ReplyStatus.REJECTED and "power-off" in (busy.reason or "")

    async def powered_off() -> bool:
        host = await site.host("worker-0")
        return host["availability"] == "power-off" and host["action"] == "none"

    await wait_until(powered_off, timeout=40.0, what="worker-0 powered off through its BMC")
    assert sushy.get(f"/redfish/v1/Systems/{WORKER.uuid}")["PowerState"] == "Off"
    refused = await site.command("roost.cmd.host.unlock", {"host": "worker-0", "force": True})
    assert refused.status is ReplyStatus.REJECTED and "power" in (refused.reason or "").lower()

    await site.ok("roost.cmd.host.power_on", {"host": "worker-0"})

    async def powered_on() -> bool:
        host = await site.host("worker-0")
        return host["power_state"] == "on" and host["action"] == "none" and host["availability"] != "power-off"

    await wait_until(powered_on, timeout=40.0, what="worker-0 powered on through its BMC")
    texts = [e["data"].get("cause", "") for e in await site.outbox("roost.host.state_changed")]
    assert any("bmc power-off" in t for t in texts)


async def test_the_audit_raises_and_clears_bmc_alarms(site: Site, sushy: SushyEmulator) -> None:
    await site.ok("roost.cmd.host.add", {"personality": "storage", "mgmt_mac": "52:54:00:10:00:03",
                                         "bmc": bmc(sushy, STORAGE, password="not-the-password")})
    await site.service.audit_bmcs()
    host = await site.host("storage-0")
    assert host["bmc"]["reachable"] is False and host["bmc"]["password_set"] is True
    sets = [e["data"] for e in await site.outbox("roost.fault.set") if e["data"]["alarm_id"] in ("950.004", "950.005")]
    assert [s["alarm_id"] for s in sets] == ["950.005"]
    entity = sets[0]["entity_instance_id"]
    assert entity.startswith("host=storage-0.bmc=")

    await site.ok("roost.cmd.host.update", {"host": "storage-0", "bmc": bmc(sushy, STORAGE)})
    await site.service.audit_bmcs()
    assert (await site.host("storage-0"))["bmc"]["reachable"] is True
    clears = [e["data"] for e in await site.outbox("roost.fault.clear") if e["data"].get("alarm_id") == "950.005"]
    assert clears and clears[-1]["entity_instance_id"] == entity
    assert (await site.host("storage-0"))["power_state"] == "off"     # what the BMC reports, folded in
    hardware = (await site.ok("roost.cmd.host.hardware", {"host": "storage-0"}))["hardware"]
    assert hardware["source"] == "redfish"                           # no agent has reported: the BMC's view
    assert [p["mac"] for p in hardware["ports"]] == ["52:54:00:10:00:03"]

    await site.ok("roost.cmd.host.update", {"host": "storage-0", "bmc": {**bmc(sushy, STORAGE),
                                                                         "address": "http://127.0.0.1:9"}})
    await site.service.audit_bmcs()
    unreachable = [e["data"] for e in await site.outbox("roost.fault.set") if e["data"]["alarm_id"] == "950.004"]
    assert unreachable and unreachable[-1]["entity_instance_id"] == "host=storage-0.bmc=127.0.0.1"


async def test_passwords_are_encrypted_never_shown_and_sealed_for_fencing(site: Site, sushy: SushyEmulator,
                                                                          tmp_path: Path) -> None:
    added = await site.ok("roost.cmd.host.add", {"personality": "controller", "mgmt_mac": "52:54:00:10:00:01",
                                                 "bmc": bmc(sushy, CONTROLLER)})
    stored = await site.pool.fetchval("SELECT bmc_password FROM inventory.hosts WHERE uuid = $1::uuid",
                                      added["uuid"])
    assert stored is not None and PASSWORD.encode() not in bytes(stored)
    everything = [str(await site.ok("roost.cmd.host.show", {"host": "controller-0"})),
                  str(await site.ok("roost.cmd.host.list", {})), str(await site.outbox())]
    assert not any(PASSWORD in text for text in everything)
    [access] = await site.outbox("roost.host.bmc_access")
    assert access["data"]["hostname"] == "controller-0" and access["data"]["sealed"]
    endpoint = FencingSealer.from_store(site.secrets).unseal(added["uuid"], access["data"]["key_id"],
                                                             access["data"]["sealed"])
    assert (endpoint.address, endpoint.username, endpoint.password.get_secret_value()) == (
        sushy.url, USER, PASSWORD)
    await site.ok("roost.cmd.host.update", {"host": "controller-0", "bmc": {"type": "none"}})
    accesses = await site.outbox("roost.host.bmc_access")
    assert accesses[-1]["data"]["sealed"] == ""
    assert (await site.host("controller-0"))["bmc"] is None


async def test_with_the_reset_policy_a_worker_that_fails_its_heartbeat_is_reset_through_its_bmc(
        sushy: SushyEmulator) -> None:
    async with inventory_database() as pool, running_site(pool, bmc_factory=quick_bmc, power_wait=20.0,
                                                          bmc_audit_interval=3600.0,
                                                          failed_host_recovery="reset") as site:
        await provisioned(site, "controller-0", "controller", "52:54:00:10:00:01")
        await unlocked(site, "controller-0")
        await provisioned(site, "worker-0", "worker", "52:54:00:10:00:02")
        await site.ok("roost.cmd.host.update", {"host": "worker-0", "bmc": bmc(sushy, WORKER)})
        worker = await unlocked(site, "worker-0")
        before = sushy.log().count("ComputerSystem.Reset")
        await site.publish("roost/heartbeat", "roost.heartbeat.host_health",
                           {"entity_id": worker["uuid"], "version": 1, "hostname": "worker-0", "state": "failed",
                            "networks_down": ["mgmt"], "reason": "silent on every network"},
                           "roost.heartbeat.host_health")

        async def reset_done() -> bool:
            host = await site.host("worker-0")
            return host["availability"] == "failed" and host["action"] == "none" and host["power_state"] == "on"

        await wait_until(reset_done, timeout=40.0, what="worker-0 reset through its BMC, still failed")
        assert sushy.log().count("ComputerSystem.Reset") > before, "a reset was posted to the BMC"
        causes = [e["data"].get("cause", "") for e in await site.outbox("roost.host.state_changed")]
        assert causes[-2:] == ["heartbeat: failed: silent on every network", "bmc reset done (ForceRestart)"], causes
        host = await site.host("worker-0")
        assert (host["administrative"], host["operational"]) == ("unlocked", "disabled")
