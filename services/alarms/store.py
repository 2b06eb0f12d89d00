"""Active alarms, the event log and suppression in PostgreSQL schema ``alarms``; every change announced.

:class:`AlarmStore` applies what :mod:`services.alarms.model` decides, inside the caller's transaction,
and with it, in the same transaction: the history record (``alarms.event_log``), the ``roost.alarm.*``
event in the outbox, and the webhook notification (``services.alarms.webhooks.store.enqueue``: one row per
change, which the webhook dispatcher fans out to the subscribers).  Either all
of it commits or none of it does.

Concurrency: an alarm instance's row is read ``FOR UPDATE`` before deciding; a new one is inserted with
``ON CONFLICT DO NOTHING`` on the unique ``(alarm_id, entity_instance_id)``, and when a concurrent
transaction inserted it first the decision is taken again on its row, so two racing sets never violate
the key and the second one is a change (or nothing) on the first one's uuid.

A clear selects its candidates by text (the entity, or the entity and ``entity.`` children for a prefix
clear) and lets :func:`~services.alarms.model.decide_clear` keep those that match segment-wise, so
clearing ``host=controller-1`` never touches ``host=controller-10``.

Batches: :meth:`AlarmStore.apply_many` applies a run of sets and exact clears (``SetOp`` / ``ClearOp``) in
the caller's transaction with a fixed number of statements whatever the run's length: it locks the
instances' rows ``FOR UPDATE`` in key order, takes the same decisions as :meth:`AlarmStore.set` and
:meth:`AlarmStore.clear` one after the other on them in memory, then writes the rows, one history record
per set and clear, the events (``Outbox.add_many``) and the webhook notifications in a few bulk statements.
The outcome is the one the ops applied one by one in that order would have had.  When a concurrent
transaction inserted an instance the batch raises, it raises :class:`BatchConflict`: roll back and apply
the ops one by one.
"""

from __future__ import annotations

import json
import os
import uuid as uuidlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import asyncpg
import orjson

from schemas import alarms as msg
from schemas.envelope import Envelope, Principal, utcnow
from schemas.registry import Registry
from services.alarms.catalogue import AlarmError, AlarmType, Catalogue, Severity
from services.alarms.model import (
    Alarm,
    AlarmKey,
    AlarmState,
    Change,
    ClearOutcome,
    ClearRequest,
    EntityInstanceId,
    LogRequest,
    SetOutcome,
    SetRequest,
    check_log,
    decide_clear,
    decide_reassert,
    decide_set,
)
from services.alarms.webhooks import store as webhooks
from services.alarms.webhooks.formats import AlarmFields, EventKind, Notification, dumps_body
from services.core.db.outbox import Outbox
from services.core.db.pool import AnyConnection

SCHEMA = "alarms"
SOURCE = "roost/alarms"
ClearCause = Literal["cleared", "reasserted", "entity_deleted", "operator"]

_ALARM_COLUMNS = ("uuid, alarm_id, alarm_state, entity_type_id, entity_instance_id, timestamp, severity, reason_text, "
                  "alarm_type, probable_cause, proposed_repair_action, service_affecting, suppression, "
                  "inhibit_alarms, mgmt_affecting, degrade_affecting, created_at, updated_at")
_SELECT = f"SELECT {_ALARM_COLUMNS}, owner, version FROM {SCHEMA}.active_alarms"


class NotInScope(AlarmError):
    """A re-assertion names an alarm outside the scope it re-asserts."""


@dataclass(frozen=True)
class Origin:
    """What caused a change: the service that asked (the owner of what it sets) and the message."""

    owner: str
    correlationid: str | None = None
    causationid: str | None = None
    principal: Principal | None = None

    @classmethod
    def of(cls, envelope: Envelope) -> Origin:
        return cls(envelope.source, envelope.correlationid, envelope.id, envelope.principal)


@dataclass(frozen=True)
class StoredAlarm:
    """An active alarm with what roost keeps beside FM's fields."""

    alarm: Alarm
    owner: str
    version: int


@dataclass(frozen=True)
class Cleared:
    """One alarm a clear removed: its last state (``alarm_state`` clear), the version of the clear, why."""

    alarm: Alarm
    owner: str
    version: int
    cause: ClearCause = "cleared"


@dataclass(frozen=True)
class Applied:
    """What applying a set did: the decision and, when it wrote, the alarm's new version."""

    outcome: SetOutcome
    version: int | None = None


@dataclass(frozen=True)
class Reasserted:
    set: tuple[Applied, ...] = ()
    cleared: tuple[Cleared, ...] = ()


@dataclass(frozen=True)
class SetOp:
    """A set in a batch (:meth:`AlarmStore.apply_many`)."""

    request: SetRequest
    origin: Origin
    repair_action: str | None = None

    @property
    def key(self) -> AlarmKey:
        return self.request.key


@dataclass(frozen=True)
class ClearOp:
    """An exact clear of one alarm instance in a batch: ``request`` names the alarm id, no prefix."""

    request: ClearRequest
    origin: Origin

    def __post_init__(self) -> None:
        if self.request.alarm_id is None or self.request.prefix:
            raise ValueError("a batched clear names one alarm instance: an alarm id and no prefix")

    @property
    def key(self) -> AlarmKey:
        assert self.request.alarm_id is not None
        return AlarmKey(self.request.alarm_id, self.request.entity_instance_id)


BatchOp = SetOp | ClearOp


class BatchConflict(Exception):
    """A batch cannot be applied as one (a concurrent transaction raised one of its alarm instances first):
    roll back and apply its ops one by one."""


@dataclass(frozen=True)
class HistoryRecord:
    """One row of the event log."""

    uuid: uuidlib.UUID
    seq: int
    event_log_id: str
    state: str
    change: str
    changes: list[dict[str, str]]
    cause: str | None
    alarm_uuid: uuidlib.UUID | None
    entity_type_id: str
    entity_instance_id: str
    timestamp: datetime
    severity: str
    reason_text: str
    event_log_type: str
    probable_cause: str
    proposed_repair_action: str
    service_affecting: bool
    suppression: bool
    owner: str
    version: int | None
    recorded_at: datetime


def _stored(row: asyncpg.Record) -> StoredAlarm:
    data = dict(row)
    owner, version = data.pop("owner"), data.pop("version")
    return StoredAlarm(Alarm.model_validate(data), owner, int(version))


def _record(alarm: Alarm, state: Literal["set", "clear"] | None = None) -> msg.AlarmRecord:
    data = alarm.model_dump(mode="json")
    data["uuid"] = str(alarm.uuid)
    if state is not None:
        data["alarm_state"] = state
    return msg.AlarmRecord.model_validate(data)


