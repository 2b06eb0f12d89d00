"""Prometheus metrics of the inventory (conventions of ``services.core.metrics``).

* ``roost_hosts{personality, administrative, operational, availability}``: hosts by personality and state,
  refreshed from the database every few seconds (every replica reports the same number: aggregate with
  ``max``).  ``personality="none"`` counts unprovisioned hosts;
* ``roost_host_commands_total{command, outcome}``: operator commands on hosts, ``accepted`` or ``rejected``;
* ``roost_bmc_request_seconds{operation, outcome}``: BMC calls (check, power, action, hardware) and how
  they ended (``ok``, ``unreachable``, ``auth_failed``, ``unsupported``, ``busy``, ``error``);
* ``roost_bmc_failures_total{reason}``: BMC calls that failed, by the same reasons.

Labels are fixed sets; never host names.
"""

from __future__ import annotations

import itertools
from collections import Counter as Tally
from collections.abc import Iterable
from typing import Final, get_args

from prometheus_client import Counter, Gauge, Histogram

from schemas.inventory import Administrative, Availability, Operational, Personality

PERSONALITIES: Final = (*get_args(Personality), "none")
ADMINISTRATIVE: Final = get_args(Administrative)
OPERATIONAL: Final = get_args(Operational)
AVAILABILITY: Final = get_args(Availability)
OUTCOMES: Final = ("ok", "unreachable", "auth_failed", "unsupported", "busy", "error")
OPERATIONS: Final = ("check", "power", "action", "hardware")
COMMANDS: Final = ("add", "update", "delete", "lock", "unlock", "reboot", "reset", "power-on", "power-off",
                   "reinstall", "swact")

HOSTS = Gauge("roost_hosts", "Hosts by personality and state",
              ["personality", "administrative", "operational", "availability"])
HOST_COMMANDS = Counter("roost_host_commands", "Operator commands on hosts, by outcome", ["command", "outcome"])
BMC_SECONDS = Histogram("roost_bmc_request_seconds", "BMC calls, by operation and outcome",
                        ["operation", "outcome"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
BMC_FAILURES = Counter("roost_bmc_failures", "BMC calls that failed, by reason", ["reason"])

for _p, _a, _o, _v in itertools.product(PERSONALITIES, ADMINISTRATIVE, OPERATIONAL, AVAILABILITY):
    HOSTS.labels(_p, _a, _o, _v)
for _reason in OUTCOMES[1:]:
    BMC_FAILURES.labels(_reason)


def set_hosts(states: Iterable[tuple[str | None, str, str, str]]) -> None:
    """Set the gauge from (personality, administrative, operational, availability) per host; 0 elsewhere."""
    counts = Tally((p or "none", a, o, v) for p, a, o, v in states)
    for key in itertools.product(PERSONALITIES, ADMINISTRATIVE, OPERATIONAL, AVAILABILITY):
        HOSTS.labels(*key).set(counts.get(key, 0))


def record_command(command: str, accepted: bool) -> None:
    if command in COMMANDS:
        HOST_COMMANDS.labels(command, "accepted" if accepted else "rejected").inc()


def record_bmc(operation: str, outcome: str, seconds: float) -> None:
    if operation not in OPERATIONS or outcome not in OUTCOMES:
        raise ValueError(f"unknown BMC operation or outcome {operation!r} {outcome!r}")
    BMC_SECONDS.labels(operation, outcome).observe(seconds)
    if outcome != "ok":
        BMC_FAILURES.labels(outcome).inc()
