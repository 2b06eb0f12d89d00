"""The SQL that dcsync installs into a keystone or glance database, on both sides.  Text only, no I/O.

Everything lives in a bookkeeping schema of its own (``roost_dcsync`` beside keystone's tables; a
simulated subcloud's tables in schema ``sc0001`` get ``sc0001_dcsync``), never in keystone's tables:

* ``synced_table``: which tables are tracked, their primary key, the columns that sync, the lane, and
  whether this database *captures* (the system controller: every change goes to the change log) or only
  keeps digests (a subcloud);
* ``purged`` (controller): per lane, the last change purged from the log: a subcloud whose cursor is
  below it has missed changes the log no longer holds (an audit brings it back);
* ``change_log`` (controller): every insert, update and delete of a synced row, in commit order: the
  trigger takes one transaction-level advisory lock before it draws a sequence number, so numbers are
  handed out in the order the writing transactions commit and a reader never skips a number that
  commits later.  (Writes to synced tables are serialised; keystone and glance write rarely.)
  ``pg_notify`` wakes the sender once per transaction;
* ``row_state``: per synced row its bucket, its hash over the synced columns only, and its version (the
  controller: the change's sequence number; a subcloud: the version of the change last applied to it,
  kept across local edits, ``0`` for a row that never came from the controller);
* ``digest``: per (table, bucket) the XOR of its rows' hashes and their count, kept by the same trigger
  in the same transaction, so an audit compares digests without reading a synced table;
* ``tombstone`` (subcloud): the version of each applied delete, so an older change never brings a
  deleted row back; ``cursor``: per lane, the last change applied; ``inbox``: the sync messages applied.

``apply`` (subcloud) applies a batch of changes: upsert by primary key or delete, each guarded by
version (a change older than the row's version is stale and skipped; a repair of equal version
overwrites a local edit).  ``redigest`` recomputes a table's row states from its rows: the backfill at
install, and the backstop for writes the triggers missed (a capturing database logs them as changes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.dcsync.tables import ResolvedTable

BUCKETS = 1024
TRIGGER = "roost_dcsync_track"
TRUNCATE_TRIGGER = "roost_dcsync_truncate"
VERSION_SETTING = "roost.sync_version"
# pg_advisory_xact_lock key of the change log's commit order (any constant; "rdcs" in ASCII)
ORDER_LOCK = 0x72646373


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True, slots=True)
class Place:
    """Where the synced tables are (``data``) and where dcsync keeps its bookkeeping beside them."""

    data: str = "public"
    bookkeeping: str = "roost_dcsync"

    @classmethod
    def simulated(cls, schema: str) -> Place:
        return cls(schema, f"{schema}_dcsync")

    @property
    def channel(self) -> str:
        """The NOTIFY channel that tells the sender there are new changes."""
        return f"{self.bookkeeping}_changes"


def _default_writers(bk: str) -> str:
    """PL/pgSQL that makes ``put_row`` and ``delete_row`` answering false (apply_one's dynamic SQL then
    writes) where they do not exist yet."""
    out = []
    for name, arg in (("put_row", "r"), ("delete_row", "pk")):
        out.append(f"    IF to_regprocedure({literal(f'{bk}.{name}(text, jsonb)')}) IS NULL THEN\n"
                   f"        CREATE FUNCTION {bk}.{name}(tn text, {arg} jsonb) RETURNS boolean LANGUAGE plpgsql\n"
                   "            AS $f$ BEGIN RETURN false; END $f$;\n"
                   "    END IF;")
    return "\n".join(out)


def install_sql(place: Place) -> str:
    """Create (or bring up to date) the bookkeeping schema, its tables and functions.  Idempotent."""
    bk = ident(place.bookkeeping)
    data_literal = literal(place.data)
    channel_literal = literal(place.channel)
    bk_literal = literal(bk)                       # the quoted schema name as text, for format() and nextval
    change_seq = literal(f"{bk}.change_seq")
    default_writers = _default_writers(bk)
    return f"""
