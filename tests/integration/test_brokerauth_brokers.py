"""The broker policy on the real brokers: a nats-server started with the generated config, and the
machine's RabbitMQ with users created through ``rabbitmqctl``.  Raw clients (nats-py, aio-pika) show what
each broker refuses; the RabbitMQ transport shows that an agent and the operator still work.

RabbitMQ users, queues and bindings are named after a uuid per run and removed at teardown.  A broker
that is down (or a missing ``rabbitmqctl``) makes these tests fail, never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import stat
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from pydantic import SecretStr
from yarl import URL

from services.core.brokerauth import (
    NatsTls,
    Policy,
    agent,
    dcagent,
    nats_inbox_prefix,
    operator,
    rabbitmq_operations,
    rabbitmq_permissions,
    render_nats_config,
    roost_policy,
    service,
)
from services.core.brokerauth_apply import (
    BrokerAuthError,
    RabbitCtl,
    apply_nats,
    apply_rabbitmq,
    bcrypt_hasher,
    delete_rabbitmq_users,
    ensure_broker_passwords,
    write_nats_config,
)
from services.core.bus.abc import H_REPLY_TO, ConsumerOptions, OutgoingMessage, PublishFailed, RawDelivery
from services.core.bus.rabbitmq import RabbitSettings, RabbitTransport
from services.core.bus.rabbitmq_topology import (
    COMMANDS_EXCHANGE,
    EVENTS_EXCHANGE,
    group_queue_arguments,
    retry_queue_names,
)
from services.core.embedded.nats_server import NatsServer
from services.core.secrets import SecretStore
from tests.support.waiting import wait_until as wait_for

BROKER = URL(os.environ.get("ROOST_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
FAST = RabbitSettings(connect_timeout=5.0, reconnect_interval=0.3, settle_timeout=5.0)


# == NATS =====================================================================================


@dataclass
class NatsSite:
    server: NatsServer
    policy: Policy
    passwords: dict[str, str]
    config: Path
    errors: dict[str, list[Exception]]
    clients: list[NatsClient]

    async def connect(self, user: str, password: str | None = None) -> NatsClient:
        errors = self.errors.setdefault(user, [])

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        nc = await nats.connect(self.server.url, user=user, password=password or self.passwords[user],
                                inbox_prefix=nats_inbox_prefix(user), error_cb=on_error,
                                allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3)
        self.clients.append(nc)
        return nc

    async def violation(self, user: str, text: str) -> None:
        """Wait until the server told ``user`` about a permissions violation mentioning ``text``."""
        async def seen() -> bool:
            # nats-py lower-cases the server's error line
            return any("permissions violation" in str(e).lower() and text.lower() in str(e).lower()
                       for e in self.errors.get(user, []))
        await wait_for(seen, 5.0, f"a permissions violation for {text} sent to {user}")


@pytest.fixture
async def nats_site(tmp_path: Path) -> AsyncIterator[NatsSite]:
    policy = roost_policy(["h1", "h2"])
    passwords = {name: f"pw-{name}-{uuid.uuid4().hex}" for name in policy.names}
    config = tmp_path / "nats.conf"
    write_nats_config(config, render_nats_config(policy, passwords, server_name="roost"))
    server = NatsServer(tmp_path / "store", config_file=config, server_name="roost", ready_timeout=20.0)
    await server.start()
    site = NatsSite(server, policy, passwords, config, {}, [])
    try:
        core = await site.connect("core")             # the service that manages streams creates them
        js = core.jetstream(timeout=5)
        for domain in ("agent", "cmd", "host"):
            await js.add_stream(name=f"ROOST_{domain.upper()}", subjects=[f"roost.{domain}.>"])
        yield site
    finally:
        for nc in site.clients:
            with contextlib.suppress(Exception):
                await nc.close()
        await server.stop()


@pytest.mark.nats
async def test_nats_config_file_is_private(nats_site: NatsSite) -> None:
    assert stat.S_IMODE(nats_site.config.stat().st_mode) == 0o600


@pytest.mark.nats
async def test_nats_agent_may_publish_its_heartbeat_but_not_a_command(nats_site: NatsSite) -> None:
    nc = await nats_site.connect("agent-h1")
    js = nc.jetstream(timeout=1)

    ack = await js.publish("roost.agent.h1.heartbeat", b"{}")
    assert ack.stream == "ROOST_AGENT"

    # Core NATS: the server drops the publish and tells the client through the error callback;
    # the connection stays up.
    await nc.publish("roost.cmd.host.lock", b"{}")
    await nc.flush()
    await nats_site.violation("agent-h1", '"roost.cmd.host.lock"')
    assert nc.is_connected
    # JetStream: no PubAck ever comes, so the publish times out; nothing was stored.
    with pytest.raises(nats.errors.TimeoutError):
        await js.publish("roost.cmd.host.lock", b"{}")
    for subject in ("roost.agent.h2.heartbeat", "roost.host.state_changed"):
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish(subject, b"{}")
        await nats_site.violation("agent-h1", f'"{subject}"')

    core = nats_site.clients[0].jetstream(timeout=5)
    assert (await core.stream_info("ROOST_CMD")).state.messages == 0
    assert (await core.stream_info("ROOST_HOST")).state.messages == 0
    assert (await core.stream_info("ROOST_AGENT")).state.messages == 1


@pytest.mark.nats
async def test_nats_operator_command_reaches_the_agent_and_the_reply_comes_back(nats_site: NatsSite) -> None:
    cli = await nats_site.connect("roost-cli")
    agent_nc = await nats_site.connect("agent-h1")
    me = nats_site.policy.get("agent-h1")
    consumer = me.consumes[0]

    # the agent joins its own durable consumer (nats-py creates it with the filter in the API subject)
    sub = await agent_nc.jetstream(timeout=5).pull_subscribe(consumer.pattern, durable=consumer.durable,
                                                             stream="ROOST_CMD")
    inbox = cli.new_inbox()
    assert inbox.startswith("_INBOX.roost-cli.")
    replies = await cli.subscribe(inbox)
    ack = await cli.jetstream(timeout=5).publish("roost.cmd.agent.h1.reboot", b'{"cmd": 1}',
                                                 headers={H_REPLY_TO: inbox})
    assert ack.stream == "ROOST_CMD"

    [msg] = await sub.fetch(1, timeout=5)
    assert msg.subject == "roost.cmd.agent.h1.reboot"
    await msg.ack_sync(timeout=5)
    assert msg.headers is not None
    await agent_nc.publish(msg.headers[H_REPLY_TO], b'{"status": "accepted"}')
    reply = await replies.next_msg(timeout=5)
    assert reply.data == b'{"status": "accepted"}'
    assert not nats_site.errors.get("agent-h1") and not nats_site.errors.get("roost-cli")


@pytest.mark.nats
async def test_nats_agent_cannot_read_commands_meant_for_others(nats_site: NatsSite) -> None:
    nc = await nats_site.connect("agent-h1")
    js = nc.jetstream(timeout=1)
    mine = nats_site.policy.get("agent-h1").consumes[0]
    theirs = nats_site.policy.get("agent-h2").consumes[0]

    # a core subscription on commands
    await nc.subscribe("roost.cmd.>")
    await nc.flush()
    await nats_site.violation("agent-h1", '"roost.cmd.>"')
    # its own durable name with a wider filter: refused (the filter is part of the API subject)
    with pytest.raises(nats.errors.TimeoutError):
        await js.add_consumer("ROOST_CMD", name=mine.durable, durable_name=mine.durable, filter_subject="roost.cmd.>")
    # the legacy create, which does not name the filter: refused
    with pytest.raises(nats.errors.TimeoutError):
        await js.add_consumer("ROOST_CMD", durable_name=mine.durable, filter_subject="roost.cmd.>")
    # the other agent's durable: refused
    with pytest.raises(nats.errors.TimeoutError):
        await js.pull_subscribe(theirs.pattern, durable=theirs.durable, stream="ROOST_CMD")
    # another user's inbox
    await nc.subscribe("_INBOX.roost-cli.>")
    await nc.flush()
    await nats_site.violation("agent-h1", '"_INBOX.roost-cli.>"')
    # stream management
    with pytest.raises(nats.errors.TimeoutError):
        await js.add_stream(name="ROOST_EVIL", subjects=["evil.>"])
    with pytest.raises(nats.errors.TimeoutError):
        await js.delete_stream("ROOST_CMD")


@pytest.mark.nats
async def test_nats_wrong_password_or_unknown_user_cannot_connect(nats_site: NatsSite) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats_site.connect("agent-h1", password="not-the-password")
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(nats_site.server.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats_site.connect("agent-h1", password=nats_site.passwords["agent-h2"])


@pytest.mark.nats
async def test_nats_reload_takes_a_removed_agent_off_and_keeps_the_others(nats_site: NatsSite) -> None:
    smaller = roost_policy(["h1"])
    apply_nats(smaller, {n: nats_site.passwords[n] for n in smaller.names}, nats_site.config,
               server_pid=nats_site.server.pid, server_name=nats_site.server.server_name)

    async def h2_refused() -> bool:
        try:
            nc = await nats_site.connect("agent-h2")
        except nats.errors.Error:
            return True
        except OSError:             # the server reset the connection while reloading: ask again
            return False
        await nc.close()
        return False

    await wait_for(h2_refused, 10.0, "agent-h2 to be refused after the reload")
    text = nats_site.config.read_text()
    assert nats_site.passwords["agent-h1"] not in text and 'password: "$2' in text      # hashed by default
    nc = await nats_site.connect("agent-h1")
    assert (await nc.jetstream(timeout=5).publish("roost.agent.h1.hardware", b"{}")).stream == "ROOST_AGENT"


@pytest.mark.nats
async def test_nats_passwords_with_quotes_and_backslashes_and_bcrypt_hashes(tmp_path: Path) -> None:
    hasher = bcrypt_hasher(cost=4)
    policy = Policy((agent("h1"), operator()))
    passwords = {"agent-h1": 'a"b\\c$d{e}#f g\'h-ü', "roost-cli": "plain-" + uuid.uuid4().hex}
    config = tmp_path / "nats.conf"
    write_nats_config(config, render_nats_config(policy, passwords, hasher=hasher))
    text = config.read_text()
    if hasher is not None:                          # bcrypt through the bcrypt package or libxcrypt
        assert passwords["agent-h1"] not in text and passwords["roost-cli"] not in text
        assert text.count('password: "$2') == 2
    async with NatsServer(tmp_path / "store", config_file=config) as server:
        for user, password in passwords.items():
            nc = await nats.connect(server.url, user=user, password=password, allow_reconnect=False,
                                    max_reconnect_attempts=0, connect_timeout=3,
                                    inbox_prefix=nats_inbox_prefix(user))
            await nc.close()
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(server.url, user="agent-h1", password='a"b\\c$d{e}#f', allow_reconnect=False,
                               max_reconnect_attempts=0, connect_timeout=3)


def test_this_machine_can_hash_for_nats() -> None:
    # Debian's libxcrypt (or the bcrypt package) gives hashed passwords in the NATS config here
    hasher = bcrypt_hasher(cost=4)
    assert hasher is not None
    assert hasher("x-password").startswith("$2")


# == RabbitMQ =================================================================================


@dataclass
class RabbitSite:
    suffix: str
    host: str
    policy: Policy
    passwords: dict[str, SecretStr]
    ctl: RabbitCtl

    @property
    def agent(self) -> str:
        return f"agent-{self.host}"

    @property
    def cli(self) -> str:
        return f"roost-cli-{self.suffix}"

    @property
    def svc(self) -> str:
        return f"svc-{self.suffix}"

    def url(self, user: str, password: str | None = None) -> str:
        secret = password if password is not None else self.passwords[user].get_secret_value()
        return str(BROKER.with_user(user).with_password(secret))


def _rabbit_policy(suffix: str, host: str) -> Policy:
    return Policy((agent(host), operator(f"roost-cli-{suffix}"),
                   service(f"svc-{suffix}", events=("host",), reads=(f"roost.agent.{host}.>",))))


async def _broker_up() -> None:
    """Fails (never skips) when the broker is down; declares roost's topology as the transport does."""
    transport = RabbitTransport(str(BROKER), FAST)
    await transport.connect()
    await transport.close()


