"""API tokens and who they belong to.

A token is ``roost_`` + 43 URL-safe base64 characters: 256 bits from ``secrets``.  It is shown once,
when created; PostgreSQL keeps only its SHA-256 (``core.api_tokens``, migration ``0002_auth.sql``).
A fast unsalted hash is the right tool here, unlike for passwords: a password is guessable, so its
hash must be slow and salted to make guessing expensive; a 256-bit random token cannot be guessed at
any speed, so the hash only has to be one-way, and being deterministic it serves as the lookup key
(a unique index), making verification one indexed query.

``Authenticator`` is what the REST layer (``services.core.http.require_role``) and the bus (to
authorise commands: a reader cannot lock a host) ask: ``await authenticate(token) -> Principal | None``.
``PgAuthenticator`` caches answers for a few seconds (a revocation takes effect within ``ttl``,
at once in the process that revoked through it); ``InMemoryAuthenticator`` is for unit tests.
Tokens never appear in logs: only names do (and the log redaction masks anything shaped like a token).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

import asyncpg
import asyncpg.pool
import structlog

from schemas.envelope import Principal, Role

log = structlog.get_logger("roost.auth")

TOKEN_PREFIX = "roost_"
TOKEN_BYTES = 32                                   # 256 bits
_TOKEN_RE = re.compile(r"^roost_[A-Za-z0-9_-]{43}$")

PrincipalKind = Literal["user", "service", "agent"]
Executor = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy | asyncpg.Pool
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


class TokenError(Exception):
    """A token cannot be created or changed as asked."""


class TokenExists(TokenError):
    """An active token already has this name (revoke it first)."""


class AuthUnavailable(Exception):
    """Cannot tell whether a token is valid (the database is unreachable): not the same as invalid."""


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Principal | None:
        """The principal ``token`` (the bearer token, without ``Bearer``) belongs to, or ``None``.

        Raises ``AuthUnavailable`` when it cannot tell.
        """
        ...


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def looks_like_token(token: str) -> bool:
    """Shaped like a roost token (checked before any lookup: garbage never reaches the database)."""
    return bool(_TOKEN_RE.match(token))


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else ``None``."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What may be shown about a token: never the token, never its hash."""

    name: str
    role: Role
    kind: PrincipalKind
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _principal(row: Any) -> Principal:
    return Principal(name=row["name"], role=Role(row["role"]), kind=row["kind"])


# -- the table --------------------------------------------------------------------------------

async def create_token(conn: Executor, name: str, role: Role | str, *, kind: PrincipalKind = "user",
                       expires_at: datetime | None = None) -> str:
    """Create a token for ``name`` and return it: the only time it is ever available in clear.

    Raises ``TokenExists`` when ``name`` already has an active token.
    """
    role = Role(role)
    Principal(name=name, role=role, kind=kind)   # validates the name's length and the kind
    token = generate_token()
    try:
        await conn.execute(
            "INSERT INTO core.api_tokens (name, role, kind, token_hash, expires_at) VALUES ($1, $2, $3, $4, $5)",
            name, role.value, kind, hash_token(token), expires_at)
    except asyncpg.UniqueViolationError:
        raise TokenExists(f"an active token named {name!r} exists; revoke it first") from None
    log.info("api token created", token_name=name, role=role.value, kind=kind)
    return token


async def verify(conn: Executor, token: str, *, touch_interval: float = 60.0) -> Principal | None:
    """The principal of an active, unexpired token, else ``None``.

    Records the use in ``last_used_at`` (at most once per ``touch_interval`` seconds per token).
    """
    if not looks_like_token(token):
        return None
    row = await conn.fetchrow(
        """
        WITH found AS (
            SELECT id, name, role, kind, last_used_at FROM core.api_tokens
             WHERE token_hash = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
        ), touched AS (
            UPDATE core.api_tokens t SET last_used_at = now() FROM found
             WHERE t.id = found.id
               AND (found.last_used_at IS NULL OR found.last_used_at < now() - make_interval(secs => $2))
            RETURNING t.id
        )
        SELECT name, role, kind FROM found
        """, hash_token(token), touch_interval)
    return _principal(row) if row is not None else None


async def revoke(conn: Executor, name: str) -> bool:
    """Revoke ``name``'s active token; ``False`` when it has none."""
    status = await conn.execute(
        "UPDATE core.api_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL", name)
    revoked = status.endswith(" 1")
    if revoked:
        log.info("api token revoked", token_name=name)
    return revoked


async def list_tokens(conn: Executor, *, include_revoked: bool = False) -> list[TokenInfo]:
    rows = await conn.fetch(
        "SELECT name, role, kind, created_at, last_used_at, expires_at, revoked_at FROM core.api_tokens"
        " WHERE $1 OR revoked_at IS NULL ORDER BY created_at, id", include_revoked)
    return [TokenInfo(r["name"], Role(r["role"]), r["kind"], r["created_at"], r["last_used_at"], r["expires_at"],
                      r["revoked_at"]) for r in rows]


async def ensure_bootstrap_admin(conn: Connection, name: str = "admin") -> str | None:
    """Create the first admin token when no active admin token exists, and return it (show it once);
    ``None`` when there is one already.  Replicas calling it together create one token between them."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('roost.auth.bootstrap', 0))")
        exists = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM core.api_tokens WHERE role = 'admin' AND revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > now()))")
        if exists:
            return None
        return await create_token(conn, name, Role.ADMIN)


# -- authenticators ---------------------------------------------------------------------------

class PgAuthenticator:
    """``Authenticator`` on ``core.api_tokens`` with a small in-memory cache.

    Answers (valid and invalid) are cached by token hash for ``ttl`` / ``negative_ttl`` seconds, at most
    ``max_entries`` of them (least recently used dropped first).  A revocation elsewhere takes effect
    here within ``ttl``; ``revoke`` through this object takes effect here at once.
    """

    def __init__(self, pool: asyncpg.Pool, *, ttl: float = 5.0, negative_ttl: float = 1.0,
                 max_entries: int = 4096, timeout: float = 5.0) -> None:
        self.pool = pool
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.timeout = timeout
        self._cache: OrderedDict[bytes, tuple[float, Principal | None]] = OrderedDict()

    async def authenticate(self, token: str) -> Principal | None:
        if not looks_like_token(token):
            return None
        key = hash_token(token)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(key)
            return hit[1]
        try:
            async with asyncio.timeout(self.timeout):
                principal = await verify(self.pool, token)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise AuthUnavailable(f"cannot check the token: {type(exc).__name__}") from exc
        self._cache[key] = (now + (self.ttl if principal is not None else self.negative_ttl), principal)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return principal

    async def revoke(self, name: str) -> bool:
        revoked = await revoke(self.pool, name)
        self.invalidate()
        return revoked

    def invalidate(self) -> None:
        self._cache.clear()


class InMemoryAuthenticator:
    """``Authenticator`` for unit tests: tokens issued and kept in memory (hashed, like the real one)."""

    def __init__(self) -> None:
        self._by_hash: dict[bytes, Principal] = {}

    def issue(self, name: str, role: Role | str, *, kind: PrincipalKind = "user") -> str:
        token = generate_token()
        self._by_hash[hash_token(token)] = Principal(name=name, role=Role(role), kind=kind)
        return token

    def revoke(self, name: str) -> bool:
        hashes = [h for h, p in self._by_hash.items() if p.name == name]
        for h in hashes:
            del self._by_hash[h]
        return bool(hashes)

    async def authenticate(self, token: str) -> Principal | None:
        if not looks_like_token(token):
            return None
        return self._by_hash.get(hash_token(token))
