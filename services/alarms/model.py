"""Alarm instances and what a set, a clear or a re-assertion does to them: pure, no I/O.

An alarm instance is identified by ``(alarm_id, entity_instance_id)``.  The record (:class:`Alarm`)
has FM's field names, so the REST layer can serve it in FM's shape.  Where FM is weak this module
decides otherwise (``../shared/reference/fm-alarms.md`` §1.4-1.5, §8):

* **Entity ids are parsed**, not compared as strings: ``key=value`` segments joined by dots, keys and
  values non-empty, no empty segment (a leading, trailing or doubled dot is an error).  One allowance:
  a segment made only of digits continues the previous value, so an IPv4 address or an alarm id can be
  a value (``host=controller-0.ntp=10.0.0.1`` is two segments).
* **Clear is exact** unless a prefix clear is asked for explicitly; a prefix matches whole segments,
  so clearing ``host=controller-1`` never touches ``host=controller-10``.
* **A re-set keeps the uuid** and ``created_at``, and says what changed (old -> new).  The same severity
  and reason again is *no change*: nothing to write, nobody to notify.
* **Masking is computed**, from the active alarms and the catalogue, so it is right after any set or
  clear (FM stores a ``masked`` flag that a re-set resets).

Every function takes the current state and returns a decision; the caller applies it in its
transaction.
"""

from __future__ import annotations

import functools
import re
import uuid as uuidlib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Final, NamedTuple

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field

from services.alarms.catalogue import (
    ALARM_ID_PATTERN,
    AlarmError,
    AlarmType,
    Catalogue,
    EventDefinition,
    ProbableCause,
    Severity,
    UnknownAlarmId,
    normalise_alarm_id,
)

REASON_MAX: Final = 255
"""FM's limit on ``reason_text`` and ``proposed_repair_action``."""
ENTITY_ID_MAX: Final = 255
"""Longest ``entity_instance_id`` / ``entity_type_id`` (FM's column width)."""

_KEY: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_DIGITS: Final = re.compile(r"^[0-9]+$")


class MalformedEntityId(AlarmError):
    """An ``entity_instance_id`` that is not ``key=value[.key=value...]``."""


class InvalidSeverity(AlarmError):
    """A severity the catalogue does not allow for that alarm id."""


# -- entity instance ids --------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class EntityInstanceId:
    """A parsed entity instance id: ``host=controller-0.port=eth0`` is ``(("host", "controller-0"),
    ("port", "eth0"))``.  ``str()`` gives the text back exactly."""

    segments: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str) -> EntityInstanceId:
        """The parsed id, or ``MalformedEntityId`` saying why not.  Parsed once per text, then remembered (a
        bounded cache: the instances are immutable, and an alarm's entity is parsed several times per message,
        by the request's validation, the batch, the decision)."""
        if not isinstance(text, str):
            raise MalformedEntityId(f"entity_instance_id must be a string, not {type(text).__name__}")
        return _parse_entity(text)

    @classmethod
    def _parse(cls, text: str) -> EntityInstanceId:
        if not text:
            raise MalformedEntityId("entity_instance_id is empty")
        if len(text) > ENTITY_ID_MAX:
            raise MalformedEntityId(f"entity_instance_id is longer than {ENTITY_ID_MAX} characters")
        if _CONTROL.search(text):
            raise MalformedEntityId(f"entity_instance_id {text!r} holds a control character")
        segments: list[tuple[str, str]] = []
        for part in text.split("."):
            if not part:
                raise MalformedEntityId(f"entity_instance_id {text!r} has a stray dot (an empty segment)")
            if "=" not in part:
                if segments and _DIGITS.match(part):          # 10.0.0.1: a dotted value goes on
                    key, value = segments[-1]
                    segments[-1] = (key, f"{value}.{part}")
                    continue
                raise MalformedEntityId(f"entity_instance_id {text!r}: segment {part!r} is not key=value")
            key, value = part.split("=", 1)
            if not key or not value:
                raise MalformedEntityId(f"entity_instance_id {text!r}: segment {part!r} has an empty "
                                        f"{'key' if not key else 'value'}")
            if "=" in value:
                raise MalformedEntityId(f"entity_instance_id {text!r}: segment {part!r} has two '='")
            if not _KEY.match(key):
                raise MalformedEntityId(f"entity_instance_id {text!r}: key {key!r} must be letters, digits, "
                                        f"'_' or '-'")
            if value != value.strip():
                raise MalformedEntityId(f"entity_instance_id {text!r}: value {value!r} has surrounding spaces")
            segments.append((key, value))
        return cls(tuple(segments))

    def __str__(self) -> str:
        return ".".join(f"{k}={v}" for k, v in self.segments)

    @functools.cached_property
    def entity_type_id(self) -> str:
        """The keys, dot-joined: ``host.port`` for ``host=controller-0.port=eth0``."""
        return ".".join(k for k, _ in self.segments)

    @property
    def parent(self) -> EntityInstanceId | None:
        return EntityInstanceId(self.segments[:-1]) if len(self.segments) > 1 else None

    def is_prefix_of(self, other: EntityInstanceId) -> bool:
        """True when ``other`` is this entity or one of its children, by whole segments."""
        return other.segments[:len(self.segments)] == self.segments

    def matches(self, other: EntityInstanceId, *, prefix: bool = False) -> bool:
        """Exact equality, or (``prefix=True``) this entity or a child of it."""
        return self.is_prefix_of(other) if prefix else self == other