async def _cleanup(site: RabbitSite) -> None:
    with contextlib.suppress(BrokerAuthError):
        await delete_rabbitmq_users(site.policy.names, site.ctl)
    connection = await aio_pika.connect(str(BROKER), timeout=5)
    try:
        channel = await connection.channel()
        for principal in site.policy.principals:
            for consumer in principal.consumes:
                for queue in [consumer.durable, *retry_queue_names(consumer.durable)]:
                    await channel.queue_delete(queue)
    finally:
        await connection.close()


@pytest.fixture(scope="module")
def rabbit_site() -> Iterator[RabbitSite]:
    suffix = uuid.uuid4().hex[:10]
    host = f"t{suffix}"
    policy = _rabbit_policy(suffix, host)
    passwords = {name: SecretStr(f"pw-{uuid.uuid4().hex}") for name in policy.names}
    site = RabbitSite(suffix, host, policy, passwords, RabbitCtl())
    asyncio.run(_broker_up())
    try:
        report = asyncio.run(apply_rabbitmq(rabbitmq_operations(rabbitmq_permissions(policy), passwords), site.ctl))
        assert sorted(report.created) == sorted(policy.names)
        yield site
    finally:
        asyncio.run(_cleanup(site))


async def _observe(exchange: str, binding: str) -> tuple[aio_pika.abc.AbstractConnection, aio_pika.abc.AbstractQueue]:
    """An exclusive queue of the admin (guest) bound to ``binding``: where an allowed publish lands."""
    connection = await aio_pika.connect(str(BROKER), timeout=5)
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, binding)
    return connection, queue


