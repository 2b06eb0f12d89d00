"""The heartbeat service as `roost up` runs it, with inventory, on the policy-enforcing NATS of `roost up`
(every service and the agent log in as their own broker users) and a fresh PostgreSQL database:

* an agent enrolled with `roost agent enroll` (its credentials file carries the heartbeat keys), run as a
  real `roost agent run` process on a simulated host tree, learns from the heartbeat service which node
  id and addresses to answer on; killed, its host is declared failed (inventory's availability, the
  heartbeat service's event); started again, it answers at once from its saved config and the host
  recovers;
* an agent in this process with a drop filter on one path: the host is degraded with 950.003 naming
  that network, and the alarm clears when the path heals;
* an agent holding another key refuses the config, and `roost heartbeat status` says why;
* `roost keys rotate`: the new key reaches the agent sealed, signs everywhere once held, the old retires,
  and not one heartbeat is missed; the agent keeps the new key across a restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from schemas.envelope import Role
from services.cli.agent import read_credentials
from services.core.auth import create_token
from services.core.bus.bus import Bus
from services.core.bus.factory import transport_from_url
from services.core.embedded.nats_server import NatsServer
from services.core.host import Connections, ServiceHost
from services.core.secrets import SecretStore
from services.core.settings import HeartbeatSettings, load_settings
from services.heartbeat.agent import HeartbeatAgentComponent
from services.heartbeat.keys import MasterKey, derive
from services.heartbeat.keystore import ClusterKeys, load_cluster_keys
from services.heartbeat.model import Path as HbPath
from services.heartbeat.service import HeartbeatService
from services.heartbeat.transport import SocketFilter
from services.heartbeat.wire import Header, Payload, encode
from services.heartbeat.wire import Role as WireRole
from services.inventory.agent.agent import HostAgent
from services.inventory.agent.simhost import make_simulated_host
from services.inventory.service import InventoryService
from tests.support.nats import PolicyNats
from tests.support.operator import ok
from tests.support.operator import unlock_when_online as unlock
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.nats, pytest.mark.postgres]

ROOST = [sys.executable, "-m", "services.cli"]
SUFFIX = random.randint(20, 250)          # loopback addresses of this run: 127.0.1.<n>, 127.0.2.<n>


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    env.update({"ROOST_HTTP_BASE_PORT": "0", "ROOST_LOG_FORMAT": "json"})
    return env


def roost(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ROOST, "--data-dir", str(data), *args], env=clean_env(), capture_output=True, text=True,
                          timeout=120)


@dataclass
class Cluster:
    data: Path
    server: NatsServer
    secrets: SecretStore
    pool: asyncpg.Pool
    operator: Bus
    heartbeat: HeartbeatService
    agent_port: int
    admin: str
    nats: PolicyNats
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def cli(self) -> list[str]:
        """The `roost` command's options to reach this cluster as the admin operator."""
        return ["--bus-url", self.url_for("roost-cli"), "--token", self.admin]

    def url_for(self, user: str) -> str:
        return self.nats.url_for(user)

    async def ok(self, type: str, data: dict[str, Any]) -> dict[str, Any]:
        return await ok(self.operator, type, data)

    async def host(self, name: str) -> dict[str, Any]:
        return await self.ok("roost.cmd.host.show", {"host": name})

    async def availability(self, name: str) -> str:
        return str((await self.host(name))["availability"])

    async def status(self) -> dict[str, Any]:
        return await self.ok("roost.cmd.heartbeat.status", {})

    async def host_status(self, name: str) -> dict[str, Any] | None:
        return next((h for h in (await self.status())["hosts"] if h["hostname"] == name), None)

    async def outbox(self, type: str) -> list[dict[str, Any]]:
        rows = await self.pool.fetch("SELECT body FROM heartbeat.outbox ORDER BY id")
        return [d for d in (json.loads(bytes(r["body"])) for r in rows) if d["type"] == type]

    def agent_process(self, name: str, mac: str) -> subprocess.Popen[bytes]:
        root = make_simulated_host(self.data / "hosts" / name, name, mac)
        creds = self.data / "agents" / f"{name}.credentials.json"
        argv = [*ROOST, "--data-dir", str(self.data), "agent", "run", "--name", name, "--credentials", str(creds),
                "--bus-url", self.server.url, "--root", str(root), "--interval", "1",
                "--state-dir", str(self.data / "agent-state" / name)]
        log = (self.data / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, env=clean_env(), stdout=log, stderr=log, start_new_session=True)
        self.procs.append(proc)
        return proc


