"""Prometheus metrics of the inventory (conventions of ``services.core.metrics``).

* ``roost_hosts{personality, administrative, operational, availability}``: hosts by personality and state,
  refreshed from the database every few seconds (every replica reports the same number: aggregate with
  ``max``).  ``personality="none"`` counts unprovisioned hosts;
* ``roost_host_commands_total{command, outcome}``: operator commands on hosts, ``accepted`` or ``rejected``;
* BMC request latency and failures are the driver's: ``roost_bmc_request_seconds{operation}`` and
  ``roost_bmc_failures_total{operation, kind}`` (``services.inventory.bmc.redfish``).

Labels are fixed sets; never host names.
"""

from __future__ import annotations

import itertools
from collections import Counter as Tally
from collections.abc import Iterable
from typing import Final, get_args

from prometheus_client import Counter, Gauge

from schemas.inventory import Administrative, Availability, Operational, Personality

PERSONALITIES: Final = (*get_args(Personality), "none")
ADMINISTRATIVE: Final = get_args(Administrative)
OPERATIONAL: Final = get_args(Operational)
AVAILABILITY: Final = get_args(Availability)
COMMANDS: Final = ("add", "update", "delete", "lock", "unlock", "reboot", "reset", "power-on", "power-off",
                   "reinstall", "swact")

HOSTS = Gauge("roost_hosts", "Hosts by personality and state",
              ["personality", "administrative", "operational", "availability"])
HOST_COMMANDS = Counter("roost_host_commands", "Operator commands on hosts, by outcome", ["command", "outcome"])

for _p, _a, _o, _v in itertools.product(PERSONALITIES, ADMINISTRATIVE, OPERATIONAL, AVAILABILITY):
    HOSTS.labels(_p, _a, _o, _v)


def set_hosts(states: Iterable[tuple[str | None, str, str, str]]) -> None:
    """Set the gauge from (personality, administrative, operational, availability) per host; 0 elsewhere."""
    counts = Tally((p or "none", a, o, v) for p, a, o, v in states)
    for key in itertools.product(PERSONALITIES, ADMINISTRATIVE, OPERATIONAL, AVAILABILITY):
        HOSTS.labels(*key).set(counts.get(key, 0))


def record_command(command: str, accepted: bool) -> None:
    if command in COMMANDS:
        HOST_COMMANDS.labels(command, "accepted" if accepted else "rejected").inc()

