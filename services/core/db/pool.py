"""The asyncpg connection pool every roost service uses.

``create_pool(url)`` takes a libpq-style URL:

* ``postgresql://user:password@host:5432/dbname``
* a unix socket: ``postgresql://user@/dbname?host=/var/run/postgresql``
* TLS: ``postgresql://…?sslmode=verify-full&sslrootcert=/etc/roost/ca.pem`` (asyncpg reads ``sslmode``,
  ``sslrootcert``, ``sslcert``, ``sslkey`` from the URL), or an ``ssl.SSLContext`` passed as ``ssl=``.

Connecting is bounded by ``connect_timeout``; a database that cannot be reached (refused, no answer,
bad credentials, unknown database, TLS failure) raises ``DatabaseUnavailable`` whose message is one line
naming the URL with its password removed.  No codec is installed on the connections: ``jsonb`` travels
as text (``$1::jsonb`` with ``json.dumps``), so every module reads and writes it the same way.
"""

from __future__ import annotations

import asyncio
import os
import ssl as ssl_module
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import asyncpg
import asyncpg.pool

# What callers hold: a connection of their own or one acquired from a pool.
AnyConnection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

SCHEMES = ("postgresql", "postgres")
_SECRET_PARAMS = frozenset({"password", "sslpassword"})


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be used: unreachable, refused the credentials, or the URL is wrong.

    ``str()`` is one line and never contains a password.
    """


def _split_userinfo(netloc: str) -> tuple[str | None, str | None, str]:
    """``user:password@hosts`` -> (user, password, hosts); pure."""
    if "@" not in netloc:
        return None, None, netloc
    userinfo, _, hosts = netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    return user, (password if sep else None), hosts


def redact_url(url: str) -> str:
    """The URL with any password (in the user info or the query) replaced by ``***``; pure."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable database URL>"
    user, password, hosts = _split_userinfo(parts.netloc)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}:***@{hosts}" if password is not None else f"{user}@{hosts}"
    query = parts.query
    if query:
        pairs = [(k, "***" if k in _SECRET_PARAMS else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        query = urlencode(pairs, safe="/*:,")
    # Not urlunsplit: it drops the empty authority of the unix-socket form (postgresql:///db?host=/dir).
    text = f"{parts.scheme}://{netloc}{parts.path}"
    return text + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def _secrets(url: str) -> list[str]:
    """Every password the URL (or the environment libpq-style) carries, to scrub from error text."""
    found: list[str] = []
    try:
        parts = urlsplit(url)
        _, password, _ = _split_userinfo(parts.netloc)
        if password:
            found += [password, unquote(password)]
        found += [v for k, v in parse_qsl(parts.query) if k in _SECRET_PARAMS and v]
    except ValueError:
        pass
    env_password = os.environ.get("PGPASSWORD")
    if env_password:
        found.append(env_password)
    return sorted({s for s in found if s}, key=len, reverse=True)


def describe_error(exc: BaseException, url: str) -> str:
    """One line saying why connecting failed, with every password scrubbed; pure but for the env."""
    if isinstance(exc, TimeoutError):
        reason = "no answer (timed out)"
    else:
        reason = str(exc).strip() or type(exc).__name__
        if isinstance(exc, OSError) and not isinstance(exc, ssl_module.SSLError):
            reason = f"{type(exc).__name__}: {reason}"
    for secret in _secrets(url):
        reason = reason.replace(secret, "***")
    reason = " ".join(reason.split())
    return f"database unavailable at {redact_url(url)}: {reason}"


def check_url(url: str) -> None:
    """Raise ``DatabaseUnavailable`` unless ``url`` looks like a PostgreSQL URL; pure."""
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:
        raise DatabaseUnavailable(f"bad database URL {redact_url(url)}: {exc}") from None
    if scheme not in SCHEMES:
        raise DatabaseUnavailable(
            f"bad database URL {redact_url(url)}: expected postgresql://user:password@host:port/dbname")


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10, connect_timeout: float = 10.0,
                      command_timeout: float | None = None,
                      ssl: ssl_module.SSLContext | str | bool | None = None,
                      application_name: str = "roost", **pool_kwargs: Any) -> asyncpg.Pool:
    """An asyncpg pool on ``url``, checked with one round trip before it is returned.

    ``connect_timeout`` bounds every new connection and the whole start-up.  Raises
    ``DatabaseUnavailable`` (one line, no password) when the database cannot be used.
    """
    check_url(url)
    kwargs: dict[str, Any] = {
        "min_size": min_size,
        "max_size": max_size,
        "timeout": connect_timeout,
        "command_timeout": command_timeout,
        "server_settings": {"application_name": application_name},
        **pool_kwargs,
    }
    if ssl is not None:
        kwargs["ssl"] = ssl
    pool: asyncpg.Pool | None = None
    try:
        async with asyncio.timeout(connect_timeout):
            pool = await asyncpg.create_pool(url, **kwargs)
            await pool.fetchval("SELECT 1")
    except Exception as exc:
        if pool is not None:
            pool.terminate()
        raise DatabaseUnavailable(describe_error(exc, url)) from None
    return pool


async def plan_per_call(conn: AnyConnection) -> None:
    """Plan each statement of ``conn`` for the tables as they are at that call (``plan_cache_mode =
    force_custom_plan``), until the pool's reset on release undoes it.

    For the connections of a hot path (a burst of writes, a queue's claims).  asyncpg prepares each statement
    once per connection, and after five runs PostgreSQL may keep a generic plan, costed for the tables as it
    knew them then (their statistics, not their size now).  One made while a table was nearly empty (after a
    purge and a vacuum on a quiet day, a TRUNCATE, or before autovacuum's first ANALYZE) scans the whole
    table, and goes on doing so at every call as the rows of an alarm storm pile up.  A custom plan reads the
    table's size at each call and costs a fraction of a millisecond to make."""
    await conn.execute("SET plan_cache_mode = force_custom_plan")


async def ping(pool: asyncpg.Pool, *, timeout: float = 2.0) -> bool:
    """Readiness: True when a pooled connection answers ``SELECT 1`` within ``timeout``; never raises."""
    try:
        async with asyncio.timeout(timeout):
            return bool(await pool.fetchval("SELECT 1") == 1)
    except Exception:
        return False
