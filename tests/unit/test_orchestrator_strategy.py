"""Building update strategies into stages and steps (the pure model; no I/O)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from services.orchestrator.strategy import (
    BuildError,
    HostInfo,
    Plan,
    Release,
    StrategyCreate,
    build,
)

R1 = Release("r1", "1.0.1", reboot_required=True)
PATCH = Release("p2", "1.0.2", reboot_required=False)


def host(name: str, *, state: str = "unlocked-enabled-available", active: bool = False, release: str | None = None,
         group: str | None = None) -> HostInfo:
    personality = name.rsplit("-", 1)[0]
    administrative, operational, availability = state.split("-")
    return HostInfo(uuid=f"uuid-{name}", hostname=name, personality=personality,  # type: ignore[arg-type]
                    administrative=administrative, operational=operational, availability=availability,
                    active=active, release=release, group=group)


def site(workers: int = 6) -> list[HostInfo]:
    return [host("controller-0", active=True), host("controller-1"),
            *(host(f"worker-{i}") for i in range(workers))]


def names(plan: Plan) -> list[list[str]]:
    return [[s.name for s in stage.steps] for stage in plan.stages]


def hosts_of(plan: Plan) -> list[list[str]]:
    return [stage.hosts for stage in plan.stages]


def test_two_controllers_and_six_parallel_workers_three_at_a_time() -> None:
    plan = build(StrategyCreate(worker_apply_type="parallel", max_parallel_worker_hosts=3), R1, site())

    assert hosts_of(plan) == [["controller-1"], ["controller-0"], ["worker-0", "worker-1", "worker-2"],
                              ["worker-3", "worker-4", "worker-5"]]
    assert names(plan)[0] == ["query-alarms", "lock-hosts", "apply-update", "system-stabilize", "unlock-hosts",
                              "wait-alarms-clear"]
    # the active controller goes last, and hands its role over first
    assert names(plan)[1] == ["query-alarms", "swact-hosts", "lock-hosts", "apply-update", "system-stabilize",
                              "unlock-hosts", "wait-alarms-clear"]
    assert names(plan)[2] == ["query-alarms", "lock-hosts", "apply-update", "system-stabilize", "unlock-hosts",
                              "wait-alarms-clear"]
    lock = plan.stages[0].steps[1]
    assert (lock.max_retries, lock.retry_delay, lock.timeout, lock.entity_type) == (3, 90, 900, "hosts")
    assert plan.stages[2].steps[2].entity_uuids == ["uuid-worker-0", "uuid-worker-1", "uuid-worker-2"]
    assert plan.stages[0].timeout == 60 + 900 + 1800 + 15 + 1800 + 2400 + 1
    assert plan.timeout == sum(s.timeout for s in plan.stages) + 1
    assert plan.skipped == {}


def test_serial_workers_get_a_stage_each_and_parallel_batches_never_exceed_the_maximum() -> None:
    serial = build(StrategyCreate(), R1, site(3))
    assert hosts_of(serial)[2:] == [["worker-0"], ["worker-1"], ["worker-2"]]
    for size in (2, 3, 4, 10):
        plan = build(StrategyCreate(worker_apply_type="parallel", max_parallel_worker_hosts=size), R1, site(7))
        batches = [h for h in hosts_of(plan) if h[0].startswith("worker")]
        assert all(len(b) <= size for b in batches) and sum(map(len, batches)) == 7


def test_locked_workers_are_updated_first_apart_and_rebooted_instead_of_unlocked() -> None:
    hosts = [*site(3), host("worker-7", state="locked-disabled-online"),
             host("worker-8", state="locked-disabled-online")]
    plan = build(StrategyCreate(worker_apply_type="parallel", max_parallel_worker_hosts=4), R1, hosts)
    assert hosts_of(plan)[2:] == [["worker-7", "worker-8"], ["worker-0", "worker-1", "worker-2"]]
    assert names(plan)[2] == ["query-alarms", "apply-update", "reboot-hosts", "system-stabilize"]


def test_an_update_without_reboot_neither_locks_nor_swacts() -> None:
    plan = build(StrategyCreate(worker_apply_type="parallel", max_parallel_worker_hosts=10), PATCH, site())
    assert all(n == ["query-alarms", "apply-update", "system-stabilize"] for n in names(plan))
    assert plan.stages[0].steps[2].timeout == 30


def test_ignore_leaves_hosts_out_and_hosts_on_the_release_are_skipped() -> None:
    hosts = [host("controller-0", active=True, release="r1"), host("controller-1"),
             host("worker-0", release="r1"), host("worker-1"), host("storage-0")]
    plan = build(StrategyCreate(storage_apply_type="ignore"), R1, hosts)
    assert hosts_of(plan) == [["controller-1"], ["worker-1"]]
    assert plan.skipped == {"controller-0": "already on r1", "worker-0": "already on r1",
                            "storage-0": "storage apply type is ignore"}
    assert "swact-hosts" not in names(plan)[0]          # controller-1 is not the active one


def test_parallel_storage_keeps_replication_groups_apart() -> None:
    storage = [host("storage-0", group="g0"), host("storage-1", group="g0"), host("storage-2", group="g1"),
               host("storage-3", group="g1")]
    plan = build(StrategyCreate(controller_apply_type="ignore", storage_apply_type="parallel",
                                worker_apply_type="ignore", max_parallel_worker_hosts=4), R1, [*site(0), *storage])
    assert hosts_of(plan) == [["storage-0", "storage-2"], ["storage-1", "storage-3"]]
    assert names(plan)[0][-1] == "wait-data-sync"


def test_an_unsafe_site_is_refused_with_the_reason() -> None:
    degraded = [host("controller-0", active=True), host("controller-1", state="unlocked-enabled-degraded"),
                host("worker-0")]
    with pytest.raises(BuildError, match=r"controller-1.*full redundancy"):
        build(StrategyCreate(), R1, degraded)
    failed_worker = [*site(1), host("worker-5", state="unlocked-disabled-failed")]
    with pytest.raises(BuildError, match="worker-5 is unlocked-disabled-failed"):
        build(StrategyCreate(), R1, failed_worker)
    offline = [*site(1), host("worker-5", state="locked-disabled-offline")]
    plan = build(StrategyCreate(), R1, offline)
    assert "worker-5" in plan.skipped and "offline" in plan.skipped["worker-5"]


def test_a_lone_controller_cannot_be_rebooted_but_can_take_a_patch() -> None:
    simplex = [host("controller-0", active=True), host("worker-0")]
    with pytest.raises(BuildError, match="only controller"):
        build(StrategyCreate(), R1, simplex)
    assert hosts_of(build(StrategyCreate(controller_apply_type="ignore"), R1, simplex)) == [["worker-0"]]
    assert hosts_of(build(StrategyCreate(), PATCH, simplex)) == [["controller-0"], ["worker-0"]]


def test_nothing_to_do_is_a_build_failure() -> None:
    current = [host("controller-0", active=True, release="r1"), host("controller-1", release="r1")]
    with pytest.raises(BuildError, match="no hosts need r1"):
        build(StrategyCreate(), R1, current)


@pytest.mark.parametrize(("options", "problem"), [
    ({"controller_apply_type": "parallel"}, "not allowed for controllers"),
    ({"max_parallel_worker_hosts": 1}, "greater than or equal to 2"),
    ({"max_parallel_worker_hosts": 11}, "less than or equal to 10"),
    ({"worker_apply_type": "rolling"}, "worker_apply_type"),
    ({"alarm_restrictions": "lenient"}, "alarm_restrictions"),
])
def test_bad_create_options_are_refused(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        StrategyCreate(**options)


def test_a_plan_round_trips_through_json_with_its_progress() -> None:
    plan = build(StrategyCreate(worker_apply_type="parallel", max_parallel_worker_hosts=3), R1, site())
    plan.stages[0].current_step = 2
    plan.stages[0].result = "inprogress"
    plan.stages[0].steps[1].result = "success"
    plan.stages[0].steps[2].result = "failed"
    plan.stages[0].steps[2].reason = "agent said: disk full"
    again = Plan.from_dict(json.loads(json.dumps(plan.as_dict())))
    assert again == plan and again.as_dict() == plan.as_dict()
