"""The bus contract on the machine's real RabbitMQ, every connection through a TCP proxy that the
outage test uses to cut the broker off (and bring it back).

The broker address comes from ``ROOST_TEST_RABBITMQ_URL`` (default ``amqp://guest:guest@127.0.0.1:5672/``).
A broker that is down makes these tests fail, never skip.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from yarl import URL

from services.core.bus.rabbitmq import RabbitSettings, RabbitTransport
from tests.contract.base import BusContract, OutageFactory, TransportFactory
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.rabbitmq

BROKER = URL(os.environ.get("ROOST_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))


class TestRabbitMQBus(BusContract):
    @pytest.fixture
    async def proxy(self) -> AsyncIterator[TcpProxy]:
        async with TcpProxy(BROKER.host or "127.0.0.1", BROKER.port or 5672) as proxy:
            yield proxy

    @pytest.fixture
    def transport_factory(self, proxy: TcpProxy) -> TransportFactory:
        url = str(BROKER.with_host(proxy.host).with_port(proxy.port))
        return lambda: RabbitTransport(url, RabbitSettings(connect_timeout=5.0, reconnect_interval=0.5))

    @pytest.fixture
    def outage(self, proxy: TcpProxy) -> OutageFactory:
        return proxy.outage
