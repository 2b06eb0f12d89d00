"""The strategy state machine (pure): apply, step outcomes, stop on failure, abort, alarm restrictions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.orchestrator import StrategyOptions
from services.orchestrator import apply
from services.orchestrator.apply import NotAllowed, Outcome, Strategy, Transition
from services.orchestrator.strategy import HostInfo, Release, build

T0 = datetime(2026, 1, 1, tzinfo=UTC)
R1 = Release("r1", "1.0.1", reboot_required=True)
ALLOWED = {("ready-to-apply", "applying"), ("applying", "applied"), ("applying", "apply-failed"),
           ("applying", "aborting"), ("apply-failed", "aborting"), ("aborting", "aborting"),
           ("aborting", "aborted"), ("aborting", "abort-failed")}


def host(name: str, *, active: bool = False) -> HostInfo:
    return HostInfo(uuid=f"uuid-{name}", hostname=name, personality=name.rsplit("-", 1)[0],  # type: ignore[arg-type]
                    administrative="unlocked", operational="enabled", availability="available", active=active)


def strategy(workers: int = 3, **options: object) -> Strategy:
    opts = StrategyOptions(**{"worker_apply_type": "parallel", "max_parallel_worker_hosts": 2, **options})  # type: ignore[arg-type]
    hosts = [host("controller-0", active=True), host("controller-1"), *(host(f"worker-{i}") for i in range(workers))]
    return apply.create("s-1", R1, opts, build(opts, R1, hosts), T0)


@dataclass
class World:
    """What the steps did to the hosts, as far as the machine's correctness is concerned."""

    locked: set[str]
    started: list[tuple[str, int, int]]
    transitions: list[Transition]


def run(s: Strategy, outcome: object = None, abort_after: int | None = None) -> World:
    """Drive ``s`` to its end: ``outcome(step_name, hosts, n)`` says how each step ends (default success);
    ``abort_after``: the operator aborts while the n-th step is in flight."""
    world = World(set(), [], [])
    world.transitions += apply.begin_apply(s, T0)
    n = 0
    while (ref := apply.current(s)) is not None:
        step = s.step(ref)
        assert step.result == "initial"
        world.started.append((ref.phase, ref.stage_id, ref.step_id))
        world.transitions += apply.start_step(s, ref, T0 + timedelta(seconds=n))
        if abort_after == n and s.state == "applying":
            world.transitions += apply.request_abort(s, T0)
        result = outcome(step.name, tuple(step.entity_names), n) if callable(outcome) else Outcome("success")
        if s.state == "aborting" and step.name in apply.PASSIVE_STEPS and ref.phase == "apply":
            result = Outcome("aborted", "cut short by the abort")
        if result.result == "success" or step.name in (apply.LOCK_HOSTS,):
            if step.name == apply.LOCK_HOSTS:
                world.locked |= set(step.entity_names)      # a failed lock may have locked some of them
            elif step.name == apply.UNLOCK_HOSTS:
                world.locked -= set(step.entity_names)
        world.transitions += apply.finish_step(s, ref, result, T0 + timedelta(seconds=n, milliseconds=500))
        n += 1
        assert n < 500
    return world


def states(world: World) -> list[str]:
    return [t.state for t in world.transitions if t.kind == "strategy"]


def test_a_strategy_applied_without_trouble_ends_applied_with_every_step_done_once() -> None:
    s = strategy()
    world = run(s)
    assert s.state == "applied" and states(world) == ["applying", "applied"]
    assert all(step.result == "success" for stage in s.apply_phase.stages for step in stage.steps)
    assert len(world.started) == len(set(world.started)) == sum(len(st.steps) for st in s.apply_phase.stages)
    assert not world.locked
    assert [t.result for t in world.transitions if t.kind == "stage"][:2] == ["inprogress", "success"]


