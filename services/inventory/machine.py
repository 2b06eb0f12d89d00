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

Where StarlingX's rules leave a choice, these are made here:

* A host whose heartbeat fails while it is being locked stays being locked (task and action kept): the
  orchestrator's answer ends the lock (``ServicesDisabled`` locks it; ``ServicesDisableFailed`` fails a plain
  lock and locks a forced one anyway), and the host does not start recovering while the lock goes on.  Any
  other action in progress on a failing host (an unlock in test, a swact) ends with the failure.
* A host recovering from a failure (in test with no action) may be locked; if its in-test checks pass
  meanwhile it becomes enabled but keeps its lock, and its services are not re-enabled.
* A controller announced active while it is being locked keeps the role and its lock is abandoned
  (``EnableServices`` undoes the disabling); an active controller is never locked.
* A force-lock whose services could not be disabled resets a worker with a BMC as a power action: task
  ``Resetting``, action ``reset``, availability ``offline``; ``ActionDone`` / ``ActionFailed`` end it.
* ``ActionFailed`` puts a locked host's availability back to what is known of it (power, then agent):
  the reboot or reset that would have taken it down did not happen.
* The last-controller protection counts a controller being locked as gone already, so the two
  controllers cannot be locked at the same time.
* ``Accepted.ignored`` marks an event that did not fit (the site comes back equal).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal, assert_never

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
    """A power action on the host: through its BMC (a ``reboot`` goes through its agent when it has no BMC;
    a ``reinstall`` too, when it is online with no BMC).  Its outcome comes back as ``ActionDone`` or
    ``ActionFailed``."""

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
    """The site after the command or event, and the effects to carry out once it is committed.

    ``ignored`` is true when an event did not fit the state (unknown host, nothing in progress that it
    could conclude): the site comes back equal and ``detail`` says why."""

    site: Site
    effects: tuple[Effect, ...] = ()
    detail: str = ""
    ignored: bool = False


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str

    def __post_init__(self) -> None:
        if not self.reason:
            raise ValueError("a refusal needs a reason")


# -- the rules -----------------------------------------------------------------------------------------

PowerAction = Literal["reboot", "reset", "power-on", "power-off", "reinstall"]

LOCKING: frozenset[HostAction] = frozenset({"lock", "force-lock"})
"""Actions of a lock in progress (the host is still unlocked, its services are being disabled)."""

POWER_ACTIONS: frozenset[HostAction] = frozenset({"reboot", "reset", "power-on", "power-off", "reinstall"})
"""Actions that ``ActionDone`` / ``ActionFailed`` conclude (always on a locked host)."""

_POWER_TASKS: Mapping[PowerAction, str] = MappingProxyType({
    "reboot": "Rebooting", "reset": "Resetting", "power-on": "Powering-on", "power-off": "Powering-off",
    "reinstall": "Reinstalling",
})
_GOES_DOWN: frozenset[PowerAction] = frozenset({"reboot", "reset", "reinstall"})

HEARTBEAT_REASON_PREFIX = "heartbeat."
"""Degrade reasons owned by the heartbeat verdicts: ``heartbeat.<network>``, one per network down."""

HEARTBEAT_STATES = frozenset({"healthy", "degraded", "failed"})


def _name(host: HostState) -> str:
    return host.hostname or host.uuid


def _no_host(uuid: str) -> Refused:
    return Refused(f"no host {uuid}")


def _busy(verb: str, host: HostState) -> Refused:
    return Refused(f"Host {verb} rejected due to in progress action {host.action} on {_name(host)}"
                   f" (task '{host.task}'); wait for it to finish")


def _ignored(site: Site, why: str) -> Accepted:
    return Accepted(site, (), why, ignored=True)


def _locking(host: HostState) -> bool:
    return host.action in LOCKING


def _in_service_availability(host: HostState) -> Availability:
    """An unlocked-enabled host: degraded while any reason stands, else available."""
    return "degraded" if host.degrade_reasons else "available"


def _locked_availability(host: HostState) -> Availability:
    """A locked host: what is known of it without the heartbeat (power, then its agent)."""
    if host.power == "off":
        return "power-off"
    return "online" if host.agent_alive else "offline"


