"""The controller pair in a deterministic simulation: simulated clocks (drifting within the bound), a network
with delay, loss, partitions and one-way cuts, power cuts and BMC fencing that succeeds or fails.

Examples for each rule (failover after fencing, no failover on a cut controller link, the two_node fence
race, a failed fence never leads to two actives, swact, split brain), then properties over random
schedules: never two actives; never two controllers that each believe a majority backs them.  A planted
bug (taking over without fencing) makes the property fail, which shows that the simulation can see it.
A failing schedule prints its seed-equivalent: hypothesis prints the schedule, which replays it exactly.

``ROOST_HEARTBEAT_EXAMPLES`` sets the example count (the ``heartbeat`` profile; bench/ runs thousands)."""

from __future__ import annotations

import heapq
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import pytest
from hypothesis import Phase as Stage
from hypothesis import find, given, settings
from hypothesis import strategies as st

from services.heartbeat.model import ALARM_FENCE_FAILED, ALARM_SPLIT_BRAIN, NodeId
from services.heartbeat.pair import (
    Announce,
    BecomeActive,
    BecomeStandby,
    Effect,
    FencePeer,
    LeaseGrant,
    LeaseRefusal,
    LeaseRelease,
    LeaseRequest,
    LeaseVoter,
    PairConfig,
    PairController,
    PairPolicy,
    PersistEpoch,
    Phase,
    RaiseAlarm,
    SendHandover,
    SendLeaseRequest,
    SendRelease,
    voters_of,
)
from services.heartbeat.wire import LeaseKind

EXAMPLES = int(os.environ.get("ROOST_HEARTBEAT_EXAMPLES", "200"))
settings.register_profile("heartbeat", max_examples=EXAMPLES, deadline=None)
PROFILE = settings.get_profile("heartbeat")

C0, C1 = 1, 2
NAMES = {C0: "controller-0", C1: "controller-1"}
WITNESS = 100
HEARTBEAT = 0.2          # the simulated controllers' claim interval
DEAD_AFTER = 1.0         # a controller stops hearing its peer this long after the last claim


