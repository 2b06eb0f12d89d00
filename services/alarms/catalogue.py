"""The alarm and log catalogue: which ids exist and what they mean, loaded from events.yaml-format YAML.

StarlingX describes every alarm and customer log in ``fm-doc/fm_doc/events.yaml``; roost reads that
file unchanged and adds its own (``catalogue.yaml`` next to this module) in the same format.  Each
entry becomes a frozen, typed :class:`EventDefinition`.

Where the format is loose this module decides, and says so:

* **Ids.** YAML reads ``200.010:`` as the float ``200.01``.  The loader never lets YAML interpret a
  top-level key: it takes the key's text as written and normalises it with :func:`normalise_alarm_id`,
  so ``200.010`` stays ``"200.010"``.  A key that is not ``GGG.EEE`` (after padding) is an error, and
  so is the same id twice in one file (plain YAML would silently keep the last one).
* **Texts by severity.** ``Description``, ``Entity_Instance_ID`` and ``Proposed_Repair_Action`` may
  be one string, a list of strings, or a mapping by severity: :class:`SeverityText` keeps all three
  shapes and answers :meth:`SeverityText.for_severity`.  ``Service_Affecting`` may likewise be one
  boolean or a mapping by severity (a severity missing from the mapping is not service affecting).
* **Alarm-only fields** (``Proposed_Repair_Action``, ``Maintenance_Action``, ``Inhibit_Alarms``,
  ``Suppression``) are refused on a ``Log``.  An empty ``Inhibit_Alarms`` means False.  Missing
  ``Management_Affecting_Severity`` / ``Degrade_Affecting_Severity`` default to ``warning`` / ``none``
  on an alarm, as FM's own loader does; logs have neither.
* **Context** is ``none``, ``starlingx`` or ``openstack`` as in StarlingX, plus ``roost`` for roost's
  own entries.

A malformed entry raises :class:`CatalogueError` naming the file, the line, the id and the field.
Several catalogues merge with :meth:`Catalogue.merge`; an id defined twice is refused, naming both
files.  Nothing here does I/O except reading the YAML files it is given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ALARM_ID_PATTERN: Final = r"^[0-9]{3}\.[0-9]{3}$"
"""An alarm or log id as roost stores it: ``GGG.EEE``, group and event each three digits."""

ROOST_CATALOGUE: Final = Path(__file__).with_name("catalogue.yaml")
"""roost's own catalogue (alarms and logs its services raise)."""

TEXT_MAX: Final = 4096
"""Longest description or repair action accepted in a catalogue (FM cuts them to 255 in a record)."""


class AlarmError(ValueError):
    """Bad input about an alarm (unknown id, malformed id or entity, wrong severity): a 4xx, not a bug."""


class MalformedAlarmId(AlarmError):
    """An alarm id that is not ``GGG.EEE``."""


class UnknownAlarmId(AlarmError, LookupError):
    """An alarm id that no loaded catalogue defines."""

    def __init__(self, alarm_id: str) -> None:
        super().__init__(f"unknown alarm id {alarm_id!r}: not in the alarm catalogue")
        self.alarm_id = alarm_id


class NotAnAlarm(AlarmError):
    """A ``Log`` id used where an ``Alarm`` is needed (a log cannot be set or cleared)."""


class CatalogueError(ValueError):
    """A catalogue file that cannot be used: says which file, line, id and field."""

    def __init__(self, message: str, *, source: str, alarm_id: str | None = None, field: str | None = None,
                 line: int | None = None) -> None:
        where = source + (f":{line}" if line is not None else "")
        parts = [where] + [p for p in (alarm_id, field) if p]
        super().__init__(f"{': '.join(parts)}: {message}")
        self.source = source
        self.alarm_id = alarm_id
        self.field = field
        self.line = line


class DuplicateAlarmId(CatalogueError):
    """The same id defined twice (in one file, or in two catalogues being merged)."""


class EventType(StrEnum):
    ALARM = "Alarm"
    LOG = "Log"


class Severity(StrEnum):
    """An alarm's severity, in FM's words.  Compare with :attr:`rank` (critical is the highest)."""

    CRITICAL = "critical"
    MAJOR = "major"
    MINOR = "minor"
    WARNING = "warning"

    @property
    def rank(self) -> int:
        return _RANK[self.value]