def test_a_failed_update_fails_the_strategy_and_the_abort_unlocks_the_hosts_of_its_stage() -> None:
    s = strategy()

    def outcome(name: str, hosts: tuple[str, ...], _n: int) -> Outcome:
        if name == apply.APPLY_UPDATE and "worker-1" in hosts:
            return Outcome("failed", "installing r1 failed on worker-1")
        return Outcome("success")

    world = run(s, outcome)
    assert states(world) == ["applying", "apply-failed", "aborting", "aborting", "aborted"]
    assert s.state == "aborted" and "worker-1" in s.reason and "installing r1 failed" in s.reason
    assert s.abort_phase is not None
    [undo] = s.abort_phase.stages
    assert [(st.name, st.entity_names, st.result) for st in undo.steps] == [
        ("unlock-hosts", ["worker-0", "worker-1"], "success")]
    assert not world.locked
    results = [stage.result for stage in s.apply_phase.stages]
    assert results == ["success", "success", "failed", "aborted"]        # the stage after it never ran


def test_without_stop_on_failure_the_failed_stage_is_undone_and_the_next_one_runs() -> None:
    s = strategy(stop_on_failure=False)

    def outcome(name: str, hosts: tuple[str, ...], _n: int) -> Outcome:
        return Outcome("failed", "boom") if name == apply.APPLY_UPDATE and "worker-0" in hosts else Outcome("success")

    world = run(s, outcome)
    assert s.state == "apply-failed" and s.abort_phase is None
    failed = s.apply_phase.stages[2]
    assert [st.name for st in failed.steps] == ["query-alarms", "lock-hosts", "apply-update", "unlock-hosts"]
    assert failed.result == "failed" and s.apply_phase.stages[3].result == "success"
    assert not world.locked


def test_an_abort_during_a_lock_lets_the_lock_finish_then_unlocks() -> None:
    s = strategy(workers=2)
    lock_index = 2 * 7 + 1            # two controller stages of 7 steps, then the workers' query-alarms, lock
    world = run(s, abort_after=lock_index)
    assert s.state == "aborted"
    assert s.apply_phase.stages[2].steps[1].result == "success"        # the lock was not cut
    assert s.abort_phase is not None and s.abort_phase.stages[0].steps[0].entity_names == ["worker-0", "worker-1"]
    assert not world.locked


def test_an_abort_while_a_passive_step_waits_cuts_it_and_undoes_nothing_when_nothing_was_locked() -> None:
    s = strategy()
    world = run(s, abort_after=0)                   # the first query-alarms
    assert s.state == "aborted" and s.abort_phase is not None and s.abort_phase.stages == []
    assert s.apply_phase.stages[0].steps[0].result == "aborted"
    assert states(world) == ["applying", "aborting", "aborting", "aborted"]


def test_what_is_refused() -> None:
    s = strategy()
    with pytest.raises(NotAllowed, match="being applied"):
        apply.request_abort(s, T0)
    apply.begin_apply(s, T0)
    with pytest.raises(NotAllowed, match="ready-to-apply"):
        apply.begin_apply(s, T0)
    with pytest.raises(NotAllowed, match="abort it first"):
        apply.can_delete(s, force=False)
    apply.can_delete(s, force=True)
    ref = apply.current(s)
    assert ref is not None
    apply.start_step(s, ref, T0)
    with pytest.raises(NotAllowed, match="started already"):
        apply.start_step(s, ref, T0)
    assert apply.current(s) == ref                        # resumed after a restart: the same step, in progress
    assert apply.deadline(s.step(ref), T0 + timedelta(hours=1)) == T0 + timedelta(seconds=60)


def test_the_strategy_round_trips_through_json_mid_apply() -> None:
    s = strategy()
    apply.begin_apply(s, T0)
    ref = apply.current(s)
    assert ref is not None
    apply.start_step(s, ref, T0)
    again = apply.from_dict(json.loads(json.dumps(apply.as_dict(s))))
    assert apply.as_dict(again) == apply.as_dict(s)
    assert apply.current(again) == ref and again.step(ref).started_at == T0


@dataclass(frozen=True)
class Alarm:
    alarm_id: str
    severity: str
    mgmt_affecting: bool


