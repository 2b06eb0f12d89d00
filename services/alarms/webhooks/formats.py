"""What the alarms service hands over for every raise, change and clear, and how it is rendered; pure.

``Notification``: the event kind (``raised`` | ``changed`` | ``cleared``), a ``version`` that grows by one
per change of the alarm instance (receivers drop a version older than the last they saw), the time of
the event, an ``id`` (the ``webhook-id`` of every delivery of this notification, to every subscriber) and
the alarm's FM-shaped fields (``AlarmFields``, StarlingX FM's JSON names).

Two renderings, chosen per subscription:

* ``roost``: the Standard Webhooks recommended envelope
  ``{"type": "alarm.raised", "timestamp": ..., "data": {"id", "event", "version", "alarm": {FM fields}}}``;
* ``alertmanager``: Alertmanager's webhook payload version "4", one alert per notification, so an
  existing Alertmanager receiver works unchanged.  ``status`` is ``firing`` for a raise or change and
  ``resolved`` for a clear; ``endsAt`` is ``0001-01-01T00:00:00Z`` while firing.  Labels are
  ``alertname`` (``roost_<alarm_id>``), ``alarm_id``, ``entity_instance_id``, ``entity_type_id``,
  ``severity``, ``alarm_type``, ``probable_cause``, ``service_affecting``; annotations ``summary`` (the
  reason text), ``description`` (reason and repair action), ``proposed_repair_action``, ``uuid`` and
  ``version``.  The group is the alarm instance (``groupLabels``: alarm_id and entity_instance_id).
  ``fingerprint`` is 16 hex digits of SHA-256 over the instance identity, so it stays the same when
  the severity changes (Alertmanager hashes all labels with xxhash64; receivers only compare it).

Bodies are compact JSON with sorted keys: the exact bytes are rendered once at enqueue and signed at
every attempt.
"""

from __future__ import annotations

import hashlib
import json
import uuid as uuid_module
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

Severity = Literal["critical", "major", "minor", "warning"]
SEVERITIES: tuple[str, ...] = ("critical", "major", "minor", "warning")
ALERTMANAGER_ZERO_TIME = "0001-01-01T00:00:00Z"


class EventKind(StrEnum):
    RAISED = "raised"
    CHANGED = "changed"
    CLEARED = "cleared"


class Format(StrEnum):
    ROOST = "roost"
    ALERTMANAGER = "alertmanager"


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def rfc3339(value: datetime) -> str:
    """``2026-11-21T05:53:03.123456Z``: UTC with a ``Z``; pure."""
    return _utc(value).isoformat().replace("+00:00", "Z")


class AlarmFields(BaseModel):
    """The alarm as StarlingX FM shows it (same JSON names).  Built from any object with these attributes
    (``AlarmFields.model_validate(alarm, from_attributes=True)``); unknown attributes are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore", from_attributes=True)

    uuid: str
    alarm_id: str
    alarm_state: str = "set"
    entity_type_id: str = ""
    entity_instance_id: str
    timestamp: datetime
    severity: Severity
    reason_text: str = ""
    alarm_type: str = ""
    probable_cause: str = ""
    proposed_repair_action: str = ""
    service_affecting: bool = False
    suppression: bool = False
    suppression_status: str = "unsuppressed"
    inhibit_alarms: bool = False
    mgmt_affecting: str = ""
    degrade_affecting: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @field_validator("uuid", mode="before")
    @classmethod
    def _uuid_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, uuid_module.UUID) else value

    @field_validator("mgmt_affecting", "degrade_affecting", mode="before")
    @classmethod
    def _fm_flag_text(cls, value: Any) -> Any:
        """FM shows these as the strings "True" / "False"; a bool is accepted and written that way."""
        return str(value) if isinstance(value, bool) else value


class Notification(BaseModel):
    """One raise, change or clear of one alarm instance, for every matching subscriber."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(default_factory=lambda: "msg_" + uuid_module.uuid4().hex, pattern=r"^[A-Za-z0-9_\-]{1,200}$")
    event: EventKind
    version: int = Field(ge=1)
    occurred_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    alarm: AlarmFields

    @property
    def instance_key(self) -> str:
        """What orders deliveries: the alarm instance ``alarm_id|entity_instance_id``."""
        return f"{self.alarm.alarm_id}|{self.alarm.entity_instance_id}"

    @property
    def type(self) -> str:
        return f"alarm.{self.event.value}"