class Threshold(StrEnum):
    """The lowest severity at which an alarm affects management (or degrades its host); ``none``: never."""

    NONE = "none"
    CRITICAL = "critical"
    MAJOR = "major"
    MINOR = "minor"
    WARNING = "warning"

    def reached_by(self, severity: Severity) -> bool:
        """True when ``severity`` is at or above this threshold (FM's ``not alarm_allowed``)."""
        return self is not Threshold.NONE and severity.rank >= _RANK[self.value]


_RANK: Final = {"warning": 1, "minor": 2, "major": 3, "critical": 4}


class AlarmType(StrEnum):
    """The X.733 event types FM accepts as ``alarm_type``."""

    OTHER = "other"
    COMMUNICATION = "communication"
    QOS = "qos"
    PROCESSING_ERROR = "processing-error"
    EQUIPMENT = "equipment"
    ENVIRONMENTAL = "environmental"
    INTEGRITY_VIOLATION = "integrity-violation"
    OPERATIONAL_VIOLATION = "operational-violation"
    PHYSICAL_VIOLATION = "physical-violation"
    SECURITY_VIOLATION = "security-service-or-mechanism-violation"
    TIME_DOMAIN_VIOLATION = "time-domain-violation"
    DEPLOYMENT_IN_PROGRESS = "deployment in progress"


class Context(StrEnum):
    NONE = "none"
    STARLINGX = "starlingx"
    OPENSTACK = "openstack"
    ROOST = "roost"


ProbableCause = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$",
                                     description="an X.733-style probable cause, e.g. threshold-crossed")]