def _with_reasons(host: HostState, reasons: frozenset[str]) -> HostState:
    """New degrade reasons; an unlocked-enabled host's availability follows them."""
    host = replace(host, degrade_reasons=reasons)
    if host.enabled:
        host = replace(host, availability=_in_service_availability(host))
    return host


def _other_enabled_controller(site: Site, uuid: str) -> bool:
    """Another controller is unlocked-enabled and not being locked (it will still be there afterwards)."""
    return any(h.uuid != uuid and h.personality == "controller" and h.enabled and not _locking(h)
               for h in site.hosts.values())


def _complete_lock(host: HostState) -> HostState:
    done = replace(host, administrative="locked", operational="disabled", task="", action="none")
    return replace(done, availability=_locked_availability(done))


def _abandon_lock(site: Site, host: HostState, why: str) -> Accepted:
    """The host is (or became) the active controller: it must not be locked; its services come back."""
    return Accepted(site.with_host(replace(host, task="", action="none")), (EnableServices(host.uuid),),
                    f"lock of {_name(host)} abandoned: {why}")


# -- commands --


def decide(site: Site, command: Command) -> Accepted | Refused:
    """May ``command`` run on ``site``?  The site after it and the effects to carry out, or the reason not.

    A refusal leaves the site as it was (the site is immutable: nothing here can change it)."""
    match command:
        case Lock(uuid, force):
            return _lock(site, uuid, force)
        case Unlock(uuid, force):
            return _unlock(site, uuid, force)
        case Reboot(uuid):
            return _power(site, uuid, "reboot")
        case Reset(uuid):
            return _power(site, uuid, "reset")
        case PowerOn(uuid):
            return _power(site, uuid, "power-on")
        case PowerOff(uuid):
            return _power(site, uuid, "power-off")
        case Reinstall(uuid):
            return _power(site, uuid, "reinstall")
        case Swact(uuid, force):
            return _swact(site, uuid, force)
        case Delete(uuid):
            return _delete(site, uuid)
        case _:
            assert_never(command)


def _lock(site: Site, uuid: str, force: bool) -> Accepted | Refused:
    host = site.host(uuid)
    if host is None:
        return _no_host(uuid)
    name = _name(host)
    if host.administrative == "locked":
        return Refused(f"Avoiding lock action on already 'locked' host {name}")
    if host.action != "none":
        return _busy("lock", host)
    # Neither of the controller protections is waived by force (StarlingX's check_lock_controller).
    if site.active == uuid:
        return Refused("Can not lock an active controller; swact first")
    if host.personality == "controller" and host.enabled and not _other_enabled_controller(site, uuid):
        return Refused(f"Can not lock {name}: it is the last unlocked-enabled controller; "
                       "unlock another controller first")
    locking = replace(host, task="Force Locking" if force else "Locking", action="force-lock" if force else "lock")
    return Accepted(site.with_host(locking), (DisableServices(uuid, force),),
                    f"{'force-' if force else ''}locking {name}: disabling its services")


def _unlock(site: Site, uuid: str, force: bool) -> Accepted | Refused:
    host = site.host(uuid)
    if host is None:
        return _no_host(uuid)
    name = _name(host)
    if not host.provisioned:
        missing = [f for f, v in (("hostname", host.hostname), ("personality", host.personality),
                                  ("mgmt_mac", host.mgmt_mac)) if not v]
        return Refused(f"unprovisioned host: set its hostname and personality first (missing: {', '.join(missing)})")
    if host.administrative == "unlocked":
        return Refused(f"Avoiding unlock action on already 'unlocked' host {name}")
    if host.action != "none":
        return _busy("unlock", host)
    if host.availability == "power-off":     # never waived, not even by force
        return Refused(f"Can not unlock {name}: it is powered off; "
                       "power it on and wait for it to be online, then unlock")
    if host.availability != "online" and not force:
        return Refused(f"Can not unlock {name}: it is {host.availability}, not online; "
                       "wait for it to be online, or unlock with force")
    if not host.inventoried and not force:
        return Refused(f"Can not unlock {name}: it has not yet been inventoried (its agent has not reported "
                       "its hardware); wait for it, or unlock with force")
    testing = replace(host, administrative="unlocked", operational="disabled", availability="intest",
                      task="Testing", action="unlock")
    return Accepted(site.with_host(testing), (StartGoEnabled(uuid),), f"unlocking {name}: running its in-test checks")


