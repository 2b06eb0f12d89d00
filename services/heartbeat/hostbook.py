"""Which hosts the monitor watches, from inventory's host events.  Pure.

The heartbeat service never reads inventory's tables (each service owns its own): it learns the hosts
from ``roost.cmd.host.list`` at start and from ``roost.host.*`` events afterwards.  Events may come twice
or out of order, and the list may cross them: :class:`HostBook` keeps the newest version per host (and
a tombstone per deleted host), so an older record never overrides a newer one.

A host is monitored (a :class:`Target`) while it is provisioned, unlocked, named, not this monitor's own
controller, and has an address on at least one network the monitor has a socket on.  Its heartbeat node
id is inventory's ``node_id`` (stable, never reused), which the agent learns from the heartbeat service.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from schemas.inventory import Host
from services.heartbeat.model import NodeId, Path

__all__ = ["Change", "HostBook", "Target", "target_of"]


@dataclass(frozen=True, slots=True)
class Target:
    """A host to monitor: what the monitor and the host's agent need to know."""

    uuid: str
    hostname: str
    node_id: NodeId
    addresses: Mapping[Path, str]
    agent: str | None
    personality: str | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """A host's target changed: ``before`` / ``after`` (None: not monitored)."""

    uuid: str
    before: Target | None
    after: Target | None


def target_of(host: Host, *, own_hostname: str, networks: Iterable[Path]) -> Target | None:
    if host.provision != "provisioned" or host.administrative != "unlocked" or not host.hostname:
        return None
    if host.hostname == own_hostname:
        return None
    wanted = set(networks)
    addresses = {Path.of(net): str(ip) for net, ip in host.addresses.items() if Path.of(net) in wanted}
    if not addresses:
        return None
    return Target(host.uuid, host.hostname, host.node_id, dict(sorted(addresses.items())), host.agent,
                  host.personality)


class HostBook:
    def __init__(self, *, own_hostname: str, networks: Iterable[Path]) -> None:
        self.own_hostname = own_hostname
        self.networks = frozenset(networks)
        self._versions: dict[str, int] = {}
        self._deleted: set[str] = set()
        self._targets: dict[str, Target] = {}

    @property
    def targets(self) -> Mapping[str, Target]:
        return self._targets

    def _newer(self, uuid: str, version: int) -> bool:
        known = self._versions.get(uuid)
        return known is None or version > known

    def apply(self, host: Host) -> Change | None:
        """A host record (from the list or an event).  An older or repeated version changes nothing."""
        if not self._newer(host.uuid, host.version):
            return None
        self._versions[host.uuid] = host.version
        self._deleted.discard(host.uuid)
        return self._set(host.uuid, target_of(host, own_hostname=self.own_hostname, networks=self.networks))

    def delete(self, uuid: str, version: int) -> Change | None:
        if not self._newer(uuid, version):
            return None
        self._versions[uuid] = version
        self._deleted.add(uuid)
        return self._set(uuid, None)

    def _set(self, uuid: str, target: Target | None) -> Change | None:
        before = self._targets.get(uuid)
        if target is None:
            self._targets.pop(uuid, None)
        else:
            self._targets[uuid] = target
        if before == target:
            return None
        return Change(uuid, before, target)
