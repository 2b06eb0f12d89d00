"""Update strategies on a site run as `roost up` runs it: inventory, alarms and the orchestrator hosted by
``ServiceHost`` on the policy-enforcing NATS (each service, each agent and the operator log in as their own
broker users), a fresh PostgreSQL database, and eight real `roost agent run` processes (2 controllers,
6 workers) on simulated host trees, whose update component simulates the install.  The controller pair is
the real one: two heartbeat services (controller-0 and controller-1) heartbeating the agents on loopback
paths, the workers voting; a swact step goes through inventory to the active controller's heartbeat
service, which hands the role over and announces it.

1. r1, workers parallel (max 3), worker-4's agent told to fail r1: the controllers (the active one last,
   swacted first) and the first three workers are updated, worker-4's install fails, the strategy fails
   and aborts: the second batch's workers are unlocked again; nobody installed twice;
2. r2 with `roost strategy create` and `roost strategy apply --watch` (live progress): all eight hosts
   updated, applied; a third strategy to r2 finds nothing to do;
3. r3 under strict alarm restrictions: an alarm raised through the real alarms service once the first
   worker batch is done stops the strategy at the second batch's query-alarms; nothing of it was touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from schemas.envelope import Role
from services.alarms.service import AlarmsService
from services.cli.agent import EnrolledAgent, local_policy, save_enrolled, write_credentials
from services.core.auth import create_token
from services.core.brokerauth_apply import apply_nats, broker_password_secret, ensure_broker_passwords
from services.core.bus.bus import Bus
from services.core.bus.factory import transport_from_url
from services.core.embedded.nats_server import NatsServer
from services.core.host import Component, Connections, ServiceHost
from services.core.secrets import SecretStore
from services.core.settings import HeartbeatSettings, load_settings, url_with_credentials
from services.heartbeat.keystore import ensure_cluster_keys
from services.heartbeat.service import HeartbeatService
from services.inventory.agent.simhost import make_simulated_host
from services.inventory.service import InventoryService
from services.orchestrator.agent import saved_state
from services.orchestrator.apply import StepRef
from services.orchestrator.service import OrchestratorService
from services.orchestrator.settings import OrchestratorSettings
from services.orchestrator.strategy import Step
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.nats, pytest.mark.postgres]

ROOST = [sys.executable, "-m", "services.cli"]
CONTROLLERS = ("controller-0", "controller-1")
WORKERS = tuple(f"worker-{i}" for i in range(6))
HOSTS = CONTROLLERS + WORKERS
FINAL = ("applied", "apply-failed", "aborted", "abort-failed")
BASE = random.randint(20, 230)
MONITOR = {"controller-0": BASE, "controller-1": BASE + 1}      # 127.0.1.x / 127.0.2.x
AGENTS = {name: BASE + 2 + i for i, name in enumerate(HOSTS)}
AGENT_PORT = random.randint(30000, 39000)


def addresses(n: int) -> dict[str, str]:
    return {"mgmt": f"127.0.1.{n}", "cluster-host": f"127.0.2.{n}"}


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    env.update({"ROOST_HTTP_BASE_PORT": "0", "ROOST_LOG_FORMAT": "json"})
    return env


class Boundary:
    """The orchestrator's step-boundary hook, set by the test when it wants one."""

    def __init__(self) -> None:
        self.hook: Callable[[str, StepRef, Step], Awaitable[None]] | None = None

    async def __call__(self, name: str, ref: StepRef, step: Step) -> None:
        if self.hook is not None:
            await self.hook(name, ref, step)


