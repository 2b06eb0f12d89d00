"""Which alarms inventory raises and clears for a host, and its customer logs.  Pure.

Inventory owns these alarms (roost's catalogue, ``services/alarms/catalogue.yaml``):

* 950.001 host locked (warning; inhibits the suppressible alarms of the host and its children) while a
  provisioned host is locked;
* 950.002 host failed (critical) while a host's availability is ``failed``;
* 950.004 / 950.005 BMC unreachable / refusing the credentials, from the BMC audit (``bmc.audit``);
* 950.503 a customer log for every operator command on a host: who, what, the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.inventory.machine import HostState

HOST_LOCKED = "950.001"
HOST_FAILED = "950.002"
HOST_COMMAND_LOG = "950.503"
TEXT_MAX = 255


@dataclass(frozen=True, slots=True)
class FaultChange:
    """A ``roost.fault.set`` (``severity`` given) or ``roost.fault.clear`` (no severity) to publish."""

    type: str
    data: dict[str, Any]


def host_entity(hostname: str | None, uuid: str) -> str:
    return f"host={hostname or uuid}"


def _cut(text: str) -> str:
    return text if len(text) <= TEXT_MAX else text[:TEXT_MAX - 1] + "…"


def _set(alarm_id: str, entity: str, severity: str, reason: str) -> FaultChange:
    return FaultChange("roost.fault.set", {"alarm_id": alarm_id, "entity_instance_id": entity,
                                           "severity": severity, "reason_text": _cut(reason)})


def _clear(alarm_id: str, entity: str) -> FaultChange:
    return FaultChange("roost.fault.clear", {"alarm_id": alarm_id, "entity_instance_id": entity})


def is_locked_alarm(state: HostState) -> bool:
    return state.provisioned and state.administrative == "locked"


def is_failed_alarm(state: HostState) -> bool:
    return state.availability == "failed"


def host_alarms(state: HostState) -> list[FaultChange]:
    """The alarms a host in ``state`` has (for a re-assertion of everything inventory owns)."""
    return [c for c in transition(None, state) if c.type == "roost.fault.set"]


def transition(before: HostState | None, after: HostState | None) -> list[FaultChange]:
    """The alarms to raise and clear when a host goes from ``before`` to ``after`` (None: not there)."""
    changes: list[FaultChange] = []
    subject = after or before
    if subject is None:
        return changes
    entity = host_entity(subject.hostname, subject.uuid)
    was_locked = before is not None and is_locked_alarm(before)
    is_locked = after is not None and is_locked_alarm(after)
    if is_locked and not was_locked:
        changes.append(_set(HOST_LOCKED, entity, "warning", f"{subject.hostname} was administratively locked"))
    elif was_locked and not is_locked and after is not None:
        changes.append(_clear(HOST_LOCKED, entity))
    was_failed = before is not None and is_failed_alarm(before)
    is_failed = after is not None and is_failed_alarm(after)
    if is_failed and not was_failed:
        changes.append(_set(HOST_FAILED, entity, "critical",
                            f"{subject.hostname or subject.uuid} failed: heartbeat or in-test checks failed"))
    elif was_failed and not is_failed and after is not None:
        changes.append(_clear(HOST_FAILED, entity))
    return changes


def command_log(who: str, verb: str, hostname: str | None, uuid: str, result: str) -> FaultChange:
    """The customer log of an operator command on a host: who ran what, and how it ended."""
    entity = host_entity(hostname, uuid)
    return FaultChange("roost.fault.log", {"log_id": HOST_COMMAND_LOG, "entity_instance_id": entity,
                                           "severity": "warning",
                                           "reason_text": _cut(f"{who}: {verb} {hostname or uuid}: {result}")})
