"""The vocabulary every heartbeat module shares: paths, node ids, times, alarm intents.  Pure.

Times are monotonic seconds (``float``) handed in by the caller: nothing here reads a clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from schemas.inventory import Network

NodeId = int
"""A node's stable heartbeat id (u32, never 0): not its hostname, which lives in configuration."""

Seconds = float
"""A monotonic time or a duration, in seconds."""

BROADCAST: NodeId = 0
"""``dest`` of a datagram meant for every receiver on the path."""

MAX_NODE_ID = 0xFFFF_FFFF


class Path(enum.IntEnum):
    """A heartbeat network.  The value is the id on the wire; ``network`` is inventory's name for it."""

    MGMT = 0
    CLUSTER_HOST = 1
    OAM = 2

    @property
    def network(self) -> Network:
        return _NETWORKS[self]

    @classmethod
    def of(cls, network: Network) -> Path:
        return _BY_NETWORK[network]


_NETWORKS: dict[Path, Network] = {Path.MGMT: "mgmt", Path.CLUSTER_HOST: "cluster-host", Path.OAM: "oam"}
_BY_NETWORK: dict[Network, Path] = {v: k for k, v in _NETWORKS.items()}

# Alarm ids of roost's catalogue (services/alarms/catalogue.yaml) that the heartbeat service raises.
# 950.002 (host failed) is *inventory's*: it raises it while a host's availability is failed, which it
# derives from our HostHealth event (one owner per alarm, or re-assertions would fight).
ALARM_NETWORK_LOST = "950.003"      # host=<hostname>.network=<network>
ALARM_AUTH_FAILURES = "950.006"     # host=<hostname>.network=<network>
ALARM_SPLIT_BRAIN = "950.007"       # system=<system>
ALARM_FENCE_FAILED = "950.008"      # host=<hostname>
ALARM_MULTI_NODE = "950.009"        # system=<system>.network=<network>

Severity = Literal["critical", "major", "minor", "warning"]


@dataclass(frozen=True, slots=True)
class AlarmIntent:
    """Raise (``severity`` set) or clear (``severity`` None) one alarm: a ``roost.fault.set|clear`` to publish."""

    alarm_id: str
    entity_instance_id: str
    severity: Severity | None = None
    reason: str = ""

    @property
    def raise_(self) -> bool:
        return self.severity is not None


def host_entity(hostname: str) -> str:
    return f"host={hostname}"


def network_entity(hostname: str, path: Path) -> str:
    return f"host={hostname}.network={path.network}"


def system_entity(system: str, path: Path | None = None) -> str:
    return f"system={system}" if path is None else f"system={system}.network={path.network}"