CatalogueText = Annotated[str, Field(min_length=1, max_length=TEXT_MAX)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SeverityText(_Frozen):
    """A text that is the same for every severity (``common``: one string, or several alternatives),
    or given per severity, or both (a per-severity text wins)."""

    common: tuple[CatalogueText, ...] = ()
    critical: CatalogueText | None = None
    major: CatalogueText | None = None
    minor: CatalogueText | None = None
    warning: CatalogueText | None = None

    def for_severity(self, severity: Severity) -> str | None:
        """The text for ``severity``: its own, else the common one (alternatives joined by `` OR ``)."""
        own: str | None = getattr(self, severity.value)
        if own is not None:
            return own
        return " OR ".join(self.common) if self.common else None

    def by_severity(self) -> dict[Severity, str]:
        return {s: t for s in Severity if (t := getattr(self, s.value)) is not None}

    @property
    def empty(self) -> bool:
        return not self.common and not self.by_severity()


class EventDefinition(_Frozen):
    """One alarm or log id from a catalogue, typed."""

    id: str = Field(pattern=ALARM_ID_PATTERN, description="GGG.EEE, e.g. 200.010")
    type: EventType
    description: SeverityText
    entity_instance_id: SeverityText = Field(description="the template, e.g. host=<hostname>.port=<port-uuid>")
    severities: tuple[Severity, ...] = Field(min_length=1, description="the severities it may be raised with")
    proposed_repair_action: SeverityText = SeverityText()
    maintenance_action: SeverityText = SeverityText()
    inhibit_alarms: bool = Field(default=False, description="masks the suppressible alarms of its entity and "
                                                            "the entity's children while active (host locked)")
    alarm_types: tuple[AlarmType, ...] = Field(min_length=1)
    probable_causes: tuple[ProbableCause, ...] = Field(min_length=1)
    service_affecting: bool = False
    service_affecting_by_severity: tuple[tuple[Severity, bool], ...] = ()
    suppression: bool = Field(default=False, description="may be masked by an inhibiting alarm")
    management_affecting_severity: Threshold = Threshold.NONE
    degrade_affecting_severity: Threshold = Threshold.NONE
    context: Context = Context.NONE

    @property
    def is_alarm(self) -> bool:
        return self.type is EventType.ALARM

    @property
    def alarm_type(self) -> AlarmType:
        """The alarm type (the first, for the rare entry that lists several)."""
        return self.alarm_types[0]

    @property
    def probable_cause(self) -> str:
        return self.probable_causes[0]

    def allows(self, severity: Severity) -> bool:
        return severity in self.severities

    def service_affecting_for(self, severity: Severity) -> bool:
        for sev, value in self.service_affecting_by_severity:
            if sev is severity:
                return value
        return self.service_affecting if not self.service_affecting_by_severity else False

    def mgmt_affecting(self, severity: Severity) -> bool:
        return self.management_affecting_severity.reached_by(severity)

    def degrade_affecting(self, severity: Severity) -> bool:
        return self.degrade_affecting_severity.reached_by(severity)


# -- ids ------------------------------------------------------------------------------------------------

_LOOSE_ID = re.compile(r"^([0-9]{1,3})(?:\.([0-9]{1,3}))?$")


def normalise_alarm_id(value: object) -> str:
    """``"GGG.EEE"`` from what YAML (or a caller) gives: the float ``200.01`` and the strings ``"200.01"``
    and ``"200.010"`` all give ``"200.010"``; the int ``200`` gives ``"200.000"``.  Anything that is not
    a group of 1-3 digits with at most 3 decimals raises :class:`MalformedAlarmId`."""
    if isinstance(value, bool):
        raise MalformedAlarmId(f"malformed alarm id {value!r}: expected GGG.EEE")
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise MalformedAlarmId(f"malformed alarm id {value!r}: expected GGG.EEE")
        text = f"{value:.3f}"
        if float(text) != value:          # more than three decimals: not an id YAML could have read
            raise MalformedAlarmId(f"malformed alarm id {value!r}: more than three decimals")
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise MalformedAlarmId(f"malformed alarm id {value!r}: expected GGG.EEE")
    match = _LOOSE_ID.match(text)
    if match is None:
        raise MalformedAlarmId(f"malformed alarm id {value!r}: expected GGG.EEE (e.g. 200.010)")
    group, event = match.group(1), match.group(2) or ""
    return f"{int(group):03d}.{event.ljust(3, '0')}"


# -- the raw YAML entry ---------------------------------------------------------------------------------

_FIELDS: Final = {
    "Type", "Description", "Entity_Instance_ID", "Severity", "Proposed_Repair_Action", "Maintenance_Action",
    "Inhibit_Alarms", "Alarm_Type", "Probable_Cause", "Service_Affecting", "Suppression",
    "Management_Affecting_Severity", "Degrade_Affecting_Severity", "Context",
}
_ALARM_ONLY: Final = ("Proposed_Repair_Action", "Maintenance_Action", "Inhibit_Alarms", "Suppression")
_REQUIRED: Final = ("Type", "Description", "Entity_Instance_ID", "Severity", "Alarm_Type", "Probable_Cause",
                    "Service_Affecting", "Context")


class _Entry(BaseModel):
    """An events.yaml entry as written (validated by the file's field names, the aliases)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: EventType = Field(alias="Type")
    description: SeverityText = Field(alias="Description")
    entity_instance_id: SeverityText = Field(alias="Entity_Instance_ID")
    severity: tuple[Severity, ...] = Field(alias="Severity", min_length=1)
    proposed_repair_action: SeverityText = Field(SeverityText(), alias="Proposed_Repair_Action")
    maintenance_action: SeverityText = Field(SeverityText(), alias="Maintenance_Action")
    inhibit_alarms: bool = Field(False, alias="Inhibit_Alarms")
    alarm_type: tuple[AlarmType, ...] = Field(alias="Alarm_Type", min_length=1)
    probable_cause: tuple[ProbableCause, ...] = Field(alias="Probable_Cause", min_length=1)
    service_affecting: bool | dict[Severity, bool] = Field(alias="Service_Affecting")
    suppression: bool = Field(False, alias="Suppression")
    management_affecting_severity: Threshold | None = Field(None, alias="Management_Affecting_Severity")
    degrade_affecting_severity: Threshold | None = Field(None, alias="Degrade_Affecting_Severity")
    context: Context = Field(alias="Context")

    @field_validator("description", "entity_instance_id", "proposed_repair_action", "maintenance_action",
                     mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        if value is None:
            return SeverityText()
        if isinstance(value, str):
            return {"common": (value,)} if value.strip() else SeverityText()
        if isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise ValueError("a list of texts must hold only strings")
            return {"common": tuple(value)}
        if isinstance(value, dict):
            bad = [k for k in value if k not in _RANK]
            if bad:
                raise ValueError(f"keys must be severities (critical, major, minor, warning), not {bad}")
            return {k: v for k, v in value.items() if v is not None}
        return value

    @field_validator("severity", "alarm_type", "probable_cause", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("inhibit_alarms", "suppression", mode="before")
    @classmethod
    def _empty_false(cls, value: Any) -> Any:
        return False if value is None else value

    @field_validator("inhibit_alarms", "suppression", "service_affecting", mode="before")
    @classmethod
    def _strict_bool(cls, value: Any) -> Any:
        if isinstance(value, str | int) and not isinstance(value, bool):
            raise ValueError(f"{value!r} is not True or False")
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(v, bool):
                    raise ValueError(f"{k}: {v!r} is not True or False")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> _Entry:
        if self.description.empty:
            raise ValueError("Description: must not be empty")
        if self.entity_instance_id.empty:
            raise ValueError("Entity_Instance_ID: must not be empty")
        if len(set(self.severity)) != len(self.severity):
            raise ValueError(f"Severity: listed twice in {[s.value for s in self.severity]}")
        for name, attr in (("Description", self.description), ("Entity_Instance_ID", self.entity_instance_id),
                           ("Proposed_Repair_Action", self.proposed_repair_action),
                           ("Maintenance_Action", self.maintenance_action)):
            extra = set(attr.by_severity()) - set(self.severity)
            if extra:
                raise ValueError(f"{name}: text for {sorted(s.value for s in extra)}, "
                                 f"not among the entry's severities")
        if isinstance(self.service_affecting, dict):
            extra = set(self.service_affecting) - set(self.severity)
            if extra:
                raise ValueError(f"Service_Affecting: {sorted(s.value for s in extra)} "
                                 f"not among the entry's severities")
        return self

    def definition(self, alarm_id: str) -> EventDefinition:
        alarm = self.type is EventType.ALARM
        by_sev = self.service_affecting if isinstance(self.service_affecting, dict) else {}
        return EventDefinition(
            id=alarm_id, type=self.type, description=self.description,
            entity_instance_id=self.entity_instance_id, severities=self.severity,
            proposed_repair_action=self.proposed_repair_action, maintenance_action=self.maintenance_action,
            inhibit_alarms=self.inhibit_alarms, alarm_types=self.alarm_type, probable_causes=self.probable_cause,
            service_affecting=self.service_affecting if isinstance(self.service_affecting, bool) else False,
            service_affecting_by_severity=tuple(sorted(by_sev.items(), key=lambda kv: -kv[0].rank)),
            suppression=self.suppression,
            management_affecting_severity=self.management_affecting_severity
            or (Threshold.WARNING if alarm else Threshold.NONE),
            degrade_affecting_severity=self.degrade_affecting_severity or Threshold.NONE,
            context=self.context,
        )


def parse_entry(alarm_id: str, raw: object, *, source: str = "<catalogue>",
                line: int | None = None) -> EventDefinition:
    """One entry (the mapping under an id) as a definition, or :class:`CatalogueError` saying what is wrong."""
    def error(message: str, field: str | None = None) -> CatalogueError:
        return CatalogueError(message, source=source, alarm_id=alarm_id, field=field, line=line)

    if not isinstance(raw, dict):
        raise error(f"expected a mapping of fields, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in _FIELDS)
    if unknown:
        raise error(f"unknown field(s) {', '.join(unknown)}", unknown[0])
    missing = [f for f in _REQUIRED if f not in raw]
    if missing:
        raise error("required field missing", missing[0])
    if raw.get("Type") == EventType.LOG.value:
        present = [f for f in _ALARM_ONLY if f in raw]
        if present:
            raise error("an alarm-only field on a Log", present[0])
    try:
        entry = _Entry.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        field = loc[0] if loc else None
        if field is None and ": " in msg and msg.split(": ", 1)[0] in _FIELDS:
            field, msg = msg.split(": ", 1)
        detail = ".".join(loc[1:])
        value = err.get("input")
        shown = f" (got {value!r})" if not isinstance(value, dict | list) and value is not None else ""
        raise error(f"{detail + ': ' if detail else ''}{msg}{shown}", field) from None
    return entry.definition(alarm_id)


# -- files ----------------------------------------------------------------------------------------------


class Catalogue:
    """Alarm and log definitions by id, from one or more catalogue files.  Immutable once built."""

    def __init__(self, definitions: Iterable[EventDefinition] = (), *, source: str = "<catalogue>") -> None:
        self._defs: dict[str, EventDefinition] = {}
        self._sources: dict[str, str] = {}
        for definition in definitions:
            self._add(definition, source)

    def _add(self, definition: EventDefinition, source: str) -> None:
        if definition.id in self._defs:
            raise DuplicateAlarmId(f"defined twice (also in {self._sources[definition.id]})",
                                   source=source, alarm_id=definition.id)
        self._defs[definition.id] = definition
        self._sources[definition.id] = source

    @classmethod
    def load(cls, path: str | Path) -> Catalogue:
        """Read one events.yaml-format file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CatalogueError(f"cannot read the catalogue: {exc.strerror or exc}", source=str(path)) from None
        return cls.from_yaml(text, source=str(path))

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<catalogue>") -> Catalogue:
        """Parse events.yaml-format text; ``source`` names it in errors."""
        catalogue = cls()
        for alarm_id, line, raw in _entries(text, source):
            catalogue._add(parse_entry(alarm_id, raw, source=source, line=line), f"{source}:{line}")
        return catalogue

    @classmethod
    def merge(cls, *catalogues: Catalogue) -> Catalogue:
        """One catalogue holding every definition of ``catalogues``; an id in two of them is refused."""
        merged = cls()
        for catalogue in catalogues:
            for alarm_id, definition in catalogue._defs.items():
                merged._add(definition, catalogue._sources[alarm_id])
        return merged

    def get(self, alarm_id: object) -> EventDefinition:
        """The definition of ``alarm_id`` (normalised, so ``200.01`` finds ``200.010``), or
        :class:`UnknownAlarmId` / :class:`MalformedAlarmId`."""
        if type(alarm_id) is str:       # already "GGG.EEE" (the usual case, several times per op): as is
            found = self._defs.get(alarm_id)
            if found is not None:
                return found
        key = normalise_alarm_id(alarm_id)
        try:
            return self._defs[key]
        except KeyError:
            raise UnknownAlarmId(key) from None

    def alarm(self, alarm_id: object) -> EventDefinition:
        """Like :meth:`get`, and the id must be an ``Alarm`` (not a ``Log``)."""
        definition = self.get(alarm_id)
        if not definition.is_alarm:
            raise NotAnAlarm(f"{definition.id} is a customer log, not an alarm: it cannot be set or cleared")
        return definition

    def log(self, log_id: object) -> EventDefinition:
        """Like :meth:`get`, and the id must be a ``Log``."""
        definition = self.get(log_id)
        if definition.is_alarm:
            raise AlarmError(f"{definition.id} is an alarm, not a customer log")
        return definition

    def source_of(self, alarm_id: str) -> str:
        """The file (and line) that defined ``alarm_id``."""
        return self._sources[self.get(alarm_id).id]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._defs))

    def alarms(self) -> Iterator[EventDefinition]:
        return (d for d in self if d.is_alarm)

    def logs(self) -> Iterator[EventDefinition]:
        return (d for d in self if not d.is_alarm)

    def __contains__(self, alarm_id: object) -> bool:
        try:
            return normalise_alarm_id(alarm_id) in self._defs
        except MalformedAlarmId:
            return False

    def __iter__(self) -> Iterator[EventDefinition]:
        return iter(self._defs[k] for k in sorted(self._defs))

    def __len__(self) -> int:
        return len(self._defs)

    def __repr__(self) -> str:
        files = {s.rsplit(":", 1)[0] for s in self._sources.values()}
        return f"<Catalogue {len(self)} ids from {len(files)} file(s)>"