@dataclass
class Sim:
    """Two controllers, ``workers`` voters and an optional witness on simulated clocks and network."""

    workers: int = 3
    witness: bool = False
    fence_ok: list[bool] = field(default_factory=lambda: [True])
    seed: int = 0
    controller: type[PairController] = PairController
    policy: PairPolicy = field(default_factory=PairPolicy)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.t = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.worker_ids = [10 + i for i in range(self.workers)]
        self.voter_ids = voters_of((C0, C1), self.worker_ids, WITNESS if self.witness else None)
        self.clock = {n: (self.rng.uniform(0, 1000), self.rng.uniform(1 - self.policy.drift / 2,
                                                                        1 + self.policy.drift / 2))
                      for n in self.voter_ids}
        self.powered = dict.fromkeys(self.voter_ids, True)
        self.blocked: set[tuple[NodeId, NodeId]] = set()
        self.persisted = {C0: 0, C1: 0}
        self.ctrl: dict[NodeId, PairController] = {}
        self.voter: dict[NodeId, LeaseVoter] = {}
        self.last_claim: dict[NodeId, float] = {C0: -99.0, C1: -99.0}
        self._timer_token = {C0: 0, C1: 0}
        self._fences = 0
        self.violations: list[str] = []
        self.log: list[tuple[float, NodeId, object]] = []
        for n in self.worker_ids + ([WITNESS] if self.witness else []):
            self.voter[n] = LeaseVoter(n, self.local(n), self.policy)
        for c in (C0, C1):
            self._boot(c)
        self.at(HEARTBEAT, self._heartbeat_loop)

    # -- plumbing -------------------------------------------------------------------------------------

    def local(self, n: NodeId) -> float:
        offset, rate = self.clock[n]
        return offset + rate * self.t

    def real(self, n: NodeId, local: float) -> float:
        offset, rate = self.clock[n]
        return (local - offset) / rate

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (max(when, self.t), self._seq, fn))

    def link(self, a: NodeId, b: NodeId) -> bool:
        return self.powered[a] and self.powered[b] and (a, b) not in self.blocked

    def send(self, a: NodeId, b: NodeId, fn: Callable[[], None]) -> None:
        if self.link(a, b) and self.rng.random() > 0.02:
            def deliver() -> None:
                if self.powered[b]:
                    fn()
            self.at(self.t + self.rng.uniform(0.0005, 0.03), deliver)

    def run(self, seconds: float) -> None:
        end = self.t + seconds
        while self._queue and self._queue[0][0] <= end:
            self.t, _, fn = heapq.heappop(self._queue)
            fn()
            self._check()
        self.t = end

    def _boot(self, c: NodeId) -> None:
        peer = C1 if c == C0 else C0
        cfg = PairConfig(c, peer, self.voter_ids, NAMES[c], NAMES[peer], "site", self.policy)
        self.ctrl[c] = self.controller(cfg, self.local(c), epoch=self.persisted[c])
        self.last_claim[c] = -99.0
        self._timer(c)

    def _timer(self, c: NodeId) -> None:
        self._timer_token[c] += 1
        token = self._timer_token[c]
        deadline = self.ctrl[c].next_deadline()
        if deadline is None:
            return

        def fire() -> None:
            if self.powered[c] and self._timer_token[c] == token:
                self.apply(c, self.ctrl[c].tick(self.local(c)))
        self.at(self.real(c, deadline) + 1e-9, fire)

    def _heartbeat_loop(self) -> None:
        for c in (C0, C1):
            if not self.powered[c]:
                continue
            peer = C1 if c == C0 else C0
            me = self.ctrl[c]
            active, epoch = me.active, me.target if me.active else me.epoch

            def claim(peer: NodeId = peer, active: bool = active, epoch: int = epoch) -> None:
                self.last_claim[peer] = self.t
                self.apply(peer, self.ctrl[peer].peer_claim(self.local(peer), active=active, epoch=epoch))
            self.send(c, peer, claim)
            reachable = self.t - self.last_claim[c] < DEAD_AFTER
            if reachable != me.peer_reachable:
                self.apply(c, me.peer_paths(self.local(c), reachable))
        self.at(self.t + HEARTBEAT, self._heartbeat_loop)

    def _voter_of(self, n: NodeId) -> LeaseVoter:
        return self.ctrl[n].voter if n in self.ctrl else self.voter[n]

    def apply(self, c: NodeId, effects: list[Effect]) -> None:
        me = self.ctrl[c]
        for effect in effects:
            self.log.append((self.t, c, effect))
            if isinstance(effect, SendLeaseRequest):
                for v in self.voter_ids - {c}:
                    self.send(c, v, partial(self._vote, v, effect.request))
            elif isinstance(effect, SendRelease):
                for v in self.voter_ids - {c}:
                    self.send(c, v, partial(self._release, v, effect.release))
            elif isinstance(effect, SendHandover):
                for _ in range(3):                       # as the transport does: on every path
                    self.send(c, effect.to, partial(self._handover, effect.to, effect.epoch))
            elif isinstance(effect, FencePeer):
                self._fence(c, effect)
            elif isinstance(effect, PersistEpoch):
                self.persisted[c] = max(self.persisted[c], effect.epoch)
        if self.ctrl[c] is me:
            self._timer(c)

    def _release(self, v: NodeId, release: LeaseRelease) -> None:
        self._voter_of(v).release(release)

    def _handover(self, to: NodeId, epoch: int) -> None:
        self.apply(to, self.ctrl[to].handover(self.local(to), epoch))

    def _vote(self, v: NodeId, req: LeaseRequest) -> None:
        voter = self._voter_of(v)
        hears = voter.holder is not None and voter.holder in self.ctrl and self.link(voter.holder, v)
        answer = voter.request(self.local(v), req, hears_holder=hears)
        c = req.candidate

        def back(answer: LeaseGrant | LeaseRefusal = answer) -> None:
            local = self.local(c)
            ctrl = self.ctrl[c]
            self.apply(c, ctrl.granted(local, answer) if isinstance(answer, LeaseGrant)
                       else ctrl.refused(local, answer))
        self.send(v, c, back)

    def _fence(self, c: NodeId, effect: FencePeer) -> None:
        ok = self.fence_ok[self._fences % len(self.fence_ok)]
        self._fences += 1
        me = self.ctrl[c]

        def done() -> None:
            if not self.powered[c] or self.ctrl[c] is not me:
                return
            if ok:
                self.power(effect.target, False)        # ForceOff, PowerState read back as Off
            self.apply(c, me.fence_result(self.local(c), effect.epoch, ok))
        self.at(self.t + self.rng.uniform(0.5, 6.0), done)

    # -- the world ----------------------------------------------------------------------------------

    def power(self, n: NodeId, on: bool) -> None:
        if self.powered[n] == on:
            return
        self.powered[n] = on
        if on:
            if n in self.ctrl:
                self._boot(n)
            else:
                self.voter[n] = LeaseVoter(n, self.local(n), self.policy)

    def cut(self, a: NodeId, b: NodeId, *, both: bool = True) -> None:
        self.blocked.add((a, b))
        if both:
            self.blocked.add((b, a))

    def isolate(self, n: NodeId) -> None:
        for other in self.voter_ids - {n}:
            self.cut(n, other)

    def heal(self) -> None:
        self.blocked.clear()

    def actives(self) -> list[NodeId]:
        return [c for c in (C0, C1) if self.powered[c] and self.ctrl[c].active]

    def _check(self) -> None:
        actives = self.actives()
        if len(actives) > 1:
            self.violations.append(f"t={self.t:.3f}: two actives {actives}")
        if not self.ctrl[C0].config.two_node:
            backed = [c for c in (C0, C1) if self.powered[c] and self.ctrl[c].phase is not Phase.STANDBY
                      and self.ctrl[c]._majority(self.local(c))]
            if len(backed) > 1:
                self.violations.append(f"t={self.t:.3f}: two controllers backed by a majority")

    def alarms(self, c: NodeId) -> list[tuple[str, bool]]:
        return [(e.alarm.alarm_id, e.alarm.raise_) for _, n, e in self.log if n == c and isinstance(e, RaiseAlarm)]