def _with_repair_action(outcome: SetOutcome, repair_action: str | None) -> SetOutcome:
    """``outcome`` with the sender's repair action instead of the catalogue's, when it writes; pure."""
    if not outcome.writes or repair_action is None:
        return outcome
    alarm = outcome.alarm.model_copy(update={"proposed_repair_action": repair_action})
    return SetOutcome(outcome.change, alarm, outcome.previous, outcome.changes)


def _set_event(outcome: SetOutcome, alarm: Alarm, version: int, owner: str,
               ) -> tuple[str, list[dict[str, str]], msg.AlarmRaised | msg.AlarmChanged, EventKind]:
    """What a raise or change records and announces: (change, changes, event, webhook kind); pure."""
    changes = [{"field": c.field, "old": c.old, "new": c.new} for c in outcome.changes]
    record = _record(alarm)
    if outcome.change is Change.RAISED:
        return ("raised", changes, msg.AlarmRaised(entity_id=str(alarm.uuid), version=version, owner=owner,
                                                   alarm=record), EventKind.RAISED)
    return ("changed", changes,
            msg.AlarmChanged(entity_id=str(alarm.uuid), version=version, owner=owner, alarm=record,
                             changes=[msg.FieldChange.model_validate(c) for c in changes]),
            EventKind.CHANGED)


def _clear_event(stored: StoredAlarm, version: int, cause: ClearCause, now: datetime,
                 ) -> tuple[Alarm, msg.AlarmCleared]:
    """The last state of a cleared alarm and its ``roost.alarm.cleared`` event; pure."""
    alarm = stored.alarm.model_copy(update={"alarm_state": AlarmState.CLEAR, "timestamp": now, "updated_at": now})
    return alarm, msg.AlarmCleared(entity_id=str(alarm.uuid), version=version, owner=stored.owner,
                                   alarm=_record(alarm, "clear"), cause=cause)


def _json_time(value: datetime) -> str:
    """A datetime as pydantic's JSON mode writes it (``Z`` for UTC, else the offset); pure."""
    return value.isoformat().replace("+00:00", "Z")


def _record_data(alarm: Alarm, state: Literal["set", "clear"]) -> dict[str, Any]:
    """``_record(alarm, state).model_dump(mode="json")``, built directly (this runs for every op); pure."""
    return {"uuid": str(alarm.uuid), "alarm_id": alarm.alarm_id, "alarm_state": state,
            "entity_type_id": alarm.entity_type_id, "entity_instance_id": alarm.entity_instance_id,
            "timestamp": _json_time(alarm.timestamp), "severity": alarm.severity.value,
            "reason_text": alarm.reason_text, "alarm_type": alarm.alarm_type.value,
            "probable_cause": alarm.probable_cause, "proposed_repair_action": alarm.proposed_repair_action,
            "service_affecting": alarm.service_affecting, "suppression": alarm.suppression,
            "inhibit_alarms": alarm.inhibit_alarms, "mgmt_affecting": alarm.mgmt_affecting,
            "degrade_affecting": alarm.degrade_affecting, "created_at": _json_time(alarm.created_at),
            "updated_at": _json_time(alarm.updated_at)}


def _event_data(kind: EventKind, alarm: Alarm, version: int, owner: str, *,
                changes: Sequence[dict[str, str]] = (), cause: ClearCause = "cleared") -> dict[str, Any]:
    """The data of a ``roost.alarm.raised|changed|cleared`` event as its model dumps it in JSON mode (what
    ``_set_event`` / ``_clear_event`` build as models), built directly: this runs for every op of a batch,
    and the registry's model checks it again at every consumer; pure."""
    data: dict[str, Any] = {"entity_id": str(alarm.uuid), "version": version, "owner": owner,
                            "alarm": _record_data(alarm, "clear" if kind is EventKind.CLEARED else "set")}
    if kind is EventKind.CHANGED:
        data["changes"] = [dict(c) for c in changes]
    elif kind is EventKind.CLEARED:
        data["cause"] = cause
    return data


class _Uuids:
    """Random (version 4) uuids, 16 bytes of ``os.urandom`` each, drawn many at a time (one system call per
    batch instead of one per uuid)."""

    def __init__(self, count: int = 256) -> None:
        self.count = count
        self._pool = b""
        self._at = 0

    def _next(self) -> bytes:
        if self._at + 16 > len(self._pool):
            self._pool, self._at = os.urandom(16 * self.count), 0
        raw = self._pool[self._at:self._at + 16]
        self._at += 16
        return raw

    def __call__(self) -> uuidlib.UUID:
        return uuidlib.UUID(bytes=self._next(), version=4)

    def text(self) -> str:
        """``str(self())`` without the ``UUID`` in between (a third of the time; envelope ids are text)."""
        n = (int.from_bytes(self._next(), "big") & _UUID_VERSION_CLEAR) | _UUID_VERSION_4
        h = f"{n:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# version 4, RFC 4122 variant: the bits uuid.UUID(version=4) sets
_UUID_VERSION_CLEAR = ~(0xF000 << 64) & ~(0xC000 << 48)
_UUID_VERSION_4 = (0x4000 << 64) | (0x8000 << 48)


def _history_values(alarm: Alarm, *, state: str, change: str, changes: list[dict[str, str]], owner: str,
                    version: int, cause: str | None = None,
                    new_uuid: Callable[[], uuidlib.UUID] = uuidlib.uuid4) -> tuple[Any, ...]:
    """One ``event_log`` row of an alarm record, in ``_HISTORY_COLUMNS`` order."""
    return (new_uuid(), alarm.alarm_id, state, change, json.dumps(changes) if changes else "[]", cause, alarm.uuid,
            alarm.entity_type_id, alarm.entity_instance_id, alarm.timestamp, alarm.severity.value,
            alarm.reason_text, alarm.alarm_type.value, alarm.probable_cause, alarm.proposed_repair_action,
            alarm.service_affecting, alarm.suppression, owner, version)


_HISTORY_COLUMNS = ("uuid, event_log_id, state, change, changes, cause, alarm_uuid, entity_type_id, "
                    "entity_instance_id, timestamp, severity, reason_text, event_log_type, probable_cause, "
                    "proposed_repair_action, service_affecting, suppression, owner, version")
_HISTORY_TYPES = ("uuid", "text", "text", "text", "text", "text", "uuid", "text", "text", "timestamptz", "text",
                  "text", "text", "text", "text", "bool", "bool", "text", "bigint")
_INSERT_HISTORY = f"""
    INSERT INTO {SCHEMA}.event_log ({_HISTORY_COLUMNS})
    VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)"""
# The active rows a batch writes, in _ALARM_COLUMNS order then owner, version.
_ALARM_TYPES = ("uuid", "text", "text", "text", "text", "timestamptz", "text", "text", "text", "text", "text",
                "bool", "bool", "bool", "bool", "bool", "timestamptz", "timestamptz", "text", "bigint")
