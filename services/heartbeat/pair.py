"""The controller pair: which controller is active, never two.  Pure (leases, votes, fencing as effects).

Two parts, both fed monotonic times by the caller and answering with :class:`Effect` lists that the
service carries out *in order* (persist before act):

* :class:`LeaseVoter`, on every voter (both controllers, every worker, an optional witness): grants a
  lease for an *epoch* to one controller at a time.  It grants a new epoch to a controller other than the
  current holder only when the holder's lease has expired on its own clock (``t_grant + L(1+rho)``) or
  was released, **and** it no longer hears the holder on any path (so a cut link between the controllers
  never causes a failover while the workers still see the active).  One vote per epoch; epochs only
  grow; a voter that restarts grants nothing for ``L(1+rho)`` (it forgot whom it granted).
* :class:`PairController`, on each controller.  The active renews its lease every ``renew`` s and counts
  a grant as valid until ``t_request + L(1-rho) - margin`` on its own clock, so it always believes in a
  lease for less time than any voter holds it; when fewer than a strict majority of voters back it, it
  demotes itself (and releases).  The standby takes over only when (a) it no longer hears the active on
  any path, (b) a strict majority granted it the next epoch, and (c) the active was fenced: a
  :class:`FencePeer` effect (Redfish ForceOff, then PowerState read back as Off) whose success comes back
  through :meth:`PairController.fence_result`; a failed fence raises 950.008 and is retried with backoff,
  and the standby never goes active without it.  Fencing is skipped only when the peer is heard, standby,
  as at start-up or in a planned swact (:meth:`PairController.swact`: the active demotes, releases, and
  hands over; the peer is elected for the next epoch).
* **Two controllers and no other voter** (``two_node``, Pacemaker's ``two_node`` + ``wait_for_all``): no
  majority survives a partition, so the active stays active and fences the standby after
  ``fence_delay_active`` (0 s), while the standby fences the active after ``fence_delay_standby`` (10 s)
  and goes active only if that succeeds: whoever fences first wins, the fenced one is off.  Neither
  goes active before it has seen the other once (:meth:`PairController.force` overrides).
* **Split brain**: an active that hears its peer claim to be active raises 950.007; the one with the
  lower epoch (equal: the higher node id) demotes at once.

Announcements (:class:`Announce`) carry ``version = 2 x epoch`` when a controller becomes active, and
``2 x epoch + 1`` when the active of ``epoch`` steps down with nobody after it, so the version grows with
every change (``schemas.heartbeat.ActiveController.version``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from schemas.heartbeat import ActiveController
from services.heartbeat.model import (
    ALARM_FENCE_FAILED,
    ALARM_SPLIT_BRAIN,
    AlarmIntent,
    NodeId,
    Seconds,
    host_entity,
    system_entity,
)
from services.heartbeat.wire import LeaseFields, LeaseKind, MsgType

PAIR_ENTITY = "controller-pair"


@dataclass(frozen=True, slots=True)
class PairPolicy:
    lease: Seconds = 3.0                 # L: how long a grant holds
    renew: Seconds = 0.5                 # the active renews (and a candidate asks again) this often
    drift: float = 0.01                  # rho: the clock rate bound between any two nodes
    margin: Seconds = 0.2                # delta: taken off every lease the holder counts on
    claim_ttl: Seconds = 1.0             # a peer's role claim is current this long
    startup_delay: Seconds = 6.0         # how long the non-preferred controller waits before it runs
    fence_delay_active: Seconds = 0.0    # two_node: the active fences the unreachable standby after this
    fence_delay_standby: Seconds = 10.0  # two_node: the standby fences the unreachable active after this
    fence_backoff: Seconds = 5.0         # the first retry after a failed fence; doubles, up to 60 s
    fence_max_attempts: int = 10
    election_timeout: Seconds = 5.0      # an election without a majority this long: given up or asked again
    join_grace: Seconds = 8.0            # a voter just added counts towards the quorum after this, or once it grants

    @property
    def voter_hold(self) -> Seconds:
        return self.lease * (1 + self.drift)

    @property
    def holder_trust(self) -> Seconds:
        return self.lease * (1 - self.drift) - self.margin


# -- messages -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    candidate: NodeId
    epoch: int
    request_id: int
    kind: LeaseKind


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    voter: NodeId
    candidate: NodeId
    epoch: int
    request_id: int
    ttl: Seconds


@dataclass(frozen=True, slots=True)
class LeaseRefusal:
    voter: NodeId
    candidate: NodeId
    epoch: int
    request_id: int
    voter_epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class LeaseRelease:
    holder: NodeId
    epoch: int


# -- the voter ----------------------------------------------------------------------------------------


class LeaseVoter:
    """One voter's grants.  ``hears_holder``: whether this voter hears the current holder on any path."""

    def __init__(self, node_id: NodeId, now: Seconds, policy: PairPolicy | None = None) -> None:
        self.id = node_id
        self.policy = policy or PairPolicy()
        self.holder: NodeId | None = None
        self.epoch = 0
        self.expires = now + self.policy.voter_hold     # the quiet period after a (re)start
        self.released = False

    def __repr__(self) -> str:
        return f"LeaseVoter({self.id}, holder={self.holder}, epoch={self.epoch}, released={self.released})"

    def request(self, now: Seconds, req: LeaseRequest, *, hears_holder: bool) -> LeaseGrant | LeaseRefusal:
        def refuse(reason: str) -> LeaseRefusal:
            return LeaseRefusal(self.id, req.candidate, req.epoch, req.request_id, self.epoch, reason)

        if req.epoch < self.epoch:
            return refuse(f"epoch {self.epoch} is newer")
        if req.epoch == self.epoch:
            if req.candidate != self.holder:
                return refuse(f"already voted for {self.holder} in epoch {self.epoch}")
            if self.released:
                return refuse("released")
        elif req.candidate != self.holder:
            live = now < self.expires and not self.released
            if live:
                return refuse(f"the lease of {self.holder} (epoch {self.epoch}) is live")
            if self.holder is not None and not self.released and hears_holder:
                return refuse(f"still hears {self.holder}")
        self.holder, self.epoch, self.released = req.candidate, req.epoch, False
        self.expires = now + self.policy.voter_hold
        return LeaseGrant(self.id, req.candidate, req.epoch, req.request_id, self.policy.lease)

    def release(self, rel: LeaseRelease) -> None:
        if rel.holder == self.holder and rel.epoch == self.epoch:
            self.released = True