@functools.lru_cache(maxsize=8192)
def _parse_entity(text: str) -> EntityInstanceId:
    return EntityInstanceId._parse(text)


@functools.lru_cache(maxsize=8192)
def _entity_text(value: str) -> str:
    return str(EntityInstanceId.parse(value))


AlarmId = Annotated[str, BeforeValidator(normalise_alarm_id), Field(pattern=ALARM_ID_PATTERN,
                                                                      description="GGG.EEE, e.g. 200.010")]
EntityId = Annotated[str, AfterValidator(_entity_text),
                     Field(min_length=1, max_length=ENTITY_ID_MAX, description="key=value[.key=value...]")]
EntityTypeId = Annotated[str, Field(min_length=1, max_length=ENTITY_ID_MAX,
                                    pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
                                    description="the entity's keys, e.g. host.port")]
ReasonText = Annotated[str, Field(max_length=REASON_MAX)]


class AlarmKey(NamedTuple):
    """What identifies an alarm instance."""

    alarm_id: str
    entity_instance_id: str


class AlarmState(StrEnum):
    SET = "set"
    CLEAR = "clear"
    MSG = "msg"
    LOG = "log"


# -- records and requests -------------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Alarm(_Frozen):
    """An active alarm as FM records it (same field names)."""

    uuid: uuidlib.UUID = Field(description="stable for the life of the alarm instance (FM mints one per set)")
    alarm_id: AlarmId
    alarm_state: AlarmState = AlarmState.SET
    entity_type_id: EntityTypeId
    entity_instance_id: EntityId
    timestamp: AwareDatetime = Field(description="when it was raised or last changed")
    severity: Severity
    reason_text: ReasonText = ""
    alarm_type: AlarmType
    probable_cause: ProbableCause
    proposed_repair_action: ReasonText = ""
    service_affecting: bool = False
    suppression: bool = Field(default=False, description="may be masked by an inhibiting alarm")
    inhibit_alarms: bool = Field(default=False, description="masks the suppressible alarms of its entity tree")
    mgmt_affecting: bool = False
    degrade_affecting: bool = False
    created_at: AwareDatetime = Field(description="first raised (kept across re-sets)")
    updated_at: AwareDatetime = Field(description="last written")

    @property
    def key(self) -> AlarmKey:
        return AlarmKey(self.alarm_id, self.entity_instance_id)

    @property
    def entity(self) -> EntityInstanceId:
        return EntityInstanceId.parse(self.entity_instance_id)