def ip(net: int) -> str:
    return f"127.0.{net}.{SUFFIX}"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    for name in ("worker-1", "worker-2"):
        enrolled = roost(data, "agent", "enroll", name, "--broker", "none")
        assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    nats = PolicyNats(data)
    secrets, server = nats.secrets, nats.server
    await server.start()
    agent_port = random.randint(30000, 39000)
    hb_config = HeartbeatSettings(controller="controller-0", addresses={"mgmt": ip(1), "cluster-host": ip(2)},
                                  port=0, agent_port=agent_port, period=0.1)
    services: list[ServiceHost] = []
    try:
        async with fresh_database() as db_url, pool_on(db_url) as pool:
            async with pool.acquire() as conn:
                admin = await create_token(conn, "operator", Role.ADMIN)
                tokens = {n: await create_token(conn, f"service:{n}", Role.ADMIN, kind="service")
                          for n in ("inventory", "heartbeat")}
            settings = load_settings(data_dir=data)
            heartbeat = HeartbeatService(config=hb_config, list_retry=0.5, config_retry=0.5, config_resend=2.0)
            inventory = InventoryService(go_enabled_timeout=30.0, lock_timeout=5.0, agent_check_interval=0.5,
                                         secrets=secrets)
            for component in (inventory, heartbeat):
                host = ServiceHost(component, settings, Connections(nats.url_for(component.name), db_url),
                                   tokens[component.name])
                await host.start()
                services.append(host)
            operator = Bus(transport_from_url(nats.url_for("roost-cli")), source="roost/cli", token=admin)
            await operator.connect()
            here = Cluster(data, server, secrets, pool, operator, heartbeat, agent_port, admin, nats)
            try:
                yield here
            finally:
                for proc in here.procs:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
                await operator.close()
                for host in reversed(services):
                    await host.stop(asyncio.get_running_loop().time() + 20)
    finally:
        await server.stop()


async def add_host(cluster: Cluster, name: str, mac: str, n: int) -> None:
    await cluster.ok("roost.cmd.host.add", {"personality": "worker", "hostname": name, "mgmt_mac": mac,
                                             "addresses": {"mgmt": f"127.0.1.{n}", "cluster-host": f"127.0.2.{n}"}})


async def unlock_when_online(cluster: Cluster, name: str) -> None:
    await unlock(cluster.operator, name)


async def _is(cluster: Cluster, name: str, availability: str) -> bool:
    return await cluster.availability(name) == availability


async def paths_up(cluster: Cluster, name: str, networks: tuple[str, ...] = ("mgmt", "cluster-host")) -> bool:
    host = await cluster.host_status(name)
    return host is not None and all(host["paths"].get(n, {}).get("state") == "up" for n in networks)


async def test_a_killed_agent_fails_its_host_and_a_restarted_one_recovers_it(cluster: Cluster) -> None:
    n = SUFFIX + 1
    await add_host(cluster, "worker-1", "52:54:00:aa:01:01", n)
    agent = cluster.agent_process("worker-1", "52:54:00:aa:01:01")
    await unlock_when_online(cluster, "worker-1")

    # The heartbeat service told the agent its node id and addresses; every path answers.
    await wait_until(lambda: paths_up(cluster, "worker-1"), 30, "worker-1 heard on both networks")
    status = await cluster.host_status("worker-1")
    assert status is not None and status["agent_configured"] and status["state"] == "healthy"
    saved = json.loads((cluster.data / "agent-state" / "worker-1" / "heartbeat-config.json").read_text())
    assert saved["addresses"] == {"mgmt": f"127.0.1.{n}", "cluster-host": f"127.0.2.{n}"}
    assert saved["node_id"] == (await cluster.host("worker-1"))["node_id"]
    creds = read_credentials(cluster.data / "agents" / "worker-1.credentials.json")
    assert creds.heartbeat is not None and saved["key_fingerprint"] == creds.heartbeat.fingerprint
    cli = await asyncio.to_thread(roost, cluster.data, *cluster.cli, "heartbeat", "status")
    assert cli.returncode == 0, cli.stderr
    line = next(line for line in cli.stdout.splitlines() if line.startswith("worker-1"))
    assert line.split()[1] == "healthy" and "configured" in line

    # Killed: failed, by the heartbeat's event, within seconds; inventory raises 950.002.
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait(10)
    await wait_until(lambda: _is(cluster, "worker-1", "failed"), 20, "worker-1 failed")
    failed = [e for e in await cluster.outbox("roost.heartbeat.host_health")
              if e["data"]["hostname"] == "worker-1" and e["data"]["state"] == "failed"]
    assert len(failed) == 1
    assert not [e for e in await cluster.outbox("roost.fault.set") if "worker-1" in e["data"]["entity_instance_id"]], \
        "a dead host is failed, not degraded per network first"

    # Started again: it answers from its saved config at once, and the host recovers.
    cluster.agent_process("worker-1", "52:54:00:aa:01:01")
    await wait_until(lambda: _is(cluster, "worker-1", "available"), 40, "worker-1 available again")
    healthy = [e for e in await cluster.outbox("roost.heartbeat.host_health")
               if e["data"]["hostname"] == "worker-1"]
    assert [e["data"]["state"] for e in healthy][-1] == "healthy"
    versions = [e["data"]["version"] for e in healthy]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)