def started(sim: Sim) -> NodeId:
    sim.run(15.0)
    actives = sim.actives()
    assert len(actives) == 1, sim.violations
    return actives[0]


# -- examples ----------------------------------------------------------------------------------------


def test_start_up_elects_the_preferred_controller_without_fencing() -> None:
    sim = Sim(workers=3)
    assert started(sim) == C0
    assert not any(isinstance(e, FencePeer) for _, _, e in sim.log)
    announce = [e for _, _, e in sim.log if isinstance(e, Announce)]
    assert announce == [Announce(C0, C1, 2)]
    event = announce[0].event(NAMES)
    assert (event.entity_id, event.version, event.active, event.standby) == (
        "controller-pair", 2, "controller-0", "controller-1")
    assert Announce(None, C0, 3).event(NAMES).active is None


def test_the_active_dies_the_standby_fences_it_and_takes_over() -> None:
    sim = Sim(workers=3)
    active = started(sim)
    standby = C1 if active == C0 else C0
    sim.power(active, False)
    died = sim.t
    sim.run(20.0)
    assert sim.actives() == [standby] and not sim.violations
    took = next(t for t, n, e in sim.log if n == standby and isinstance(e, BecomeActive))
    fenced = [e for _, n, e in sim.log if n == standby and isinstance(e, FencePeer)]
    assert fenced and took - died < DEAD_AFTER + sim.policy.lease * 1.1 + 6.0 + 1.0
    versions = [e.version for _, _, e in sim.log if isinstance(e, Announce)]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)


def test_a_cut_controller_link_never_causes_a_failover_while_the_workers_hear_both() -> None:
    sim = Sim(workers=3)
    active = started(sim)
    sim.cut(C0, C1)
    sim.run(60.0)
    assert sim.actives() == [active] and not sim.violations
    assert not any(isinstance(e, FencePeer) for _, _, e in sim.log)


def test_an_active_cut_off_from_the_voters_demotes_itself_and_the_standby_takes_over() -> None:
    sim = Sim(workers=3)
    active = started(sim)
    standby = C1 if active == C0 else C0
    sim.isolate(active)
    sim.run(4.0)
    assert not sim.ctrl[active].active if sim.powered[active] else True
    sim.run(20.0)
    assert sim.actives() == [standby] and not sim.violations
    assert not sim.powered[active]                       # fenced


