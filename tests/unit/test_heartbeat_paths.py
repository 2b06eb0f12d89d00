"""Per-path health under a simulated clock: establishment, detection timing, asymmetry, flap damping, and a
property (DOWN exactly when silent for ``down_after`` periods) over random arrival schedules."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.heartbeat.model import Path
from services.heartbeat.paths import PathHealth, PathPolicy, PathState, PathTransition, heard_paths

EXAMPLES = int(os.environ.get("ROOST_HEARTBEAT_EXAMPLES", "200"))
settings.register_profile("heartbeat", max_examples=EXAMPLES, deadline=None)
PROFILE = settings.get_profile("heartbeat")

P = 0.1


def beat(health: PathHealth, start: float, count: int, hears_me: bool | None = True) -> list[PathTransition]:
    """``count`` heartbeats one period apart from ``start``; the transitions they cause."""
    out = []
    for i in range(count):
        t = health.heard(round(start + i * P, 6), hears_me)
        if t:
            out.append(t)
    return out


def run_deadlines(health: PathHealth, until: float) -> list[PathTransition]:
    """Advance at every deadline the path names, as the monitor's timer would, up to ``until``."""
    out = []
    while (deadline := health.next_deadline()) is not None and deadline <= until:
        t = health.advance(deadline)
        assert t is not None, "a deadline that changes nothing"
        out.append(t)
    return out


def state_of(health: PathHealth) -> PathState:
    return health.state


def up(now: float = 0.0, policy: PathPolicy | None = None) -> PathHealth:
    health = PathHealth(now, policy)
    beat(health, now, 2)
    assert health.state is PathState.UP
    return health


def test_two_heartbeats_establish_a_path() -> None:
    health = PathHealth(0.0)
    assert health.heard(0.0, True) is None and health.state is PathState.UNKNOWN
    t = health.heard(0.1, True)
    assert t is not None and (t.before, t.after) == (PathState.UNKNOWN, PathState.UP)


def test_a_path_that_stops_answering_is_down_one_second_after_its_last_datagram() -> None:
    health = up()
    beat(health, 0.2, 49)                     # the last one at 5.0
    assert health.last_heard == pytest.approx(5.0)
    transitions = run_deadlines(health, 10.0)
    assert [(round(t.at, 6), t.after) for t in transitions] == [(5.3, PathState.SUSPECT), (6.0, PathState.DOWN)]
    assert health.next_deadline() is None
    assert health.advance(5.99) is None       # nothing happens between deadlines


def test_suspect_recovers_at_once() -> None:
    health = up()
    assert health.advance(0.45) is not None and health.state is PathState.SUSPECT
    t = health.heard(0.5, True)
    assert t is not None and t.after is PathState.UP


def test_never_heard_is_down_after_the_down_time() -> None:
    health = PathHealth(3.0)
    assert health.next_deadline() == pytest.approx(4.0)
    assert health.advance(3.9) is None
    t = health.advance(4.0)
    assert t is not None and (t.before, t.after) == (PathState.UNKNOWN, PathState.DOWN)


def test_asymmetric_when_the_peer_does_not_hear_us() -> None:
    health = up()
    transitions = beat(health, 0.2, 6, hears_me=False)   # from 0.2; asymmetric 5 periods later, at 0.7
    assert [(round(t.at, 6), t.after) for t in transitions] == [(0.7, PathState.ASYMMETRIC)]
    assert heard_paths({Path.MGMT: health}, 0.8) == frozenset()
    assert beat(health, 0.8, 9) == []                    # 9 good ones are not enough
    t = health.heard(1.7, True)
    assert t is not None and (t.before, t.after) == (PathState.ASYMMETRIC, PathState.UP)


def test_no_digest_never_makes_a_path_asymmetric() -> None:
    health = up()
    beat(health, 0.2, 50, hears_me=None)
    assert health.state is PathState.UP


def test_asymmetry_is_found_between_heartbeats_too() -> None:
    health = up()
    health.heard(0.2, False)
    assert health.next_deadline() == pytest.approx(0.5)   # suspect first
    health.heard(0.3, False)
    health.heard(0.5, False)
    assert health.next_deadline() == pytest.approx(0.7)   # asymmetric before suspect (0.8)
    assert health.advance(0.7) is not None and health.state is PathState.ASYMMETRIC


