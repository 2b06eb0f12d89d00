"""dcsync's bookkeeping in a keystone or glance database, over asyncpg (the SQL is in ``tracking_sql``).

``Tracker(place)`` works on one database (a connection or pool is passed to each call):

* ``reflect``: the tables and columns the database has (what the configuration is checked against);
* ``install``: bookkeeping, triggers and a re-digest of every table whose tracked columns changed;
  ``missing_triggers``: synced tables whose trigger is gone or tracks other columns (a keystone upgrade
  may drop them);
* controller side: ``head`` and ``changes`` (the change log, per lane, in commit order), ``purge``;
* both sides: ``roots`` (per table: digest and row count), ``buckets``, ``bucket_rows``, ``read_rows``;
* subcloud side: ``apply`` (a batch, in the caller's transaction), ``cursors``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import asyncpg

from services.core.db.pool import AnyConnection
from services.dcsync.tables import ResolvedTable
from services.dcsync.tracking_sql import (
    TRIGGER,
    TRUNCATE_TRIGGER,
    Place,
    ident,
    install_sql,
    trigger_args,
    trigger_sql,
    writers_sql,
)

Conn = AnyConnection | asyncpg.Pool
INSTALL_LOCK = 0x72646374   # pg_advisory_xact_lock(key, hashtext(bookkeeping schema)): one installer per schema


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change log: an upsert (``row`` holds the synced columns) or a delete."""

    seq: int
    lane: str
    table: str
    op: str            # "U" | "D"
    pk: dict[str, Any]
    row: dict[str, Any] | None
    version: int = 0   # the version the subcloud records; the seq for streamed changes

    def wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "tbl": self.table, "op": self.op, "pk": self.pk, "row": self.row,
                "version": self.version or self.seq}


@dataclass(frozen=True, slots=True)
class Failed:
    seq: int
    table: str
    pk: dict[str, Any]
    error: str


@dataclass(frozen=True, slots=True)
class Applied:
    applied: int
    stale: int
    failed: tuple[Failed, ...] = ()


@dataclass(frozen=True, slots=True)
class Received:
    """A sync message at a subcloud: what its changes did, whether it was seen before, the lane's cursor now."""

    result: Applied
    duplicate: bool
    cursor: int
    adopted: int = 0          # rows given the controller's version (``receive(adopt=...)``)


@dataclass(frozen=True, slots=True)
class Redigested:
    table: str
    added: int
    changed: int
    removed: int

    @property
    def differences(self) -> int:
        return self.added + self.changed + self.removed


@dataclass(frozen=True, slots=True)
class Root:
    digest: int
    rows: int


@dataclass(frozen=True, slots=True)
class RowMark:
    """A row as an audit compares it: its key, hash and version (``0``: never came from the controller)."""

    pk: dict[str, Any]
    hash: int
    version: int
    bucket: int = -1

    @property
    def key(self) -> str:
        return json.dumps(self.pk, sort_keys=True, separators=(",", ":"))


@dataclass(slots=True)
class InstallReport:
    redigested: list[Redigested] = field(default_factory=list)
    retracked: list[str] = field(default_factory=list)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