# -- effects ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendLeaseRequest:
    """Send to every voter but ourselves (our own vote is taken inline)."""

    request: LeaseRequest


@dataclass(frozen=True, slots=True)
class SendRelease:
    release: LeaseRelease


@dataclass(frozen=True, slots=True)
class SendHandover:
    """Tell the peer to take over (a planned swact): it calls :meth:`PairController.handover`."""

    to: NodeId
    epoch: int


@dataclass(frozen=True, slots=True)
class FencePeer:
    """Power the peer off through its BMC (ForceOff, then PowerState read back as Off), then report the
    outcome with :meth:`PairController.fence_result`."""

    target: NodeId
    epoch: int
    attempt: int


@dataclass(frozen=True, slots=True)
class PersistEpoch:
    """Write (and fsync) the epoch before any effect after it."""

    epoch: int


@dataclass(frozen=True, slots=True)
class BecomeActive:
    epoch: int


@dataclass(frozen=True, slots=True)
class BecomeStandby:
    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class Announce:
    """``roost.heartbeat.active_controller`` (``version`` grows with every change)."""

    active: NodeId | None
    standby: NodeId | None
    version: int

    def event(self, names: Mapping[NodeId, str]) -> ActiveController:
        """The bus event, with the controllers' hostnames."""
        return ActiveController(entity_id=PAIR_ENTITY, version=self.version,
                                active=names[self.active] if self.active is not None else None,
                                standby=names[self.standby] if self.standby is not None else None)