@dataclass
class Site:
    data: Path
    server: NatsServer
    secrets: SecretStore
    operator: Bus
    admin: str
    alarms_bus: Bus
    boundary: Boundary
    pool: Any = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def url_for(self, user: str) -> str:
        password = self.secrets.get_text(broker_password_secret(user)).get_secret_value()
        return url_with_credentials(self.server.url, user, password)

    async def ok(self, type: str, data: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        reply = await self.operator.request(self.operator.envelope(type, data), timeout=timeout)
        assert reply.ok, reply.reason
        return dict(reply.result)

    async def host(self, name: str) -> dict[str, Any]:
        return await self.ok("roost.cmd.host.show", {"host": name})

    def state_dir(self, name: str) -> Path:
        return self.data / "agent-state" / name

    def installs(self, name: str) -> list[str]:
        return [i["release"] for i in saved_state(self.state_dir(name)).get("installs", [])]

    def start_agent(self, name: str, mac: str, *extra: str) -> None:
        root = make_simulated_host(self.data / "hosts" / name, name, mac)
        argv = [*ROOST, "--data-dir", str(self.data), "agent", "run", "--name", name, "--credentials",
                str(self.data / "agents" / f"{name}.credentials.json"), "--root", str(root), "--interval", "1",
                "--state-dir", str(self.state_dir(name)), *extra]
        log = (self.data / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(argv, env=clean_env(), stdout=log, stderr=log, start_new_session=True)

    async def roost(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The `roost` command, off the event loop (the services run on it)."""
        return await asyncio.to_thread(self._roost, *args)

    def _roost(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ROOST, "--data-dir", str(self.data), "--bus-url", self.url_for("roost-cli"),
                               "--token", self.admin, *args], env=clean_env(), capture_output=True, text=True,
                              timeout=180)

    async def swacts(self) -> list[str]:
        """The controllers that handed the active role over, in order (the pair's announcements)."""
        rows = await self.pool.fetch("SELECT body FROM heartbeat.outbox ORDER BY id")
        actives: list[str] = []
        for row in rows:
            body = json.loads(bytes(row["body"]))
            active = body["data"].get("active") if body["type"] == "roost.heartbeat.active_controller" else None
            if active and (not actives or actives[-1] != active):
                actives.append(active)
        return actives[:-1]

    async def strategy(self) -> dict[str, Any]:
        shown = (await self.ok("roost.cmd.strategy.show", {}))["strategy"]
        assert shown is not None
        return dict(shown)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    secrets = SecretStore.in_data_dir(data)
    now = datetime.now(UTC).isoformat()
    save_enrolled(data, {n: EnrolledAgent(n, now) for n in HOSTS})
    policy = local_policy(data)
    passwords = ensure_broker_passwords(secrets, policy)
    config = apply_nats(policy, passwords, data / "nats" / "auth.conf", server_name="roost")
    server = NatsServer(data / "nats", server_name="roost", config_file=config, ready_timeout=20.0)
    await server.start()
    keys, _ = ensure_cluster_keys(secrets)
    for name in HOSTS:
        write_credentials(data / "agents" / f"{name}.credentials.json", name,
                          SecretStr(passwords[f"agent-{name}"].get_secret_value()), server.url, keys)
    hosts: list[ServiceHost] = []
    buses: list[Bus] = []
    try:
        async with fresh_database() as db_url, pool_on(db_url) as pool:
            async with pool.acquire() as conn:
                admin = await create_token(conn, "operator", Role.ADMIN)
                tokens = {n: await create_token(conn, f"service:{n}", Role.ADMIN, kind="service")
                          for n in ("inventory", "alarms", "orchestrator", "heartbeat")}
            settings = load_settings(data_dir=data)
            boundary = Boundary()
            orchestrator = OrchestratorService(OrchestratorSettings(
                stabilize_seconds=0, alarms_first_delay=0.5, strategy_poll_interval=0.1, retry_delay_max=0.5),
                boundary=boundary)
            port = random.randint(20000, 29000)
            pair = [HeartbeatService(config=HeartbeatSettings(
                controller=me, addresses=addresses(MONITOR[me]), port=port, agent_port=AGENT_PORT, peer=peer,
                peer_addresses=addresses(MONITOR[peer])), list_retry=0.5, config_retry=0.5, config_resend=2.0)
                for me, peer in (CONTROLLERS, CONTROLLERS[::-1])]
            inventory = InventoryService(go_enabled_timeout=30.0, lock_timeout=30.0, agent_check_interval=0.5,
                                         secrets=secrets)
            components: tuple[Component, ...] = (inventory, AlarmsService(webhooks=False), orchestrator, *pair)
            for component in components:
                host = ServiceHost(component, settings, Connections(url_with_credentials(
                    server.url, component.name, passwords[component.name].get_secret_value()), db_url),
                    tokens[component.name])
                await host.start()
                hosts.append(host)

            def bus_as(user: str, token: str, **kw: Any) -> Bus:
                return Bus(transport_from_url(url_with_credentials(server.url, user,
                                                                   passwords[user].get_secret_value())),
                           source=f"roost/{user}", token=token, **kw)

            operator = bus_as("roost-cli", admin)
            alarms_bus = bus_as("heartbeat", tokens["heartbeat"])
            for bus in (operator, alarms_bus):
                await bus.connect()
                buses.append(bus)
            here = Site(data, server, secrets, operator, admin, alarms_bus, boundary, pool)
            try:
                yield here
            finally:
                for proc in here.procs.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
                for bus in buses:
                    await bus.close()
                for host in reversed(hosts):
                    await host.stop(asyncio.get_running_loop().time() + 20)
    finally:
        await server.stop()


async def provision(site: Site, fail_on: dict[str, str]) -> None:
    """Add the hosts, start their agents (all at once), unlock them once their agents are heard."""
    base = random.randint(16, 200)
    for i, name in enumerate(HOSTS):
        mac = f"52:54:00:{base:02x}:08:{i:02x}"
        personality = "controller" if name.startswith("controller") else "worker"
        await site.ok("roost.cmd.host.add", {"personality": personality, "hostname": name, "mgmt_mac": mac,
                                              "addresses": addresses(AGENTS[name])})
        extra = ("--simulate-update-failure", fail_on[name]) if name in fail_on else ()
        site.start_agent(name, mac, *extra)

    async def heard(name: str) -> bool:
        host = await site.host(name)
        return bool(host["availability"] == "online" and host["inventoried"])

    for name in HOSTS:
        await wait_until(lambda n=name: heard(n), 90, f"{name}'s agent heard")      # type: ignore[misc]
        await site.ok("roost.cmd.host.unlock", {"host": name})
    for name in HOSTS:
        await wait_until(lambda n=name: available(site, n), 60, f"{name} available")  # type: ignore[misc]


async def available(site: Site, name: str) -> bool:
    host = await site.host(name)
    return bool(host["administrative"] == "unlocked" and host["availability"] == "available")


async def no_active_alarms(site: Site) -> None:
    """Until no alarm is active: a strategy's create refuses under strict alarm restrictions, and on a starved
    machine (three test workers on two cores) a heartbeat path can miss its periods for a moment and raise 950.003,
    which clears when the path is heard again."""
    async def none() -> bool:
        return not (await site.ok("roost.cmd.alarm.list", {}))["items"]
    await wait_until(none, 60, "no active alarm")


async def final(site: Site, timeout: float = 120.0) -> dict[str, Any]:
    async def done() -> bool:
        return (await site.strategy())["state"] in FINAL
    await wait_until(done, timeout, "the strategy in a final state")
    return await site.strategy()


async def test_two_controllers_six_parallel_workers_a_failed_install_aborts_then_a_clean_update(site: Site) -> None:
    await provision(site, {"worker-4": "r1"})
    active = [n for n in CONTROLLERS if (await site.host(n))["active"]]
    assert len(active) == 1
    [was_active] = active

    # 1. r1: worker-4's install fails; the strategy fails and aborts, unlocking the second batch
    await no_active_alarms(site)
    created = await site.ok("roost.cmd.strategy.create", {
        "release": {"name": "r1", "version": "1.0.1", "reboot_required": True},
        "worker_apply_type": "parallel", "max_parallel_worker_hosts": 3}, timeout=60)
    stages = [s["name"] for s in created["apply_phase"]["stages"]]
    standby = next(n for n in CONTROLLERS if n != was_active)
    assert stages == [f"update-controller {standby}", f"update-controller {was_active}",
                      "update-workers worker-0, worker-1, worker-2", "update-workers worker-3, worker-4, worker-5"]
    assert [t["name"] for t in created["apply_phase"]["stages"][1]["steps"]][:3] == [
        "query-alarms", "swact-hosts", "lock-hosts"]
    await site.ok("roost.cmd.strategy.apply", {})
    first = await final(site)
    assert first["state"] == "aborted", json.dumps(first, indent=1)[:3000]
    assert "installing r1 1.0.1 failed on worker-4" in first["reason"]
    assert [s["result"] for s in first["apply_phase"]["stages"]] == ["success", "success", "success", "failed"]
    [undo] = first["abort_phase"]["stages"]
    assert undo["steps"][0]["entity_names"] == ["worker-3", "worker-4", "worker-5"]
    assert undo["steps"][0]["result"] == "success"
    assert await site.swacts() == [was_active]
    for name in HOSTS:
        assert await available(site, name), name
    assert {n: site.installs(n) for n in HOSTS} == {
        **{n: ["r1"] for n in (*CONTROLLERS, "worker-0", "worker-1", "worker-2", "worker-3", "worker-5")},
        "worker-4": []}
    in_flight = await site.roost("strategy", "show", "--active")
    assert in_flight.returncode == 0, in_flight.stderr
    assert "apply-update  failed" in in_flight.stdout and "query-alarms" not in in_flight.stdout
    await site.ok("roost.cmd.strategy.delete", {})

    # 2. r2 through the roost command, with live progress
    await no_active_alarms(site)
    created_cli = await site.roost("strategy", "create", "r2", "--version", "1.0.2", "--worker-apply-type", "parallel",
                             "--max-parallel-worker-hosts", "3")
    assert created_cli.returncode == 0, created_cli.stderr
    assert "ready-to-apply" in created_cli.stdout and "release r2 1.0.2 (reboot)" in created_cli.stdout
    applied = await site.roost("strategy", "apply", "--watch", "--interval", "0.2")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    out = applied.stdout
    assert "strategy applied" in out
    assert "[apply 3.2] apply-update worker-3, worker-4, worker-5 success" in out
    assert f"swact-hosts {standby} success" in out            # the role came back to the first active
    second = await site.strategy()
    assert second["state"] == "applied"
    assert all(t["result"] == "success" for s in second["apply_phase"]["stages"] for t in s["steps"])
    assert await site.swacts() == [was_active, standby]
    for name in HOSTS:
        assert site.installs(name)[-1] == "r2" and site.installs(name).count("r2") == 1, name
        assert await available(site, name), name
    shown = await site.roost("strategy", "show", "--details")
    assert shown.returncode == 0 and "apply phase: success" in shown.stdout

    # 3. every host is on r2: nothing to do
    assert (await site.roost("strategy", "delete")).returncode == 0
    again = await site.roost("strategy", "create", "r2", "--version", "1.0.2")
    assert again.returncode == 1 and "no hosts need r2" in again.stderr

    # 4. r3, strict: once the first worker batch is done, a real alarm (heartbeat path lost on worker-4,
    # raised through the alarms service) stops the strategy before the second batch touches a host
    async def raise_alarm(name: str, ref: StepRef, step: Step) -> None:
        if (name, ref.stage_id, step.name) != ("step_finished", 2, "wait-alarms-clear"):
            return
        await site.alarms_bus.publish(site.alarms_bus.envelope("roost.fault.set", {
            "alarm_id": "950.003", "entity_instance_id": "host=worker-4.network=mgmt", "severity": "major",
            "reason_text": "Heartbeat lost from worker-4 on the mgmt network"}))

        async def listed() -> bool:
            alarms = await site.ok("roost.cmd.alarm.list", {})
            return any(a["alarm_id"] == "950.003" for a in alarms["items"])

        await wait_until(listed, 30, "950.003 active")

    site.boundary.hook = raise_alarm
    await no_active_alarms(site)
    await site.ok("roost.cmd.strategy.create", {"release": {"name": "r3", "version": "1.0.3"},
                                                "worker_apply_type": "parallel", "max_parallel_worker_hosts": 3,
                                                "alarm_restrictions": "strict"}, timeout=60)
    await site.ok("roost.cmd.strategy.apply", {})
    third = await final(site)
    assert third["state"] == "aborted", json.dumps(third, indent=1)[:3000]
    blocked = third["apply_phase"]["stages"][3]["steps"][0]
    assert blocked["name"] == "query-alarms" and blocked["result"] == "failed"
    assert "950.003 host=worker-4.network=mgmt (major)" in blocked["reason"]
    assert third["abort_phase"]["stages"] == []
    for name in ("worker-3", "worker-4", "worker-5"):
        assert site.installs(name)[-1] == "r2" and await available(site, name)
    for name in (*CONTROLLERS, "worker-0", "worker-1", "worker-2"):
        assert site.installs(name)[-1] == "r3"