class SetRequest(_Frozen):
    """Raise (or re-raise) an alarm.  What the catalogue defines (type, cause, repair action, flags)
    comes from the catalogue; a request may pick among the types and causes the entry lists."""

    alarm_id: AlarmId
    entity_instance_id: EntityId
    severity: Severity
    reason_text: ReasonText = ""
    entity_type_id: EntityTypeId | None = Field(default=None, description="default: the entity's keys")
    alarm_type: AlarmType | None = None
    probable_cause: ProbableCause | None = None
    timestamp: AwareDatetime | None = Field(default=None, description="default: now")

    @property
    def key(self) -> AlarmKey:
        return AlarmKey(self.alarm_id, self.entity_instance_id)


class ClearRequest(_Frozen):
    """Clear one alarm (exact entity), or with ``prefix`` the alarms of an entity and its children;
    without ``alarm_id``, every alarm id (a deleted host's alarms)."""

    alarm_id: AlarmId | None = None
    entity_instance_id: EntityId
    prefix: bool = False


class LogRequest(_Frozen):
    """Record a customer log (an operator's command, an event worth keeping): no state, only history."""

    log_id: AlarmId
    entity_instance_id: EntityId
    severity: Severity
    reason_text: ReasonText = ""
    entity_type_id: EntityTypeId | None = Field(default=None, description="default: the entity's keys")
    timestamp: AwareDatetime | None = Field(default=None, description="default: now")


def check_log(request: LogRequest, catalogue: Catalogue) -> EventDefinition:
    """The log's definition, once the request is known to fit it: a ``Log`` id the catalogue has and a
    severity it allows.  Raises an :class:`AlarmError` otherwise."""
    definition = catalogue.log(request.log_id)
    if not definition.allows(request.severity):
        allowed = ", ".join(s.value for s in definition.severities)
        raise InvalidSeverity(f"log {definition.id} is recorded as {allowed}, not {request.severity.value}")
    return definition


# -- decisions --------------------------------------------------------------------------------------------


class Change(StrEnum):
    RAISED = "raised"
    CHANGED = "changed"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class FieldChange:
    field: str
    old: str
    new: str


@dataclass(frozen=True)
class SetOutcome:
    """What a set does: ``alarm`` is the record to store (the current one when unchanged)."""

    change: Change
    alarm: Alarm
    previous: Alarm | None = None
    changes: tuple[FieldChange, ...] = ()

    @property
    def writes(self) -> bool:
        """Something to store, record in history and notify."""
        return self.change is not Change.UNCHANGED


@dataclass(frozen=True)
class ClearOutcome:
    """The active alarms a clear removes (as they were), in key order."""

    cleared: tuple[Alarm, ...]

    @property
    def found(self) -> bool:
        return bool(self.cleared)


class Reassertion(NamedTuple):
    """What an owner's re-assertion does: the sets that change something, the alarms it no longer has."""

    to_set: tuple[SetRequest, ...]
    to_clear: tuple[AlarmKey, ...]


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must carry a timezone")
    return now


def _cut(text: str | None) -> str:
    if not text:
        return ""
    return text if len(text) <= REASON_MAX else text[:REASON_MAX - 1] + "…"


def check_set(request: SetRequest, catalogue: Catalogue) -> EventDefinition:
    """The alarm's definition, once the request is known to fit it: an alarm id (not a log) the catalogue
    has, a severity it allows, a type and cause it lists.  Raises an :class:`AlarmError` otherwise."""
    definition = catalogue.alarm(request.alarm_id)
    if not definition.allows(request.severity):
        allowed = ", ".join(s.value for s in definition.severities)
        raise InvalidSeverity(f"alarm {definition.id} may be raised as {allowed}, not {request.severity.value}")
    if request.alarm_type is not None and request.alarm_type not in definition.alarm_types:
        raise AlarmError(f"alarm {definition.id} has alarm_type "
                         f"{' or '.join(t.value for t in definition.alarm_types)}, not {request.alarm_type.value}")
    if request.probable_cause is not None and request.probable_cause not in definition.probable_causes:
        raise AlarmError(f"alarm {definition.id} has probable_cause "
                         f"{' or '.join(definition.probable_causes)}, not {request.probable_cause}")
    return definition