@contextlib.asynccontextmanager
async def in_process_agent(cluster: Cluster, name: str, mac: str, keys: ClusterKeys,
                           filters: dict[HbPath, SocketFilter]) -> AsyncIterator[HeartbeatAgentComponent]:
    root = make_simulated_host(cluster.data / "hosts" / name, name, mac)
    component = HeartbeatAgentComponent(keys, cluster.data / "agent-state" / name, socket_filters=filters)
    creds = read_credentials(cluster.data / "agents" / f"{name}.credentials.json")
    agent = HostAgent(name, cluster.server.url, password=creds.password, interval=1.0, root=root,
                      components=[component])
    runner = asyncio.create_task(agent.run())
    try:
        yield component
    finally:
        agent.stop()
        await asyncio.wait_for(runner, 15)


async def test_one_path_cut_degrades_the_host_with_an_alarm_naming_the_network(cluster: Cluster) -> None:
    n = SUFFIX + 2
    creds = read_credentials(cluster.data / "agents" / "worker-2.credentials.json")
    assert creds.heartbeat is not None
    await add_host(cluster, "worker-2", "52:54:00:aa:02:02", n)
    cut = SocketFilter()
    async with in_process_agent(cluster, "worker-2", "52:54:00:aa:02:02", creds.heartbeat,
                                {HbPath.CLUSTER_HOST: cut}):
        await unlock_when_online(cluster, "worker-2")
        await wait_until(lambda: paths_up(cluster, "worker-2"), 30, "worker-2 heard on both networks")

        cut.cut()
        await wait_until(lambda: _is(cluster, "worker-2", "degraded"), 20, "worker-2 degraded")
        host = await cluster.host_status("worker-2")
        assert host is not None and host["state"] == "degraded"
        assert host["paths"]["cluster-host"]["state"] == "down" and host["paths"]["mgmt"]["state"] == "up"
        raised = [e["data"] for e in await cluster.outbox("roost.fault.set")]
        assert {"alarm_id": "950.003", "entity_instance_id": "host=worker-2.network=cluster-host"}.items() <= \
            raised[-1].items(), raised

        cut.heal()
        await wait_until(lambda: _is(cluster, "worker-2", "available"), 30, "worker-2 available again")
        cleared = [e["data"] for e in await cluster.outbox("roost.fault.clear")]
        assert {"alarm_id": "950.003", "entity_instance_id": "host=worker-2.network=cluster-host",
                "prefix": False} in cleared


async def test_an_agent_with_another_key_refuses_its_config_and_the_status_says_why(cluster: Cluster) -> None:
    n = SUFFIX + 3
    creds = read_credentials(cluster.data / "agents" / "worker-2.credentials.json")
    assert creds.heartbeat is not None
    other = ClusterKeys(creds.heartbeat.cluster_id, MasterKey(1, os.urandom(64)))
    await add_host(cluster, "worker-2", "52:54:00:aa:03:03", n)
    async with in_process_agent(cluster, "worker-2", "52:54:00:aa:03:03", other, {}) as component:
        await unlock_when_online(cluster, "worker-2")

        async def refused() -> bool:
            host = await cluster.host_status("worker-2")
            return host is not None and "re-enrol" in host["agent_refused"]

        await wait_until(refused, 20, "worker-2's agent refusing its config")
        assert component.responder is None, "nothing answers with a key every monitor would drop"
        assert creds.heartbeat.fingerprint in (await cluster.host_status("worker-2") or {})["agent_refused"]



