"""Subcloud availability from heartbeats in the small: unknown to online, online to offline after silence,
mass silence held behind one alarm instead of marking everyone offline, the hold running out, heartbeats
that are ignored (untracked, older than known) and forgetting a subcloud; how old a heartbeat is whatever the
subcloud's clock says."""

from __future__ import annotations

import pytest

from services.dcsync.availability import Availability, AvailabilityRules, HeartbeatClocks, Transition

RULES = AvailabilityRules(offline_after=30.0, mass_fraction=0.5, mass_minimum=3, mass_hold=600.0)


def fleet(n: int, *, at: float = 0.0) -> tuple[Availability, list[str]]:
    """``n`` tracked subclouds, all heard at ``at`` and evaluated online."""
    names = [f"subcloud-{i:02d}" for i in range(n)]
    av = Availability(RULES)
    for name in names:
        av.track(name)
        av.heard(name, at)
    first = av.evaluate(at)
    assert sorted(first.transitions, key=lambda t: t.subcloud) == [Transition(n_, "online") for n_ in names]
    return av, names


def test_default_rules() -> None:
    assert Availability().rules == AvailabilityRules(30.0, 0.5, 3, 600.0)


def test_unknown_becomes_online_on_the_first_heartbeat_and_only_then() -> None:
    av = Availability(RULES)
    av.track("edge-1")
    assert av.state("edge-1") == "unknown"
    assert av.evaluate(100.0).transitions == []
    assert av.state("edge-1") == "unknown"
    av.heard("edge-1", 101.0)
    ev = av.evaluate(102.0)
    assert ev.transitions == [Transition("edge-1", "online")]
    assert av.state("edge-1") == "online"
    assert av.evaluate(103.0).transitions == []


def test_online_goes_offline_after_offline_after_without_a_heartbeat() -> None:
    av, _ = fleet(1)
    assert av.evaluate(30.0).transitions == []            # exactly offline_after: still online
    ev = av.evaluate(30.5)
    assert ev.transitions == [Transition("subcloud-00", "offline")]
    assert av.state("subcloud-00") == "offline"
    assert not ev.mass_silence and not ev.mass_silence_changed
    assert av.evaluate(31.0).transitions == []            # reported once
    av.heard("subcloud-00", 40.0)
    assert av.evaluate(41.0).transitions == [Transition("subcloud-00", "online")]


def test_a_single_silent_subcloud_among_many_goes_offline() -> None:
    av, names = fleet(10)
    for name in names[1:]:
        av.heard(name, 35.0)
    ev = av.evaluate(40.0)
    assert ev.transitions == [Transition(names[0], "offline")]
    assert not ev.mass_silence and ev.held == ()
    assert [av.state(n) for n in names[1:]] == ["online"] * 9


def test_too_few_silent_for_a_mass_silence_go_offline() -> None:
    av, names = fleet(2)                                   # both silent, but fewer than mass_minimum
    ev = av.evaluate(40.0)
    assert sorted(t.subcloud for t in ev.transitions) == names
    assert {t.availability for t in ev.transitions} == {"offline"}
    assert not ev.mass_silence


def test_a_silent_share_below_mass_fraction_goes_offline() -> None:
    av, names = fleet(10)
    for name in names[3:]:
        av.heard(name, 35.0)
    ev = av.evaluate(40.0)                                 # 3 of 10 < 0.5
    assert sorted(t.subcloud for t in ev.transitions) == names[:3]
    assert not ev.mass_silence and ev.held == ()