async def _get(queue: aio_pika.abc.AbstractQueue, timeout: float = 5.0) -> aio_pika.abc.AbstractIncomingMessage:
    deadline = time.monotonic() + timeout
    while True:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            return message
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing arrived in {queue.name} within {timeout}s")
        await asyncio.sleep(0.05)


@pytest.mark.rabbitmq
async def test_rabbitmq_agent_may_publish_its_heartbeat_but_not_a_host_event(rabbit_site: RabbitSite) -> None:
    admin, observed = await _observe(EVENTS_EXCHANGE, f"roost.agent.{rabbit_site.host}.#")
    connection = await aio_pika.connect(rabbit_site.url(rabbit_site.agent), timeout=5)
    try:
        channel = await connection.channel(publisher_confirms=True)
        events = await channel.get_exchange(EVENTS_EXCHANGE, ensure=False)
        await events.publish(aio_pika.Message(b"beat"), f"roost.agent.{rabbit_site.host}.heartbeat", timeout=5)
        assert (await _get(observed)).body == b"beat"

        with pytest.raises(aiormq.exceptions.ChannelAccessRefused, match=r"roost\.host\.state_changed"):
            await events.publish(aio_pika.Message(b"forged"), "roost.host.state_changed", timeout=5)

        for exchange, key in ((COMMANDS_EXCHANGE, "roost.cmd.host.lock"),
                              (EVENTS_EXCHANGE, "roost.agent.someone-else.heartbeat")):
            channel = await connection.channel(publisher_confirms=True)      # the refusal closed the last one
            target = await channel.get_exchange(exchange, ensure=False)
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                await target.publish(aio_pika.Message(b"forged"), key, timeout=5)
    finally:
        await connection.close()
        await admin.close()


