"""Applying an update strategy, the pure part: the state machine of a strategy, its phases, stages and steps.

No I/O and no clock (the time is an argument): the executor (``services.orchestrator.executor``) asks
:func:`current` which step to run, marks it started (:func:`start_step`, persisted before the step acts:
the durable "started" marker), runs it, and hands its :class:`Outcome` to :func:`finish_step`.  Every
function that changes the strategy returns the :class:`Transition` list it made (the events to publish, in
the same transaction as the change).

Strategy states (the VIM's, §3.4 of the reference notes)::

    building -> ready-to-apply | build-failed
    ready-to-apply --apply--> applying                (apply-stage N: only the next stage, then it pauses)
    applying --every stage done--> applied            (some stage failed, stop_on_failure off: apply-failed)
    applying --a step failed or timed out, stop_on_failure--> apply-failed --automatically--> aborting
    applying --abort--> aborting
    aborting --the step in flight finishes, then the abort phase runs--> aborted | abort-failed

Steps go ``initial -> inprogress -> success | failed | timed-out | aborted``; a stage is ``inprogress``
from its first step, then ``success``, or ``failed`` when one of its steps did not succeed, or
``aborted`` when an abort took over; the phase likewise.

Abort: the abort phase undoes what the stage in flight did to the hosts and nothing else: the hosts its
``lock-hosts`` step locked (or tried to: the unlock step re-checks each host and leaves an unlocked one
alone) and that no ``unlock-hosts`` of the stage unlocked again are unlocked.  Stages already done are
complete (their hosts were unlocked by their own steps).  An installed release is not uninstalled (as in
the VIM: the hosts stay on it, and a new strategy skips them).  An abort asked while a step acts lets that
step finish (``lock-hosts``, ``apply-update``, ``unlock-hosts``, ``swact-hosts`` are never cut in the
middle); a step that only looks or waits (:data:`PASSIVE_STEPS`) is cut short with result ``aborted``.

``stop_on_failure`` off: a failed stage does not stop the strategy.  Its remaining steps are dropped,
the same undo steps are appended to it (so its locked hosts are unlocked), and the next stage runs; the
strategy ends ``apply-failed`` since a stage failed.

Alarm restrictions (:func:`blocking_alarms`), checked by ``query-alarms`` (before a stage touches a host)
and ``wait-alarms-clear`` (after it unlocked them):

* ``strict``: every active alarm blocks, except the ones the strategy itself causes and expects
  (:data:`EXPECTED_ALARMS`: 950.001 host locked: a worker that was locked before the strategy stays
  locked and is updated as it is; a host being updated is locked);
* ``relaxed``: only alarms that affect management (FM's ``mgmt_affecting``) or are critical block;
* ``permissive``: no alarm blocks.

Alarms masked by an inhibiting alarm (the children of a locked host) are not listed by the alarms
service, so they never block.

Timeouts: a step's deadline is its ``started_at`` plus its timeout, so a step resumed after a restart
keeps the deadline it had.  ``system-stabilize`` only waits: reaching its timeout is its success.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, TypeVar

from schemas.orchestrator import AlarmRestrictions, PhaseName, StrategyOptions, StrategyState
from services.orchestrator.strategy import (
    APPLY_UPDATE,
    LOCK_HOSTS,
    QUERY_ALARMS,
    REBOOT_HOSTS,
    SWACT_HOSTS,
    SYSTEM_STABILIZE,
    TIMEOUTS,
    UNLOCK_HOSTS,
    WAIT_ALARMS_CLEAR,
    WAIT_DATA_SYNC,
    Plan,
    Release,
    Stage,
    Step,
    StepResult,
)

ACTIVE_STEPS = frozenset({SWACT_HOSTS, LOCK_HOSTS, APPLY_UPDATE, UNLOCK_HOSTS, REBOOT_HOSTS})
"""Steps that change the world: never cut in the middle, never re-sent blindly after a restart."""
PASSIVE_STEPS = frozenset({QUERY_ALARMS, SYSTEM_STABILIZE, WAIT_ALARMS_CLEAR, WAIT_DATA_SYNC})
"""Steps that only look or wait: an abort cuts them short; after a restart they simply go on."""
DONE: frozenset[str] = frozenset({"success", "degraded", "failed", "timed-out", "aborted"})
NOT_OK: frozenset[str] = frozenset({"failed", "timed-out", "aborted"})
FINAL_STATES: frozenset[str] = frozenset({"build-failed", "applied", "apply-failed", "aborted", "abort-failed"})
RUNNING_STATES: frozenset[str] = frozenset({"applying", "aborting"})
EXPECTED_ALARMS = frozenset({"950.001"})
REASON_MAX = 1024
UNLOCK_RETRIES = 5
UNLOCK_RETRY_DELAY = 120


class NotAllowed(ValueError):
    """The strategy is not in a state that allows this; the message says why."""


@dataclass
class Phase:
    name: PhaseName
    stages: list[Stage]
    current_stage: int = 0
    result: StepResult = "initial"
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "current_stage": self.current_stage, "result": self.result,
                "reason": self.reason, "stages": [s.as_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Phase:
        return cls(name=data["name"], stages=[Stage.from_dict(s) for s in data["stages"]],
                   current_stage=int(data["current_stage"]), result=data["result"], reason=data["reason"])


@dataclass
class Strategy:
    uuid: str
    release: Release
    options: StrategyOptions
    state: StrategyState
    apply_phase: Phase
    created_at: datetime
    updated_at: datetime
    abort_phase: Phase | None = None
    current_phase: PhaseName = "apply"
    skipped: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    stop_at_stage: int | None = None          # apply-stage: the apply phase pauses before this stage

    @property
    def paused(self) -> bool:
        """Applying, between single-stage applies: the stage asked for is done, the next one waits."""
        return (self.state == "applying" and self.stop_at_stage is not None
                and self.apply_phase.current_stage >= self.stop_at_stage and inflight(self) is None)

    @property
    def phase(self) -> Phase:
        if self.current_phase == "abort" and self.abort_phase is not None:
            return self.abort_phase
        return self.apply_phase

    def phase_named(self, name: PhaseName) -> Phase:
        if name == "abort":
            if self.abort_phase is None:
                raise KeyError("no abort phase")
            return self.abort_phase
        return self.apply_phase

    def step(self, ref: StepRef) -> Step:
        return self.phase_named(ref.phase).stages[ref.stage_id].steps[ref.step_id]

    def stage(self, ref: StepRef) -> Stage:
        return self.phase_named(ref.phase).stages[ref.stage_id]


@dataclass(frozen=True, slots=True)
class StepRef:
    phase: PhaseName
    stage_id: int
    step_id: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a step ended."""

    result: Literal["success", "failed", "timed-out", "aborted"]
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Transition:
    """One change, as the event that announces it: of the strategy (``stage_id`` None), of a stage
    (``step_id`` None) or of a step.  ``state``: the strategy's state after it."""

    kind: Literal["strategy", "stage", "step"]
    state: StrategyState
    phase: PhaseName
    result: StepResult | None = None
    reason: str = ""
    stage_id: int | None = None
    stage_name: str | None = None
    step_id: int | None = None
    step_name: str | None = None
    entity_names: tuple[str, ...] = ()

    @property
    def event_type(self) -> str:
        return {"strategy": "roost.strategy.state_changed", "stage": "roost.strategy.stage_changed",
                "step": "roost.strategy.step_changed"}[self.kind]


