"""Subcloud availability from their agents' heartbeats over the bus, with mass-offline detection.  Pure.

A subcloud is ``online`` while its agent was heard within ``offline_after`` seconds.  When it falls silent
it goes ``offline`` (950.101), unless many went silent together: when, at one evaluation, the subclouds
newly silent are at least ``mass_fraction`` of those online and at least ``mass_minimum`` of them, the
likely cause is the system controller's own broker or network, not the subclouds.  Then none is marked
offline; one alarm (950.103) stands instead until they are heard again (each one heard again is simply
online) or, silent for ``mass_hold`` seconds more, the held ones go offline after all (a real mass outage
outlasting the hold is still reported).

``evaluate(now)`` returns the transitions; the caller persists and announces them.

How old a heartbeat is when it arrives is :class:`HeartbeatClocks`'s to say, on the system controller's clock:
a heartbeat carries its subcloud's clock, which may be minutes off.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class AvailabilityRules:
    offline_after: float = 30.0
    mass_fraction: float = 0.5
    mass_minimum: int = 3
    mass_hold: float = 600.0


@dataclass(frozen=True, slots=True)
class Transition:
    subcloud: str
    availability: str   # "online" | "offline"


@dataclass(slots=True)
class Evaluation:
    transitions: list[Transition] = field(default_factory=list)
    mass_silence: bool = False          # the mass-offline alarm stands after this evaluation
    mass_silence_changed: bool = False
    held: tuple[str, ...] = ()          # silent subclouds not marked offline


class Availability:
    def __init__(self, rules: AvailabilityRules | None = None) -> None:
        self.rules = rules or AvailabilityRules()
        self._heard: dict[str, float] = {}
        self._state: dict[str, str] = {}
        self._held: dict[str, float] = {}   # subcloud -> when the mass silence began
        self._since: dict[str, float] = {}  # subcloud -> when watching began (never heard yet)
        self._mass = False

    def track(self, subcloud: str, availability: str = "unknown", heard_at: float | None = None, *,
              since: float | None = None) -> None:
        """Start watching a subcloud (as stored: a restart keeps what was known).  ``since``: when watching
        began; a subcloud whose agent is never heard goes from ``unknown`` to ``offline`` ``offline_after``
        seconds later."""
        self._state[subcloud] = availability
        if heard_at is not None:
            self._heard[subcloud] = heard_at
        if since is not None:
            self._since[subcloud] = since

    def forget(self, subcloud: str) -> None:
        for d in (self._heard, self._state, self._held, self._since):
            d.pop(subcloud, None)

    def heard(self, subcloud: str, at: float) -> None:
        if subcloud in self._state and at > self._heard.get(subcloud, float("-inf")):
            self._heard[subcloud] = at

    def state(self, subcloud: str) -> str:
        return self._state.get(subcloud, "unknown")

    @property
    def mass_silence(self) -> bool:
        return self._mass

    def evaluate(self, now: float) -> Evaluation:
        r = self.rules
        out = Evaluation()
        fresh: list[str] = []
        for name, state in self._state.items():
            heard = self._heard.get(name)
            alive = heard is not None and now - heard <= r.offline_after
            if alive:
                self._held.pop(name, None)
                if state != "online":
                    self._state[name] = "online"
                    out.transitions.append(Transition(name, "online"))
            elif state == "online" and name not in self._held:
                fresh.append(name)
            elif state == "unknown" and heard is None and now - self._since.get(name, now) > r.offline_after:
                self._state[name] = "offline"        # added, and its agent never spoke
                out.transitions.append(Transition(name, "offline"))
        online = sum(1 for s in self._state.values() if s == "online")
        if fresh and len(fresh) >= r.mass_minimum and len(fresh) >= r.mass_fraction * online:
            for name in fresh:
                self._held[name] = now
        else:
            for name in fresh:
                self._state[name] = "offline"
                out.transitions.append(Transition(name, "offline"))
        for name, since in list(self._held.items()):
            if now - since >= r.mass_hold:
                del self._held[name]
                self._state[name] = "offline"
                out.transitions.append(Transition(name, "offline"))
        mass = bool(self._held)
        out.mass_silence_changed = mass != self._mass
        out.mass_silence = self._mass = mass
        out.held = tuple(sorted(self._held))
        return out


class HeartbeatClocks:
    """How old each subcloud's heartbeat is when it arrives, measured on this controller's clock whatever the
    subcloud's clock says.  Pure.

    A heartbeat carries the time its agent sent it by the subcloud's clock, and an edge site's clock can be
    minutes off (NTP not synced yet after a power cut, no NTP at all).  Taken as is, a subcloud whose clock is
    behind by more than ``offline_after`` looked silent however often it was heard, and one whose clock is ahead
    made every heartbeat look brand new, a delayed one included.

    ``received - sent`` is the clocks' offset plus the message's delay.  The smallest of it over the subcloud's
    last ``window`` heartbeats stands for the offset plus the quickest delivery; a heartbeat's age is how much
    later than that it came (never negative).  So a clock off by any constant amount gives ages of about zero,
    and a heartbeat held up in the broker (or a redelivery) is as old as it was held, next to the quick ones
    before it.  What it cannot tell: the first heartbeat heard after this controller started, with no earlier
    one to compare, counts as fresh (a subcloud that died while the controller was down is online until
    ``offline_after`` passes); and a subcloud's clock stepped back by its NTP makes its heartbeats look older by
    the step until the window has forgotten the ones before (``window`` heartbeats).
    """

    def __init__(self, window: int = 12) -> None:
        if window < 1:
            raise ValueError("the window holds at least one heartbeat")
        self.window = window
        self._lateness: dict[str, deque[float]] = {}

    def age(self, subcloud: str, lateness: float) -> float:
        """The age, in seconds, of a heartbeat of ``subcloud`` received ``lateness`` seconds after the time it
        carries (negative when the subcloud's clock is ahead of ours)."""
        seen = self._lateness.get(subcloud)
        if seen is None:
            seen = self._lateness[subcloud] = deque(maxlen=self.window)
        seen.append(lateness)
        return lateness - min(seen)

    def forget(self, subcloud: str) -> None:
        self._lateness.pop(subcloud, None)