_INSERT_ACTIVE_MANY = f"""
    WITH ins AS (
        INSERT INTO {SCHEMA}.active_alarms ({_ALARM_COLUMNS}, owner, version)
        SELECT * FROM unnest({", ".join(f"${i}::{t}[]" for i, t in enumerate(_ALARM_TYPES, 1))})
        ON CONFLICT ON CONSTRAINT active_alarms_instance DO NOTHING
        RETURNING 1)
    SELECT count(*) FROM ins"""
_UPDATE_ACTIVE_MANY = f"""
    UPDATE {SCHEMA}.active_alarms AS a
    SET entity_type_id = v.entity_type_id, timestamp = v.timestamp, severity = v.severity,
        reason_text = v.reason_text, alarm_type = v.alarm_type, probable_cause = v.probable_cause,
        proposed_repair_action = v.proposed_repair_action, service_affecting = v.service_affecting,
        suppression = v.suppression, inhibit_alarms = v.inhibit_alarms, mgmt_affecting = v.mgmt_affecting,
        degrade_affecting = v.degrade_affecting, updated_at = v.updated_at, owner = v.owner, version = v.version
    FROM unnest({", ".join(f"${i}::{t}[]" for i, t in enumerate(_ALARM_TYPES, 1))})
         AS v({_ALARM_COLUMNS}, owner, version)
    WHERE a.uuid = v.uuid"""
_LOCK_MANY = f"""
    {_SELECT} WHERE (alarm_id, entity_instance_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
    ORDER BY alarm_id, entity_instance_id FOR UPDATE"""
# Whether anyone subscribes to webhooks, and which of these alarm ids are operator-suppressed (their bodies
# say so): read with the locks of a batch, so that its tail needs no round trip of its own for it.
_WEBHOOK_STATE = f"""
    SELECT EXISTS (SELECT 1 FROM {webhooks.SUBSCRIPTIONS}) AS subscribed,
           array(SELECT alarm_id FROM {SCHEMA}.suppression WHERE suppressed AND alarm_id = ANY($1::text[]))
           AS suppressed"""


@dataclass(frozen=True, slots=True)
class InboxClaim:
    """The inbox rows a batch claims with its locks (``AlarmStore.apply_many``): consumer ``consumer`` in
    ``<schema>.inbox``, one message id per op."""

    schema: str
    consumer: str
    message_ids: Sequence[str]


def _head_sql(inbox_schema: str | None) -> str:
    """The head of a batch in ONE statement: the inbox rows of its messages ($3 consumer, $4 ids; none
    without an inbox), the rows of its alarm instances ($1, $2) locked FOR UPDATE in key order, and the
    webhook state (``_WEBHOOK_STATE`` of the alarm ids $5); one row per locked alarm, or one of NULLs."""
    fresh = (f"""INSERT INTO {inbox_schema}.inbox (consumer, message_id)
                 SELECT $3::text, m FROM unnest($4::text[]) AS m ON CONFLICT DO NOTHING RETURNING message_id"""
             if inbox_schema is not None else "SELECT m AS message_id FROM unnest($4::text[]) AS m WHERE $3::text = ''")
    return f"""
    WITH fresh AS ({fresh}),
    st AS (
        SELECT EXISTS (SELECT 1 FROM {webhooks.SUBSCRIPTIONS}) AS _subscribed,
               array(SELECT alarm_id FROM {SCHEMA}.suppression WHERE suppressed AND alarm_id = ANY($5::text[]))
               AS _suppressed,
               array(SELECT message_id FROM fresh) AS _fresh),
    locked AS (
        {_LOCK_MANY})
    SELECT st._subscribed AS subscribed, st._suppressed AS suppressed, st._fresh, locked.*
    FROM st LEFT JOIN locked ON true"""


def _stored_locked(row: asyncpg.Record) -> StoredAlarm:
    """A locked row of a batch as a ``StoredAlarm``: constructed from our own row, not validated again (the
    row was written from a validated ``Alarm``; this runs for every op); the enums made as ``_stored`` would."""
    alarm = Alarm.model_construct(
        uuid=row["uuid"], alarm_id=row["alarm_id"], alarm_state=AlarmState(row["alarm_state"]),
        entity_type_id=row["entity_type_id"], entity_instance_id=row["entity_instance_id"],
        timestamp=row["timestamp"], severity=Severity(row["severity"]), reason_text=row["reason_text"],
        alarm_type=AlarmType(row["alarm_type"]), probable_cause=row["probable_cause"],
        proposed_repair_action=row["proposed_repair_action"], service_affecting=row["service_affecting"],
        suppression=row["suppression"], inhibit_alarms=row["inhibit_alarms"], mgmt_affecting=row["mgmt_affecting"],
        degrade_affecting=row["degrade_affecting"], created_at=row["created_at"], updated_at=row["updated_at"])
    return StoredAlarm(alarm, row["owner"], int(row["version"]))


_HISTORY_NAMES = tuple(_HISTORY_COLUMNS.split(", "))
_ALARM_NAMES = (*_ALARM_COLUMNS.split(", "), "owner", "version")


def _recordset(param: int, names: Sequence[str], types: Sequence[str], alias: str) -> str:
    """The rows of JSON document ``$param`` (``_json_rows``) with their order, ``n``, as ``alias``."""
    columns = ", ".join(f"{name} {type}" for name, type in zip(names, types, strict=True))
    return (f"ROWS FROM (json_to_recordset(${param}::json) AS ({columns})) WITH ORDINALITY "
            f"AS {alias}({', '.join(names)}, n)")


def _json_rows(rows: Sequence[tuple[Any, ...]], names: Sequence[str]) -> str:
    """Rows as ONE JSON array of objects keyed by column, what ``_recordset`` reads; pure.

    asyncpg encodes an array parameter element by element (two ``isinstance`` checks against the
    ``collections.abc`` classes each, then the value): 9-10 µs of this process per history row of 19
    columns, against 3 µs for this document, written by orjson (uuids and datetimes in their text forms,
    which PostgreSQL reads back exactly); PostgreSQL's parsing costs it 3-4 µs more per row.  A process
    that writes thousands of rows a second has the better end of that trade."""
    return orjson.dumps([dict(zip(names, row, strict=True)) for row in rows], default=_uuid_text,
                        option=orjson.OPT_NAIVE_UTC).decode()


