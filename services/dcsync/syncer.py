"""What the system controller does with one subcloud's agent: connect, join, stream, audit.

``AgentLink`` asks the agent (``roost.cmd.sync.<subcloud>.<verb>``), under the service-wide limit of
requests in flight; no answer, or a refusal, is ``AgentError``.

``Syncer`` holds no state of its own between calls; the service keeps the cursors and agreements:

* ``connect``: ``hello`` (the subcloud's columns and cursors), the agreement per endpoint (the columns both
  sides have, ``tables.agree``), ``configure`` (the agent installs its digest triggers for them);
* ``stream``: from a lane's cursor to the head, one batch in flight, each batch's idempotency key its range;
* ``audit``: in one repeatable-read snapshot of the controller's database: table roots, then the bucket
  digests of the tables that differ, then the rows of the buckets that differ; the central copy wins
  (rows missing or different are upserted, rows that came from the controller and are gone there are
  deleted, rows that never came from it are reported or deleted by policy).  ``resync`` (a join, or a
  subcloud that fell behind the change log) repairs whatever the cursor says and then sets the cursors
  to the snapshot's head; otherwise an audit of a subcloud whose cursor is not at the snapshot's head is
  put off (its digests differ for a reason the stream is fixing);
* ``conflicts``: a joining subcloud's rows with a central row's natural key and another id; ``adopt``
  deletes them at the subcloud (the central rows follow), ``refuse`` reports them and the join fails.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from pydantic import BaseModel

from schemas import dcsync as msg
from services.core.bus.abc import RequestTimeout
from services.core.bus.bus import Bus
from services.dcsync import audit as compare
from services.dcsync.agent import command_subject
from services.dcsync.source import Source
from services.dcsync.tables import LANES, Agreement, ResolvedTable, agree
from services.dcsync.tracking import Root, RowMark

log = structlog.get_logger("roost.dcsync.syncer")

M = TypeVar("M", bound=BaseModel)
ROWS_BUCKETS_PER_ASK = 256
MAX_KEPT_LOCAL = 5000          # keys of the subcloud's own rows one resync's last message may carry


class AgentError(Exception):
    def __init__(self, reason: str, *, unanswered: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unanswered = unanswered


class AgentLink:
    def __init__(self, bus: Bus, subcloud: str, *, timeout: float, limit: asyncio.Semaphore) -> None:
        self.bus = bus
        self.subcloud = subcloud
        self.timeout = timeout
        self.limit = limit

    async def ask(self, verb: str, data: BaseModel, model: type[M], *, key: str | None = None) -> M:
        envelope = self.bus.envelope(f"roost.cmd.sync.{verb}", data, idempotencykey=key or str(uuid.uuid4()),
                                     deadline=None)
        async with self.limit:
            try:
                reply = await self.bus.request(envelope, subject=command_subject(self.subcloud, verb),
                                               timeout=self.timeout)
            except (RequestTimeout, TimeoutError):
                raise AgentError(f"the agent of {self.subcloud} did not answer {verb} within {self.timeout:g} s",
                                 unanswered=True) from None
        if not reply.ok:
            raise AgentError(f"the agent of {self.subcloud} refused {verb}: {reply.reason}",
                             unanswered=reply.reason is not None and "no consumer" in reply.reason)
        return model.model_validate(reply.result)


@dataclass(slots=True)
class Connected:
    hello: msg.SyncHelloResult
    agreements: dict[str, Agreement]
    cursors: dict[str, dict[str, int]]


@dataclass(slots=True)
class Streamed:
    cursor: int
    applied: int = 0
    failed: list[msg.FailedChange] = field(default_factory=list)
    # commit time of the newest change applied, for the commit-to-applied latency
    newest_at: list[datetime] = field(default_factory=list)


def agreement_wire(agreement: Agreement) -> list[dict[str, Any]]:
    return [{"name": t.name, "pk": list(t.pk), "columns": list(t.columns), "lane": t.lane} for t in agreement.tables]


def skew_wire(agreement: Agreement) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"table": s.table, "only_central": list(s.only_central),
                                  "only_subcloud": list(s.only_subcloud)} for s in agreement.skews]
    out += [{"table": t, "missing_at_subcloud": True} for t in agreement.missing_tables]
    return out


class Syncer:
    def __init__(self, sources: dict[str, Source], *, batch_size: int, local_only: str = "report") -> None:
        self.sources = sources
        self.batch_size = batch_size
        self.local_only = local_only

    async def connect(self, link: AgentLink) -> Connected:
        hello = await link.ask("hello", msg.SyncHello(), msg.SyncHelloResult)
        agreements: dict[str, Agreement] = {}
        cursors: dict[str, dict[str, int]] = {}
        for endpoint, source in self.sources.items():
            theirs = hello.endpoints.get(endpoint)
            if theirs is None:
                continue
            agreement = agree(source.tables, theirs.tables)
            await link.ask("configure", msg.SyncConfigure(
                endpoint=endpoint,
                tables=[msg.SyncedTable.model_validate(t) for t in agreement_wire(agreement)]), msg.SyncConfigured)
            agreements[endpoint] = agreement
            cursors[endpoint] = {lane: theirs.cursors.get(lane, 0) for lane in LANES}
        return Connected(hello, agreements, cursors)

    async def redigest(self, link: AgentLink, endpoint: str, agreement: Agreement) -> dict[str, int]:
        """The subcloud recomputes its digests from its rows; the tables where they were wrong."""
        done = await link.ask("configure", msg.SyncConfigure(
            endpoint=endpoint, tables=[msg.SyncedTable.model_validate(t) for t in agreement_wire(agreement)],
            redigest=True), msg.SyncConfigured)
        return done.redigested

    async def stream(self, link: AgentLink, endpoint: str, lane: str, cursor: int,
                     agreement: Agreement, *, batches: int | None = None) -> Streamed:
        """Send the lane's changes from ``cursor`` up to the head (at most ``batches`` batches), a batch at a
        time."""
        source = self.sources[endpoint]
        out = Streamed(cursor)
        synced = {t.name: t for t in agreement.tables}
        sent = 0
        while out.cursor < source.heads[lane] and (batches is None or sent < batches):
            sent += 1
            changes = await source.changes(lane, out.cursor, self.batch_size)
            if not changes:
                break
            upto = changes[-1].seq
            wire = [_cut(c.wire(), synced) for c in changes if c.table in synced]
            applied = await link.ask("apply", msg.SyncApply(
                endpoint=endpoint, lane=lane, changes=[msg.ChangeWire.model_validate(w) for w in wire],
                upto=upto), msg.SyncApplied, key=f"{endpoint}:{lane}:{out.cursor}-{upto}")
            out.cursor = max(applied.cursor, upto) if not applied.duplicate else max(out.cursor, applied.cursor)
            out.applied += applied.applied
            out.failed.extend(applied.failed)
        return out

    async def conflicts(self, link: AgentLink, endpoint: str, agreement: Agreement, policy: str) -> list[str]:
        """Natural-key clashes; with ``adopt`` the subcloud's rows are deleted (the central ones follow)."""
        source = self.sources[endpoint]
        found: list[tuple[ResolvedTable, dict[str, Any], dict[str, Any]]] = []
        for t in agreement.tables:
            if not t.natural_key or not all(c in t.columns for c in t.natural_key):
                continue
            theirs = await link.ask("keys", msg.SyncKeysQuery(endpoint=endpoint, table=t.name,
                                                              columns=list(t.natural_key)), msg.SyncKeys)
            mine = await source.natural_key_index(t.name, t.natural_key, t.pk, _key)
            for k in theirs.keys:
                central_pk = mine.get(_key(k.key))
                if central_pk is not None and central_pk != k.pk:
                    found.append((t, k.key, k.pk))
        described = [f"{t.name} {key} is {pk} here, {'adopted' if policy == 'adopt' else 'refused'}"
                     for t, key, pk in found]
        if found and policy == "adopt":
            deletes = [{"seq": 0, "tbl": t.name, "op": "D", "pk": pk, "row": None, "version": 0}
                       for t, _, pk in reversed(found)]
            result = await link.ask("apply", msg.SyncApply(
                endpoint=endpoint, lane="main", changes=[msg.ChangeWire.model_validate(d) for d in deletes],
                upto=0, repair=True), msg.SyncApplied)
            if result.failed:
                raise AgentError(f"adopting {len(found)} rows failed: {result.failed[0].error}")
        return described

    async def audit(self, link: AgentLink, endpoint: str, agreement: Agreement, cursors: dict[str, int], *,
                    resync: bool) -> tuple[msg.AuditReport, dict[str, int]] | None:
        """Compare and repair; the report and the cursors afterwards.  None: put off (the subcloud's cursor is
        not at the snapshot's head, and this is not a resync)."""
        source = self.sources[endpoint]
        started_at = datetime.now(UTC)
        started = time.monotonic()
        names = [t.name for t in agreement.tables]
        tracked = {t.name: t for t in source.tables}
        plain = [t.name for t in agreement.tables if tracked[t.name].columns == t.columns]
        skewed = [t for t in agreement.tables if tracked[t.name].columns != t.columns]
        report = msg.AuditReport(subcloud=link.subcloud, endpoint=endpoint, clean=True,
                                 tables_compared=len(names), started_at=started_at, seconds=0.0)
        if not resync:   # the cheap look first: the cached roots of the head, no transaction held
            snap = await source.snapshot()
            if not at_head(cursors, snap.heads):
                return None
            if not skewed:
                theirs = await link.ask("digests", msg.SyncDigestQuery(endpoint=endpoint, tables=names),
                                        msg.SyncDigests)
                if at_head(theirs.cursors, snap.heads) and not compare.differing_tables(
                        {n: snap.roots[n] for n in names}, theirs.roots):
                    report.seconds = time.monotonic() - started
                    return report, cursors
        async with source.snapshot_conn() as (conn, heads):
            if not resync and not at_head(cursors, heads):
                return None
            head = max(heads.values(), default=0)
            mine = await source.tracker.roots(conn, plain)
            computed: dict[str, tuple[dict[int, Root], list[RowMark]]] = {}
            for t in skewed:
                computed[t.name] = await source.tracker.computed_buckets(conn, t)
                buckets = computed[t.name][0]
                d = 0
                for r in buckets.values():
                    d ^= r.digest
                mine[t.name] = Root(d, sum(r.rows for r in buckets.values()))
            theirs = await link.ask("digests", msg.SyncDigestQuery(endpoint=endpoint, tables=names),
                                    msg.SyncDigests)
            unordered = set(compare.differing_tables(mine, theirs.roots))
            differing = [n for n in names if n in unordered]     # parents first
            report.tables_differing = differing
            repairs: list[tuple[ResolvedTable, compare.RowPlan]] = []
            if differing:
                their_buckets = (await link.ask("digests", msg.SyncDigestQuery(
                    endpoint=endpoint, tables=differing, buckets_of=differing), msg.SyncDigests)).buckets
                for name in differing:
                    table = agreement.table(name)
                    if name in computed:
                        my_buckets, all_marks = computed[name]
                    else:
                        my_buckets, all_marks = await source.tracker.buckets(conn, name), []
                    diff_buckets = compare.differing_buckets(my_buckets, their_buckets.get(name, {}))
                    report.buckets_compared += len(diff_buckets)
                    central_marks: list[RowMark] = []
                    subcloud_marks: list[RowMark] = []
                    for i in range(0, len(diff_buckets), ROWS_BUCKETS_PER_ASK):
                        part = diff_buckets[i:i + ROWS_BUCKETS_PER_ASK]
                        if name in computed:
                            wanted = set(part)
                            central_marks += [m for m in all_marks if m.bucket in wanted]
                        else:
                            central_marks += await source.tracker.bucket_rows(conn, name, part)
                        rows = await link.ask("rows", msg.SyncRowsQuery(endpoint=endpoint, table=name,
                                                                        buckets=part), msg.SyncRows)
                        subcloud_marks += [RowMark(r.pk, r.hash, r.version) for r in rows.rows]
                    report.rows_compared += len(central_marks) + len(subcloud_marks)
                    plan = compare.plan_rows(central_marks, subcloud_marks)
                    if not plan.empty:
                        repairs.append((table, plan))
            # upserts parents first, deletes children first
            version = head
            for table, plan in repairs:
                current: list[dict[str, Any]] = []
                for i in range(0, len(plan.upsert), 1000):
                    current += await source.tracker.read_rows(conn, table, plan.upsert[i:i + 1000])
                changes = [{"seq": 0, "tbl": table.name, "op": "U", "pk": {k: r[k] for k in table.pk}, "row": r,
                            "version": version} for r in current]
                failed = await self._send_repairs(link, endpoint, changes)
                report.repairs.append(msg.TableRepair(table=table.name, upserted=len(changes) - failed,
                                                      local_only=len(plan.local_only), failed=failed))
            for table, plan in reversed(repairs):
                gone = list(plan.delete) + (list(plan.local_only) if self.local_only == "delete" else [])
                if not gone:
                    continue
                changes = [{"seq": 0, "tbl": table.name, "op": "D", "pk": pk, "row": None, "version": version}
                           for pk in gone]
                failed = await self._send_repairs(link, endpoint, changes)
                entry = next(r for r in report.repairs if r.table == table.name)
                entry.deleted = len(changes) - failed
                entry.failed += failed
        after = dict(cursors)
        if resync:
            # the rows the subcloud had that never came from the controller and are equal to its rows (a join
            # over rows already there) came from it: they take the snapshot's version, so that an audit deletes
            # them once the controller no longer has them; those only the subcloud has stay its own
            # (more of those than one message should carry: nothing adopted, as before)
            keep = {} if self.local_only == "delete" else {
                table.name: plan.local_only for table, plan in repairs if plan.local_only}
            adopt = head if head > 0 and sum(len(pks) for pks in keep.values()) <= MAX_KEPT_LOCAL else None
            for i, lane in enumerate(LANES):
                final = msg.SyncApply(endpoint=endpoint, lane=lane, changes=[], upto=heads[lane], set_cursor=True)
                adopted = i == 0 and adopt is not None and await self._adopting(link, final, adopt, keep)
                if not adopted:
                    await link.ask("apply", final, msg.SyncApplied, key=f"resync:{uuid.uuid4()}")
                after[lane] = heads[lane]
        report.repairs = [r for r in report.repairs if r.upserted or r.deleted or r.local_only or r.failed]
        report.clean = not any(r.upserted or r.deleted or r.failed for r in report.repairs)
        report.seconds = time.monotonic() - started
        return report, after

    @staticmethod
    async def _adopting(link: AgentLink, final: msg.SyncApply, version: int,
                        keep: dict[str, list[dict[str, Any]]]) -> bool:
        """A resync's last message with the adoption of the rows equal to the controller's; False when the agent
        refused it: one of an earlier roost refuses fields it does not know (the controller is upgraded first),
        and the resync then ends as it did there, the subcloud's rows keeping their versions."""
        try:
            await link.ask("apply", final.model_copy(update={"adopt_version": version, "keep_local": keep}),
                           msg.SyncApplied, key=f"resync:{uuid.uuid4()}")
        except AgentError as exc:
            if exc.unanswered:
                raise
            log.warning("the subcloud's agent refused the adoption of rows equal to the controller's (an earlier "
                        "version?); they stay its own", subcloud=link.subcloud, endpoint=final.endpoint,
                        reason=exc.reason)
            return False
        return True

    async def _send_repairs(self, link: AgentLink, endpoint: str, changes: Sequence[dict[str, Any]]) -> int:
        """Send repairs; those that fail are sent again while each pass gets more of them in (rows of a table
        that references itself, a project and its domain, arrive in no particular order).  The failures left."""
        pending = list(changes)
        while pending:
            failed_keys: set[str] = set()
            last_errors: list[msg.FailedChange] = []
            for i in range(0, len(pending), self.batch_size):
                part = pending[i:i + self.batch_size]
                result = await link.ask("apply", msg.SyncApply(
                    endpoint=endpoint, lane="main", changes=[msg.ChangeWire.model_validate(c) for c in part],
                    upto=0, repair=True), msg.SyncApplied)
                failed_keys.update(_key({"t": f.tbl, "pk": f.pk}) for f in result.failed)
                last_errors.extend(result.failed)
            left = [c for c in pending if _key({"t": c["tbl"], "pk": c["pk"]}) in failed_keys]
            if len(left) == len(pending) or not left:
                for f in last_errors[:3]:
                    log.warning("repair failed", subcloud=link.subcloud, table=f.tbl, pk=f.pk, error=f.error)
                return len(left)
            pending = left
        return 0


def at_head(cursors: dict[str, int], heads: dict[str, int]) -> bool:
    """The subcloud has every change of every lane up to these heads, and none after (its digests and the
    controller's at these heads are comparable)."""
    return all(cursors.get(lane, 0) == head for lane, head in heads.items())


def _cut(change: dict[str, Any], synced: dict[str, ResolvedTable]) -> dict[str, Any]:
    """A change cut to the columns the subcloud syncs (version skew)."""
    row = change.get("row")
    if row is None:
        return change
    cols = synced[change["tbl"]].columns
    if len(cols) == len(row):
        return change
    return {**change, "row": {k: v for k, v in row.items() if k in cols}}


def _key(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True, default=str)