def decide_set(current: Alarm | None, request: SetRequest, catalogue: Catalogue, now: datetime, *,
               new_uuid: Callable[[], uuidlib.UUID] = uuidlib.uuid4) -> SetOutcome:
    """What setting ``request`` does, given the active alarm with the same key (or None).

    New: raised, with a new uuid.  Same severity and reason: unchanged.  Otherwise changed: the uuid
    and ``created_at`` are kept, the severity-dependent fields are recomputed, and ``changes`` records
    old -> new.
    """
    _aware(now)
    definition = check_set(request, catalogue)
    if current is not None and current.key != request.key:
        raise ValueError(f"current alarm {current.key} is not the one requested {request.key}")
    if current is not None and current.alarm_state is not AlarmState.SET:
        raise ValueError(f"current alarm {current.key} is {current.alarm_state.value}, not an active alarm")
    if current is not None and current.severity is request.severity and current.reason_text == request.reason_text:
        return SetOutcome(Change.UNCHANGED, current)
    severity = request.severity
    # Constructed, not validated again: every value is the validated request's, the loaded catalogue's or
    # derived from them (the entity's keys, a text cut to FM's limit), so the checks would only repeat
    # (this runs for every set).
    alarm = Alarm.model_construct(
        uuid=current.uuid if current is not None else new_uuid(),
        alarm_id=definition.id,
        alarm_state=AlarmState.SET,
        entity_type_id=request.entity_type_id or EntityInstanceId.parse(request.entity_instance_id).entity_type_id,
        entity_instance_id=request.entity_instance_id,
        timestamp=request.timestamp or now,
        severity=severity,
        reason_text=request.reason_text,
        alarm_type=request.alarm_type or definition.alarm_type,
        probable_cause=request.probable_cause or definition.probable_cause,
        proposed_repair_action=_cut(definition.proposed_repair_action.for_severity(severity)),
        service_affecting=definition.service_affecting_for(severity),
        suppression=definition.suppression,
        inhibit_alarms=definition.inhibit_alarms,
        mgmt_affecting=definition.mgmt_affecting(severity),
        degrade_affecting=definition.degrade_affecting(severity),
        created_at=current.created_at if current is not None else now,
        updated_at=now,
    )
    if current is None:
        return SetOutcome(Change.RAISED, alarm)
    changes = tuple(FieldChange(name, str(old), str(new)) for name, old, new in (
        ("severity", current.severity.value, severity.value),
        ("reason_text", current.reason_text, request.reason_text)) if old != new)
    return SetOutcome(Change.CHANGED, alarm, previous=current, changes=changes)


def decide_clear(active: Iterable[Alarm], request: ClearRequest, catalogue: Catalogue) -> ClearOutcome:
    """The active alarms ``request`` clears: its alarm id (or every id) on exactly its entity, or with
    ``prefix`` on the entity and its children, by whole segments.  An unknown alarm id is refused."""
    if request.alarm_id is not None:
        catalogue.alarm(request.alarm_id)
    target = EntityInstanceId.parse(request.entity_instance_id)
    # An exact clear compares the texts: a parsed id's text is its canonical form (``str(parse(t)) == t`` for
    # every valid t), and both are valid; a prefix clear compares segments.
    text = str(target)
    cleared = [a for a in active
               if (request.alarm_id is None or a.alarm_id == request.alarm_id)
               and (target.matches(a.entity, prefix=True) if request.prefix else a.entity_instance_id == text)]
    return ClearOutcome(tuple(sorted(cleared, key=lambda a: a.key)))