def load_catalogues(*paths: str | Path) -> Catalogue:
    """The merge of the catalogue files ``paths`` (duplicate ids refused)."""
    return Catalogue.merge(*(Catalogue.load(p) for p in paths))


def roost_catalogue() -> Catalogue:
    """roost's own catalogue, shipped with this module."""
    return Catalogue.load(ROOST_CATALOGUE)


def _entries(text: str, source: str) -> Iterator[tuple[str, int, object]]:
    """``(id as written and normalised, line, raw entry)`` for each top-level key, in file order.

    Top-level keys are read as the text written in the file (YAML would turn ``200.010`` into the float
    ``200.01``); the values are built by the safe loader as usual.
    """
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return
        if not isinstance(root, yaml.MappingNode):
            raise CatalogueError("the top level must be a mapping of alarm ids to entries", source=source,
                                 line=root.start_mark.line + 1)
        seen: dict[str, int] = {}
        for key_node, value_node in root.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise CatalogueError("an id must be a plain GGG.EEE key", source=source, line=line)
            try:
                alarm_id = normalise_alarm_id(key_node.value)
            except MalformedAlarmId as exc:
                raise CatalogueError(str(exc), source=source, alarm_id=key_node.value, line=line) from None
            if alarm_id in seen:
                raise DuplicateAlarmId(f"defined twice in this file (first at line {seen[alarm_id]})",
                                       source=source, alarm_id=alarm_id, line=line)
            seen[alarm_id] = line
            yield alarm_id, line, loader.construct_object(value_node, deep=True)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise CatalogueError(f"not valid YAML: {getattr(exc, 'problem', None) or exc}", source=source,
                             line=mark.line + 1 if mark is not None else None) from None
    finally:
        loader.dispose()
