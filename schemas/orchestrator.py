"""Messages of the orchestrator (owner ``orchestrator``) and of the update side of the host agents.

``roost.cmd.hostservices.disable|enable``: inventory's lock asks the orchestrator to disable the
services on a host (cordon, drain, taint) and waits for the answer; unlock asks it to enable them again
(in the spirit of sysinv's calls to the VIM).

Releases and agents: a ``Release`` is what a host runs (name, version, whether installing it needs the
host locked and rebooted).  Each host agent answers, on its own subject, ``roost.cmd.agent.release``
(which release it runs) and ``roost.cmd.agent.update`` (install this release; the reply says the release
it runs afterwards, a refusal says why the install failed).

Update strategies (one at a time, modelled on the StarlingX VIM sw-deploy strategy):
``roost.cmd.strategy.create|show|apply|abort|delete``, and an event for every transition of the strategy
(``roost.strategy.state_changed``), of a stage (``roost.strategy.stage_changed``) and of a step
(``roost.strategy.step_changed``); ``entity_id`` is the strategy's uuid and ``version`` grows by one per
transition of that strategy, whichever the kind.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.envelope import EntityEvent, Role
from schemas.inventory import Hostname
from schemas.registry import REGISTRY, Registry

OWNER = "orchestrator"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HostServices(_Model):
    uuid: str = Field(min_length=1, max_length=64)
    hostname: Hostname
    action: Literal["lock", "force-lock", "unlock"]


class HostServicesResult(_Model):
    """``done``: the services are disabled (enabled); otherwise ``detail`` says why not."""

    done: bool
    detail: str = Field(default="", max_length=1024)


# -- releases and the agents' update commands -----------------------------------------------------------

ReleaseName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")]


class Release(_Model):
    """A software release a host can run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ReleaseName
    version: str = Field(min_length=1, max_length=64)
    reboot_required: bool = Field(default=True, description="installing it needs the host locked, then "
                                  "rebooted by its unlock")


class AgentUpdate(_Model):
    """Install ``release`` on the agent's host (idempotent: a host already on it answers at once)."""

    release: Release


class AgentReleaseQuery(_Model):
    """Which release does the agent's host run?"""


class AgentRelease(_Model):
    """The release the agent's host runs (none: it has never been updated by roost)."""

    agent: str = Field(min_length=1, max_length=64)
    release: Release | None = None
    detail: str = Field(default="", max_length=1024)


# -- strategies ---------------------------------------------------------------------------------------------

ApplyType = Literal["serial", "parallel", "ignore"]
AlarmRestrictions = Literal["strict", "relaxed", "permissive"]
StrategyState = Literal["building", "build-failed", "ready-to-apply", "applying", "applied", "apply-failed",
                        "aborting", "aborted", "abort-failed"]
PhaseName = Literal["build", "apply", "abort"]
StepResult = Literal["initial", "inprogress", "wait", "success", "degraded", "failed", "timed-out", "aborted"]
Detail = Annotated[str, Field(max_length=1024)]
MIN_PARALLEL = 2
MAX_PARALLEL = 10