def dumps_body(payload: Any) -> bytes:
    """The exact body bytes of a payload: compact JSON, sorted keys, UTF-8, non-ASCII characters as they are;
    pure.  Written by orjson: the bytes of ``json.dumps(payload, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`` (tests/unit/test_webhook_body_bytes.py) in a tenth of the time, for every op.  A body
    holds no float; text with a lone surrogate (not UTF-8) is refused (``TypeError``).  A ``datetime`` in UTC
    (or naive, taken as UTC) is written as ``rfc3339`` writes it."""
    return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS | orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC)


def _alarm_json(alarm: AlarmFields) -> dict[str, Any]:
    data = alarm.model_dump(mode="json")
    for key in ("timestamp", "created_at", "updated_at"):
        value = getattr(alarm, key)
        data[key] = rfc3339(value) if value is not None else None
    return data


def roost_payload(notification: Notification) -> dict[str, Any]:
    return {
        "type": notification.type,
        "timestamp": rfc3339(notification.occurred_at),
        "data": {
            "id": notification.id,
            "event": notification.event.value,
            "version": notification.version,
            "alarm": _alarm_json(notification.alarm),
        },
    }


def fingerprint(alarm: AlarmFields) -> str:
    """16 hex digits identifying the alarm instance; pure."""
    return hashlib.sha256(f"{alarm.alarm_id}\x00{alarm.entity_instance_id}".encode()).hexdigest()[:16]


def _label_text(labels: dict[str, str]) -> str:
    return "{" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())) + "}"


def alertmanager_payload(notification: Notification, *, receiver: str, external_url: str = "") -> dict[str, Any]:
    alarm = notification.alarm
    firing = notification.event is not EventKind.CLEARED
    status = "firing" if firing else "resolved"
    labels = {
        "alertname": f"roost_{alarm.alarm_id}",
        "alarm_id": alarm.alarm_id,
        "entity_instance_id": alarm.entity_instance_id,
        "entity_type_id": alarm.entity_type_id,
        "severity": alarm.severity,
        "alarm_type": alarm.alarm_type,
        "probable_cause": alarm.probable_cause,
        "service_affecting": "true" if alarm.service_affecting else "false",
    }
    labels = {k: v for k, v in labels.items() if v != ""}
    description = alarm.reason_text
    if alarm.proposed_repair_action:
        description = f"{description} Repair: {alarm.proposed_repair_action}".strip()
    annotations = {
        "summary": alarm.reason_text,
        "description": description,
        "proposed_repair_action": alarm.proposed_repair_action,
        "uuid": alarm.uuid,
        "version": str(notification.version),
    }
    annotations = {k: v for k, v in annotations.items() if v != ""}
    group_labels = {"alarm_id": alarm.alarm_id, "entity_instance_id": alarm.entity_instance_id}
    base = external_url.rstrip("/")
    starts = alarm.created_at or alarm.timestamp
    return {
        "version": "4",
        "groupKey": f"{{}}:{_label_text(group_labels)}",
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": dict(labels),
        "commonAnnotations": dict(annotations),
        "externalURL": base,
        "alerts": [{
            "status": status,
            "labels": labels,
            "annotations": annotations,
            "startsAt": rfc3339(starts),
            "endsAt": ALERTMANAGER_ZERO_TIME if firing else rfc3339(notification.occurred_at),
            "generatorURL": f"{base}/v1/alarms/{alarm.uuid}" if base else "",
            "fingerprint": fingerprint(alarm),
        }],
    }


def render(notification: Notification, format: Format | str, *, receiver: str = "roost",
           external_url: str = "") -> bytes:
    """The exact body bytes for a subscriber of ``format``; pure."""
    kind = Format(format)
    if kind is Format.ALERTMANAGER:
        return dumps_body(alertmanager_payload(notification, receiver=receiver, external_url=external_url))
    return dumps_body(roost_payload(notification))