def _power(site: Site, uuid: str, action: PowerAction) -> Accepted | Refused:
    host = site.host(uuid)
    if host is None:
        return _no_host(uuid)
    name = _name(host)
    if host.administrative == "unlocked":
        if action == "power-on":
            return Refused(f"Can not power-on {name}: it is unlocked, so already powered on")
        return Refused(f"Can not {action} {name}: Host must be locked; lock it first")
    if host.action != "none":
        return _busy(action, host)
    if action == "reboot":
        if not (host.bmc or host.agent_alive):
            return Refused(f"Can not reboot {name}: it has no board management controller (BMC) and its agent "
                           "is not reachable; provision a BMC or wait for it to be online")
    elif action == "reinstall":
        if not (host.bmc or (host.agent_alive and host.availability == "online")):
            return Refused(f"Can not reinstall {name}: provision a board management controller (BMC) "
                           "or wait for it to be online")
    elif not host.bmc:
        return Refused(f"Can not {action} {name}: it has no board management controller (BMC); provision one first")
    if action == "power-on" and host.power == "on" and host.availability != "power-off":
        return Refused(f"Can not power-on {name}: it is already powered on")
    acting = replace(host, task=_POWER_TASKS[action], action=action)
    if action in _GOES_DOWN:
        acting = replace(acting, availability="offline")
    return Accepted(site.with_host(acting), (BmcAction(uuid, action),), f"{_POWER_TASKS[action].lower()} {name}")


def _swact(site: Site, uuid: str, force: bool) -> Accepted | Refused:
    host = site.host(uuid)
    if host is None:
        return _no_host(uuid)
    name = _name(host)
    if host.personality != "controller":
        return Refused(f"Swact action not allowed for non-controller host {name}")
    if host.administrative == "locked":
        return Refused("Controller is locked; no services to swact")
    if host.action != "none":
        return _busy("swact", host)
    if site.active != uuid:
        active = site.host(site.active) if site.active else None
        now = f"the active controller is {_name(active)}" if active else "no controller is active"
        return Refused(f"Can not swact from {name}: it is not the active controller ({now})")
    peers = sorted((h for h in site.hosts.values() if h.personality == "controller" and h.uuid != uuid),
                   key=lambda h: (_name(h), h.uuid))
    if not peers:
        return Refused(f"Can not swact from {name}: there is no other controller to take over")
    reasons: list[str] = []
    for peer in peers:
        why = _peer_unfit(peer, force)
        if why is None:
            swacting = replace(host, task="Swacting", action="swact")
            return Accepted(site.with_host(swacting), (RequestSwact(uuid, peer.uuid, force),),
                            f"swacting from {name} to {_name(peer)}")
        reasons.append(why)
    return Refused(f"Can not swact from {name}: " + "; ".join(reasons))


def _peer_unfit(peer: HostState, force: bool) -> str | None:
    name = _name(peer)
    if not peer.enabled:
        return (f"peer controller {name} is not unlocked-enabled "
                f"({peer.administrative}-{peer.operational}-{peer.availability})")
    if _locking(peer):         # even for a forced swact (StarlingX checks the peer's task regardless)
        return f"peer controller {name} has a lock in progress"
    if not force and peer.availability != "available":
        return (f"peer controller {name} is {peer.availability} ({', '.join(sorted(peer.degrade_reasons))}); "
                "clear that or swact with force")
    return None


def _delete(site: Site, uuid: str) -> Accepted | Refused:
    host = site.host(uuid)
    if host is None:
        return _no_host(uuid)
    name = _name(host)
    if host.administrative == "unlocked":
        return Refused(f"Can not delete {name}: unlocked host cannot be deleted; lock it first")
    if host.action != "none":
        return _busy("delete", host)
    return Accepted(site.without(uuid), (), f"deleted {name}")


# -- events --


