"""The controller pair end to end: two heartbeat services (controller-0 and controller-1), inventory, four
host agents (two controllers, two workers that vote), the policy-enforcing NATS of `roost up`, PostgreSQL,
and the controllers' BMCs on the sushy-tools emulator.

* start-up elects controller-0 (the preferred one) and inventory records it;
* inventory's swact hands the role to controller-1, announced and recorded;
* the active's heartbeat service dies: the standby fences it through its BMC (ForceOff, Off read back)
  and only then takes over;
* a fence that fails (the BMC does not answer) never takes over, and raises 950.008;
* with no worker, a witness (`roost heartbeat witness`, its own process) is the third vote;
* and throughout, a sampler checks every 20 ms that the two controllers are never both active.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import SecretStr

from schemas.envelope import Role
from services.cli.agent import read_credentials
from services.core.auth import create_token
from services.core.bus.bus import Bus
from services.core.bus.factory import transport_from_url
from services.core.host import Connections, ServiceHost
from services.core.settings import HeartbeatSettings, load_settings
from services.heartbeat.agent import HeartbeatAgentComponent
from services.heartbeat.service import HeartbeatService
from services.heartbeat.wire import LeaseKind
from services.inventory.agent.agent import HostAgent
from services.inventory.agent.simhost import make_simulated_host
from services.inventory.bmc.abc import BmcEndpoint
from services.inventory.bmc.redfish import RedfishBmc
from services.inventory.service import InventoryService
from tests.integration.test_heartbeat_service import ROOST, clean_env, roost
from tests.support.nats import PolicyNats
from tests.support.operator import ok, unlock_when_online
from tests.support.postgres import fresh_database, pool_on
from tests.support.sushy import FakeSystem, SushyEmulator, closed_port, running_sushy
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.nats, pytest.mark.postgres]

USER, PASSWORD = "root", "pair-bmc-" + "k" * 16
C0 = FakeSystem("55555555-0000-4000-8000-000000000000", "controller-0", "On", ("52:54:00:30:00:00",))
C1 = FakeSystem("55555555-0000-4000-8000-000000000001", "controller-1", "On", ("52:54:00:30:00:01",))
HOSTS = {"controller-0": ("controller", "52:54:00:30:00:00"), "controller-1": ("controller", "52:54:00:30:00:01"),
         "worker-1": ("worker", "52:54:00:30:00:11"), "worker-2": ("worker", "52:54:00:30:00:12")}
BASE = random.randint(20, 240)
MONITOR = {"controller-0": BASE, "controller-1": BASE + 1}
AGENT = {name: BASE + 2 + i for i, name in enumerate(HOSTS)}
WITNESS = BASE + 2 + len(HOSTS)
WITNESS_ID = 0xE000_0001


def addresses(n: int) -> dict[str, str]:
    return {"mgmt": f"127.0.1.{n}", "cluster-host": f"127.0.2.{n}"}


@dataclass
class PairSite:
    data: Path
    pool: asyncpg.Pool
    operator: Bus
    sushy: SushyEmulator
    heartbeat: dict[str, HeartbeatService]
    hosts: dict[str, ServiceHost]
    agents: list[tuple[HostAgent, asyncio.Task[None]]] = field(default_factory=list)
    both_active: list[str] = field(default_factory=list)

    async def ok(self, type: str, data: dict[str, Any]) -> dict[str, Any]:
        return await ok(self.operator, type, data)

    async def host(self, name: str) -> dict[str, Any]:
        return await self.ok("roost.cmd.host.show", {"host": name})

    async def kill_heartbeat(self, name: str) -> None:
        """Controller ``name``'s heartbeat service dies (stops, taken out of the site: not stopped again at the
        end, where a second stop of a stopped ServiceHost would wait out its whole deadline)."""
        await self.hosts[name].stop(asyncio.get_running_loop().time() + 10)
        del self.hosts[name], self.heartbeat[name]

    def active(self) -> list[str]:
        return [name for name, hb in self.heartbeat.items() if hb.pair is not None and hb.pair.active]

    async def outbox(self, type: str) -> list[dict[str, Any]]:
        rows = await self.pool.fetch("SELECT body FROM heartbeat.outbox ORDER BY id")
        return [d["data"] for d in (json.loads(bytes(r["body"])) for r in rows) if d["type"] == type]

    async def sample(self) -> None:
        """Never two actives: checked every 20 ms for the whole test."""
        while True:
            active = self.active()
            if len(active) > 1:
                self.both_active.append(f"{active}")
            await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def sushy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SushyEmulator]:
    with running_sushy(tmp_path_factory.mktemp("sushy-pair"), (C0, C1), credentials=(USER, PASSWORD)) as emulator:
        yield emulator


def start_witness(data: Path, port: int) -> subprocess.Popen[bytes]:
    """`roost heartbeat witness` in a process of its own, with the keys of its enrolment."""
    return subprocess.Popen(
        [*ROOST, "--data-dir", str(data), "heartbeat", "witness", "--credentials",
         str(data / "agents" / "witness.credentials.json"), "--node-id", str(WITNESS_ID), "--port", str(port),
         *(f"--address={n}={a}" for n, a in addresses(WITNESS).items())],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@contextlib.asynccontextmanager
async def pair_site(tmp_path: Path, sushy: SushyEmulator, bmc_address: dict[str, str], *,
                    workers: bool = True, witness: bool = False) -> AsyncIterator[PairSite]:
    for system in (C0, C1):                 # another test of this module may have fenced it
        await power_on(sushy, system)
        async def on(system: FakeSystem = system) -> bool:
            return await power(sushy, system) == "On"

        await wait_until(on, 40, f"{system.name} powered on")
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    hosts = {n: v for n, v in HOSTS.items() if workers or v[0] == "controller"}
    enrolled = await asyncio.gather(*(asyncio.to_thread(roost, data, "agent", "enroll", name, "--broker", "none")
                                      for name in [*hosts, *(["witness"] if witness else [])]))
    assert all(e.returncode == 0 for e in enrolled), [e.stderr for e in enrolled]
    nats = PolicyNats(data)
    secrets, server, url = nats.secrets, nats.server, nats.url_for
    await server.start()

    port, agent_port = random.randint(20000, 29000), random.randint(30000, 39000)
    started: list[ServiceHost] = []
    witness_process = None
    if witness:
        witness_process = start_witness(data, agent_port)
    try:
        async with fresh_database() as db_url, pool_on(db_url) as pool:
            async with pool.acquire() as conn:
                admin = await create_token(conn, "operator", Role.ADMIN)
                token = {n: await create_token(conn, f"service:{n}", Role.ADMIN, kind="service")
                         for n in ("inventory", "heartbeat")}
            settings = load_settings(data_dir=data)
            inventory = InventoryService(go_enabled_timeout=30.0, lock_timeout=5.0, agent_check_interval=0.5,
                                         secrets=secrets)
            services: dict[str, ServiceHost] = {
                "inventory": ServiceHost(inventory, settings, Connections(url("inventory"), db_url),
                                         token["inventory"])}
            heartbeat: dict[str, HeartbeatService] = {}
            for me, peer in (("controller-0", "controller-1"), ("controller-1", "controller-0")):
                heartbeat[me] = HeartbeatService(config=HeartbeatSettings(
                    controller=me, addresses=addresses(MONITOR[me]), port=port, agent_port=agent_port, period=0.1,
                    peer=peer, peer_addresses=addresses(MONITOR[peer]),
                    witness_node_id=WITNESS_ID if witness else None,
                    witness_addresses=addresses(WITNESS) if witness else {}),
                    list_retry=0.5, config_retry=0.5, config_resend=2.0)
                services[me] = ServiceHost(heartbeat[me], settings, Connections(url("heartbeat"), db_url),
                                           token["heartbeat"])
            for host in services.values():
                await host.start()
                started.append(host)
            operator = Bus(transport_from_url(url("roost-cli")), source="roost/cli", token=admin)
            await operator.connect()
            site = PairSite(data, pool, operator, sushy, heartbeat, services)
            sampler = asyncio.create_task(site.sample())
            try:
                for name, (personality, mac) in hosts.items():
                    add: dict[str, Any] = {"personality": personality, "hostname": name, "mgmt_mac": mac,
                                           "addresses": addresses(AGENT[name])}
                    if name in bmc_address:
                        system = C0 if name == "controller-0" else C1
                        add["bmc"] = {"type": "redfish", "address": bmc_address[name], "username": USER,
                                      "password": PASSWORD, "system_id": system.uuid}
                    await site.ok("roost.cmd.host.add", add)
                    creds = read_credentials(data / "agents" / f"{name}.credentials.json")
                    assert creds.heartbeat is not None
                    component = HeartbeatAgentComponent(creds.heartbeat, data / "agent-state" / name)
                    agent = HostAgent(name, server.url, password=creds.password, interval=1.0,
                                      root=make_simulated_host(data / "hosts" / name, name, mac),
                                      components=[component])
                    site.agents.append((agent, asyncio.create_task(agent.run())))
                for name in hosts:
                    await unlock(site, name)
                yield site
            finally:
                sampler.cancel()
                for agent, task in site.agents:
                    agent.stop()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(task, 15)
                await operator.close()
                for host in reversed(started):
                    if host not in site.hosts.values():
                        continue            # stopped by the test (kill_heartbeat)
                    with contextlib.suppress(Exception):
                        await host.stop(asyncio.get_running_loop().time() + 20)
    finally:
        if witness_process is not None:
            witness_process.terminate()
            out = (await asyncio.to_thread(witness_process.communicate, timeout=10))[0].decode()
            assert f"witness {WITNESS_ID} answering" in out and "Traceback" not in out, out
        await server.stop()


async def unlock(site: PairSite, name: str) -> None:
    await unlock_when_online(site.operator, name, in_service=("available", "degraded"))


async def power(sushy: SushyEmulator, system: FakeSystem) -> str:
    return str(await asyncio.to_thread(lambda: sushy.get(f"/redfish/v1/Systems/{system.uuid}")["PowerState"]))


async def power_on(sushy: SushyEmulator, system: FakeSystem) -> None:
    bmc = RedfishBmc(BmcEndpoint(sushy.url, USER, SecretStr(PASSWORD), system.uuid))
    try:
        if await bmc.power_state() != "on":
            await bmc.send_reset("On")
    finally:
        await bmc.close()


async def _announced(site: PairSite) -> bool:
    return bool(await site.outbox("roost.heartbeat.active_controller"))


async def recorded_active(site: PairSite, name: str) -> bool:
    return bool((await site.host(name))["active"])


async def test_start_up_swact_and_failover_with_fencing_never_two_actives(tmp_path: Path,
                                                                          sushy: SushyEmulator) -> None:
    async with pair_site(tmp_path, sushy, {"controller-0": sushy.url, "controller-1": sushy.url}) as site:
        await wait_until(lambda: site.active() == ["controller-0"], 30, "controller-0 elected (preferred)")
        await wait_until(lambda: recorded_active(site, "controller-0"), 20, "inventory recording controller-0")
        pair = site.heartbeat["controller-0"].pair
        assert pair is not None and pair.ctrl is not None and pair.ctrl.config.voters >= {
            (await site.host(w))["node_id"] for w in ("worker-1", "worker-2")}, "the workers vote"
        # the announcement in this outbox, awaited: once, on three test workers, it was not there yet when
        # inventory had recorded controller-0 (IndexError below); cause not found
        await wait_until(lambda: _announced(site), 20, "controller-0's role announced in the outbox")
        announced = await site.outbox("roost.heartbeat.active_controller")
        assert announced[-1]["active"] == "controller-0" and announced[-1]["standby"] == "controller-1"

        swact = await site.ok("roost.cmd.host.swact", {"host": "controller-0"})
        assert "controller-1" in swact["detail"]
        await wait_until(lambda: site.active() == ["controller-1"], 30, "controller-1 active after the swact")
        await wait_until(lambda: recorded_active(site, "controller-1"), 20, "inventory recording controller-1")
        assert await power(sushy, C0) == "On", "a planned swact fences nobody"
        versions = [a["version"] for a in await site.outbox("roost.heartbeat.active_controller")]
        assert versions == sorted(versions)

        # controller-1's heartbeat service dies: controller-0 fences it, then takes over
        await site.kill_heartbeat("controller-1")
        await wait_until(lambda: site.active() == ["controller-0"], 60, "controller-0 taking over")
        assert await power(sushy, C1) == "Off", "the old active was fenced before the takeover"
        pair = site.heartbeat["controller-0"].pair
        assert pair is not None and pair.ctrl is not None and pair.ctrl.fenced
        await wait_until(lambda: recorded_active(site, "controller-0"), 20, "inventory recording controller-0")
        assert not [a for a in await site.outbox("roost.fault.set") if a["alarm_id"] in ("950.007", "950.008")]
        assert site.both_active == []


async def test_a_fence_that_fails_never_takes_over_and_raises_950_008(tmp_path: Path,
                                                                     sushy: SushyEmulator) -> None:
    silent = f"http://127.0.0.1:{closed_port()}"
    async with pair_site(tmp_path, sushy, {"controller-0": silent, "controller-1": sushy.url}) as site:
        await wait_until(lambda: site.active() == ["controller-0"], 30, "controller-0 elected")
        await site.kill_heartbeat("controller-0")
        standby = site.heartbeat["controller-1"].pair
        assert standby is not None and standby.ctrl is not None

        async def alarmed() -> bool:
            return any(a["alarm_id"] == "950.008" and a["entity_instance_id"] == "host=controller-0"
                       for a in await site.outbox("roost.fault.set"))

        await wait_until(alarmed, 60, "950.008 for the failed fence of controller-0")
        await wait_until(lambda: standby.ctrl is not None and standby.ctrl.fence_attempts >= 2, 30,
                         "a second fence attempt")
        assert site.active() == [] and not standby.active, "no takeover without a fence"
        assert not (await site.host("controller-1"))["active"]
        assert site.both_active == []


async def test_with_no_worker_a_witness_is_the_third_vote(tmp_path: Path, sushy: SushyEmulator) -> None:
    async with pair_site(tmp_path, sushy, {"controller-0": sushy.url, "controller-1": sushy.url},
                         workers=False, witness=True) as site:
        await wait_until(lambda: site.active() == ["controller-0"], 30, "controller-0 elected")
        pair = site.heartbeat["controller-1"].pair
        assert pair is not None and pair.ctrl is not None
        assert not pair.ctrl.config.two_node and WITNESS_ID in pair.ctrl.config.voters and pair.ctrl.config.quorum == 2
        await site.kill_heartbeat("controller-0")
        # the witness and controller-1 are a majority: controller-1 fences controller-0 and takes over (in
        # two_node mode it would wait fence_delay_standby, 10 s, and race)
        await wait_until(lambda: site.active() == ["controller-1"], 60, "controller-1 taking over with the witness")
        assert await power(sushy, C0) == "Off" and pair.ctrl.kind is LeaseKind.TAKEOVER
        assert site.both_active == []
