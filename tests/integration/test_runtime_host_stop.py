"""ServiceHost.stop, as roost up calls it, on real PostgreSQL and NATS: a second call (a second signal, or a
runner cleaning up after a failed stop) returns once the first has stopped the service, not at its deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
from fastapi import APIRouter

from services.core.embedded.nats_server import NatsServer
from services.core.host import Connections, ServiceContext, ServiceHost
from services.core.settings import load_settings
from tests.support.nats import nats_server  # noqa: F401  (fixture)
from tests.support.postgres import fresh_database

pytestmark = [pytest.mark.postgres, pytest.mark.nats]


class Quiet:
    """A component that does nothing of its own: what is left is the host's work."""

    name = "quiet"
    migrations = None

    def __init__(self) -> None:
        self.stops = 0

    async def start(self, ctx: ServiceContext) -> None:
        pass

    async def stop(self) -> None:
        self.stops += 1

    def routers(self) -> Sequence[APIRouter]:
        return []


async def test_a_second_stop_returns_with_the_first(nats_server: NatsServer) -> None:  # noqa: F811
    component = Quiet()
    async with fresh_database() as url:
        host = ServiceHost(component, load_settings(), Connections(nats_server.url, url), None)
        await host.start()
        await host.stop(time.monotonic() + 30)
        assert component.stops == 1
        # the first stop has ended: the second has nothing left to wait for, so it ends in the step the event
        # loop gives it (one that stopped the bus, the relay and the pool again awaited I/O, then its deadline)
        again = asyncio.ensure_future(host.stop(time.monotonic() + 30))
        await asyncio.sleep(0)
        assert again.done(), "the second stop went through the stop again"
        await again
        assert component.stops == 1          # the service was stopped once