@dataclass(frozen=True, slots=True)
class Policy:
    """Site policy the rules consult (from the settings).

    ``reset_failed_hosts``: a worker or storage host that fails its heartbeat while unlocked is reset
    through its BMC (StarlingX maintenance's recovery of an unresponsive host); it comes back through its
    in-test checks when it answers again.  Controllers are left to the controller pair, which fences."""

    reset_failed_hosts: bool = False


DEFAULT_POLICY = Policy()


def apply(site: Site, event: Event, policy: Policy = DEFAULT_POLICY) -> Accepted:
    """Fold a fact into the site.  Never refused: a fact that does not fit is ignored (``detail`` says why,
    ``ignored`` is set and the site comes back equal)."""
    if isinstance(event, ActiveChanged):
        return _active_changed(site, event.uuid)
    host = site.host(event.uuid)
    if host is None:
        return _ignored(site, f"no host {event.uuid}")
    match event:
        case ServicesDisabled():
            return _services_disabled(site, host, None)
        case ServicesDisableFailed(_, reason):
            return _services_disabled(site, host, reason)
        case GoEnabled(_, passed, reason):
            return _go_enabled(site, host, passed, reason)
        case AgentOnline():
            return _agent(site, host, alive=True)
        case AgentOffline():
            return _agent(site, host, alive=False)
        case HeartbeatHealth(_, state, networks_down):
            return _heartbeat(site, host, state, networks_down, policy)
        case DegradeSet(_, key):
            return Accepted(site.with_host(_with_reasons(host, host.degrade_reasons | {key})),
                            detail=f"{_name(host)} degraded by {key}")
        case DegradeCleared(_, key):
            return Accepted(site.with_host(_with_reasons(host, host.degrade_reasons - {key})),
                            detail=f"{key} cleared on {_name(host)}")
        case PowerObserved(_, power):
            return _power_observed(site, host, power)
        case ActionDone():
            return _action_over(site, host, None)
        case ActionFailed(_, reason):
            return _action_over(site, host, reason)
        case _:
            assert_never(event)


def _services_disabled(site: Site, host: HostState, failure: str | None) -> Accepted:
    name = _name(host)
    if not _locking(host):
        return _ignored(site, f"no lock in progress on {name} (action {host.action})")
    if site.active == host.uuid:     # cannot happen through decide/apply (ActiveChanged abandons the lock)
        return _abandon_lock(site, host, "it is the active controller")
    if failure is not None and host.action == "lock":
        return Accepted(site.with_host(replace(host, task="", action="none")),
                        detail=f"lock of {name} failed: {failure}")
    locked = _complete_lock(host)
    if failure is None:
        return Accepted(site.with_host(locked), detail=f"{name} locked")
    if host.personality == "worker" and host.bmc:
        # StarlingX resets a force-locked worker whose services could not be disabled.
        resetting = replace(locked, task=_POWER_TASKS["reset"], action="reset", availability="offline")
        return Accepted(site.with_host(resetting), (BmcAction(host.uuid, "reset"),),
                        f"{name} force-locked although its services could not be disabled ({failure}): resetting it")
    return Accepted(site.with_host(locked),
                    detail=f"{name} force-locked although its services could not be disabled ({failure})")


def _go_enabled(site: Site, host: HostState, passed: bool, reason: str) -> Accepted:
    name = _name(host)
    if host.administrative != "unlocked" or host.availability != "intest":
        return _ignored(site, f"{name} is not in test ({host.administrative}-{host.availability})")
    locking = _locking(host)     # locked while recovering: the lock goes on, whatever the checks say
    if not passed:
        failed = replace(host, operational="disabled", availability="failed")
        if not locking:
            failed = replace(failed, task="", action="none")
        return Accepted(site.with_host(failed),
                        detail=f"{name} failed its in-test checks: {reason or 'no reason given'}")
    enabled = replace(host, operational="enabled")
    enabled = replace(enabled, availability=_in_service_availability(enabled))
    if locking:
        return Accepted(site.with_host(enabled), detail=f"{name} passed its in-test checks; its lock goes on")
    enabled = replace(enabled, task="", action="none")
    after = site.with_host(enabled)
    detail = f"{name} enabled"
    if host.personality == "controller" and site.active is None:
        after = Site(after.hosts, host.uuid)
        detail += "; it is the active controller (no controller was)"
    return Accepted(after, (EnableServices(host.uuid),), detail)


