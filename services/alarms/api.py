"""The alarms REST API, in the shape of StarlingX FM v1 (same paths, list keys and field names).

* ``GET /v1/alarms``: the active alarms, ``{"alarms": [...], "next": "<url>"}``.  Filters are FM's repeated
  ``q.field`` / ``q.op`` / ``q.value`` (``q.type`` accepted and ignored) on ``uuid, alarm_id, alarm_type,
  entity_type_id, entity_instance_id, severity, probable_cause, suppression_status, timestamp,
  created_at, updated_at``; ops ``eq ne`` everywhere, ``lt le gt ge`` on severity (by rank: critical is
  the highest), alarm ids and times.  Unlike FM, every op is applied (FM honours ``eq`` only, as a
  substring match) and ``q`` still applies with a ``marker``.  ``limit`` (≤ 2000), ``marker`` (the uuid
  of the previous page's last item), ``sort_key`` / ``sort_dir`` (default: most severe first, then
  newest), ``include_suppress`` (operator-suppressed ids), ``include_masked`` (alarms masked by an
  inhibiting alarm such as host locked; roost's addition), ``expand`` (every field, not FM's short list);
* ``GET /v1/alarms/summary``: ``{"critical", "major", "minor", "warnings", "status"}`` of what a list shows;
* ``GET /v1/alarms/{uuid}``: one active alarm, every field; a masked alarm is shown with ``masked: true``
  (FM answers 404 for it);
* ``DELETE /v1/alarms/{uuid}`` (admin): an operator clear, recorded as a customer log (950.501), 204;
* ``GET /v1/event_log``: the history, newest first, ``{"event_log": [...], "next": ...}``; ``alarms`` /
  ``logs`` (FM's meaning: only alarm records / only customer logs), ``q`` on ``uuid, event_log_id,
  entity_type_id, entity_instance_id, severity, state, event_log_type, timestamp`` (and FM's ``start`` /
  ``end``), ``include_suppress``, ``expand``, ``limit``, ``marker``;
* ``GET /v1/event_log/{uuid}``: one record;
* ``GET /v1/event_suppression``: one entry per alarm id of the catalogue, ``{"event_suppression": [...]}``
  (``uuid``: a stable uuid of the alarm id), ``q`` on ``uuid, alarm_id, suppression_status``;
* ``GET /v1/event_suppression/{uuid or alarm_id}``: one entry;
* ``PATCH /v1/event_suppression/{uuid or alarm_id}`` (admin): FM's JSON patch
  ``[{"op": "replace", "path": "/suppression_status", "value": "suppressed"}]`` (or the plain object
  ``{"suppression_status": ...}``), recorded as a customer log (950.502).

Authentication: a bearer token (``Authorization: Bearer …``) or the same token in ``X-Auth-Token``, the
header StarlingX clients send; readers may read, admins may change.  Bad input (an invalid severity, an
unknown or malformed alarm id, a malformed entity id, an unknown q field or op, a value over 255
characters, a uuid that is not one) is a 400 with the reason, an unknown uuid a 404; error bodies never
repeat what the client sent.
"""

import re
import sys
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from schemas import alarms as msg
from schemas.envelope import Envelope, Principal
from services.alarms.catalogue import AlarmError, EventDefinition, Severity, UnknownAlarmId
from services.alarms.model import EntityInstanceId
from services.alarms.store import SCHEMA, HistoryRecord
from services.core.http import AdminPrincipal, ReaderPrincipal

if TYPE_CHECKING:
    from services.alarms.service import AlarmsService

log = structlog.get_logger("roost.alarms.api")

API_SOURCE = "roost/alarms-api"
LIMIT_MAX = 2000
"""FM's ``limit_max``."""
SCAN_BATCH = 500
SCAN_MAX = 20_000
"""The most history records one event log request reads: a filter matching few records answers a short (or
empty) page with ``next`` pointing where the scan stopped rather than reading the whole retention."""
TEXT_MAX = msg.TEXT_MAX
_ALARM_ID = re.compile(r"^[0-9]{3}\.[0-9]{3}$")
_SUPPRESSION_NS = uuidlib.UUID("8f0b7f3e-4a55-5c3b-9d1e-726f6f737400")
_NO_SUPPRESSION = "no alarm id with this uuid or id in the catalogue"
_RANK = {s.value: s.rank for s in Severity}

