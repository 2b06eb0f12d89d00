"""A keystone-shaped schema for `roost up --demo`: the tables of keystone's identity data that dcsync syncs,
with keystone's table and column names, small enough to create without keystone installed.

The real keystone schema is made by keystone's own migrations (``keystone-manage db_sync``; the tests do it
in a separate virtualenv, ``tests/support/openstack.py``), which the demo must not need.  The tables here are
a subset of keystone's with the same names, keys and the columns the demo uses: ``project`` (a domain is a
project row with ``is_domain``), ``user``, ``local_user``, ``password``, ``role``, ``assignment`` and
``revocation_event``.  ``SPEC`` is dcsync's built-in keystone configuration (``tables.KEYSTONE``) restricted
to them, so a real keystone database syncs the same way with the built-in list.

``add_user`` creates a user the way keystone does it (a ``user`` row, its ``local_user`` and ``password``
rows, a role assignment on a project); the password hash is pbkdf2_sha512 in passlib's format, one of the
hashes keystone verifies (``[identity] password_hash_algorithm``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets as _random
import uuid
from typing import Any

import asyncpg

from services.dcsync.tables import KEYSTONE, Endpoint, EndpointSpec

__all__ = ["SCHEMA", "SPEC", "add_user", "ensure_schema", "hash_password", "list_users"]

ROOT_DOMAIN = "<<keystone.domain.root>>"      # keystone's parent of every domain
NULL_DOMAIN = "<<null>>"                      # keystone's domain_id of a global role
DEFAULT_DOMAIN = "default"
PBKDF2_ROUNDS = 25_000

TABLES = ("project", "user", "local_user", "password", "role", "assignment", "revocation_event")
SPEC = EndpointSpec(Endpoint.IDENTITY, tuple(KEYSTONE.table(name) for name in TABLES))

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS project (
    id varchar(64) PRIMARY KEY, name varchar(64) NOT NULL, extra text, description text, enabled boolean,
    domain_id varchar(64) NOT NULL, parent_id varchar(64), is_domain boolean NOT NULL DEFAULT false,
    UNIQUE (domain_id, name));
CREATE TABLE IF NOT EXISTS "user" (
    id varchar(64) PRIMARY KEY, extra text, enabled boolean, default_project_id varchar(64),
    created_at timestamp, last_active_at date, domain_id varchar(64) NOT NULL);
CREATE TABLE IF NOT EXISTS local_user (
    id serial PRIMARY KEY, user_id varchar(64) NOT NULL UNIQUE REFERENCES "user"(id) ON DELETE CASCADE,
    domain_id varchar(64) NOT NULL, name varchar(255) NOT NULL, failed_auth_count integer,
    failed_auth_at timestamp, UNIQUE (domain_id, name));
CREATE TABLE IF NOT EXISTS password (
    id serial PRIMARY KEY, local_user_id integer NOT NULL REFERENCES local_user(id) ON DELETE CASCADE,
    self_service boolean NOT NULL DEFAULT false, password_hash varchar(255), created_at_int bigint NOT NULL DEFAULT 0,
    expires_at_int bigint, created_at timestamp NOT NULL DEFAULT now(), expires_at timestamp);
CREATE TABLE IF NOT EXISTS role (
    id varchar(64) PRIMARY KEY, name varchar(255) NOT NULL, extra text,
    domain_id varchar(64) NOT NULL DEFAULT '{NULL_DOMAIN}', description varchar(255), UNIQUE (name, domain_id));
CREATE TABLE IF NOT EXISTS assignment (
    type varchar(64) NOT NULL, actor_id varchar(64) NOT NULL, target_id varchar(64) NOT NULL,
    role_id varchar(64) NOT NULL REFERENCES role(id), inherited boolean NOT NULL DEFAULT false,
    PRIMARY KEY (type, actor_id, target_id, role_id, inherited));
CREATE TABLE IF NOT EXISTS revocation_event (
    id serial PRIMARY KEY, domain_id varchar(64), project_id varchar(64), user_id varchar(64), role_id varchar(64),
    trust_id varchar(64), consumer_id varchar(64), access_token_id varchar(64), issued_before timestamp NOT NULL,
    expires_at timestamp, revoked_at timestamp NOT NULL DEFAULT now(), audit_id varchar(32),
    audit_chain_id varchar(32));
"""


