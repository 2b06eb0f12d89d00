"""Host maintenance against a Kubernetes API on a socket: the official client, configured from a generated
kubeconfig, talking to the fake API server of tests/support/fake_kube.py (no client object is mocked)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.orchestrator.kube import KubeConfigError, KubernetesApi
from services.orchestrator.maintenance import MAINTENANCE_LABEL, SKIPPED, HostMaintenance
from tests.support.fake_kube import FakeKube
from tests.support.waiting import wait_until

TAINT = {"key": "roost.io/locked", "value": "true", "effect": "NoExecute"}


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with FakeKube() as kube:
        kube.add_node("worker-0")
        kube.add_node("worker-1")
        yield kube


@pytest.fixture
async def api(fake: FakeKube, tmp_path: Path) -> AsyncIterator[KubernetesApi]:
    client = await KubernetesApi.from_kubeconfig(fake.kubeconfig(tmp_path), request_timeout=5.0)
    yield client
    await client.close()


def maintenance(api: KubernetesApi | None, *, drain_timeout: float = 10.0) -> HostMaintenance:
    return HostMaintenance(api, drain_timeout=drain_timeout, poll_interval=0.05)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def web(fake: FakeKube, *names: str, node: str = "worker-0", grace: float = 0.0) -> None:
    for name in names:
        fake.add_pod(name, node, labels={"app": "web"}, owner=("ReplicaSet", "web-5d8f"), grace=grace)


async def test_lock_drains_a_worker_with_several_pods_waits_for_them_to_go_and_taints_it(
        fake: FakeKube, api: KubernetesApi) -> None:
    web(fake, "web-0", "web-1", grace=0.3)          # they take a while to terminate
    fake.add_pod("db-0", "worker-0", namespace="data", labels={"app": "db"}, owner=("StatefulSet", "db"))
    fake.add_pod("batch", "worker-0", namespace="jobs", owner=None)                   # unmanaged: evicted too
    fake.add_pod("web-9", "worker-1", labels={"app": "web"})                          # another node: untouched
    done_before = metric("roost_orchestrator_drains_total", action="lock", outcome="done")

    result = await maintenance(api).disable("worker-0")

    assert result.done, result.detail
    assert "4 pods evicted" in result.detail and "roost.io/locked=true:NoExecute" in result.detail
    assert fake.pod_names("worker-0") == set()       # the answer came once the evicted pods were gone
    assert fake.pod_names("worker-1") == {"web-9"}
    assert sorted(fake.evicted()) == ["data/db-0", "default/web-0", "default/web-1", "jobs/batch"]
    assert fake.unschedulable("worker-0") and fake.taints("worker-0") == [TAINT]
    assert fake.node("worker-0")["metadata"]["labels"][MAINTENANCE_LABEL] == "locked"
    assert not fake.unschedulable("worker-1")
    assert metric("roost_orchestrator_drains_total", action="lock", outcome="done") == done_before + 1
    assert metric("roost_orchestrator_drain_seconds_count", action="lock", outcome="done") >= 1
    patches = [r for r in fake.requests if r[0] == "PATCH"]
    assert patches and all(content == "application/strategic-merge-patch+json" for _, _, content in patches)


async def test_daemonset_mirror_and_finished_pods_are_not_evicted(fake: FakeKube, api: KubernetesApi) -> None:
    web(fake, "web-0")
    fake.add_pod("node-exporter-x1", "worker-0", namespace="monitoring", owner=("DaemonSet", "node-exporter"))
    fake.add_pod("kube-proxy-worker-0", "worker-0", namespace="kube-system", owner=("Node", "worker-0"), mirror=True)
    fake.add_pod("report-done", "worker-0", namespace="jobs", owner=("Job", "report"), phase="Succeeded")

    result = await maintenance(api).disable("worker-0")

    assert result.done, result.detail
    assert "1 pod evicted" in result.detail and "3 DaemonSet, mirror or finished pods left in place" in result.detail
    assert fake.evicted() == ["default/web-0"]
    assert not any("/eviction" in path and "web-0" not in path for _, path, _ in fake.requests)
    assert fake.pod_names("worker-0") == {"node-exporter-x1", "kube-proxy-worker-0", "report-done"}


async def test_a_budget_that_refuses_for_a_while_is_waited_for(fake: FakeKube, api: KubernetesApi) -> None:
    web(fake, "web-0", "web-1")
    fake.add_pdb("web-pdb", match_labels={"app": "web"}, min_available=2)
    fake.add_pod("web-2", "worker-1", labels={"app": "web"}, owner=("ReplicaSet", "web-5d8f"))
    fake.reschedule_to("worker-1", ready_after=0.5)      # each evicted pod's replacement is Ready 0.5 s later
    refused_before = metric("roost_orchestrator_evictions_refused_total")

    result = await maintenance(api).disable("worker-0")

    assert result.done, result.detail
    assert sorted(fake.evicted()) == ["default/web-0", "default/web-1"]
    refusals = fake.evicted(429)
    assert refusals, "the budget never refused: the test proves nothing"
    assert metric("roost_orchestrator_evictions_refused_total") - refused_before == len(refusals)
    # the second pod went only after the first one's replacement was Ready (never below minAvailable)
    first_201 = next(i for i, (_, code) in enumerate(fake.evictions) if code == 201)
    assert any(code == 429 for _, code in fake.evictions[first_201:])
    assert fake.taints("worker-0") == [TAINT]


async def test_a_budget_that_never_allows_fails_the_lock_in_time_and_uncordons(
        fake: FakeKube, api: KubernetesApi) -> None:
    web(fake, "web-0", "web-1")
    fake.add_pdb("web-pdb", match_labels={"app": "web"}, max_unavailable=0)
    failed_before = metric("roost_orchestrator_drains_total", action="lock", outcome="failed")
    started = time.monotonic()

    result = await maintenance(api, drain_timeout=1.0).disable("worker-0")

    assert time.monotonic() - started < 1.0 + 3.0        # the timeout plus the rollback, not minutes
    assert not result.done
    assert "timed out after 1 s" in result.detail
    assert "default/web-0" in result.detail and "default/web-1" in result.detail
    assert "The disruption budget web-pdb needs 2 healthy pods and has 2 currently" in result.detail
    assert "schedulable again" in result.detail
    node = fake.node("worker-0")
    assert not fake.unschedulable("worker-0") and fake.taints("worker-0") == []
    assert MAINTENANCE_LABEL not in node["metadata"]["labels"]
    assert fake.pod_names("worker-0") == {"web-0", "web-1"}
    assert metric("roost_orchestrator_drains_total", action="lock", outcome="failed") == failed_before + 1


async def test_a_failed_lock_leaves_a_node_cordoned_by_someone_else_cordoned(
        fake: FakeKube, api: KubernetesApi) -> None:
    fake.add_node("worker-2", unschedulable=True)            # an operator's own cordon, before the lock
    web(fake, "web-0", node="worker-2")
    fake.add_pdb("web-pdb", match_labels={"app": "web"}, min_available=1)

    result = await maintenance(api, drain_timeout=0.3).disable("worker-2")

    assert not result.done and "stays cordoned, as it was before the lock" in result.detail
    assert fake.unschedulable("worker-2") and fake.taints("worker-2") == []
    assert MAINTENANCE_LABEL not in fake.node("worker-2")["metadata"]["labels"]


async def test_force_lock_cordons_taints_and_answers_without_waiting_for_budgets(
        fake: FakeKube, api: KubernetesApi) -> None:
    web(fake, "web-0", "web-1", grace=30.0)                 # would take 30 s to go
    fake.add_pdb("web-pdb", match_labels={"app": "web"}, min_available=1)

    result = await maintenance(api, drain_timeout=60.0).disable("worker-0", force=True)

    assert result.done, result.detail
    assert "force-lock" in result.detail and "1 pod evicted without waiting" in result.detail
    assert "1 pod not evicted" in result.detail
    assert fake.unschedulable("worker-0") and fake.taints("worker-0") == [TAINT]
    asked = [ref for ref, _ in fake.evictions]
    assert sorted(asked) == ["default/web-0", "default/web-1"]      # once each, no retry of the refused one
    assert fake.pod_names("worker-0") == {"web-0", "web-1"}         # still terminating / protected: not awaited


async def test_unlock_reverses_the_lock_and_keeps_other_taints(fake: FakeKube, api: KubernetesApi) -> None:
    other = {"key": "dedicated", "value": "db", "effect": "NoSchedule"}
    fake.add_node("worker-3", taints=[other])
    fake.add_pod("web-0", "worker-3", labels={"app": "web"})
    ops = maintenance(api)
    assert (await ops.disable("worker-3")).done
    assert fake.taints("worker-3") == [other, TAINT]

    result = await ops.enable("worker-3")

    assert result.done and "uncordoned" in result.detail
    assert not fake.unschedulable("worker-3") and fake.taints("worker-3") == [other]
    assert MAINTENANCE_LABEL not in fake.node("worker-3")["metadata"]["labels"]


async def test_repeated_commands_are_harmless(fake: FakeKube, api: KubernetesApi) -> None:
    web(fake, "web-0")
    ops = maintenance(api)
    assert (await ops.disable("worker-0")).done
    patches = sum(1 for r in fake.requests if r[0] == "PATCH")
    again = await ops.disable("worker-0")
    assert again.done and "0 pods evicted" in again.detail
    assert sum(1 for r in fake.requests if r[0] == "PATCH") == patches       # nothing to change: no write
    assert fake.evicted() == ["default/web-0"] and fake.taints("worker-0") == [TAINT]
    assert (await ops.enable("worker-0")).done
    twice = await ops.enable("worker-0")
    assert twice.done and "already in service" in twice.detail


async def test_a_node_the_cluster_does_not_have_is_said_so(api: KubernetesApi) -> None:
    ops = maintenance(api)
    lock = await ops.disable("storage-0")
    assert lock.done and lock.detail == "no Kubernetes node storage-0: nothing to drain" and lock.outcome == "no-node"
    unlock = await ops.enable("storage-0")
    assert unlock.done and "no Kubernetes node storage-0" in unlock.detail


async def test_without_kubernetes_the_node_steps_are_skipped() -> None:
    ops = maintenance(None)
    for result in (await ops.disable("worker-0"), await ops.disable("worker-0", force=True),
                   await ops.enable("worker-0")):
        assert result.done and result.detail == SKIPPED and "no Kubernetes is configured" in result.detail


async def test_a_concurrent_write_to_the_node_is_read_again_not_overwritten(
        fake: FakeKube, api: KubernetesApi) -> None:
    fake.fail_next("PATCH", "/nodes/worker-0", 409, times=2)
    result = await maintenance(api).disable("worker-0")
    assert result.done, result.detail
    assert fake.unschedulable("worker-0") and fake.taints("worker-0") == [TAINT]


async def test_a_struggling_api_server_is_retried_within_the_drain(fake: FakeKube, api: KubernetesApi) -> None:
    web(fake, "web-0")
    fake.fail_next("GET", "/api/v1/pods", 503, times=3)
    result = await maintenance(api).disable("worker-0")
    assert result.done, result.detail
    assert fake.evicted() == ["default/web-0"]


async def test_an_unreachable_api_server_fails_the_lock_with_a_clear_detail(
        fake: FakeKube, api: KubernetesApi) -> None:
    fake.stop()
    result = await maintenance(api, drain_timeout=0.5).disable("worker-0")
    assert not result.done and "cannot read node worker-0" in result.detail
    assert "did not answer" in result.detail


async def test_force_lock_interrupts_a_lock_that_is_still_draining(fake: FakeKube, api: KubernetesApi) -> None:
    web(fake, "web-0")
    fake.add_pdb("web-pdb", match_labels={"app": "web"}, min_available=1)
    ops = maintenance(api, drain_timeout=30.0)
    lock = asyncio.create_task(ops.disable("worker-0"))
    await wait_until(lambda: fake.evicted(429), what="the lock waiting on the budget")

    forced = await ops.disable("worker-0", force=True)
    interrupted = await lock

    assert forced.done and not interrupted.done and interrupted.outcome == "superseded"
    assert fake.unschedulable("worker-0") and fake.taints("worker-0") == [TAINT]   # not rolled back


async def test_an_older_command_delivered_late_does_not_interrupt_a_draining_lock(
        fake: FakeKube, api: KubernetesApi) -> None:
    """An unlock's enable sent before a lock but delivered while the lock drains: the lock goes on (it was
    interrupted, and failed, while the enable then did nothing as superseded)."""
    web(fake, "web-0")
    fake.add_pdb("web-pdb", match_labels={"app": "web"}, min_available=1)
    ops = maintenance(api, drain_timeout=30.0)
    now = datetime.now(UTC)
    lock = asyncio.create_task(ops.disable("worker-0", issued=now))
    await wait_until(lambda: fake.evicted(429), what="the lock waiting on the budget")
    late = asyncio.create_task(ops.enable("worker-0", issued=now - timedelta(seconds=1)))
    await asyncio.sleep(0)            # one step: the enable runs up to the node's lock, which the drain holds
    assert not late.done()
    fake.remove_pdb("web-pdb")
    locked = await lock
    assert locked.done, locked.detail
    stale = await late
    assert not stale.done and stale.outcome == "superseded"
    assert fake.unschedulable("worker-0") and fake.taints("worker-0") == [TAINT]


async def test_a_stale_command_does_nothing(fake: FakeKube, api: KubernetesApi) -> None:
    ops = maintenance(api)
    now = datetime.now(UTC)
    assert (await ops.enable("worker-0", issued=now)).done
    stale = await ops.disable("worker-0", issued=now - timedelta(seconds=5))
    assert not stale.done and "a later command" in stale.detail
    assert not fake.unschedulable("worker-0")


async def test_the_command_deadline_bounds_the_drain(fake: FakeKube, api: KubernetesApi) -> None:
    web(fake, "web-0")
    fake.add_pdb("web-pdb", match_labels={"app": "web"}, min_available=1)
    ops = HostMaintenance(api, drain_timeout=600.0, poll_interval=0.05, deadline_margin=0.5)
    result = await ops.disable("worker-0", deadline=datetime.now(UTC) + timedelta(seconds=1.5))
    assert not result.done and "timed out after 1 s" in result.detail
    assert not fake.unschedulable("worker-0")


async def test_a_missing_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="does not exist"):
        await KubernetesApi.from_kubeconfig(tmp_path / "nope")
    bad = tmp_path / "kubeconfig"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    with pytest.raises(KubeConfigError):
        await KubernetesApi.from_kubeconfig(bad)


async def test_pods_a_dead_kubelet_never_removes_are_not_waited_for(fake: FakeKube, api: KubernetesApi) -> None:
    web(fake, "web-0")
    fake.add_pod("stuck-0", "worker-0", labels={"app": "db"}, stuck=True)       # the host is down
    ops = HostMaintenance(api, drain_timeout=20.0, poll_interval=0.05, skip_wait_after=0.5)

    result = await ops.disable("worker-0")

    assert result.done, result.detail
    assert "1 pod still terminating well past its grace period" in result.detail
    assert fake.pod_names("worker-0") == {"stuck-0"} and fake.taints("worker-0") == [TAINT]


async def test_many_pods_are_evicted_together(fake: FakeKube, api: KubernetesApi) -> None:
    web(fake, *(f"web-{i}" for i in range(40)))
    result = await maintenance(api).disable("worker-0")
    assert result.done and "40 pods evicted" in result.detail
    assert len(fake.evicted()) == 40 and fake.pod_names("worker-0") == set()