class StrategyOptions(_Model):
    """How a strategy goes about it (``roost strategy create`` options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    controller_apply_type: ApplyType = "serial"
    storage_apply_type: ApplyType = "serial"
    worker_apply_type: ApplyType = "serial"
    max_parallel_worker_hosts: int = Field(default=MIN_PARALLEL, ge=MIN_PARALLEL, le=MAX_PARALLEL)
    alarm_restrictions: AlarmRestrictions = Field(
        default="strict", description="strict: any active alarm blocks (but host locked, 950.001); relaxed: only "
                                      "management-affecting ones; permissive: none")
    stop_on_failure: bool = Field(default=True, description="a failed step fails the strategy, which then aborts; "
                                  "otherwise the failed stage is left and the next one runs")

    @model_validator(mode="after")
    def _controllers_not_parallel(self) -> StrategyOptions:
        if self.controller_apply_type == "parallel":
            raise ValueError("parallel apply type not allowed for controllers")
        return self


class StrategyCreate(StrategyOptions):
    """Build an update strategy to ``release`` for the site as it is now."""

    release: Release


class StrategyQuery(_Model):
    """The strategy (there is at most one): show, apply, abort."""


class StrategyApply(_Model):
    """Apply every stage, or only the next one (``stage_id``: the VIM's apply-stage; the strategy pauses
    after it, still applying, until the next apply)."""

    stage_id: int | None = Field(default=None, ge=0)


class StrategyDelete(_Model):
    force: bool = Field(default=False, description="delete even while it is applying or aborting")


class StepView(_Model):
    step_id: int = Field(ge=0)
    name: str = Field(max_length=64)
    entity_names: list[str] = Field(default_factory=list)
    timeout: float = Field(ge=0)
    result: StepResult
    reason: Detail = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None


class StageView(_Model):
    stage_id: int = Field(ge=0)
    name: str = Field(max_length=1024)
    result: StepResult
    reason: Detail = ""
    current_step: int = Field(ge=0)
    steps: list[StepView] = Field(default_factory=list)


class PhaseView(_Model):
    name: PhaseName
    result: StepResult
    reason: Detail = ""
    current_stage: int = Field(ge=0)
    total_stages: int = Field(ge=0)
    stages: list[StageView] = Field(default_factory=list)


class StrategyView(_Model):
    uuid: str = Field(min_length=1, max_length=64)
    state: StrategyState
    reason: Detail = ""
    release: Release
    options: StrategyOptions
    current_phase: PhaseName
    apply_phase: PhaseView
    abort_phase: PhaseView | None = None
    skipped: dict[str, str] = Field(default_factory=dict, description="hosts left out, with why")
    stop_at_stage: int | None = Field(default=None, description="applying stage by stage: it pauses before this one")
    created_at: datetime
    updated_at: datetime
    version: int = Field(ge=1)


class StrategyShowResult(_Model):
    strategy: StrategyView | None = None


class StrategyDeleted(_Model):
    uuid: str
    state: StrategyState


class StrategyTransition(EntityEvent):
    """A transition of the strategy (``stage_id`` and ``step_id`` none), of one of its stages (``step_id``
    none) or of one of its steps; ``state``: the strategy's state after it."""

    state: StrategyState
    phase: PhaseName
    stage_id: int | None = None
    stage_name: str | None = Field(default=None, max_length=1024)
    step_id: int | None = None
    step_name: str | None = Field(default=None, max_length=64)
    entity_names: list[str] = Field(default_factory=list)
    result: StepResult | None = None
    reason: Detail = ""


def register(registry: Registry) -> None:
    registry.command("roost.cmd.hostservices.disable", OWNER, HostServices,
                     "Disable the services on a host before it is locked (cordon, drain, taint)",
                     min_role=Role.ADMIN, result_model=HostServicesResult)
    registry.command("roost.cmd.hostservices.enable", OWNER, HostServices,
                     "Enable the services on a host again after unlock (uncordon, untaint)",
                     min_role=Role.ADMIN, result_model=HostServicesResult)
    registry.command("roost.cmd.agent.update", "agent", AgentUpdate,
                     "Install a release on the agent's host (sent to roost.cmd.agent.<agent>.update)",
                     min_role=Role.ADMIN, result_model=AgentRelease)
    registry.command("roost.cmd.agent.release", "agent", AgentReleaseQuery,
                     "Which release the agent's host runs (sent to roost.cmd.agent.<agent>.release)",
                     min_role=Role.READER, result_model=AgentRelease)
    registry.command("roost.cmd.strategy.create", OWNER, StrategyCreate,
                     "Build an update strategy (there is at most one)", min_role=Role.ADMIN,
                     result_model=StrategyView)
    registry.command("roost.cmd.strategy.show", OWNER, StrategyQuery, "Show the update strategy",
                     min_role=Role.READER, result_model=StrategyShowResult)
    registry.command("roost.cmd.strategy.apply", OWNER, StrategyApply, "Apply the update strategy (or its next stage)",
                     min_role=Role.ADMIN, result_model=StrategyView)
    registry.command("roost.cmd.strategy.abort", OWNER, StrategyQuery,
                     "Abort the update strategy being applied (a locked host is unlocked)", min_role=Role.ADMIN,
                     result_model=StrategyView)
    registry.command("roost.cmd.strategy.delete", OWNER, StrategyDelete, "Delete the update strategy",
                     min_role=Role.ADMIN, result_model=StrategyDeleted)
    for kind, what in (("state_changed", "the strategy's state"), ("stage_changed", "a stage's result"),
                       ("step_changed", "a step's result")):
        registry.event(f"roost.strategy.{kind}", OWNER, StrategyTransition, f"An update strategy: {what} changed")


register(REGISTRY)
