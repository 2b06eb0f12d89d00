"""Versioned migrations, one series per service schema.

A service keeps its SQL in ``migrations/NNNN_name.sql`` inside its package (core's are in
``services/core/migrations/``).  ``migrate(pool, schema, directory)``:

1. takes a session advisory lock keyed on the schema, so replicas starting together migrate one after
   the other (the second finds nothing left to do);
2. creates the schema and ``<schema>.schema_migrations`` (version, name, checksum, applied_at);
3. refuses, before touching anything, when an applied file's content changed (``ChecksumMismatch``):
   an applied migration is history; change the schema with a new file;
4. applies every pending file in version order, each in its own transaction together with its
   ``schema_migrations`` row, with ``search_path`` set to the schema (then ``public``).

A pending version lower than the highest applied one (a file merged late) is applied, with a warning.
An applied version with no file (a newer release migrated this schema) is reported, not an error,
so an older replica keeps running during a rolling upgrade.

A service gets its outbox and inbox with one line in its first migration (core must be migrated first):
``SELECT core.ensure_outbox_inbox('inventory');``
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

from services.core.db.pool import AnyConnection

log = structlog.get_logger("roost.db.migrations")

CORE_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
CORE_SCHEMA = "core"

_FILE = re.compile(r"^(\d{4})_([a-z0-9][a-z0-9_]*)\.sql$")
_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class MigrationError(Exception):
    """Migrations cannot run: bad files, or the database disagrees with them."""


class ChecksumMismatch(MigrationError):
    """An applied migration's file changed since it was applied."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str
    checksum: str

    @property
    def filename(self) -> str:
        return f"{self.version:04d}_{self.name}.sql"


@dataclass(frozen=True, slots=True)
class Applied:
    version: int
    name: str
    checksum: str


@dataclass(frozen=True, slots=True)
class Plan:
    pending: list[Migration]          # to apply, in version order
    out_of_order: list[Migration]     # the pending ones older than the newest applied
    unknown: list[Applied]            # applied, but no file here (a newer release)


def check_schema(schema: str) -> str:
    """``schema`` if it is a plain lower-case identifier (so it never needs quoting); pure."""
    if not _SCHEMA.match(schema):
        raise ValueError(f"bad schema name {schema!r}: lower-case letters, digits and _, at most 63")
    return schema


def checksum(sql: str) -> str:
    """SHA-256 of the file's text with line endings normalised (a CRLF checkout is the same file)."""
    return hashlib.sha256(sql.replace("\r\n", "\n").encode()).hexdigest()


def parse_migrations(files: Mapping[str, str]) -> list[Migration]:
    """Migrations from ``{filename: text}`` (only ``*.sql`` names are considered), in version order; pure."""
    by_version: dict[int, Migration] = {}
    for filename, sql in files.items():
        if not filename.endswith(".sql"):
            continue
        match = _FILE.match(filename)
        if match is None:
            raise MigrationError(f"bad migration file name {filename!r}: expected NNNN_name.sql "
                                 "(four digits, lower-case name)")
        version = int(match.group(1))
        if version == 0:
            raise MigrationError(f"{filename}: versions start at 0001")
        if version in by_version:
            raise MigrationError(f"two migrations with version {version:04d}: "
                                 f"{by_version[version].filename} and {filename}")
        by_version[version] = Migration(version, match.group(2), sql, checksum(sql))
    return [by_version[v] for v in sorted(by_version)]


def load_migrations(directory: Path | str) -> list[Migration]:
    """The migrations in ``directory`` (an empty list if it has none)."""
    path = Path(directory)
    if not path.is_dir():
        raise MigrationError(f"migrations directory {path} does not exist")
    return parse_migrations({f.name: f.read_text(encoding="utf-8") for f in path.iterdir() if f.is_file()})


def plan(available: Sequence[Migration], applied: Iterable[Applied], *, schema: str = "") -> Plan:
    """What to apply; raises ``ChecksumMismatch`` if an applied file changed; pure."""
    applied_by_version = {a.version: a for a in applied}
    files = {m.version: m for m in available}
    changed = [m for m in available
               if m.version in applied_by_version and applied_by_version[m.version].checksum != m.checksum]
    if changed:
        names = ", ".join(m.filename for m in changed)
        raise ChecksumMismatch(
            f"schema {schema or '?'}: applied migration(s) changed since they were applied: {names}; "
            "restore the applied text and put the change in a new migration file")
    pending = [m for m in available if m.version not in applied_by_version]
    newest = max(applied_by_version, default=0)
    return Plan(
        pending=pending,
        out_of_order=[m for m in pending if m.version < newest],
        unknown=[a for v, a in sorted(applied_by_version.items()) if v not in files],
    )


def lock_key(schema: str) -> str:
    """The text whose hash keys the advisory lock that serialises migrations of ``schema``."""
    return f"roost.migrate:{schema}"


async def migrate(pool: asyncpg.Pool, schema: str = CORE_SCHEMA,
                  directory: Path | str | None = None) -> list[Migration]:
    """Bring ``schema`` up to date with the files in ``directory`` (core's by default).

    Safe when several replicas call it at once.  Returns the migrations this call applied.
    """
    check_schema(schema)
    migrations = load_migrations(directory if directory is not None else CORE_MIGRATIONS)
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", lock_key(schema))
        try:
            return await _migrate_locked(conn, schema, migrations)
        finally:
            if not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", lock_key(schema))


async def _migrate_locked(conn: AnyConnection, schema: str, migrations: list[Migration]) -> list[Migration]:
    await conn.execute(f"""
        CREATE SCHEMA IF NOT EXISTS {schema};
        CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
            version    integer     PRIMARY KEY,
            name       text        NOT NULL,
            checksum   text        NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )""")
    rows = await conn.fetch(f"SELECT version, name, checksum FROM {schema}.schema_migrations")
    todo = plan(migrations, [Applied(r["version"], r["name"], r["checksum"]) for r in rows], schema=schema)
    for unknown in todo.unknown:
        log.warning("migration applied but unknown to this release", schema=schema, version=unknown.version,
                    name=unknown.name)
    for late in todo.out_of_order:
        log.warning("applying a migration older than the newest applied one", schema=schema,
                    migration=late.filename)
    applied: list[Migration] = []
    for migration in todo.pending:
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL search_path TO {schema}, public")
                await conn.execute(migration.sql)
                await conn.execute(
                    f"INSERT INTO {schema}.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version, migration.name, migration.checksum)
        except asyncpg.PostgresError as exc:
            raise MigrationError(f"schema {schema}: migration {migration.filename} failed and was rolled back: "
                                 f"{type(exc).__name__}: {exc}") from exc
        log.info("migration applied", schema=schema, migration=migration.filename)
        applied.append(migration)
    return applied


async def applied_versions(pool: asyncpg.Pool, schema: str = CORE_SCHEMA) -> list[Applied]:
    """What ``<schema>.schema_migrations`` records, in version order (empty if never migrated)."""
    check_schema(schema)
    exists = await pool.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{schema}.schema_migrations")
    if not exists:
        return []
    rows = await pool.fetch(f"SELECT version, name, checksum FROM {schema}.schema_migrations ORDER BY version")
    return [Applied(r["version"], r["name"], r["checksum"]) for r in rows]
