"""What is specific to the NATS JetStream transport, against a real nats-server from the wheel.

The broker-agnostic behaviour is in the contract suite (tests/contract); here: Nats-Msg-Id dedup, the
streams and consumers it declares, unroutable commands, nak delays, dead-letter headers, a server restart,
connection errors, and what ``Subscription.stop()`` hands back.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import api as js_api

from services.core.bus.abc import (
    H_AUTHORIZATION,
    H_DLQ_ATTEMPTS,
    H_DLQ_GROUP,
    H_DLQ_REASON,
    H_DLQ_SUBJECT,
    H_DLQ_TIME,
    H_MESSAGE_ID,
    H_REPLY_TO,
    ConsumerOptions,
    NotConnected,
    OutgoingMessage,
    RawDelivery,
    Unroutable,
)
from services.core.bus.nats import NatsTransport, redact
from services.core.bus.subjects import durable_name
from services.core.embedded.nats_server import NatsServer
from tests.support.nats import nats_server, nats_transports  # noqa: F401 - fixtures
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_until as wait_for

pytestmark = pytest.mark.nats

Factory = Callable[[], NatsTransport]


def msg(subject: str, n: int | str, message_id: str | None = None, **headers: str) -> OutgoingMessage:
    return OutgoingMessage(subject, str(n).encode(), message_id or f"id-{subject}-{n}", headers)


async def connected(factory: Factory) -> NatsTransport:
    transport = factory()
    await transport.connect()
    return transport


class Collector:
    """Acks everything and remembers it."""

    def __init__(self) -> None:
        self.got: list[RawDelivery] = []

    async def __call__(self, delivery: RawDelivery) -> None:
        self.got.append(delivery)
        await delivery.ack()

    @property
    def bodies(self) -> list[bytes]:
        return [d.body for d in self.got]


async def raw_js(server: NatsServer) -> tuple[NatsClient, nats.js.JetStreamContext]:
    nc = await nats.connect(server.url)
    return nc, nc.jetstream()


# -- dedup ------------------------------------------------------------------------------------


async def test_the_same_message_id_is_stored_and_delivered_once(nats_transports: Factory,  # noqa: F811
                                                                nats_server: NatsServer) -> None:  # noqa: F811
    transport = await connected(nats_transports)
    seen = Collector()
    await transport.subscribe("roost.dedup.x", "dedup", seen)
    await transport.publish(msg("roost.dedup.x", "first", "same-id"))
    await transport.publish(msg("roost.dedup.x", "again", "same-id"))            # a relay's retry
    results = await transport.publish_many([msg("roost.dedup.x", "third", "same-id"),
                                            msg("roost.dedup.x", "sentinel")])
    assert results == [None, None], "a duplicate is confirmed, not an error"
    await wait_for(lambda: b"sentinel" in seen.bodies, what="the sentinel")
    assert seen.bodies == [b"first", b"sentinel"]
    assert seen.got[0].message_id == "same-id"
    nc, js = await raw_js(nats_server)
    assert (await js.stream_info("ROOST_DEDUP")).state.messages == 2
    await nc.close()


# -- what gets declared -----------------------------------------------------------------------


async def test_one_file_backed_stream_per_domain_and_a_durable_pull_consumer_per_group(
        nats_transports: Factory, nats_server: NatsServer) -> None:  # noqa: F811
    transport = await connected(nats_transports)
    await transport.publish(msg("roost.host.state_changed", 1))
    await transport.publish(msg("roost.alarm.raised", 1))
    await transport.subscribe("roost.host.*", "inventory", Collector(), ConsumerOptions(prefetch=300, ack_wait=12))
    nc, js = await raw_js(nats_server)
    try:
        for name, subjects in (("ROOST_HOST", ["roost.host.>"]), ("ROOST_ALARM", ["roost.alarm.>"])):
            config = (await js.stream_info(name)).config
            assert config.subjects == subjects
            assert config.storage == js_api.StorageType.FILE
            assert config.retention == js_api.RetentionPolicy.LIMITS
            assert config.duplicate_window == 120.0
            assert config.max_consumers == 100_000     # not nats-server's default of 1,000 per stream
        consumer = await js.consumer_info("ROOST_HOST", durable_name("inventory", "roost.host.*"))
        c = consumer.config
        assert c.durable_name == "inventory__roost_host_any__" + durable_name("inventory", "roost.host.*")[-8:]
        assert c.filter_subject == "roost.host.*"
        assert c.ack_policy == js_api.AckPolicy.EXPLICIT
        assert c.ack_wait == 12.0
        assert c.max_deliver == -1
        assert c.max_ack_pending is not None and c.max_ack_pending >= 300
        assert c.deliver_policy == js_api.DeliverPolicy.NEW
        assert consumer.config.deliver_subject is None, "a pull consumer"
    finally:
        await nc.close()


async def test_a_pull_request_carries_the_groups_idle_heartbeat(nats_transports: Factory,  # noqa: F811
                                                                 nats_server: NatsServer) -> None:  # noqa: F811
    """An idle consumer costs the server and the client a message every ``idle_heartbeat``: a group that waits
    idle most of the time (a subcloud agent) asks for fewer, and its pull request lasts longer."""
    import json
    nc = await nats.connect(nats_server.url)
    pulls: dict[str, dict[str, int]] = {}

    async def seen(m: nats.aio.msg.Msg) -> None:
        pulls[m.subject.rsplit(".", 1)[1]] = json.loads(m.data)

    await nc.subscribe("$JS.API.CONSUMER.MSG.NEXT.>", cb=seen)
    await nc.flush()
    transport = await connected(nats_transports)
    try:
        await transport.subscribe("roost.idle.a", "chatty", Collector())
        await transport.subscribe("roost.idle.b", "quiet", Collector(), ConsumerOptions(idle_heartbeat=10.0))
        chatty, quiet = durable_name("chatty", "roost.idle.a"), durable_name("quiet", "roost.idle.b")
        await wait_for(lambda: chatty in pulls and quiet in pulls, what="both pull requests")
        assert (pulls[chatty]["idle_heartbeat"], pulls[chatty]["expires"]) == (2 * 10**9, 10 * 10**9)
        assert (pulls[quiet]["idle_heartbeat"], pulls[quiet]["expires"]) == (10 * 10**9, 50 * 10**9)
    finally:
        await nc.close()


async def test_an_unconfirmed_ack_still_settles_the_delivery(nats_transports: Factory,  # noqa: F811
                                                             nats_server: NatsServer) -> None:  # noqa: F811
    transport = await connected(nats_transports)
    seen = Collector()
    await transport.subscribe("roost.quick.x", "quick", seen, ConsumerOptions(ack_wait=2, confirm_acks=False))
    for i in range(20):
        await transport.publish(msg("roost.quick.x", i))
    await wait_for(lambda: len(seen.got) == 20, what="20 deliveries")
    nc, js = await raw_js(nats_server)
    try:
        async def settled() -> bool:
            info = await js.consumer_info("ROOST_QUICK", durable_name("quick", "roost.quick.x"))
            return info.num_ack_pending == 0 and info.ack_floor.stream_seq == 20
        await wait_for(settled, what="every ack registered by the server")
    finally:
        await nc.close()
    assert len(seen.got) == 20 and all(d.attempt == 1 for d in seen.got)


async def test_a_message_wakes_one_idle_worker_not_all(nats_transports: Factory) -> None:  # noqa: F811
    """With 50 workers idle, a message wakes one of them: the 49 others keep waiting where they were (an
    Event shared by all woke every idle worker for every message)."""
    from services.core.bus.nats_consumer import NatsSubscription
    transport = await connected(nats_transports)
    seen = Collector()
    sub = await transport.subscribe("roost.herd.x", "herd", seen, ConsumerOptions(concurrency=50))
    assert isinstance(sub, NatsSubscription)
    await wait_for(lambda: sum(not f.done() for f in sub._idle) == 50, what="50 idle workers")
    waiting = [f for f in sub._idle if not f.done()]
    await transport.publish(msg("roost.herd.x", 1))
    await wait_for(lambda: len(seen.got) == 1, what="the message")
    await wait_for(lambda: sum(not f.done() for f in sub._idle) == 50, what="its worker idle again")
    assert sum(not f.done() for f in waiting) == 49


async def test_a_new_group_starts_with_what_is_published_from_then_on(nats_transports: Factory) -> None:  # noqa: F811
    transport = await connected(nats_transports)
    await transport.publish(msg("roost.late.x", "before"))
    seen = Collector()
    await transport.subscribe("roost.late.x", "late", seen)
    await transport.publish(msg("roost.late.x", "after"))
    await wait_for(lambda: len(seen.got) >= 1, what="the event published after binding")
    assert seen.bodies == [b"after"]


# -- commands ---------------------------------------------------------------------------------


async def test_a_command_nobody_handles_is_unroutable(nats_transports: Factory) -> None:  # noqa: F811
    transport = await connected(nats_transports)
    with pytest.raises(Unroutable):                       # no ROOST_CMD stream at all yet
        await transport.publish(msg("roost.cmd.host.lock", 1))
    sub = await transport.subscribe("roost.cmd.host.lock", "inventory", Collector())
    await transport.publish(msg("roost.cmd.host.lock", 2))
    with pytest.raises(Unroutable):                       # the stream exists, no group takes this one
        await transport.publish(msg("roost.cmd.host.unlock", 3))
    other = await connected(nats_transports)               # another process sees the group at once
    await other.publish(msg("roost.cmd.host.lock", 4))
    results = await other.publish_many([msg("roost.cmd.host.lock", 5), msg("roost.cmd.host.unlock", 6)])
    assert results[0] is None and isinstance(results[1], Unroutable)
    await sub.stop()
    await transport.publish(msg("roost.cmd.host.lock", 7))     # a stopped member's group still takes commands
    await transport.delete_group("roost.cmd.host.lock", "inventory")
    with pytest.raises(Unroutable):
        await transport.publish(msg("roost.cmd.host.lock", 8))
    await transport.subscribe("roost.cmd.host.>", "orchestrator", Collector())
    await transport.publish(msg("roost.cmd.host.unlock", 9))


async def test_concurrent_commands_list_the_consumers_once(nats_transports: Factory,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a group takes a command is looked up once for all the publishes waiting on it (at 1,000
    subclouds, every sync request missing the cache at once listed 1,000 consumers each)."""
    transport = await connected(nats_transports)
    await transport.subscribe("roost.cmd.sync.a.>", "dcagent-a", Collector())
    await transport.subscribe("roost.cmd.sync.b.>", "dcagent-b", Collector())
    assert isinstance(transport, NatsTransport)
    listings = 0
    original = transport._consumer_filters

    async def counted(stream: str) -> list[str]:
        nonlocal listings
        listings += 1
        return await original(stream)

    monkeypatch.setattr(transport, "_consumer_filters", counted)
    transport._routes.clear()
    results = await asyncio.gather(*(transport.publish(msg(f"roost.cmd.sync.{n}.apply", i))
                                     for i, n in enumerate("ab" * 10 + "c")), return_exceptions=True)
    assert results[:-1] == [None] * 20 and isinstance(results[-1], Unroutable)
    assert listings == 1


