"""The bus contract on the in-memory transport (no broker)."""

from __future__ import annotations

import pytest

from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from tests.contract.base import BusContract, OutageFactory, TransportFactory


class TestInMemoryBus(BusContract):
    @pytest.fixture
    def broker(self) -> InMemoryBroker:
        return InMemoryBroker()

    @pytest.fixture
    def transport_factory(self, broker: InMemoryBroker) -> TransportFactory:
        return lambda: InMemoryTransport(broker)

    @pytest.fixture
    def outage(self, broker: InMemoryBroker) -> OutageFactory:
        return broker.outage
