"""Update strategies applied for real, in one process: the orchestrator with its tables on PostgreSQL, the
real inventory service, real host agents (``HostAgent`` with the update component, on simulated host trees)
on the in-memory bus; the alarm list is a stand-in the test controls.  (The same over NATS with agent
processes and the real alarms service: ``test_orchestrator_strategy_site.py``.)

* the orchestrator "killed" at every step boundary in turn (a crash raised at the boundary; a new instance
  on the same database) over 2 controllers and a worker: it resumes from the persisted step, each swact,
  lock, unlock and install happens once (the swact of the pair is a stand-in for the heartbeat service's);
* a worker whose install fails: the strategy fails, aborts, and the abort unlocks the worker;
* an alarm that appears mid-apply under strict restrictions stops the strategy before the next stage;
* a PodDisruptionBudget refusing the drain of a worker for a while: the lock step waits, then goes on;
* the commands' refusals (one strategy at a time, apply twice, delete while applying).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from pydantic import BaseModel

from schemas import heartbeat as hb
from schemas.alarms import AlarmListResult
from schemas.envelope import Envelope, ReplyStatus, Role
from services.core.bus.abc import OutgoingMessage, ReceivedMessage
from services.core.bus.bus import Bus, Message, Reject
from services.core.bus.memory import InMemoryTransport
from services.core.db.migrations import migrate
from services.core.db.outbox import Outbox
from services.core.host import ServiceContext
from services.core.http import create_app
from services.core.settings import load_settings
from services.inventory.agent.agent import HostAgent
from services.inventory.agent.simhost import make_simulated_host
from services.orchestrator.agent import UpdateAgentComponent, saved_state
from services.orchestrator.apply import StepRef
from services.orchestrator.executor import BOUNDARIES
from services.orchestrator.service import MIGRATIONS, OrchestratorService
from services.orchestrator.settings import OrchestratorSettings
from services.orchestrator.strategy import Step
from tests.support.fake_kube import FakeKube
from tests.support.inventory_site import Site, inventory_database, running_site
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres

R1 = {"name": "r1", "version": "1.0.1", "reboot_required": True}
FINAL = ("applied", "apply-failed", "aborted", "abort-failed")


class Crash(BaseException):
    """The orchestrator dies here (raised at a step boundary: nothing after it runs in that instance)."""


class CountingTransport(InMemoryTransport):
    """The orchestrator's bus connection, counting the commands it sends by (type, host or agent)."""

    def __init__(self, broker: Any, sent: list[tuple[str, str]]) -> None:
        super().__init__(broker)
        self.sent = sent

    async def request(self, message: OutgoingMessage, *, timeout: float) -> ReceivedMessage:
        data = json.loads(message.body)["data"]
        self.sent.append((message.subject, str(data.get("host", ""))))
        return await super().request(message, timeout=timeout)


@dataclass
class Alarms:
    """``roost.cmd.alarm.list`` as the test wants it."""

    items: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, _message: Message) -> BaseModel:
        return AlarmListResult.model_validate({"items": self.items})


def alarm(alarm_id: str, entity: str, severity: str = "minor", mgmt: bool = False) -> dict[str, Any]:
    now = "2026-01-01T00:00:00+00:00"
    return {"uuid": f"a-{alarm_id}", "alarm_id": alarm_id, "alarm_state": "set", "entity_type_id": "host",
            "entity_instance_id": entity, "timestamp": now, "severity": severity, "reason_text": "test",
            "alarm_type": "operational-violation", "probable_cause": "unknown", "proposed_repair_action": "none",
            "service_affecting": False, "suppression": True, "inhibit_alarms": False, "mgmt_affecting": mgmt,
            "degrade_affecting": False, "created_at": now, "updated_at": now, "suppression_status": "unsuppressed",
            "masked": False, "owner": "test", "version": 1}