Reader = ReaderPrincipal        # services.core.http: bearer or X-Auth-Token
Admin = AdminPrincipal


# -- response models ------------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AlarmOut(_Out):
    """An active alarm, FM's field names.  Without ``expand`` a list shows FM's short form (uuid, alarm_id,
    entity_instance_id, severity, timestamp, reason_text, suppression_status, mgmt_affecting,
    degrade_affecting); ``mgmt_affecting`` / ``degrade_affecting`` are FM's strings "True" / "False"."""

    uuid: str
    alarm_id: str
    entity_instance_id: str
    severity: msg.SeverityName
    timestamp: datetime
    reason_text: str
    suppression_status: Literal["suppressed", "unsuppressed"]
    mgmt_affecting: Literal["True", "False"]
    degrade_affecting: Literal["True", "False"]
    alarm_state: Literal["set", "clear"] | None = None
    entity_type_id: str | None = None
    alarm_type: str | None = None
    probable_cause: str | None = None
    proposed_repair_action: str | None = None
    service_affecting: bool | None = None
    suppression: bool | None = None
    inhibit_alarms: bool | None = None
    masked: bool | None = Field(default=None, description="masked by an inhibiting alarm (roost)")
    owner: str | None = Field(default=None, description="the service that raised it (roost)")
    version: int | None = Field(default=None, description="grows by one per raise, change and clear (roost)")
    created_at: datetime | None = None
    updated_at: datetime | None = None


class AlarmCollection(_Out):
    alarms: list[AlarmOut]
    next: str | None = Field(default=None, description="the URL of the next page; absent on the last")


class SummaryOut(_Out):
    critical: int
    major: int
    minor: int
    warnings: int
    status: Literal["OK", "degraded", "critical"]


class EventLogOut(_Out):
    """A history record (alarm set / clear, customer log), FM's field names, short unless expanded."""

    uuid: str
    event_log_id: str
    entity_instance_id: str
    severity: msg.SeverityName
    timestamp: datetime
    reason_text: str
    state: Literal["set", "clear", "log"]
    suppression_status: Literal["suppressed", "unsuppressed"]
    entity_type_id: str | None = None
    event_log_type: str | None = None
    probable_cause: str | None = None
    proposed_repair_action: str | None = None
    service_affecting: bool | None = None
    suppression: bool | None = None
    change: Literal["raised", "changed", "cleared", "logged"] | None = Field(default=None, description="roost")
    cause: str | None = Field(default=None, description="why it cleared (roost)")
    alarm_uuid: str | None = Field(default=None, description="the alarm instance (roost)")
    owner: str | None = Field(default=None, description="roost")
    version: int | None = Field(default=None, description="roost")


class EventLogCollection(_Out):
    event_log: list[EventLogOut]
    next: str | None = None


class SuppressionOut(_Out):
    uuid: str
    alarm_id: str
    description: str
    suppression_status: Literal["suppressed", "unsuppressed"]


class SuppressionCollection(_Out):
    event_suppression: list[SuppressionOut]


class PatchOp(BaseModel):
    model_config = ConfigDict(extra="forbid")

    op: Literal["replace"]
    path: Literal["/suppression_status"]
    value: Literal["suppressed", "unsuppressed"]


class SuppressionPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    suppression_status: Literal["suppressed", "unsuppressed"]


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "bad input; the reason is in `detail`"},
    401: {"description": "no token, or an invalid one"},
    403: {"description": "the token's role does not allow this"},
    404: {"description": "no such item"},
    503: {"description": "the service has not started or cannot check tokens"},
}


# -- query filters --------------------------------------------------------------------------------------

_Kind = Literal["uuid", "alarm_id", "entity", "severity", "time", "text", "status", "state"]
_ORDERED: frozenset[_Kind] = frozenset({"alarm_id", "severity", "time"})
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b}

ALARM_FIELDS: dict[str, _Kind] = {
    "uuid": "uuid", "alarm_id": "alarm_id", "alarm_type": "text", "entity_type_id": "text",
    "entity_instance_id": "entity", "severity": "severity", "probable_cause": "text",
    "suppression_status": "status", "timestamp": "time", "created_at": "time", "updated_at": "time"}
EVENT_FIELDS: dict[str, _Kind] = {
    "uuid": "uuid", "event_log_id": "alarm_id", "entity_type_id": "text", "entity_instance_id": "entity",
    "severity": "severity", "state": "state", "event_log_type": "text", "timestamp": "time",
    "start": "time", "end": "time"}
