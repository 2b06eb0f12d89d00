"""The inventory REST API (StarlingX sysinv v1 shape) on the real PostgreSQL: the inventory service started on
the in-memory bus (no orchestrator, no heartbeat service), its router in ``create_app``, requests through
httpx's ASGI transport (and once over real HTTP).  Host agents are played by publishing their hello and
hardware report on their own subjects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from schemas import inventory as msg
from services.core.auth import InMemoryAuthenticator
from services.core.bus.bus import Bus
from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from services.core.db.migrations import migrate
from services.core.db.outbox import Outbox
from services.core.host import ServiceContext
from services.core.http import HttpServer, create_app
from services.core.secrets import SecretStore
from services.core.settings import load_settings
from services.inventory.service import MIGRATIONS, InventoryService
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres

SECRET = "s3cr3t-bmc-" + "p" * 40
GO_ENABLED_TIMEOUT = 1.0


class Api:
    def __init__(self, pool: asyncpg.Pool, service: InventoryService, client: httpx.AsyncClient, agents: Bus,
                 admin: str, reader: str, app: FastAPI) -> None:
        self.pool, self.service, self.client, self.agents, self.app = pool, service, client, agents, app
        self.admin, self.reader = admin, reader
        self.bodies: list[str] = []

    def auth(self, role: str = "reader") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin if role == 'admin' else self.reader}"}

    def _seen(self, r: httpx.Response) -> httpx.Response:
        self.bodies.append(r.text)
        return r

    async def get(self, path: str, params: Any = None, role: str = "reader") -> httpx.Response:
        return self._seen(await self.client.get(path, params=params, headers=self.auth(role)))

    async def post(self, body: Any, role: str = "admin") -> httpx.Response:
        return self._seen(await self.client.post("/v1/ihosts", json=body, headers=self.auth(role)))

    async def patch(self, ref: str, body: Any, role: str = "admin") -> httpx.Response:
        return self._seen(await self.client.patch(f"/v1/ihosts/{ref}", json=body, headers=self.auth(role)))

    async def action(self, ref: str, action: str) -> httpx.Response:
        return await self.patch(ref, [{"op": "replace", "path": "/action", "value": action}])

    async def delete(self, ref: str, role: str = "admin") -> httpx.Response:
        return self._seen(await self.client.delete(f"/v1/ihosts/{ref}", headers=self.auth(role)))

    async def host(self, ref: str) -> dict[str, Any]:
        r = await self.get(f"/v1/ihosts/{ref}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def add(self, **fields: Any) -> dict[str, Any]:
        r = await self.post(fields)
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        return body

    async def agent_hello(self, agent: str, macs: list[str]) -> None:
        envelope = self.agents.envelope("roost.agent.hello", msg.AgentHello(agent=agent, macs=macs))
        await self.agents.publish(envelope, subject=f"roost.agent.{agent}.hello")

    async def agent_inventory(self, agent: str, hardware: msg.Hardware) -> None:
        envelope = self.agents.envelope("roost.agent.inventory", msg.AgentInventory(agent=agent, hardware=hardware))
        await self.agents.publish(envelope, subject=f"roost.agent.{agent}.inventory")


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with fresh_database() as url, pool_on(url) as pool:
        await migrate(pool, "inventory", MIGRATIONS)
        await pool.execute("SELECT core.ensure_outbox_inbox('inventory')")
        auth = InMemoryAuthenticator()
        service = InventoryService(go_enabled_timeout=GO_ENABLED_TIMEOUT, lock_timeout=10.0,
                                   secrets=SecretStore(tmp_path / "secrets"))
        app = create_app("inventory", authenticator=auth, routers=service.routers())
        broker = InMemoryBroker()
        bus = Bus(InMemoryTransport(broker), source="roost/inventory", authenticator=auth)
        agents = Bus(InMemoryTransport(broker), source="roost/agent")
        await bus.connect()
        await agents.connect()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://inventory") as client:
            not_started = await client.get("/v1/ihosts", headers={"X-Auth-Token": auth.issue("early", "reader")})
            assert not_started.status_code == 503
            await service.start(ServiceContext("inventory", load_settings(), pool, bus, Outbox("inventory")))
            api = Api(pool, service, client, agents, auth.issue("admin-user", "admin"), auth.issue("ops", "reader"),
                      app)
            try:
                yield api
            finally:
                await service.stop()
                await agents.close()
                await bus.close()
            assert not any(SECRET in body for body in api.bodies), "the BMC password came back in a response"


def worker(n: int, **more: Any) -> dict[str, Any]:
    return {"hostname": f"worker-{n}", "personality": "worker", "mgmt_mac": f"52:54:00:00:01:{n:02x}", **more}


async def test_add_list_show_and_page(api: Api) -> None:
    controller = await api.add(personality="controller", mgmt_mac="52:54:00:00:00:01",
                               subfunctions=["controller", "worker"], location="rack 1",
                               addresses={"mgmt": "10.0.0.2", "oam": "192.168.1.2"})
    assert controller["hostname"] == "controller-0", "controllers are named when no hostname is given"
    assert controller["subfunctions"] == "controller,worker" and controller["location"] == {"locn": "rack 1"}
    assert controller["mgmt_ip"] == "10.0.0.2" and controller["addresses"]["oam"] == "192.168.1.2"
    assert (controller["administrative"], controller["operational"], controller["availability"]) == (
        "locked", "disabled", "offline")
    assert controller["invprovision"] == "provisioned" and controller["inv_state"] == ""
    assert controller["bm_type"] == "none" and controller["bmc"] is None and controller["active"] is False
    w1 = await api.add(**worker(1, labels={"zone": "a"}, serial="SN-1"))
    await api.add(**worker(2))
    storage = await api.add(personality="storage", mgmt_mac="52:54:00:00:00:0a")
    assert storage["hostname"] == "storage-0"
    assert w1["id"] > controller["id"] and w1["labels"] == {"zone": "a"} and w1["serialid"] == "SN-1"

    listed = await api.get("/v1/ihosts")
    assert listed.status_code == 200, listed.text
    assert set(listed.json()) == {"ihosts"}
    assert [h["hostname"] for h in listed.json()["ihosts"]] == ["controller-0", "worker-1", "worker-2", "storage-0"]
    workers = (await api.get("/v1/ihosts", {"personality": "worker"})).json()["ihosts"]
    assert [h["hostname"] for h in workers] == ["worker-1", "worker-2"]

    first = (await api.get("/v1/ihosts", {"limit": 3})).json()
    assert len(first["ihosts"]) == 3 and "marker=" in first["next"]
    rest = (await api.client.get(first["next"], headers=api.auth())).json()
    assert [h["hostname"] for h in rest["ihosts"]] == ["storage-0"] and rest.get("next") is None

    by_uuid = await api.host(w1["uuid"])
    assert by_uuid == await api.host("worker-1") == w1
    schema = (await api.client.get("/openapi.json")).json()
    assert {"/v1/ihosts", "/v1/ihosts/{host_id}", "/v1/ihosts/{host_id}/icpus", "/v1/ihosts/{host_id}/imemorys",
            "/v1/ihosts/{host_id}/idisks", "/v1/ihosts/{host_id}/ports"} <= set(schema["paths"])
    assert {"get", "patch", "delete"} <= set(schema["paths"]["/v1/ihosts/{host_id}"])
    assert {"roostToken", "xAuthToken"} <= set(schema["components"]["securitySchemes"])
    listing = schema["paths"]["/v1/ihosts"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listing == {"$ref": "#/components/schemas/HostCollection"}
    assert set(schema["components"]["schemas"]["HostCollection"]["properties"]) == {"ihosts", "next"}
    assert "password" not in schema["components"]["schemas"]["HostOut"]["properties"]


async def test_duplicates_are_409_and_change_nothing(api: Api) -> None:
    await api.add(**worker(1))
    same_name = await api.post(worker(1, mgmt_mac="52:54:00:00:09:09"))
    assert same_name.status_code == 409 and "hostname" in same_name.json()["detail"]
    same_mac = await api.post(worker(2, mgmt_mac="52:54:00:00:01:01".upper()))
    assert same_mac.status_code == 409 and "MAC" in same_mac.json()["detail"]
    assert [h["hostname"] for h in (await api.get("/v1/ihosts")).json()["ihosts"]] == ["worker-1"]
    assert (await api.get("/v1/ihosts/worker-2")).status_code == 404


@pytest.mark.parametrize(("body", "code", "where", "reason"), [
    ({**worker(1), "personality": "router"}, 422, ["body", "personality"], ""),
    ({"hostname": "worker-1", "mgmt_mac": "52:54:00:00:01:01"}, 422, ["body", "personality"], ""),
    ({**worker(1), "mgmt_mac": "not-a-mac"}, 422, ["body", "mgmt_mac"], ""),
    ({**worker(1), "hostname": "Worker_1"}, 422, ["body", "hostname"], ""),
    ({**worker(1), "addresses": {"mgmt": "10.0.0.300"}}, 422, ["body", "addresses", "mgmt"], ""),
    ({**worker(1), "addresses": {"storage": "10.0.0.3"}}, 422, ["body", "addresses", "storage", "[key]"], ""),
    ({**worker(1), "password": SECRET}, 422, ["body", "password"], ""),
    ({**worker(1), "bmc": {"address": "ftp://x", "username": "root", "password": SECRET}}, 422,
     ["body", "bmc", "address"], ""),
    ({"personality": "worker", "mgmt_mac": "52:54:00:00:01:01"}, 400, None, "needs a hostname"),
    ({**worker(1), "bmc": {"address": "https://10.0.0.9"}}, 400, None, "needs an address and a username"),
])
async def test_invalid_hosts_are_refused_with_the_field_or_the_reason(api: Api, body: dict[str, Any], code: int,
                                                                     where: list[str] | None, reason: str) -> None:
    r = await api.post(body)
    assert r.status_code == code, r.text
    if where is not None:
        assert any(e["loc"][:len(where)] == where for e in r.json()["detail"]), r.text
    assert reason in str(r.json()["detail"])
    assert (await api.get("/v1/ihosts")).json() == {"ihosts": []}, "nothing was added"


async def test_unknown_hosts_are_404(api: Api) -> None:
    await api.add(**worker(1))
    for ref in ("worker-9", "00000000-0000-4000-8000-000000000000", "s3cr3t"):
        for path in ("", "/icpus", "/imemorys", "/idisks", "/ports"):
            r = await api.get(f"/v1/ihosts/{ref}{path}")
            assert r.status_code == 404, (ref, path, r.text)
            assert r.json()["detail"] == "no host with this uuid or hostname"
        assert (await api.action(ref, "lock")).status_code == 404
        assert (await api.patch(ref, {"location": "x"})).status_code == 404
        assert (await api.delete(ref)).status_code == 404
    too_long = await api.get(f"/v1/ihosts/{'s3cr3t' * 20}")
    assert too_long.status_code == 400 and "longer than 64" in too_long.json()["detail"]
    assert "s3cr3t" not in too_long.text


async def test_lock_and_unlock_a_worker_with_its_agent(api: Api) -> None:
    """An agent announces itself (online) and reports its hardware; unlock passes its in-test checks; a lock
    with no orchestrator on the bus proceeds and says so."""
    w1 = await api.add(**worker(1))
    refused = await api.action("worker-1", "unlock")
    assert refused.status_code == 400 and "not online" in refused.json()["detail"], refused.text

    await api.agent_hello("worker-1", [w1["mgmt_mac"]])

    async def online() -> bool:
        return (await api.host("worker-1"))["availability"] == "online"

    await wait_until(online, what="worker-1 online once its agent announced itself")
    not_inventoried = await api.patch("worker-1", {"action": "unlock"})
    assert not_inventoried.status_code == 400 and "inventoried" in not_inventoried.json()["detail"]

    hardware = msg.Hardware(
        cpus=[msg.Cpu(cpu=i, socket=0, core=i // 2, thread=i % 2, model="Xeon") for i in range(4)],
        memory=msg.Memory(total_mib=16384, available_mib=12000),
        disks=[msg.Disk(device_node="/dev/sda", size_mib=512000, type="SSD", serial="D1")],
        ports=[msg.Port(name="eth0", mac=w1["mgmt_mac"], speed_mbps=10000, link="up", mtu=1500)])
    await api.agent_inventory("worker-1", hardware)

    async def inventoried() -> bool:
        return (await api.host("worker-1"))["inv_state"] == "inventoried"

    await wait_until(inventoried, what="worker-1 inventoried")
    cpus = (await api.get("/v1/ihosts/worker-1/icpus")).json()["icpus"]
    assert [(c["cpu"], c["core"], c["thread"], c["socket"], c["cpu_model"]) for c in cpus] == [
        (0, 0, 0, 0, "Xeon"), (1, 0, 1, 0, "Xeon"), (2, 1, 0, 0, "Xeon"), (3, 1, 1, 0, "Xeon")]
    assert {c["ihost_uuid"] for c in cpus} == {w1["uuid"]} and len({c["uuid"] for c in cpus}) == 4
    assert cpus == (await api.get(f"/v1/ihosts/{w1['uuid']}/icpus")).json()["icpus"], "stable item uuids"
    [memory] = (await api.get("/v1/ihosts/worker-1/imemorys")).json()["imemorys"]
    assert (memory["memtotal_mib"], memory["memavail_mib"]) == (16384, 12000)
    [disk] = (await api.get("/v1/ihosts/worker-1/idisks")).json()["idisks"]
    assert (disk["device_node"], disk["device_type"], disk["size_mib"], disk["serial_id"]) == (
        "/dev/sda", "SSD", 512000, "D1")
    [port] = (await api.get("/v1/ihosts/worker-1/ports")).json()["ports"]
    assert (port["name"], port["mac"], port["speed"], port["link"], port["mtu"]) == (
        "eth0", w1["mgmt_mac"], 10000, "up", 1500)

    unlocked = await api.action("worker-1", "unlock")
    assert unlocked.status_code == 200, unlocked.text
    assert unlocked.json()["administrative"] == "unlocked" and "unlocking worker-1" in unlocked.json()["detail"]

    async def available() -> bool:
        return (await api.host("worker-1"))["availability"] == "available"

    await wait_until(available, what="worker-1 unlocked-enabled-available after its in-test checks")
    host = await api.host("worker-1")
    assert (host["administrative"], host["operational"], host["task"], host["action"]) == (
        "unlocked", "enabled", "", "none")
    again = await api.action("worker-1", "unlock")
    assert again.status_code == 400 and "already 'unlocked'" in again.json()["detail"]
    reboot = await api.action("worker-1", "reboot")
    assert reboot.status_code == 400 and "must be locked" in reboot.json()["detail"]
    delete = await api.delete("worker-1")
    assert delete.status_code == 400 and "lock it first" in delete.json()["detail"]
    assert (await api.host("worker-1"))["version"] == host["version"], "a refusal changes nothing"

    locked = await api.action("worker-1", "lock")
    assert locked.status_code == 200, locked.text
    body = locked.json()
    assert (body["administrative"], body["operational"], body["availability"]) == ("locked", "disabled", "online")
    assert "no orchestrator" in body["detail"], body["detail"]
    assert (await api.delete("worker-1")).status_code == 204
    assert (await api.get("/v1/ihosts/worker-1")).status_code == 404


async def test_force_unlock_of_an_offline_host_fails_its_in_test_checks(api: Api) -> None:
    """With no agent alive, a force-unlocked host stays intest until go_enabled_timeout, then fails."""
    await api.add(**worker(2))
    r = await api.patch("worker-2", [{"op": "replace", "path": "/action", "value": "force-unlock"}])
    assert r.status_code == 200, r.text
    assert (r.json()["administrative"], r.json()["availability"], r.json()["task"]) == (
        "unlocked", "intest", "Testing")

    async def failed() -> bool:
        return (await api.host("worker-2"))["availability"] == "failed"

    await wait_until(failed, timeout=GO_ENABLED_TIMEOUT + 20, what="worker-2 failed its in-test checks")
    host = await api.host("worker-2")
    assert (host["administrative"], host["operational"], host["task"], host["action"]) == (
        "unlocked", "disabled", "", "none")
    forced = await api.action("worker-2", "force-lock")
    assert forced.status_code == 200, forced.text
    assert forced.json()["administrative"] == "locked" and "did not wait" in forced.json()["detail"]


async def test_controller_rules_and_power_actions_are_refused_with_the_reason(api: Api) -> None:
    await api.add(personality="controller", mgmt_mac="52:54:00:00:00:01")
    for action, reason in (("lock", "already 'locked'"), ("swact", "locked"),
                           ("reset", "no board management controller"), ("power-on", "no board management"),
                           ("power-off", "no board management"), ("reboot", "Can not reboot"),
                           ("reinstall", "Can not reinstall")):
        r = await api.action("controller-0", action)
        assert r.status_code == 400, (action, r.text)
        assert reason in r.json()["detail"], (action, r.text)
    none = await api.action("controller-0", "none")
    assert none.status_code == 200 and none.json()["detail"] == ""
    mixed = await api.patch("controller-0", [{"op": "replace", "path": "/action", "value": "lock"},
                                             {"op": "replace", "path": "/location", "value": "x"}])
    assert mixed.status_code == 400 and "cannot be combined" in mixed.json()["detail"]


async def enabled(api: Api, **fields: Any) -> dict[str, Any]:
    """A host added, its agent alive and inventoried, unlocked and through its in-test checks."""
    host = await api.add(**fields)
    agent = f"agent-{host['id']}"
    await api.agent_hello(agent, [host["mgmt_mac"]])
    await api.agent_inventory(agent, msg.Hardware(memory=msg.Memory(total_mib=1024)))

    async def ready() -> bool:
        shown = await api.host(host["uuid"])
        return bool(shown["availability"] == "online" and shown["inv_state"] == "inventoried")

    await wait_until(ready, what=f"{host['hostname']} online and inventoried")
    r = await api.action(host["uuid"], "unlock")
    assert r.status_code == 200, r.text

    async def available() -> bool:
        return (await api.host(host["uuid"]))["availability"] == "available"

    await wait_until(available, what=f"{host['hostname']} enabled")
    return await api.host(host["uuid"])


async def test_the_active_controller_cannot_be_locked_and_swact_needs_the_heartbeat_service(api: Api) -> None:
    c0 = await enabled(api, personality="controller", mgmt_mac="52:54:00:00:00:01")
    assert c0["hostname"] == "controller-0" and c0["active"] is True, "the first enabled controller is active"
    c1 = await enabled(api, personality="controller", mgmt_mac="52:54:00:00:00:02")
    assert c1["active"] is False
    for action in ("lock", "force-lock"):
        r = await api.action("controller-0", action)
        assert r.status_code == 400 and "active controller" in r.json()["detail"], (action, r.text)
    standby = await api.action("controller-1", "swact")
    assert standby.status_code == 400 and "not the active controller" in standby.json()["detail"]
    swact = await api.action("controller-0", "swact")
    assert swact.status_code == 400 and "heartbeat service" in swact.json()["detail"], swact.text
    after = await api.host("controller-0")
    assert (after["active"], after["task"], after["action"], after["administrative"]) == (True, "", "none", "unlocked")

    locked = await api.action("controller-1", "lock")
    assert locked.status_code == 200 and locked.json()["administrative"] == "locked", locked.text
    last = await api.action("controller-0", "force-lock")
    assert last.status_code == 400 and "active controller" in last.json()["detail"]
    listed = {h["hostname"]: h for h in (await api.get("/v1/ihosts")).json()["ihosts"]}
    assert (listed["controller-0"]["active"], listed["controller-1"]["active"]) == (True, False)


async def test_updates_with_json_patch_and_plain_object(api: Api) -> None:
    w1 = await api.add(**worker(1))
    r = await api.patch("worker-1", [
        {"op": "replace", "path": "/location", "value": {"locn": "rack 7"}},
        {"op": "replace", "path": "/serialid", "value": "SN-77"},
        {"op": "add", "path": "/labels", "value": {"sriov": "enabled", "zone": "b"}},
        {"op": "replace", "path": "/addresses", "value": {"mgmt": "10.0.0.21", "cluster-host": "fd00::21"}}])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["location"] == {"locn": "rack 7"} and body["serialid"] == "SN-77"
    assert body["labels"] == {"sriov": "enabled", "zone": "b"} and body["mgmt_ip"] == "10.0.0.21"
    assert body["addresses"] == {"mgmt": "10.0.0.21", "cluster-host": "fd00::21"}
    assert body["version"] > w1["version"] and body["detail"] == ""

    plain = await api.patch(w1["uuid"], {"location": "rack 8", "labels": {}})
    assert plain.status_code == 200 and plain.json()["location"] == {"locn": "rack 8"} and plain.json()["labels"] == {}
    provisioned = await api.patch("worker-1", {"hostname": "worker-9"})
    assert provisioned.status_code == 400 and "provisioned" in provisioned.json()["detail"]
    personality = await api.patch("worker-1", [{"op": "replace", "path": "/personality", "value": "storage"}])
    assert personality.status_code == 400 and "provisioned" in personality.json()["detail"]
    unchanged = await api.patch("worker-1", {})
    assert unchanged.status_code == 200 and unchanged.json()["version"] == plain.json()["version"]


async def test_a_discovered_host_is_named_by_patch_and_add(api: Api) -> None:
    """An unknown agent becomes an unprovisioned host; renaming it onto a taken hostname is a 409."""
    await api.add(**worker(1))
    await api.agent_hello("node-x", ["52:54:00:00:02:02"])

    async def discovered() -> list[dict[str, Any]]:
        hosts = (await api.get("/v1/ihosts")).json()["ihosts"]
        return [h for h in hosts if h["agent"] == "node-x"]

    await wait_until(discovered, what="the unknown agent recorded as a host")
    [host] = await discovered()
    assert host["hostname"] is None and host["personality"] is None and host["invprovision"] == "unprovisioned"
    taken = await api.patch(host["uuid"], {"hostname": "worker-1"})
    assert taken.status_code == 409 and "hostname" in taken.json()["detail"]
    named = await api.patch(host["uuid"], {"hostname": "worker-3", "personality": "worker"})
    assert named.status_code == 200, named.text
    assert (named.json()["hostname"], named.json()["subfunctions"], named.json()["invprovision"]) == (
        "worker-3", "worker", "provisioned")

    await api.agent_hello("node-y", ["52:54:00:00:02:03"])

    async def second() -> bool:
        return any(h["agent"] == "node-y" for h in (await api.get("/v1/ihosts")).json()["ihosts"])

    await wait_until(second, what="the second unknown agent recorded as a host")
    added = await api.add(hostname="worker-4", personality="worker", mgmt_mac="52:54:00:00:02:03")
    assert added["agent"] == "node-y" and added["invprovision"] == "provisioned"
    assert [h["hostname"] for h in (await api.get("/v1/ihosts")).json()["ihosts"]] == [
        "worker-1", "worker-3", "worker-4"], "add gave the discovered host its identity"


async def test_the_bmc_password_is_never_returned(api: Api) -> None:
    """Accepted, stored sealed, shown only as ``password_set``: not in any response, event or row in clear."""
    bmc = {"type": "redfish", "address": "https://10.10.10.3", "username": "root", "password": SECRET}
    host = await api.add(**worker(1, bmc=bmc))
    assert host["bmc"]["password_set"] is True
    assert (host["bm_type"], host["bm_ip"], host["bm_username"]) == ("redfish", "https://10.10.10.3", "root")
    assert set(host["bmc"]) == {"type", "address", "username", "system_id", "verify_tls", "password_set",
                                "reachable", "last_error"}

    renamed = await api.patch("worker-1", {"bmc": {**bmc, "username": "admin", "password": ""}})
    assert renamed.status_code == 400 and "needs its password too" in renamed.json()["detail"], renamed.text
    patched = await api.patch("worker-1", [{"op": "replace", "path": "/bmc", "value": {**bmc, "username": "admin"}}])
    assert patched.status_code == 200, patched.text
    assert patched.json()["bmc"]["password_set"] is True and patched.json()["bm_username"] == "admin"
    kept = await api.patch("worker-1", {"bmc": {**bmc, "username": "admin", "password": "", "verify_tls": False}})
    assert kept.status_code == 200 and kept.json()["bmc"]["password_set"] is True, "the stored password stays"
    invalid = await api.patch("worker-1", {"bmc": {**bmc, "verify_tls": "perhaps"}})
    assert invalid.status_code == 422
    removed = await api.patch("worker-1", {"bmc": {"type": "none"}})
    assert removed.status_code == 200 and removed.json()["bmc"] is None and removed.json()["bm_type"] == "none"

    # what `system host-update worker-1 bm_type=redfish bm_ip=… bm_username=… bm_password=…` sends
    sysinv = [{"op": "replace", "path": "/bm_type", "value": "dynamic"},
              {"op": "replace", "path": "/bm_ip", "value": "10.10.10.7"},
              {"op": "replace", "path": "/bm_username", "value": "root"}]
    r = await api.patch("worker-1", sysinv)
    assert r.status_code == 200, r.text
    assert (r.json()["bm_type"], r.json()["bm_ip"], r.json()["bm_username"]) == ("redfish", "https://10.10.10.7",
                                                                                 "root")
    assert r.json()["bmc"]["password_set"] is False
    v6 = await api.patch("worker-1", {"bm_ip": "fd00::7"})
    assert v6.status_code == 200 and v6.json()["bm_ip"] == "https://[fd00::7]" and v6.json()["bm_username"] == "root"
    with_password = await api.patch("worker-1", [{"op": "replace", "path": "/bm_password", "value": SECRET}])
    assert with_password.status_code == 200 and with_password.json()["bmc"]["password_set"] is True
    bad_ip = await api.patch("worker-1", {"bm_ip": "10.0.0.1 x", "bm_password": SECRET})
    assert bad_ip.status_code == 422 and ["body", "bm_ip"] in [e["loc"] for e in bad_ip.json()["detail"]]
    both = await api.patch("worker-1", {"bm_ip": "10.0.0.1", "bmc": bmc})
    assert both.status_code == 400 and "not both" in both.json()["detail"]
    ipmi = await api.patch("worker-1", {"bm_type": "ipmi"})
    assert ipmi.status_code == 422
    for path in ("/v1/ihosts", "/v1/ihosts/worker-1"):
        await api.get(path)

    stored = await api.pool.fetchval("SELECT bmc_password FROM inventory.hosts WHERE hostname = 'worker-1'")
    assert stored and SECRET.encode() not in stored, "stored sealed"
    bodies = await api.pool.fetch("SELECT body FROM inventory.outbox")
    assert bodies and not any(SECRET.encode() in row["body"] for row in bodies), "no event carries it"
    gone = await api.patch("worker-1", [{"op": "replace", "path": "/bm_type", "value": "none"}])
    assert gone.status_code == 200 and gone.json()["bmc"] is None
    # the fixture checks every response body of the test for the password


async def test_authentication_and_roles(api: Api) -> None:
    await api.add(**worker(1))
    assert (await api.client.get("/v1/ihosts")).status_code == 401
    bad = await api.client.get("/v1/ihosts", headers={"X-Auth-Token": "roost_not-a-real-token"})
    assert bad.status_code == 401 and "roost_not-a-real-token" not in bad.text
    assert (await api.client.get("/v1/ihosts", headers={"X-Auth-Token": api.reader})).status_code == 200
    assert (await api.get("/v1/ihosts/worker-1/icpus")).status_code == 200
    reader_patch = await api.patch("worker-1", [{"op": "replace", "path": "/action", "value": "unlock"}],
                                   role="reader")
    assert reader_patch.status_code == 403
    assert (await api.post(worker(2), role="reader")).status_code == 403
    assert (await api.delete("worker-1", role="reader")).status_code == 403
    no_token = await api.client.patch("/v1/ihosts/worker-1", json={"action": "unlock"})
    assert no_token.status_code == 401
    assert (await api.client.delete("/v1/ihosts/worker-1")).status_code == 401
    host = await api.host("worker-1")
    assert (host["administrative"], host["version"]) == ("locked", 1), "nothing changed"


@pytest.mark.parametrize(("body", "where"), [
    ([{"op": "replace", "path": "/action", "value": "explode"}], ["body", "json-patch", 0, "/action", "value"]),
    ([{"op": "replace", "path": "/s3cr3t", "value": "x"}], ["body", "json-patch", 0]),
    ([{"op": "remove", "path": "/labels"}], ["body", "json-patch", 0, "/labels", "op"]),
    ([{"op": "replace", "path": "/personality", "value": "router"}],
     ["body", "json-patch", 0, "/personality", "value"]),
    ({"action": "force-unsafe-lock"}, ["body", "object", "action"]),
    ({"personality": "router"}, ["body", "object", "personality"]),
    ({"labels": {"bad label!": "x"}}, ["body", "object", "labels", "bad label!", "[key]"]),
    ({"bmc": {"password": SECRET, "address": "not a url"}}, ["body", "object", "bmc", "address"]),
    ({"s3cr3t": SECRET}, ["body", "object", "s3cr3t"]),
    ("lock", ["body", "object"]),
])
async def test_bad_patches_are_422_with_the_field(api: Api, body: Any, where: list[Any]) -> None:
    await api.add(**worker(1))
    r = await api.patch("worker-1", body)
    assert r.status_code == 422, r.text
    assert where in [e["loc"] for e in r.json()["detail"]], r.text
    assert SECRET not in r.text and "/s3cr3t" not in r.text
    empty = await api.patch("worker-1", [])
    assert empty.status_code == 400 and "empty" in empty.json()["detail"]
    assert (await api.host("worker-1"))["version"] == 1


GARBAGE = ["", " ", "x", "'; DROP TABLE inventory.hosts; --", "\x00", "%", "é" * 10, "9" * 70, "-1", "None",
           "null", "[]", "{}", "../..", "controller-0/icpus"]


async def test_garbage_is_never_a_server_error(api: Api) -> None:
    await api.add(**worker(1))
    for value in GARBAGE:
        for name in ("personality", "limit", "marker"):
            r = await api.get("/v1/ihosts", {name: value})
            assert r.status_code < 500, (name, value, r.text)
        ref = quote(value, safe="")
        for path in ("", "/icpus", "/imemorys", "/idisks", "/ports"):
            assert (await api.get(f"/v1/ihosts/{ref}{path}")).status_code < 500, (value, path)
        for body in ({"action": "lock"}, [{"op": "replace", "path": "/action", "value": value}], {"location": value},
                     {"hostname": value}, {"labels": {value: value}}, {"addresses": {"mgmt": value}}):
            for target in {ref or "worker-1", "worker-1"}:
                r = await api.patch(target, body)
                assert r.status_code < 500, (value, body, r.text)
        for field in ("location", "serial", "labels", "bmc"):
            text = {"labels": {"k": value}, "bmc": {"address": "https://bmc", "username": value}}.get(field, value)
            r = await api.post({**worker(9), field: text})
            assert r.status_code < 500, (field, value, r.text)
            if r.status_code == 201:
                assert (await api.delete("worker-9")).status_code == 204
        r = await api.post({"hostname": value, "personality": "worker", "mgmt_mac": value})
        assert r.status_code < 500, (value, r.text)
        if ref:
            assert (await api.delete(ref)).status_code < 500, value
    assert [h["hostname"] for h in (await api.get("/v1/ihosts")).json()["ihosts"]] == ["worker-1"]


async def test_over_real_http_with_the_starlingx_header(api: Api) -> None:
    """uvicorn on a free loopback port: what a cgtsclient sends (X-Auth-Token, a JSON patch) works."""
    server = HttpServer(api.app)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            added = await http.post("/v1/ihosts", json=worker(4), headers={"X-Auth-Token": api.admin})
            assert added.status_code == 201, added.text
            r = await http.patch("/v1/ihosts/worker-4", json=[{"op": "replace", "path": "/action",
                                                               "value": "force-unlock"}],
                                 headers={"X-Auth-Token": api.admin})
            assert r.status_code == 200 and r.json()["availability"] == "intest", r.text
            listed = await http.get("/v1/ihosts", headers={"X-Auth-Token": api.reader})
            assert [h["hostname"] for h in listed.json()["ihosts"]] == ["worker-4"]
            assert (await http.get("/v1/ihosts")).status_code == 401
    finally:
        await server.stop()