class PairStandIn:
    """The heartbeat service's part in a swact (``roost.cmd.heartbeat.swact``): move the active role and
    announce it as the heartbeat service does: after it answered, a moment later (``announce_delay``), so an
    orchestrator restarted right after the swact finds inventory not yet told; like a real controller pair,
    it refuses to swact from a controller that is not active (a repeated swact would be caught here)."""

    announce_delay = 0.3

    def __init__(self) -> None:
        self.bus: Bus | None = None
        self.active: str | None = None
        self.version = 10
        self.swacts: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def handle(self, message: Message) -> BaseModel:
        data = message.data
        assert isinstance(data, hb.Swact) and self.bus is not None
        if self.active is not None and data.from_host != self.active:
            raise Reject(f"{data.from_host} is not the active controller")
        self.swacts.append(data.from_host)
        self.active, self.version = data.to_host, self.version + 2
        announcement = self.bus.envelope("roost.heartbeat.active_controller", hb.ActiveController(
            entity_id="controller-pair", version=self.version, active=data.to_host, standby=data.from_host))
        self.tasks.append(asyncio.create_task(self._announce(announcement)))
        return hb.SwactResult(active=data.to_host)

    async def _announce(self, announcement: Envelope) -> None:
        await asyncio.sleep(self.announce_delay)
        assert self.bus is not None
        await self.bus.publish(announcement)