ALARM_SORT_KEYS = ("uuid", "alarm_id", "entity_type_id", "entity_instance_id", "severity", "timestamp",
                   "created_at", "updated_at", "alarm_type", "probable_cause")


def _bad(reason: str) -> HTTPException:
    return HTTPException(status.HTTP_400_BAD_REQUEST, reason)


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: Any
    kind: _Kind

    def holds(self, item: Any) -> bool:
        attr = {"start": "timestamp", "end": "timestamp"}.get(self.field, self.field)
        return _OPS[self.op](_comparable(getattr(item, attr), self.kind), self.value)


def _comparable(value: Any, kind: _Kind) -> Any:
    if kind == "severity":
        return _RANK[str(value)]
    if kind == "time":
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return str(value)


def _parse_value(field: str, kind: _Kind, text: str, service: "AlarmsService") -> Any:
    if kind == "uuid":
        try:
            return str(uuidlib.UUID(text))
        except ValueError:
            raise _bad(f"q.value for {field} is not a uuid") from None
    if kind == "alarm_id":
        if not _ALARM_ID.match(text):
            raise _bad(f"q.value for {field} is not an alarm id (GGG.EEE)")
        try:
            return service.store.catalogue.get(text).id
        except UnknownAlarmId:
            raise _bad(f"q.value for {field} is an unknown alarm id") from None
    if kind == "entity":
        try:
            return str(EntityInstanceId.parse(text))
        except AlarmError:
            raise _bad(f"q.value for {field} is not an entity instance id (key=value[.key=value...])") from None
    if kind == "severity":
        if text not in _RANK:
            raise _bad(f"q.value for {field} is not a severity (critical, major, minor, warning)")
        return _RANK[text]
    if kind == "time":
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise _bad(f"q.value for {field} is not an ISO 8601 time") from None
        return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    if kind == "status" and text not in ("suppressed", "unsuppressed"):
        raise _bad(f"q.value for {field} is not suppressed or unsuppressed")
    if kind == "state" and text not in ("set", "clear", "log"):
        raise _bad(f"q.value for {field} is not set, clear or log")
    return text


def parse_query(fields: Sequence[str], ops: Sequence[str], values: Sequence[str], allowed: dict[str, _Kind],
                service: "AlarmsService") -> list[Condition]:
    """FM's ``q``: parallel lists of fields, ops (default ``eq``) and values; 400 with the reason."""
    if len(fields) != len(values) or (ops and len(ops) != len(fields)):
        raise _bad("q.field, q.op and q.value must be given the same number of times")
    conditions = []
    for i, (field, text) in enumerate(zip(fields, values, strict=True)):
        op = ops[i] if ops else "eq"
        if len(field) > TEXT_MAX or len(text) > TEXT_MAX or len(op) > TEXT_MAX:
            raise _bad(f"a q parameter is longer than {TEXT_MAX} characters")
        if field not in allowed:
            raise _bad(f"q.field must be one of {', '.join(sorted(allowed))}")
        if op not in _OPS:
            raise _bad("q.op must be one of eq, ne, lt, le, gt, ge")
        kind = allowed[field]
        if field == "start":
            op = "ge"
        elif field == "end":
            op = "le"
        elif op not in ("eq", "ne") and kind not in _ORDERED:
            raise _bad(f"q.op for {field} must be eq or ne")
        conditions.append(Condition(field, op, _parse_value(field, kind, text, service), kind))
    return conditions


def _uuid_path(value: str) -> str:
    if len(value) > TEXT_MAX:
        raise _bad(f"the uuid is longer than {TEXT_MAX} characters")
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        raise _bad("not a uuid") from None


def _next_url(request: Request, marker: str) -> str:
    return str(request.url.include_query_params(marker=marker))


def _page_after(items: list[Any], marker: str | None, key: Callable[[Any], str]) -> list[Any]:
    if marker is None:
        return items
    wanted = _uuid_path(marker)
    for i, item in enumerate(items):
        if key(item) == wanted:
            return items[i + 1:]
    raise _bad("marker is not an item of this list (gone, or filtered out)")


def _fm_bool(value: bool) -> Literal["True", "False"]:
    return "True" if value else "False"