def test_alarm_restrictions() -> None:
    locked, minor, mgmt, critical = (Alarm("950.001", "warning", True), Alarm("950.004", "minor", False),
                                     Alarm("950.003", "major", True), Alarm("950.002", "critical", False))
    alarms = [locked, minor, mgmt, critical]
    assert apply.blocking_alarms(alarms, "strict") == [minor, mgmt, critical]
    assert apply.blocking_alarms(alarms, "relaxed") == [mgmt, critical]
    assert apply.blocking_alarms(alarms, "permissive") == []


@settings(max_examples=150, deadline=None)
@given(workers=st.integers(1, 5), parallel=st.booleans(), stop=st.booleans(),
       failures=st.sets(st.integers(0, 60), max_size=4), abort_after=st.one_of(st.none(), st.integers(0, 60)),
       unlock_fails=st.booleans())
def test_any_run_ends_in_a_final_state_runs_each_step_once_and_leaves_no_host_locked_unless_an_unlock_failed(
        workers: int, parallel: bool, stop: bool, failures: set[int], abort_after: int | None,
        unlock_fails: bool) -> None:
    s = strategy(workers, worker_apply_type="parallel" if parallel else "serial", stop_on_failure=stop)

    def outcome(name: str, _hosts: tuple[str, ...], n: int) -> Outcome:
        if n in failures and (unlock_fails or name != apply.UNLOCK_HOSTS):
            return Outcome("failed" if n % 2 else "timed-out", f"step {n}")
        return Outcome("success")

    world = run(s, outcome, abort_after)
    assert s.state in apply.FINAL_STATES
    assert len(world.started) == len(set(world.started))
    seen = states(world)
    assert all((a, b) in ALLOWED for a, b in zip(["ready-to-apply", *seen], seen, strict=False))
    unlock_failed = any(step.name == apply.UNLOCK_HOSTS and step.result in apply.NOT_OK
                        for phase in (s.apply_phase, s.abort_phase) if phase is not None
                        for stage in phase.stages for step in stage.steps)
    if not unlock_failed:
        assert not world.locked, (s.state, world.locked)
    if s.state == "applied":
        assert all(step.result == "success" for stage in s.apply_phase.stages for step in stage.steps)
    if s.state == "apply-failed":
        assert not stop and any(stage.result == "failed" for stage in s.apply_phase.stages)


def drive(s: Strategy) -> None:
    """Run every step there is to run now, successfully."""
    while (ref := apply.current(s)) is not None:
        apply.start_step(s, ref, T0)
        apply.finish_step(s, ref, Outcome("success"), T0)


def test_apply_stage_by_stage_pauses_between_stages_in_order() -> None:
    s = strategy(workers=2)                               # controller-1, controller-0, the workers: 3 stages
    with pytest.raises(NotAllowed, match="not the next stage"):
        apply.begin_apply(s, T0, stage_id=1)
    apply.begin_apply(s, T0, stage_id=0)
    drive(s)
    assert s.state == "applying" and s.paused and apply.current(s) is None
    assert [st.result for st in s.apply_phase.stages] == ["success", "initial", "initial"]
    with pytest.raises(NotAllowed, match="not the next stage"):
        apply.begin_apply(s, T0, stage_id=0)
    apply.begin_apply(s, T0, stage_id=1)
    drive(s)
    assert s.paused and s.apply_phase.current_stage == 2
    again = apply.from_dict(json.loads(json.dumps(apply.as_dict(s))))
    assert again.paused and again.stop_at_stage == 2
    apply.begin_apply(s, T0)                              # the rest
    drive(s)
    assert s.state == "applied" and not s.paused


def test_an_abort_between_two_stages_ends_aborted_at_once() -> None:
    s = strategy()
    apply.begin_apply(s, T0, stage_id=0)
    drive(s)
    transitions = apply.request_abort(s, T0)
    assert s.state == "aborted" and s.abort_phase is not None and s.abort_phase.stages == []
    assert [t.state for t in transitions if t.kind == "strategy"] == ["aborting", "aborting", "aborted"]
    assert s.apply_phase.stages[0].result == "success" and s.apply_phase.stages[1].result == "aborted"