def test_mass_silence_holds_them_all_then_clears_as_they_come_back_or_the_hold_runs_out() -> None:
    av, names = fleet(6)
    silent, alive = names[:3], names[3:]
    for name in alive:
        av.heard(name, 35.0)

    ev = av.evaluate(40.0)                                 # 3 of 6 online, and >= 3
    assert ev.transitions == []
    assert ev.mass_silence and ev.mass_silence_changed and av.mass_silence
    assert ev.held == tuple(silent)
    assert all(av.state(n) != "offline" for n in names)

    for name in alive:
        av.heard(name, 45.0)
    ev = av.evaluate(50.0)                                 # the alarm stands, not raised again
    assert ev.transitions == [] and ev.mass_silence and not ev.mass_silence_changed
    assert ev.held == tuple(silent)

    av.heard(silent[0], 100.0)
    for name in alive:
        av.heard(name, 100.0)
    ev = av.evaluate(101.0)                                # one heard again: online, out of the hold
    assert [t for t in ev.transitions if t.availability == "offline"] == []
    assert av.state(silent[0]) == "online"
    assert ev.held == tuple(silent[1:])
    assert ev.mass_silence and not ev.mass_silence_changed

    for name in [*alive, silent[0]]:
        av.heard(name, 635.0)
    ev = av.evaluate(639.9)                                # the hold has not run out yet
    assert ev.transitions == [] and ev.held == tuple(silent[1:])

    ev = av.evaluate(640.0)                                # mass_hold after it began at 40
    assert sorted(ev.transitions, key=lambda t: t.subcloud) == [Transition(n, "offline") for n in silent[1:]]
    assert not ev.mass_silence and ev.mass_silence_changed and not av.mass_silence
    assert ev.held == ()
    assert [av.state(n) for n in names] == ["online", "offline", "offline", "online", "online", "online"]

    ev = av.evaluate(641.0)
    assert ev.transitions == [] and not ev.mass_silence_changed


def test_mass_silence_ends_when_all_are_heard_again() -> None:
    av, names = fleet(4)
    ev = av.evaluate(40.0)                                 # everyone silent
    assert ev.transitions == [] and ev.held == tuple(names) and ev.mass_silence_changed
    for name in names:
        av.heard(name, 50.0)
    ev = av.evaluate(51.0)
    assert ev.transitions == []                            # they never left online
    assert not ev.mass_silence and ev.mass_silence_changed and ev.held == ()
    assert [av.state(n) for n in names] == ["online"] * 4
    ev = av.evaluate(200.0)                                # silent again later: a new mass silence
    assert ev.mass_silence and ev.mass_silence_changed and ev.held == tuple(names)


def test_untracked_heartbeats_are_ignored() -> None:
    av, _ = fleet(1)
    av.heard("stranger", 5.0)
    ev = av.evaluate(6.0)
    assert ev.transitions == []
    assert av.state("stranger") == "unknown"
    av.track("stranger")                                   # the earlier heartbeat was not kept
    assert av.evaluate(7.0).transitions == []
    assert av.state("stranger") == "unknown"


def test_an_older_heartbeat_never_moves_last_heard_backwards() -> None:
    av, names = fleet(1)
    av.heard(names[0], 100.0)
    av.heard(names[0], 10.0)
    assert av.evaluate(120.0).transitions == []            # 120 - 100 <= 30
    assert av.state(names[0]) == "online"
    assert av.evaluate(131.0).transitions == [Transition(names[0], "offline")]


def test_track_keeps_what_was_stored() -> None:
    av = Availability(RULES)
    av.track("edge-1", "online", heard_at=0.0)
    av.track("edge-2", "offline", heard_at=95.0)
    ev = av.evaluate(100.0)
    assert set(ev.transitions) == {Transition("edge-1", "offline"), Transition("edge-2", "online")}
    assert len(ev.transitions) == 2


def test_forget_removes_a_subcloud_everywhere() -> None:
    av, names = fleet(4)
    av.forget(names[0])
    assert av.state(names[0]) == "unknown"
    av.heard(names[0], 10.0)                               # no longer tracked: ignored
    for name in names[1:]:
        av.heard(name, 35.0)
    ev = av.evaluate(40.0)
    assert ev.transitions == []
    assert av.state(names[0]) == "unknown"


