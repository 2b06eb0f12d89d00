"""ServiceHost.stop, as roost up calls it, on real PostgreSQL and NATS: a second call (a second signal, or a
runner cleaning up after a failed stop) returns once the first has stopped the service, not at its deadline."""

from __future__ import annotations

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
        started = time.monotonic()
        await host.stop(time.monotonic() + 30)
        assert time.monotonic() - started < 5, "the second stop waited for its deadline"
        assert component.stops == 1          # the service was stopped once