def test_a_failed_fence_never_takes_over_and_raises_950_008() -> None:
    sim = Sim(workers=3, fence_ok=[False])
    active = started(sim)
    standby = C1 if active == C0 else C0
    sim.isolate(active)                                  # the old active demotes; nobody may replace it
    sim.run(60.0)
    assert sim.actives() == [] and not sim.violations
    assert (ALARM_FENCE_FAILED, True) in sim.alarms(standby)
    assert sum(1 for _, n, e in sim.log if n == standby and isinstance(e, FencePeer)) >= 3


def test_two_node_fence_race_the_active_wins() -> None:
    sim = Sim(workers=0)
    active = started(sim)
    standby = C1 if active == C0 else C0
    sim.cut(C0, C1)
    sim.run(30.0)
    assert sim.actives() == [active] and not sim.powered[standby] and not sim.violations


def test_two_node_the_standby_takes_over_only_by_fencing() -> None:
    sim = Sim(workers=0)
    active = started(sim)
    standby = C1 if active == C0 else C0
    sim.power(active, False)
    sim.run(30.0)
    assert sim.actives() == [standby]
    fenced_at = next(t for t, n, e in sim.log if n == standby and isinstance(e, FencePeer))
    took = next(t for t, n, e in sim.log if n == standby and isinstance(e, BecomeActive) and t > fenced_at - 1)
    assert took >= fenced_at


def test_two_node_wait_for_all_a_lone_controller_does_not_start() -> None:
    sim = Sim(workers=0)
    sim.power(C1, False)
    sim.run(40.0)
    assert sim.actives() == []
    sim.apply(C0, sim.ctrl[C0].force(sim.local(C0)))     # the operator vouches that controller-1 is off
    sim.run(20.0)
    assert sim.actives() == [C0]


def test_swact_hands_over_without_fencing() -> None:
    sim = Sim(workers=2)
    active = started(sim)
    standby = C1 if active == C0 else C0
    refused, _ = sim.ctrl[standby].swact(sim.local(standby))
    assert refused is not None and "not the active" in refused
    problem, effects = sim.ctrl[active].swact(sim.local(active))
    assert problem is None and any(isinstance(e, SendHandover) for e in effects)
    sim.apply(active, effects)
    sim.run(5.0)
    assert sim.actives() == [standby] and not sim.violations
    assert not any(isinstance(e, FencePeer) for _, _, e in sim.log)
    kinds = [e.request.kind for _, n, e in sim.log if n == standby and isinstance(e, SendLeaseRequest)]
    assert LeaseKind.HANDOVER in kinds


def test_split_brain_the_lower_epoch_demotes_and_the_alarm_is_raised() -> None:
    cfg = PairConfig(C0, C1, frozenset({C0, C1, 10}), "controller-0", "controller-1", "site")
    c = PairController(cfg, 0.0)
    c.phase, c.target = Phase.ACTIVE, 4
    effects = c.peer_claim(1.0, active=True, epoch=5)
    assert any(isinstance(e, RaiseAlarm) and e.alarm.alarm_id == ALARM_SPLIT_BRAIN and e.alarm.raise_
               for e in effects)
    assert any(isinstance(e, BecomeStandby) for e in effects) and not c.active
    effects = c.peer_claim(1.1, active=True, epoch=5)
    assert any(isinstance(e, RaiseAlarm) and e.alarm.alarm_id == ALARM_SPLIT_BRAIN and not e.alarm.raise_
               for e in effects)