@pytest.mark.rabbitmq
async def test_rabbitmq_agent_cannot_bind_or_declare_beyond_its_own(rabbit_site: RabbitSite) -> None:
    me = rabbit_site.policy.get(rabbit_site.agent).consumes[0]
    connection = await aio_pika.connect(rabbit_site.url(rabbit_site.agent), timeout=5)
    try:
        attempts: list[tuple[str, Callable[[aio_pika.abc.AbstractChannel], Awaitable[Any]]]] = [
            ("a queue not its own", lambda ch: ch.declare_queue(f"svc-{rabbit_site.suffix}__x__y", durable=True)),
            ("all commands", lambda ch: _bind_own(ch, me.durable, COMMANDS_EXCHANGE, "roost.cmd.#")),
            ("another agent's commands", lambda ch: _bind_own(ch, me.durable, COMMANDS_EXCHANGE,
                                                              "roost.cmd.agent.other.*.#")),
            ("events", lambda ch: _bind_own(ch, me.durable, EVENTS_EXCHANGE, "roost.#")),
        ]
        for what, attempt in attempts:
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                await attempt(channel)
                pytest.fail(f"the agent could take {what}")
        channel = await connection.channel()
        await _bind_own(channel, me.durable, COMMANDS_EXCHANGE, "roost.cmd.agent." + rabbit_site.host + ".*.#")
    finally:
        await connection.close()


