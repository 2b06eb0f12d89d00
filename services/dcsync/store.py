"""dcsync's tables at the system controller (``migrations/0001_subclouds.sql``), over asyncpg."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import asyncpg

from schemas import dcsync as msg
from services.core.db.pool import AnyConnection

Conn = AnyConnection | asyncpg.Pool


@dataclass(frozen=True, slots=True)
class EndpointRow:
    endpoint: str
    sync_status: str = "unknown"
    needs_resync: bool = True
    agreement: list[dict[str, Any]] | None = None
    skew: list[dict[str, Any]] = field(default_factory=list)
    out_of_sync_since: datetime | None = None
    detail: str = ""
    last_audit: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SubcloudRow:
    name: str
    description: str
    management: str
    availability: str
    join_state: str
    join_policy: str
    last_heard_at: datetime | None
    last_audit_at: datetime | None
    fernet_fingerprint: str | None
    created_at: datetime
    version: int
    endpoints: dict[str, EndpointRow] = field(default_factory=dict)
    cursors: dict[str, dict[str, int]] = field(default_factory=dict)   # endpoint -> lane -> acked seq

    def view(self) -> msg.SubcloudView:
        return msg.SubcloudView(
            name=self.name, description=self.description, management=self.management,
            availability=self.availability, join_state=self.join_state,
            join_policy=self.join_policy,
            sync={e: r.sync_status for e, r in sorted(self.endpoints.items())},
            last_heard_at=self.last_heard_at, last_audit_at=self.last_audit_at, created_at=self.created_at,
            version=self.version)

    def event(self, reason: str = "") -> msg.SubcloudState:
        return msg.SubcloudState(
            entity_id=self.name, version=self.version, management=self.management,
            availability=self.availability, join_state=self.join_state,
            sync={e: r.sync_status for e, r in sorted(self.endpoints.items())},
            reason=reason[:255])


_SUBCLOUD_COLUMNS = ("description", "management", "availability", "join_state", "join_policy", "last_heard_at",
                     "last_audit_at", "fernet_fingerprint")
_ENDPOINT_COLUMNS = ("sync_status", "needs_resync", "agreement", "skew", "out_of_sync_since", "detail", "last_audit")
_JSON_COLUMNS = {"agreement", "skew", "last_audit"}


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _endpoint(r: asyncpg.Record) -> EndpointRow:
    return EndpointRow(r["endpoint"], r["sync_status"], r["needs_resync"], _json(r["agreement"]),
                       _json(r["skew"]) or [], r["out_of_sync_since"], r["detail"], _json(r["last_audit"]))


async def load_all(conn: Conn, name: str | None = None) -> list[SubcloudRow]:
    where, args = ("WHERE name = $1", [name]) if name is not None else ("", [])
    subs = await conn.fetch(f"SELECT * FROM dcsync.subclouds {where} ORDER BY name", *args)
    ends = await conn.fetch(f"SELECT * FROM dcsync.subcloud_endpoints {where.replace('name', 'subcloud')}", *args)
    curs = await conn.fetch(f"SELECT * FROM dcsync.subcloud_cursors {where.replace('name', 'subcloud')}", *args)
    by_sub: dict[str, dict[str, EndpointRow]] = {}
    for r in ends:
        by_sub.setdefault(r["subcloud"], {})[r["endpoint"]] = _endpoint(r)
    cursors: dict[str, dict[str, dict[str, int]]] = {}
    for r in curs:
        cursors.setdefault(r["subcloud"], {}).setdefault(r["endpoint"], {})[r["lane"]] = int(r["acked_seq"])
    return [SubcloudRow(r["name"], r["description"], r["management"], r["availability"], r["join_state"],
                        r["join_policy"], r["last_heard_at"], r["last_audit_at"], r["fernet_fingerprint"],
                        r["created_at"], int(r["version"]), by_sub.get(r["name"], {}), cursors.get(r["name"], {}))
            for r in subs]


async def load(conn: Conn, name: str) -> SubcloudRow | None:
    rows = await load_all(conn, name)
    return rows[0] if rows else None


async def insert(conn: AnyConnection, name: str, *, description: str, management: str, join_policy: str,
                 endpoints: Iterable[str]) -> SubcloudRow | None:
    """The new subcloud, or None when one of that name exists."""
    created = await conn.fetchval(
        "INSERT INTO dcsync.subclouds (name, description, management, join_policy) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT DO NOTHING RETURNING true", name, description, management, join_policy)
    if not created:
        return None
    for e in endpoints:
        await conn.execute("INSERT INTO dcsync.subcloud_endpoints (subcloud, endpoint) VALUES ($1, $2)", name, e)
    return await load(conn, name)


async def update(conn: AnyConnection, row: SubcloudRow, **changes: Any) -> SubcloudRow:
    """Change subcloud columns; the version grows by one."""
    unknown = set(changes) - set(_SUBCLOUD_COLUMNS)
    if unknown:
        raise ValueError(f"not subcloud columns: {sorted(unknown)}")
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(changes, start=2))
    version = await conn.fetchval(
        f"UPDATE dcsync.subclouds SET {sets}{', ' if sets else ''}version = version + 1 "
        "WHERE name = $1 RETURNING version",
        row.name, *changes.values())
    return replace(row, version=int(version), **changes)


async def touch(conn: Conn, heard: Sequence[tuple[str, datetime]]) -> None:
    """When each subcloud was last heard (no new version: not a state change)."""
    if heard:
        await conn.execute(
            "UPDATE dcsync.subclouds s SET last_heard_at = h.at "
            "FROM unnest($1::text[], $2::timestamptz[]) AS h(name, at) "
            "WHERE s.name = h.name AND (s.last_heard_at IS NULL OR s.last_heard_at < h.at)",
            [n for n, _ in heard], [a for _, a in heard])


async def update_endpoint(conn: Conn, name: str, endpoint: EndpointRow, **changes: Any) -> EndpointRow:
    unknown = set(changes) - set(_ENDPOINT_COLUMNS)
    if unknown:
        raise ValueError(f"not endpoint columns: {sorted(unknown)}")
    if changes:
        sets = ", ".join(f"{c} = ${i}{'::jsonb' if c in _JSON_COLUMNS else ''}" for i, c in enumerate(changes, start=3))
        values = [json.dumps(v) if c in _JSON_COLUMNS else v for c, v in changes.items()]
        await conn.execute(f"UPDATE dcsync.subcloud_endpoints SET {sets} WHERE subcloud = $1 AND endpoint = $2",
                           name, endpoint.endpoint, *values)
    return replace(endpoint, **changes)


async def save_cursors(conn: Conn, cursors: Sequence[tuple[str, str, str, int]]) -> None:
    """Many (subcloud, endpoint, lane, acked seq) in one statement."""
    if cursors:
        await conn.execute(
            "INSERT INTO dcsync.subcloud_cursors (subcloud, endpoint, lane, acked_seq) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) "
            "ON CONFLICT (subcloud, endpoint, lane) DO UPDATE SET acked_seq = EXCLUDED.acked_seq",
            [c[0] for c in cursors], [c[1] for c in cursors], [c[2] for c in cursors], [c[3] for c in cursors])


async def delete(conn: Conn, name: str) -> bool:
    return bool(await conn.fetchval("DELETE FROM dcsync.subclouds WHERE name = $1 RETURNING true", name))