def test_voter_rules() -> None:
    policy = PairPolicy()
    v = LeaseVoter(10, 0.0, policy)
    req = LeaseRequest(C0, 1, 1, LeaseKind.STARTUP)
    assert isinstance(v.request(1.0, req, hears_holder=False), LeaseRefusal)      # quiet after a start
    assert isinstance(v.request(3.1, req, hears_holder=False), LeaseGrant)
    assert isinstance(v.request(3.2, LeaseRequest(C1, 1, 2, LeaseKind.STARTUP), hears_holder=False),
                      LeaseRefusal)                                               # one vote per epoch
    assert isinstance(v.request(3.3, LeaseRequest(C1, 2, 3, LeaseKind.TAKEOVER), hears_holder=False),
                      LeaseRefusal)                                               # C0's lease is live
    assert isinstance(v.request(7.0, LeaseRequest(C1, 2, 4, LeaseKind.TAKEOVER), hears_holder=True),
                      LeaseRefusal)                                               # still hears C0
    assert isinstance(v.request(7.1, LeaseRequest(C0, 1, 5, LeaseKind.RENEW), hears_holder=True), LeaseGrant)
    v.release(LeaseRelease(C0, 1))
    assert isinstance(v.request(7.2, LeaseRequest(C0, 1, 6, LeaseKind.RENEW), hears_holder=True), LeaseRefusal)
    assert isinstance(v.request(7.3, LeaseRequest(C1, 2, 7, LeaseKind.HANDOVER), hears_holder=True), LeaseGrant)
    assert isinstance(v.request(7.4, LeaseRequest(C0, 1, 8, LeaseKind.RENEW), hears_holder=True), LeaseRefusal)


def test_a_takeover_never_asks_for_an_epoch_its_own_voter_granted() -> None:
    """Found on the network (tests/integration/test_heartbeat_pair_service.py): the active died before its
    claim of epoch 1 reached the standby, whose own voter had granted it epoch 1; the standby asked for
    epoch 1 again, and voters holding the dead active's grant refused it for ever."""
    cfg = PairConfig(C1, C0, voters_of((C0, C1), (10, 11)), "controller-1", "controller-0", "site")
    c1 = PairController(cfg, 0.0)
    assert isinstance(c1.voter.request(5.0, LeaseRequest(C0, 1, 1, LeaseKind.STARTUP), hears_holder=False),
                      LeaseGrant)
    c1.peer_paths(5.0, True)
    effects = c1.peer_paths(6.0, False)
    requests = [e.request for e in effects if isinstance(e, SendLeaseRequest)]
    assert c1.phase is Phase.ELECTING and requests and requests[0].epoch == 2
    assert PersistEpoch(2) in effects


@pytest.mark.parametrize("me, peer", [(C0, C1), (C1, C0)])
def test_an_election_that_cannot_win_is_asked_again_higher_or_given_up(me: NodeId, peer: NodeId) -> None:
    """The preferred controller (the lower id) asks again above every epoch it has seen; the other gives up,
    releasing its own vote, keeps quiet for a while, then asks again above what it saw: they never duel."""
    cfg = PairConfig(me, peer, voters_of((C0, C1), (10, 11)), NAMES[me], NAMES[peer], "site")
    c = PairController(cfg, 0.0)
    c.peer_paths(0.5, True)
    effects = c.peer_paths(4.0, False)
    [first] = [e.request for e in effects if isinstance(e, SendLeaseRequest)]
    assert first.epoch == 1
    c.refused(4.1, LeaseRefusal(10, me, 1, first.request_id, 3, "already voted in epoch 3"))
    assert c.phase is Phase.ELECTING and c.target == 1 and c.epoch == 3
    timeout = c.policy.election_timeout
    assert c.next_deadline() is not None and c.next_deadline() <= 4.0 + timeout   # type: ignore[operator]
    effects = c.tick(4.0 + timeout)
    if me < peer:
        assert PersistEpoch(4) in effects and c.phase is Phase.ELECTING and c.target == 4
    else:
        assert any(isinstance(e, SendRelease) for e in effects) and c.phase is Phase.STANDBY
        assert c.tick(4.0 + timeout + 1.0) == [], "quiet"
        effects = c.tick(4.0 + 2 * timeout)
        assert PersistEpoch(4) in effects and c.phase is Phase.ELECTING