def _clip(reason: str) -> str:
    return reason if len(reason) <= REASON_MAX else reason[:REASON_MAX - 1] + "…"


def _strategy_tr(s: Strategy) -> Transition:
    return Transition("strategy", s.state, s.current_phase, reason=s.reason)


def _stage_tr(s: Strategy, phase: Phase, stage_id: int) -> Transition:
    stage = phase.stages[stage_id]
    return Transition("stage", s.state, phase.name, stage.result, stage.reason, stage_id, stage.name)


def _step_tr(s: Strategy, ref: StepRef) -> Transition:
    stage, step = s.stage(ref), s.step(ref)
    return Transition("step", s.state, ref.phase, step.result, step.reason, ref.stage_id, stage.name, ref.step_id,
                      step.name, tuple(step.entity_names))


def _set_state(s: Strategy, state: StrategyState, now: datetime, reason: str = "") -> list[Transition]:
    s.state, s.reason, s.updated_at = state, _clip(reason), now
    return [_strategy_tr(s)]


# -- building ----------------------------------------------------------------------------------------------


def create(uuid: str, release: Release, options: StrategyOptions, plan: Plan, now: datetime) -> Strategy:
    """A strategy built into ``plan``: ready to apply."""
    return Strategy(uuid=uuid, release=release, options=options, state="ready-to-apply",
                    apply_phase=Phase("apply", plan.stages), created_at=now, updated_at=now,
                    skipped=dict(plan.skipped))


