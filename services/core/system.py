"""The ``core`` component: what the runtime itself answers on the bus.

* ``roost.cmd.system.ping``: proof that the system is up and consuming commands;
* the dead-letter keeper and its ``roost.cmd.dlq.*`` commands (``services.core.deadletters``);
* ``roost.cmd.token.*``: API tokens for operators and tools.  A created token travels once, in the
  reply; the reply is never stored (``reply_has_secrets``) and the database keeps only its hash.

Its tables are core's own migrations, which every host applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import asyncpg
from fastapi import APIRouter

from schemas.core import (
    Pong,
    TokenCreate,
    TokenCreated,
    TokenList,
    TokenListResult,
    TokenRevoke,
    TokenRevoked,
    TokenSummary,
)
from schemas.envelope import utcnow
from services.core import auth
from services.core.bus.bus import Message, Reject
from services.core.deadletters import DeadLetterKeeper
from services.core.host import ServiceContext
from services.core.runner import roost_version

SYSTEM_GROUP = "core-system"
TOKEN_GROUP = "core-token"


class CoreService:
    name = "core"
    migrations: Path | None = None

    def __init__(self) -> None:
        self.keeper: DeadLetterKeeper | None = None
        self._pool: asyncpg.Pool | None = None

    async def start(self, ctx: ServiceContext) -> None:
        self._pool = ctx.pool
        self.keeper = DeadLetterKeeper(ctx.pool, ctx.bus, threshold=ctx.settings.dlq_alarm_threshold)
        await ctx.bus.serve("roost.cmd.system.>", SYSTEM_GROUP, self.ping)
        await ctx.bus.serve("roost.cmd.token.>", TOKEN_GROUP, self.tokens)
        await self.keeper.start()

    async def stop(self) -> None:
        pass

    def routers(self) -> Sequence[APIRouter]:
        return []

    async def ping(self, message: Message) -> Pong:
        return Pong(service=self.name, version=roost_version(), time=utcnow())

    async def tokens(self, message: Message) -> TokenCreated | TokenListResult | TokenRevoked:
        assert self._pool is not None
        data = message.data
        async with self._pool.acquire() as conn:
            if isinstance(data, TokenCreate):
                expires = utcnow() + timedelta(days=data.expires_in_days) if data.expires_in_days else None
                try:
                    token = await auth.create_token(conn, data.name, data.role, expires_at=expires)
                except auth.TokenExists:
                    raise Reject(f"{data.name} already has an active token; revoke it first") from None
                return TokenCreated(name=data.name, role=data.role, token=token, expires_at=expires)
            if isinstance(data, TokenList):
                infos = await auth.list_tokens(conn, include_revoked=data.include_revoked)
                return TokenListResult(items=[TokenSummary(
                    name=i.name, role=i.role, kind=i.kind, created_at=i.created_at, last_used_at=i.last_used_at,
                    expires_at=i.expires_at, revoked_at=i.revoked_at) for i in infos])
            if isinstance(data, TokenRevoke):
                return TokenRevoked(revoked=await auth.revoke(conn, data.name))
        raise Reject(f"{message.envelope.type} is not a token command")
