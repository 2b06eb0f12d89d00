"""The host state machine: StarlingX's rules for lock, unlock, swact and the power actions, pure.

No I/O, no clock, no randomness: ``decide(site, command)`` says whether an operator command may run on
the site as it is and, if so, the site after it and the effects the service must carry out;
``apply(site, event)`` folds in a fact reported by another part of the system (services disabled, a
heartbeat verdict, a degrade reason, an observed power state).  Facts are never refused; a fact that
does not fit the current state is ignored (the site comes back unchanged, with a ``detail`` saying why).

The service (``services.inventory.service``) loads the site, calls these, persists the new site and
its events in one transaction, and only then carries out the effects, whose outcomes come back as
events.

Invariants (checked by property-based tests over random sequences, ``tests/unit/test_inventory_machine.py``):

* the active controller, when there is one, is a controller that is unlocked and enabled;
* a locked host is operationally disabled and never available or degraded (never takes workloads);
* a power effect (power-off, reset, reboot, reinstall) only ever targets a host that is locked;
* a refused command has a reason and leaves the site as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from schemas.inventory import Administrative, Availability, HostAction, Operational, Personality, PowerState

# -- state -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostState:
    """What the rules need to know of one host."""

    uuid: str
    hostname: str | None
    personality: Personality | None
    mgmt_mac: str | None = None
    administrative: Administrative = "locked"
    operational: Operational = "disabled"
    availability: Availability = "offline"
    task: str = ""
    action: HostAction = "none"
    inventoried: bool = False          # its agent has reported its hardware
    agent_alive: bool = False          # its agent announced itself recently
    bmc: bool = False                  # a BMC is provisioned
    power: PowerState = "unknown"
    degrade_reasons: frozenset[str] = frozenset()

    @property
    def provisioned(self) -> bool:
        return bool(self.hostname and self.personality and self.mgmt_mac)

    @property
    def enabled(self) -> bool:
        return self.administrative == "unlocked" and self.operational == "enabled"

    def with_(self, **changes: object) -> HostState:
        return replace(self, **changes)  # type: ignore[arg-type]


def _frozen(hosts: Mapping[str, HostState]) -> Mapping[str, HostState]:
    return MappingProxyType(dict(hosts))


@dataclass(frozen=True, slots=True)
class Site:
    """Every host, by uuid, and which controller is active (the heartbeat service's announcement, or
    the first controller enabled while none is: the bootstrap controller, as StarlingX's controller-0)."""

    hosts: Mapping[str, HostState] = field(default_factory=dict)
    active: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "hosts", _frozen(self.hosts))

    def host(self, uuid: str) -> HostState | None:
        return self.hosts.get(uuid)

    def with_host(self, host: HostState) -> Site:
        return Site({**self.hosts, host.uuid: host}, self.active)

    def without(self, uuid: str) -> Site:
        return Site({k: v for k, v in self.hosts.items() if k != uuid}, self.active if self.active != uuid else None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Site) and dict(self.hosts) == dict(other.hosts) and self.active == other.active

    def __hash__(self) -> int:
        return hash((frozenset(self.hosts.items()), self.active))


# -- commands (from operators) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lock:
    uuid: str
    force: bool = False


@dataclass(frozen=True, slots=True)
class Unlock:
    uuid: str
    force: bool = False


@dataclass(frozen=True, slots=True)
class Reboot:
    uuid: str


@dataclass(frozen=True, slots=True)
class Reset:
    uuid: str


@dataclass(frozen=True, slots=True)
class PowerOn:
    uuid: str


@dataclass(frozen=True, slots=True)
class PowerOff:
    uuid: str


@dataclass(frozen=True, slots=True)
class Reinstall:
    uuid: str


@dataclass(frozen=True, slots=True)
class Swact:
    uuid: str           # the active controller, from which the role moves
    force: bool = False


@dataclass(frozen=True, slots=True)
class Delete:
    uuid: str


Command = Lock | Unlock | Reboot | Reset | PowerOn | PowerOff | Reinstall | Swact | Delete


# -- events (facts from the rest of the system) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServicesDisabled:
    """The orchestrator disabled the host's services (or none is configured): the lock completes."""

    uuid: str


@dataclass(frozen=True, slots=True)
class ServicesDisableFailed:
    """Disabling the services failed or timed out: a lock fails; a force-lock locks anyway."""

    uuid: str
    reason: str


@dataclass(frozen=True, slots=True)
class GoEnabled:
    """The in-test checks of a host in ``intest`` passed or failed."""

    uuid: str
    passed: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AgentOnline:
    uuid: str


@dataclass(frozen=True, slots=True)
class AgentOffline:
    uuid: str


@dataclass(frozen=True, slots=True)
class HeartbeatHealth:
    """The heartbeat service's verdict: healthy, degraded (networks down) or failed."""

    uuid: str
    state: str                               # "healthy" | "degraded" | "failed"
    networks_down: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ActiveChanged:
    """The heartbeat service announces the active controller (none: no controller is active)."""

    uuid: str | None


@dataclass(frozen=True, slots=True)
class DegradeSet:
    uuid: str
    key: str


@dataclass(frozen=True, slots=True)
class DegradeCleared:
    uuid: str
    key: str


@dataclass(frozen=True, slots=True)
class PowerObserved:
    uuid: str
    power: PowerState


@dataclass(frozen=True, slots=True)
class ActionDone:
    """A power action (reboot, reset, power-on, power-off, reinstall) finished: its task clears."""

    uuid: str


@dataclass(frozen=True, slots=True)
class ActionFailed:
    uuid: str
    reason: str


Event = (ServicesDisabled | ServicesDisableFailed | GoEnabled | AgentOnline | AgentOffline | HeartbeatHealth
         | ActiveChanged | DegradeSet | DegradeCleared | PowerObserved | ActionDone | ActionFailed)


# -- effects (what the service must carry out after committing) ----------------------------------------


@dataclass(frozen=True, slots=True)
class DisableServices:
    uuid: str
    force: bool


@dataclass(frozen=True, slots=True)
class EnableServices:
    uuid: str


@dataclass(frozen=True, slots=True)
class StartGoEnabled:
    """Run the in-test checks on a host now in ``intest`` (its agent must answer)."""

    uuid: str


@dataclass(frozen=True, slots=True)
class BmcAction:
    uuid: str
    action: str        # "power-on" | "power-off" | "reset" | "reboot" | "reinstall"


@dataclass(frozen=True, slots=True)
class RequestSwact:
    from_uuid: str
    to_uuid: str
    force: bool


Effect = DisableServices | EnableServices | StartGoEnabled | BmcAction | RequestSwact

POWER_EFFECTS = frozenset({"power-off", "reset", "reboot", "reinstall"})
"""BMC actions that take a running host down: only ever for a locked host."""


# -- outcomes ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    site: Site
    effects: tuple[Effect, ...] = ()
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str

    def __post_init__(self) -> None:
        if not self.reason:
            raise ValueError("a refusal needs a reason")


def decide(site: Site, command: Command) -> Accepted | Refused:
    """May ``command`` run on ``site``?  The site after it and the effects to carry out, or the reason not."""
    raise NotImplementedError


def apply(site: Site, event: Event) -> Accepted:
    """Fold a fact into the site.  Never refused: a fact that does not fit is ignored (``detail`` says why)."""
    raise NotImplementedError