@dataclass(frozen=True, slots=True)
class RaiseAlarm:
    alarm: AlarmIntent


Effect = (SendLeaseRequest | SendRelease | SendHandover | FencePeer | PersistEpoch | BecomeActive | BecomeStandby
          | Announce | RaiseAlarm)


class Phase(enum.StrEnum):
    STANDBY = "standby"
    ELECTING = "electing"      # asking the voters for the next epoch
    FENCING = "fencing"        # majority held (or two_node), waiting for the fence to succeed
    ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class PairConfig:
    me: NodeId
    peer: NodeId
    voters: frozenset[NodeId]            # both controllers, the workers, an optional witness
    me_name: str
    peer_name: str
    system: str
    policy: PairPolicy = field(default_factory=PairPolicy)

    def __post_init__(self) -> None:
        if self.me == self.peer or not {self.me, self.peer} <= self.voters:
            raise ValueError("both controllers are voters, and they differ")

    @property
    def two_node(self) -> bool:
        return self.voters == {self.me, self.peer}

    @property
    def quorum(self) -> int:
        return len(self.voters) // 2 + 1


@dataclass(slots=True)
class _Claim:
    active: bool
    epoch: int
    at: Seconds


class PairController:
    """One controller's side of the pair.  ``epoch`` is the persisted epoch it starts from."""

    def __init__(self, config: PairConfig, now: Seconds, *, epoch: int = 0) -> None:
        self.config = config
        self.policy = config.policy
        self.voter = LeaseVoter(config.me, now, config.policy)
        self.phase = Phase.STANDBY
        self.epoch = epoch                       # the highest epoch we know of
        self.target = epoch                      # the epoch we hold (active) or ask for (electing, fencing)
        self.kind = LeaseKind.STARTUP
        self.votes: dict[NodeId, Seconds] = {}   # voter -> until when (our clock) its grant for target holds
        self._sent: dict[int, Seconds] = {}      # request id -> when we sent it
        self._next_request = 1
        self.renew_at: Seconds = now
        self.started = now
        self.peer_reachable = False
        self.peer_seen = False
        self.forced = False
        self.unreachable_since: Seconds = now
        self.claim: _Claim | None = None
        self.fenced = False                      # the peer is fenced for this takeover
        self.fence_pending = False
        self.fence_attempts = 0
        self.fence_retry_at: Seconds | None = None
        self.handover_offered = False
        self.alarms: set[str] = set()
        self._standby_since: Seconds | None = None
        self.clock = now                         # the latest time handed in
        self.quiet_until: Seconds = now          # no start-up election before this (after stepping down)
        self.elected_at: Seconds = now           # when the current election started
        self.joined: dict[NodeId, Seconds] = {}  # voters added by set_voters, and when (until they count)

    def __repr__(self) -> str:
        return f"PairController({self.config.me}, {self.phase.value}, epoch={self.epoch}, target={self.target})"

    @property
    def active(self) -> bool:
        return self.phase is Phase.ACTIVE

    # -- inputs -------------------------------------------------------------------------------------

    def set_voters(self, now: Seconds, voters: Iterable[NodeId]) -> list[Effect]:
        """The voters changed (a worker unlocked, locked, added or deleted): both controllers stay voters;
        votes of voters that left no longer count.

        A voter just added *joins*: it counts towards the quorum once it has granted us, or after
        ``join_grace`` (it cannot grant during its own quiet period, and its agent may still be starting),
        so that unlocking a batch of workers does not leave the active without a majority and make it step
        down.  Both controllers learn of a join from the same inventory events, moments apart; a majority
        of the counted voters still needs the controllers' own votes while the joiners do not count, and
        each controller's voter holds its own grant, so two controllers cannot both hold one."""
        wanted = frozenset(voters) | {self.config.me, self.config.peer}
        if wanted == self.config.voters:
            return []
        for voter in wanted - self.config.voters:
            self.joined[voter] = now
        self.joined = {v: t for v, t in self.joined.items() if v in wanted}
        self.config = replace(self.config, voters=wanted)
        self.votes = {v: until for v, until in self.votes.items() if v in wanted}
        return self.tick(now)

    def quorum(self, now: Seconds) -> int:
        """A strict majority of the voters that count now (the joiners that have not granted yet do not)."""
        grace = self.policy.join_grace
        counted = sum(1 for v in self.config.voters
                      if v not in self.joined or now - self.joined[v] >= grace or v in self.votes)
        return counted // 2 + 1

    def force(self, now: Seconds) -> list[Effect]:
        """The operator vouches that the peer is off: lift ``wait_for_all`` and any fence requirement."""
        self.forced = True
        self.fenced = True
        return self.tick(now)

    def peer_paths(self, now: Seconds, reachable: bool) -> list[Effect]:
        """Whether any heartbeat path to the peer works (``paths``: not every path DOWN)."""
        return self._reachable(now, reachable) + self.tick(now)

    def _reachable(self, now: Seconds, reachable: bool) -> list[Effect]:
        if reachable != self.peer_reachable:
            self.peer_reachable = reachable
            if not reachable:
                self.unreachable_since = now
        self.peer_seen |= reachable
        if reachable and self.phase in (Phase.ELECTING, Phase.FENCING) and self.kind is LeaseKind.TAKEOVER:
            return self._abandon()
        if not reachable and self.phase is Phase.ELECTING and self.kind is not LeaseKind.TAKEOVER:
            return self._abandon()            # the peer went silent: a takeover now, with its own rules
        return []

    def peer_claim(self, now: Seconds, *, active: bool, epoch: int) -> list[Effect]:
        """The peer's role and epoch, from its authenticated heartbeats (so it is reachable, too)."""
        self.claim = _Claim(active, epoch, now)
        self.epoch = max(self.epoch, epoch)
        effects = self._reachable(now, True)
        if active and self.active:
            effects.append(self._alarm(ALARM_SPLIT_BRAIN, system_entity(self.config.system),
                                       f"controllers {self.config.me_name} (epoch {self.target}) and "
                                       f"{self.config.peer_name} (epoch {epoch}) both claim to be active"))
            if (epoch, self.config.me) > (self.target, self.config.peer):
                effects += self._demote(now, f"{self.config.peer_name} is active with epoch {epoch}")
        else:
            if active and self.phase in (Phase.ELECTING, Phase.FENCING) and epoch >= self.target:
                effects += self._abandon()
            effects += self._clear(ALARM_SPLIT_BRAIN, system_entity(self.config.system))
        return effects + self.tick(now)

    def granted(self, now: Seconds, grant: LeaseGrant) -> list[Effect]:
        sent = self._sent.get(grant.request_id)
        if (sent is not None and grant.candidate == self.config.me and grant.epoch == self.target
                and self.phase is not Phase.STANDBY and grant.voter in self.config.voters):
            self._vote(grant.voter, sent + min(grant.ttl, self.policy.lease) * (1 - self.policy.drift)
                       - self.policy.margin)
        return self.tick(now)

    def refused(self, now: Seconds, refusal: LeaseRefusal) -> list[Effect]:
        self.epoch = max(self.epoch, refusal.voter_epoch)
        if refusal.epoch == self.target:
            self.votes.pop(refusal.voter, None)
        return self.tick(now)

    def fence_result(self, now: Seconds, epoch: int, ok: bool) -> list[Effect]:
        if not self.fence_pending or epoch != self.target:
            return self.tick(now)
        self.fence_pending = False
        effects: list[Effect] = []
        if ok:
            self.fenced = True
            self.fence_attempts = 0
            self.fence_retry_at = None
            effects += self._clear(ALARM_FENCE_FAILED, host_entity(self.config.peer_name))
        else:
            backoff = min(self.policy.fence_backoff * 2 ** (self.fence_attempts - 1), 60.0)
            self.fence_retry_at = now + backoff if self.fence_attempts < self.policy.fence_max_attempts else None
            consequence = "" if self.active else f"; {self.config.me_name} will not take over until it succeeds"
            effects.append(self._alarm(ALARM_FENCE_FAILED, host_entity(self.config.peer_name),
                                       f"fencing {self.config.peer_name} through its BMC failed (attempt "
                                       f"{self.fence_attempts}){consequence}"))
        return effects + self.tick(now)

    def swact(self, now: Seconds) -> tuple[str | None, list[Effect]]:
        """A planned handover to the peer: (None, effects) when it starts, (why not, []) when refused."""
        if not self.active:
            return f"{self.config.me_name} is not the active controller", []
        if not self._peer_standby(now):
            return f"{self.config.peer_name} is not a reachable standby", []
        effects = self._demote(now, f"swact to {self.config.peer_name}")
        effects.append(SendHandover(self.config.peer, self.target))
        return None, effects

    def handover(self, now: Seconds, epoch: int) -> list[Effect]:
        """The active offered us its role (it released its lease for ``epoch``)."""
        self.epoch = max(self.epoch, epoch)
        if self.phase is Phase.STANDBY:
            self.handover_offered = True
        return self.tick(now)

    # -- the machine --------------------------------------------------------------------------------

    def _peer_standby(self, now: Seconds) -> bool:
        return (self.peer_reachable and self.claim is not None and not self.claim.active
                and now - self.claim.at <= self.policy.claim_ttl)

    def _majority(self, now: Seconds) -> bool:
        return sum(1 for until in self.votes.values() if until > now) >= self.quorum(now)

    def lease_end(self) -> Seconds | None:
        """Until when a strict majority backs us (None: it does not)."""
        held = sorted(self.votes.values(), reverse=True)
        quorum = self.quorum(self.clock)
        return held[quorum - 1] if len(held) >= quorum else None

    def _request(self, now: Seconds) -> list[Effect]:
        request_id = self._next_request
        self._next_request += 1
        self._sent = {k: v for k, v in self._sent.items() if now - v < self.policy.lease}
        self._sent[request_id] = now
        self.renew_at = now + self.policy.renew
        req = LeaseRequest(self.config.me, self.target, request_id, self.kind)
        own = self.voter.request(now, req, hears_holder=self.peer_reachable and self.voter.holder == self.config.peer)
        if isinstance(own, LeaseGrant):
            self._vote(self.config.me, now + self.policy.holder_trust)
        return [SendLeaseRequest(req)]

    def _vote(self, voter: NodeId, until: Seconds) -> None:
        """``voter`` backs us until ``until`` (a later grant never shortens an earlier one)."""
        self.votes[voter] = max(self.votes.get(voter, until), until)

    def _elect(self, now: Seconds, kind: LeaseKind) -> list[Effect]:
        self.phase, self.kind = Phase.ELECTING, kind
        self.elected_at = now
        # never an epoch our own voter already granted (to the peer, whose claim may not have reached us)
        self.target = self.epoch = max(self.epoch, self.voter.epoch) + 1
        self.votes = {}
        self.fenced = self.forced and kind is LeaseKind.TAKEOVER
        self.fence_attempts = 0
        self.fence_retry_at = None
        self.handover_offered = False
        return [PersistEpoch(self.target), *self._request(now)]

    def _needs_fence(self, now: Seconds) -> bool:
        if self.fenced or self.kind is LeaseKind.TAKEOVER:
            return not self.fenced
        # the peer stepped down and told us (handover), or is heard as a standby (start-up)
        return not (self.peer_reachable and (self.kind is LeaseKind.HANDOVER or self._peer_standby(now)))

    def _fence(self) -> list[Effect]:
        self.fence_pending = True
        self.fence_attempts += 1
        self.fence_retry_at = None
        return [FencePeer(self.config.peer, self.target, self.fence_attempts)]

    def _fence_due(self, now: Seconds) -> bool:
        if self.fence_pending:
            return False
        if self.fence_attempts == 0:
            return True
        return self.fence_retry_at is not None and now >= self.fence_retry_at

    def _become_active(self, now: Seconds) -> list[Effect]:
        self.phase = Phase.ACTIVE
        self.renew_at = now + self.policy.renew
        return [BecomeActive(self.target), Announce(self.config.me, self.config.peer, 2 * self.target),
                *self._clear(ALARM_FENCE_FAILED, host_entity(self.config.peer_name))]

    def _demote(self, now: Seconds, reason: str) -> list[Effect]:
        was_active = self.active
        self.quiet_until = now + self.policy.startup_delay
        effects: list[Effect] = [BecomeStandby(self.target, reason), self._release()]
        if was_active:
            effects.append(Announce(None, self.config.me, 2 * self.target + 1))
        return effects

    def _abandon(self) -> list[Effect]:
        """Give up an election or a takeover (no role change: we were not active)."""
        return [self._release(), *self._clear(ALARM_FENCE_FAILED, host_entity(self.config.peer_name))]

    def _release(self) -> SendRelease:
        """Back to standby: forget the votes and any pending fence, and release our lease for ``target``
        (our own voter at once, the others through the effect)."""
        self.phase = Phase.STANDBY
        self.votes = {}
        self.fence_pending = False
        release = LeaseRelease(self.config.me, self.target)
        self.voter.release(release)
        return SendRelease(release)

    def tick(self, now: Seconds) -> list[Effect]:
        """Apply the rules at ``now`` (call it at :meth:`next_deadline` too)."""
        self.clock = max(self.clock, now)
        if self.phase is Phase.ACTIVE:
            return self._tick_active(now)
        if self.phase is Phase.STANDBY:
            return self._tick_standby(now)
        return self._tick_candidate(now)

    def _tick_active(self, now: Seconds) -> list[Effect]:
        effects: list[Effect] = []
        if self.config.two_node:
            if (not self.peer_reachable and self.peer_seen and not self.fenced
                    and now - self.unreachable_since >= self.policy.fence_delay_active and self._fence_due(now)):
                effects += self._fence()
            if self.peer_reachable:
                self.fenced = False
                self.fence_attempts = 0
        elif not self._majority(now):
            return self._demote(now, "lost the majority of the voters")
        if now >= self.renew_at:
            effects += self._request(now)
        return effects

    def _tick_standby(self, now: Seconds) -> list[Effect]:
        cfg, p = self.config, self.policy
        if cfg.two_node:
            if not self.peer_reachable and (self.peer_seen or self.forced):
                if now - self.unreachable_since >= p.fence_delay_standby:
                    effects = self._elect(now, LeaseKind.TAKEOVER)
                    self.phase = Phase.FENCING
                    return effects + self._tick_candidate(now)
                return []
        elif not self.peer_reachable and (now - self.started >= p.voter_hold or self.peer_seen):
            if now < self.quiet_until:
                return []
            return self._elect(now, LeaseKind.TAKEOVER)
        if self.handover_offered:
            return self._elect(now, LeaseKind.HANDOVER)
        if not self._peer_standby(now):
            self._standby_since = None
            return []
        if self._standby_since is None:
            self._standby_since = now
        if now < self.quiet_until:
            return []
        if cfg.me < cfg.peer or now - self._standby_since >= p.startup_delay:
            self._standby_since = None
            return self._elect(now, LeaseKind.STARTUP)
        return []

    def _tick_candidate(self, now: Seconds) -> list[Effect]:
        effects: list[Effect] = []
        if (self.phase is Phase.ELECTING and not self._majority(now)
                and now - self.elected_at >= self.policy.election_timeout):
            # An election that cannot win (both controllers asking at once, or an epoch some voter already
            # gave away) must not go on for ever: the preferred controller asks again, above every epoch
            # it has seen (claims, refusals, its own voter); the other gives up, releasing its own vote,
            # and keeps quiet for a while, so the two never duel.
            if self.config.me < self.config.peer:
                return self._elect(now, self.kind)
            self.quiet_until = now + self.policy.election_timeout
            return self._abandon()
        two_node = self.config.two_node and self.kind is LeaseKind.TAKEOVER
        if self.phase is Phase.ELECTING and self._majority(now):
            if self._needs_fence(now):
                self.phase = Phase.FENCING
            else:
                return self._become_active(now)
        if self.phase is Phase.FENCING:
            if self.fenced and (two_node or self._majority(now)):
                return self._become_active(now)
            if self.fenced:
                self.phase = Phase.ELECTING
            elif self._fence_due(now):
                effects += self._fence()
            elif (not self.fence_pending and self.fence_retry_at is None
                  and self.fence_attempts >= self.policy.fence_max_attempts):
                return effects          # given up: the alarm stays, an operator acts (force)
        if not two_node and now >= self.renew_at:
            effects += self._request(now)
        return effects

    def next_deadline(self) -> Seconds | None:
        """When :meth:`tick` has something to do with no input."""
        p = self.policy
        times: list[Seconds] = []
        if self.phase is not Phase.STANDBY:
            if not (self.config.two_node and self.kind is LeaseKind.TAKEOVER and self.phase is Phase.FENCING):
                times.append(self.renew_at)
            if self.phase is Phase.ELECTING:
                times.append(self.elected_at + p.election_timeout)
            if self.phase is Phase.ACTIVE and not self.config.two_node:
                end = self.lease_end()
                if end is not None:
                    times.append(end)
                times += [t + p.join_grace for t in self.joined.values()]     # a joiner starts to count
            if self.fence_retry_at is not None:
                times.append(self.fence_retry_at)
            if self.phase is Phase.ACTIVE and self.config.two_node and not self.peer_reachable:
                times.append(self.unreachable_since + p.fence_delay_active)
        else:
            if not self.peer_reachable:
                delay = p.fence_delay_standby if self.config.two_node else 0.0
                times.append(max(self.unreachable_since + delay, self.started + p.voter_hold, self.quiet_until))
            if self.claim is not None:
                times.append(self.claim.at + p.claim_ttl)
            if self._standby_since is not None:
                times.append(max(self._standby_since + p.startup_delay, self.quiet_until))
            times.append(self.quiet_until)
        return min((t for t in times if t > self.clock), default=None)

    # -- alarms -------------------------------------------------------------------------------------

    def _alarm(self, alarm_id: str, entity: str, reason: str) -> Effect:
        """950.007 and 950.008 are both critical (the catalogue)."""
        self.alarms.add(f"{alarm_id} {entity}")
        return RaiseAlarm(AlarmIntent(alarm_id, entity, "critical", reason))

    def _clear(self, alarm_id: str, entity: str) -> list[Effect]:
        key = f"{alarm_id} {entity}"
        if key not in self.alarms:
            return []
        self.alarms.discard(key)
        return [RaiseAlarm(AlarmIntent(alarm_id, entity))]


def vote(voter: LeaseVoter, now: Seconds, asked: LeaseFields, *, hears_holder: bool) -> tuple[MsgType, LeaseFields]:
    """A voter's answer to a lease request as it goes on the wire: a grant carries its ttl in ms, a refusal
    the voter's epoch in the ``ttl_ms`` field (the wire has no other place for it)."""
    answer = voter.request(now, LeaseRequest(asked.candidate, asked.epoch, asked.request_id, asked.kind),
                           hears_holder=hears_holder)
    if isinstance(answer, LeaseGrant):
        return MsgType.LEASE_GRANT, LeaseFields(answer.candidate, answer.epoch, answer.request_id,
                                                int(answer.ttl * 1000), asked.kind)
    return MsgType.LEASE_REFUSE, LeaseFields(answer.candidate, answer.epoch, answer.request_id, answer.voter_epoch,
                                             asked.kind)


def voters_of(controllers: Iterable[NodeId], workers: Iterable[NodeId], witness: NodeId | None = None
              ) -> frozenset[NodeId]:
    return frozenset([*controllers, *workers, *([witness] if witness is not None else [])])
