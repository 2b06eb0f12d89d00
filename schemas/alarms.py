"""Messages of fault management (owner ``alarms``).

Inputs, published by any service (events, so they go through the publisher's transactional outbox; the
raising service is the envelope's ``source``, which the broker's permissions restrict):

* ``roost.fault.set``: raise an alarm, or re-raise it with another severity or reason;
* ``roost.fault.clear``: clear one alarm id (or every id) on exactly one entity, or with ``prefix`` on
  the entity and its children (``host=controller-1`` never matches ``host=controller-10``);
* ``roost.fault.log``: record a customer log (an operator command, an event worth keeping);
* ``roost.fault.reassert``: after a restart, the complete set of alarms a service has within its scope;
  the alarms service clears that owner's alarms in the scope that are not in the set.

Outputs, published by the alarms service (entity events: ``entity_id`` is the alarm instance's uuid, the
``version`` grows by one per raise, change and clear of that instance):

* ``roost.alarm.raised`` / ``roost.alarm.changed`` (with what changed, old -> new) /
  ``roost.alarm.cleared``, carrying the alarm in StarlingX FM's shape (same field names);
* ``roost.alarm.logged``: a customer log was recorded (``entity_id`` is the log record's uuid).

Operator commands, served by the alarms service: ``roost.cmd.alarm.list|show|summary|history`` (reader) and
``roost.cmd.alarm.clear|suppress|unsuppress`` (admin; each recorded as a customer log).

The field names are FM's.  What the catalogue says about an id (type, cause, repair action, flags) and
whether a severity fits it, or an entity id is well formed (``key=value[.key=value...]``), is checked
by the alarms service against its catalogue; a message that fails is dead-lettered with the reason.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.envelope import EntityEvent, Role
from schemas.registry import REGISTRY, Registry
from schemas.text import Clean

OWNER = "alarms"

TEXT_MAX = 255
"""FM's limit on ``reason_text`` and ``proposed_repair_action``."""
REASSERT_MAX = 10_000
"""The most alarms one re-assertion may carry."""

AlarmIdText = Annotated[str, Field(pattern=r"^[0-9]{3}\.[0-9]{3}$", description="GGG.EEE, e.g. 200.010")]
EntityInstanceIdText = Annotated[Clean, Field(min_length=1, max_length=255,
                                              description="key=value[.key=value...], e.g. host=controller-0")]
EntityTypeIdText = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
                                        description="the entity's keys, e.g. host.port")]
