"""The orchestrator as a real process, killed with SIGKILL (its failpoints) at a step boundary of a strategy,
one step after the other, and started again: it resumes from the persisted step and never repeats a lock,
an unlock or an install.

The boundary is ``step_acted``: the step did its work (the host is locked, the release installed) and the
process dies before the outcome is committed, the hardest case: the next process finds the step
``inprogress`` and must look at the world instead of acting again.  (Every boundary kind, for every step,
is covered in one process by ``test_orchestrator_strategies.py``.)  Inventory and the alarms service run
in the test process under ``ServiceHost`` on a real NATS server; the host agents too (``HostAgent`` with
the update component over NATS).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from schemas.envelope import Role
from services.alarms.service import AlarmsService
from services.core.auth import create_token
from services.core.bus.abc import RequestTimeout
from services.core.bus.bus import Bus
from services.core.bus.nats import NatsTransport
from services.core.embedded.nats_server import NatsServer
from services.core.host import Connections, ServiceHost
from services.core.secrets import SecretStore
from services.core.settings import load_settings
from services.inventory.agent.agent import HostAgent
from services.inventory.agent.simhost import make_simulated_host
from services.inventory.service import InventoryService
from services.orchestrator.agent import UpdateAgentComponent, saved_state
from tests.support.nats import nats_server
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.nats, pytest.mark.postgres]
__all__ = ["nats_server"]

REPO = Path(__file__).resolve().parents[2]
STEPS = ("query-alarms", "lock-hosts", "apply-update", "system-stabilize", "unlock-hosts", "wait-alarms-clear")
FINAL = ("applied", "apply-failed", "aborted", "abort-failed")

CHILD = textwrap.dedent('''
    import asyncio, sys
    from services.core.host import Connections, ServiceHost
    from services.core.settings import load_settings
    from services.orchestrator.service import OrchestratorService
    from services.orchestrator.settings import OrchestratorSettings

    async def main():
        bus_url, db_url, token = sys.argv[1:4]
        settings = OrchestratorSettings(stabilize_seconds=0, alarms_first_delay=0.0, strategy_poll_interval=0.1,
                                        retry_delay_max=0.5)
        host = ServiceHost(OrchestratorService(settings), load_settings(), Connections(bus_url, db_url), token)
        await host.start()
        print("started", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
''')


def child_env(failpoint: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    env.update({"ROOST_LOG_FORMAT": "json", "PYTHONPATH": str(REPO)})
    if failpoint:
        env["ROOST_FAILPOINT"] = failpoint
    return env


class Orchestrators:
    """Orchestrator processes, one after the other, each armed with the failpoint the test names."""

    def __init__(self, bus_url: str, db_url: str, token: str, logs: Path) -> None:
        self.args = [bus_url, db_url, token]
        self.logs = logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed: list[str] = []

    def start(self, failpoint: str | None) -> subprocess.Popen[bytes]:
        log = self.logs.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, *self.args], env=child_env(failpoint), stdout=log,
                                     stderr=log, cwd=REPO)
        return self.proc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.asynccontextmanager
async def site(server: NatsServer, tmp_path: Path) -> AsyncIterator[tuple[Bus, asyncpg.Pool, Orchestrators]]:
    async with fresh_database() as db_url, pool_on(db_url) as pool:
        async with pool.acquire() as conn:
            admin = await create_token(conn, "operator", Role.ADMIN)
            tokens = {n: await create_token(conn, f"service:{n}", Role.ADMIN, kind="service")
                      for n in ("inventory", "alarms", "orchestrator")}
        connections = Connections(server.url, db_url)
        hosts = [ServiceHost(InventoryService(lock_timeout=20.0, go_enabled_timeout=20.0, agent_check_interval=0.5,
                                              secrets=SecretStore(tmp_path / "secrets")), load_settings(), connections,
                             tokens["inventory"]),
                 ServiceHost(AlarmsService(webhooks=False), load_settings(), connections, tokens["alarms"])]
        for host in hosts:
            await host.start()
        operator = Bus(NatsTransport(server.url, client_name="roost-test-operator"), source="roost/cli", token=admin)
        await operator.connect()
        orchestrators = Orchestrators(server.url, db_url, tokens["orchestrator"], tmp_path / "orchestrator.log")
        agents: list[tuple[HostAgent, asyncio.Task[None]]] = []
        try:
            for i, name in enumerate(("controller-0", "worker-0")):
                mac = f"52:54:00:00:09:{i:02x}"
                reply = await operator.request(operator.envelope("roost.cmd.host.add", {
                    "personality": name.split("-")[0], "hostname": name, "mgmt_mac": mac}), timeout=20)
                assert reply.ok, reply.reason
                root = make_simulated_host(tmp_path / "hosts" / name, name, mac)
                agent = HostAgent(name, server.url, root=root, interval=1.0,
                                  components=[UpdateAgentComponent(tmp_path / "state" / name)])
                agents.append((agent, asyncio.create_task(agent.run())))
            yield operator, pool, orchestrators
        finally:
            orchestrators.stop()
            for agent, task in agents:
                agent.stop()
                await task
            await operator.close()
            for host in reversed(hosts):
                await host.stop(asyncio.get_running_loop().time() + 20)


async def test_killed_after_each_step_acted_it_resumes_without_repeating_it(
        nats_server: NatsServer, tmp_path: Path) -> None:
    async with site(nats_server, tmp_path) as (operator, pool, orchestrators):
        async def ok(type: str, data: dict[str, Any]) -> dict[str, Any]:
            reply = await operator.request(operator.envelope(type, data), timeout=30)
            assert reply.ok, reply.reason
            return dict(reply.result)

        async def is_(name: str, administrative: str, availability: str) -> bool:
            host = await ok("roost.cmd.host.show", {"host": name})
            return bool(host["administrative"] == administrative and host["availability"] == availability
                        and host["inventoried"])

        for name in ("controller-0", "worker-0"):
            await wait_until(lambda n=name: is_(n, "locked", "online"), 30, f"{name} online")  # type: ignore[misc]
            await ok("roost.cmd.host.unlock", {"host": name})
            await wait_until(lambda n=name: is_(n, "unlocked", "available"), 30, f"{name} available")  # type: ignore[misc]

        async def serving() -> bool:
            # A process just killed may leave a pull request on the server that takes the next command with it
            # (redelivered only after the ack wait): not answered is "not yet", ask again.
            try:
                reply = await operator.request(operator.envelope("roost.cmd.strategy.show", {}), timeout=5)
            except RequestTimeout:
                return False
            return reply.ok

        orchestrators.start(None)
        await wait_until(serving, 90, "the orchestrator process serving")
        created = await ok("roost.cmd.strategy.create", {
            "release": {"name": "r1", "version": "1.0.1"}, "controller_apply_type": "ignore"})
        assert [t["name"] for t in created["apply_phase"]["stages"][0]["steps"]] == list(STEPS)
        orchestrators.stop()

        first = orchestrators.start("orchestrator.step_acted.query-alarms")
        await wait_until(serving, 90, "the orchestrator process serving")
        await ok("roost.cmd.strategy.apply", {})
        procs = [first]
        for step in STEPS[1:]:
            await asyncio.to_thread(procs[-1].wait, 60)
            assert procs[-1].returncode == -9, f"the orchestrator was not killed at {step}'s predecessor"
            procs.append(orchestrators.start(f"orchestrator.step_acted.{step}"))
        await asyncio.to_thread(procs[-1].wait, 60)
        assert procs[-1].returncode == -9
        state = await pool.fetchval("SELECT state FROM orchestrator.strategies")
        assert state == "applying"                                   # killed before the last outcome was saved
        orchestrators.start(None)                                    # unarmed: it finishes

        async def done() -> bool:
            return await pool.fetchval("SELECT state FROM orchestrator.strategies") in FINAL

        await wait_until(done, 60, "the strategy finished")
        final = (await ok("roost.cmd.strategy.show", {}))["strategy"]
        assert final["state"] == "applied", final
        assert [(t["name"], t["result"]) for t in final["apply_phase"]["stages"][0]["steps"]] == [
            (s, "success") for s in STEPS]
        reasons = {t["name"]: t["reason"] for t in final["apply_phase"]["stages"][0]["steps"]}
        assert reasons["lock-hosts"] == "worker-0 was locked already"          # resumed: looked, did not lock again
        assert reasons["apply-update"] == "worker-0 was on r1 already"
        assert reasons["unlock-hosts"] == "worker-0 was unlocked already"
        assert [i["release"] for i in saved_state(tmp_path / "state" / "worker-0")["installs"]] == ["r1"]
        assert await is_("worker-0", "unlocked", "available")
        events = [json.loads(bytes(r["body"])) for r in await pool.fetch("SELECT body FROM inventory.outbox")]
        logs = [e["data"]["reason_text"] for e in events if e["type"] == "roost.fault.log"
                and e["data"]["entity_instance_id"] == "host=worker-0"]
        assert sum(1 for t in logs if ": lock worker-0:" in t) == 1, logs          # inventory's customer log
        assert sum(1 for t in logs if ": unlock worker-0:" in t) == 2, logs        # the operator's, the strategy's