async def _bind_own(channel: aio_pika.abc.AbstractChannel, queue: str, exchange: str, key: str) -> None:
    """Declare the agent's own group queue as the transport does (allowed), then bind it with ``key``."""
    group = queue.split("__", 1)[0]
    q = await channel.declare_queue(queue, durable=True,
                                    arguments=group_queue_arguments(group, ConsumerOptions().max_attempts))
    await q.bind(exchange, key)


@pytest.mark.rabbitmq
async def test_rabbitmq_operator_may_publish_a_command_and_no_event(rabbit_site: RabbitSite) -> None:
    admin, observed = await _observe(COMMANDS_EXCHANGE, f"roost.cmd.agent.{rabbit_site.host}.#")
    connection = await aio_pika.connect(rabbit_site.url(rabbit_site.cli), timeout=5)
    try:
        channel = await connection.channel(publisher_confirms=True)
        commands = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
        await commands.publish(aio_pika.Message(b"reboot"), f"roost.cmd.agent.{rabbit_site.host}.reboot", timeout=5)
        assert (await _get(observed)).body == b"reboot"
        events = await channel.get_exchange(EVENTS_EXCHANGE, ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await events.publish(aio_pika.Message(b"forged"), "roost.host.state_changed", timeout=5)
    finally:
        await connection.close()
        await admin.close()


@pytest.mark.rabbitmq
async def test_rabbitmq_wrong_password_cannot_connect(rabbit_site: RabbitSite) -> None:
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(rabbit_site.url(rabbit_site.agent, "not-the-password"), timeout=5)
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(rabbit_site.url(rabbit_site.agent, rabbit_site.passwords[rabbit_site.cli]
                                               .get_secret_value()), timeout=5)


@pytest.mark.rabbitmq
async def test_rabbitmq_transport_works_for_the_agent_and_the_operator(rabbit_site: RabbitSite) -> None:
    """The real transport, connected as the agent and as the operator: the agent serves its commands and
    replies (default exchange), publishes its heartbeat, and is refused a host event."""
    agent_bus = RabbitTransport(rabbit_site.url(rabbit_site.agent), FAST)
    cli_bus = RabbitTransport(rabbit_site.url(rabbit_site.cli), FAST)
    me = rabbit_site.policy.get(rabbit_site.agent).consumes[0]
    await agent_bus.connect()
    await cli_bus.connect()
    try:
        async def serve(delivery: RawDelivery) -> None:
            assert delivery.reply_to is not None
            await agent_bus.reply(delivery.reply_to, OutgoingMessage("roost.reply", b"done " + delivery.body,
                                                                     uuid.uuid4().hex))
            await delivery.ack()

        await agent_bus.subscribe(me.pattern, me.group, serve)
        reply = await cli_bus.request(OutgoingMessage(f"roost.cmd.agent.{rabbit_site.host}.ping", b"ping",
                                                      uuid.uuid4().hex), timeout=10)
        assert reply.body == b"done ping"

        await agent_bus.publish(OutgoingMessage(f"roost.agent.{rabbit_site.host}.heartbeat", b"{}",
                                                uuid.uuid4().hex), timeout=5)
        with pytest.raises(PublishFailed):
            await agent_bus.publish(OutgoingMessage("roost.host.state_changed", b"{}", uuid.uuid4().hex),
                                    timeout=3)
    finally:
        await agent_bus.close()
        await cli_bus.close()


@pytest.mark.rabbitmq
async def test_rabbitmq_apply_is_idempotent_and_rotates_passwords(rabbit_site: RabbitSite) -> None:
    ops = rabbitmq_operations(rabbitmq_permissions(rabbit_site.policy), rabbit_site.passwords)
    again = await apply_rabbitmq(ops, rabbit_site.ctl)
    assert again.created == [] and sorted(again.password_set) == sorted(rabbit_site.policy.names)
    assert again.changed == [] and again.unchanged == len(ops) - len(rabbit_site.policy.names)

    rotated = dict(rabbit_site.passwords)
    rotated[rabbit_site.cli] = SecretStr('r0tated "pass" \\ $HOME `id` ü')
    await apply_rabbitmq(rabbitmq_operations(rabbitmq_permissions(rabbit_site.policy), rotated), rabbit_site.ctl)
    try:
        connection = await aio_pika.connect(rabbit_site.url(rabbit_site.cli, rotated[rabbit_site.cli]
                                                            .get_secret_value()), timeout=5)
        await connection.close()
        with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
            await aio_pika.connect(rabbit_site.url(rabbit_site.cli), timeout=5)
    finally:
        await apply_rabbitmq(ops, rabbit_site.ctl)
    connection = await aio_pika.connect(rabbit_site.url(rabbit_site.cli), timeout=5)
    await connection.close()


@pytest.mark.rabbitmq
async def test_rabbitmq_passwords_reach_no_log_and_no_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:10]
    policy = Policy((agent(f"s{suffix}"),))
    store = SecretStore(tmp_path / "secrets")
    passwords = ensure_broker_passwords(store, policy)
    assert ensure_broker_passwords(store, policy) == passwords          # kept, not regenerated
    secret = passwords[policy.names[0]].get_secret_value()
    ctl = RabbitCtl()
    await _broker_up()
    try:
        await apply_rabbitmq(rabbitmq_operations(rabbitmq_permissions(policy), passwords), ctl)
        # a vhost that does not exist: rabbitmqctl fails after the password was set
        with pytest.raises(BrokerAuthError) as info:
            await apply_rabbitmq(rabbitmq_operations(rabbitmq_permissions(policy, vhost=f"nope-{suffix}"),
                                                     passwords), ctl)
        assert f"nope-{suffix}" in str(info.value) and secret not in str(info.value)
    finally:
        await delete_rabbitmq_users(policy.names, ctl)
    out = capsys.readouterr()
    assert secret not in out.out and secret not in out.err


