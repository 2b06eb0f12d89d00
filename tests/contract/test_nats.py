"""The bus contract on NATS JetStream, against a real nats-server from the wheel (one per test)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from services.core.bus.nats import NatsTransport
from services.core.embedded.nats_server import NatsServer
from tests.contract.base import BusContract, OutageFactory, TransportFactory
from tests.support.nats import nats_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.nats


class TestNatsBus(BusContract):
    @pytest.fixture
    def transport_factory(self, nats_server: NatsServer) -> TransportFactory:  # noqa: F811
        return lambda: NatsTransport(nats_server.url, client_name="roost-contract")

    @pytest.fixture
    def outage(self, nats_server: NatsServer) -> OutageFactory:  # noqa: F811
        @contextlib.asynccontextmanager
        async def stopped() -> AsyncIterator[None]:
            """The server process is gone (SIGTERM) and comes back on the same port with the same store."""
            await nats_server.stop()
            try:
                yield
            finally:
                await nats_server.start()

        return stopped
