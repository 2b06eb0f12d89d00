"""The host-level verdict from the per-path states: healthy, degraded, failed; multi-node failure mode.  Pure.

:meth:`Verdict.evaluate` is given, for every monitored host, a :class:`PathView` per monitored path (state
and how long it has been silent, from ``paths.PathHealth``), and returns what changed: the host health
events to publish (``roost.heartbeat.host_health``, :meth:`HostVerdict.event`) and the alarms to raise or
clear.  The monitor calls it every period and on every path transition; :meth:`Verdict.witness_report`
feeds it the other nodes' ``HEARD`` digests.  Rules:

* **healthy**: no path DOWN or ASYMMETRIC (SUSPECT and UNKNOWN count as working: a new path gets its
  ``down_after`` to come up).  A host with no path established yet gets no verdict.
* **degraded**: some path DOWN or ASYMMETRIC; ``networks_down`` names them; 950.003 per network
  (major, ``host=<h>.network=<n>``).  Also a host whose every path is DOWN but that is not failed (yet):
  other nodes still hear it, the confirmation is missing, or multi-node failure mode is on.
* **failed**: every path DOWN, which takes ``down_after`` periods (1 s) of silence on each, **and**
  confirmed: no *witness* (another node that monitors the host: the other controller's monitor, the
  workers for a controller) heard it in a report fresher than ``report_ttl``, and at least
  ``min(confirmations, known witnesses)`` fresh reports say they do not (a witness is known while its
  reports are younger than ``witness_expiry``; with none, our own view is enough).  It stays failed until
  a path comes back.  The 950.003 alarms of a failed host are cleared: 950.002 (host failed) is raised by
  inventory from the event, it owns that alarm.
* **multi-node failure mode (MNFA)**, per network: when at least ``threshold = max(mnfa_min_hosts,
  ceil(mnfa_fraction x hosts))`` hosts went silent on it (``mnfa_minor`` s, before any can fail) within
  the last ``mnfa_window`` s.  While any network is in it nobody is newly failed, 950.003 is not raised
  on that network, and 950.009 (critical, ``system=<s>.network=<n>``) is.  It ends once fewer than
  ``ceil(threshold / 2)`` hosts are silent on it for ``mnfa_exit_hold`` s (or after ``mnfa_timeout``, if
  set); hosts still silent then go through the ordinary rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from schemas.heartbeat import HealthState, HostHealth
from schemas.inventory import Network
from services.heartbeat.model import (
    ALARM_MULTI_NODE,
    ALARM_NETWORK_LOST,
    AlarmIntent,
    Path,
    Seconds,
    network_entity,
    system_entity,
)
from services.heartbeat.paths import PathHealth, PathState


@dataclass(frozen=True, slots=True)
class PathView:
    state: PathState
    silent_for: Seconds

    @classmethod
    def of(cls, health: PathHealth, now: Seconds) -> PathView:
        return cls(health.state, health.silence(now))


@dataclass(frozen=True, slots=True)
class VerdictPolicy:
    confirmations: int = 3
    report_ttl: Seconds = 0.5
    witness_expiry: Seconds = 3.0
    mnfa_min_hosts: int = 3
    mnfa_fraction: float = 0.1
    mnfa_minor: Seconds = 0.5
    mnfa_window: Seconds = 1.5
    mnfa_exit_hold: Seconds = 5.0
    mnfa_timeout: Seconds | None = None

    def threshold(self, hosts: int) -> int:
        return max(self.mnfa_min_hosts, math.ceil(self.mnfa_fraction * hosts))


@dataclass(frozen=True, slots=True)
class HostVerdict:
    hostname: str
    state: HealthState
    networks_down: tuple[Network, ...] = ()
    reason: str = ""

    def event(self, entity_id: str, version: int) -> HostHealth:
        """The bus event (``entity_id``: the host's uuid; ``version``: grows per host, kept by the monitor)."""
        return HostHealth(entity_id=entity_id, version=version, hostname=self.hostname, state=self.state,
                          networks_down=list(self.networks_down), reason=self.reason[:255])

    def same(self, other: HostVerdict | None) -> bool:
        return other is not None and (self.state, self.networks_down) == (other.state, other.networks_down)


@dataclass(frozen=True, slots=True)
class VerdictOutput:
    health: tuple[HostVerdict, ...] = ()
    alarms: tuple[AlarmIntent, ...] = ()
    mnfa: frozenset[Path] = frozenset()


@dataclass(slots=True)
class _Report:
    at: Seconds
    heard: Mapping[str, frozenset[Path]]


@dataclass(slots=True)
class _Mnfa:
    entered: Seconds
    below_since: Seconds | None = None
    hosts: int = 0


class Verdict:
    """The verdicts of one monitor over the hosts it watches."""

    def __init__(self, system: str, policy: VerdictPolicy | None = None) -> None:
        self.system = system
        self.policy = policy or VerdictPolicy()
        self._verdicts: dict[str, HostVerdict] = {}
        self._reports: dict[str, _Report] = {}
        self._mnfa: dict[Path, _Mnfa] = {}
        self._raised: dict[tuple[str, str], AlarmIntent] = {}

    def current(self, hostname: str) -> HostVerdict | None:
        return self._verdicts.get(hostname)

    @property
    def mnfa(self) -> frozenset[Path]:
        return frozenset(self._mnfa)

    def witness_report(self, now: Seconds, witness: str, heard: Mapping[str, frozenset[Path]]) -> None:
        """What ``witness`` hears (its ``HEARD`` digest, node ids mapped to hostnames): every host it monitors,
        with the paths it hears it on (empty: monitored, not heard).  From authenticated datagrams only."""
        self._reports[witness] = _Report(now, dict(heard))

    def forget_witness(self, witness: str) -> None:
        self._reports.pop(witness, None)

    # -- confirmation ------------------------------------------------------------------------------

    def _confirmed(self, now: Seconds, host: str) -> tuple[bool, str]:
        p = self.policy
        hear: list[str] = []
        deny: list[str] = []
        known = 0
        for witness, report in sorted(self._reports.items()):
            if witness == host or host not in report.heard or now - report.at > p.witness_expiry:
                continue
            known += 1
            if now - report.at <= p.report_ttl:
                (hear if report.heard[host] else deny).append(witness)
        if hear:
            return False, f"every path is down, but {', '.join(hear)} still hear it"
        need = min(p.confirmations, known)
        if len(deny) < need:
            return False, f"every path is down; waiting for confirmation ({len(deny)} of {need})"
        by = f"confirmed by {', '.join(deny)}" if deny else "no other node monitors it"
        return True, f"every path is down ({by})"

    # -- multi-node failure mode ------------------------------------------------------------------------

    def _update_mnfa(self, now: Seconds, hosts: Mapping[str, Mapping[Path, PathView]]) -> None:
        p = self.policy
        threshold = p.threshold(len(hosts))
        for path in Path:
            silent = [v.silent_for for views in hosts.values() if (v := views.get(path)) is not None
                      and v.state is not PathState.UNKNOWN and v.silent_for >= p.mnfa_minor]
            mode = self._mnfa.get(path)
            if mode is None:
                if sum(1 for s in silent if s <= p.mnfa_window) >= threshold:
                    self._mnfa[path] = _Mnfa(now, hosts=len(silent))
                continue
            mode.hosts = max(mode.hosts, len(silent))
            if len(silent) < math.ceil(threshold / 2):
                mode.below_since = now if mode.below_since is None else mode.below_since
            else:
                mode.below_since = None
            timed_out = p.mnfa_timeout is not None and now - mode.entered >= p.mnfa_timeout
            if timed_out or (mode.below_since is not None and now - mode.below_since >= p.mnfa_exit_hold):
                del self._mnfa[path]

    def next_deadline(self) -> Seconds | None:
        """When multi-node failure mode may end with no other change (None: not in it)."""
        p, times = self.policy, []
        for mode in self._mnfa.values():
            if mode.below_since is not None:
                times.append(mode.below_since + p.mnfa_exit_hold)
            if p.mnfa_timeout is not None:
                times.append(mode.entered + p.mnfa_timeout)
        return min(times, default=None)

    # -- the verdict ---------------------------------------------------------------------------------

    def _judge(self, now: Seconds, host: str, views: Mapping[Path, PathView]) -> HostVerdict | None:
        if not views or all(v.state is PathState.UNKNOWN for v in views.values()):
            return None
        broken = tuple(p.network for p in Path if p in views and views[p].state.broken)
        if all(v.state is PathState.DOWN for v in views.values()):
            before = self._verdicts.get(host)
            if before is not None and before.state == "failed":
                return before
            if self._mnfa:
                nets = ", ".join(p.network for p in sorted(self._mnfa))
                return HostVerdict(host, "degraded", broken,
                                   f"every path is down, but multi-node failure mode is on ({nets}): not failed")
            confirmed, reason = self._confirmed(now, host)
            return HostVerdict(host, "failed" if confirmed else "degraded", broken, reason)
        if broken:
            return HostVerdict(host, "degraded", broken, f"heartbeat lost on {', '.join(broken)}")
        return HostVerdict(host, "healthy")

    def evaluate(self, now: Seconds, hosts: Mapping[str, Mapping[Path, PathView]]) -> VerdictOutput:
        """The verdicts that changed and the alarms to raise or clear, for the hosts monitored now."""
        self._update_mnfa(now, hosts)
        changed: list[HostVerdict] = []
        for host in sorted(hosts):
            verdict = self._judge(now, host, hosts[host])
            if verdict is None:
                continue
            if not verdict.same(self._verdicts.get(host)):
                changed.append(verdict)
            self._verdicts[host] = verdict
        for gone in self._verdicts.keys() - hosts.keys():
            del self._verdicts[gone]
        return VerdictOutput(tuple(changed), tuple(self._alarm_changes(hosts)), self.mnfa)

    def _alarm_changes(self, hosts: Mapping[str, Mapping[Path, PathView]]) -> list[AlarmIntent]:
        wanted: dict[tuple[str, str], AlarmIntent] = {}
        for path, mode in sorted(self._mnfa.items()):
            intent = AlarmIntent(ALARM_MULTI_NODE, system_entity(self.system, path), "critical",
                                 f"{mode.hosts} hosts stopped answering heartbeats at once on the {path.network} "
                                 f"network: multi-node failure mode, nobody is failed")
            wanted[intent.alarm_id, intent.entity_instance_id] = intent
        for host, verdict in sorted(self._verdicts.items()):
            if verdict.state != "degraded":
                continue
            for path in Path:
                if path.network in verdict.networks_down and path not in self._mnfa:
                    intent = AlarmIntent(ALARM_NETWORK_LOST, network_entity(host, path), "major",
                                         f"Heartbeat lost from {host} on the {path.network} network "
                                         f"({hosts[host][path].state.value})")
                    wanted[intent.alarm_id, intent.entity_instance_id] = intent
        intents = [wanted[k] for k in wanted.keys() - self._raised.keys()]
        intents += [AlarmIntent(*k) for k in self._raised.keys() - wanted.keys()]
        # an alarm already raised keeps its first text (a re-raise only to change the count would be noise)
        self._raised = {k: self._raised.get(k, v) for k, v in wanted.items()}
        return sorted(intents, key=lambda a: (not a.raise_, a.alarm_id, a.entity_instance_id))

    def alarms(self) -> tuple[AlarmIntent, ...]:
        """Every alarm this verdict holds raised (for a re-assertion after a restart of the monitor)."""
        return tuple(self._raised[k] for k in sorted(self._raised))
