"""The ``core`` service: what the runtime itself answers on the bus.

* ``roost.cmd.system.ping``: proof that the system is up and consuming commands;
* the dead-letter keeper and its ``roost.cmd.dlq.*`` commands (``services.core.deadletters``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import asyncpg

from schemas.core import Pong
from schemas.envelope import utcnow
from services.core.bus.bus import Bus, Message
from services.core.deadletters import DeadLetterKeeper

SYSTEM_GROUP = "core-system"


def roost_version() -> str:
    try:
        return version("roost")
    except PackageNotFoundError:
        return "0+unknown"


class CoreService:
    name = "core"

    def __init__(self, pool: asyncpg.Pool, bus: Bus, *, dlq_threshold: int = 100) -> None:
        self.bus = bus
        self.keeper = DeadLetterKeeper(pool, bus, threshold=dlq_threshold)

    async def start(self) -> None:
        await self.bus.serve("roost.cmd.system.>", SYSTEM_GROUP, self.ping)
        await self.keeper.start()

    async def ping(self, message: Message) -> Pong:
        return Pong(service=self.name, version=roost_version(), time=utcnow())