CREATE SCHEMA IF NOT EXISTS {bk};
CREATE TABLE IF NOT EXISTS {bk}.synced_table (
    tbl text PRIMARY KEY,
    pk text[] NOT NULL,
    columns text[] NOT NULL,
    lane text NOT NULL,
    capture boolean NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS {bk}.change_seq;
CREATE TABLE IF NOT EXISTS {bk}.change_log (
    seq bigint PRIMARY KEY,
    lane text NOT NULL,
    tbl text NOT NULL,
    op text NOT NULL CHECK (op IN ('U', 'D')),
    pk jsonb NOT NULL,
    row jsonb,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS change_log_lane_seq ON {bk}.change_log (lane, seq);
CREATE TABLE IF NOT EXISTS {bk}.purged (
    lane text PRIMARY KEY,
    through bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS {bk}.row_state (
    tbl text NOT NULL,
    pk jsonb NOT NULL,
    bucket int NOT NULL,
    hash bigint NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (tbl, pk)
);
CREATE INDEX IF NOT EXISTS row_state_bucket ON {bk}.row_state (tbl, bucket);
CREATE TABLE IF NOT EXISTS {bk}.digest (
    tbl text NOT NULL,
    bucket int NOT NULL,
    digest bigint NOT NULL,
    rows bigint NOT NULL,
    PRIMARY KEY (tbl, bucket)
);
CREATE TABLE IF NOT EXISTS {bk}.tombstone (
    tbl text NOT NULL,
    pk jsonb NOT NULL,
    version bigint NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tbl, pk)
);
CREATE TABLE IF NOT EXISTS {bk}.cursor (
    endpoint text NOT NULL,
    lane text NOT NULL,
    applied_seq bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint, lane)
);
CREATE TABLE IF NOT EXISTS {bk}.inbox (
    message_id text PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION {bk}.pick(r jsonb, cols text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_object_agg(key, value), '{{}}'::jsonb) FROM jsonb_each(r) WHERE key = ANY(cols)
$$;

CREATE OR REPLACE FUNCTION {bk}.row_hash(tbl text, r jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ('x' || substr(md5(tbl || '|' || r::text), 1, 16))::bit(64)::bigint
$$;

CREATE OR REPLACE FUNCTION {bk}.bucket(pk jsonb) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (('x' || substr(md5(pk::text), 1, 8))::bit(32)::int) & {BUCKETS - 1}
$$;

-- The row trigger: row state, digest and (capturing) the change log, in the writer's transaction.
-- Arguments: 'capture' | 'digest', the lane, the primary key columns, the synced columns (comma-separated).
-- The synced columns are picked inline, not with pick(): PL/pgSQL keeps the plan of its own statements for
-- the session, where a call of the SQL function pick() is planned again in every transaction.
CREATE OR REPLACE FUNCTION {bk}.track() RETURNS trigger LANGUAGE plpgsql AS $f$
DECLARE
    -- TG_TABLE_NAME is a name: compared with the text column tbl as it is, no index on tbl is usable
    tn text := TG_TABLE_NAME;
    capture boolean := TG_ARGV[0] = 'capture';
    lane text := TG_ARGV[1];
    pkcols text[] := string_to_array(TG_ARGV[2], ',');
    cols text[] := string_to_array(TG_ARGV[3], ',');
    o jsonb; n jsonb; opk jsonb; npk jsonb;
    oh bigint; ob int; nh bigint; nb int; v bigint; gv text;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        o := (SELECT coalesce(jsonb_object_agg(key, value), '{{}}'::jsonb) FROM jsonb_each(to_jsonb(OLD))
               WHERE key = ANY(cols));
        opk := CASE WHEN cardinality(pkcols) = 1 THEN jsonb_build_object(pkcols[1], o->pkcols[1])
                    ELSE (SELECT jsonb_object_agg(key, value) FROM jsonb_each(o) WHERE key = ANY(pkcols)) END;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        n := (SELECT coalesce(jsonb_object_agg(key, value), '{{}}'::jsonb) FROM jsonb_each(to_jsonb(NEW))
               WHERE key = ANY(cols));
        npk := CASE WHEN cardinality(pkcols) = 1 THEN jsonb_build_object(pkcols[1], n->pkcols[1])
                    ELSE (SELECT jsonb_object_agg(key, value) FROM jsonb_each(n) WHERE key = ANY(pkcols)) END;
    END IF;
    gv := nullif(current_setting('{VERSION_SETTING}', true), '');
    -- only local-state columns changed: nothing to sync (an applied change still records its version)
    IF TG_OP = 'UPDATE' AND o = n AND (capture OR gv IS NULL) THEN
        RETURN NULL;
    END IF;
    IF capture THEN
        PERFORM pg_advisory_xact_lock({ORDER_LOCK});
        IF o IS NOT NULL AND (n IS NULL OR opk <> npk) THEN
            INSERT INTO {bk}.change_log (seq, lane, tbl, op, pk, row)
                VALUES (nextval({change_seq}), lane, tn, 'D', opk, NULL);
        END IF;
        IF n IS NOT NULL THEN
            v := nextval({change_seq});
            INSERT INTO {bk}.change_log (seq, lane, tbl, op, pk, row) VALUES (v, lane, tn, 'U', npk, n);
        END IF;
        PERFORM pg_notify({channel_literal}, '');
    END IF;
    IF n IS NOT NULL THEN
        nh := {bk}.row_hash(tn, n);
        nb := {bk}.bucket(npk);
    END IF;
    IF opk = npk THEN
        -- changed in place: its state is updated where it is (no indexed column changes: a HOT update), the
        -- bucket's digest swaps the old hash for the new one; a subcloud's row keeps its version unless a
        -- change from the controller is being applied
        UPDATE {bk}.row_state s
           SET hash = nh, version = CASE WHEN capture THEN v ELSE coalesce(gv::bigint, s.version) END
          FROM {bk}.row_state p
         WHERE s.tbl = tn AND s.pk = opk AND p.tbl = tn AND p.pk = opk
        RETURNING p.hash INTO oh;
        IF FOUND THEN
            UPDATE {bk}.digest SET digest = digest # oh # nh WHERE tbl = tn AND bucket = nb;
            RETURN NULL;
        END IF;
    ELSIF o IS NOT NULL THEN
        DELETE FROM {bk}.row_state WHERE tbl = tn AND pk = opk RETURNING hash, bucket INTO oh, ob;
        IF FOUND THEN
            UPDATE {bk}.digest SET digest = digest # oh, rows = rows - 1 WHERE tbl = tn AND bucket = ob;
        END IF;
    END IF;
    IF n IS NOT NULL THEN
        IF NOT capture THEN
            v := coalesce(gv::bigint, 0);
        END IF;
        INSERT INTO {bk}.row_state (tbl, pk, bucket, hash, version) VALUES (tn, npk, nb, nh, v);
        INSERT INTO {bk}.digest AS d (tbl, bucket, digest, rows) VALUES (tn, nb, nh, 1)
            ON CONFLICT (tbl, bucket) DO UPDATE SET digest = d.digest # EXCLUDED.digest, rows = d.rows + 1;
    END IF;
    RETURN NULL;
END
$f$;

-- The statement trigger of TRUNCATE, which fires no row trigger: before the rows go, every row the bookkeeping
-- knows of the table is deleted as the row trigger would have deleted it (capturing: a 'D' change each, in
-- primary-key order, then one notification), and the table's digests go to nothing.  Arguments: 'capture' |
-- 'digest', the lane.  (TRUNCATE ... CASCADE fires it on every table it empties.)
CREATE OR REPLACE FUNCTION {bk}.track_truncate() RETURNS trigger LANGUAGE plpgsql AS $f$
DECLARE
    tn text := TG_TABLE_NAME;
BEGIN
    IF TG_ARGV[0] = 'capture' THEN
        PERFORM pg_advisory_xact_lock({ORDER_LOCK});
        INSERT INTO {bk}.change_log (seq, lane, tbl, op, pk, row)
            SELECT nextval({change_seq}), TG_ARGV[1], tn, 'D', s.pk, NULL
              FROM (SELECT pk FROM {bk}.row_state WHERE tbl = tn ORDER BY pk) s;
        PERFORM pg_notify({channel_literal}, '');
    END IF;
    DELETE FROM {bk}.row_state WHERE tbl = tn;
    DELETE FROM {bk}.digest WHERE tbl = tn;
    RETURN NULL;
END
$f$;

-- How a change's row is written into its table.  writers_sql() replaces these two with one branch of static
-- SQL per synced table (planned once per session); they answer false for a table they have no branch for,
-- or a row without every synced column, and apply_one then writes with dynamic SQL.  Made here only when
-- missing: this script runs again at every agent start, and must not undo the generated ones.
DO $d$
BEGIN
{default_writers}
END
$d$;

-- One change on a subcloud: 'new' (a row it did not have), 'applied' or 'stale'.  The caller sets no
-- savepoint; apply() does when careful.
CREATE OR REPLACE FUNCTION {bk}.apply_one(c jsonb, repair boolean) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE
    tn text := c->>'tbl';
    st {bk}.synced_table;
    lv bigint;
    buried boolean := false;
    v bigint := (c->>'version')::bigint;
    cols text; sets text; keys text;
BEGIN
    lv := (SELECT version FROM {bk}.row_state WHERE tbl = tn AND pk = c->'pk');
    IF lv IS NULL THEN
        lv := (SELECT version FROM {bk}.tombstone WHERE tbl = tn AND pk = c->'pk');
        buried := lv IS NOT NULL;
    END IF;
    IF lv IS NOT NULL AND (v < lv OR (v = lv AND NOT repair)) THEN
        RETURN 'stale';
    END IF;
    PERFORM set_config('{VERSION_SETTING}', v::text, true);
    IF c->>'op' = 'U' AND {bk}.put_row(tn, c->'row') OR c->>'op' <> 'U' AND {bk}.delete_row(tn, c->'pk') THEN
        NULL;
    ELSE
        SELECT * INTO st FROM {bk}.synced_table WHERE tbl = tn;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'table % is not synced here', tn;
        END IF;
        SELECT string_agg(quote_ident(k), ', ') INTO keys FROM unnest(st.pk) k;
        IF c->>'op' = 'U' THEN
            SELECT string_agg(quote_ident(k), ', '),
                   string_agg(CASE WHEN k <> ALL(st.pk) THEN format('%1$I = EXCLUDED.%1$I', k) END, ', ')
              INTO cols, sets
              FROM unnest(st.columns) k WHERE (c->'row') ? k;
            EXECUTE format('INSERT INTO %1$I.%2$I AS t (%3$s) SELECT %3$s '
                           'FROM jsonb_populate_record(NULL::%1$I.%2$I, $1) ON CONFLICT (%4$s) DO %5$s',
                           {data_literal}, st.tbl, cols, keys,
                           CASE WHEN sets IS NULL THEN 'NOTHING' ELSE 'UPDATE SET ' || sets END)
                USING c->'row';
        ELSE
            EXECUTE format('DELETE FROM %1$I.%2$I WHERE (%3$s) = '
                           '(SELECT %3$s FROM jsonb_populate_record(NULL::%1$I.%2$I, $1))',
                           {data_literal}, st.tbl, keys)
                USING c->'pk';
        END IF;
    END IF;
    IF c->>'op' = 'U' THEN
        IF buried THEN
            DELETE FROM {bk}.tombstone WHERE tbl = tn AND pk = c->'pk';
        END IF;
        RETURN CASE WHEN lv IS NULL THEN 'new' ELSE 'applied' END;
    END IF;
    INSERT INTO {bk}.tombstone AS t (tbl, pk, version) VALUES (tn, c->'pk', v)
        ON CONFLICT (tbl, pk) DO UPDATE SET version = greatest(t.version, EXCLUDED.version), deleted_at = now();
    RETURN 'applied';
END
$f$;

-- Rows arrive with the controller's ids: a table whose key is drawn from a sequence (keystone's
-- local_user, password, revocation_event) gets its sequence moved past them, so rows made here later
-- do not collide.
CREATE OR REPLACE FUNCTION {bk}.bump_sequences(tables text[]) RETURNS void LANGUAGE plpgsql AS $f$
DECLARE
    st {bk}.synced_table; seq text; top bigint;
BEGIN
    FOR st IN SELECT * FROM {bk}.synced_table WHERE tbl = ANY(tables) AND cardinality(pk) = 1 LOOP
        seq := pg_get_serial_sequence(format('%I.%I', {data_literal}, st.tbl), st.pk[1]);
        CONTINUE WHEN seq IS NULL;
        EXECUTE format('SELECT max(%I)::bigint FROM %I.%I', st.pk[1], {data_literal}, st.tbl) INTO top;
        IF top IS NOT NULL AND top > (SELECT coalesce(last_value, 0) FROM pg_sequences
                                       WHERE format('%I.%I', schemaname, sequencename)::regclass = seq::regclass) THEN
            PERFORM setval(seq, top);
        END IF;
    END LOOP;
END
$f$;

-- A batch: {{"applied": n, "stale": n, "failed": [{{"seq", "tbl", "pk", "error"}}]}}.  careful: each change
-- under its own savepoint, so one that fails (a constraint) is reported and the others still apply.
CREATE OR REPLACE FUNCTION {bk}.apply(changes jsonb, repair boolean, careful boolean) RETURNS jsonb
LANGUAGE plpgsql AS $f$
DECLARE
    c jsonb; r text; applied int := 0; stale int := 0; failed jsonb := '[]'::jsonb;
    fresh text[] := '{{}}';   -- the tables that got rows they did not have: their sequences may need a push
BEGIN
    FOR c IN SELECT value FROM jsonb_array_elements(changes) LOOP
        IF careful THEN
            BEGIN
                r := {bk}.apply_one(c, repair);
            EXCEPTION WHEN OTHERS THEN
                failed := failed || jsonb_build_array(jsonb_build_object(
                    'seq', c->'seq', 'tbl', c->'tbl', 'pk', c->'pk', 'error', SQLERRM));
                CONTINUE;
            END;
        ELSE
            r := {bk}.apply_one(c, repair);
        END IF;
        IF r = 'stale' THEN
            stale := stale + 1;
        ELSE
            applied := applied + 1;
            IF r = 'new' AND NOT c->>'tbl' = ANY(fresh) THEN
                fresh := fresh || (c->>'tbl');
            END IF;
        END IF;
    END LOOP;
    PERFORM set_config('{VERSION_SETTING}', '', true);
    IF cardinality(fresh) > 0 THEN
        PERFORM {bk}.bump_sequences(fresh);
    END IF;
    RETURN jsonb_build_object('applied', applied, 'stale', stale, 'failed', failed);
END
$f$;

-- A batch the fast way; when a change fails, rolled back (the block is a savepoint) and applied again change
-- by change, so the failures are reported and the rest still lands.  apply()'s answer.
CREATE OR REPLACE FUNCTION {bk}.apply_safely(changes jsonb, repair boolean) RETURNS jsonb LANGUAGE plpgsql AS $f$
BEGIN
    BEGIN
        RETURN {bk}.apply(changes, repair, false);
    EXCEPTION WHEN OTHERS THEN
        NULL;
    END;
    RETURN {bk}.apply(changes, repair, true);
END
$f$;

-- A sync message at a subcloud, in one statement (one transaction, one round trip): recorded in the inbox
-- (a message seen before changes nothing and answers where the cursor stands), its changes applied
-- (apply_safely), the lane's cursor moved (forward, or anywhere with set_cursor).  apply()'s answer and
-- {{"duplicate", "cursor"}}.
CREATE OR REPLACE FUNCTION {bk}.receive(key text, ep text, ln text, changes jsonb, upto bigint, repair boolean,
                                        set_cursor boolean) RETURNS jsonb LANGUAGE plpgsql AS $f$
DECLARE
    res jsonb; cur bigint;
BEGIN
    INSERT INTO {bk}.inbox (message_id) VALUES (key) ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        cur := (SELECT applied_seq FROM {bk}.cursor WHERE endpoint = ep AND lane = ln);
        RETURN jsonb_build_object('duplicate', true, 'applied', 0, 'stale', 0, 'failed', '[]'::jsonb,
                                  'cursor', coalesce(cur, 0));
    END IF;
    res := {bk}.apply_safely(changes, repair);
    IF set_cursor THEN
        INSERT INTO {bk}.cursor (endpoint, lane, applied_seq) VALUES (ep, ln, upto)
            ON CONFLICT (endpoint, lane) DO UPDATE SET applied_seq = EXCLUDED.applied_seq, updated_at = now();
        cur := upto;
    ELSE
        INSERT INTO {bk}.cursor AS c (endpoint, lane, applied_seq) VALUES (ep, ln, upto)
            ON CONFLICT (endpoint, lane) DO UPDATE SET applied_seq = greatest(c.applied_seq, EXCLUDED.applied_seq),
                                                       updated_at = now()
            RETURNING applied_seq INTO cur;
    END IF;
    RETURN res || jsonb_build_object('duplicate', false, 'cursor', cur);
END
$f$;

-- Recompute a table's row states and digests from its rows (under a SHARE lock: readers go on, writers
-- wait).  A capturing database logs every difference as a change.  {{"added", "changed", "removed"}}.
CREATE OR REPLACE FUNCTION {bk}.redigest(t text) RETURNS jsonb LANGUAGE plpgsql AS $f$
DECLARE
    st {bk}.synced_table;
    added bigint; changed bigint; removed bigint; head bigint;
BEGIN
    SELECT * INTO STRICT st FROM {bk}.synced_table WHERE tbl = t;
    EXECUTE format('LOCK TABLE %I.%I IN SHARE MODE', {data_literal}, t);
    CREATE TEMP TABLE IF NOT EXISTS roost_dcsync_actual (pk jsonb PRIMARY KEY, hash bigint, bucket int, r jsonb)
        ON COMMIT DROP;
    TRUNCATE roost_dcsync_actual;
    EXECUTE format('INSERT INTO roost_dcsync_actual SELECT %3$s.pick(r, $1), %3$s.row_hash($3, r), '
                   '%3$s.bucket(%3$s.pick(r, $1)), r FROM (SELECT %3$s.pick(to_jsonb(x), $2) AS r FROM %1$I.%2$I x) s',
                   {data_literal}, t, {bk_literal})
        USING st.pk, st.columns, t;
    SELECT count(*) FILTER (WHERE s.pk IS NULL), count(*) FILTER (WHERE s.pk IS NOT NULL AND s.hash <> a.hash)
      INTO added, changed
      FROM roost_dcsync_actual a LEFT JOIN {bk}.row_state s ON s.tbl = t AND s.pk = a.pk;
    SELECT count(*) INTO removed FROM {bk}.row_state s
     WHERE s.tbl = t AND NOT EXISTS (SELECT 1 FROM roost_dcsync_actual a WHERE a.pk = s.pk);
    IF st.capture AND added + changed + removed > 0 THEN
        PERFORM pg_advisory_xact_lock({ORDER_LOCK});
        INSERT INTO {bk}.change_log (seq, lane, tbl, op, pk, row)
        SELECT nextval({change_seq}), st.lane, t, 'D', s.pk, NULL
          FROM {bk}.row_state s
         WHERE s.tbl = t AND NOT EXISTS (SELECT 1 FROM roost_dcsync_actual a WHERE a.pk = s.pk);
        INSERT INTO {bk}.change_log (seq, lane, tbl, op, pk, row)
        SELECT nextval({change_seq}), st.lane, t, 'U', a.pk, a.r
          FROM roost_dcsync_actual a LEFT JOIN {bk}.row_state s ON s.tbl = t AND s.pk = a.pk
         WHERE s.hash IS DISTINCT FROM a.hash;
        PERFORM pg_notify({channel_literal}, '');
    END IF;
    head := CASE WHEN st.capture THEN (SELECT last_value FROM {bk}.change_seq) ELSE 0 END;
    DELETE FROM {bk}.row_state s
     WHERE s.tbl = t AND NOT EXISTS (SELECT 1 FROM roost_dcsync_actual a WHERE a.pk = s.pk);
    INSERT INTO {bk}.row_state AS s (tbl, pk, bucket, hash, version)
    SELECT t, a.pk, a.bucket, a.hash, head FROM roost_dcsync_actual a
    ON CONFLICT (tbl, pk) DO UPDATE SET hash = EXCLUDED.hash, bucket = EXCLUDED.bucket,
        version = CASE WHEN st.capture THEN EXCLUDED.version ELSE s.version END
        WHERE s.hash <> EXCLUDED.hash;
    DELETE FROM {bk}.digest WHERE tbl = t;
    INSERT INTO {bk}.digest (tbl, bucket, digest, rows)
    SELECT t, bucket, bit_xor(hash), count(*) FROM {bk}.row_state WHERE tbl = t GROUP BY bucket;
    DROP TABLE roost_dcsync_actual;
    RETURN jsonb_build_object('added', added, 'changed', changed, 'removed', removed);
END
$f$;
"""


def writers_sql(place: Place, tables: Sequence[ResolvedTable]) -> str:
    """``put_row`` and ``delete_row`` with one branch of static SQL per synced table (see apply_one): PL/pgSQL
    plans each branch once per session, where apply_one's dynamic SQL is planned for every change.  A row
    without every synced column is left to the dynamic path (it writes only the columns the row has)."""
    bk = ident(place.bookkeeping)
    puts: list[str] = []
    deletes: list[str] = []
    for t in tables:
        target = f"{ident(place.data)}.{ident(t.name)}"
        name = "'" + t.name.replace("'", "''") + "'"
        cols = ", ".join(ident(c) for c in t.columns)
        keys = ", ".join(ident(c) for c in t.pk)
        sets = ", ".join(f"{ident(c)} = EXCLUDED.{ident(c)}" for c in t.columns if c not in t.pk)
        every = "ARRAY[" + ", ".join("'" + c.replace("'", "''") + "'" for c in t.columns) + "]::text[]"
        puts.append(f"IF tn = {name} AND r ?& {every} THEN\n"
                    f"        INSERT INTO {target} AS t ({cols}) SELECT {cols} "
                    f"FROM jsonb_populate_record(NULL::{target}, r)\n"
                    f"            ON CONFLICT ({keys}) DO {'UPDATE SET ' + sets if sets else 'NOTHING'};\n"
                    "        RETURN true;\n    END IF;")
        deletes.append(f"IF tn = {name} THEN\n"
                       f"        DELETE FROM {target} WHERE ({keys}) = "
                       f"(SELECT {keys} FROM jsonb_populate_record(NULL::{target}, pk));\n"
                       "        RETURN true;\n    END IF;")
    return (f"CREATE OR REPLACE FUNCTION {bk}.put_row(tn text, r jsonb) RETURNS boolean LANGUAGE plpgsql AS $f$\n"
            "BEGIN\n    " + "\n    ".join(puts) + "\n    RETURN false;\nEND\n$f$;\n"
            f"CREATE OR REPLACE FUNCTION {bk}.delete_row(tn text, pk jsonb) RETURNS boolean LANGUAGE plpgsql AS $f$\n"
            "BEGIN\n    " + "\n    ".join(deletes) + "\n    RETURN false;\nEND\n$f$;\n")


def trigger_args(*, capture: bool, lane: str, pk: tuple[str, ...], columns: tuple[str, ...]) -> list[str]:
    """The row trigger's arguments; the TRUNCATE trigger's are the first two (mode, lane)."""
    return ["capture" if capture else "digest", lane, ",".join(pk), ",".join(columns)]


def trigger_sql(place: Place, table: str, *, capture: bool, lane: str, pk: tuple[str, ...],
                columns: tuple[str, ...]) -> str:
    """(Re)create the row trigger and the TRUNCATE trigger on one synced table."""
    for name in (*pk, *columns):
        if "," in name or "'" in name:
            raise ValueError(f"column name {name!r} cannot be tracked")
    target = f"{ident(place.data)}.{ident(table)}"
    quoted = [literal(a) for a in trigger_args(capture=capture, lane=lane, pk=pk, columns=columns)]
    args, mode = ", ".join(quoted), ", ".join(quoted[:2])
    return (f"DROP TRIGGER IF EXISTS {TRIGGER} ON {target};\n"
            f"CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {target} "
            f"FOR EACH ROW EXECUTE FUNCTION {ident(place.bookkeeping)}.track({args});\n"
            f"DROP TRIGGER IF EXISTS {TRUNCATE_TRIGGER} ON {target};\n"
            f"CREATE TRIGGER {TRUNCATE_TRIGGER} BEFORE TRUNCATE ON {target} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {ident(place.bookkeeping)}.track_truncate({mode});")
