"""Subcloud availability from their agents' heartbeats over the bus, with mass-offline detection.  Pure.

A subcloud is ``online`` while its agent was heard within ``offline_after`` seconds.  When it falls silent
it goes ``offline`` (950.101), unless many went silent together: when, at one evaluation, the subclouds
newly silent are at least ``mass_fraction`` of those online and at least ``mass_minimum`` of them, the
likely cause is the system controller's own broker or network, not the subclouds.  Then none is marked
offline; one alarm (950.103) stands instead until they are heard again (each one heard again is simply
online) or, silent for ``mass_hold`` seconds more, the held ones go offline after all (a real mass outage
outlasting the hold is still reported).

``evaluate(now)`` returns the transitions; the caller persists and announces them.
"""

from __future__ import annotations

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