async def test_request_reply_travels_on_a_core_nats_inbox(nats_transports: Factory) -> None:  # noqa: F811
    server, client = await connected(nats_transports), await connected(nats_transports)
    addresses: list[str | None] = []

    async def answer(delivery: RawDelivery) -> None:
        addresses.append(delivery.reply_to)
        assert delivery.reply_to is not None
        await server.reply(delivery.reply_to, msg("roost.reply", "pong"))
        await delivery.ack()

    await server.subscribe("roost.cmd.test.ping", "pinger", answer)
    reply = await client.request(msg("roost.cmd.test.ping", "ping"), timeout=10)
    assert reply.body == b"pong"
    assert addresses[0] is not None and addresses[0].startswith("_INBOX.")


async def test_a_reply_address_outside_the_inbox_is_refused(nats_transports: Factory) -> None:  # noqa: F811
    transport = await connected(nats_transports)
    seen = Collector()
    await transport.subscribe("roost.victim.x", "victim", seen)
    await transport.reply("roost.victim.x", msg("roost.reply", "forged"))    # a forged x-roost-reply-to
    await transport.publish(msg("roost.victim.x", "sentinel"))
    await wait_for(lambda: b"sentinel" in seen.bodies, what="the sentinel")
    assert seen.bodies == [b"sentinel"]