@dataclass
class Strategies:
    site: Site
    tmp: Path
    alarms: Alarms
    settings: OrchestratorSettings
    pair: PairStandIn
    sent: list[tuple[str, str]] = field(default_factory=list)
    agents: dict[str, tuple[HostAgent, asyncio.Task[None]]] = field(default_factory=dict)
    service: OrchestratorService | None = None
    bus: Bus | None = None
    starts: int = 0

    async def start_orchestrator(self, boundary: Any = None) -> OrchestratorService:
        service, bus = await self.replica(boundary)
        self.service, self.bus = service, bus
        self.starts += 1
        return service

    async def replica(self, boundary: Any = None) -> tuple[OrchestratorService, Bus]:
        """An orchestrator instance on the same database and broker (its bus counts what it sends)."""
        transport = CountingTransport(self.site.broker, self.sent)
        bus = Bus(transport, source="roost/orchestrator", authenticator=self.site.auth,
                  token=self.site.auth.issue("orchestrator", Role.ADMIN, kind="service"))
        await bus.connect()
        service = OrchestratorService(self.settings, boundary=boundary)
        ctx = ServiceContext("orchestrator", load_settings(), self.site.pool, bus, Outbox("orchestrator"))
        await service.start(ctx)
        return service, bus

    async def stop_orchestrator(self) -> None:
        if self.service is not None:
            await self.service.stop()
        if self.bus is not None:
            await self.bus.close()
        self.service = self.bus = None

    def state_dir(self, name: str) -> Path:
        return self.tmp / "agent-state" / name

    async def start_agent(self, name: str, mac: str, *, fail: tuple[str, ...] = (), interval: float = 5.0) -> None:
        root = make_simulated_host(self.tmp / "hosts" / name, name, mac)
        agent = HostAgent(name, "nats://unused:4222", root=root, interval=interval, transport=InMemoryTransport(
            self.site.broker), components=[UpdateAgentComponent(self.state_dir(name), fail_releases=fail)])
        self.agents[name] = (agent, asyncio.create_task(agent.run()))

    async def add(self, name: str, personality: str, n: int, *, fail: tuple[str, ...] = (),
                  interval: float = 5.0) -> None:
        mac = f"52:54:00:00:07:{n:02x}"
        await self.site.ok("roost.cmd.host.add", {"personality": personality, "hostname": name, "mgmt_mac": mac})
        await self.start_agent(name, mac, fail=fail, interval=interval)

        async def ready() -> bool:
            host = await self.site.host(name)
            return bool(host["availability"] == "online" and host["inventoried"] and host["agent"] == name)

        await wait_until(ready, what=f"{name} online and inventoried by its agent")
        await self.site.ok("roost.cmd.host.unlock", {"host": name})
        await wait_until(lambda: self.is_(name, "unlocked", "available"), what=f"{name} available")

    async def is_(self, name: str, administrative: str, availability: str) -> bool:
        host = await self.site.host(name)
        return bool(host["administrative"] == administrative and host["availability"] == availability)

    async def command(self, verb: str, data: dict[str, Any] | None = None) -> Any:
        return await self.site.command(f"roost.cmd.strategy.{verb}", data or {})

    async def ok(self, verb: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = await self.command(verb, data)
        assert reply.ok, reply.reason
        return dict(reply.result)

    async def strategy(self) -> dict[str, Any]:
        shown = (await self.ok("show"))["strategy"]
        assert shown is not None
        return dict(shown)

    async def final(self, timeout: float = 60.0) -> dict[str, Any]:
        async def done() -> bool:
            return (await self.strategy())["state"] in FINAL
        await wait_until(done, timeout, "the strategy in a final state")
        return await self.strategy()

    def count(self, type: str, host: str = "") -> int:
        return sum(1 for t, h in self.sent if t == type and (not host or h == host))

    def installs(self, name: str) -> list[str]:
        return [i["release"] for i in saved_state(self.state_dir(name)).get("installs", [])]


@contextlib.asynccontextmanager
async def strategies(tmp_path: Path, **settings: Any) -> AsyncIterator[Strategies]:
    options: dict[str, Any] = {"stabilize_seconds": 0, "alarms_first_delay": 0.0, "strategy_poll_interval": 0.05,
                               "retry_delay_max": 0.1, "query_timeout": 10.0, "drain_poll_interval": 0.05, **settings}
    async with inventory_database() as pool:
        await migrate(pool, "orchestrator", MIGRATIONS)
        async with running_site(pool, go_enabled_timeout=10.0, lock_timeout=15.0) as site:
            alarms = Alarms()
            await site.serve("roost.cmd.alarm.>", "alarms", alarms.handle)
            pair = PairStandIn()
            pair.bus = await site.bus("roost/heartbeat")
            await site.serve("roost.cmd.heartbeat.>", "heartbeat", pair.handle)
            here = Strategies(site, tmp_path, alarms, OrchestratorSettings(**options), pair)
            try:
                yield here
            finally:
                await here.stop_orchestrator()
                for agent, task in here.agents.values():
                    agent.stop()
                    await task


def stage_steps(strategy: dict[str, Any]) -> list[list[tuple[str, str]]]:
    return [[(t["name"], t["result"]) for t in stage["steps"]] for stage in strategy["apply_phase"]["stages"]]


# -- restarts -------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("boundary", BOUNDARIES)
async def test_killed_at_every_step_boundary_it_resumes_and_never_repeats_a_swact_lock_unlock_or_install(
        tmp_path: Path, boundary: str) -> None:
    async with strategies(tmp_path) as s:
        await s.add("controller-0", "controller", 1)                # active: unlocked first
        await s.add("controller-1", "controller", 2)
        await s.add("worker-0", "worker", 3)
        crashed: list[tuple[str, int, int, str]] = []

        def crash_once_per_step(name: str, ref: StepRef, step: Step) -> None:
            key = (ref.phase, ref.stage_id, ref.step_id, step.name)
            if name == boundary and key not in crashed:      # once per step: else step_acted never ends
                crashed.append(key)
                raise Crash(f"{name} of {step.name}")

        service = await s.start_orchestrator(crash_once_per_step)
        created = await s.ok("create", {"release": R1})
        plan = [[t["name"] for t in stage["steps"]] for stage in created["apply_phase"]["stages"]]
        assert [stage["name"] for stage in created["apply_phase"]["stages"]] == [
            "update-controller controller-1", "update-controller controller-0", "update-workers worker-0"]
        assert plan[1][:3] == ["query-alarms", "swact-hosts", "lock-hosts"]
        await s.ok("apply")

        async def state() -> str:
            return str(await s.site.pool.fetchval("SELECT state FROM orchestrator.strategies"))

        async def crashed_or_final() -> bool:
            assert s.starts < 40, "more restarts than steps"
            if service.driver_error is not None:
                return True
            # the last step's outcome commits the final state before its step_finished boundary: stopping the
            # instance on seeing that state could cut it off before that boundary (seen under load), so there
            # the crash is what ends the run
            return await state() in FINAL and boundary != "step_finished"

        while True:                                      # every instance dies at its first boundary of this kind
            await wait_until(crashed_or_final, what="a crash or the end")
            assert service.driver_error is None or isinstance(service.driver_error, Crash)
            await s.stop_orchestrator()
            if await state() in FINAL:
                break
            service = await s.start_orchestrator(crash_once_per_step)
        await s.start_orchestrator()
        final = await s.strategy()
        for name in ("controller-0", "controller-1", "worker-0"):
            assert await s.is_(name, "unlocked", "available"), name
        assert (await s.site.host("controller-1"))["active"]

    assert final["state"] == "applied", final
    assert [k[3] for k in crashed] == [name for stage in plan for name in stage]     # every boundary, in turn
    assert stage_steps(final) == [[(n, "success") for n in stage] for stage in plan]
    assert s.pair.swacts == ["controller-0"] and s.count("roost.cmd.host.swact") == 1
    for name in ("controller-0", "controller-1", "worker-0"):
        assert s.count("roost.cmd.host.lock", name) == 1, name
        assert s.count("roost.cmd.host.unlock", name) == 1, name
        assert s.count(f"roost.cmd.agent.{name}.update") == 1 and s.installs(name) == ["r1"], name
    if boundary == "step_acted":                # the outcome was lost with the instance: the world was asked
        assert s.count("roost.cmd.host.show", "worker-0") >= 2


# -- failures -------------------------------------------------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_failed_install_fails_the_strategy_which_aborts_and_unlocks_the_worker(tmp_path: Path) -> None:
    failures = sample("roost_orchestrator_strategy_step_failures_total", step="apply-update", result="failed")
    aborted = sample("roost_orchestrator_strategies_total", state="aborted")
    async with strategies(tmp_path) as s:
        await s.add("controller-0", "controller", 1)
        await s.add("worker-0", "worker", 2)
        await s.add("worker-1", "worker", 3, fail=("r1",))
        await s.start_orchestrator()
        await s.ok("create", {"release": R1, "controller_apply_type": "ignore", "worker_apply_type": "parallel"})
        await s.ok("apply")
        final = await s.final()
        assert final["state"] == "aborted", final
        assert "installing r1 1.0.1 failed on worker-1" in final["reason"]
        [stage] = final["apply_phase"]["stages"]
        assert stage["result"] == "failed"
        assert [(t["name"], t["result"]) for t in stage["steps"]][:3] == [
            ("query-alarms", "success"), ("lock-hosts", "success"), ("apply-update", "failed")]
        [undo] = final["abort_phase"]["stages"]
        assert [(t["name"], t["entity_names"], t["result"]) for t in undo["steps"]] == [
            ("unlock-hosts", ["worker-0", "worker-1"], "success")]
        assert await s.is_("worker-1", "unlocked", "available") and await s.is_("worker-0", "unlocked", "available")
        assert s.installs("worker-1") == [] and s.installs("worker-0") == ["r1"]
        events = await s.site.pool.fetch("SELECT body FROM orchestrator.outbox ORDER BY id")
        states = [json.loads(bytes(r["body"]))["data"]["state"] for r in events
                  if json.loads(bytes(r["body"]))["type"] == "roost.strategy.state_changed"]
        assert states == ["ready-to-apply", "applying", "apply-failed", "aborting", "aborting", "aborted"]
        steps = [json.loads(bytes(r["body"]))["data"] for r in events
                 if json.loads(bytes(r["body"]))["type"] == "roost.strategy.step_changed"]
        assert [(d["step_name"], d["result"]) for d in steps][:3] == [
            ("query-alarms", "inprogress"), ("query-alarms", "success"), ("lock-hosts", "inprogress")]
        versions = [json.loads(bytes(r["body"]))["data"]["version"] for r in events]
        assert versions == list(range(1, len(versions) + 1))          # one per transition, in order
    assert sample("roost_orchestrator_strategy_step_failures_total", step="apply-update", result="failed") == \
        failures + 1
    assert sample("roost_orchestrator_strategies_total", state="aborted") == aborted + 1
    assert sample("roost_orchestrator_strategy_state", state="aborted") == 1


async def test_an_alarm_raised_mid_apply_stops_a_strict_strategy_before_the_next_stage(tmp_path: Path) -> None:
    async with strategies(tmp_path) as s:
        await s.add("controller-0", "controller", 1)
        await s.add("worker-0", "worker", 2)
        await s.add("worker-1", "worker", 3)
        s.alarms.items = [alarm("950.001", "host=worker-9", "warning", mgmt=True)]      # host locked: expected

        def raise_after_first_stage(name: str, _ref: StepRef, step: Step) -> None:
            if (name, step.name) == ("step_finished", "wait-alarms-clear") and len(s.alarms.items) == 1:
                s.alarms.items.append(alarm("950.004", "host=worker-1"))

        await s.start_orchestrator(raise_after_first_stage)
        await s.ok("create", {"release": R1, "controller_apply_type": "ignore", "alarm_restrictions": "strict"})
        await s.ok("apply")
        final = await s.final()
    assert final["state"] == "aborted", final
    first, second = final["apply_phase"]["stages"]
    assert first["result"] == "success" and second["result"] == "failed"
    assert second["steps"][0]["name"] == "query-alarms" and second["steps"][0]["result"] == "failed"
    assert "950.004 host=worker-1 (minor)" in second["steps"][0]["reason"] and "strict" in final["reason"]
    assert final["abort_phase"]["stages"] == []                 # nothing of worker-1 was touched
    assert s.count("roost.cmd.host.lock", "worker-1") == 0 and s.installs("worker-1") == []


async def test_a_minor_alarm_refuses_a_strict_strategy_and_lets_a_relaxed_one_pass(tmp_path: Path) -> None:
    async with strategies(tmp_path) as s:
        await s.add("controller-0", "controller", 1)
        await s.add("worker-0", "worker", 2)
        s.alarms.items = [alarm("950.004", "host=worker-0")]
        await s.start_orchestrator()
        strict = await s.command("create", {"release": R1, "controller_apply_type": "ignore"})
        assert strict.status is ReplyStatus.REJECTED                       # as the VIM's build: alarms present
        assert "1 active alarm: 950.004 host=worker-0 (minor) (alarm restrictions: strict)" in (strict.reason or "")
        assert (await s.ok("show")) == {"strategy": None}
        await s.ok("create", {"release": {**R1, "reboot_required": False}, "controller_apply_type": "ignore",
                              "alarm_restrictions": "relaxed"})
        await s.ok("apply")
        final = await s.final()
    assert final["state"] == "applied", final
    assert stage_steps(final) == [[("query-alarms", "success"), ("apply-update", "success"),
                                   ("system-stabilize", "success")]]
    assert s.count("roost.cmd.host.lock") == 0          # no reboot needed: the worker stays in service


@pytest.mark.slow
async def test_a_disruption_budget_refusing_the_drain_for_a_while_holds_the_lock_step(tmp_path: Path) -> None:
    with FakeKube() as fake:
        for name in ("controller-0", "worker-0", "worker-1"):
            fake.add_node(name)
        fake.add_pod("web-0", "worker-0", labels={"app": "web"})
        fake.add_pod("web-1", "worker-1", labels={"app": "web"})
        fake.add_pdb("web-pdb", match_labels={"app": "web"}, min_available=2)
        async with strategies(tmp_path, kubeconfig=fake.kubeconfig(tmp_path), drain_timeout=10.0) as s:
            await s.add("controller-0", "controller", 1)
            await s.add("worker-0", "worker", 2)
            await s.start_orchestrator()
            await s.ok("create", {"release": R1, "controller_apply_type": "ignore"})
            await s.ok("apply")
            await wait_until(lambda: fake.evicted(429), what="the budget refusing an eviction")
            shown = await s.strategy()
            assert shown["state"] == "applying"
            assert shown["apply_phase"]["stages"][0]["steps"][1]["result"] == "inprogress"   # lock-hosts waits
            fake.add_pod("web-2", "worker-1", labels={"app": "web"})       # scaled out: one may go now
            final = await s.final()
        assert final["state"] == "applied", final
        assert fake.evicted() == ["default/web-0"]
        assert not fake.unschedulable("worker-0") and fake.taints("worker-0") == []    # unlocked: back in service


async def test_one_strategy_at_a_time_and_what_is_refused_while_it_applies(tmp_path: Path) -> None:
    async with strategies(tmp_path, stabilize_seconds=600) as s:
        await s.add("controller-0", "controller", 1)
        await s.add("worker-0", "worker", 2)
        await s.start_orchestrator()
        assert (await s.ok("show")) == {"strategy": None}
        created = await s.ok("create", {"release": R1, "controller_apply_type": "ignore"})
        assert created["state"] == "ready-to-apply" and created["skipped"] == {
            "controller-0": "controller apply type is ignore"}
        again = await s.command("create", {"release": R1})
        assert again.status is ReplyStatus.REJECTED and "exists already" in (again.reason or "")
        assert (await s.ok("apply"))["state"] == "applying"
        twice = await s.command("apply")
        assert twice.status is ReplyStatus.REJECTED and "ready-to-apply" in (twice.reason or "")

        async def stabilizing() -> bool:
            return bool((await s.strategy())["apply_phase"]["stages"][0]["steps"][3]["result"] == "inprogress")

        await wait_until(stabilizing, what="worker-0 locked, updated and stabilising")
        refused = await s.command("delete")
        assert refused.status is ReplyStatus.REJECTED and "abort it first" in (refused.reason or "")
        deleted = await s.ok("delete", {"force": True})
        assert deleted["state"] == "applying"
        assert (await s.ok("show")) == {"strategy": None}
        nothing = await s.command("create", {"release": R1, "controller_apply_type": "ignore"})
        assert nothing.status is ReplyStatus.REJECTED and "no hosts need r1" in (nothing.reason or "")
        assert "worker-0: already on r1" in (nothing.reason or "")
        assert s.count("roost.cmd.host.unlock") == 0            # the force-deleted strategy went no further
        assert await s.is_("worker-0", "locked", "online")


async def test_an_abort_while_the_workers_are_locked_unlocks_them(tmp_path: Path) -> None:
    async with strategies(tmp_path, stabilize_seconds=600) as s:
        await s.add("controller-0", "controller", 1)
        await s.add("worker-0", "worker", 2)
        await s.start_orchestrator()
        await s.ok("create", {"release": R1, "controller_apply_type": "ignore"})
        await s.ok("apply")

        async def stabilizing() -> bool:
            steps = (await s.strategy())["apply_phase"]["stages"][0]["steps"]
            return bool(steps[3]["result"] == "inprogress")

        await wait_until(stabilizing, what="the worker locked, updated and stabilising")
        assert await s.is_("worker-0", "locked", "online")
        aborting = await s.ok("abort")
        assert aborting["state"] in ("aborting", "aborted")
        final = await s.final()
    assert final["state"] == "aborted"
    assert final["apply_phase"]["stages"][0]["steps"][3]["result"] == "aborted"       # the wait was cut short
    [undo] = final["abort_phase"]["stages"]
    assert undo["steps"][0]["name"] == "unlock-hosts" and undo["steps"][0]["result"] == "success"
    assert s.installs("worker-0") == ["r1"]                   # an install is not undone


# -- REST -----------------------------------------------------------------------------------------------------


async def test_the_rest_api_in_the_vim_shape_with_apply_stage(tmp_path: Path) -> None:
    async with strategies(tmp_path) as s:
        await s.add("controller-0", "controller", 1)
        await s.add("controller-1", "controller", 2)
        await s.add("worker-0", "worker", 3)
        service = await s.start_orchestrator()
        app = create_app("orchestrator", authenticator=s.site.auth, routers=service.routers())
        admin = {"Authorization": f"Bearer {s.site.admin}"}
        reader = {"X-Auth-Token": s.site.reader}
        base = "/api/orchestration/sw-deploy/strategy"
        body = {"release": R1}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orchestrator") as http:
            assert (await http.get(base, headers=reader)).json() == {"strategy": None}
            assert (await http.post(base, json=body, headers=reader)).status_code == 403
            assert (await http.post(base, json={**body, "max_parallel_worker_hosts": 99},
                                    headers=admin)).status_code == 422
            none = await http.post(f"{base}/actions", json={"action": "apply-all"}, headers=admin)
            assert none.status_code == 404
            created = await http.post(base, json=body, headers=admin)
            assert created.status_code == 201 and created.json()["state"] == "ready-to-apply"
            assert (await http.post(base, json=body, headers=admin)).status_code == 409
            actions = f"{base}/actions"
            assert (await http.post(actions, json={"action": "apply-stage"}, headers=admin)).status_code == 400
            assert (await http.post(actions, json={"action": "abort-stage", "stage-id": "0"},
                                    headers=admin)).status_code == 400
            later = await http.post(actions, json={"action": "apply-stage", "stage-id": "1"}, headers=admin)
            assert later.status_code == 409 and "not the next stage" in later.json()["detail"]
            first = await http.post(actions, json={"action": "apply-stage", "stage-id": "0"}, headers=admin)
            assert first.status_code == 202 and first.json()["stop_at_stage"] == 1

            async def paused() -> bool:
                shown = await s.strategy()
                return bool(shown["apply_phase"]["current_stage"] == 1 and shown["state"] == "applying")

            await wait_until(paused, what="controller-1's stage applied, the strategy paused")
            shown = await s.strategy()
            assert "stage 0 applied" in shown["reason"] and shown["apply_phase"]["stages"][1]["result"] == "initial"
            applied = await http.post(actions, json={"action": "apply-all"}, headers=admin)
            assert applied.status_code == 202 and applied.json()["state"] == "applying"
            final = await s.final()
            assert final["state"] == "applied"
            current = await http.get("/api/orchestration/current-strategy/strategy", headers=reader)
            assert current.json()["strategy"]["uuid"] == final["uuid"]
            assert (await http.post(f"{base}/actions", json={"action": "abort"}, headers=admin)).status_code == 409
            assert (await http.delete(base, headers=admin)).status_code == 204
            assert (await http.delete(base, headers=admin)).status_code == 404
            nothing = await http.post(base, json=body, headers=admin)
            assert nothing.status_code == 400 and "no hosts need r1" in nothing.json()["detail"]
        assert s.pair.swacts == ["controller-0"]


async def test_an_agent_that_does_not_answer_times_the_update_out_and_the_abort_unlocks_once_it_is_back(
        tmp_path: Path) -> None:
    async with strategies(tmp_path, query_timeout=1.0) as s:
        await s.add("controller-0", "controller", 1)
        await s.add("worker-0", "worker", 2)
        await s.start_orchestrator()
        await s.ok("create", {"release": R1, "controller_apply_type": "ignore"})
        # step timeouts are data: this one short, so that the test does not wait the VIM's 1800 s
        await s.site.pool.execute("UPDATE orchestrator.strategy_steps SET timeout = 3 WHERE name = 'apply-update'")
        agent, task = s.agents.pop("worker-0")
        agent.stop()
        await task                                                      # the agent is down
        await s.ok("apply")

        async def timed_out() -> bool:
            steps = (await s.strategy())["apply_phase"]["stages"][0]["steps"]
            return bool(steps[2]["result"] == "timed-out")

        await wait_until(timed_out, 30, "apply-update timed out")
        shown = await s.strategy()
        assert "not done within 3 s" in shown["apply_phase"]["stages"][0]["steps"][2]["reason"]
        assert "its agent does not answer" in shown["apply_phase"]["stages"][0]["steps"][2]["reason"]
        await s.start_agent("worker-0", "52:54:00:00:07:02")          # back: the unlock's in-test passes
        final = await s.final()
        assert final["state"] == "aborted", final
        assert final["abort_phase"]["stages"][0]["steps"][0]["result"] == "success"
        assert await s.is_("worker-0", "unlocked", "available")
        assert s.installs("worker-0") == []


async def test_without_stop_on_failure_the_failed_worker_is_unlocked_and_the_next_stage_runs(tmp_path: Path) -> None:
    async with strategies(tmp_path) as s:
        await s.add("controller-0", "controller", 1)
        await s.add("worker-0", "worker", 2, fail=("r1",))
        await s.add("worker-1", "worker", 3)
        await s.start_orchestrator()
        await s.ok("create", {"release": R1, "controller_apply_type": "ignore", "stop_on_failure": False})
        await s.ok("apply")
        final = await s.final()
        assert final["state"] == "apply-failed" and final["abort_phase"] is None, final
        first, second = final["apply_phase"]["stages"]
        assert [(t["name"], t["result"]) for t in first["steps"]] == [
            ("query-alarms", "success"), ("lock-hosts", "success"), ("apply-update", "failed"),
            ("unlock-hosts", "success")]
        assert first["result"] == "failed" and second["result"] == "success"
        assert await s.is_("worker-0", "unlocked", "available") and await s.is_("worker-1", "unlocked", "available")
        assert s.installs("worker-0") == [] and s.installs("worker-1") == ["r1"]


async def test_two_replicas_apply_each_step_once(tmp_path: Path) -> None:
    async with strategies(tmp_path) as s:
        await s.add("controller-0", "controller", 1)
        await s.add("worker-0", "worker", 2)
        await s.add("worker-1", "worker", 3)
        await s.start_orchestrator()
        other, other_bus = await s.replica()
        try:
            await s.ok("create", {"release": R1, "controller_apply_type": "ignore", "worker_apply_type": "parallel"})
            await s.ok("apply")
            final = await s.final()
        finally:
            await other.stop()
            await other_bus.close()
    assert final["state"] == "applied", final
    for name in ("worker-0", "worker-1"):
        assert s.count("roost.cmd.host.lock", name) == 1 and s.count("roost.cmd.host.unlock", name) == 1
        assert s.count(f"roost.cmd.agent.{name}.update") == 1 and s.installs(name) == ["r1"]
    assert s.count("roost.cmd.alarm.list") == 3            # create, query-alarms, wait-alarms-clear: by one replica


@pytest.mark.slow
async def test_killed_after_each_step_acted_while_aborting_it_still_unlocks_once(tmp_path: Path) -> None:
    async with strategies(tmp_path) as s:
        await s.add("controller-0", "controller", 1)
        await s.add("worker-0", "worker", 2, fail=("r1",))
        crashed: list[tuple[str, int, int]] = []

        def crash_once_per_step(name: str, ref: StepRef, _step: Step) -> None:
            if name == "step_acted" and (ref.phase, ref.stage_id, ref.step_id) not in crashed:
                crashed.append((ref.phase, ref.stage_id, ref.step_id))
                raise Crash(name)

        service = await s.start_orchestrator(crash_once_per_step)
        await s.ok("create", {"release": R1, "controller_apply_type": "ignore"})
        await s.ok("apply")

        while True:                                  # query-alarms, lock, apply-update (fails), the abort's unlock
            await wait_until(lambda svc=service: svc.driver_error is not None, what="a crash")  # type: ignore[misc]
            await s.stop_orchestrator()
            if crashed[-1][0] == "abort":
                break
            service = await s.start_orchestrator(crash_once_per_step)
        await s.start_orchestrator()
        final = await s.final()
        assert await s.is_("worker-0", "unlocked", "available")
    assert final["state"] == "aborted", final
    assert crashed == [("apply", 0, 0), ("apply", 0, 1), ("apply", 0, 2), ("abort", 0, 0)]
    assert s.count("roost.cmd.host.lock", "worker-0") == 1 and s.count("roost.cmd.host.unlock", "worker-0") == 1
    assert s.installs("worker-0") == []


async def test_a_host_that_goes_offline_while_the_system_stabilises_fails_the_stage(tmp_path: Path) -> None:
    async with strategies(tmp_path, stabilize_seconds=600) as s:
        await s.add("controller-0", "controller", 1)
        await s.add("worker-0", "worker", 2, interval=0.3)           # silent for 3 intervals: offline
        await s.start_orchestrator()
        await s.ok("create", {"release": R1, "controller_apply_type": "ignore"})
        await s.ok("apply")

        async def stabilizing() -> bool:
            return bool((await s.strategy())["apply_phase"]["stages"][0]["steps"][3]["result"] == "inprogress")

        await wait_until(stabilizing, what="worker-0 locked, updated and stabilising")
        agent, task = s.agents.pop("worker-0")
        agent.stop()
        await task                                                      # worker-0 goes quiet
        failed = await s.final()
        assert failed["state"] in ("aborted", "abort-failed"), failed
        step = failed["apply_phase"]["stages"][0]["steps"][3]
        assert step["result"] == "failed"
        assert "worker-0 went from locked-disabled-online to locked-disabled-offline" in step["reason"]


async def test_an_abort_between_two_stages_is_at_once(tmp_path: Path) -> None:
    async with strategies(tmp_path) as s:
        await s.add("controller-0", "controller", 1)
        await s.add("worker-0", "worker", 2)
        await s.add("worker-1", "worker", 3)
        await s.start_orchestrator()
        await s.ok("create", {"release": R1, "controller_apply_type": "ignore"})
        await s.ok("apply", {"stage_id": 0})

        async def paused() -> bool:
            return bool((await s.strategy())["apply_phase"]["current_stage"] == 1)

        await wait_until(paused, what="the first stage applied")
        aborted = await s.ok("abort")
        assert aborted["state"] == "aborted" and aborted["abort_phase"]["stages"] == []
        assert [st["result"] for st in aborted["apply_phase"]["stages"]] == ["success", "aborted"]
        assert s.installs("worker-0") == ["r1"] and s.installs("worker-1") == []