def test_forget_during_a_mass_silence_drops_it_from_the_hold() -> None:
    av, names = fleet(4)
    ev = av.evaluate(40.0)
    assert ev.held == tuple(names)
    av.forget(names[0])
    ev = av.evaluate(41.0)
    assert ev.held == tuple(names[1:]) and ev.mass_silence
    ev = av.evaluate(640.0)
    assert names[0] not in [t.subcloud for t in ev.transitions]
    assert len(ev.transitions) == 3 and not ev.mass_silence


def test_a_subcloud_never_heard_goes_offline_after_the_timeout() -> None:
    a = Availability(AvailabilityRules(offline_after=30.0))
    a.track("sc9", since=100.0)
    assert a.evaluate(129.0).transitions == []
    assert [(t.subcloud, t.availability) for t in a.evaluate(131.0).transitions] == [("sc9", "offline")]
    a.heard("sc9", 140.0)
    assert [(t.subcloud, t.availability) for t in a.evaluate(141.0).transitions] == [("sc9", "online")]


# -- the age of a heartbeat, on our clock ---------------------------------------------------------------


@pytest.mark.parametrize("offset", [-3600.0, -120.0, 0.0, 120.0, 86400.0])
def test_a_subcloud_clock_off_by_any_constant_gives_fresh_heartbeats(offset: float) -> None:
    """``offset``: how far the subcloud's clock is behind ours (negative: ahead); each heartbeat takes 5 to 40 ms."""
    clocks = HeartbeatClocks()
    delays = [0.02, 0.005, 0.04, 0.01, 0.03, 0.02, 0.005, 0.015]
    ages = [clocks.age("edge-1", offset + d) for d in delays]
    assert ages[0] == 0.0                           # nothing to compare the first one with
    assert all(0.0 <= a <= 0.035 + 1e-9 for a in ages), ages


def test_a_heartbeat_held_up_is_as_old_as_it_was_held() -> None:
    clocks = HeartbeatClocks()
    for _ in range(5):
        assert clocks.age("edge-1", 120.01) == pytest.approx(0.0)     # clock 2 minutes behind, 10 ms delay
    assert clocks.age("edge-1", 120.01 + 45.0) == pytest.approx(45.0)  # held in the broker 45 s
    assert clocks.age("edge-1", 120.02) == pytest.approx(0.01)


def test_each_subcloud_has_its_own_clock() -> None:
    clocks = HeartbeatClocks()
    assert clocks.age("behind", 300.0) == 0.0
    assert clocks.age("ahead", -300.0) == 0.0
    assert clocks.age("behind", 300.5) == pytest.approx(0.5)
    assert clocks.age("ahead", -299.0) == pytest.approx(1.0)


def test_a_clock_stepped_forward_is_followed_at_once_one_stepped_back_after_the_window() -> None:
    clocks = HeartbeatClocks(window=3)
    for _ in range(3):
        clocks.age("edge-1", 60.0)
    assert clocks.age("edge-1", 0.0) == 0.0                     # NTP stepped its clock forward by a minute
    assert clocks.age("edge-1", 0.0) == 0.0
    assert clocks.age("edge-1", 30.0) == pytest.approx(30.0)    # ... then back by half a minute: older, for now
    assert clocks.age("edge-1", 30.0) == pytest.approx(30.0)
    assert clocks.age("edge-1", 30.0) == 0.0                    # the window has forgotten the quicker ones


def test_a_forgotten_subcloud_starts_over() -> None:
    clocks = HeartbeatClocks()
    clocks.age("edge-1", 10.0)
    clocks.forget("edge-1")
    assert clocks.age("edge-1", 500.0) == 0.0
    clocks.forget("never-heard")


def test_the_window_holds_at_least_one_heartbeat() -> None:
    with pytest.raises(ValueError, match="at least one"):
        HeartbeatClocks(window=0)