def build_failed(uuid: str, release: Release, options: StrategyOptions, reason: str, now: datetime) -> Strategy:
    return Strategy(uuid=uuid, release=release, options=options, state="build-failed",
                    apply_phase=Phase("apply", []), created_at=now, updated_at=now, reason=_clip(reason))


# -- operator actions --------------------------------------------------------------------------------------


def begin_apply(s: Strategy, now: datetime, stage_id: int | None = None) -> list[Transition]:
    """``ready-to-apply`` -> ``applying``: every stage (``stage_id`` None), or only the next one (``stage_id``,
    the VIM's apply-stage: the phase pauses after it; stages go in order).  A paused strategy is applied on
    the same way."""
    if stage_id is not None:
        nxt = s.apply_phase.current_stage
        if stage_id != nxt:
            raise NotAllowed(f"stage {stage_id} is not the next stage to be applied (that is stage {nxt})")
        if stage_id >= len(s.apply_phase.stages):
            raise NotAllowed(f"there is no stage {stage_id}")
    if s.state == "applying" and s.paused:
        s.stop_at_stage = None if stage_id is None else stage_id + 1
        s.updated_at = now
        return [Transition("strategy", s.state, s.current_phase,
                           reason=f"applying stage {stage_id}" if stage_id is not None else "applying the rest")]
    if s.state != "ready-to-apply":
        raise NotAllowed(f"the strategy is {s.state}: only a strategy that is ready-to-apply (or applied stage by "
                         "stage, between two stages) can be applied")
    s.apply_phase.result = "inprogress"
    s.stop_at_stage = None if stage_id is None else stage_id + 1
    return _set_state(s, "applying", now, f"applying stage {stage_id}" if stage_id is not None else "") + \
        settle(s, now)


def request_abort(s: Strategy, now: datetime, reason: str = "aborted by the operator") -> list[Transition]:
    """``applying`` -> ``aborting``: the step in flight finishes (a passive one is cut short by the
    executor), then the abort phase undoes the stage in flight."""
    if s.state != "applying":
        raise NotAllowed(f"the strategy is {s.state}: only a strategy being applied can be aborted")
    return _set_state(s, "aborting", now, reason) + settle(s, now)


def can_delete(s: Strategy, force: bool) -> None:
    """``NotAllowed`` unless the strategy may be deleted now (not building, applying or aborting, or
    ``force``)."""
    if s.state in ("building", "applying", "aborting") and not force:
        raise NotAllowed(f"the strategy is {s.state}: abort it first, or delete it with force")


# -- the executor's questions and answers ------------------------------------------------------------------


def inflight(s: Strategy) -> StepRef | None:
    """The step that has started and not finished, if any."""
    for phase in (s.apply_phase, s.abort_phase):
        if phase is None:
            continue
        for sid, stage in enumerate(phase.stages):
            for tid, step in enumerate(stage.steps):
                if step.result == "inprogress":
                    return StepRef(phase.name, sid, tid)
    return None


def current(s: Strategy) -> StepRef | None:
    """The step to run now (it may be one that started before a restart: ``inprogress``); None when
    nothing is to run (not applying or aborting, or waiting for nothing)."""
    if s.state not in RUNNING_STATES:
        return None
    running = inflight(s)
    if running is not None:
        return running
    if s.state == "aborting" and s.current_phase == "apply":
        return None
    if s.paused:
        return None
    phase = s.phase
    if phase.current_stage >= len(phase.stages):
        return None
    stage = phase.stages[phase.current_stage]
    if stage.current_step >= len(stage.steps):
        return None
    return StepRef(phase.name, phase.current_stage, stage.current_step)