def test_workers_joining_do_not_unseat_the_active_and_count_once_they_grant_or_after_the_grace() -> None:
    """Found on the network (a strategy's site: six workers unlocked at once made the active step down):
    voters just added count only once they grant, or after ``join_grace``."""
    sim = Sim(workers=0, seed=3)
    active = started(sim)
    ctrl = sim.ctrl[active]
    now = sim.local(active)
    workers = [10 + i for i in range(6)]
    ctrl.set_voters(now, workers)
    assert ctrl.quorum(now) == 2 and ctrl.active, "the joiners do not count yet: both controllers are a majority"
    sim.run(ctrl.policy.join_grace / 2)
    assert ctrl.active
    late = sim.local(active) + ctrl.policy.join_grace
    assert ctrl.quorum(late) == 5                              # 8 voters now count
    effects = ctrl.tick(late)
    assert not ctrl.active and any(isinstance(e, BecomeStandby) for e in effects), "nobody voted: steps down"

    again = Sim(workers=0, seed=4)
    active = started(again)
    ctrl = again.ctrl[active]
    now = again.local(active)
    ctrl.set_voters(now, workers[:2])
    for w in workers[:2]:                                      # the joiners grant at once: they count at once
        ctrl.granted(now, LeaseGrant(w, active, ctrl.target, max(ctrl._sent), 3.0))
    assert ctrl.quorum(now) == 3 and ctrl.active and ctrl._majority(now)


def test_config_rules() -> None:
    with pytest.raises(ValueError):
        PairConfig(C0, C0, frozenset({C0}), "a", "a", "s")
    cfg = PairConfig(C0, C1, frozenset({C0, C1}), "a", "b", "s")
    assert cfg.two_node and cfg.quorum == 2


# -- properties over random schedules ----------------------------------------------------------------

NODES = st.sampled_from([C0, C1, C0, C1, 10, 11, 12, WITNESS])
ALL = (C0, C1, 10, 11, 12, WITNESS)
STEPS = st.one_of(
    st.tuples(st.just("split"), st.integers(1, 2 ** len(ALL) - 2), st.just(0)),
    st.tuples(st.just("cut"), st.just(C0), st.just(C1)),
    st.tuples(st.just("cut"), NODES, NODES),
    st.tuples(st.just("cut1"), NODES, NODES),
    st.tuples(st.just("isolate"), NODES, NODES),
    st.tuples(st.just("heal"), NODES, NODES),
    st.tuples(st.just("off"), NODES, NODES),
    st.tuples(st.just("on"), NODES, NODES),
    st.tuples(st.just("swact"), NODES, NODES),
)


@dataclass(frozen=True)
class Schedule:
    workers: int
    witness: bool
    fence_ok: tuple[bool, ...]
    seed: int
    steps: tuple[tuple[float, tuple[str, NodeId, NodeId]], ...]


SCHEDULES = st.builds(Schedule, st.sampled_from((0, 0, 1, 2, 3)), st.booleans(),
                      st.lists(st.booleans(), min_size=1, max_size=6).map(tuple), st.integers(0, 2**32 - 1),
                      st.lists(st.tuples(st.floats(0.1, 15.0), STEPS), max_size=8).map(tuple))


def play(schedule: Schedule, controller: type[PairController] = PairController) -> Sim:
    sim = Sim(workers=schedule.workers, witness=schedule.witness, fence_ok=list(schedule.fence_ok),
              seed=schedule.seed, controller=controller)
    sim.run(8.0)
    for wait, (action, a, b) in schedule.steps:
        if action != "split" and (a not in sim.powered or b not in sim.powered):
            continue
        if action == "split":
            side = {n for i, n in enumerate(ALL) if a >> i & 1 and n in sim.powered}
            for x in side:
                for y in set(sim.powered) - side:
                    sim.cut(x, y)
            sim.run(wait)
            continue
        if action == "cut" and a != b:
            sim.cut(a, b)
        elif action == "cut1" and a != b:
            sim.cut(a, b, both=False)
        elif action == "isolate":
            sim.isolate(a)
        elif action == "heal":
            sim.heal()
        elif action in ("off", "on"):
            sim.power(a, action == "on")
        elif action == "swact" and a in (C0, C1) and sim.powered[a]:
            _, effects = sim.ctrl[a].swact(sim.local(a))
            sim.apply(a, effects)
        sim.run(wait)
    sim.heal()
    sim.run(10.0)
    return sim


def settles(sim: Sim) -> bool:
    """Liveness, once the network is healed: one active within ``SETTLE`` s whenever one is possible: a
    majority of the voters is powered (two_node: both controllers, or the one left has seen its peer), and
    with one controller left, a fence can work."""
    up = [c for c in (C0, C1) if sim.powered[c]]
    if not up:
        return True
    ctrl = sim.ctrl[up[0]]
    if ctrl.config.two_node:
        possible = len(up) == 2 or (ctrl.peer_seen and any(sim.fence_ok))
    else:
        powered = sum(1 for v in ctrl.config.voters if sim.powered[v])
        possible = powered >= ctrl.config.quorum and (len(up) == 2 or any(sim.fence_ok))
    if not possible:
        return True
    sim.run(SETTLE)
    return len(sim.actives()) == 1