# -- settlement -------------------------------------------------------------------------------


async def test_a_nak_delay_is_honoured(nats_transports: Factory) -> None:  # noqa: F811
    transport = await connected(nats_transports)
    arrivals: list[tuple[float, int]] = []

    async def later(delivery: RawDelivery) -> None:
        arrivals.append((time.monotonic(), delivery.attempt))
        if delivery.attempt == 1:
            await delivery.retry(1.5)
        else:
            await delivery.ack()

    await transport.subscribe("roost.nak.x", "nak", later)
    await transport.publish(msg("roost.nak.x", 1))
    await wait_for(lambda: len(arrivals) >= 2, what="the redelivery")
    assert arrivals[1][1] == 2
    assert 1.4 <= arrivals[1][0] - arrivals[0][0] < 5.0


async def test_an_unsettled_or_failed_delivery_comes_back(nats_transports: Factory) -> None:  # noqa: F811
    transport = await connected(nats_transports)
    attempts: list[int] = []

    async def flaky(delivery: RawDelivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt == 1:
            return                                   # forgot to settle
        if delivery.attempt == 2:
            raise RuntimeError("boom")               # raised
        await delivery.ack()

    await transport.subscribe("roost.flaky.x", "flaky", flaky, ConsumerOptions(ack_wait=60))
    await transport.publish(msg("roost.flaky.x", 1))
    await wait_for(lambda: len(attempts) >= 3, timeout=10, what="three deliveries, well before ack_wait")
    assert attempts == [1, 2, 3]


async def test_dead_letters_carry_the_reason_and_no_secrets(nats_transports: Factory,  # noqa: F811
                                                            nats_server: NatsServer) -> None:  # noqa: F811
    transport = await connected(nats_transports)
    letters = Collector()
    await transport.subscribe("roost.dlq.alarms", "dlq-watch", letters)
    await transport.subscribe("roost.dlq.audit", "dlq-watch", letters)

    async def give_up(delivery: RawDelivery) -> None:
        await delivery.dead_letter("ValueError: line one\nline two")

    await transport.subscribe("roost.poison.x", "alarms", give_up)
    await transport.subscribe("roost.poison.x", "audit", give_up)
    before = datetime.now().astimezone()
    await transport.publish(msg("roost.poison.x", "payload", "poison-1", **{
        H_MESSAGE_ID: "poison-1", H_AUTHORIZATION: "Bearer top-secret-token", H_REPLY_TO: "_INBOX.x.y",
        "x-roost-type": "roost.poison.x"}))
    await wait_for(lambda: len(letters.got) >= 2, what="a dead letter from each group")
    by_group = {d.headers[H_DLQ_GROUP]: d for d in letters.got}
    assert set(by_group) == {"alarms", "audit"}, "the same message dead-lettered by two groups is kept twice"
    letter = by_group["alarms"]
    assert letter.subject == "roost.dlq.alarms"
    assert letter.body == b"payload"
    assert letter.message_id == "poison-1"
    assert letter.headers[H_DLQ_REASON] == "ValueError: line one line two"
    assert letter.headers[H_DLQ_SUBJECT] == "roost.poison.x"
    assert letter.headers[H_DLQ_ATTEMPTS] == "1"
    assert datetime.fromisoformat(letter.headers[H_DLQ_TIME]) >= before.replace(microsecond=0)
    assert letter.headers["x-roost-type"] == "roost.poison.x"
    assert H_AUTHORIZATION not in letter.headers and H_REPLY_TO not in letter.headers
    nc, js = await raw_js(nats_server)
    try:
        assert (await js.stream_info("ROOST_DLQ")).config.max_age in (None, 0.0), "dead letters do not expire"
        info = await js.consumer_info("ROOST_POISON", durable_name("alarms", "roost.poison.x"))
        assert info.num_ack_pending == 0 and info.num_redelivered == 0, "the original was terminated"
    finally:
        await nc.close()


# -- stopping ---------------------------------------------------------------------------------


async def test_stop_finishes_in_flight_work_and_hands_the_rest_back(nats_transports: Factory) -> None:  # noqa: F811
    first, second = await connected(nats_transports), await connected(nats_transports)
    started = asyncio.Event()
    release = asyncio.Event()
    first_done: list[bytes] = []

    async def slow(delivery: RawDelivery) -> None:
        started.set()
        await release.wait()
        first_done.append(delivery.body)
        await delivery.ack()

    sub = await first.subscribe("roost.handback.x", "handback", slow,
                                ConsumerOptions(prefetch=20, concurrency=1, ack_wait=60))
    await first.publish_many([msg("roost.handback.x", n) for n in range(10)])
    await asyncio.wait_for(started.wait(), 10)
    stopping = asyncio.create_task(sub.stop())
    await asyncio.sleep(0)
    assert not stopping.done()
    release.set()
    await asyncio.wait_for(stopping, 10)
    assert first_done == [b"0"], "the callback in flight finished, nothing new started"
    rest = Collector()
    await second.subscribe("roost.handback.x", "handback", rest, ConsumerOptions(ack_wait=60))
    await wait_for(lambda: len(rest.got) >= 9, timeout=10, what="the other nine long before ack_wait")
    assert sorted(rest.bodies) == sorted(str(n).encode() for n in range(1, 10))


# -- the server goes away ---------------------------------------------------------------------


@pytest.mark.parametrize("state_in_memory", [False, True], ids=["state-on-disk", "state-in-memory"])
async def test_consumers_resume_after_a_server_restart_and_nothing_is_lost(
        nats_transports: Factory, nats_server: NatsServer, state_in_memory: bool) -> None:  # noqa: F811
    """A consumer whose state the server keeps in memory is gone after the restart: its member makes it again,
    from when it last saw it, and what was published meanwhile still arrives."""
    subject, group = f"roost.restart.{int(state_in_memory)}", f"survivor-{int(state_in_memory)}"
    producer, consumer = await connected(nats_transports), await connected(nats_transports)
    seen = Collector()
    await consumer.subscribe(subject, group, seen,
                             ConsumerOptions(prefetch=20, ack_wait=5, state_in_memory=state_in_memory))
    nc, js = await raw_js(nats_server)
    try:
        info = await js.consumer_info("ROOST_RESTART", durable_name(group, subject))
        assert bool(info.config.mem_storage) is state_in_memory
    finally:
        await nc.close()
    assert await producer.publish_many([msg(subject, n) for n in range(100)]) == [None] * 100
    await wait_for(lambda: len(seen.got) >= 10, what="some consumed before the restart")

    await nats_server.restart()
    await wait_for(lambda: producer.connected and consumer.connected, what="both reconnected")
    assert await producer.publish_many([msg(subject, n) for n in range(100, 200)]) == [None] * 100
    await wait_for(lambda: {d.body for d in seen.got} >= {str(n).encode() for n in range(200)},
                   timeout=30, what="all 200 after the restart")

    await nats_server.kill()                                 # and once more, as a crash
    await nats_server.start()
    await wait_for(lambda: producer.connected and consumer.connected, what="both reconnected after the crash")
    await producer.publish(msg(subject, "after-crash"))
    await wait_for(lambda: b"after-crash" in seen.bodies, timeout=30, what="delivery after the crash")


@pytest.mark.slow
async def test_a_silent_partition_is_noticed_and_healed(nats_transports: Factory,  # noqa: F811
                                                        nats_server: NatsServer) -> None:  # noqa: F811
    async with TcpProxy(target_port=nats_server.port) as proxy:
        transport = NatsTransport(f"nats://127.0.0.1:{proxy.port}", client_name="roost-partitioned")
        await transport.connect()
        producer = await connected(nats_transports)
        seen = Collector()
        try:
            await transport.subscribe("roost.partition.x", "partitioned", seen, ConsumerOptions(ack_wait=5))
            await producer.publish(msg("roost.partition.x", "before"))
            await wait_for(lambda: b"before" in seen.bodies, what="delivery before the partition")
            await proxy.blackhole()
            started = time.monotonic()
            await wait_for(lambda: not transport.connected, timeout=15, what="the partition noticed")
            assert time.monotonic() - started < 10
            await producer.publish(msg("roost.partition.x", "during"))
            await proxy.restore()
            await wait_for(lambda: transport.connected, timeout=15, what="the reconnect")
            await wait_for(lambda: b"during" in seen.bodies, timeout=20, what="delivery after the partition")
        finally:
            await transport.close()


async def test_a_consumer_deleted_under_a_running_member_is_created_again(
        nats_transports: Factory, nats_server: NatsServer) -> None:  # noqa: F811
    transport = await connected(nats_transports)
    seen = Collector()
    await transport.subscribe("roost.phoenix.x", "phoenix", seen)
    nc, js = await raw_js(nats_server)
    await js.delete_consumer("ROOST_PHOENIX", durable_name("phoenix", "roost.phoenix.x"))
    await consumer_exists(js, "ROOST_PHOENIX", durable_name("phoenix", "roost.phoenix.x"))
    await js.delete_stream("ROOST_PHOENIX")                  # even the stream: publish re-creates it
    await transport.publish(msg("roost.phoenix.x", "reborn"))
    await wait_for(lambda: b"reborn" in seen.bodies, timeout=30, what="delivery to the re-created consumer")
    await nc.close()


async def consumer_exists(js: nats.js.JetStreamContext, stream: str, consumer: str, timeout: float = 20) -> None:
    async def exists() -> bool:
        try:
            await js.consumer_info(stream, consumer)
        except nats.js.errors.NotFoundError:
            return False
        return True

    await wait_for(exists, timeout=timeout, what=f"consumer {consumer} re-created")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connect_to_nothing_fails_fast_with_one_clear_line() -> None:
    url = f"nats://roost:hunter2@127.0.0.1:{_free_port()}"
    transport = NatsTransport(url, connect_timeout=1.0, reconnect_time_wait=0.2)
    started = time.monotonic()
    with pytest.raises(NotConnected) as caught:
        await transport.connect()
    assert time.monotonic() - started < 10
    text = str(caught.value)
    assert "\n" not in text and "connection refused" in text
    assert "hunter2" not in text and "***@127.0.0.1" in text
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


async def test_wrong_credentials_are_reported_as_such(tmp_path: Path) -> None:
    conf = tmp_path / "auth.conf"
    conf.write_text('authorization { user: "roost", password: "right-password" }\n')
    async with NatsServer(tmp_path / "store", config_file=conf) as server:
        wrong = NatsTransport(server.url, user="roost", password="wrong-password", reconnect_time_wait=0.2)
        with pytest.raises(NotConnected, match="authorization") as caught:
            await wrong.connect()
        assert "wrong-password" not in str(caught.value)
        right = NatsTransport(server.url, user="roost", password="right-password")
        await right.connect()
        assert right.connected
        await right.close()


def test_urls_are_redacted_for_logs() -> None:
    assert redact("nats://user:pw@host:4222") == "nats://***@host:4222"
    assert redact("tls://token@host") == "tls://***@host"
    assert redact("nats://host:4222") == "nats://host:4222"