def start_step(s: Strategy, ref: StepRef, now: datetime) -> list[Transition]:
    """Mark ``ref`` started (``inprogress``, ``started_at``): persisted before the step acts."""
    step = s.step(ref)
    if step.result != "initial":
        raise NotAllowed(f"step {ref.step_id} ({step.name}) of stage {ref.stage_id} is {step.result}: it started "
                         "already")
    step.result, step.started_at, step.reason = "inprogress", now, ""
    s.updated_at = now
    out = []
    stage = s.stage(ref)
    if stage.result == "initial":
        stage.result = "inprogress"
        out.append(_stage_tr(s, s.phase_named(ref.phase), ref.stage_id))
    return [*out, _step_tr(s, ref)]


def deadline(step: Step, now: datetime) -> datetime:
    """When ``step`` times out (from its durable start; ``now`` for one not started)."""
    return (step.started_at or now) + timedelta(seconds=step.timeout)


def finish_step(s: Strategy, ref: StepRef, outcome: Outcome, now: datetime) -> list[Transition]:
    """Record how ``ref`` ended and move the strategy on."""
    step, stage = s.step(ref), s.stage(ref)
    if step.result != "inprogress":
        raise NotAllowed(f"step {ref.step_id} ({step.name}) is {step.result}, not in progress")
    step.result, step.reason, step.finished_at = outcome.result, _clip(outcome.reason), now
    s.updated_at = now
    out = [_step_tr(s, ref)]
    if outcome.result == "success":
        stage.current_step = ref.step_id + 1
        return out + settle(s, now)
    why = f"{step.name}" + (f" {', '.join(step.entity_names)}" if step.entity_names else "") + \
          f" {outcome.result}" + (f": {outcome.reason}" if outcome.reason else "")
    stage.reason = _clip(why)
    if ref.phase == "abort":
        stage.current_step = len(stage.steps)          # the rest of this undo is moot; other undos still run
        return out + settle(s, now)
    if s.state == "aborting" or outcome.result == "aborted":
        return out + settle(s, now)
    if s.options.stop_on_failure:
        stage.result = "failed"
        out.append(_stage_tr(s, s.apply_phase, ref.stage_id))
        out += _set_state(s, "apply-failed", now, f"stage {ref.stage_id} ({stage.name}): {why}")
        out += _set_state(s, "aborting", now, f"stage {ref.stage_id} ({stage.name}): {why}; aborting")
        return out + settle(s, now)
    # stop_on_failure off: drop the rest of this stage, undo what it did to its hosts, go on
    done = stage.steps[:ref.step_id + 1]
    stage.steps = done + undo_steps(done)
    stage.current_step = ref.step_id + 1
    return out + settle(s, now)


def undo_steps(steps: Sequence[Step]) -> list[Step]:
    """What undoes these (started) steps: unlock the hosts a lock-hosts step locked or tried to lock and no
    later unlock-hosts or reboot-hosts step brought back."""
    locked: dict[str, str] = {}
    for step in steps:
        if step.result == "initial":
            continue
        if step.name == LOCK_HOSTS:
            locked.update(zip(step.entity_names, step.entity_uuids, strict=True))
        elif step.name in (UNLOCK_HOSTS, REBOOT_HOSTS) and step.result == "success":
            for name in step.entity_names:
                locked.pop(name, None)
    if not locked:
        return []
    return [Step(UNLOCK_HOSTS, TIMEOUTS[UNLOCK_HOSTS], list(locked), list(locked.values()),
                 max_retries=UNLOCK_RETRIES, retry_delay=UNLOCK_RETRY_DELAY)]


def _abort_phase(s: Strategy) -> Phase:
    """The abort phase: undo the apply stage in flight; later stages will not run."""
    apply = s.apply_phase
    stages: list[Stage] = []
    if apply.current_stage < len(apply.stages):
        stage = apply.stages[apply.current_stage]
        undo = undo_steps(stage.steps)
        if undo:
            stages.append(Stage(f"abort {stage.name}", undo))
    return Phase("abort", stages)


