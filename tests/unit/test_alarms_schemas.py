"""The alarms contract: fault inputs any service publishes, alarm events the alarms service announces."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from schemas.alarms import (
    AlarmChanged,
    AlarmCleared,
    AlarmRaised,
    FaultClear,
    FaultReassert,
    FaultSet,
)
from schemas.catalog import load
from schemas.envelope import EntityEvent, Envelope
from schemas.registry import InvalidMessage, MessageKind

NOW = datetime(2026, 11, 21, 6, 0, tzinfo=UTC)

RECORD: dict[str, Any] = {
    "uuid": "5f0c2a57-8a3b-4c1e-9d55-1b2a3c4d5e6f", "alarm_id": "950.001", "alarm_state": "set",
    "entity_type_id": "host", "entity_instance_id": "host=controller-0", "timestamp": NOW,
    "severity": "warning", "reason_text": "locked", "alarm_type": "operational-violation",
    "probable_cause": "out-of-service", "proposed_repair_action": "Unlock it", "service_affecting": True,
    "suppression": False, "inhibit_alarms": True, "mgmt_affecting": True, "degrade_affecting": False,
    "created_at": NOW, "updated_at": NOW,
}


@pytest.mark.parametrize("name", ["roost.fault.set", "roost.fault.clear", "roost.fault.log", "roost.fault.reassert",
                                  "roost.alarm.raised", "roost.alarm.changed", "roost.alarm.cleared",
                                  "roost.alarm.logged"])
def test_every_alarm_message_is_an_event_owned_by_alarms(name: str) -> None:
    spec = load().get(name)
    assert spec.owner == "alarms"
    assert spec.kind is MessageKind.EVENT
    assert spec.entity_event is name.startswith("roost.alarm.")


def test_outputs_are_entity_events() -> None:
    for model in (AlarmRaised, AlarmChanged, AlarmCleared):
        assert issubclass(model, EntityEvent)


def test_a_set_with_the_fm_fields() -> None:
    fault = FaultSet(alarm_id="200.010", entity_instance_id="host=controller-0", severity="major",
                     reason_text="x" * 255, timestamp=NOW)
    assert fault.entity_type_id is None and fault.proposed_repair_action is None


@pytest.mark.parametrize(("data", "field"), [
    ({"alarm_id": "200.01", "entity_instance_id": "host=a", "severity": "major"}, "alarm_id"),
    ({"alarm_id": "200.010", "entity_instance_id": "host=a", "severity": "fatal"}, "severity"),
    ({"alarm_id": "200.010", "entity_instance_id": "host=a", "severity": "major", "reason_text": "x" * 256},
     "reason_text"),
    ({"alarm_id": "200.010", "entity_instance_id": "", "severity": "major"}, "entity_instance_id"),
    ({"alarm_id": "200.010", "entity_instance_id": "host=a", "severity": "major", "colour": "red"}, "colour"),
    ({"alarm_id": "200.010", "entity_instance_id": "host=a", "severity": "major",
      "timestamp": "2026-11-21T06:00:00"},
     "timestamp"),
])
def test_a_bad_set_is_refused_naming_the_field(data: dict[str, Any], field: str) -> None:
    registry = load()
    with pytest.raises(InvalidMessage, match=field):
        registry.validate(Envelope(type="roost.fault.set", source="roost/inventory", data=data))


def test_clear_is_exact_unless_asked() -> None:
    assert FaultClear(entity_instance_id="host=controller-1").prefix is False
    assert FaultClear(entity_instance_id="host=controller-1").alarm_id is None


def test_reassert_carries_a_scope_and_the_whole_set() -> None:
    message = FaultReassert.model_validate({"scope": "host=controller-0", "alarms": [
        {"alarm_id": "950.003", "entity_instance_id": "host=controller-0.network=mgmt", "severity": "major"}]})
    assert message.alarms[0].alarm_id == "950.003"
    assert FaultReassert().alarms == [] and FaultReassert().scope is None


def test_alarm_events_carry_the_fm_record() -> None:
    raised = AlarmRaised(entity_id=RECORD["uuid"], version=1, owner="roost/inventory", alarm=RECORD)
    assert raised.alarm.mgmt_affecting is True
    changed = AlarmChanged.model_validate({"entity_id": RECORD["uuid"], "version": 2, "owner": "roost/inventory",
                                           "alarm": RECORD,
                                           "changes": [{"field": "severity", "old": "minor", "new": "major"}]})
    assert changed.changes[0].new == "major"
    with pytest.raises(ValueError, match="changes"):
        AlarmChanged(entity_id=RECORD["uuid"], version=2, owner="roost/inventory", alarm=RECORD, changes=[])
    cleared = AlarmCleared(entity_id=RECORD["uuid"], version=3, owner="roost/inventory",
                           alarm={**RECORD, "alarm_state": "clear"}, cause="reasserted")
    assert cleared.alarm.alarm_state == "clear"


@pytest.mark.parametrize(("name", "data"), [
    ("roost.fault.set", {"alarm_id": "950.003", "entity_instance_id": "host=a.network=mgmt", "severity": "major",
                         "reason_text": "lost\x00"}),
    ("roost.fault.set", {"alarm_id": "950.003", "entity_instance_id": "host=a\x00.network=mgmt", "severity": "major"}),
    ("roost.fault.set", {"alarm_id": "950.003", "entity_instance_id": "host=a.network=mgmt", "severity": "major",
                         "proposed_repair_action": "\x00"}),
    ("roost.fault.clear", {"alarm_id": "950.003", "entity_instance_id": "host=a\x00"}),
    ("roost.fault.log", {"log_id": "950.501", "entity_instance_id": "host=a", "severity": "warning",
                         "reason_text": "x\x00y"}),
])
def test_a_nul_character_is_refused_with_the_reason(name: str, data: dict[str, Any]) -> None:
    """PostgreSQL's text cannot hold NUL: the message is refused at once (dead-lettered with the reason by
    the bus), not failed at the database attempt after attempt."""
    registry = load()
    envelope = Envelope(source="roost/heartbeat", type=name, data=data)
    with pytest.raises(InvalidMessage, match="NUL character"):
        registry.validate(envelope)
