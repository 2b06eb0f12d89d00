"""The host state machine: an example for every rule, then properties over random sequences of commands
and events on generated sites (two controllers, a few workers and storage hosts, unknown uuids too)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from schemas.inventory import Availability, HostAction, Personality, PowerState
from services.inventory.machine import (
    LOCKING,
    POWER_ACTIONS,
    POWER_EFFECTS,
    Accepted,
    ActionDone,
    ActionFailed,
    ActiveChanged,
    AgentOffline,
    AgentOnline,
    BmcAction,
    Command,
    DegradeCleared,
    DegradeSet,
    Delete,
    DisableServices,
    EnableServices,
    Event,
    GoEnabled,
    HeartbeatHealth,
    HostState,
    Lock,
    Policy,
    PowerObserved,
    PowerOff,
    PowerOn,
    Reboot,
    Refused,
    Reinstall,
    RequestSwact,
    Reset,
    ServicesDisabled,
    ServicesDisableFailed,
    Site,
    StartGoEnabled,
    Swact,
    Unlock,
    apply,
    decide,
)

# -- building sites --------------------------------------------------------------------------------------


PREFIXES = {"c": "controller", "w": "worker", "s": "storage"}


def locked(uuid: str, personality: Personality = "worker", availability: Availability = "online",
           **changes: Any) -> HostState:
    """A provisioned, inventoried locked host with a BMC; its agent and power follow the availability."""
    host = HostState(uuid, f"{PREFIXES[uuid[0]]}-{uuid[1:]}", personality,
                     mgmt_mac=f"52:54:00:00:{ord(uuid[0]):02x}:{int(uuid[1:]):02x}", availability=availability,
                     inventoried=True, agent_alive=availability == "online", bmc=True,
                     power="off" if availability == "power-off" else "on")
    return host.with_(**changes)


def enabled(uuid: str, personality: Personality = "worker", **changes: Any) -> HostState:
    host = locked(uuid, personality).with_(administrative="unlocked", operational="enabled", availability="available")
    host = host.with_(**changes)
    if host.degrade_reasons and "availability" not in changes:
        host = host.with_(availability="degraded")
    return host


def site(*hosts: HostState, active: str | None = None) -> Site:
    return Site({h.uuid: h for h in hosts}, active)


def duplex() -> Site:
    """controller-0 active, controller-1 standby, worker-0 in service, worker-1 locked, storage-0 locked."""
    return site(enabled("c0", "controller"), enabled("c1", "controller"), enabled("w0"), locked("w1"),
                locked("s0", "storage"), active="c0")


def accepted(result: Accepted | Refused) -> Accepted:
    assert isinstance(result, Accepted), result
    return result


def refused(result: Accepted | Refused, *words: str) -> str:
    assert isinstance(result, Refused), result
    for word in words:
        assert word in result.reason, (word, result.reason)
    return result.reason


def only_changed(before: Site, after: Site, *uuids: str) -> None:
    for uuid, host in before.hosts.items():
        if uuid not in uuids:
            assert after.host(uuid) == host, uuid


# -- lock --------------------------------------------------------------------------------------------------


def test_lock_unknown_host() -> None:
    assert refused(decide(duplex(), Lock("ghost"))) == "no host ghost"


def test_lock_already_locked() -> None:
    refused(decide(duplex(), Lock("w1")), "already 'locked'", "worker-1")


def test_lock_refused_while_an_action_is_in_progress_naming_it() -> None:
    s = accepted(decide(duplex(), Lock("w0"))).site
    refused(decide(s, Lock("w0", force=True)), "in progress action lock", "worker-0")


@pytest.mark.parametrize("force", [False, True])
def test_active_controller_cannot_be_locked_even_with_force(force: bool) -> None:
    s = duplex()
    assert refused(decide(s, Lock("c0", force=force))) == "Can not lock an active controller; swact first"


@pytest.mark.parametrize("force", [False, True])
def test_last_enabled_controller_cannot_be_locked_even_with_force(force: bool) -> None:
    s = site(enabled("c0", "controller"), locked("c1", "controller"), enabled("w0"))   # no active announced
    refused(decide(s, Lock("c0", force=force)), "last unlocked-enabled controller", "controller-0")
    # a peer that is itself being locked does not count
    s = site(enabled("c0", "controller"), enabled("c1", "controller", task="Locking", action="lock"))
    refused(decide(s, Lock("c0", force=force)), "last unlocked-enabled controller")


def test_the_standby_controller_and_a_failed_controller_can_be_locked() -> None:
    accepted(decide(duplex(), Lock("c1")))
    s = site(enabled("c0", "controller", operational="disabled", availability="failed"), locked("c1", "controller"))
    accepted(decide(s, Lock("c0")))


@pytest.mark.parametrize(("force", "task", "action"),
                         [(False, "Locking", "lock"), (True, "Force Locking", "force-lock")])
def test_lock_accepted(force: bool, task: str, action: HostAction) -> None:
    s = duplex()
    r = accepted(decide(s, Lock("w0", force=force)))
    w0 = r.site.hosts["w0"]
    assert (w0.task, w0.action) == (task, action)
    assert (w0.administrative, w0.operational, w0.availability) == ("unlocked", "enabled", "available")
    assert r.effects == (DisableServices("w0", force),)
    only_changed(s, r.site, "w0")
    assert r.site.active == "c0"


# -- services disabled / disable failed --------------------------------------------------------------------


@pytest.mark.parametrize(("power", "agent", "availability"),
                         [("on", True, "online"), ("on", False, "offline"), ("off", True, "power-off"),
                          ("unknown", False, "offline")])
def test_services_disabled_completes_the_lock(power: PowerState, agent: bool, availability: Availability) -> None:
    s = site(enabled("c0", "controller"), enabled("w0", power=power, agent_alive=agent, task="Locking", action="lock"),
             active="c0")
    r = apply(s, ServicesDisabled("w0"))
    w0 = r.site.hosts["w0"]
    assert (w0.administrative, w0.operational, w0.availability, w0.task, w0.action) == (
        "locked", "disabled", availability, "", "none")
    assert r.effects == ()
    only_changed(s, r.site, "w0")


def test_services_disabled_without_a_lock_is_ignored() -> None:
    s = duplex()
    for e in (ServicesDisabled("w0"), ServicesDisableFailed("w0", "drain timed out"), ServicesDisabled("ghost")):
        r = apply(s, e)
        assert r.ignored and r.site == s and r.detail


def test_services_disable_failed_fails_a_plain_lock() -> None:
    s = accepted(decide(duplex(), Lock("w0"))).site
    r = apply(s, ServicesDisableFailed("w0", "pods would not drain"))
    w0 = r.site.hosts["w0"]
    assert (w0.administrative, w0.operational, w0.availability, w0.task, w0.action) == (
        "unlocked", "enabled", "available", "", "none")
    assert "pods would not drain" in r.detail and r.effects == ()


def test_force_lock_with_services_disable_failed_resets_a_worker() -> None:
    s = accepted(decide(duplex(), Lock("w0", force=True))).site
    r = apply(s, ServicesDisableFailed("w0", "drain timed out"))
    w0 = r.site.hosts["w0"]
    assert (w0.administrative, w0.operational) == ("locked", "disabled")
    assert (w0.task, w0.action, w0.availability) == ("Resetting", "reset", "offline")
    assert r.effects == (BmcAction("w0", "reset"),)
    assert "drain timed out" in r.detail
    # the reset concludes like any power action
    done = apply(r.site, ActionDone("w0")).site.hosts["w0"]
    assert (done.task, done.action) == ("", "none")


def test_force_lock_with_services_disable_failed_and_no_reset() -> None:
    # a worker without a BMC, or a controller: locked anyway, nothing to reset
    s = site(enabled("c0", "controller"), enabled("c1", "controller", task="Force Locking", action="force-lock"),
             enabled("w0", bmc=False, task="Force Locking", action="force-lock"), active="c0")
    for uuid in ("w0", "c1"):
        r = apply(s, ServicesDisableFailed(uuid, "timeout"))
        h = r.site.hosts[uuid]
        assert (h.administrative, h.operational, h.availability, h.action) == ("locked", "disabled", "online", "none")
        assert r.effects == ()


# -- unlock ------------------------------------------------------------------------------------------------


def test_unlock_refusals() -> None:
    s = site(enabled("c0", "controller"), locked("w1"), locked("w2", task="Rebooting", action="reboot"),
             locked("w3", availability="offline"), locked("w4", inventoried=False),
             locked("w5", availability="power-off"), active="c0")
    assert refused(decide(s, Unlock("ghost"))) == "no host ghost"
    refused(decide(s, Unlock("c0")), "already 'unlocked'")
    refused(decide(s, Unlock("w2", force=True)), "in progress action reboot")
    refused(decide(s, Unlock("w3")), "offline", "not online", "force")
    refused(decide(s, Unlock("w4")), "not yet been inventoried")
    accepted(decide(s, Unlock("w3", force=True)))
    accepted(decide(s, Unlock("w4", force=True)))


@pytest.mark.parametrize("missing", ["hostname", "personality", "mgmt_mac"])
def test_unlock_refused_for_an_unprovisioned_host(missing: str) -> None:
    s = site(locked("w1").with_(**{missing: None}))
    refused(decide(s, Unlock("w1", force=True)), "unprovisioned host: set its hostname and personality first", missing)


@pytest.mark.parametrize("force", [False, True])
def test_unlock_of_a_powered_off_host_is_refused_even_with_force(force: bool) -> None:
    s = site(locked("w1", availability="power-off"))
    refused(decide(s, Unlock("w1", force=force)), "power it on and wait for it to be online, then unlock")


def test_unlock_goes_through_intest() -> None:
    s = duplex()
    r = accepted(decide(s, Unlock("w1")))
    w1 = r.site.hosts["w1"]
    assert (w1.administrative, w1.operational, w1.availability, w1.task, w1.action) == (
        "unlocked", "disabled", "intest", "Testing", "unlock")
    assert r.effects == (StartGoEnabled("w1"),)
    only_changed(s, r.site, "w1")
    r = apply(r.site, GoEnabled("w1", passed=True))
    w1 = r.site.hosts["w1"]
    assert (w1.administrative, w1.operational, w1.availability, w1.task, w1.action) == (
        "unlocked", "enabled", "available", "", "none")
    assert r.effects == (EnableServices("w1"),)


# -- go-enabled --------------------------------------------------------------------------------------------


def _intest(uuid: str, personality: Personality = "worker", **changes: Any) -> HostState:
    return locked(uuid, personality).with_(administrative="unlocked", availability="intest", task="Testing",
                                           action="unlock", **changes)


def test_go_enabled_with_degrade_reasons_is_degraded() -> None:
    s = site(enabled("c0", "controller"), _intest("w1", degrade_reasons=frozenset({"hwmon.fan"})), active="c0")
    w1 = apply(s, GoEnabled("w1", passed=True)).site.hosts["w1"]
    assert (w1.operational, w1.availability) == ("enabled", "degraded")


def test_go_enabled_makes_the_bootstrap_controller_active() -> None:
    s = site(_intest("c0", "controller"), locked("c1", "controller"))
    r = apply(s, GoEnabled("c0", passed=True))
    assert r.site.active == "c0" and r.effects == (EnableServices("c0"),)
    # once a controller is active, the second one is not
    s = accepted(decide(r.site, Unlock("c1"))).site
    assert apply(s, GoEnabled("c1", passed=True)).site.active == "c0"
    # a worker never is
    assert apply(site(_intest("w0")), GoEnabled("w0", passed=True)).site.active is None


def test_go_enabled_failed() -> None:
    s = site(enabled("c0", "controller"), _intest("w1"), active="c0")
    r = apply(s, GoEnabled("w1", passed=False, reason="config not applied"))
    w1 = r.site.hosts["w1"]
    assert (w1.administrative, w1.operational, w1.availability, w1.task, w1.action) == (
        "unlocked", "disabled", "failed", "", "none")
    assert "config not applied" in r.detail and r.effects == ()


def test_go_enabled_outside_intest_is_ignored() -> None:
    s = duplex()
    for e in (GoEnabled("w0", passed=True), GoEnabled("w1", passed=False), GoEnabled("ghost", passed=True)):
        r = apply(s, e)
        assert r.ignored and r.site == s and r.effects == ()


# -- power actions -----------------------------------------------------------------------------------------

POWER_COMMANDS: list[tuple[type[Reboot | Reset | PowerOn | PowerOff | Reinstall], str, str]] = [
    (Reboot, "reboot", "Rebooting"), (Reset, "reset", "Resetting"), (PowerOff, "power-off", "Powering-off"),
    (Reinstall, "reinstall", "Reinstalling"), (PowerOn, "power-on", "Powering-on")]


@pytest.mark.parametrize(("kind", "name", "task"), POWER_COMMANDS)
def test_power_action_accepted(kind: type[Reboot | Reset | PowerOn | PowerOff | Reinstall], name: str,
                               task: str) -> None:
    start = locked("w1", availability="power-off") if kind is PowerOn else locked("w1")
    s = site(enabled("c0", "controller"), start, active="c0")
    r = accepted(decide(s, kind("w1")))
    w1 = r.site.hosts["w1"]
    assert (w1.task, w1.action, w1.administrative) == (task, name, "locked")
    assert r.effects == (BmcAction("w1", name),)
    goes_down = name in ("reboot", "reset", "reinstall")
    assert w1.availability == ("offline" if goes_down else start.availability)
    only_changed(s, r.site, "w1")
    done = apply(r.site, ActionDone("w1"))
    assert (done.site.hosts["w1"].task, done.site.hosts["w1"].action) == ("", "none")


@pytest.mark.parametrize(("kind", "name", "task"), POWER_COMMANDS)
def test_power_action_needs_a_locked_idle_host(kind: type[Reboot | Reset | PowerOn | PowerOff | Reinstall],
                                               name: str, task: str) -> None:
    s = site(enabled("c0", "controller"), enabled("w0"), locked("w1", task="Rebooting", action="reboot"),
             active="c0")
    assert refused(decide(s, kind("ghost"))) == "no host ghost"
    refused(decide(s, kind("w0")), "worker-0", "lock" if kind is not PowerOn else "already powered on")
    refused(decide(s, kind("w1")), "in progress action reboot")


def test_power_off_of_an_unlocked_host_is_refused() -> None:
    refused(decide(duplex(), PowerOff("w0")), "Host must be locked; lock it first")
    refused(decide(duplex(), PowerOff("c0")), "Host must be locked")


@pytest.mark.parametrize("kind", [Reset, PowerOff, PowerOn])
def test_bmc_only_actions_need_a_bmc(kind: type[Reset | PowerOff | PowerOn]) -> None:
    s = site(locked("w1", availability="power-off" if kind is PowerOn else "online", bmc=False))
    refused(decide(s, kind("w1")), "board management controller")


def test_reboot_needs_a_bmc_or_the_agent() -> None:
    accepted(decide(site(locked("w1", bmc=False)), Reboot("w1")))                   # through the agent
    accepted(decide(site(locked("w1", availability="offline")), Reboot("w1")))        # through the BMC
    refused(decide(site(locked("w1", availability="offline", bmc=False)), Reboot("w1")), "BMC")


def test_reinstall_needs_a_bmc_or_an_online_agent() -> None:
    accepted(decide(site(locked("w1", bmc=False)), Reinstall("w1")))
    accepted(decide(site(locked("w1", availability="offline")), Reinstall("w1")))
    refused(decide(site(locked("w1", availability="offline", bmc=False)), Reinstall("w1")), "online")
    # agent alive but availability not online (e.g. just powered on): not enough without a BMC
    s = site(locked("w1", bmc=False, availability="offline", agent_alive=True))
    refused(decide(s, Reinstall("w1")), "board management controller")


def test_power_on_refused_when_already_on() -> None:
    refused(decide(site(locked("w1")), PowerOn("w1")), "already powered on")
    # the BMC reports on but the host is still marked power-off: power it on again
    accepted(decide(site(locked("w1", availability="power-off", power="on")), PowerOn("w1")))
    accepted(decide(site(locked("w1", availability="offline", power="off")), PowerOn("w1")))


def test_action_done_and_failed() -> None:
    s = accepted(decide(site(locked("w1")), Reboot("w1"))).site
    assert s.hosts["w1"].availability == "offline"
    r = apply(s, ActionFailed("w1", "BMC unreachable"))
    w1 = r.site.hosts["w1"]
    # the reboot did not happen: the host shows what is known of it again
    assert (w1.task, w1.action, w1.availability) == ("", "none", "online")
    assert "BMC unreachable" in r.detail
    # nothing in progress (or a lock, not a power action): ignored
    for e in (ActionDone("w1"), ActionFailed("w1", "x"), ActionDone("ghost")):
        r = apply(site(locked("w1"), enabled("w0", task="Locking", action="lock")), e)
        assert r.ignored
    assert apply(site(enabled("w0", task="Locking", action="lock")), ActionDone("w0")).ignored


# -- power and agent observations --------------------------------------------------------------------------


def test_power_observed() -> None:
    s = site(locked("w1"), enabled("w0"))
    w1 = apply(s, PowerObserved("w1", "off")).site.hosts["w1"]
    assert (w1.power, w1.availability) == ("off", "power-off")
    w1 = apply(site(w1), PowerObserved("w1", "on")).site.hosts["w1"]
    assert (w1.power, w1.availability) == ("on", "offline")
    w1 = apply(site(w1), AgentOnline("w1")).site.hosts["w1"]
    assert w1.availability == "online"
    # unlocked: the heartbeat decides; only the power is recorded
    w0 = apply(s, PowerObserved("w0", "off")).site.hosts["w0"]
    assert (w0.power, w0.availability, w0.operational) == ("off", "available", "enabled")
    assert apply(s, PowerObserved("ghost", "on")).ignored


def test_agent_online_and_offline() -> None:
    s = site(locked("w1", availability="offline"), enabled("w0"), locked("w2", availability="power-off"))
    w1 = apply(s, AgentOnline("w1")).site.hosts["w1"]
    assert (w1.agent_alive, w1.availability) == (True, "online")
    w1 = apply(site(w1), AgentOffline("w1")).site.hosts["w1"]
    assert (w1.agent_alive, w1.availability) == (False, "offline")
    w0 = apply(s, AgentOffline("w0")).site.hosts["w0"]
    assert (w0.agent_alive, w0.availability) == (False, "available")
    assert apply(s, AgentOnline("w2")).site.hosts["w2"].availability == "power-off"
    assert apply(s, AgentOnline("ghost")).ignored


# -- heartbeat and degrade ---------------------------------------------------------------------------------


def test_heartbeat_degraded_replaces_its_reasons() -> None:
    s = site(enabled("w0", degrade_reasons=frozenset({"hwmon.fan"})))
    w0 = apply(s, HeartbeatHealth("w0", "degraded", ("mgmt", "oam"))).site.hosts["w0"]
    assert w0.degrade_reasons == {"hwmon.fan", "heartbeat.mgmt", "heartbeat.oam"}
    assert w0.availability == "degraded"
    w0 = apply(site(w0), HeartbeatHealth("w0", "degraded", ("cluster-host",))).site.hosts["w0"]
    assert w0.degrade_reasons == {"hwmon.fan", "heartbeat.cluster-host"}
    w0 = apply(site(w0), HeartbeatHealth("w0", "healthy")).site.hosts["w0"]
    assert (w0.degrade_reasons, w0.availability) == (frozenset({"hwmon.fan"}), "degraded")
    w0 = apply(site(w0), DegradeCleared("w0", "hwmon.fan")).site.hosts["w0"]
    assert (w0.degrade_reasons, w0.availability) == (frozenset(), "available")


def test_heartbeat_failed_fails_an_unlocked_host_and_the_active_role() -> None:
    s = duplex()
    r = apply(s, HeartbeatHealth("c0", "failed"))
    c0 = r.site.hosts["c0"]
    assert (c0.administrative, c0.operational, c0.availability) == ("unlocked", "disabled", "failed")
    assert r.site.active is None
    only_changed(s, r.site, "c0")
    # a swact in progress is over too
    swacting = accepted(decide(s, Swact("c0"))).site
    c0 = apply(swacting, HeartbeatHealth("c0", "failed")).site.hosts["c0"]
    assert (c0.task, c0.action) == ("", "none")


def test_with_the_reset_policy_a_failed_worker_is_reset_through_its_bmc_once() -> None:
    reset = Policy(reset_failed_hosts=True)
    s = duplex()
    r = apply(s, HeartbeatHealth("w0", "failed"), reset)
    w0 = r.site.hosts["w0"]
    assert r.effects == (BmcAction("w0", "reset"),)
    assert (w0.administrative, w0.availability, w0.action, w0.task) == ("unlocked", "failed", "reset", "Resetting")
    only_changed(s, r.site, "w0")
    again = apply(r.site.with_host(w0.with_(action="none", task="")), HeartbeatHealth("w0", "failed"), reset)
    assert again.effects == (), "a host already failed is not reset again by every repeated verdict"
    # the reset fails (a BMC that does not answer): the host stays failed, unlocked, with no action
    w0 = apply(r.site, ActionFailed("w0", "BMC unreachable")).site.hosts["w0"]
    assert (w0.administrative, w0.availability, w0.action) == ("unlocked", "failed", "none")
    # it answers again after the reset: back through its in-test checks
    done = apply(r.site, ActionDone("w0")).site
    assert apply(done, HeartbeatHealth("w0", "healthy")).effects == (StartGoEnabled("w0"),)


@pytest.mark.parametrize("case", ["no policy", "controller", "no bmc"])
def test_failed_hosts_that_are_not_reset(case: str) -> None:
    s = duplex()
    uuid = "c1" if case == "controller" else "w0"
    if case == "no bmc":
        s = s.with_host(s.hosts["w0"].with_(bmc=False))
    policy = Policy() if case == "no policy" else Policy(reset_failed_hosts=True)
    r = apply(s, HeartbeatHealth(uuid, "failed"), policy)
    assert r.effects == () and r.site.hosts[uuid].availability == "failed"


def test_heartbeat_on_a_locked_host_only_touches_its_reasons() -> None:
    s = site(locked("w1", degrade_reasons=frozenset({"heartbeat.mgmt", "x"})))
    for state in ("failed", "healthy"):
        w1 = apply(s, HeartbeatHealth("w1", state)).site.hosts["w1"]
        assert w1 == s.hosts["w1"].with_(degrade_reasons=frozenset({"x"}))
    w1 = apply(s, HeartbeatHealth("w1", "degraded", ("oam",))).site.hosts["w1"]
    assert w1 == s.hosts["w1"].with_(degrade_reasons=frozenset({"x", "heartbeat.oam"}))


def test_heartbeat_failure_keeps_a_lock_in_progress() -> None:
    """Decision: a host that fails while being locked stays being locked; the orchestrator's answer ends it
    (a force-lock then locks it anyway; a plain lock that cannot disable its services fails)."""
    s = accepted(decide(duplex(), Lock("w0"))).site
    w0 = apply(s, HeartbeatHealth("w0", "failed")).site.hosts["w0"]
    assert (w0.availability, w0.operational, w0.task, w0.action) == ("failed", "disabled", "Locking", "lock")
    # no recovery while the lock goes on
    r = apply(site(w0), HeartbeatHealth("w0", "healthy"))
    assert r.site.hosts["w0"].availability == "failed" and r.effects == ()
    w0 = apply(site(w0), ServicesDisabled("w0")).site.hosts["w0"]
    assert (w0.administrative, w0.availability, w0.action) == ("locked", "online", "none")


def test_heartbeat_recovery_passes_through_intest() -> None:
    s = apply(duplex(), HeartbeatHealth("w0", "failed")).site
    r = apply(s, HeartbeatHealth("w0", "degraded", ("oam",)))
    w0 = r.site.hosts["w0"]
    assert (w0.operational, w0.availability, w0.task) == ("disabled", "intest", "Testing")
    assert r.effects == (StartGoEnabled("w0"),)
    w0 = apply(r.site, GoEnabled("w0", passed=True)).site.hosts["w0"]
    assert (w0.operational, w0.availability) == ("enabled", "degraded")
    assert w0.degrade_reasons == {"heartbeat.oam"}
    # a locked host never recovers into service; an unknown verdict is ignored
    assert apply(site(locked("w1")), HeartbeatHealth("w1", "healthy")).site.hosts["w1"].availability == "online"
    assert apply(s, HeartbeatHealth("w0", "sleepy")).ignored


def test_a_recovering_host_can_be_locked_and_the_lock_survives_its_checks() -> None:
    s = apply(apply(duplex(), HeartbeatHealth("w0", "failed")).site, HeartbeatHealth("w0", "healthy")).site
    s = accepted(decide(s, Lock("w0"))).site
    r = apply(s, GoEnabled("w0", passed=True))
    w0 = r.site.hosts["w0"]
    assert (w0.operational, w0.availability, w0.action) == ("enabled", "available", "lock")
    assert r.effects == ()          # its services are being disabled, not enabled


def test_degrade_set_and_cleared() -> None:
    s = site(enabled("w0"), locked("w1"))
    w0 = apply(s, DegradeSet("w0", "alarm.disk")).site.hosts["w0"]
    assert (w0.degrade_reasons, w0.availability) == (frozenset({"alarm.disk"}), "degraded")
    w1 = apply(s, DegradeSet("w1", "alarm.disk")).site.hosts["w1"]
    assert (w1.degrade_reasons, w1.availability) == (frozenset({"alarm.disk"}), "online")
    assert apply(s, DegradeCleared("ghost", "x")).ignored
    intest = site(_intest("w2"))
    assert apply(intest, DegradeSet("w2", "k")).site.hosts["w2"].availability == "intest"


# -- active controller and swact ---------------------------------------------------------------------------


def test_active_changed() -> None:
    s = duplex()
    assert apply(s, ActiveChanged("c1")).site.active == "c1"
    assert apply(s, ActiveChanged(None)).site.active is None
    for uuid in ("w0", "ghost"):
        r = apply(s, ActiveChanged(uuid))
        assert r.ignored and r.site == s and r.detail
    s2 = site(enabled("c0", "controller"), locked("c1", "controller"), active="c0")
    r = apply(s2, ActiveChanged("c1"))
    assert r.ignored and "not unlocked-enabled" in r.detail


def test_a_controller_becoming_active_abandons_its_lock() -> None:
    s = accepted(decide(duplex(), Lock("c1"))).site
    r = apply(s, ActiveChanged("c1"))
    c1 = r.site.hosts["c1"]
    assert r.site.active == "c1" and (c1.task, c1.action) == ("", "none")
    assert r.effects == (EnableServices("c1"),)
    assert apply(r.site, ServicesDisabled("c1")).ignored


def test_swact_refusals() -> None:
    s = duplex()
    assert refused(decide(s, Swact("ghost"))) == "no host ghost"
    refused(decide(s, Swact("w0")), "non-controller")
    refused(decide(s, Swact("c1")), "not the active controller", "controller-0")
    s_locked = site(enabled("c0", "controller"), locked("c1", "controller"), active="c0")
    refused(decide(s_locked, Swact("c1")), "Controller is locked; no services to swact")
    refused(decide(s_locked, Swact("c0", force=True)), "peer controller controller-1 is not unlocked-enabled")
    refused(decide(site(enabled("c0", "controller"), active="c0"), Swact("c0")), "no other controller")
    s_busy = accepted(decide(s, Swact("c0"))).site
    refused(decide(s_busy, Swact("c0")), "in progress action swact")


@pytest.mark.parametrize("force", [False, True])
def test_swact_refused_while_the_peer_is_locking_even_forced(force: bool) -> None:
    s = accepted(decide(duplex(), Lock("c1"))).site
    refused(decide(s, Swact("c0", force=force)), "controller-1 has a lock in progress")


def test_swact_to_a_degraded_peer_needs_force() -> None:
    s = site(enabled("c0", "controller"), enabled("c1", "controller", degrade_reasons=frozenset({"hwmon.psu"})),
             active="c0")
    refused(decide(s, Swact("c0")), "controller-1 is degraded", "hwmon.psu", "force")
    r = accepted(decide(s, Swact("c0", force=True)))
    assert r.effects == (RequestSwact("c0", "c1", True),)


def test_swact_accepted_then_announced() -> None:
    s = duplex()
    r = accepted(decide(s, Swact("c0")))
    c0 = r.site.hosts["c0"]
    assert (c0.task, c0.action) == ("Swacting", "swact")
    assert r.effects == (RequestSwact("c0", "c1", False),)
    assert r.site.active == "c0"             # until the heartbeat service says otherwise
    only_changed(s, r.site, "c0")
    done = apply(r.site, ActiveChanged("c1"))
    assert done.site.active == "c1"
    assert (done.site.hosts["c0"].task, done.site.hosts["c0"].action) == ("", "none")
    assert done.site.hosts["c0"].enabled
    # now controller-0 may be locked, controller-1 may not
    accepted(decide(done.site, Lock("c0")))
    refused(decide(done.site, Lock("c1")), "active controller")
    # a swact that did not happen: the same controller is announced again
    again = apply(r.site, ActiveChanged("c0"))
    assert again.site.active == "c0" and again.site.hosts["c0"].action == "none"


# -- delete ------------------------------------------------------------------------------------------------


def test_delete() -> None:
    s = site(enabled("c0", "controller"), enabled("w0"), locked("w1"), locked("w2", task="Resetting", action="reset"),
             active="c0")
    assert refused(decide(s, Delete("ghost"))) == "no host ghost"
    refused(decide(s, Delete("w0")), "unlocked host cannot be deleted; lock it first")
    refused(decide(s, Delete("w2")), "in progress action reset")
    r = accepted(decide(s, Delete("w1")))
    assert "w1" not in r.site.hosts and r.effects == ()
    only_changed(s, r.site, "w1")


def test_site_is_immutable() -> None:
    s = duplex()
    with pytest.raises(TypeError):
        s.hosts["w9"] = locked("w9")  # type: ignore[index]
    with pytest.raises(AttributeError):
        s.active = "c1"  # type: ignore[misc]


# -- properties --------------------------------------------------------------------------------------------

EXAMPLES = int(os.environ.get("ROOST_MACHINE_EXAMPLES", "250"))
settings.register_profile("inventory-machine", max_examples=EXAMPLES, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = settings.get_profile("inventory-machine")

UUIDS = ("c0", "c1", "w0", "w1", "w2", "s0", "s1")
ANY_UUID = st.sampled_from((*UUIDS, "ghost"))
REASONS = ("heartbeat.mgmt", "heartbeat.oam", "hwmon.fan", "alarm.disk")
NETWORKS = st.lists(st.sampled_from(("mgmt", "cluster-host", "oam")), max_size=3, unique=True).map(tuple)
POWERS: tuple[PowerState, ...] = ("on", "off", "powering-on", "powering-off", "unknown")


TASKS: dict[HostAction, str] = {"lock": "Locking", "force-lock": "Force Locking", "reboot": "Rebooting",
                                "reset": "Resetting", "power-on": "Powering-on", "power-off": "Powering-off",
                                "reinstall": "Reinstalling"}


@st.composite
def host_states(draw: st.DrawFn, uuid: str, personality: Personality) -> HostState:
    """A host in any state the machine can leave it in, an action in progress or not."""
    provisioned = personality == "controller" or draw(st.integers(0, 5)) > 0
    base = HostState(uuid, uuid if provisioned else None, personality if provisioned else None,
                     mgmt_mac=f"mac-{uuid}", inventoried=draw(st.booleans()), agent_alive=draw(st.booleans()),
                     bmc=draw(st.booleans()), power=draw(st.sampled_from(POWERS)),
                     degrade_reasons=frozenset(draw(st.sets(st.sampled_from(REASONS), max_size=2))))
    kinds = ("locked", "enabled", "intest", "failed") if provisioned else ("locked",)
    if personality == "controller":
        kinds = ("enabled", "enabled", *kinds)       # usually an active controller and a peer to swact to
    kind = draw(st.sampled_from(kinds))
    locking: tuple[HostAction, ...] = ("none", "none", "lock", "force-lock")
    if kind == "locked":
        host = base.with_(availability=draw(st.sampled_from(("online", "offline", "power-off"))))
        action = draw(st.sampled_from(("none", "none", "none", *sorted(POWER_ACTIONS))))
        if action == "none":
            return host
        return host.with_(task=TASKS[action], action=action,
                          **({"availability": "offline"} if action in ("reboot", "reset", "reinstall") else {}))
    if kind == "enabled":
        host = base.with_(administrative="unlocked", operational="enabled",
                          availability="degraded" if base.degrade_reasons else "available")
    elif kind == "intest":
        host = base.with_(administrative="unlocked", availability="intest", task="Testing")
        if draw(st.booleans()):
            return host.with_(action="unlock")        # an unlock; else a recovery, which a lock may interrupt
    else:
        host = base.with_(administrative="unlocked", availability="failed")
    action = draw(st.sampled_from(locking))
    return host if action == "none" else host.with_(task=TASKS[action], action=action)


@st.composite
def sites(draw: st.DrawFn) -> Site:
    layout: list[tuple[str, Personality]] = [("c0", "controller"), ("c1", "controller")]
    layout += [(f"w{i}", "worker") for i in range(draw(st.integers(1, 3)))]
    layout += [(f"s{i}", "storage") for i in range(draw(st.integers(0, 2)))]
    hosts = [draw(host_states(uuid, personality)) for uuid, personality in layout]
    candidates = [h.uuid for h in hosts if h.personality == "controller" and h.enabled and h.action == "none"]
    active: str | None = None
    if candidates and draw(st.integers(0, 3)) > 0:
        active = draw(st.sampled_from(candidates))
    start = site(*hosts, active=active)
    if active is not None and draw(st.integers(0, 3)) == 0:
        start = start.with_host(start.hosts[active].with_(task="Swacting", action="swact"))
    return start


COMMANDS: st.SearchStrategy[Command] = st.one_of(
    st.builds(Lock, ANY_UUID, st.booleans()), st.builds(Unlock, ANY_UUID, st.booleans()),
    st.builds(Reboot, ANY_UUID), st.builds(Reset, ANY_UUID), st.builds(PowerOn, ANY_UUID),
    st.builds(PowerOff, ANY_UUID), st.builds(Reinstall, ANY_UUID), st.builds(Swact, ANY_UUID, st.booleans()),
    st.builds(Delete, ANY_UUID))

EVENTS: st.SearchStrategy[Event] = st.one_of(
    st.builds(ServicesDisabled, ANY_UUID), st.builds(ServicesDisableFailed, ANY_UUID, st.just("drain timed out")),
    st.builds(GoEnabled, ANY_UUID, st.booleans(), st.just("checks")), st.builds(AgentOnline, ANY_UUID),
    st.builds(AgentOffline, ANY_UUID),
    st.builds(HeartbeatHealth, ANY_UUID, st.sampled_from(("healthy", "degraded", "failed")), NETWORKS),
    st.builds(ActiveChanged, st.one_of(st.none(), ANY_UUID)), st.builds(DegradeSet, ANY_UUID, st.sampled_from(REASONS)),
    st.builds(DegradeCleared, ANY_UUID, st.sampled_from(REASONS)),
    st.builds(PowerObserved, ANY_UUID, st.sampled_from(POWERS)), st.builds(ActionDone, ANY_UUID),
    st.builds(ActionFailed, ANY_UUID, st.just("BMC said no")))


def follow_ups(s: Site) -> list[Event]:
    """The facts the rest of the system would report next: these make long sequences reach deep states."""
    out: list[Event] = []
    for h in s.hosts.values():
        if h.action in LOCKING:
            out += [ServicesDisabled(h.uuid), ServicesDisableFailed(h.uuid, "drain timed out")]
        if h.availability == "intest":
            out += [GoEnabled(h.uuid, True), GoEnabled(h.uuid, False, "checks")]
        else:                                     # a late answer, after the host moved on
            out += [GoEnabled(h.uuid, True)]
        if h.action in POWER_ACTIONS:
            out += [ActionDone(h.uuid), ActionFailed(h.uuid, "BMC said no")]
        if h.action == "swact":
            out += [ActiveChanged(u) for u, p in s.hosts.items() if p.personality == "controller"]
        if h.availability == "failed":
            out.append(HeartbeatHealth(h.uuid, "healthy"))
        elif h.administrative == "unlocked":     # the heartbeat may fail or degrade any host in service
            out += [HeartbeatHealth(h.uuid, "failed"), HeartbeatHealth(h.uuid, "degraded", ("mgmt",))]
        if h.personality == "controller" and h.enabled and h.uuid != s.active:
            out.append(ActiveChanged(h.uuid))      # the heartbeat service may move the role at any time
    return out


def likely_commands(s: Site) -> list[Command]:
    """Commands an operator would try on the site as it is (uniform draws rarely hit, say, the active one)."""
    out: list[Command] = []
    for h in s.hosts.values():
        for force in (False, True):
            out.append(Lock(h.uuid, force) if h.administrative == "unlocked" else Unlock(h.uuid, force))
        if h.administrative == "locked":
            out += [Reboot(h.uuid), Reset(h.uuid), PowerOn(h.uuid), PowerOff(h.uuid), Reinstall(h.uuid),
                    Delete(h.uuid)]
    if s.active is not None:      # a swact needs the right controller and a fit peer: try it often
        out += [Swact(s.active, False), Swact(s.active, True)] * len(s.hosts)
    return out


def snapshot(s: Site) -> tuple[dict[str, HostState], str | None]:
    """Everything in a site (hosts are frozen, so a plain dict of them is a deep copy)."""
    return dict(s.hosts), s.active


def check_site(s: Site) -> None:
    # 1. the active controller, if any, is a controller that is unlocked and enabled
    if s.active is not None:
        active = s.host(s.active)
        assert active is not None and active.personality == "controller" and active.enabled, (s.active, active)
        assert active.action not in LOCKING
    # ... and nothing else claims the role: only the active controller can be swacting away from it
    assert all(h.uuid == s.active for h in s.hosts.values() if h.action == "swact")
    for h in s.hosts.values():
        # 2. a locked host is disabled and never takes workloads
        if h.administrative == "locked":
            assert h.operational == "disabled", h
            assert h.availability not in ("available", "degraded"), h
            assert h.action not in LOCKING and h.action not in ("unlock", "swact"), h
        elif h.operational == "enabled":
            assert h.availability == ("degraded" if h.degrade_reasons else "available"), h
        else:
            assert h.availability in ("intest", "failed"), h
        # consistency of the rest
        if h.action in POWER_ACTIONS:
            assert h.administrative == "locked", h
        if h.action == "unlock":
            assert h.availability == "intest", h
        if h.action != "none":
            assert h.task, h
        assert h.provisioned or h.administrative == "locked", h


def in_service_controllers(s: Site) -> set[str]:
    return {h.uuid for h in s.hosts.values() if h.personality == "controller" and h.enabled and h.action not in LOCKING}


def check_step(before: Site, step: Command | Event, result: Accepted | Refused) -> None:
    copy = snapshot(before)
    if isinstance(result, Refused):
        # 4. a refusal has a reason and leaves the site as it was
        event("refused")
        assert result.reason.strip()
        assert snapshot(before) == copy
        return
    event(f"{'ignored' if result.ignored else 'accepted'} {type(step).__name__}")
    after = result.site
    assert snapshot(before) == copy                       # the input was not touched
    check_site(after)
    # 3. a power effect only ever reaches a host that is locked in the resulting site
    for effect in result.effects:
        if isinstance(effect, BmcAction) and effect.action in POWER_EFFECTS:
            reached = after.host(effect.uuid)
            assert reached is not None and reached.administrative == "locked", (effect, reached)
    # a swact is only ever asked from the active controller to a fit peer
    for effect in result.effects:
        if isinstance(effect, RequestSwact):
            peer = after.host(effect.to_uuid)
            assert effect.from_uuid == after.active and effect.to_uuid != effect.from_uuid
            assert peer is not None and peer.personality == "controller" and peer.enabled, peer
            assert peer.action not in LOCKING and (effect.force or peer.availability == "available"), peer
    # no operator command takes away the last controller in service (being locked counts as taken away)
    if isinstance(step, _COMMAND_TYPES) and in_service_controllers(before):
        assert in_service_controllers(after), step
    # 5. an ignored event changes nothing
    if result.ignored:
        assert after == before and result.effects == () and result.detail
    # 6. hosts other than the target do not change (ActiveChanged ends any swact in progress)
    target = step.uuid
    for uuid, host in before.hosts.items():
        if uuid == target:
            continue
        other = after.host(uuid)
        if isinstance(step, ActiveChanged) and host.action == "swact" and not result.ignored:
            assert other == host.with_(task="", action="none")
        else:
            assert other == host, (uuid, host, other)
    assert set(after.hosts) <= set(before.hosts)
    if set(after.hosts) != set(before.hosts):
        assert isinstance(step, Delete) and set(before.hosts) - set(after.hosts) == {target}
    # the active role moves only through the announcement, the bootstrap, a failure or a deletion
    if after.active != before.active:
        assert isinstance(step, ActiveChanged | GoEnabled | HeartbeatHealth), step
        if isinstance(step, GoEnabled):
            assert before.active is None and after.active == target
        if isinstance(step, HeartbeatHealth):
            assert before.active == target and after.active is None


_COMMAND_TYPES = (Lock, Unlock, Reboot, Reset, PowerOn, PowerOff, Reinstall, Swact, Delete)


def run(s: Site, step: Command | Event) -> Accepted | Refused:
    if isinstance(step, _COMMAND_TYPES):
        return decide(s, step)
    result = apply(s, step)
    assert isinstance(result, Accepted)           # 5. apply never refuses
    return result


@PROFILE
@given(start=sites(), data=st.data())
def test_invariants_over_random_sequences(start: Site, data: st.DataObject) -> None:
    check_site(start)
    s = start
    for _ in range(data.draw(st.integers(5, 40), label="length")):
        follow, likely = follow_ups(s), likely_commands(s)
        kinds = ("command", "event", *(("follow-up",) if follow else ()), *(("likely",) if likely else ()))
        kind = data.draw(st.sampled_from(kinds))
        step: Command | Event
        if kind == "command":
            step = data.draw(COMMANDS)
        elif kind == "event":
            step = data.draw(EVENTS)
        elif kind == "follow-up":
            step = data.draw(st.sampled_from(follow))
        else:
            step = data.draw(st.sampled_from(likely))
        result = run(s, step)
        assert run(s, step) == result              # pure: the same input gives the same answer
        check_step(s, step, result)
        if isinstance(result, Accepted):
            s = result.site


@PROFILE
@given(start=sites(), command=COMMANDS)
def test_every_command_on_any_site(start: Site, command: Command) -> None:
    check_step(start, command, decide(start, command))


@PROFILE
@given(start=sites(), fact=EVENTS)
def test_every_event_on_any_site(start: Site, fact: Event) -> None:
    result = apply(start, fact)
    assert isinstance(result, Accepted)
    check_step(start, fact, result)