def settle(s: Strategy, now: datetime) -> list[Transition]:
    """Move the pointers past what is done: finished stages, finished phases, the abort phase once the
    step in flight has finished, the final state."""
    out: list[Transition] = []
    while True:
        if s.state not in RUNNING_STATES:
            return out
        if s.state == "aborting" and s.current_phase == "apply":
            if inflight(s) is not None:
                return out
            out += _enter_abort(s, now)
            continue
        phase = s.phase
        if phase.current_stage < len(phase.stages):
            sid = phase.current_stage
            stage = phase.stages[sid]
            if stage.current_step < len(stage.steps):
                return out
            failed = [st for st in stage.steps if st.result in NOT_OK]
            stage.result = "failed" if failed else "success"
            out.append(_stage_tr(s, phase, sid))
            phase.current_stage += 1
            continue
        failed_stages = [st for st in phase.stages if st.result == "failed"]
        phase.result = "failed" if failed_stages else "success"
        if failed_stages:
            phase.reason = failed_stages[0].reason
        if phase.name == "apply":
            out += _set_state(s, "apply-failed" if failed_stages else "applied", now, phase.reason)
        else:
            out += _set_state(s, "abort-failed" if failed_stages else "aborted", now,
                              phase.reason if failed_stages else s.reason)
        return out


def _enter_abort(s: Strategy, now: datetime) -> list[Transition]:
    apply = s.apply_phase
    out: list[Transition] = []
    for sid in range(apply.current_stage, len(apply.stages)):
        stage = apply.stages[sid]
        if stage.result in ("initial", "inprogress"):
            stage.result = "aborted"
            out.append(_stage_tr(s, apply, sid))
    apply.result = "aborted"
    s.abort_phase = _abort_phase(s)
    s.abort_phase.result = "inprogress"
    s.current_phase = "abort"
    s.updated_at = now
    return [*out, _strategy_tr(s)]


# -- alarms ------------------------------------------------------------------------------------------------


class AlarmLike(Protocol):
    @property
    def alarm_id(self) -> str: ...

    @property
    def severity(self) -> str: ...

    @property
    def mgmt_affecting(self) -> bool: ...


A = TypeVar("A", bound=AlarmLike)


def blocking_alarms(alarms: Iterable[A], restrictions: AlarmRestrictions,
                                  expected: Iterable[str] = EXPECTED_ALARMS) -> list[A]:
    """The alarms that stop a strategy under ``restrictions`` (see the module's doc)."""
    if restrictions == "permissive":
        return []
    ignored = frozenset(expected)
    out = [a for a in alarms if a.alarm_id not in ignored]
    if restrictions == "relaxed":
        out = [a for a in out if a.mgmt_affecting or a.severity == "critical"]
    return out


# -- persistence -------------------------------------------------------------------------------------------


def as_dict(s: Strategy) -> dict[str, Any]:
    return {"uuid": s.uuid, "release": {"name": s.release.name, "version": s.release.version,
                                        "reboot_required": s.release.reboot_required},
            "options": s.options.model_dump(mode="json"), "state": s.state, "reason": s.reason,
            "current_phase": s.current_phase, "apply_phase": s.apply_phase.as_dict(),
            "abort_phase": s.abort_phase.as_dict() if s.abort_phase is not None else None,
            "skipped": dict(s.skipped), "created_at": s.created_at.isoformat(), "updated_at": s.updated_at.isoformat(),
            "stop_at_stage": s.stop_at_stage}


def from_dict(data: dict[str, Any]) -> Strategy:
    r = data["release"]
    return Strategy(uuid=data["uuid"], release=Release(r["name"], r["version"], bool(r["reboot_required"])),
                    options=StrategyOptions.model_validate(data["options"]), state=data["state"],
                    reason=data["reason"], current_phase=data["current_phase"],
                    apply_phase=Phase.from_dict(data["apply_phase"]),
                    abort_phase=Phase.from_dict(data["abort_phase"]) if data.get("abort_phase") else None,
                    skipped=dict(data["skipped"]), created_at=datetime.fromisoformat(data["created_at"]),
                    updated_at=datetime.fromisoformat(data["updated_at"]), stop_at_stage=data.get("stop_at_stage"))