@pytest.mark.rabbitmq
async def test_rabbitmq_a_subcloud_agent_takes_only_its_own_sync_commands() -> None:
    """Two subclouds' agents and a sender, on the real transport: each agent serves and answers its own sync
    commands; it may not bind its queue to the other's, nor publish the other's heartbeat."""
    suffix = uuid.uuid4().hex[:10]
    mine, theirs = dcagent(f"a{suffix}"), dcagent(f"b{suffix}")
    policy = Policy((mine, theirs, operator(f"dcsync-{suffix}", sends=("roost.cmd.sync.>",))))
    passwords = {name: SecretStr(f"pw-{uuid.uuid4().hex}") for name in policy.names}
    site = RabbitSite(suffix, f"a{suffix}", policy, passwords, RabbitCtl())
    await _broker_up()
    await apply_rabbitmq(rabbitmq_operations(rabbitmq_permissions(policy), passwords), site.ctl)
    agent_bus = RabbitTransport(site.url(mine.name), FAST)
    sender = RabbitTransport(site.url(f"dcsync-{suffix}"), FAST)
    try:
        await agent_bus.connect()
        await sender.connect()
        me = mine.consumes[0]

        async def serve(delivery: RawDelivery) -> None:
            assert delivery.reply_to is not None
            await agent_bus.reply(delivery.reply_to, OutgoingMessage("roost.reply", b"hello from a",
                                                                     uuid.uuid4().hex))
            await delivery.ack()

        await agent_bus.subscribe(me.pattern, me.group, serve)
        reply = await sender.request(OutgoingMessage(f"roost.cmd.sync.a{suffix}.hello", b"{}", uuid.uuid4().hex),
                                     timeout=10)
        assert reply.body == b"hello from a"
        await agent_bus.publish(OutgoingMessage(f"roost.dcagent.a{suffix}.heartbeat", b"{}", uuid.uuid4().hex),
                                timeout=5)
        with pytest.raises(PublishFailed):
            await agent_bus.publish(OutgoingMessage(f"roost.dcagent.b{suffix}.heartbeat", b"{}", uuid.uuid4().hex),
                                    timeout=3)

        connection = await aio_pika.connect(site.url(mine.name), timeout=5)
        try:
            for key in (f"roost.cmd.sync.b{suffix}.#", "roost.cmd.sync.*.#", "roost.cmd.sync.#"):
                channel = await connection.channel()
                with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                    await _bind_own(channel, me.durable, COMMANDS_EXCHANGE, key)
                    pytest.fail(f"dcagent-a{suffix} could bind {key}")
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                await channel.declare_queue(theirs.consumes[0].durable, durable=True)
        finally:
            await connection.close()
    finally:
        await agent_bus.close()
        await sender.close()
        await _cleanup(site)


