"""Notification rendering: roost's JSON and the Alertmanager webhook v4 payload; filters."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from services.alarms.webhooks.formats import (
    AlarmFields,
    EventKind,
    Format,
    Notification,
    alertmanager_payload,
    fingerprint,
    render,
)
from services.alarms.webhooks.store import Filters, entity_matches

T0 = datetime(2026, 11, 21, 5, 0, 0, tzinfo=UTC)
T1 = datetime(2026, 11, 21, 5, 30, 0, tzinfo=UTC)
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


def alarm(**changes: Any) -> AlarmFields:
    fields: dict[str, Any] = {
        "uuid": "0d5d7c2e-6a0d-4c54-9d59-3a8a1f2c9c11", "alarm_id": "200.004", "alarm_state": "set",
        "entity_type_id": "host", "entity_instance_id": "host=controller-1", "timestamp": T0,
        "severity": "critical", "reason_text": "controller-1 experienced a service-affecting failure.",
        "alarm_type": "processing-error", "probable_cause": "unspecified-reason",
        "proposed_repair_action": "If problem persists contact next level of support.",
        "service_affecting": True, "created_at": T0}
    fields.update(changes)
    return AlarmFields.model_validate(fields)


def note(event: EventKind = EventKind.RAISED, version: int = 1, **changes: Any) -> Notification:
    return Notification(event=event, version=version, occurred_at=T1, alarm=alarm(**changes))


def test_roost_json() -> None:
    n = note()
    body = json.loads(render(n, Format.ROOST))
    assert body["type"] == "alarm.raised"
    assert body["timestamp"] == "2026-11-21T05:30:00Z"
    assert body["data"]["id"] == n.id and body["data"]["event"] == "raised" and body["data"]["version"] == 1
    a = body["data"]["alarm"]
    assert a["alarm_id"] == "200.004" and a["entity_instance_id"] == "host=controller-1"
    assert a["severity"] == "critical" and a["timestamp"] == "2026-11-21T05:00:00Z"
    assert a["proposed_repair_action"].startswith("If problem")
    assert render(n, "roost") == render(n, Format.ROOST)  # the same bytes every time


def validate_alertmanager_v4(payload: dict[str, Any]) -> None:
    """The documented shape of Alertmanager's webhook payload (docs/configuration.md, version 4)."""
    assert set(payload) >= {"version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels",
                            "commonLabels", "commonAnnotations", "externalURL", "alerts"}
    assert payload["version"] == "4"
    assert isinstance(payload["groupKey"], str) and isinstance(payload["truncatedAlerts"], int)
    assert payload["status"] in ("firing", "resolved")
    for key in ("groupLabels", "commonLabels", "commonAnnotations"):
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in payload[key].items())
    assert isinstance(payload["alerts"], list) and payload["alerts"]
    for a in payload["alerts"]:
        assert set(a) == {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
        assert a["status"] in ("firing", "resolved")
        assert "alertname" in a["labels"]
        assert all(isinstance(v, str) for v in {**a["labels"], **a["annotations"]}.values())
        assert RFC3339.match(a["startsAt"]) and RFC3339.match(a["endsAt"])
        assert re.fullmatch(r"[0-9a-f]{16}", a["fingerprint"])
        assert isinstance(a["generatorURL"], str)


def test_alertmanager_firing() -> None:
    payload = json.loads(render(note(), Format.ALERTMANAGER, receiver="ops", external_url="https://roost:8443/"))
    validate_alertmanager_v4(payload)
    assert payload["status"] == "firing" and payload["receiver"] == "ops"
    assert payload["externalURL"] == "https://roost:8443"
    alert = payload["alerts"][0]
    assert alert["endsAt"] == "0001-01-01T00:00:00Z"
    assert alert["startsAt"] == "2026-11-21T05:00:00Z"
    assert alert["labels"]["alertname"] == "roost_200.004"
    assert alert["labels"]["severity"] == "critical"
    assert alert["labels"]["alarm_id"] == "200.004"
    assert alert["labels"]["entity_instance_id"] == "host=controller-1"
    assert alert["annotations"]["summary"].startswith("controller-1 experienced")
    assert "Repair:" in alert["annotations"]["description"]
    assert alert["generatorURL"] == "https://roost:8443/v1/alarms/0d5d7c2e-6a0d-4c54-9d59-3a8a1f2c9c11"
    assert payload["groupLabels"] == {"alarm_id": "200.004", "entity_instance_id": "host=controller-1"}
    assert payload["groupKey"] == '{}:{alarm_id="200.004",entity_instance_id="host=controller-1"}'
    assert payload["commonLabels"] == alert["labels"]


def test_alertmanager_resolved_and_stable_fingerprint() -> None:
    raised = alertmanager_payload(note(), receiver="r")
    changed = alertmanager_payload(note(EventKind.CHANGED, 2, severity="major"), receiver="r")
    cleared = alertmanager_payload(note(EventKind.CLEARED, 3, alarm_state="clear"), receiver="r")
    for p in (raised, changed, cleared):
        validate_alertmanager_v4(p)
    assert changed["status"] == "firing" and changed["alerts"][0]["labels"]["severity"] == "major"
    assert cleared["status"] == "resolved" and cleared["alerts"][0]["endsAt"] == "2026-11-21T05:30:00Z"
    prints = {p["alerts"][0]["fingerprint"] for p in (raised, changed, cleared)}
    assert prints == {fingerprint(alarm())}
    assert fingerprint(alarm(entity_instance_id="host=controller-10")) not in prints
    assert raised["alerts"][0]["generatorURL"] == ""


def test_notification_validation() -> None:
    with pytest.raises(ValidationError):
        note(severity="fatal")
    with pytest.raises(ValidationError):
        note(version=0)
    with pytest.raises(ValidationError):
        Notification(id="msg.1", event=EventKind.RAISED, version=1, alarm=alarm())
    n = note(uuid=uuid.UUID("0d5d7c2e-6a0d-4c54-9d59-3a8a1f2c9c11"))
    assert n.alarm.uuid == "0d5d7c2e-6a0d-4c54-9d59-3a8a1f2c9c11"
    assert n.instance_key == "200.004|host=controller-1" and n.type == "alarm.raised"
    assert n.id.startswith("msg_") and note().id != note().id


def test_from_attributes() -> None:
    class Row:
        def __init__(self) -> None:
            self.uuid = uuid.uuid4()
            self.alarm_id = "100.101"
            self.entity_instance_id = "host=compute-0"
            self.timestamp = T0
            self.severity = "minor"
            self.mgmt_affecting = True
            self.something_else = 1

    fields = AlarmFields.model_validate(Row(), from_attributes=True)
    assert fields.alarm_id == "100.101" and fields.severity == "minor"
    assert fields.mgmt_affecting == "True" and fields.degrade_affecting == ""


@pytest.mark.parametrize(("prefix", "entity", "expected"), [
    ("host=controller-1", "host=controller-1", True),
    ("host=controller-1", "host=controller-1.port=x", True),
    ("host=controller-1", "host=controller-10", False),
    ("host=controller-1", "host=controller-10.port=x", False),
    ("host=controller-1.port=x", "host=controller-1", False),
    (None, "anything", True),
])
def test_entity_prefix_segments(prefix: str | None, entity: str, expected: bool) -> None:
    assert entity_matches(prefix, entity) is expected


def test_filters() -> None:
    n = note()
    assert Filters().matches(n)
    assert Filters(severities=frozenset({"critical", "major"})).matches(n)
    assert not Filters(severities=frozenset({"minor"})).matches(n)
    assert Filters(alarm_ids=frozenset({"200.004"})).matches(n)
    assert not Filters(alarm_ids=frozenset({"200.001"})).matches(n)
    assert Filters(entity_prefix="host=controller-1").matches(n)
    assert not Filters(entity_prefix="host=controller-10").matches(n)
    assert not Filters(severities=frozenset({"critical"}), alarm_ids=frozenset({"1.1"})).matches(n)