def _uuid_text(value: object) -> str:
    """What orjson cannot write itself: the uuids asyncpg reads (its own subclass of ``uuid.UUID``)."""
    if isinstance(value, uuidlib.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not a column value")


def _tail_sql(outbox_schema: str, active: bool = False) -> str:
    """The tail of a batch in ONE statement: its history records ($1, ``_json_rows`` of
    ``_history_values``), its events in the outbox ($2..$6, ``Outbox.add_many``'s rows) and its webhook
    notifications ($7..$13, ``webhooks.insert_notifications``'s rows, seqs taken only after the writers'
    shared fan-out lock: the lock is a row the insert joins, so it is held before the first seq), each kind
    in order; the NOTIFYs of the outbox ($14) and of the webhooks ($15) when something new was written.
    With ``active``, also the batch's active rows: deleted ($16 uuids), updated ($17) and inserted ($18,
    ``_json_rows`` of ``_active_values``; ``ON CONFLICT DO NOTHING``: ``inserted`` says how many were),
    which the caller only folds in when no instance is both deleted and inserted (the order of a
    statement's CTEs is not defined).  Data-modifying CTEs all run to completion, referenced or not."""
    history = ", ".join(f"t.{name}" if name != "changes" else "t.changes::jsonb" for name in _HISTORY_NAMES)
    history_types = tuple("text" if name == "changes" else t for name, t in zip(_HISTORY_NAMES, _HISTORY_TYPES,
                                                                                 strict=True))
    rows = f"""
    ad AS (
        DELETE FROM {SCHEMA}.active_alarms WHERE uuid = ANY($16::uuid[])),
    au AS (
        UPDATE {SCHEMA}.active_alarms AS a
        SET entity_type_id = v.entity_type_id, timestamp = v.timestamp, severity = v.severity,
            reason_text = v.reason_text, alarm_type = v.alarm_type, probable_cause = v.probable_cause,
            proposed_repair_action = v.proposed_repair_action, service_affecting = v.service_affecting,
            suppression = v.suppression, inhibit_alarms = v.inhibit_alarms, mgmt_affecting = v.mgmt_affecting,
            degrade_affecting = v.degrade_affecting, updated_at = v.updated_at, owner = v.owner, version = v.version
        FROM {_recordset(17, _ALARM_NAMES, _ALARM_TYPES, "v")}
        WHERE a.uuid = v.uuid),
    ai AS (
        INSERT INTO {SCHEMA}.active_alarms ({_ALARM_COLUMNS}, owner, version)
        SELECT {", ".join(f"v.{name}" for name in _ALARM_NAMES)}
        FROM {_recordset(18, _ALARM_NAMES, _ALARM_TYPES, "v")}
        ORDER BY v.n
        ON CONFLICT ON CONSTRAINT active_alarms_instance DO NOTHING
        RETURNING 1),""" if active else ""
    inserted = "(SELECT count(*) FROM ai)" if active else "0"
    return f"""
    WITH {rows} h AS (
        INSERT INTO {SCHEMA}.event_log ({_HISTORY_COLUMNS})
        SELECT {history}
        FROM {_recordset(1, _HISTORY_NAMES, history_types, "t")}
        ORDER BY t.n
        RETURNING 1),
    o AS (
        INSERT INTO {outbox_schema}.outbox (message_id, subject, ordering_key, headers, body)
        SELECT m, s, k, hd::jsonb, b
        FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[]) WITH ORDINALITY
             AS t(m, s, k, hd, b, n)
        ORDER BY n
        ON CONFLICT (message_id) DO NOTHING
        RETURNING 1),
    lk AS (
        SELECT {webhooks.LOCK_FOR_NOTIFICATIONS} AS locked),
    nt AS (
        INSERT INTO {webhooks.NOTIFICATIONS} (webhook_id, ordering_key, event_type, alarm_id, severity,
                                              entity_instance_id, body)
        SELECT w, k, e, a, sv, i, b
        FROM unnest($7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::bytea[])
             WITH ORDINALITY AS t(w, k, e, a, sv, i, b, n) CROSS JOIN lk
        ORDER BY n
        ON CONFLICT (webhook_id) DO NOTHING
        RETURNING 1),
    c AS (
        SELECT (SELECT count(*) FROM o) AS events, (SELECT count(*) FROM nt) AS notes, (SELECT count(*) FROM h) AS h,
               {inserted} AS inserted)
    SELECT c.events, c.notes, c.inserted, CASE WHEN c.events > 0 THEN pg_notify($14, '') END AS o_notified,
           CASE WHEN c.notes > 0 THEN pg_notify($15, '') END AS n_notified
    FROM c"""
def _active_values(stored: StoredAlarm) -> tuple[Any, ...]:
    a = stored.alarm
    return (a.uuid, a.alarm_id, a.alarm_state.value, a.entity_type_id, a.entity_instance_id, a.timestamp,
            a.severity.value, a.reason_text, a.alarm_type.value, a.probable_cause, a.proposed_repair_action,
            a.service_affecting, a.suppression, a.inhibit_alarms, a.mgmt_affecting, a.degrade_affecting,
            a.created_at, a.updated_at, stored.owner, stored.version)


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows to per-column lists (what ``unnest`` takes); pure."""
    return [[row[i] for row in rows] for i in range(width)]


def _notification(envelope: Envelope, alarm: Alarm, version: int, kind: EventKind, suppressed: bool,
                  ) -> Notification:
    """What the webhook subscribers get for an announced change (its id is the event's); pure."""
    fields = alarm.model_dump(mode="json")
    fields.update(uuid=str(alarm.uuid), mgmt_affecting=str(alarm.mgmt_affecting),
                  degrade_affecting=str(alarm.degrade_affecting),
                  alarm_state="clear" if kind is EventKind.CLEARED else "set",
                  suppression_status="suppressed" if suppressed else "unsuppressed")
    return Notification(id=f"msg_{uuidlib.UUID(envelope.id).hex}", event=kind, version=version,
                        occurred_at=envelope.time, alarm=AlarmFields.model_validate(fields))


def _utc_instant(value: datetime) -> datetime:
    """``value`` in UTC (naive: taken as UTC), which ``dumps_body`` writes as ``rfc3339`` does: so the times of
    a body need not be formatted one by one in Python (a microsecond each, four per op); pure."""
    offset = value.utcoffset()
    return value if not offset else value.astimezone(UTC)


def _notification_values(envelope: Envelope, alarm: Alarm, version: int, kind: EventKind, suppressed: bool,
                         ) -> tuple[object, ...]:
    """The ``webhook_notifications`` row of an announced change (``webhooks.notification_values`` of
    :func:`_notification`, the same bytes), built without the models in between: this runs for every op."""
    ident = envelope.id
    canonical = len(ident) == 36 and ident[8] == ident[13] == ident[18] == ident[23] == "-" and ident == ident.lower()
    hexed = ident.replace("-", "") if canonical else uuidlib.UUID(ident).hex    # str(uuid4()): canonical
    webhook_id = f"msg_{hexed}"
    cleared = kind is EventKind.CLEARED
    payload = {
        "data": {
            "alarm": {
                "alarm_id": alarm.alarm_id, "alarm_state": "clear" if cleared else "set",
                "alarm_type": alarm.alarm_type.value, "created_at": _utc_instant(alarm.created_at),
                "degrade_affecting": str(alarm.degrade_affecting), "entity_instance_id": alarm.entity_instance_id,
                "entity_type_id": alarm.entity_type_id, "inhibit_alarms": alarm.inhibit_alarms,
                "mgmt_affecting": str(alarm.mgmt_affecting), "probable_cause": alarm.probable_cause,
                "proposed_repair_action": alarm.proposed_repair_action, "reason_text": alarm.reason_text,
                "service_affecting": alarm.service_affecting, "severity": alarm.severity.value,
                "suppression": alarm.suppression,
                "suppression_status": "suppressed" if suppressed else "unsuppressed",
                "timestamp": _utc_instant(alarm.timestamp), "updated_at": _utc_instant(alarm.updated_at),
                "uuid": str(alarm.uuid),
            },
            "event": kind.value,
            "id": webhook_id,
            "version": version,
        },
        "timestamp": _utc_instant(envelope.time),
        "type": f"alarm.{kind.value}",
    }
    return (webhook_id, f"{alarm.alarm_id}|{alarm.entity_instance_id}", f"alarm.{kind.value}", alarm.alarm_id,
            alarm.severity.value, alarm.entity_instance_id, dumps_body(payload))


def _in_transaction(conn: AnyConnection) -> None:
    if not conn.is_in_transaction():
        raise RuntimeError("the alarm store needs the caller's transaction: call it inside "
                           "`async with conn.transaction():`")


class AlarmStore:
    """Applies sets, clears, re-assertions and logs in the caller's transaction, with their history,
    their ``roost.alarm.*`` events (outbox) and their webhook deliveries."""

    def __init__(self, catalogue: Catalogue, outbox: Outbox, registry: Registry, *, source: str = SOURCE,
                 webhooks: bool = True, clock: Callable[[], datetime] = utcnow) -> None:
        self.catalogue = catalogue
        self.outbox = outbox
        self.registry = registry
        self.source = source
        self.webhooks = webhooks
        self.clock = clock
        self._tail: dict[tuple[str, bool], str] = {}
        self._head: dict[str, str] = {}
        self._uuids = _Uuids()

    # -- set ------------------------------------------------------------------------------------------

    async def set(self, conn: AnyConnection, request: SetRequest, origin: Origin, *,
                  repair_action: str | None = None) -> Applied:
        """Raise, change or leave ``request``'s alarm; raises an ``AlarmError`` for a request the
        catalogue refuses.  ``repair_action`` replaces the catalogue's text."""
        _in_transaction(conn)
        while True:
            row = await conn.fetchrow(f"{_SELECT} WHERE alarm_id = $1 AND entity_instance_id = $2 FOR UPDATE",
                                      request.alarm_id, request.entity_instance_id)
            current = _stored(row) if row is not None else None
            outcome = decide_set(current.alarm if current else None, request, self.catalogue, self.clock())
            outcome = _with_repair_action(outcome, repair_action)
            alarm = outcome.alarm
            if outcome.change is Change.UNCHANGED:
                return Applied(outcome)
            if outcome.change is Change.RAISED:
                version = await conn.fetchval(
                    f"""INSERT INTO {SCHEMA}.active_alarms ({_ALARM_COLUMNS}, owner, version)
                        VALUES ($1, $2, 'set', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                                $18, 1)
                        ON CONFLICT ON CONSTRAINT active_alarms_instance DO NOTHING RETURNING version""",
                    alarm.uuid, alarm.alarm_id, alarm.entity_type_id, alarm.entity_instance_id, alarm.timestamp,
                    alarm.severity.value, alarm.reason_text, alarm.alarm_type.value, alarm.probable_cause,
                    alarm.proposed_repair_action, alarm.service_affecting, alarm.suppression, alarm.inhibit_alarms,
                    alarm.mgmt_affecting, alarm.degrade_affecting, alarm.created_at, alarm.updated_at, origin.owner)
                if version is None:        # a concurrent set inserted it first: decide again on its row
                    continue
            else:
                version = await conn.fetchval(
                    f"""UPDATE {SCHEMA}.active_alarms
                        SET entity_type_id = $2, timestamp = $3, severity = $4, reason_text = $5, alarm_type = $6,
                            probable_cause = $7, proposed_repair_action = $8, service_affecting = $9,
                            suppression = $10, inhibit_alarms = $11, mgmt_affecting = $12, degrade_affecting = $13,
                            updated_at = $14, owner = $15, version = version + 1
                        WHERE uuid = $1 RETURNING version""",
                    alarm.uuid, alarm.entity_type_id, alarm.timestamp, alarm.severity.value, alarm.reason_text,
                    alarm.alarm_type.value, alarm.probable_cause, alarm.proposed_repair_action,
                    alarm.service_affecting, alarm.suppression, alarm.inhibit_alarms, alarm.mgmt_affecting,
                    alarm.degrade_affecting, alarm.updated_at, origin.owner)
            version = int(version)
            change, changes, event, kind = _set_event(outcome, alarm, version, origin.owner)
            await self._history(conn, alarm, state="set", change=change, changes=changes, owner=origin.owner,
                                version=version)
            await self._announce(conn, f"roost.alarm.{change}", event, origin, alarm, version, kind)
            return Applied(outcome, version)

    # -- clear ----------------------------------------------------------------------------------------

    async def clear(self, conn: AnyConnection, request: ClearRequest, origin: Origin, *,
                    cause: ClearCause = "cleared") -> tuple[Cleared, ...]:
        """Clear what ``request`` matches (exact entity, or with ``prefix`` the entity and its children)."""
        _in_transaction(conn)
        if request.prefix:
            rows = await conn.fetch(
                f"""{_SELECT} WHERE (entity_instance_id = $1 OR starts_with(entity_instance_id, $1 || '.'))
                      AND ($2::text IS NULL OR alarm_id = $2)
                    ORDER BY alarm_id, entity_instance_id FOR UPDATE""",
                request.entity_instance_id, request.alarm_id)
        else:
            rows = await conn.fetch(
                f"""{_SELECT} WHERE entity_instance_id = $1 AND ($2::text IS NULL OR alarm_id = $2)
                    ORDER BY alarm_id, entity_instance_id FOR UPDATE""",
                request.entity_instance_id, request.alarm_id)
        stored = {s.alarm.key: s for s in map(_stored, rows)}
        outcome: ClearOutcome = decide_clear((s.alarm for s in stored.values()), request, self.catalogue)
        return await self._clear_rows(conn, [stored[a.key] for a in outcome.cleared], origin, cause)

    async def clear_entity(self, conn: AnyConnection, entity_instance_id: str, origin: Origin, *,
                           cause: ClearCause = "entity_deleted") -> tuple[Cleared, ...]:
        """Clear every alarm of an entity and of its children (a deleted host's)."""
        return await self.clear(conn, ClearRequest(entity_instance_id=entity_instance_id, prefix=True), origin,
                                cause=cause)

    async def _clear_rows(self, conn: AnyConnection, rows: Sequence[StoredAlarm], origin: Origin,
                          cause: ClearCause) -> tuple[Cleared, ...]:
        if not rows:
            return ()
        deleted = await conn.fetch(
            f"DELETE FROM {SCHEMA}.active_alarms WHERE uuid = ANY($1::uuid[]) RETURNING uuid, version",
            [s.alarm.uuid for s in rows])
        versions = {r["uuid"]: int(r["version"]) + 1 for r in deleted}
        now = self.clock()
        done: list[Cleared] = []
        history: list[tuple[Any, ...]] = []
        announced: list[tuple[Envelope, Alarm, int, EventKind]] = []
        for s in rows:
            if s.alarm.uuid not in versions:
                continue
            version = versions[s.alarm.uuid]
            alarm, event = _clear_event(s, version, cause, now)
            history.append(_history_values(alarm, state="clear", change="cleared", changes=[], owner=s.owner,
                                           version=version, cause=cause))
            announced.append((self._envelope("roost.alarm.cleared", event, origin, f"alarm/{alarm.uuid}"),
                              alarm, version, EventKind.CLEARED))
            done.append(Cleared(alarm, s.owner, version, cause))
        await self._record_many(conn, history, announced)
        return tuple(done)

    # -- re-assertion ---------------------------------------------------------------------------------

    async def reassert(self, conn: AnyConnection, scope: str | None, requests: Iterable[SetRequest],
                       origin: Origin) -> Reasserted:
        """``origin.owner`` has exactly ``requests`` within ``scope`` (an entity and its children; None:
        everywhere): apply them, and clear that owner's alarms in the scope that are not among them."""
        _in_transaction(conn)
        asserted = list(requests)
        target = EntityInstanceId.parse(scope) if scope is not None else None
        for request in asserted:
            if target is not None and not target.matches(EntityInstanceId.parse(request.entity_instance_id),
                                                         prefix=True):
                raise NotInScope(f"alarm {request.alarm_id} on {request.entity_instance_id} is outside the "
                                 f"re-asserted scope {scope}")
        rows = await conn.fetch(f"{_SELECT} WHERE owner = $1 ORDER BY alarm_id, entity_instance_id FOR UPDATE",
                                origin.owner)
        mine = [s for s in map(_stored, rows)
                if target is None or target.matches(s.alarm.entity, prefix=True)]
        decision = decide_reassert((s.alarm for s in mine), asserted, self.catalogue)
        applied = [await self.set(conn, r, origin) for r in decision.to_set]
        gone: set[AlarmKey] = set(decision.to_clear)
        cleared = await self._clear_rows(conn, [s for s in mine if s.alarm.key in gone], origin, "reasserted")
        return Reasserted(tuple(applied), cleared)

    # -- batches ------------------------------------------------------------------------------------

    async def apply_many(self, conn: AnyConnection, ops: Sequence[BatchOp], *, inbox: InboxClaim | None = None,
                         ) -> list[Applied | tuple[Cleared, ...] | None]:
        """Apply sets and exact clears in order, as :meth:`set` and :meth:`clear` one after the other would,
        in a fixed number of statements.  Returns each op's result (a clear: the alarm it cleared, or
        nothing).  An ``AlarmError`` for an op the catalogue refuses; :class:`BatchConflict` when a
        concurrent transaction raised one of the instances first (roll back, apply one by one).

        ``inbox``: the ops' message ids (one per op), claimed in the consumer's inbox in the statement that
        locks the rows: an op whose message was seen before (or earlier in ``ops``) is skipped, its
        result None (a duplicate)."""
        _in_transaction(conn)
        if not ops:
            return []
        if inbox is not None and len(inbox.message_ids) != len(ops):
            raise ValueError("one message id per op")
        keys = sorted({op.key for op in ops})
        sql = self._head.get(inbox.schema if inbox is not None else "")
        if sql is None:
            sql = self._head[inbox.schema if inbox is not None else ""] = _head_sql(
                inbox.schema if inbox is not None else None)
        rows = await conn.fetch(sql, [k.alarm_id for k in keys], [k.entity_instance_id for k in keys],
                                inbox.consumer if inbox is not None else None,
                                list(dict.fromkeys(inbox.message_ids)) if inbox is not None else [],
                                sorted({k.alarm_id for k in keys}))
        webhook_state = rows[0]
        fresh = set(webhook_state["_fresh"]) if inbox is not None else set()
        initial = {s.alarm.key: s for s in (_stored_locked(r) for r in rows if r["uuid"] is not None)}
        state: dict[AlarmKey, StoredAlarm | None] = dict(initial)
        touched: set[AlarmKey] = set()
        history: list[tuple[Any, ...]] = []
        announced: list[tuple[Envelope, Alarm, int, EventKind]] = []
        results: list[Applied | tuple[Cleared, ...] | None] = []
        for i, op in enumerate(ops):
            if inbox is not None:
                if inbox.message_ids[i] not in fresh:
                    results.append(None)        # a duplicate: applied before
                    continue
                fresh.discard(inbox.message_ids[i])
            current = state.get(op.key)
            if isinstance(op, SetOp):
                outcome = _with_repair_action(
                    decide_set(current.alarm if current else None, op.request, self.catalogue, self.clock(),
                               new_uuid=self._uuids), op.repair_action)
                if outcome.change is Change.UNCHANGED:
                    results.append(Applied(outcome))
                    continue
                alarm = outcome.alarm
                if alarm.key != op.key:
                    raise BatchConflict(f"alarm {alarm.key} is not the requested {op.key}")
                version = 1 if current is None else current.version + 1
                state[op.key] = StoredAlarm(alarm, op.origin.owner, version)
                kind = EventKind.RAISED if outcome.change is Change.RAISED else EventKind.CHANGED
                changes = [{"field": c.field, "old": c.old, "new": c.new} for c in outcome.changes]
                history.append(_history_values(alarm, state="set", change=kind.value, changes=changes,
                                               owner=op.origin.owner, version=version, new_uuid=self._uuids))
                data = _event_data(kind, alarm, version, op.origin.owner, changes=changes)
                announced.append((self._event_envelope(f"roost.alarm.{kind.value}", data, op.origin,
                                                       f"alarm/{alarm.uuid}"), alarm, version, kind))
                results.append(Applied(outcome, version))
            else:
                found = decide_clear([current.alarm] if current else [], op.request, self.catalogue).found
                if current is None or not found:
                    results.append(())
                    continue
                version = current.version + 1
                now = self.clock()
                alarm = current.alarm.model_copy(update={"alarm_state": AlarmState.CLEAR, "timestamp": now,
                                                         "updated_at": now})
                state[op.key] = None
                history.append(_history_values(alarm, state="clear", change="cleared", changes=[],
                                               owner=current.owner, version=version, cause="cleared",
                                               new_uuid=self._uuids))
                data = _event_data(EventKind.CLEARED, alarm, version, current.owner, cause="cleared")
                announced.append((self._event_envelope("roost.alarm.cleared", data, op.origin, f"alarm/{alarm.uuid}"),
                                  alarm, version, EventKind.CLEARED))
                results.append((Cleared(alarm, current.owner, version, "cleared"),))
            touched.add(op.key)
        if not touched:
            return results
        # The rows, as the ops one by one would leave them: a row still there with its uuid is updated (a
        # transaction waiting for it sees the new version), one cleared is deleted, a new one inserted.
        gone: list[uuidlib.UUID] = []
        updated: list[tuple[Any, ...]] = []
        inserted: list[tuple[Any, ...]] = []
        reraised = False            # an instance cleared and raised again in this batch: deleted and inserted
        for key in sorted(touched):
            before, after = initial.get(key), state[key]
            if before is not None and (after is None or after.alarm.uuid != before.alarm.uuid):
                gone.append(before.alarm.uuid)
                reraised = reraised or after is not None
            if after is not None:
                same = before is not None and after.alarm.uuid == before.alarm.uuid
                (updated if same else inserted).append(_active_values(after))
        if not reraised:        # the usual case: the rows are written with the tail, in its one statement
            await self._record_many(conn, history, announced, webhook_state, active=(gone, updated, inserted))
            return results
        if gone:
            await conn.execute(f"DELETE FROM {SCHEMA}.active_alarms WHERE uuid = ANY($1::uuid[])", gone)
        if updated:
            await conn.execute(_UPDATE_ACTIVE_MANY, *_columns(updated, len(_ALARM_TYPES)))
        if inserted:
            count = await conn.fetchval(_INSERT_ACTIVE_MANY, *_columns(inserted, len(_ALARM_TYPES)))
            if count != len(inserted):
                raise BatchConflict("a concurrent transaction raised an alarm instance of this batch first")
        await self._record_many(conn, history, announced, webhook_state)
        return results

    async def _record_many(self, conn: AnyConnection, history: Sequence[tuple[Any, ...]],
                           announced: Sequence[tuple[Envelope, Alarm, int, EventKind]],
                           webhook_state: asyncpg.Record | None = None,
                           active: tuple[Sequence[uuidlib.UUID], Sequence[tuple[Any, ...]],
                                         Sequence[tuple[Any, ...]]] | None = None) -> None:
        """The history records (``_history_values``), events (outbox) and webhook notifications of several
        changes, each kind in order, all in one statement (``_tail_sql``).  ``webhook_state``: the
        ``_WEBHOOK_STATE`` row, when the caller read it already.  ``active``: the active rows to delete (by
        uuid), update and insert (``_active_values``) in the same statement; :class:`BatchConflict` when an
        insert met a row a concurrent transaction inserted first."""
        if not history and active is None:
            return
        notes: list[tuple[object, ...]] = []
        if self.webhooks:
            if webhook_state is None:
                webhook_state = await conn.fetchrow(_WEBHOOK_STATE,
                                                    sorted({alarm.alarm_id for _, alarm, _, _ in announced}))
                assert webhook_state is not None
            if webhook_state["subscribed"]:
                suppressed = set(webhook_state["suppressed"])
                notes = [_notification_values(envelope, alarm, version, kind, alarm.alarm_id in suppressed)
                         for envelope, alarm, version, kind in announced]
        outbox = self.outbox.columns([envelope for envelope, *_ in announced])
        key = (self.outbox.schema, active is not None)
        sql = self._tail.get(key)
        if sql is None:
            sql = self._tail[key] = _tail_sql(self.outbox.schema, active is not None)
        rows: list[Any] = []
        if active is not None:
            gone, updated, inserted = active
            rows = [list(gone), _json_rows(updated, _ALARM_NAMES), _json_rows(inserted, _ALARM_NAMES)]
        done = await conn.fetchrow(sql, _json_rows(history, _HISTORY_NAMES), *outbox, *_columns(notes, 7),
                                   self.outbox.channel, webhooks.NOTIFY_CHANNEL, *rows)
        assert done is not None
        if active is not None and done["inserted"] != len(active[2]):
            raise BatchConflict("a concurrent transaction raised an alarm instance of this batch first")

    # -- customer logs --------------------------------------------------------------------------------

    async def log(self, conn: AnyConnection, request: LogRequest, origin: Origin) -> msg.EventLogRecord:
        """Record a customer log in the history and announce it."""
        _in_transaction(conn)
        definition = check_log(request, self.catalogue)
        now = self.clock()
        record = msg.EventLogRecord(
            uuid=str(uuidlib.uuid4()), event_log_id=definition.id, state="log",
            entity_type_id=request.entity_type_id or EntityInstanceId.parse(request.entity_instance_id).entity_type_id,
            entity_instance_id=request.entity_instance_id, timestamp=request.timestamp or now,
            severity=request.severity.value, reason_text=request.reason_text,
            event_log_type=definition.alarm_type.value, probable_cause=definition.probable_cause,
            service_affecting=definition.service_affecting_for(request.severity))
        await conn.execute(
            f"""INSERT INTO {SCHEMA}.event_log (uuid, event_log_id, state, change, entity_type_id, entity_instance_id,
                    timestamp, severity, reason_text, event_log_type, probable_cause, service_affecting, owner,
                    version)
                VALUES ($1, $2, 'log', 'logged', $3, $4, $5, $6, $7, $8, $9, $10, $11, 1)""",
            uuidlib.UUID(record.uuid), record.event_log_id, record.entity_type_id, record.entity_instance_id,
            record.timestamp, record.severity, record.reason_text, record.event_log_type, record.probable_cause,
            record.service_affecting, origin.owner)
        event = msg.AlarmLogged(entity_id=record.uuid, version=1, owner=origin.owner, log=record)
        await self.outbox.add(conn, self._envelope("roost.alarm.logged", event, origin, f"log/{record.uuid}"))
        return record

    # -- reading --------------------------------------------------------------------------------------

    @staticmethod
    async def active(conn: AnyConnection | asyncpg.Pool) -> list[StoredAlarm]:
        """Every active alarm, by (alarm_id, entity_instance_id)."""
        return [_stored(r) for r in await conn.fetch(f"{_SELECT} ORDER BY alarm_id, entity_instance_id")]

    @staticmethod
    async def get(conn: AnyConnection | asyncpg.Pool, alarm_uuid: uuidlib.UUID | str) -> StoredAlarm | None:
        row = await conn.fetchrow(f"{_SELECT} WHERE uuid = $1", uuidlib.UUID(str(alarm_uuid)))
        return _stored(row) if row is not None else None

    @staticmethod
    async def history(conn: AnyConnection | asyncpg.Pool, *, alarm_uuid: uuidlib.UUID | str | None = None,
                      event_log_id: str | None = None, alarms: bool = True, logs: bool = True,
                      entity_prefix: str | None = None, include_suppress: bool = True, before: int | None = None,
                      limit: int = 100) -> list[HistoryRecord]:
        """The newest history records first: of one alarm instance or one id when asked, alarm records
        (set / clear) and/or customer logs, on an entity and its children, without the records of
        operator-suppressed ids unless ``include_suppress``, older than the record ``seq`` ``before``
        (the marker of the previous page)."""
        prefix = EntityInstanceId.parse(entity_prefix) if entity_prefix is not None else None
        rows = await conn.fetch(
            f"""SELECT uuid, seq, event_log_id, state, change, changes::text AS changes, cause, alarm_uuid,
                       entity_type_id, entity_instance_id, timestamp, severity, reason_text, event_log_type,
                       probable_cause, proposed_repair_action, service_affecting, suppression, owner, version,
                       recorded_at
                FROM {SCHEMA}.event_log e
                WHERE ($1::uuid IS NULL OR alarm_uuid = $1) AND ($2::text IS NULL OR event_log_id = $2)
                  AND ($3 OR state <> 'log') AND ($4 OR state = 'log')
                  AND ($5::text IS NULL OR entity_instance_id = $5 OR starts_with(entity_instance_id, $5 || '.'))
                  AND ($6 OR NOT EXISTS (SELECT 1 FROM {SCHEMA}.suppression s
                                         WHERE s.alarm_id = e.event_log_id AND s.suppressed))
                  AND ($7::bigint IS NULL OR seq < $7)
                ORDER BY seq DESC LIMIT $8""",
            uuidlib.UUID(str(alarm_uuid)) if alarm_uuid is not None else None, event_log_id, logs, alarms,
            str(prefix) if prefix is not None else None, include_suppress, before, limit)
        records = []
        for r in rows:
            data = dict(r)
            data["changes"] = json.loads(data["changes"])
            record = HistoryRecord(**data)
            if prefix is None or prefix.matches(EntityInstanceId.parse(record.entity_instance_id), prefix=True):
                records.append(record)
        return records

    @staticmethod
    async def active_counts(conn: AnyConnection | asyncpg.Pool) -> dict[str, int]:
        """Active alarms by severity."""
        rows = await conn.fetch(f"SELECT severity, count(*) AS n FROM {SCHEMA}.active_alarms GROUP BY severity")
        return {r["severity"]: int(r["n"]) for r in rows}

    # -- retention and suppression --------------------------------------------------------------------

    @staticmethod
    async def purge_history(conn: AnyConnection | asyncpg.Pool, older_than: timedelta) -> int:
        """Delete history records written more than ``older_than`` ago; returns how many."""
        status = await conn.execute(
            f"DELETE FROM {SCHEMA}.event_log WHERE recorded_at < now() - $1::interval", older_than)
        return int(status.split()[-1])

    @staticmethod
    async def suppressed_ids(conn: AnyConnection | asyncpg.Pool) -> frozenset[str]:
        rows = await conn.fetch(f"SELECT alarm_id FROM {SCHEMA}.suppression WHERE suppressed")
        return frozenset(r["alarm_id"] for r in rows)

    async def set_suppressed(self, conn: AnyConnection | asyncpg.Pool, alarm_id: str, suppressed: bool, *,
                             by: str | None = None) -> None:
        """Operator suppression of an alarm id (its alarms stay active and recorded)."""
        definition = self.catalogue.alarm(alarm_id)
        await conn.execute(
            f"""INSERT INTO {SCHEMA}.suppression (alarm_id, suppressed, updated_by) VALUES ($1, $2, $3)
                ON CONFLICT (alarm_id) DO UPDATE SET suppressed = $2, updated_by = $3, updated_at = now()""",
            definition.id, suppressed, by)

    # -- internals ------------------------------------------------------------------------------------

    async def _history(self, conn: AnyConnection, alarm: Alarm, *, state: str, change: str,
                       changes: list[dict[str, str]], owner: str, version: int, cause: str | None = None) -> None:
        await conn.execute(_INSERT_HISTORY, *_history_values(alarm, state=state, change=change, changes=changes,
                                                             owner=owner, version=version, cause=cause))

    def _event_envelope(self, type: str, data: dict[str, Any], origin: Origin, subject: str) -> Envelope:
        """``_envelope`` of an event whose ``data`` is already its model's JSON form (``_event_data``): the
        envelope is constructed, not validated again (its attributes are ours; the consumers validate)."""
        return Envelope.model_construct(
            id=self._uuids.text(), source=self.source, type=type, time=utcnow(), subject=subject,
            correlationid=origin.correlationid if origin.correlationid is not None else self._uuids.text(),
            causationid=origin.causationid, principal=origin.principal, data=data)

    def _envelope(self, type: str, data: Any, origin: Origin, subject: str) -> Envelope:
        attrs: dict[str, Any] = {"subject": subject, "causationid": origin.causationid,
                                 "principal": origin.principal}
        if origin.correlationid is not None:
            attrs["correlationid"] = origin.correlationid
        return self.registry.envelope(type, data, source=self.source, **attrs)

    async def _announce(self, conn: AnyConnection, type: str, event: Any, origin: Origin, alarm: Alarm,
                        version: int, kind: EventKind) -> None:
        envelope = self._envelope(type, event, origin, f"alarm/{alarm.uuid}")
        await self.outbox.add(conn, envelope)
        if not self.webhooks:
            return
        suppressed = await self._suppressed(conn, alarm.alarm_id)
        await webhooks.enqueue(conn, _notification(envelope, alarm, version, kind, suppressed))

    @staticmethod
    async def _suppressed(conn: AnyConnection, alarm_id: str) -> bool:
        return bool(await conn.fetchval(
            f"SELECT suppressed FROM {SCHEMA}.suppression WHERE alarm_id = $1", alarm_id))