def _alarm_out(alarm: msg.ActiveAlarm, expand: bool) -> AlarmOut:
    out: dict[str, Any] = {
        "uuid": alarm.uuid, "alarm_id": alarm.alarm_id, "entity_instance_id": alarm.entity_instance_id,
        "severity": alarm.severity, "timestamp": alarm.timestamp, "reason_text": alarm.reason_text,
        "suppression_status": alarm.suppression_status, "mgmt_affecting": _fm_bool(alarm.mgmt_affecting),
        "degrade_affecting": _fm_bool(alarm.degrade_affecting)}
    if expand:
        out.update({f: getattr(alarm, f) for f in (
            "alarm_state", "entity_type_id", "alarm_type", "probable_cause", "proposed_repair_action",
            "service_affecting", "suppression", "inhibit_alarms", "masked", "owner", "version", "created_at",
            "updated_at")})
    return AlarmOut(**out)


def _event_out(record: HistoryRecord, suppressed: frozenset[str], expand: bool) -> EventLogOut:
    out: dict[str, Any] = {
        "uuid": str(record.uuid), "event_log_id": record.event_log_id,
        "entity_instance_id": record.entity_instance_id, "severity": record.severity,
        "timestamp": record.timestamp, "reason_text": record.reason_text, "state": record.state,
        "suppression_status": "suppressed" if record.state != "log" and record.event_log_id in suppressed
        else "unsuppressed"}
    if expand:
        out.update({f: getattr(record, f) for f in (
            "entity_type_id", "event_log_type", "probable_cause", "proposed_repair_action", "service_affecting",
            "suppression", "change", "cause", "owner", "version")})
        out["alarm_uuid"] = str(record.alarm_uuid) if record.alarm_uuid is not None else None
    return EventLogOut(**out)


def _description(definition: EventDefinition) -> str:
    text = definition.description
    for candidate in (*text.common, text.critical, text.major, text.minor, text.warning):
        if candidate:
            return str(candidate)[:TEXT_MAX]
    return ""


def suppression_uuid(alarm_id: str) -> str:
    """The stable uuid of an alarm id's event_suppression entry."""
    return str(uuidlib.uuid5(_SUPPRESSION_NS, alarm_id))


def _envelope(type: str, principal: Principal, data: dict[str, Any]) -> Envelope:
    return Envelope(source=API_SOURCE, type=type, principal=principal, data=data)


# -- the router -----------------------------------------------------------------------------------------


