"""Per (peer, path) health: UNKNOWN, UP, SUSPECT, DOWN, ASYMMETRIC, with flap damping.  Pure.

One :class:`PathHealth` per monitored peer and path, fed with :meth:`~PathHealth.heard` for every datagram
that passed verification and the replay guard, and :meth:`~PathHealth.advance` at the times
:meth:`~PathHealth.next_deadline` names (all monotonic seconds, handed in)::

    UNKNOWN    --``initial_good`` heartbeats (2)-------------------------------> UP
    UP         --silent ``suspect_after`` periods (3: 300 ms)------------------> SUSPECT
    SUSPECT    --a heartbeat--> UP;  --silent ``down_after`` periods (10: 1 s)--> DOWN
    UP/SUSPECT --the peer says it has not heard us for ``asymmetric_after``
                 periods (5: 500 ms) while we hear it---------------------------> ASYMMETRIC
    DOWN/ASYMMETRIC --``required_good`` heartbeats in a row, heard both ways---> UP
    any        --silent ``down_after`` periods (never heard: since created)----> DOWN

A row of good heartbeats is broken by a gap of more than ``gap_periods`` periods, or by a heartbeat saying
the peer does not hear us.  Flap damping: ``required_good`` is ``recovery_good`` (10: 1 s) times 2 to the
*penalty*, capped at ``max_recovery_good`` (300: 30 s); the penalty grows by one each time the path goes
down again less than ``flap_window`` (60 s) after it recovered, and falls back to 0 when it goes down after
staying up longer than that.  So a path that stops answering is DOWN exactly ``down_after`` periods after
its last datagram (the driver advances at ``next_deadline``), and a flapping NIC cannot bounce a host's
state faster than the penalty allows.

"Hears me" comes from the peer's ``HEARD`` digest (``wire.Payload.heard``): whether it lists us on this
path; None (the peer sends no digest) never makes a path asymmetric.  :func:`heard_paths` builds our own
digest from our :class:`PathHealth` objects.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from services.heartbeat.model import Path, Seconds

EPSILON = 1e-9


class PathState(enum.StrEnum):
    UNKNOWN = "unknown"          # not established yet
    UP = "up"
    SUSPECT = "suspect"          # a few periods missed: still counts as working
    DOWN = "down"
    ASYMMETRIC = "asymmetric"    # we hear the peer, it does not hear us: not working

    @property
    def working(self) -> bool:
        return self in (PathState.UP, PathState.SUSPECT)

    @property
    def broken(self) -> bool:
        return self in (PathState.DOWN, PathState.ASYMMETRIC)


@dataclass(frozen=True, slots=True)
class PathPolicy:
    period: Seconds = 0.1
    suspect_after: int = 3
    down_after: int = 10
    asymmetric_after: int = 5
    initial_good: int = 2
    recovery_good: int = 10
    max_recovery_good: int = 300
    gap_periods: float = 2.5
    flap_window: Seconds = 60.0

    def __post_init__(self) -> None:
        if not (self.period > 0 and 0 < self.suspect_after < self.down_after and self.asymmetric_after > 0
                and self.initial_good > 0 and 0 < self.recovery_good <= self.max_recovery_good):
            raise ValueError("inconsistent path policy")

    @property
    def suspect_time(self) -> Seconds:
        return self.suspect_after * self.period

    @property
    def down_time(self) -> Seconds:
        return self.down_after * self.period


@dataclass(frozen=True, slots=True)
class PathTransition:
    at: Seconds
    before: PathState
    after: PathState
    reason: str


class PathHealth:
    """The health of one path to one peer, as seen from here."""

    def __init__(self, now: Seconds, policy: PathPolicy | None = None) -> None:
        self.policy = policy or PathPolicy()
        self.created = now
        self.state = PathState.UNKNOWN
        self.since = now
        self.last_heard: Seconds | None = None
        self.good = 0                           # heartbeats in a row, heard both ways
        self.not_heard_since: Seconds | None = None
        self.penalty = 0
        self.up_at: Seconds | None = None       # when it last recovered from DOWN or ASYMMETRIC
        self.clock = now                        # the latest time handed in: time never runs backwards here

    def __repr__(self) -> str:
        return f"PathHealth({self.state.value}, last_heard={self.last_heard}, penalty={self.penalty})"

    @property
    def required_good(self) -> int:
        p = self.policy
        return min(p.recovery_good << self.penalty, p.max_recovery_good)

    def heard(self, now: Seconds, hears_me: bool | None = None) -> PathTransition | None:
        """A valid datagram from the peer on this path; ``hears_me``: whether it says it hears us here."""
        p = self.policy
        now = max(now, self.clock)
        if self.last_heard is not None and now - self.last_heard > p.gap_periods * p.period + EPSILON:
            self.good = 0
        self.last_heard = now
        if hears_me is False:
            self.good = 0
            if self.not_heard_since is None:
                self.not_heard_since = now
        else:
            self.good += 1
            self.not_heard_since = None
        return self._evaluate(now)

    def advance(self, now: Seconds) -> PathTransition | None:
        return self._evaluate(now)

    def silence(self, now: Seconds) -> Seconds:
        return now - (self.last_heard if self.last_heard is not None else self.created)

    def next_deadline(self) -> Seconds | None:
        """The next time :meth:`advance` may change the state with nothing heard (None: never)."""
        p = self.policy
        if self.last_heard is None:
            return self.created + p.down_time if self.state is PathState.UNKNOWN else None
        times: list[Seconds] = []
        if self.state is PathState.UP:
            times.append(self.last_heard + p.suspect_time)
        if self.state is not PathState.DOWN:
            times.append(self.last_heard + p.down_time)
        asymmetric_at = (self.not_heard_since + p.asymmetric_after * p.period
                         if self.not_heard_since is not None else None)
        if (asymmetric_at is not None and self.state in (PathState.UNKNOWN, PathState.UP, PathState.SUSPECT)
                and asymmetric_at < self.last_heard + p.suspect_time - 2 * EPSILON):      # judged only while fresh
            times.append(asymmetric_at)
        return min((t for t in times if t > self.clock), default=None)

    def _target(self, now: Seconds) -> tuple[PathState, str]:
        p, state = self.policy, self.state
        silent = self.silence(now) + EPSILON
        if silent >= p.down_time:
            return PathState.DOWN, f"nothing heard for {p.down_after} periods"
        if self.last_heard is None:
            return state, ""
        if silent >= p.suspect_time:
            if state.working:
                return PathState.SUSPECT, f"nothing heard for {p.suspect_after} periods"
            return state, ""
        if (self.not_heard_since is not None
                and now - self.not_heard_since + EPSILON >= p.asymmetric_after * p.period):
            return PathState.ASYMMETRIC, f"the peer has not heard us for {p.asymmetric_after} periods"
        if state.working:
            return PathState.UP, "heard again"
        if state is PathState.UNKNOWN and self.good >= p.initial_good:
            return PathState.UP, f"{self.good} heartbeats"
        if state.broken and self.good >= self.required_good:
            return PathState.UP, f"{self.good} good heartbeats in a row (penalty {self.penalty})"
        return state, ""

    def _evaluate(self, now: Seconds) -> PathTransition | None:
        now = self.clock = max(now, self.clock)
        target, reason = self._target(now)
        if target is self.state:
            return None
        before = self.state
        if target.broken and not before.broken:
            recent = self.up_at is not None and now - self.up_at < self.policy.flap_window
            self.penalty = min(self.penalty + 1, 16) if recent else 0
            self.good = 0
        if target is PathState.UP and before.broken:
            self.up_at = now
        self.state, self.since = target, now
        return PathTransition(now, before, target, reason)


def heard_paths(paths: Mapping[Path, PathHealth], now: Seconds) -> frozenset[Path]:
    """Our ``HEARD`` digest entry for one peer: the paths it answers on and that are not asymmetric.

    A path counts while it was heard within ``suspect_after`` periods, so a witness stops vouching for a
    silent node well before our own ``down_after``, and its report can confirm a failure without delay."""
    return frozenset(path for path, health in paths.items()
                     if health.last_heard is not None and health.state is not PathState.ASYMMETRIC
                     and health.silence(now) < health.policy.suspect_time)
