"""The update component of a host agent, on the in-memory bus: it reports its release, installs one (once),
fails as told, and keeps its release across a restart of the agent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from schemas.envelope import CommandReply, ReplyStatus, Role
from schemas.orchestrator import AgentRelease, Release
from services.core.auth import InMemoryAuthenticator
from services.core.bus.bus import Bus
from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from services.inventory.agent.agent import HostAgent
from services.inventory.agent.simhost import make_simulated_host
from services.orchestrator.agent import UpdateAgentComponent, saved_state
from tests.support.waiting import wait_until

R1 = Release(name="r1", version="1.0.1", reboot_required=True)
R2 = Release(name="r2", version="1.0.2", reboot_required=False)


@contextlib.asynccontextmanager
async def agent_running(broker: InMemoryBroker, root: Path, state: Path, **options: Any) -> AsyncIterator[HostAgent]:
    component = UpdateAgentComponent(state, **options)
    agent = HostAgent("worker-1", "nats://unused:4222", root=root, interval=3600, transport=InMemoryTransport(broker),
                      components=[component])
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: agent.connected.is_set() and agent._handlers, what="the agent serving commands")
        yield agent
    finally:
        agent.stop()
        await task


async def send(bus: Bus, verb: str, data: dict[str, Any]) -> CommandReply:
    return await bus.request(bus.envelope(f"roost.cmd.agent.{verb}", data), subject=f"roost.cmd.agent.worker-1.{verb}",
                             timeout=10)


@pytest.fixture
async def operator() -> AsyncIterator[tuple[InMemoryBroker, Bus]]:
    broker = InMemoryBroker()
    auth = InMemoryAuthenticator()
    bus = Bus(InMemoryTransport(broker), source="roost/orchestrator", authenticator=auth,
              token=auth.issue("orchestrator", Role.ADMIN, kind="service"))
    await bus.connect()
    yield broker, bus
    await bus.close()


async def test_the_agent_reports_installs_once_and_remembers_its_release(
        operator: tuple[InMemoryBroker, Bus], tmp_path: Path) -> None:
    broker, bus = operator
    root = make_simulated_host(tmp_path / "host", "worker-1", "52:54:00:00:01:01")
    state = tmp_path / "state"
    async with agent_running(broker, root, state):
        before = await send(bus, "release", {})
        assert before.ok and AgentRelease.model_validate(before.result).release is None

        first = await send(bus, "update", {"release": R1.model_dump()})
        assert first.ok, first.reason
        assert AgentRelease.model_validate(first.result).release == R1
        again = await send(bus, "update", {"release": R1.model_dump()})
        assert again.ok and "nothing installed" in again.result["detail"]
        assert [i["release"] for i in saved_state(state)["installs"]] == ["r1"]

    async with agent_running(broker, root, state):                  # restarted: still on r1
        now = await send(bus, "release", {})
        assert AgentRelease.model_validate(now.result).release == R1


async def test_a_simulated_failure_is_refused_with_the_reason_and_the_host_stays_where_it_was(
        operator: tuple[InMemoryBroker, Bus], tmp_path: Path) -> None:
    broker, bus = operator
    root = make_simulated_host(tmp_path / "host", "worker-1", "52:54:00:00:01:01")
    async with agent_running(broker, root, tmp_path / "state", fail_releases=["r2"]):
        assert (await send(bus, "update", {"release": R1.model_dump()})).ok
        failed = await send(bus, "update", {"release": R2.model_dump()})
        assert failed.status is ReplyStatus.REJECTED
        reason = failed.reason or ""
        assert "installing r2 1.0.2 failed on worker-1" in reason and "stays on r1" in reason
        now = await send(bus, "release", {})
        assert AgentRelease.model_validate(now.result).release == R1
    assert saved_state(tmp_path / "state")["release"]["name"] == "r1"