def build_router(service: "AlarmsService") -> APIRouter:
    """The FM-shaped REST API of ``service`` (answers 503 until the service has started)."""
    router = APIRouter(prefix="/v1", tags=["alarms"], responses=_ERRORS)

    def started() -> "AlarmsService":
        if getattr(service, "_store", None) is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the alarms service has not started")
        return service

    Service = Annotated[Any, Depends(started)]
    QField = Annotated[list[str], Query(alias="q.field", description="a field to filter on (repeat for more)")]
    QOp = Annotated[list[str], Query(alias="q.op", description="eq, ne, lt, le, gt, ge (default eq)")]
    QValue = Annotated[list[str], Query(alias="q.value", description="the value, one per q.field")]
    QType = Annotated[list[str], Query(alias="q.type", description="accepted for FM clients; ignored")]
    Marker = Annotated[str | None, Query(max_length=TEXT_MAX, description="the uuid of the previous page's last item")]

    @router.get("/alarms", response_model=AlarmCollection, response_model_exclude_none=True,
                summary="List the active alarms")
    async def list_alarms(request: Request, _: Reader, svc: Service, q_field: QField = [],  # noqa: B006
                          q_op: QOp = [], q_value: QValue = [], q_type: QType = [],  # noqa: B006
                          limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = LIMIT_MAX, marker: Marker = None,
                          sort_key: Annotated[str | None, Query(max_length=64)] = None,
                          sort_dir: Annotated[Literal["asc", "desc"], Query()] = "asc",
                          include_suppress: bool = False, include_masked: bool = False,
                          expand: bool = False) -> AlarmCollection:
        conditions = parse_query(q_field, q_op, q_value, ALARM_FIELDS, svc)
        if sort_key is not None and sort_key not in ALARM_SORT_KEYS:
            raise _bad(f"sort_key must be one of {', '.join(ALARM_SORT_KEYS)}")
        # every visible alarm (the bus command's model caps its limit at 10,000; paging here is by marker)
        items = await svc.list_alarms(msg.AlarmList.model_construct(
            include_suppress=include_suppress, include_masked=include_masked, alarm_id=None, severity=None,
            entity_prefix=None, limit=sys.maxsize))
        items = [a for a in items if all(c.holds(a) for c in conditions)]
        if sort_key is not None:
            kind = ALARM_FIELDS.get(sort_key, "text")
            items.sort(key=lambda a: (_comparable(getattr(a, sort_key), kind), a.uuid), reverse=sort_dir == "desc")
        rest = _page_after(items, marker, lambda a: a.uuid)
        page = rest[:limit]
        more = len(rest) > limit
        return AlarmCollection(alarms=[_alarm_out(a, expand) for a in page],
                               next=_next_url(request, page[-1].uuid) if more else None)

    @router.get("/alarms/summary", response_model=SummaryOut, summary="Count the active alarms by severity")
    async def summary(_: Reader, svc: Service, include_suppress: bool = False) -> SummaryOut:
        result = await svc.summary(include_suppress=include_suppress)
        return SummaryOut(**result.model_dump())

    @router.get("/alarms/{alarm_uuid}", response_model=AlarmOut, response_model_exclude_none=True,
                summary="Show one active alarm")
    async def show_alarm(alarm_uuid: str, _: Reader, svc: Service) -> AlarmOut:
        wanted = _uuid_path(alarm_uuid)
        try:
            alarm = await svc.show(wanted)
        except AlarmError:          # none active with this uuid (the only error left once it parsed)
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no active alarm with this uuid") from None
        return _alarm_out(alarm, expand=True)

    @router.delete("/alarms/{alarm_uuid}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
                   summary="Clear one active alarm (operator; recorded as a customer log)")
    async def delete_alarm(alarm_uuid: str, who: Admin, svc: Service) -> Response:
        wanted = _uuid_path(alarm_uuid)
        envelope = _envelope("roost.cmd.alarm.clear", who, {"uuid": wanted})
        if not await svc.operator_clear(wanted, envelope):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no active alarm with this uuid")
        log.info("alarm cleared by an operator", uuid=wanted, by=who.name)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    async def _seq_of(svc: "AlarmsService", record_uuid: str) -> int | None:
        """The ``seq`` of the event log record ``record_uuid`` (None: no such record)."""
        seq: int | None = await svc.pool.fetchval(f"SELECT seq FROM {SCHEMA}.event_log WHERE uuid = $1",
                                                  uuidlib.UUID(record_uuid))
        return seq

    @router.get("/event_log", response_model=EventLogCollection, response_model_exclude_none=True,
                summary="List the event log (alarm history and customer logs), newest first")
    async def event_log(request: Request, _: Reader, svc: Service, q_field: QField = [],  # noqa: B006
                        q_op: QOp = [], q_value: QValue = [], q_type: QType = [],  # noqa: B006
                        limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = 100, marker: Marker = None,
                        alarms: bool = False, logs: bool = False, include_suppress: bool = False,
                        expand: bool = False) -> EventLogCollection:
        conditions = parse_query(q_field, q_op, q_value, EVENT_FIELDS, svc)
        before: int | None = None
        if marker is not None:
            before = await _seq_of(svc, _uuid_path(marker))
            if before is None:
                raise _bad("marker is not a record of the event log")
        want_alarms, want_logs = (alarms or not logs), (logs or not alarms)
        eq = {c.field: c.value for c in conditions if c.op == "eq"}
        if "uuid" in eq:            # one record at most: start the scan right at it
            seq = await _seq_of(svc, eq["uuid"])
            if seq is None or (before is not None and seq >= before):
                return EventLogCollection(event_log=[])
            before = seq + 1
        page: list[HistoryRecord] = []
        scanned, exhausted, last = 0, False, None
        while len(page) <= limit and not exhausted and scanned < SCAN_MAX:
            batch = await svc.store.history(svc.pool, event_log_id=eq.get("event_log_id"),
                                            entity_prefix=eq.get("entity_instance_id"), alarms=want_alarms,
                                            logs=want_logs, include_suppress=include_suppress, before=before,
                                            limit=SCAN_BATCH)
            exhausted = len(batch) < SCAN_BATCH
            scanned += len(batch)
            if batch:
                before, last = batch[-1].seq, batch[-1]
            page.extend(r for r in batch if all(c.holds(r) for c in conditions))
        more = len(page) > limit
        page = page[:limit]
        suppressed = await svc.store.suppressed_ids(svc.pool)
        if more:
            next_marker: str | None = str(page[-1].uuid)
        elif not exhausted and last is not None:    # scan bound reached: carry on from where it stopped
            next_marker = str(last.uuid)
        else:
            next_marker = None
        return EventLogCollection(event_log=[_event_out(r, suppressed, expand) for r in page],
                                  next=_next_url(request, next_marker) if next_marker else None)

    @router.get("/event_log/{event_uuid}", response_model=EventLogOut, response_model_exclude_none=True,
                summary="Show one event log record")
    async def show_event(event_uuid: str, _: Reader, svc: Service) -> EventLogOut:
        seq = await _seq_of(svc, _uuid_path(event_uuid))
        records = [] if seq is None else await svc.store.history(svc.pool, before=seq + 1, limit=1)
        if not records or records[0].seq != seq:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no event log record with this uuid")
        return _event_out(records[0], await svc.store.suppressed_ids(svc.pool), expand=True)

    async def _suppressions(svc: "AlarmsService") -> list[SuppressionOut]:
        suppressed = await svc.store.suppressed_ids(svc.pool)
        return [SuppressionOut(uuid=suppression_uuid(d.id), alarm_id=d.id, description=_description(d),
                               suppression_status="suppressed" if d.id in suppressed else "unsuppressed")
                for d in sorted(svc.store.catalogue.alarms(), key=lambda d: d.id)]

    @router.get("/event_suppression", response_model=SuppressionCollection,
                summary="The operator suppression status of every alarm id")
    async def list_suppression(_: Reader, svc: Service, q_field: QField = [],  # noqa: B006
                               q_op: QOp = [], q_value: QValue = [], q_type: QType = [],  # noqa: B006
                               ) -> SuppressionCollection:
        fields: dict[str, _Kind] = {"uuid": "uuid", "alarm_id": "alarm_id", "suppression_status": "status"}
        conditions = parse_query(q_field, q_op, q_value, fields, svc)
        items = [s for s in await _suppressions(svc) if all(c.holds(s) for c in conditions)]
        return SuppressionCollection(event_suppression=items)

    def _alarm_id_of(ident: str, svc: "AlarmsService") -> str:
        if len(ident) > TEXT_MAX:
            raise _bad(f"the id is longer than {TEXT_MAX} characters")
        ids = {d.id for d in svc.store.catalogue.alarms()}
        if _ALARM_ID.match(ident):
            alarm_id = ident
        else:
            wanted = _uuid_path(ident)
            alarm_id = next((i for i in ids if suppression_uuid(i) == wanted), "")
        if alarm_id not in ids:
            raise HTTPException(status.HTTP_404_NOT_FOUND, _NO_SUPPRESSION)
        return alarm_id

    @router.get("/event_suppression/{ident}", response_model=SuppressionOut,
                summary="The operator suppression status of one alarm id (by its entry's uuid or the alarm id)")
    async def show_suppression(ident: str, _: Reader, svc: Service) -> SuppressionOut:
        alarm_id = _alarm_id_of(ident, svc)
        return next(s for s in await _suppressions(svc) if s.alarm_id == alarm_id)

    @router.patch("/event_suppression/{ident}", response_model=SuppressionOut,
                  summary="Suppress or unsuppress an alarm id (by its entry's uuid or the alarm id)")
    async def patch_suppression(ident: str, who: Admin, svc: Service,
                                patch: Annotated[list[PatchOp] | SuppressionPatch, Body()]) -> SuppressionOut:
        alarm_id = _alarm_id_of(ident, svc)
        definition = svc.store.catalogue.alarm(alarm_id)
        if isinstance(patch, list):
            if not patch:
                raise _bad("the patch is empty")
            wanted_status = patch[-1].value
        else:
            wanted_status = patch.suppression_status
        suppress = wanted_status == "suppressed"
        type = "roost.cmd.alarm.suppress" if suppress else "roost.cmd.alarm.unsuppress"
        try:
            await svc.suppress(alarm_id, suppress, _envelope(type, who, {"alarm_id": alarm_id}))
        except AlarmError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, _NO_SUPPRESSION) from None
        return SuppressionOut(uuid=suppression_uuid(alarm_id), alarm_id=alarm_id,
                              description=_description(definition), suppression_status=wanted_status)

    return router