def decide_reassert(current: Iterable[Alarm], asserted: Iterable[SetRequest], catalogue: Catalogue,
                    ) -> Reassertion:
    """What an owner's restart re-assertion does.

    ``current`` is the owner's active alarms, ``asserted`` the whole set it says is true now.  Returns
    the requests that raise or change something (the others are already so) and the keys of the owner's
    alarms missing from the set.  Every request is checked first, so a bad one fails the whole
    re-assertion before anything is applied; the same key twice is refused.
    """
    wanted: dict[AlarmKey, SetRequest] = {}
    for request in asserted:
        check_set(request, catalogue)
        if request.key in wanted:
            raise AlarmError(f"alarm {request.alarm_id} on {request.entity_instance_id} is asserted twice")
        wanted[request.key] = request
    have = {a.key: a for a in current}
    to_set = tuple(r for k, r in sorted(wanted.items())
                   if (a := have.get(k)) is None or a.severity is not r.severity or a.reason_text != r.reason_text)
    to_clear = tuple(sorted(k for k in have if k not in wanted))
    return Reassertion(to_set, to_clear)


# -- suppression ------------------------------------------------------------------------------------------


def _flags(alarm: Alarm, catalogue: Catalogue) -> tuple[bool, bool]:
    """(inhibits, suppressible) from the catalogue, or from the record for an id it no longer has."""
    try:
        definition = catalogue.get(alarm.alarm_id)
    except UnknownAlarmId:
        return alarm.inhibit_alarms, alarm.suppression
    return definition.inhibit_alarms, definition.suppression


def masked_keys(active: Iterable[Alarm], catalogue: Catalogue) -> frozenset[AlarmKey]:
    """The keys of the active alarms that hierarchical suppression masks: suppressible alarms on the
    entity, or a child of the entity, of an active inhibiting alarm (such as host locked)."""
    alarms = list(active)
    inhibitors: dict[tuple[tuple[str, str], ...], set[AlarmKey]] = {}
    for alarm in alarms:
        if _flags(alarm, catalogue)[0]:
            inhibitors.setdefault(alarm.entity.segments, set()).add(alarm.key)
    if not inhibitors:
        return frozenset()
    masked = set()
    for alarm in alarms:
        if not _flags(alarm, catalogue)[1]:
            continue
        segments = alarm.entity.segments
        for depth in range(1, len(segments) + 1):
            if inhibitors.get(segments[:depth], set()) - {alarm.key}:
                masked.add(alarm.key)
                break
    return frozenset(masked)


def masked(alarm: Alarm, active_alarms: Iterable[Alarm], catalogue: Catalogue) -> bool:
    """True when an active inhibiting alarm on ``alarm``'s entity or an ancestor masks it."""
    return alarm.key in masked_keys([alarm, *active_alarms], catalogue)


class SuppressionStatus(StrEnum):
    SUPPRESSED = "suppressed"
    UNSUPPRESSED = "unsuppressed"


def suppression_status(alarm_id: str, suppressed_ids: Collection[str]) -> SuppressionStatus:
    """FM's ``suppression_status``: whether an operator suppressed this alarm id."""
    return SuppressionStatus.SUPPRESSED if alarm_id in suppressed_ids else SuppressionStatus.UNSUPPRESSED


def visible(active: Iterable[Alarm], catalogue: Catalogue, suppressed_ids: Collection[str], *,
            include_suppress: bool = False, include_masked: bool = False) -> list[Alarm]:
    """The alarms a list shows: masked ones never (unless ``include_masked``), operator-suppressed ones
    only with ``include_suppress`` (they stay active and recorded either way)."""
    alarms = list(active)
    hidden = frozenset() if include_masked else masked_keys(alarms, catalogue)
    return [a for a in alarms
            if a.key not in hidden and (include_suppress or a.alarm_id not in suppressed_ids)]

