"""Command idempotency: the same idempotency key executes once; every repeat gets the first reply.

``run_once(key, command_type, fn)`` runs ``fn`` (the command handler, returning the reply as a JSON
dict) unless a reply for ``key`` is stored, stores what it returns, and returns it.  Two executions of
one key at the same time: one runs, the other waits for it (up to ``wait`` seconds, then
``CommandInProgress``) and returns its reply.  If ``fn`` raises, nothing is stored and the exception
propagates, so a retry of the command runs it again.

The PostgreSQL store claims the key by inserting its row in a transaction that stays open while
``fn`` runs; a concurrent insert of the same key waits on that row.  A crash rolls the claim back, so a
redelivered command runs again: ``fn``'s own effects must be idempotent or live in one transaction
(a command whose effects committed just before a crash can run twice; the window is the commit of the
reply).  While ``fn`` runs, its claim holds one connection of the store's pool: give the store a pool
that ``fn`` does not exhaust.

A key reused for a different command type is refused (``IdempotencyKeyReused``): never returns another
command's reply.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import asyncpg

from services.core.db.migrations import check_schema

Reply = dict[str, Any]
CommandFn = Callable[[], Awaitable[Reply]]


class IdempotencyStore(Protocol):
    async def run_once(self, key: str, command_type: str, fn: CommandFn) -> Reply: ...


class CommandInProgress(Exception):
    """Another execution of this idempotency key is still running."""


class IdempotencyKeyReused(Exception):
    """The idempotency key was first used for a different command type."""


def _reused(key: str, first: str, now: str) -> IdempotencyKeyReused:
    return IdempotencyKeyReused(f"idempotency key {key!r} was used for {first}; refusing to run {now} with it")


def _json_copy(reply: Reply) -> Reply:
    """A deep copy through JSON: what PostgreSQL would store and give back; rejects non-JSON replies."""
    if not isinstance(reply, dict):
        raise TypeError(f"a command reply must be a JSON object, not {type(reply).__name__}")
    copied: Reply = json.loads(json.dumps(reply))
    return copied


class MemoryIdempotencyStore:
    """In-process store for unit tests (and single-process tools): same semantics, no persistence."""

    def __init__(self, *, wait: float = 30.0) -> None:
        self.wait = wait
        self._replies: dict[str, tuple[str, Reply]] = {}
        self._running: dict[str, tuple[str, asyncio.Event]] = {}
        self.executions = 0

    async def run_once(self, key: str, command_type: str, fn: CommandFn) -> Reply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while True:
            if key in self._replies:
                first_type, reply = self._replies[key]
                if first_type != command_type:
                    raise _reused(key, first_type, command_type)
                return _json_copy(reply)
            if key in self._running:
                first_type, done = self._running[key]
                if first_type != command_type:
                    raise _reused(key, first_type, command_type)
                try:
                    async with asyncio.timeout_at(deadline):
                        await done.wait()
                except TimeoutError:
                    raise CommandInProgress(f"command with idempotency key {key!r} is still running") from None
                continue      # stored, or it failed and this execution may run it
            done = asyncio.Event()
            self._running[key] = (command_type, done)
            try:
                self.executions += 1
                reply = _json_copy(await fn())
                self._replies[key] = (command_type, reply)
                return _json_copy(reply)
            finally:
                del self._running[key]
                done.set()


class PgIdempotencyStore:
    """Replies in ``<schema>.idempotency`` (core's, created by core's migrations)."""

    def __init__(self, pool: asyncpg.Pool, schema: str = "core", *, wait: float = 30.0) -> None:
        self.pool = pool
        self.schema = check_schema(schema)
        self.wait = wait
        t = f"{self.schema}.idempotency"
        self._claim = (f"INSERT INTO {t} (key, command_type) VALUES ($1, $2) "
                       "ON CONFLICT (key) DO NOTHING RETURNING true")
        self._read = f"SELECT command_type, reply::text AS reply FROM {t} WHERE key = $1"
        self._store = f"UPDATE {t} SET reply = $2::text::jsonb, completed_at = now() WHERE key = $1"

    async def run_once(self, key: str, command_type: str, fn: CommandFn) -> Reply:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{max(1, int(self.wait * 1000))}ms'")
            try:
                claimed = await conn.fetchval(self._claim, key, command_type)
            except asyncpg.LockNotAvailableError:
                raise CommandInProgress(f"command with idempotency key {key!r} is still running") from None
            if not claimed:
                row = await conn.fetchrow(self._read, key)
                if row is None:       # deleted by retention between the two statements
                    raise CommandInProgress(f"idempotency record {key!r} vanished; retry")
                if row["command_type"] != command_type:
                    raise _reused(key, row["command_type"], command_type)
                if row["reply"] is None:
                    raise CommandInProgress(f"command with idempotency key {key!r} has no reply yet")
                stored: Reply = json.loads(row["reply"])
                return stored
            reply = _json_copy(await fn())
            await conn.execute(self._store, key, json.dumps(reply))
            return reply