def _id(kind: str, name: str) -> str:
    """Stable ids for the seed rows (the same on every run; keystone's are random uuid hex)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"roost-demo/{kind}/{name}").hex


async def ensure_schema(conn: asyncpg.Connection, *, seed: bool) -> None:
    """The tables (when missing) and, with ``seed``, what a keystone bootstrap leaves: the default domain,
    the ``admin`` and ``demo`` projects and the ``admin``, ``member`` and ``reader`` roles (at the system
    controller only: a subcloud gets them from dcsync)."""
    async with conn.transaction():
        await conn.execute(SCHEMA)
        if not seed:
            return
        await conn.execute(
            "INSERT INTO project (id, name, extra, description, enabled, domain_id, parent_id, is_domain) "
            "VALUES ($1, 'Default', '{}', 'The default domain', true, $2, NULL, true) ON CONFLICT DO NOTHING",
            DEFAULT_DOMAIN, ROOT_DOMAIN)
        for project in ("admin", "demo"):
            await conn.execute(
                "INSERT INTO project (id, name, extra, description, enabled, domain_id, parent_id, is_domain) "
                "VALUES ($1, $2, '{}', '', true, $3, $3, false) ON CONFLICT DO NOTHING",
                _id("project", project), project, DEFAULT_DOMAIN)
        for role in ("admin", "member", "reader"):
            await conn.execute("INSERT INTO role (id, name, extra) VALUES ($1, $2, '{}') ON CONFLICT DO NOTHING",
                               _id("role", role), role)


def _ab64(data: bytes) -> str:
    """passlib's "adapted base64": standard alphabet with '.' for '+', no padding."""
    return base64.b64encode(data).decode("ascii").rstrip("=").replace("+", ".")


def hash_password(password: str, *, salt: bytes | None = None, rounds: int = PBKDF2_ROUNDS) -> str:
    """``$pbkdf2-sha512$<rounds>$<salt>$<digest>`` as passlib (and so keystone) writes and verifies it."""
    salt = salt if salt is not None else _random.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, rounds)
    return f"$pbkdf2-sha512${rounds}${_ab64(salt)}${_ab64(digest)}"


class UserError(Exception):
    """The user cannot be added (it exists, or the project or role does not)."""


async def add_user(conn: asyncpg.Connection, name: str, password: str, *, project: str = "demo",
                   role: str = "member") -> dict[str, Any]:
    """Create ``name`` in the default domain with ``password`` and ``role`` on ``project``, in one transaction,
    as keystone does; its row as ``list_users`` shows it."""
    async with conn.transaction():
        project_id = await conn.fetchval("SELECT id FROM project WHERE domain_id = $1 AND name = $2 AND NOT is_domain",
                                         DEFAULT_DOMAIN, project)
        if project_id is None:
            raise UserError(f"no project {project!r} in the default domain")
        role_id = await conn.fetchval("SELECT id FROM role WHERE name = $1 AND domain_id = $2", role, NULL_DOMAIN)
        if role_id is None:
            raise UserError(f"no role {role!r}")
        if await conn.fetchval("SELECT 1 FROM local_user WHERE domain_id = $1 AND name = $2", DEFAULT_DOMAIN, name):
            raise UserError(f"user {name!r} exists already")
        user_id = uuid.uuid4().hex
        await conn.execute("INSERT INTO \"user\" (id, extra, enabled, default_project_id, created_at, domain_id) "
                           "VALUES ($1, $2, true, $3, now(), $4)", user_id, json.dumps({}), project_id, DEFAULT_DOMAIN)
        local_id = await conn.fetchval("INSERT INTO local_user (user_id, domain_id, name, failed_auth_count) "
                                       "VALUES ($1, $2, $3, 0) RETURNING id", user_id, DEFAULT_DOMAIN, name)
        await conn.execute("INSERT INTO password (local_user_id, password_hash, created_at, created_at_int, "
                           "self_service) VALUES ($1, $2, now(), (extract(epoch FROM now()) * 1000000)::bigint, false)",
                           local_id, hash_password(password))
        await conn.execute("INSERT INTO assignment (type, actor_id, target_id, role_id, inherited) "
                           "VALUES ('UserProject', $1, $2, $3, false)", user_id, project_id, role_id)
    users = [u for u in await list_users(conn) if u["name"] == name]
    return users[0]


async def list_users(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Every local user: name, id, enabled, its role assignments on projects, and its password hash's
    algorithm and a short fingerprint (the same on every site the row was synced to)."""
    rows = await conn.fetch(
        """SELECT lu.name, u.id, u.enabled, p.password_hash,
                  (SELECT string_agg(r.name || '@' || pr.name, ',' ORDER BY pr.name, r.name)
                     FROM assignment a JOIN role r ON r.id = a.role_id JOIN project pr ON pr.id = a.target_id
                    WHERE a.actor_id = u.id AND a.type = 'UserProject') AS roles
             FROM local_user lu JOIN "user" u ON u.id = lu.user_id
             LEFT JOIN LATERAL (SELECT password_hash FROM password WHERE local_user_id = lu.id
                                 ORDER BY created_at_int DESC LIMIT 1) p ON true
            ORDER BY lu.name""")
    out = []
    for r in rows:
        hashed = r["password_hash"] or ""
        out.append({"name": r["name"], "id": r["id"], "enabled": r["enabled"], "roles": r["roles"] or "",
                    "password": (hashed.split("$")[1] + ":" + hashlib.sha256(hashed.encode()).hexdigest()[:12])
                    if hashed.startswith("$") else ""})
    return out
