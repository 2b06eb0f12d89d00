"""The ``core`` component: what the runtime itself answers on the bus.

* ``roost.cmd.system.ping``: proof that the system is up and consuming commands;
* the dead-letter keeper and its ``roost.cmd.dlq.*`` commands (``services.core.deadletters``).

Its tables are core's own migrations, which every host applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fastapi import APIRouter

from schemas.core import Pong
from schemas.envelope import utcnow
from services.core.bus.bus import Message
from services.core.deadletters import DeadLetterKeeper
from services.core.host import ServiceContext
from services.core.runner import roost_version

SYSTEM_GROUP = "core-system"


class CoreService:
    name = "core"
    migrations: Path | None = None

    def __init__(self) -> None:
        self.keeper: DeadLetterKeeper | None = None

    async def start(self, ctx: ServiceContext) -> None:
        self.keeper = DeadLetterKeeper(ctx.pool, ctx.bus, threshold=ctx.settings.dlq_alarm_threshold)
        await ctx.bus.serve("roost.cmd.system.>", SYSTEM_GROUP, self.ping)
        await self.keeper.start()

    async def stop(self) -> None:
        pass

    def routers(self) -> Sequence[APIRouter]:
        return []

    async def ping(self, message: Message) -> Pong:
        return Pong(service=self.name, version=roost_version(), time=utcnow())