@pytest.mark.rabbitmq
async def test_rabbitmqctl_missing_is_one_clear_error() -> None:
    with pytest.raises(BrokerAuthError, match="not found"):
        await RabbitCtl(executable="/nonexistent/rabbitmqctl").users()


# == TLS (NATS) ===============================================================================


def _pki(directory: Path) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, with the openssl CLI."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=roost test CA")
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, cn in (("server", "127.0.0.1"), ("client", "agent-h1")):
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return directory


@pytest.mark.nats
async def test_nats_over_tls_with_client_certificates_and_users(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    policy = Policy((agent("h1"),))
    passwords = {"agent-h1": "tls-" + uuid.uuid4().hex}
    config = tmp_path / "nats.conf"
    tls = NatsTls(cert_file=pki / "server.pem", key_file=pki / "server.key", ca_file=pki / "ca.pem", verify=True)
    write_nats_config(config, render_nats_config(policy, passwords, tls=tls))

    def context(with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        if with_cert:
            ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        return ctx

    async with NatsServer(tmp_path / "store", config_file=config) as server:
        url = f"tls://127.0.0.1:{server.port}"
        common: dict[str, Any] = dict(user="agent-h1", password=passwords["agent-h1"], allow_reconnect=False,
                                      max_reconnect_attempts=0, connect_timeout=3,
                                      inbox_prefix=nats_inbox_prefix("agent-h1"))
        nc = await nats.connect(url, tls=context(True), **common)
        try:
            await nc.publish("roost.agent.h1.heartbeat", b"{}")
            await nc.flush()
        finally:
            await nc.close()
        for attempt in (dict(tls=context(False)), {}):          # no client certificate; no TLS at all
            with pytest.raises(Exception):  # noqa: B017 - nats-py raises what the socket raised
                await nats.connect(url if attempt else f"nats://127.0.0.1:{server.port}", **attempt, **common)