SeverityName = Literal["critical", "major", "minor", "warning"]
Text = Annotated[Clean, Field(max_length=TEXT_MAX)]
ShortText = Annotated[Clean, Field(min_length=1, max_length=64)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- inputs ----------------------------------------------------------------------------------------------


class FaultSet(_Model):
    """Raise an alarm on an entity, or re-raise it (same uuid) with a new severity or reason."""

    alarm_id: AlarmIdText
    entity_instance_id: EntityInstanceIdText
    severity: SeverityName
    reason_text: Text = ""
    entity_type_id: EntityTypeIdText | None = Field(default=None, description="default: the entity's keys")
    proposed_repair_action: Text | None = Field(default=None, description="default: the catalogue's text")
    alarm_type: ShortText | None = Field(default=None, description="one the catalogue lists; default its first")
    probable_cause: ShortText | None = Field(default=None, description="one the catalogue lists; default its first")
    timestamp: AwareDatetime | None = Field(default=None, description="when it was detected; default: when applied")


class FaultClear(_Model):
    """Clear ``alarm_id`` (none: every alarm id) on exactly ``entity_instance_id``, or with ``prefix`` on
    the entity and its children, by whole ``key=value`` segments."""

    alarm_id: AlarmIdText | None = None
    entity_instance_id: EntityInstanceIdText
    prefix: bool = False


class FaultLog(_Model):
    """Record a customer log: history only, no active state."""

    log_id: AlarmIdText
    entity_instance_id: EntityInstanceIdText
    severity: SeverityName
    reason_text: Text = ""
    entity_type_id: EntityTypeIdText | None = Field(default=None, description="default: the entity's keys")
    timestamp: AwareDatetime | None = Field(default=None, description="when it happened; default: when recorded")


class FaultReassert(_Model):
    """The whole set of alarms the sending service has now within ``scope`` (an entity and its children;
    none: everything it owns).  Its alarms in the scope that are not in ``alarms`` are cleared; an alarm
    outside the scope is refused."""

    scope: EntityInstanceIdText | None = None
    alarms: list[FaultSet] = Field(default_factory=list, max_length=REASSERT_MAX)


# -- outputs ---------------------------------------------------------------------------------------------


class AlarmRecord(_Model):
    """An alarm as StarlingX FM shows it (same field names)."""

    uuid: str = Field(min_length=1, max_length=64)
    alarm_id: AlarmIdText
    alarm_state: Literal["set", "clear"]
    entity_type_id: EntityTypeIdText
    entity_instance_id: EntityInstanceIdText
    timestamp: AwareDatetime
    severity: SeverityName
    reason_text: Text
    alarm_type: ShortText
    probable_cause: ShortText
    proposed_repair_action: Text
    service_affecting: bool
    suppression: bool
    inhibit_alarms: bool
    mgmt_affecting: bool
    degrade_affecting: bool
    created_at: AwareDatetime
    updated_at: AwareDatetime


class FieldChange(_Model):
    field: Literal["severity", "reason_text"]
    old: Text
    new: Text


class _AlarmEvent(EntityEvent):
    """``entity_id``: the alarm's uuid.  ``owner``: the service that raised it."""

    owner: str = Field(min_length=1, max_length=256)
    alarm: AlarmRecord


class AlarmRaised(_AlarmEvent):
    """A new active alarm (``version`` 1)."""


class AlarmChanged(_AlarmEvent):
    """An active alarm was re-raised with another severity or reason; same uuid."""

    changes: list[FieldChange] = Field(min_length=1, max_length=2)


class AlarmCleared(_AlarmEvent):
    """An active alarm was cleared; ``alarm`` is its last state, with ``alarm_state`` clear."""

    cause: Literal["cleared", "reasserted", "entity_deleted", "operator"] = Field(
        description="cleared by its raiser, missing from its owner's re-assertion, its entity was deleted, "
                    "or cleared by an operator")


class EventLogRecord(_Model):
    """A customer log as FM's event log shows it."""

    uuid: str = Field(min_length=1, max_length=64)
    event_log_id: AlarmIdText
    state: Literal["log"]
    entity_type_id: EntityTypeIdText
    entity_instance_id: EntityInstanceIdText
    timestamp: AwareDatetime
    severity: SeverityName
    reason_text: Text
    event_log_type: ShortText
    probable_cause: ShortText
    service_affecting: bool


class AlarmLogged(EntityEvent):
    """A customer log was recorded.  ``entity_id``: the log record's uuid (``version`` 1)."""

    owner: str = Field(min_length=1, max_length=256)
    log: EventLogRecord


# -- operator commands -----------------------------------------------------------------------------------


class ActiveAlarm(AlarmRecord):
    """An active alarm as ``roost alarm list|show`` shows it: FM's record, its operator suppression
    status, whether an inhibiting alarm masks it, the service that raised it and its version."""

    suppression_status: Literal["suppressed", "unsuppressed"]
    masked: bool
    owner: str = Field(min_length=1, max_length=256)
    version: int = Field(ge=1)


class AlarmList(_Model):
    """List the active alarms, most severe first.  Operator-suppressed ones only with ``include_suppress``;
    alarms masked by an inhibiting alarm (host locked) only with ``include_masked``."""

    include_suppress: bool = False
    include_masked: bool = False
    alarm_id: AlarmIdText | None = None
    severity: SeverityName | None = None
    entity_prefix: EntityInstanceIdText | None = Field(default=None,
                                                       description="this entity and its children (whole segments)")
    limit: int = Field(default=1000, ge=1, le=10_000)


class AlarmListResult(_Model):
    items: list[ActiveAlarm] = Field(default_factory=list, max_length=10_000)


class AlarmShow(_Model):
    """Show one active alarm by its uuid."""

    uuid: str = Field(min_length=1, max_length=64)


class AlarmSummary(_Model):
    """Count the active alarms by severity, as FM's summary does."""

    include_suppress: bool = False


class AlarmSummaryResult(_Model):
    critical: int = Field(ge=0)
    major: int = Field(ge=0)
    minor: int = Field(ge=0)
    warnings: int = Field(ge=0)
    status: Literal["OK", "degraded", "critical"]


class AlarmClear(_Model):
    """Clear one active alarm by its uuid (an operator's delete; recorded as a customer log)."""

    uuid: str = Field(min_length=1, max_length=64)


class AlarmClearResult(_Model):
    cleared: bool


class AlarmSuppress(_Model):
    """Suppress (or unsuppress) an alarm id: its alarms stay active and recorded, hidden from lists."""

    alarm_id: AlarmIdText


class AlarmSuppressResult(_Model):
    alarm_id: AlarmIdText
    suppression_status: Literal["suppressed", "unsuppressed"]


class AlarmHistory(_Model):
    """The event log, newest first: alarm records (set, change, clear) and/or customer logs.  Records of
    operator-suppressed ids only with ``include_suppress``.  ``marker``: the previous page's
    ``next_marker``."""

    alarms: bool = True
    logs: bool = True
    event_log_id: AlarmIdText | None = None
    entity_prefix: EntityInstanceIdText | None = Field(default=None,
                                                       description="this entity and its children (whole segments)")
    include_suppress: bool = False
    marker: int | None = Field(default=None, ge=1)
    limit: int = Field(default=100, ge=1, le=1000)


class EventLogEntry(_Model):
    """One history record: FM's event log fields, and what roost adds (what changed, why it cleared,
    the alarm instance, the raising service, the alarm's version)."""

    uuid: str = Field(min_length=1, max_length=64)
    event_log_id: AlarmIdText
    state: Literal["set", "clear", "log"]
    entity_type_id: EntityTypeIdText
    entity_instance_id: EntityInstanceIdText
    timestamp: AwareDatetime
    severity: SeverityName
    reason_text: Text
    event_log_type: ShortText
    probable_cause: ShortText
    proposed_repair_action: Text
    service_affecting: bool
    suppression: bool
    change: Literal["raised", "changed", "cleared", "logged"]
    changes: list[FieldChange] = Field(default_factory=list, max_length=2)
    cause: Literal["cleared", "reasserted", "entity_deleted", "operator"] | None = None
    alarm_uuid: str | None = Field(default=None, max_length=64)
    owner: str = Field(min_length=1, max_length=256)
    version: int | None = Field(default=None, ge=1)


class AlarmHistoryResult(_Model):
    items: list[EventLogEntry] = Field(default_factory=list, max_length=1000)
    next_marker: int | None = Field(default=None, description="pass as marker for the next (older) page")


# -- webhook subscribers (operator commands) ------------------------------------------------------------


class WebhookAdd(_Model):
    """Register a webhook subscriber: every raise, change and clear that matches its filters reaches it,
    signed per Standard Webhooks with the secret this command returns once."""

    url: str = Field(min_length=8, max_length=2048, pattern=r"^https?://", description="http:// or https://")
    name: str | None = Field(default=None, min_length=1, max_length=128)
    severities: list[SeverityName] = Field(default_factory=list, max_length=4, description="none: every severity")
    alarm_ids: list[AlarmIdText] = Field(default_factory=list, max_length=1000, description="none: every id")
    entity_prefix: EntityInstanceIdText | None = Field(default=None, description="this entity and its children")
    format: Literal["roost", "alertmanager"] = "roost"
    max_age_seconds: float = Field(default=86_400.0, gt=0, le=30 * 86_400.0,
                                   description="retry this long, then dead-letter")


class WebhookSubscriber(_Model):
    """A subscriber as lists show it: never its secrets, a password in its URL masked."""

    id: str = Field(min_length=1, max_length=64)
    name: str = Field(max_length=128)
    url: str = Field(max_length=2048)
    format: Literal["roost", "alertmanager"]
    severities: list[str] = Field(max_length=4)
    alarm_ids: list[str] = Field(max_length=1000)
    entity_prefix: str | None = Field(default=None, max_length=255)
    max_age_seconds: float
    failing: bool
    failing_reason: str | None = Field(default=None, max_length=1000)
    pending: int = Field(ge=0, description="deliveries waiting in its queue")
    created_at: AwareDatetime


class WebhookAdded(_Model):
    subscriber: WebhookSubscriber
    secret: str = Field(min_length=1, max_length=256, description="whsec_…: shown in this reply only")


class WebhookList(_Model):
    """List webhook subscribers (never their secrets)."""


class WebhookListResult(_Model):
    items: list[WebhookSubscriber] = Field(default_factory=list, max_length=10_000)


class WebhookRemove(_Model):
    """Remove a subscriber and its queued deliveries."""

    id: str = Field(min_length=1, max_length=64)


class WebhookRemoved(_Model):
    removed: bool


class WebhookReplay(_Model):
    """Queue a subscriber's dead-lettered deliveries again (same webhook-id)."""

    id: str = Field(min_length=1, max_length=64)


class WebhookReplayed(_Model):
    replayed: int = Field(ge=0)


def register(registry: Registry) -> None:
    """Register alarms' messages in ``registry`` (done for ``REGISTRY`` when this module is imported)."""
    registry.event("roost.fault.set", OWNER, FaultSet, "Raise or re-raise an alarm (any service)")
    registry.event("roost.fault.clear", OWNER, FaultClear, "Clear an alarm, exactly or by entity prefix (any service)")
    registry.event("roost.fault.log", OWNER, FaultLog, "Record a customer log (any service)")
    registry.event("roost.fault.reassert", OWNER, FaultReassert,
                   "A service's complete current set of alarms in its scope (after a restart)")
    registry.event("roost.alarm.raised", OWNER, AlarmRaised, "An alarm was raised")
    registry.event("roost.alarm.changed", OWNER, AlarmChanged, "An active alarm changed severity or reason")
    registry.event("roost.alarm.cleared", OWNER, AlarmCleared, "An alarm was cleared")
    registry.event("roost.alarm.logged", OWNER, AlarmLogged, "A customer log was recorded")
    registry.command("roost.cmd.alarm.list", OWNER, AlarmList, "List the active alarms",
                     min_role=Role.READER, result_model=AlarmListResult)
    registry.command("roost.cmd.alarm.show", OWNER, AlarmShow, "Show one active alarm",
                     min_role=Role.READER, result_model=ActiveAlarm)
    registry.command("roost.cmd.alarm.summary", OWNER, AlarmSummary, "Count the active alarms by severity",
                     min_role=Role.READER, result_model=AlarmSummaryResult)
    registry.command("roost.cmd.alarm.history", OWNER, AlarmHistory, "List the event log (alarm history, logs)",
                     min_role=Role.READER, result_model=AlarmHistoryResult)
    registry.command("roost.cmd.alarm.clear", OWNER, AlarmClear, "Clear one active alarm (operator)",
                     min_role=Role.ADMIN, result_model=AlarmClearResult)
    registry.command("roost.cmd.alarm.suppress", OWNER, AlarmSuppress, "Suppress an alarm id",
                     min_role=Role.ADMIN, result_model=AlarmSuppressResult)
    registry.command("roost.cmd.alarm.unsuppress", OWNER, AlarmSuppress, "Unsuppress an alarm id",
                     min_role=Role.ADMIN, result_model=AlarmSuppressResult)
    registry.command("roost.cmd.alarm.webhook.add", OWNER, WebhookAdd, "Register a webhook subscriber",
                     min_role=Role.ADMIN, result_model=WebhookAdded, reply_has_secrets=True)
    registry.command("roost.cmd.alarm.webhook.list", OWNER, WebhookList, "List webhook subscribers",
                     min_role=Role.ADMIN, result_model=WebhookListResult)
    registry.command("roost.cmd.alarm.webhook.remove", OWNER, WebhookRemove, "Remove a webhook subscriber",
                     min_role=Role.ADMIN, result_model=WebhookRemoved)
    registry.command("roost.cmd.alarm.webhook.replay", OWNER, WebhookReplay,
                     "Queue a subscriber's dead-lettered deliveries again", min_role=Role.ADMIN,
                     result_model=WebhookReplayed)


register(REGISTRY)
