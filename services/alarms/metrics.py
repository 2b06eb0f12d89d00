"""Prometheus metrics of fault management (conventions of ``services.core.metrics``).

* ``roost_alarm_sets_total{change}``: sets that wrote something, ``raised`` or ``changed`` (a set that
  changes nothing is not counted), counted after their transaction committed;
* ``roost_alarm_clears_total{cause}``: alarms cleared, by ``cleared`` (by a service), ``reasserted``
  (missing from its owner's re-assertion), ``entity_deleted`` or ``operator``;
* ``roost_alarm_logs_total``: customer logs recorded;
* ``roost_alarms_active{severity}``: active alarms by severity, refreshed from the database every few
  seconds.  Every replica reports the same (database-wide) number: aggregate with ``max``.

Labels are fixed sets; never alarm ids or entity ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from prometheus_client import Counter, Gauge

CHANGES: Final = ("raised", "changed")
CAUSES: Final = ("cleared", "reasserted", "entity_deleted", "operator")
SEVERITIES: Final = ("critical", "major", "minor", "warning")

SETS = Counter("roost_alarm_sets", "Alarm sets that raised or changed an alarm", ["change"])
CLEARS = Counter("roost_alarm_clears", "Alarms cleared, by cause", ["cause"])
LOGS = Counter("roost_alarm_logs", "Customer logs recorded")
ACTIVE = Gauge("roost_alarms_active", "Active alarms, by severity", ["severity"])

for _change in CHANGES:
    SETS.labels(_change)
for _cause in CAUSES:
    CLEARS.labels(_cause)
for _severity in SEVERITIES:
    ACTIVE.labels(_severity)


def record_set(change: str) -> None:
    if change not in CHANGES:
        raise ValueError(f"unknown alarm change {change!r}")
    SETS.labels(change).inc()


def record_clears(cause: str, count: int = 1) -> None:
    if cause not in CAUSES:
        raise ValueError(f"unknown clear cause {cause!r}")
    if count:
        CLEARS.labels(cause).inc(count)


def record_log() -> None:
    LOGS.inc()


def set_active(counts: Mapping[str, int]) -> None:
    """Set the gauge for every severity (0 for those absent from ``counts``)."""
    for severity in SEVERITIES:
        ACTIVE.labels(severity).set(counts.get(severity, 0))
