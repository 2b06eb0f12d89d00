"""Update strategies, the pure part: how a strategy is built into stages and steps (no I/O, no clock).

Modelled on the StarlingX VIM software-deploy strategy.  ``build(request, release, hosts)`` checks that the
site is safe to update, skips the hosts already on the target release, and lays out the apply phase:

* **controllers** (``serial`` or ``ignore``; ``parallel`` is refused: a site must keep a controller): one
  stage per controller, the active one last.  With a release that needs a reboot::

      query-alarms → [swact-hosts, for the active one] → lock-hosts (3 tries, 90 s apart) → apply-update
      → system-stabilize (15 s) → unlock-hosts → wait-alarms-clear (2400 s)

  without a reboot: ``query-alarms → apply-update → system-stabilize (30 s)``.
* **storage** (``serial``, ``parallel`` or ``ignore``): as controllers without the swact, ending with
  ``wait-data-sync`` (1800 s); ``parallel`` packs hosts so that no two of one replication group share a
  stage (at most ``max_parallel_worker_hosts`` per stage).
* **workers** (``serial``, ``parallel`` or ``ignore``): unlocked workers are locked (their node drained),
  updated and unlocked: ``query-alarms → lock-hosts → apply-update → system-stabilize (15 s) → unlock-hosts
  → wait-alarms-clear (600 s)``; workers that were locked before stay locked and are rebooted instead:
  ``query-alarms → apply-update → reboot-hosts → system-stabilize (15 s)``.  ``serial``: one host per
  stage, the locked ones first (they run no workload); ``parallel``: batches of at most
  ``max_parallel_worker_hosts``, locked and unlocked hosts never in one batch.

A stage's timeout is the sum of its steps' timeouts plus one second.  Preconditions (as the VIM's
``build_complete``): every controller and storage host unlocked-enabled-available ("no full redundancy"
otherwise); every worker either unlocked-enabled-available or locked-disabled-online (a locked worker that
is offline cannot run its agent: it is skipped and said so); an update that needs a reboot cannot be
applied to a lone controller (nothing would take over while it is locked).  Hosts already on the target
release are skipped; when nothing is left, the build fails with "no hosts need the release".

``Stage`` and ``Step`` carry their progress fields (``result``, ``reason``, ``current_step``) and round-trip
through ``as_dict`` / ``from_dict`` (JSON-safe), to be persisted after every transition.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from schemas.orchestrator import MAX_PARALLEL, MIN_PARALLEL, AlarmRestrictions, ApplyType, StepResult
from schemas.orchestrator import StrategyOptions as StrategyCreate

__all__ = ["MAX_PARALLEL", "MIN_PARALLEL", "AlarmRestrictions", "ApplyType", "BuildError", "HostInfo", "Plan",
           "Release", "Stage", "Step", "StepResult", "StrategyCreate", "build"]

# step names and their timeouts in seconds (VIM _strategy_steps at HEAD)
QUERY_ALARMS = "query-alarms"
SWACT_HOSTS = "swact-hosts"
LOCK_HOSTS = "lock-hosts"
APPLY_UPDATE = "apply-update"
SYSTEM_STABILIZE = "system-stabilize"
UNLOCK_HOSTS = "unlock-hosts"
REBOOT_HOSTS = "reboot-hosts"
WAIT_ALARMS_CLEAR = "wait-alarms-clear"
WAIT_DATA_SYNC = "wait-data-sync"

TIMEOUTS: dict[str, int] = {QUERY_ALARMS: 60, SWACT_HOSTS: 900, LOCK_HOSTS: 900, APPLY_UPDATE: 1800,
                            UNLOCK_HOSTS: 1800, REBOOT_HOSTS: 900, WAIT_ALARMS_CLEAR: 300, WAIT_DATA_SYNC: 1800}
MTCE_DELAY = 15            # system-stabilize after a reboot
NO_REBOOT_DELAY = 30       # system-stabilize after an update without one


class BuildError(ValueError):
    """The strategy cannot be built; the message says why (the VIM's build-failed reason)."""


@dataclass(frozen=True, slots=True)
class Release:
    name: str
    version: str
    reboot_required: bool = True


@dataclass(frozen=True, slots=True)
class HostInfo:
    """What the build needs to know of a host (from inventory, and the release its agent reports)."""

    uuid: str
    hostname: str
    personality: Literal["controller", "worker", "storage"]
    administrative: str
    operational: str
    availability: str
    active: bool = False                 # the active controller
    release: str | None = None           # the release it runs
    group: str | None = None             # storage: its replication group

    @property
    def state(self) -> str:
        return f"{self.administrative}-{self.operational}-{self.availability}"


@dataclass
class Step:
    name: str
    timeout: int
    entity_names: list[str] = field(default_factory=list)
    entity_uuids: list[str] = field(default_factory=list)
    max_retries: int = 0
    retry_delay: int = 0
    result: StepResult = "initial"
    reason: str = ""
    started_at: datetime | None = None       # the durable "started" marker (written before the step acts)
    finished_at: datetime | None = None
    sent: list[str] = field(default_factory=list)   # hosts sent a command that must not go twice (swact)

    @property
    def entity_type(self) -> str:
        return "hosts" if self.entity_names else ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "timeout": self.timeout, "entity_type": self.entity_type,
                "entity_names": list(self.entity_names), "entity_uuids": list(self.entity_uuids),
                "max_retries": self.max_retries, "retry_delay": self.retry_delay, "result": self.result,
                "reason": self.reason, "started_at": _iso(self.started_at), "finished_at": _iso(self.finished_at),
                "sent": list(self.sent)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Step:
        return cls(name=data["name"], timeout=int(data["timeout"]), entity_names=list(data["entity_names"]),
                   entity_uuids=list(data["entity_uuids"]), max_retries=int(data["max_retries"]),
                   retry_delay=int(data["retry_delay"]), result=data["result"], reason=data["reason"],
                   started_at=_when(data.get("started_at")), finished_at=_when(data.get("finished_at")),
                   sent=list(data.get("sent", [])))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _when(value: object) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


@dataclass
class Stage:
    name: str
    steps: list[Step]
    current_step: int = 0
    result: StepResult = "initial"
    reason: str = ""

    @property
    def timeout(self) -> int:
        return sum(s.timeout for s in self.steps) + 1

    @property
    def hosts(self) -> list[str]:
        return list(dict.fromkeys(n for s in self.steps for n in s.entity_names))

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "timeout": self.timeout, "current_step": self.current_step,
                "result": self.result, "reason": self.reason, "steps": [s.as_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stage:
        return cls(name=data["name"], steps=[Step.from_dict(s) for s in data["steps"]],
                   current_step=int(data["current_step"]), result=data["result"], reason=data["reason"])


@dataclass
class Plan:
    """The built apply phase: its stages, and the hosts left out with the reason."""

    stages: list[Stage]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def timeout(self) -> int:
        return sum(s.timeout for s in self.stages) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"stages": [s.as_dict() for s in self.stages], "skipped": dict(self.skipped),
                "timeout": self.timeout}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(stages=[Stage.from_dict(s) for s in data["stages"]], skipped=dict(data["skipped"]))


def _step(name: str, hosts: Sequence[HostInfo] = (), *, timeout: int | None = None, retries: int = 0,
          retry_delay: int = 0) -> Step:
    return Step(name, TIMEOUTS[name] if timeout is None else timeout, [h.hostname for h in hosts],
                [h.uuid for h in hosts], max_retries=retries, retry_delay=retry_delay)


def _available(host: HostInfo) -> bool:
    return host.state == "unlocked-enabled-available"


def _check(hosts: Sequence[HostInfo], release: Release) -> dict[str, str]:
    """Refuse an unsafe site (``BuildError``); the hosts to leave out, with why."""
    unsafe = [h.hostname for h in hosts if h.personality in ("controller", "storage") and not _available(h)]
    if unsafe:
        raise BuildError(f"all controller and storage hosts must be unlocked-enabled-available (not: "
                         f"{', '.join(sorted(unsafe))}); it is not safe to update without full redundancy")
    skipped: dict[str, str] = {}
    for h in hosts:
        if h.personality != "worker" or _available(h) or h.state == "locked-disabled-online":
            continue
        if h.state == "locked-disabled-offline":
            skipped[h.hostname] = "locked and offline: its agent cannot apply the update"
        else:
            raise BuildError(f"worker {h.hostname} is {h.state}: workers must be unlocked-enabled-available, "
                             "locked-disabled-online or locked-disabled-offline")
    for h in hosts:
        if h.release == release.name:
            skipped.setdefault(h.hostname, f"already on {release.name}")
    return skipped


def _controller_stage(host: HostInfo, release: Release, others: int) -> Stage:
    one = [host]
    if not release.reboot_required:
        return Stage(f"update-controller {host.hostname}", [
            _step(QUERY_ALARMS), _step(APPLY_UPDATE, one), _step(SYSTEM_STABILIZE, timeout=NO_REBOOT_DELAY)])
    steps = [_step(QUERY_ALARMS)]
    if host.active and others:
        steps.append(_step(SWACT_HOSTS, one))
    steps += [_step(LOCK_HOSTS, one, retries=3, retry_delay=90), _step(APPLY_UPDATE, one),
              _step(SYSTEM_STABILIZE, timeout=MTCE_DELAY), _step(UNLOCK_HOSTS, one),
              _step(WAIT_ALARMS_CLEAR, timeout=2400)]
    return Stage(f"update-controller {host.hostname}", steps)


def _storage_stage(batch: Sequence[HostInfo], release: Release) -> Stage:
    name = f"update-storage {', '.join(h.hostname for h in batch)}"
    if not release.reboot_required:
        return Stage(name, [_step(QUERY_ALARMS), _step(APPLY_UPDATE, batch),
                            _step(SYSTEM_STABILIZE, timeout=NO_REBOOT_DELAY)])
    return Stage(name, [_step(QUERY_ALARMS), _step(LOCK_HOSTS, batch), _step(APPLY_UPDATE, batch),
                        _step(SYSTEM_STABILIZE, timeout=MTCE_DELAY), _step(UNLOCK_HOSTS, batch),
                        _step(WAIT_DATA_SYNC)])


def _worker_stage(batch: Sequence[HostInfo], release: Release) -> Stage:
    name = f"update-workers {', '.join(h.hostname for h in batch)}"
    if not release.reboot_required:
        return Stage(name, [_step(QUERY_ALARMS), _step(APPLY_UPDATE, batch),
                            _step(SYSTEM_STABILIZE, timeout=NO_REBOOT_DELAY)])
    if all(h.administrative == "locked" for h in batch):
        return Stage(name, [_step(QUERY_ALARMS), _step(APPLY_UPDATE, batch), _step(REBOOT_HOSTS, batch),
                            _step(SYSTEM_STABILIZE, timeout=MTCE_DELAY)])
    return Stage(name, [_step(QUERY_ALARMS), _step(LOCK_HOSTS, batch), _step(APPLY_UPDATE, batch),
                        _step(SYSTEM_STABILIZE, timeout=MTCE_DELAY), _step(UNLOCK_HOSTS, batch),
                        _step(WAIT_ALARMS_CLEAR, timeout=600)])


def _chunks(hosts: Sequence[HostInfo], size: int) -> list[list[HostInfo]]:
    return [list(hosts[i:i + size]) for i in range(0, len(hosts), size)]


def _by_group(hosts: Sequence[HostInfo], size: int) -> list[list[HostInfo]]:
    """Batches of at most ``size`` with no two hosts of one replication group (first fit, in order)."""
    batches: list[list[HostInfo]] = []
    for host in hosts:
        for batch in batches:
            if len(batch) < size and (host.group is None or all(b.group != host.group for b in batch)):
                batch.append(host)
                break
        else:
            batches.append([host])
    return batches


def _batches(hosts: Sequence[HostInfo], apply_type: ApplyType, size: int) -> list[list[HostInfo]]:
    if apply_type == "serial":
        return [[h] for h in hosts]
    return _chunks(hosts, size)


def build(request: StrategyCreate, release: Release, hosts: Iterable[HostInfo]) -> Plan:
    """The apply phase of a strategy updating ``hosts`` to ``release``; ``BuildError`` saying why not."""
    ordered = sorted(hosts, key=lambda h: h.hostname)
    names = [h.hostname for h in ordered]
    if len(set(names)) != len(names):
        raise BuildError("two hosts with the same hostname")
    skipped = _check(ordered, release)
    todo = [h for h in ordered if h.hostname not in skipped]
    stages: list[Stage] = []

    controllers = [h for h in todo if h.personality == "controller"]
    if request.controller_apply_type == "ignore":
        skipped.update({h.hostname: "controller apply type is ignore" for h in controllers})
    else:
        others = sum(1 for h in ordered if h.personality == "controller") - 1
        if controllers and release.reboot_required and not others:
            raise BuildError(f"{release.name} needs a reboot and {controllers[0].hostname} is the only controller: "
                             "nothing would take over while it is locked")
        for host in sorted(controllers, key=lambda h: h.active):          # the active controller last
            stages.append(_controller_stage(host, release, others))

    storage = [h for h in todo if h.personality == "storage"]
    if request.storage_apply_type == "ignore":
        skipped.update({h.hostname: "storage apply type is ignore" for h in storage})
    elif request.storage_apply_type == "serial":
        stages += [_storage_stage([h], release) for h in storage]
    else:
        stages += [_storage_stage(b, release) for b in _by_group(storage, request.max_parallel_worker_hosts)]

    workers = [h for h in todo if h.personality == "worker"]
    if request.worker_apply_type == "ignore":
        skipped.update({h.hostname: "worker apply type is ignore" for h in workers})
    else:
        locked = [h for h in workers if h.administrative == "locked"]
        unlocked = [h for h in workers if h.administrative != "locked"]
        for group in (locked, unlocked):
            stages += [_worker_stage(b, release)
                       for b in _batches(group, request.worker_apply_type, request.max_parallel_worker_hosts)]

    if not stages:
        raise BuildError(f"no hosts need {release.name}"
                         + (f" ({'; '.join(f'{n}: {r}' for n, r in sorted(skipped.items()))})" if skipped else ""))
    return Plan(stages, skipped)