async def test_keys_rotate_without_a_missed_heartbeat_and_the_agent_keeps_the_new_key(cluster: Cluster) -> None:
    n = SUFFIX + 4
    creds = read_credentials(cluster.data / "agents" / "worker-2.credentials.json")
    assert creds.heartbeat is not None
    old = creds.heartbeat.fingerprint
    await add_host(cluster, "worker-2", "52:54:00:aa:04:04", n)
    async with in_process_agent(cluster, "worker-2", "52:54:00:aa:04:04", creds.heartbeat, {}) as component:
        await unlock_when_online(cluster, "worker-2")
        await wait_until(lambda: paths_up(cluster, "worker-2"), 30, "worker-2 heard on both networks")

        rotated = await asyncio.to_thread(roost, cluster.data, *cluster.cli, "keys", "rotate", "--json")
        assert rotated.returncode == 0, rotated.stderr
        result = json.loads(rotated.stdout)["result"]
        new = result["fingerprint"]
        assert result["current"] == old and new != old and result["generation"] == 2

        def stored() -> bool:
            keys = load_cluster_keys(cluster.secrets)
            return keys.fingerprint == new and keys.next is None

        await wait_until(stored, 30, "the new key stored as the master key once worker-2 holds it")

        async def old_retired() -> bool:
            states = {k["fingerprint"]: k for k in (await cluster.status())["keys"]}
            return states[new]["state"] == "primary" and states.get(old, {}).get("state") in ("retired", None)

        await wait_until(old_retired, 40, "the old key retired")
        states = {k["fingerprint"]: k for k in (await cluster.status())["keys"]}
        assert states[new]["held_by"] == ["worker-2"] and states[new]["missing_at"] == []
        assert component.responder is not None and component.responder.keyring.primary.key_id == int(new, 16)
        shown = await asyncio.to_thread(roost, cluster.data, *cluster.cli, "keys", "status")
        assert shown.returncode == 0 and new in shown.stdout and "worker-2" in shown.stdout, shown.stderr
        health = [e["data"]["state"] for e in await cluster.outbox("roost.heartbeat.host_health")
                  if e["data"]["hostname"] == "worker-2"]
        assert health == ["healthy"], "the rotation cost no heartbeat"
        key_bytes = load_cluster_keys(cluster.secrets).master.secret
        assert base64.b64encode(key_bytes).decode() not in rotated.stdout + shown.stdout

    # Restarted with its enrolment's (old) credentials, the agent still has the new key from its state dir.
    async with in_process_agent(cluster, "worker-2", "52:54:00:aa:04:04", creds.heartbeat, {}) as again:
        await wait_until(lambda: again.responder is not None, 20, "worker-2 answering again")
        assert again.responder is not None and again.responder.keyring.primary.key_id == int(new, 16)
        await wait_until(lambda: paths_up(cluster, "worker-2"), 30, "worker-2 heard again")


async def test_a_burst_of_forgeries_at_an_agent_raises_950_006_on_its_host(cluster: Cluster) -> None:
    """The agent counts the forged datagrams it drops and reports the burst on its own subject; the heartbeat
    service raises 950.006 on that agent's host and network (the message cannot name another entity)."""
    n = SUFFIX + 5
    creds = read_credentials(cluster.data / "agents" / "worker-2.credentials.json")
    assert creds.heartbeat is not None
    await add_host(cluster, "worker-2", "52:54:00:aa:05:05", n)
    async with in_process_agent(cluster, "worker-2", "52:54:00:aa:05:05", creds.heartbeat, {}) as component:
        await unlock_when_online(cluster, "worker-2")
        await wait_until(lambda: paths_up(cluster, "worker-2"), 30, "worker-2 heard on both networks")
        assert component.responder is not None
        target = component.responder.address(HbPath.MGMT)
        forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            forger.bind((f"127.0.1.{n + 1}", 0))
            forged_key = derive(MasterKey(1, os.urandom(64)), creds.heartbeat.cluster_id, HbPath.MGMT)
            for seq in range(1, 31):                     # well-formed, signed with a key nobody holds
                header = Header(creds.heartbeat.cluster_id, 7777, HbPath.MGMT, 1, os.urandom(8), seq,
                                role=WireRole.ACTIVE)
                forger.sendto(encode(header, Payload(), forged_key), target)
        finally:
            forger.close()

        async def raised() -> bool:
            return any(e["data"]["alarm_id"] == "950.006"
                       and e["data"]["entity_instance_id"] == "host=worker-2.network=mgmt"
                       for e in await cluster.outbox("roost.fault.set"))

        await wait_until(raised, 20, "950.006 on worker-2's mgmt network")
        assert sum(component.responder.drop_counts().values()) >= 10
        host = await cluster.host_status("worker-2")
        assert host is not None and host["state"] == "healthy", "forgeries change nothing else"