def _agent(site: Site, host: HostState, *, alive: bool) -> Accepted:
    after = replace(host, agent_alive=alive)
    if host.administrative == "locked":
        if alive and host.availability == "offline":
            after = replace(after, availability="online")
        elif not alive and host.availability == "online":
            after = replace(after, availability="offline")
    return Accepted(site.with_host(after), detail=f"agent of {_name(host)} {'online' if alive else 'offline'}")


def _heartbeat(site: Site, host: HostState, state: str, networks_down: tuple[str, ...],
               policy: Policy = DEFAULT_POLICY) -> Accepted:
    name = _name(host)
    if state not in HEARTBEAT_STATES:
        return _ignored(site, f"unknown heartbeat state {state!r} for {name}")
    reasons = frozenset(r for r in host.degrade_reasons if not r.startswith(HEARTBEAT_REASON_PREFIX))
    if state == "degraded":
        reasons |= {HEARTBEAT_REASON_PREFIX + n for n in networks_down}
    after = _with_reasons(host, reasons)
    if host.administrative == "locked":
        return Accepted(site.with_host(after), detail=f"heartbeat {state} on locked {name}: only its reasons kept")
    if state == "failed":
        after = replace(after, operational="disabled", availability="failed")
        if not _locking(host):
            after = replace(after, task="", action="none")
        active = None if site.active == host.uuid else site.active
        failed = Site(site.with_host(after).hosts, active)
        if (policy.reset_failed_hosts and host.bmc and host.personality in ("worker", "storage")
                and host.availability != "failed" and after.action == "none"):
            resetting = replace(after, task=_POWER_TASKS["reset"], action="reset")
            return Accepted(failed.with_host(resetting), (BmcAction(host.uuid, "reset"),),
                            f"{name} failed its heartbeat: resetting it through its BMC")
        return Accepted(failed, detail=f"{name} failed its heartbeat")
    if host.availability == "failed":
        if _locking(host):
            return Accepted(site.with_host(after), detail=f"{name} answers again; it is being locked: no recovery")
        recovering = replace(after, availability="intest", task="Testing")
        return Accepted(site.with_host(recovering), (StartGoEnabled(host.uuid),),
                        f"{name} answers again: recovering through its in-test checks")
    return Accepted(site.with_host(after), detail=f"heartbeat {state} on {name}")


def _active_changed(site: Site, uuid: str | None) -> Accepted:
    host = site.host(uuid) if uuid is not None else None
    if uuid is not None:
        if host is None:
            return _ignored(site, f"no host {uuid}")
        if host.personality != "controller":
            return _ignored(site, f"{_name(host)} is not a controller: it cannot be active")
        if not host.enabled:
            return _ignored(site, f"{_name(host)} is not unlocked-enabled: it cannot be active")
    hosts = {k: replace(h, task="", action="none") if h.action == "swact" else h for k, h in site.hosts.items()}
    after = Site(hosts, uuid)
    if host is not None and _locking(host):
        return _abandon_lock(after, host, "it became the active controller")
    return Accepted(after, detail=f"active controller: {_name(host) if host else 'none'}")


def _power_observed(site: Site, host: HostState, power: PowerState) -> Accepted:
    after = replace(host, power=power)
    if host.administrative == "locked":
        if power == "off":
            after = replace(after, availability="power-off")
        elif power == "on" and host.availability == "power-off":
            after = replace(after, availability="offline")     # its agent will bring it online
    return Accepted(site.with_host(after), detail=f"{_name(host)} power {power}")


def _action_over(site: Site, host: HostState, failure: str | None) -> Accepted:
    name = _name(host)
    if host.action not in POWER_ACTIONS:
        return _ignored(site, f"no power action in progress on {name} (action {host.action})")
    after = replace(host, task="", action="none")
    if failure is None:
        return Accepted(site.with_host(after), detail=f"{host.action} of {name} done")
    # The action did not happen (or not wholly): show what is known, not what it was meant to lead to.
    if host.administrative == "locked":
        after = replace(after, availability=_locked_availability(after))
    return Accepted(site.with_host(after), detail=f"{host.action} of {name} failed: {failure}")