def test_flap_damping_doubles_the_good_run_needed_and_forgives_after_the_window() -> None:
    health = up()
    t = 0.2
    needed: list[int] = []
    for _ in range(4):
        health.advance(t + 1.0)                           # silent a second: DOWN
        assert health.state is PathState.DOWN
        t += 2.0
        count = 0
        while state_of(health) is not PathState.UP:
            health.heard(round(t, 6), True)
            t += P
            count += 1
        needed.append(count)
    assert needed == [10, 20, 40, 80]
    beat(health, t, 700)                                  # up for 70 s: over the flap window
    t += 70.0
    health.advance(t + 1.0)
    t += 2.0
    count = 0
    while state_of(health) is not PathState.UP:
        health.heard(round(t, 6), True)
        t += P
        count += 1
    assert count == 10


def test_a_gap_breaks_the_good_run() -> None:
    health = up()
    health.advance(1.5)
    assert health.state is PathState.DOWN
    beat(health, 2.0, 9)                                  # 9 good ones, then a gap of 0.4 s
    beat(health, 3.2, 9)
    assert health.state is PathState.DOWN
    assert health.heard(4.1, True) is not None and state_of(health) is PathState.UP


def test_penalty_is_capped() -> None:
    policy = PathPolicy(recovery_good=10, max_recovery_good=30)
    health = up(policy=policy)
    health.penalty = 5
    assert health.required_good == 30


def test_policy_must_be_consistent() -> None:
    with pytest.raises(ValueError):
        PathPolicy(suspect_after=10, down_after=10)


def test_heard_paths_is_our_digest() -> None:
    paths = {p: up() for p in Path}
    paths[Path.MGMT].heard(0.5, True)
    paths[Path.CLUSTER_HOST].heard(0.5, True)
    assert heard_paths(paths, 0.3) == set(Path)
    assert heard_paths(paths, 0.6) == {Path.MGMT, Path.CLUSTER_HOST}     # OAM silent for 0.5 s


@PROFILE
@given(st.lists(st.integers(1, 25), min_size=1, max_size=60), st.lists(st.integers(0, 40), max_size=30),
       st.lists(st.booleans(), min_size=1, max_size=60))
def test_down_exactly_when_silent_for_the_down_time(gaps: list[int], probes: list[int],
                                                    hears: list[bool]) -> None:
    """Arrivals at random gaps (in 10 ms steps), checks at random moments: DOWN iff silent >= 1 s (or never
    heard for 1 s); ASYMMETRIC and UP only while heard within it; SUSPECT only after 3 silent periods."""
    policy = PathPolicy()
    health = PathHealth(0.0, policy)
    ticks = 0
    checks = iter(probes)
    for i, gap in enumerate(gaps):
        probe = next(checks, None)
        if probe is not None and probe < gap:
            now = (ticks + probe) / 100
            health.advance(now)
            _check(health, now, policy)
        ticks += gap
        now = ticks / 100
        health.heard(now, hears[i % len(hears)])
        _check(health, now, policy)
    deadline, steps = health.next_deadline(), 0
    while deadline is not None:
        assert health.advance(deadline) is not None, "a deadline that changes nothing"
        _check(health, deadline, policy)
        deadline, steps = health.next_deadline(), steps + 1
        assert steps < 5
    assert health.state is PathState.DOWN


def _check(health: PathHealth, now: float, policy: PathPolicy) -> None:
    silent = health.silence(now)
    if silent >= policy.down_time + 1e-6:
        assert health.state is PathState.DOWN
    if health.state is PathState.DOWN:
        assert silent >= policy.down_time - 1e-6
    if health.state in (PathState.UP, PathState.ASYMMETRIC):
        assert silent < policy.suspect_time + 1e-6 or health.state is PathState.ASYMMETRIC
    if health.state is PathState.SUSPECT:
        assert policy.suspect_time - 1e-6 <= silent < policy.down_time + 1e-6