class Tracker:
    def __init__(self, place: Place | None = None) -> None:
        self.place = place or Place()
        self._bk = ident(self.place.bookkeeping)

    # -- schema ------------------------------------------------------------------------------------------

    async def reflect(self, conn: Conn) -> dict[str, list[str]]:
        rows = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = $1 "
            "ORDER BY table_name, ordinal_position", self.place.data)
        out: dict[str, list[str]] = {}
        for r in rows:
            out.setdefault(r["table_name"], []).append(r["column_name"])
        return out

    async def install(self, conn: AnyConnection, tables: Sequence[ResolvedTable], *,
                      capture: bool) -> InstallReport:
        """Bookkeeping, triggers, and a re-digest of each table that is new or tracks other columns now.
        One transaction: a database is never left half tracked."""
        report = InstallReport()
        async with conn.transaction():
            await self.lock_install(conn)
            await conn.execute(install_sql(self.place))
            stored = {r["tbl"]: r for r in await conn.fetch(f"SELECT * FROM {self._bk}.synced_table")}
            stale_triggers = set(await self.missing_triggers(conn, tables, capture=capture))
            for t in tables:
                before = stored.get(t.name)
                same = (before is not None and tuple(before["pk"]) == t.pk and tuple(before["columns"]) == t.columns
                        and before["lane"] == t.lane and before["capture"] == capture)
                if same and t.name not in stale_triggers:
                    continue
                await conn.execute(
                    f"INSERT INTO {self._bk}.synced_table (tbl, pk, columns, lane, capture) "
                    "VALUES ($1, $2, $3, $4, $5) "
                    "ON CONFLICT (tbl) DO UPDATE SET pk = EXCLUDED.pk, columns = EXCLUDED.columns, "
                    "lane = EXCLUDED.lane, capture = EXCLUDED.capture",
                    t.name, list(t.pk), list(t.columns), t.lane, capture)
                await conn.execute(trigger_sql(self.place, t.name, capture=capture, lane=t.lane, pk=t.pk,
                                               columns=t.columns))
                report.retracked.append(t.name)
                report.redigested.append(await self._redigest(conn, t.name))
            await conn.execute(writers_sql(self.place, tables))
            wanted = {t.name for t in tables}
            for name in stored:
                if name not in wanted:   # no longer synced: stop tracking it
                    target = f"{ident(self.place.data)}.{ident(name)}"
                    for trigger in (TRIGGER, TRUNCATE_TRIGGER):
                        await conn.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {target}")
                    for tbl in ("synced_table", "row_state", "digest"):
                        await conn.execute(f"DELETE FROM {self._bk}.{tbl} WHERE tbl = $1", name)
        return report

    async def lock_install(self, conn: AnyConnection) -> None:
        """One installer at a time for this bookkeeping schema (not per database: a simulation keeps many
        subclouds' schemas in one database, and their installs need not wait for each other)."""
        await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", INSTALL_LOCK, self.place.bookkeeping)

    async def missing_triggers(self, conn: Conn, tables: Sequence[ResolvedTable], *, capture: bool) -> list[str]:
        """Synced tables whose row trigger or TRUNCATE trigger is missing, disabled, or tracks other columns
        than ``tables`` say (a table tracked before the TRUNCATE trigger existed has only the first)."""
        rows = await conn.fetch(
            "SELECT tg.tgname, c.relname, tg.tgenabled, tg.tgargs FROM pg_trigger tg "
            "JOIN pg_class c ON c.oid = tg.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE tg.tgname = ANY($1) AND n.nspname = $2", [TRIGGER, TRUNCATE_TRIGGER], self.place.data)
        found = {(r["tgname"], r["relname"]): r for r in rows}
        missing = []
        for t in tables:
            want = trigger_args(capture=capture, lane=t.lane, pk=t.pk, columns=t.columns)
            for trigger, args in ((TRIGGER, want), (TRUNCATE_TRIGGER, want[:2])):
                r = found.get((trigger, t.name))
                if r is None or r["tgenabled"] == "D" or _trigger_args(r["tgargs"]) != args:
                    missing.append(t.name)
                    break
        return missing

    async def installed(self, conn: Conn) -> list[str]:
        """The tables tracked here before (none when the bookkeeping does not exist yet)."""
        exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{self._bk}.synced_table")
        if not exists:
            return []
        return [r["tbl"] for r in await conn.fetch(f"SELECT tbl FROM {self._bk}.synced_table")]

    async def redigest(self, conn: AnyConnection, table: str) -> Redigested:
        async with conn.transaction():
            return await self._redigest(conn, table)

    async def _redigest(self, conn: AnyConnection, table: str) -> Redigested:
        raw = _json(await conn.fetchval(f"SELECT {self._bk}.redigest($1)", table))
        return Redigested(table, int(raw["added"]), int(raw["changed"]), int(raw["removed"]))

    # -- the change log (controller) ---------------------------------------------------------------------

    async def head(self, conn: Conn, lane: str | None = None) -> int:
        """The last change (of ``lane``) committed; 0 when there is none."""
        if lane is None:
            value = await conn.fetchval(f"SELECT max(seq) FROM {self._bk}.change_log")
        else:
            value = await conn.fetchval(f"SELECT max(seq) FROM {self._bk}.change_log WHERE lane = $1", lane)
        return int(value or 0)

    async def oldest(self, conn: Conn) -> int:
        """The first change still in the log (0 when empty): a cursor below it cannot be streamed from."""
        return int(await conn.fetchval(f"SELECT coalesce(min(seq), 0) FROM {self._bk}.change_log") or 0)

    async def changes(self, conn: Conn, lane: str, after: int, limit: int) -> list[Change]:
        rows = await conn.fetch(
            f"SELECT seq, lane, tbl, op, pk, row FROM {self._bk}.change_log WHERE lane = $1 AND seq > $2 "
            "ORDER BY seq LIMIT $3", lane, after, limit)
        return [Change(r["seq"], r["lane"], r["tbl"], r["op"], _json(r["pk"]), _json(r["row"])) for r in rows]

    async def purge(self, conn: Conn, lane: str, *, below: int, before: datetime) -> int:
        """Drop a lane's changes every subcloud has (seq < ``below``) or older than ``before``; the lane's newest
        change stays (it tells the head after a restart).  ``purged`` records how far the lane was purged."""
        count = await conn.fetchval(
            f"WITH newest AS (SELECT max(seq) AS seq FROM {self._bk}.change_log WHERE lane = $1), "
            f"gone AS (DELETE FROM {self._bk}.change_log c USING newest WHERE c.lane = $1 AND c.seq < newest.seq "
            "AND (c.seq < $2 OR c.at < $3) RETURNING c.seq), "
            f"noted AS (INSERT INTO {self._bk}.purged AS p (lane, through) SELECT $1, max(seq) FROM gone "
            "HAVING count(*) > 0 ON CONFLICT (lane) DO UPDATE SET through = greatest(p.through, EXCLUDED.through)) "
            "SELECT count(*) FROM gone", lane, below, before)
        return int(count or 0)

    async def purged_through(self, conn: Conn) -> dict[str, int]:
        """Per lane, the last change purged (a cursor below it has missed changes the log no longer holds)."""
        rows = await conn.fetch(f"SELECT lane, through FROM {self._bk}.purged")
        return {r["lane"]: int(r["through"]) for r in rows}

    # -- digests (both sides) ----------------------------------------------------------------------------

    async def roots(self, conn: Conn, tables: Sequence[str]) -> dict[str, Root]:
        rows = await conn.fetch(
            f"SELECT tbl, coalesce(bit_xor(digest), 0) AS d, coalesce(sum(rows), 0) AS n FROM {self._bk}.digest "
            "WHERE tbl = ANY($1) GROUP BY tbl", list(tables))
        out = {t: Root(0, 0) for t in tables}
        for r in rows:
            out[r["tbl"]] = Root(int(r["d"]), int(r["n"]))
        return out

    async def buckets(self, conn: Conn, table: str) -> dict[int, Root]:
        rows = await conn.fetch(f"SELECT bucket, digest, rows FROM {self._bk}.digest WHERE tbl = $1 AND rows > 0",
                                table)
        return {int(r["bucket"]): Root(int(r["digest"]), int(r["rows"])) for r in rows}

    async def bucket_rows(self, conn: Conn, table: str, buckets: Sequence[int]) -> list[RowMark]:
        rows = await conn.fetch(
            f"SELECT pk, hash, version, bucket FROM {self._bk}.row_state WHERE tbl = $1 AND bucket = ANY($2)",
            table, list(buckets))
        return [RowMark(_json(r["pk"]), int(r["hash"]), int(r["version"]), int(r["bucket"])) for r in rows]

    async def computed_buckets(self, conn: Conn, table: ResolvedTable) -> tuple[dict[int, Root], list[RowMark]]:
        """Digests over other columns than the tracked ones (a subcloud on another keystone version), computed
        from the table's rows: the one case an audit reads a synced table."""
        bk = self._bk
        rows = await conn.fetch(
            f"SELECT pk, {bk}.bucket(pk) AS bucket, hash FROM "
            f"(SELECT {bk}.pick(r, $1) AS pk, {bk}.row_hash($3, r) AS hash "
            f"FROM (SELECT {bk}.pick(to_jsonb(x), $2) AS r FROM {ident(self.place.data)}.{ident(table.name)} x) s) h",
            list(table.pk), list(table.columns), table.name)
        marks: list[RowMark] = []
        buckets: dict[int, Root] = {}
        for r in rows:
            mark = RowMark(_json(r["pk"]), int(r["hash"]), 0, int(r["bucket"]))
            marks.append(mark)
            old = buckets.get(mark.bucket, Root(0, 0))
            buckets[mark.bucket] = Root(old.digest ^ mark.hash, old.rows + 1)
        return buckets, marks

    async def read_rows(self, conn: Conn, table: ResolvedTable,
                        pks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The synced columns of the rows with these keys (those that exist)."""
        if not pks:
            return []
        bk = self._bk
        target = f"{ident(self.place.data)}.{ident(table.name)}"
        rows = await conn.fetch(
            f"SELECT {bk}.pick(to_jsonb(x), $2) AS r FROM {target} x "
            f"WHERE {bk}.pick(to_jsonb(x), $3) = ANY(SELECT value FROM jsonb_array_elements($1::jsonb))",
            json.dumps(list(pks)), list(table.columns), list(table.pk))
        return [_json(r["r"]) for r in rows]

    async def natural_keys(self, conn: Conn, table: str, columns: Sequence[str],
                           pk: Sequence[str]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Every row's (natural key, primary key): a joining subcloud's rows that clash with central ones."""
        bk = self._bk
        rows = await conn.fetch(
            f"SELECT {bk}.pick(to_jsonb(x), $1) AS k, {bk}.pick(to_jsonb(x), $2) AS p "
            f"FROM {ident(self.place.data)}.{ident(table)} x", list(columns), list(pk))
        return [(_json(r["k"]), _json(r["p"])) for r in rows]

    # -- apply (subcloud) --------------------------------------------------------------------------------

    async def apply(self, conn: Conn, changes: Sequence[Mapping[str, Any]], *, repair: bool = False) -> Applied:
        """Apply a batch in the caller's transaction (``apply_safely`` in tracking_sql: fast path first; when a
        change fails, change by change, so the failures are reported and the rest still lands)."""
        return _applied(_json(await conn.fetchval(f"SELECT {self._bk}.apply_safely($1::jsonb, $2)",
                                                  json.dumps(list(changes), default=str), repair)))

    async def receive(self, conn: Conn, key: str, endpoint: str, lane: str, changes: Sequence[Mapping[str, Any]], *,
                      upto: int, repair: bool = False, set_cursor: bool = False, adopt: int | None = None,
                      keep_local: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> Received:
        """A sync message at the subcloud, in one statement: inbox, ``apply``, cursor (see ``receive`` in
        tracking_sql).  ``set_cursor`` moves the cursor to ``upto`` even backwards (a resync).  ``adopt``: and,
        in the same transaction unless the message is a duplicate (a replay, later, must not adopt the rows
        the subcloud made since), :meth:`adopt` with that version and ``keep_local``."""
        if adopt is not None:
            if isinstance(conn, asyncpg.Pool):
                async with conn.acquire() as own:
                    return await self.receive(own, key, endpoint, lane, changes, upto=upto, repair=repair,
                                              set_cursor=set_cursor, adopt=adopt, keep_local=keep_local)
            async with conn.transaction():
                received = await self.receive(conn, key, endpoint, lane, changes, upto=upto, repair=repair,
                                              set_cursor=set_cursor)
                if received.duplicate:
                    return received
                return replace(received, adopted=await self.adopt(conn, adopt, keep_local or {}))
        raw = _json(await conn.fetchval(
            f"SELECT {self._bk}.receive($1, $2, $3, $4::jsonb, $5, $6, $7)",
            key, endpoint, lane, json.dumps(list(changes), default=str), upto, repair, set_cursor))
        return Received(_applied(raw), bool(raw["duplicate"]), int(raw["cursor"]))

    async def adopt(self, conn: AnyConnection, version: int, keep: Mapping[str, Sequence[Mapping[str, Any]]]) -> int:
        """Give ``version`` to the rows that never came from the controller (version 0) but for the keys in
        ``keep`` (per table): a resync found them equal to the controller's rows, so they came from it (a
        subcloud that joined holding the same rows), and an audit must delete them when the controller no
        longer has them, not report them as the subcloud's own.  Returns how many."""
        tables = [t for t, pks in keep.items() for _ in pks]
        keys = [json.dumps(pk, default=str) for pks in keep.values() for pk in pks]
        status = await conn.execute(
            f"""UPDATE {self._bk}.row_state s SET version = $1
                WHERE s.version = 0
                  AND NOT EXISTS (SELECT 1 FROM unnest($2::text[], $3::text[]) AS k(tbl, pk)
                                  WHERE k.tbl = s.tbl AND k.pk::jsonb = s.pk)""", version, tables, keys)
        return int(status.split()[-1])

    async def cursors(self, conn: Conn, endpoint: str) -> dict[str, int]:
        rows = await conn.fetch(f"SELECT lane, applied_seq FROM {self._bk}.cursor WHERE endpoint = $1", endpoint)
        return {r["lane"]: int(r["applied_seq"]) for r in rows}


def _applied(raw: Any) -> Applied:
    failed = tuple(Failed(int(f["seq"] or 0), str(f["tbl"]), f["pk"], str(f["error"])) for f in raw["failed"])
    return Applied(int(raw["applied"]), int(raw["stale"]), failed)


def _trigger_args(raw: bytes) -> list[str]:
    """pg_trigger.tgargs: the arguments, each ended by a NUL byte."""
    return [a.decode() for a in raw.split(b"\x00")[:-1]]