SETTLE = 240.0


@PROFILE
@given(SCHEDULES)
def test_never_two_actives_and_one_active_once_healed(schedule: Schedule) -> None:
    sim = play(schedule)
    assert sim.violations == [], schedule
    assert settles(sim), (schedule, [(c, sim.ctrl[c]) for c in (C0, C1)])


class TakesOverWithoutFencing(PairController):
    """The planted bug: the fence is taken as done without asking the BMC."""

    def _needs_fence(self, now: float) -> bool:
        return False

    def _tick_candidate(self, now: float) -> list[Effect]:
        self.fenced = True
        return super()._tick_candidate(now)


def test_the_simulation_catches_a_takeover_without_fencing() -> None:
    schedule = Schedule(workers=0, witness=False, fence_ok=(False,), seed=1,
                        steps=((30.0, ("cut", C0, C1)),))
    assert play(schedule).violations == []
    assert any("two actives" in v for v in play(schedule, TakesOverWithoutFencing).violations)


class CountsAVoteTwice(PairController):
    """The planted bug: every grant counts, not every voter (a voter's renewals add up)."""

    def granted(self, now: float, grant: LeaseGrant) -> list[Effect]:
        effects = super().granted(now, grant)
        if grant.voter in self.votes:
            self.votes[-grant.request_id] = self.votes[grant.voter]
        return effects


class ReusesAnEpochItsVoterGranted(PairController):
    """The bugs found on the network (and planted here): a takeover asks for the epoch after the last one it
    heard claimed, although its own voter granted a newer one; and an election that cannot win is never
    given up, so voters holding that grant refuse it for ever."""

    def _elect(self, now: float, kind: LeaseKind) -> list[Effect]:
        saved = self.voter.epoch
        self.voter.epoch = min(saved, self.epoch)
        try:
            return super()._elect(now, kind)
        finally:
            self.voter.epoch = saved

    def _tick_candidate(self, now: float) -> list[Effect]:
        self.elected_at = now                 # ... and an election that cannot win goes on for ever
        return super()._tick_candidate(now)


class ClaimsFromC0Lost(Sim):
    """Once controller-0 starts its election, every claim it sends controller-1 is lost (datagrams are
    lost one by one: its lease requests still arrive)."""

    def send(self, a: NodeId, b: NodeId, fn: Callable[[], None]) -> None:
        if ((a, b) == (C0, C1) and getattr(fn, "__name__", "") == "claim"
                and self.ctrl[C0].phase is not Phase.STANDBY):
            return
        super().send(a, b, fn)


def dies_as_it_wins(controller: type[PairController]) -> Sim:
    """controller-1's voter grants controller-0 epoch 1, but controller-1 never hears it claimed; then
    controller-0 dies."""
    sim = ClaimsFromC0Lost(workers=2, seed=7, controller=controller)
    sim.run(20.0)
    assert sim.actives() == [C0] and sim.ctrl[C1].voter.epoch == 1 and sim.violations == []
    sim.power(C0, False)
    return sim


def test_the_liveness_check_catches_an_epoch_reused_after_a_lost_claim() -> None:
    sim = dies_as_it_wins(PairController)
    assert settles(sim) and sim.actives() == [C1] and sim.violations == []
    bugged = dies_as_it_wins(ReusesAnEpochItsVoterGranted)
    assert not settles(bugged) and bugged.violations == [], "no second active, but nobody active either"


@pytest.mark.parametrize("bug", [TakesOverWithoutFencing, CountsAVoteTwice])
def test_random_schedules_find_the_planted_bugs(bug: type[PairController]) -> None:
    found = find(SCHEDULES, lambda s: bool(play(s, bug).violations),
                 settings=settings(max_examples=max(EXAMPLES, 1000), database=None, deadline=None,
                                   derandomize=True, phases=[Stage.generate]))  # the first found, unshrunk
    print(bug.__name__, "fails on", found, play(found, bug).violations[:1])
