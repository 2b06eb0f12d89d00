"""The orchestrator service on the bus with the real inventory service: an operator's lock goes to inventory,
inventory asks the orchestrator to disable the host's services, the orchestrator cordons, drains and taints
the host's node on the fake Kubernetes API server (through the real client), and inventory locks the host.

Most tests use the inventory test site (real PostgreSQL, in-memory bus); the last one runs both services as
``roost up`` hosts them (``ServiceHost``: own bus connections with PostgreSQL-checked tokens) on a real NATS
JetStream server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.envelope import ReplyStatus, Role
from services.core.auth import create_token
from services.core.bus.bus import Bus
from services.core.bus.nats import NatsTransport
from services.core.db.migrations import migrate
from services.core.db.outbox import Outbox
from services.core.embedded.nats_server import NatsServer
from services.core.host import Connections, ServiceContext, ServiceHost
from services.core.secrets import SecretStore
from services.core.settings import ConfigError, load_settings
from services.inventory.service import InventoryService
from services.orchestrator.kube import KubeConfigError
from services.orchestrator.service import OrchestratorService, build_orchestrator
from services.orchestrator.settings import OrchestratorSettings, load_orchestrator_settings
from tests.support.fake_kube import FakeKube
from tests.support.inventory_site import Site, hello, inventory, inventory_database, provisioned, running_site, unlocked
from tests.support.nats import nats_server
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres
__all__ = ["nats_server"]       # the fixture

TAINT = {"key": "roost.io/locked", "value": "true", "effect": "NoExecute"}


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with FakeKube() as kube:
        for name in ("controller-0", "worker-0", "worker-1"):
            kube.add_node(name)
        yield kube


def orchestrator_settings(fake: FakeKube | None, tmp_path: Path, **extra: Any) -> OrchestratorSettings:
    options: dict[str, Any] = {"drain_timeout": 3.0, "drain_poll_interval": 0.05, **extra}
    if fake is not None:
        options["kubeconfig"] = fake.kubeconfig(tmp_path)
    return OrchestratorSettings(**options)


@contextlib.asynccontextmanager
async def orchestrator_on(site: Site, settings: OrchestratorSettings) -> AsyncIterator[OrchestratorService]:
    service = build_orchestrator(settings)
    assert service.migrations is not None
    await migrate(site.pool, "orchestrator", service.migrations)      # as ServiceHost does
    bus = await site.bus("roost/orchestrator", site.auth.issue("orchestrator", Role.ADMIN, kind="service"))
    await service.start(ServiceContext("orchestrator", load_settings(), site.pool, bus, Outbox("orchestrator")))
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    async with inventory_database() as pool, running_site(pool) as s:   # inventory waits 5 s for the orchestrator
        await provisioned(s, "controller-0", "controller", "52:54:00:00:00:01")
        await unlocked(s, "controller-0")
        await provisioned(s, "worker-0", "worker", "52:54:00:00:00:10")
        await unlocked(s, "worker-0")
        yield s


def state(host: dict[str, Any]) -> tuple[str, str, str]:
    return host["administrative"], host["operational"], host["availability"]


async def test_lock_through_inventory_drains_and_taints_the_node_and_unlock_reverses_it(
        site: Site, fake: FakeKube, tmp_path: Path) -> None:
    for i in range(3):
        fake.add_pod(f"web-{i}", "worker-0", labels={"app": "web"})
    fake.add_pod("agent-x", "worker-0", namespace="kube-system", owner=("DaemonSet", "agent"))
    async with orchestrator_on(site, orchestrator_settings(fake, tmp_path)):
        locked = await site.ok("roost.cmd.host.lock", {"host": "worker-0"})

        assert locked["host"]["administrative"] == "locked", locked
        assert "3 pods evicted" in locked["detail"] and "roost.io/locked" in locked["detail"]
        assert fake.unschedulable("worker-0") and fake.taints("worker-0") == [TAINT]
        assert fake.pod_names("worker-0") == {"agent-x"}
        assert not fake.unschedulable("controller-0")

        await site.ok("roost.cmd.host.unlock", {"host": "worker-0"})
        await wait_until(lambda: not fake.unschedulable("worker-0") and not fake.taints("worker-0"),
                         what="worker-0 uncordoned and untainted")


async def test_lock_waits_for_a_disruption_budget_that_allows_it_after_a_while(
        site: Site, fake: FakeKube, tmp_path: Path) -> None:
    fake.add_pod("web-0", "worker-0", labels={"app": "web"})
    fake.add_pod("web-1", "worker-1", labels={"app": "web"})
    fake.add_pdb("web-pdb", match_labels={"app": "web"}, min_available=2)   # 2 of 2 needed: no disruption
    async with orchestrator_on(site, orchestrator_settings(fake, tmp_path)):
        task = asyncio.create_task(site.ok("roost.cmd.host.lock", {"host": "worker-0"}))
        await wait_until(lambda: fake.evicted(429), what="an eviction refused by the budget")
        assert not task.done()
        fake.add_pod("web-2", "worker-1", labels={"app": "web"})         # the workload scales out: now one may go
        locked = await task
    assert locked["host"]["administrative"] == "locked", locked
    assert fake.evicted() == ["default/web-0"] and fake.taints("worker-0") == [TAINT]


async def test_a_budget_that_never_allows_fails_the_lock_and_the_host_and_node_stay_in_service(
        site: Site, fake: FakeKube, tmp_path: Path) -> None:
    fake.add_pod("web-0", "worker-0", labels={"app": "web"})
    fake.add_pdb("web-pdb", match_labels={"app": "web"}, max_unavailable=0)
    async with orchestrator_on(site, orchestrator_settings(fake, tmp_path, drain_timeout=1.0)):
        failed = await site.command("roost.cmd.host.lock", {"host": "worker-0"})

    assert failed.status is ReplyStatus.REJECTED
    assert "default/web-0" in (failed.reason or "") and "web-pdb" in (failed.reason or "")
    assert state(await site.host("worker-0")) == ("unlocked", "enabled", "available")
    assert not fake.unschedulable("worker-0") and fake.taints("worker-0") == []
    assert fake.pod_names("worker-0") == {"web-0"}


async def test_force_lock_taints_at_once(site: Site, fake: FakeKube, tmp_path: Path) -> None:
    fake.add_pod("web-0", "worker-0", labels={"app": "web"}, grace=60.0)
    fake.add_pdb("web-pdb", match_labels={"app": "web"}, max_unavailable=0)
    async with orchestrator_on(site, orchestrator_settings(fake, tmp_path, drain_timeout=60.0)):
        locked = await site.ok("roost.cmd.host.lock", {"host": "worker-0", "force": True})
        assert locked["host"]["administrative"] == "locked"
        await wait_until(lambda: fake.taints("worker-0") == [TAINT], what="worker-0 tainted by the force-lock")
    assert fake.unschedulable("worker-0") and fake.evicted(429) == ["default/web-0"]


async def test_without_kubernetes_the_lock_goes_ahead_and_says_the_node_steps_were_skipped(
        site: Site, tmp_path: Path) -> None:
    async with orchestrator_on(site, orchestrator_settings(None, tmp_path)):
        locked = await site.ok("roost.cmd.host.lock", {"host": "worker-0"})
    assert locked["host"]["administrative"] == "locked"
    assert "no Kubernetes is configured" in locked["detail"] and "skipped" in locked["detail"]


async def test_a_host_without_a_node_locks_and_says_so(site: Site, tmp_path: Path) -> None:
    with FakeKube() as empty:
        async with orchestrator_on(site, orchestrator_settings(empty, tmp_path)):
            locked = await site.ok("roost.cmd.host.lock", {"host": "worker-0"})
    assert locked["host"]["administrative"] == "locked"
    assert "no Kubernetes node worker-0" in locked["detail"]


async def test_settings_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROOST_ORCHESTRATOR_DRAIN_TIMEOUT", "-1")
    with pytest.raises(ConfigError, match="ROOST_ORCHESTRATOR_DRAIN_TIMEOUT"):
        load_orchestrator_settings()
    monkeypatch.delenv("ROOST_ORCHESTRATOR_DRAIN_TIMEOUT")
    with pytest.raises(ConfigError, match="not both"):
        load_orchestrator_settings(kubeconfig=tmp_path / "k", kube_in_cluster=True)
    monkeypatch.setenv("ROOST_ORCHESTRATOR_KUBECONFIG", str(tmp_path / "missing"))
    service = build_orchestrator()
    assert service.settings.kubeconfig == tmp_path / "missing"
    with pytest.raises(KubeConfigError, match="does not exist"):
        await service.start(None)  # type: ignore[arg-type]   # fails before it touches the context


# -- as roost up runs them: ServiceHost, real NATS -----------------------------------------------------------


@pytest.mark.nats
@pytest.mark.slow
async def test_lock_and_unlock_over_nats_with_the_services_hosted_as_roost_up_hosts_them(
        nats_server: NatsServer, fake: FakeKube, tmp_path: Path) -> None:
    fake.add_pod("web-0", "worker-0", labels={"app": "web"})
    async with fresh_database() as url, pool_on(url) as pool:
        async with pool.acquire() as conn:
            admin = await create_token(conn, "operator", Role.ADMIN)
            tokens = {name: await create_token(conn, f"service:{name}", Role.ADMIN, kind="service")
                      for name in ("inventory", "orchestrator")}
        settings = load_settings()
        connections = Connections(nats_server.url, url)
        inventory_host = ServiceHost(InventoryService(lock_timeout=10.0, go_enabled_timeout=5.0,
                                                      secrets=SecretStore(tmp_path / "secrets")),
                                     settings, connections, tokens["inventory"])
        orchestrator_host = ServiceHost(build_orchestrator(orchestrator_settings(fake, tmp_path)), settings,
                                        connections, tokens["orchestrator"])
        await orchestrator_host.start()
        await inventory_host.start()
        operator = Bus(NatsTransport(nats_server.url, client_name="roost-test-operator"), source="roost/cli",
                       token=admin)
        await operator.connect()
        try:
            async def ok(type: str, data: dict[str, Any]) -> dict[str, Any]:
                reply = await operator.request(operator.envelope(type, data), timeout=20.0)
                assert reply.ok, reply.reason
                return reply.result

            async def agent_says(verb: str, data: dict[str, Any]) -> None:
                await operator.publish(operator.envelope(f"roost.agent.{verb}", data),
                                       subject=f"roost.agent.worker-0.{verb}")

            async def host() -> dict[str, Any]:
                return (await ok("roost.cmd.host.show", {"host": "worker-0"}))

            await ok("roost.cmd.host.add", {"personality": "controller", "mgmt_mac": "52:54:00:00:00:01"})
            await ok("roost.cmd.host.add", {"personality": "worker", "hostname": "worker-0",
                                            "mgmt_mac": "52:54:00:00:00:10"})
            await agent_says("hello", hello("worker-0", "52:54:00:00:00:10", interval=60.0))
            await agent_says("inventory", inventory("worker-0", "52:54:00:00:00:10"))

            async def online() -> bool:
                h = await host()
                return bool(h["availability"] == "online" and h["inventoried"])

            await wait_until(online, what="worker-0 online and inventoried")
            await ok("roost.cmd.host.unlock", {"host": "worker-0"})

            async def available() -> bool:
                return bool((await host())["availability"] == "available")

            await wait_until(available, what="worker-0 available")

            locked = await ok("roost.cmd.host.lock", {"host": "worker-0"})
            assert locked["host"]["administrative"] == "locked", locked
            assert "1 pod evicted" in locked["detail"]
            assert fake.unschedulable("worker-0") and fake.taints("worker-0") == [TAINT]
            assert fake.pod_names("worker-0") == set()

            await ok("roost.cmd.host.unlock", {"host": "worker-0"})
            await wait_until(lambda: not fake.unschedulable("worker-0") and not fake.taints("worker-0"),
                             what="worker-0 back in service in Kubernetes")
        finally:
            await operator.close()
            deadline = asyncio.get_running_loop().time() + 30
            await inventory_host.stop(deadline)
            await orchestrator_host.stop(deadline)


async def test_a_command_with_the_wrong_action_is_refused_and_readers_may_not_send_one(
        site: Site, fake: FakeKube, tmp_path: Path) -> None:
    async with orchestrator_on(site, orchestrator_settings(fake, tmp_path)):
        wrong = await site.command("roost.cmd.hostservices.disable",
                                   {"uuid": "u-1", "hostname": "worker-0", "action": "unlock"})
        assert wrong.status is ReplyStatus.REJECTED and "does not take the action 'unlock'" in (wrong.reason or "")
        reader = await site.command("roost.cmd.hostservices.disable",
                                    {"uuid": "u-1", "hostname": "worker-0", "action": "lock"}, token=site.reader)
        assert reader.status is ReplyStatus.REJECTED and "may not send" in (reader.reason or "")
        direct = await site.ok("roost.cmd.hostservices.disable",
                               {"uuid": "u-1", "hostname": "worker-1", "action": "lock"})
    assert direct == {"done": True, "detail": "node worker-1 cordoned, 0 pods evicted, "
                                              "tainted roost.io/locked=true:NoExecute"}
    assert not fake.unschedulable("worker-0") and fake.unschedulable("worker-1")
