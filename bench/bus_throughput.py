"""End-to-end throughput of roost's bus next to the raw client libraries, in the same run.

    .venv/bin/python bench/bus_throughput.py [--messages 100000] [--runs 3] [--broker both]

For each broker, ``--runs`` times and alternating (roost, raw, roost, raw, ...): subscribe a consumer,
publish ``--messages`` events of ``--size`` bytes with confirmations (at most ``--window`` awaiting one
at once), and stop the clock when the consumer has acknowledged the last one.  Publisher and consumer
run in this one process, on one asyncio loop and two connections, at the same time.

* roost: ``Bus.publish_raw`` of pre-encoded envelopes (what the outbox relay does) and ``Bus.subscribe``
  with a handler that does nothing.  The consumer decodes and validates every envelope, binds the
  message's ids for the logs, acks and reports to the bus observer: that is the overhead measured.
* raw: aio-pika / nats-py doing what the transport does on the wire (same exchange or stream type,
  queue or consumer arguments, persistence, confirm window, prefetch or pull batch, settle call), with
  the same bodies and headers; the consumer only settles each message.
* transport (``--with-transport``, a diagnostic): roost's transport without the ``Bus`` on top
  (``publish_many`` of the same messages, a callback that only acks), to split the overhead between
  the transport and the bus layer.

Each run has a queue / stream of its own, deleted afterwards; every run is bounded in time, so the
bench always ends.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import aio_pika
import nats
from nats.js import api as js_api
from pydantic import BaseModel, ConfigDict, Field

from bench.machine import load_average
from schemas.envelope import Envelope
from schemas.registry import Registry
from services.core.bus import codec
from services.core.bus.abc import ConsumerOptions, OutgoingMessage, RawDelivery, Transport
from services.core.bus.bus import Bus, Message
from services.core.bus.nats import NatsTransport, StreamPolicy
from services.core.bus.rabbitmq import RabbitSettings, RabbitTransport
from services.core.bus.rabbitmq_topology import H_PUBLISHER, group_queue_arguments
from services.core.bus.subjects import domain_of, durable_name, stream_name
from services.core.embedded.nats_server import NatsServer
from services.core.logging import configure_logging

EVENT_TYPE = "roost.bench.sample"
SOURCE = "roost/bench"
RABBIT_URL = os.environ.get("ROOST_BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
TARGETS = {"rabbitmq": 0.9, "nats": 0.8}
NATS_SETTLE_TIMEOUT = 5.0          # NatsTransport's default settle_timeout, for raw ack_sync
API_TIMEOUT = 5.0                  # NatsTransport's default api_timeout


# -- the payload -----------------------------------------------------------------------------------


class BenchSample(BaseModel):
    """The benchmark's event data: a sequence number and padding up to the wanted body size."""

    model_config = ConfigDict(extra="forbid")

    seq: int = Field(ge=0)
    blob: str = Field(max_length=1_048_576)


def bench_registry() -> Registry:
    """A registry of its own (the shared one is not touched) holding the one benchmark event."""
    registry = Registry()
    registry.event(EVENT_TYPE, "core", BenchSample, "benchmark payload (bench/bus_throughput.py)")
    return registry


def build_messages(count: int, size: int, subject: str) -> list[OutgoingMessage]:
    """``count`` encoded envelopes on ``subject`` whose bodies are exactly ``size`` bytes each."""
    messages = []
    for seq in range(count):
        envelope = Envelope(type=EVENT_TYPE, source=SOURCE, subject=f"bench/{seq}", data={"seq": seq, "blob": ""})
        bare = len(codec.encode(envelope, subject=subject).body)
        if bare > size:
            raise SystemExit(f"--size {size} is too small: an envelope with no padding takes {bare} bytes")
        envelope = envelope.model_copy(update={"data": {"seq": seq, "blob": "x" * (size - bare)}})
        message = codec.encode(envelope, subject=subject)
        if len(message.body) != size:
            raise AssertionError(f"built a body of {len(message.body)} bytes, not {size}")
        messages.append(message)
    return messages


def parse_costs(size: int, count: int = 5000) -> tuple[float, float]:
    """Microseconds per ``codec.encode``, and per ``codec.decode`` + ``registry.validate``, in a tight loop."""
    registry = bench_registry()
    messages = build_messages(count, size, "roost.bench.sample")
    envelopes = [codec.decode(m.body) for m in messages]
    started = time.perf_counter()
    for envelope in envelopes:
        codec.encode(envelope)
    encode = (time.perf_counter() - started) / count * 1e6
    started = time.perf_counter()
    for message in messages:
        registry.validate(codec.decode(message.body))
    return encode, (time.perf_counter() - started) / count * 1e6


# -- one run ---------------------------------------------------------------------------------------


@dataclass
class Setup:
    messages: int
    size: int
    window: int
    prefetch: int
    warmup: int
    runs: int
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])


def run_names(setup: Setup, kind: str, index: int) -> tuple[str, str]:
    """``(subject, group)`` of one run: a domain (so a NATS stream) and a group (a queue) of its own."""
    domain = f"bench{setup.tag}{kind[:2]}{index}"
    return f"roost.{domain}.sample", f"bench-{setup.tag}-{kind}-{index}"


class Countdown:
    """Counts settled messages; set when the last one is in, noting when that was."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.finished_at = 0.0
        self.done = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        if self.count >= self.target and not self.done.is_set():
            self.finished_at = time.perf_counter()
            self.done.set()


class CountingObserver:
    """The bus observer of the roost consumer: counts acknowledged deliveries (reported after the ack)."""

    def __init__(self, countdown: Countdown) -> None:
        self.countdown = countdown

    def published(self, type: str, outcome: str, seconds: float) -> None:
        pass

    def consumed(self, type: str, group: str, outcome: str, seconds: float) -> None:
        if outcome == "ack":
            self.countdown.hit()


@dataclass
class RunResult:
    kind: str
    messages: int
    seconds: float              # first publish -> last ack
    publish_seconds: float      # first publish -> last confirm
    cpu_seconds: float          # this process's CPU time over the run (publisher + consumer)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu_seconds / self.messages * 1e6


def run_timeout(messages: int) -> float:
    """Generous (100k take 15-40 s here); a stuck broker or a lost message ends the bench, not hangs it."""
    return max(60.0, messages / 250)


async def timed_run(kind: str, messages: int, publish: Callable[[], Awaitable[None]],
                    countdown: Countdown) -> RunResult:
    """Start publishing and wait for the consumer's last ack (the consumer is subscribed already)."""
    gc.collect()
    cpu0 = time.process_time()
    started = time.perf_counter()
    publish_done = 0.0

    async def publisher() -> None:
        nonlocal publish_done
        await publish()
        publish_done = time.perf_counter()

    task = asyncio.create_task(publisher())
    timeout = run_timeout(messages)
    try:
        async with asyncio.timeout(timeout):
            await countdown.done.wait()
            await task
    except TimeoutError:
        await _cancel(task)
        raise RuntimeError(f"{kind}: {countdown.count} of {messages} acknowledged after {timeout:g}s; "
                           "bench stopped") from None
    cpu = time.process_time() - cpu0
    return RunResult(kind, messages, countdown.finished_at - started, publish_done - started, cpu)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Cleanup:
    """Async clean-ups run in reverse order, each bounded; a failing one is reported, never raised."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = []

    def add(self, what: str, step: Callable[[], Awaitable[Any]]) -> None:
        self._steps.append((what, step))

    async def __aenter__(self) -> Cleanup:
        return self

    async def __aexit__(self, *_: object) -> None:
        for what, step in reversed(self._steps):
            try:
                await asyncio.wait_for(step(), 30)
            except Exception as exc:          # report it and go on cleaning up
                print(f"   (clean-up: {what} failed: {type(exc).__name__}: {exc})", file=sys.stderr)


async def nothing(message: Message) -> None:
    """The roost handler: does nothing, so the bus acks."""


async def roost_run(kind: str, setup: Setup, count: int, index: int,
                    transport: Callable[[], Transport]) -> RunResult:
    """Through roost, on any transport: the Bus (``kind == "roost"``) or the bare transport."""
    subject, group = run_names(setup, kind, index)
    messages = build_messages(count, setup.size, subject)
    options = ConsumerOptions(prefetch=setup.prefetch)
    countdown = Countdown(count)
    registry = bench_registry()

    async def ack_only(delivery: RawDelivery) -> None:
        await delivery.ack()
        countdown.hit()

    async with Cleanup() as cleanup:
        producer, consumer = transport(), transport()
        await producer.connect()
        cleanup.add("close the publisher", producer.close)
        await consumer.connect()
        cleanup.add("close the consumer", consumer.close)
        if isinstance(consumer, NatsTransport):      # (clean-ups run in reverse: the group goes first)
            stream = stream_name(domain_of(subject))
            js = consumer.client().jetstream()
            cleanup.add(f"delete stream {stream}", lambda: js.delete_stream(stream))
        cleanup.add(f"delete group {group}", lambda: consumer.delete_group(subject, group))
        if kind == "roost":
            publisher = Bus(producer, source=SOURCE, registry=registry)
            bus = Bus(consumer, source=SOURCE, registry=registry, observer=CountingObserver(countdown))
            await bus.subscribe(subject, group, nothing, options=options)

            async def publish() -> None:
                await publisher.publish_raw(messages)
        else:
            await consumer.subscribe(subject, group, ack_only, options)

            async def publish() -> None:
                results = await producer.publish_many(messages)
                failed = [r for r in results if r is not None]
                if failed:
                    raise RuntimeError(f"{len(failed)} publishes failed: {failed[0]}")

        return await timed_run(kind, count, publish, countdown)


# -- RabbitMQ --------------------------------------------------------------------------------------


def rabbit_transport(setup: Setup) -> RabbitTransport:
    return RabbitTransport(RABBIT_URL, RabbitSettings(confirm_window=setup.window))


async def rabbit_raw(setup: Setup, count: int, index: int) -> RunResult:
    """What RabbitTransport does, in aio-pika: a confirming channel publishing persistent, mandatory
    messages to a durable topic exchange, ``window`` awaiting their confirm at once (each with a
    timeout, as the transport's); a quorum queue with the transport's arguments; one channel with
    ``prefetch`` for the consumer, ``basic.ack`` per message."""
    subject, group = run_names(setup, "raw", index)
    bodies = [m.body for m in build_messages(count, setup.size, subject)]
    ids = [str(uuid.uuid4()) for _ in range(count)]
    publisher_id = uuid.uuid4().hex
    exchange_name = f"roost.bench.raw.{setup.tag}"
    queue_name = f"{group}.raw"
    countdown = Countdown(count)

    async with Cleanup() as cleanup:
        pub_conn = await aio_pika.connect_robust(RABBIT_URL)
        cleanup.add("close the raw publisher", pub_conn.close)
        sub_conn = await aio_pika.connect_robust(RABBIT_URL)
        cleanup.add("close the raw consumer", sub_conn.close)

        pub = await pub_conn.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await pub.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
        cleanup.add(f"delete exchange {exchange_name}", exchange.delete)

        sub = await sub_conn.channel(publisher_confirms=False)
        await sub.set_qos(prefetch_count=setup.prefetch)
        queue = await sub.declare_queue(queue_name, durable=True,
                                        arguments=group_queue_arguments(group, ConsumerOptions().max_attempts))
        cleanup.add(f"delete queue {queue_name}", lambda: queue.delete(if_unused=False, if_empty=False))
        await queue.bind(exchange, subject)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            countdown.hit()

        tag = await queue.consume(on_message, no_ack=False)
        cleanup.add("cancel the raw consumer", lambda: queue.cancel(tag))

        async def publish() -> None:
            feed = iter(range(count))

            async def worker() -> None:
                for i in feed:
                    await exchange.publish(
                        aio_pika.Message(bodies[i], message_id=ids[i], delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                         headers={"x-roost-id": ids[i], "x-roost-type": EVENT_TYPE,
                                                  H_PUBLISHER: publisher_id}),
                        subject, mandatory=True, timeout=10.0)

            await asyncio.gather(*(worker() for _ in range(min(setup.window, count))))

        return await timed_run("raw", count, publish, countdown)


async def rabbit_version() -> str:
    connection = await aio_pika.connect(RABBIT_URL, timeout=10)
    try:
        props = connection.transport.connection.server_properties   # type: ignore[union-attr]
        return f"{_text(props.get('product', 'RabbitMQ'))} {_text(props.get('version', '?'))}"
    finally:
        await connection.close()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


# -- NATS JetStream --------------------------------------------------------------------------------


async def nats_raw(setup: Setup, count: int, index: int, url: str) -> RunResult:
    """What NatsTransport does, in nats-py: a file stream (R1, limits retention, the transport's age and
    duplicate window); ``js.publish_async`` with ``window`` PubAcks pending and ``Nats-Msg-Id`` set; a
    durable pull consumer with the transport's configuration; ``fetch(prefetch)`` and ``ack_sync`` (the
    server confirms each ack, as the transport's ``+ACK`` request) per message."""
    subject, group = run_names(setup, "raw", index)
    bodies = [m.body for m in build_messages(count, setup.size, subject)]
    ids = [str(uuid.uuid4()) for _ in range(count)]
    domain = domain_of(subject)
    stream = stream_name(domain)
    consumer_name = durable_name(group, subject)
    policy = StreamPolicy()
    options = ConsumerOptions(prefetch=setup.prefetch)
    countdown = Countdown(count)

    async with Cleanup() as cleanup:
        pub_nc = await nats.connect(url, name="raw-bench-pub")
        cleanup.add("close the raw publisher", pub_nc.close)
        sub_nc = await nats.connect(url, name="raw-bench-sub")
        cleanup.add("close the raw consumer", sub_nc.close)
        js_pub = pub_nc.jetstream(timeout=API_TIMEOUT, publish_async_max_pending=setup.window)
        js = sub_nc.jetstream(timeout=API_TIMEOUT)
        await js.add_stream(js_api.StreamConfig(
            name=stream, subjects=[f"roost.{domain}.>"], retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE, discard=js_api.DiscardPolicy.OLD, max_age=policy.max_age,
            max_bytes=policy.max_bytes, duplicate_window=policy.duplicate_window,
            num_replicas=policy.replicas))
        cleanup.add(f"delete stream {stream}", lambda: js.delete_stream(stream))
        await js.add_consumer(stream, js_api.ConsumerConfig(
            name=consumer_name, durable_name=consumer_name, filter_subject=subject,
            deliver_policy=js_api.DeliverPolicy.NEW, ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=options.ack_wait, max_deliver=-1, max_ack_pending=max(1000, 10 * options.prefetch),
            replay_policy=js_api.ReplayPolicy.INSTANT))
        pull = await js.pull_subscribe_bind(durable=consumer_name, stream=stream)
        cleanup.add("unsubscribe the raw consumer", pull.unsubscribe)

        async def consume() -> None:
            while not countdown.done.is_set():
                try:
                    batch = await pull.fetch(setup.prefetch, timeout=1.0)
                except TimeoutError:
                    continue
                for msg in batch:
                    await msg.ack_sync(timeout=NATS_SETTLE_TIMEOUT)
                    countdown.hit()

        consuming = asyncio.create_task(consume())
        cleanup.add("stop the raw consumer", lambda: _cancel(consuming))

        async def publish() -> None:
            futures = []
            for i in range(count):
                futures.append(await js_pub.publish_async(
                    subject, bodies[i],
                    headers={"x-roost-id": ids[i], "x-roost-type": EVENT_TYPE, "Nats-Msg-Id": ids[i]}))
            for future in futures:
                await future                   # every PubAck; raises the first error

        return await timed_run("raw", count, publish, countdown)


# -- driving ---------------------------------------------------------------------------------------

RunFn = Callable[[Setup, int, int], Awaitable[RunResult]]


@dataclass
class BrokerReport:
    broker: str
    description: str
    results: dict[str, list[RunResult]] = field(default_factory=dict)

    def median(self, kind: str, attribute: str = "rate") -> float:
        return statistics.median(getattr(r, attribute) for r in self.results[kind])


async def bench_broker(broker: str, description: str, setup: Setup, kinds: Sequence[tuple[str, RunFn]]) -> BrokerReport:
    report = BrokerReport(broker, description, {kind: [] for kind, _ in kinds})
    print(f"\n== {broker}: {description}", flush=True)

    async def bounded(run: RunFn, count: int, index: int) -> RunResult:
        async with asyncio.timeout(run_timeout(count) + 180):       # set-up and clean-up included
            return await run(setup, count, index)

    if setup.warmup:
        for _, run in kinds:
            await bounded(run, setup.warmup, 0)
        print(f"   warm-up: {setup.warmup:,} messages each, not counted", flush=True)
    for index in range(1, setup.runs + 1):
        for kind, run in kinds:
            result = await bounded(run, setup.messages, index)
            report.results[kind].append(result)
            print(f"   run {index} {kind:9} {result.rate:8,.0f} msg/s   end-to-end {result.seconds:6.2f} s   "
                  f"publish {result.publish_seconds:6.2f} s   client CPU {result.cpu_us:5.1f} us/msg", flush=True)
    return report


def summarise(report: BrokerReport) -> None:
    roost, raw = report.median("roost"), report.median("raw")
    ratio = roost / raw
    target = TARGETS[report.broker]
    print(f"\n{report.broker}: {report.description}")
    for kind, results in report.results.items():
        rates = sorted(r.rate for r in results)
        print(f"  {kind:9} {report.median(kind):8,.0f} msg/s   median of {len(results)} "
              f"(runs {rates[0]:,.0f}-{rates[-1]:,.0f}); client CPU {report.median(kind, 'cpu_us'):5.1f} us/msg")
    pairs = statistics.median(a.rate / b.rate for a, b in zip(report.results["roost"], report.results["raw"],
                                                              strict=True))
    print(f"  ratio roost/raw = {ratio:.2f}   target >= {target:.1f}: {'met' if ratio >= target else 'NOT met'}   "
          f"(median of the per-run ratios, each roost run against the raw run next to it: {pairs:.2f})")
    print(f"  roost overhead  = {(1 / roost - 1 / raw) * 1e6:+.1f} us/message ((1/roost - 1/raw) * 1e6); client "
          f"CPU {report.median('roost', 'cpu_us') - report.median('raw', 'cpu_us'):+.1f} us/message")
    if "transport" in report.results:
        transport = report.median("transport")
        print(f"    of which transport {(1 / transport - 1 / raw) * 1e6:+.1f} us (transport/raw = "
              f"{transport / raw:.2f}), bus layer {(1 / roost - 1 / transport) * 1e6:+.1f} us")


def header(setup: Setup, brokers: Sequence[str], with_transport: bool) -> None:
    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    encode, decode = parse_costs(setup.size)
    kinds = "roost/transport/raw" if with_transport else "roost/raw"
    print("roost bus throughput: publish with confirmations -> consume -> ack, end to end")
    print(f"  machine : {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, "
          f"load average {load_average()}; the brokers and this process share the CPUs")
    print(f"  python  : {platform.python_implementation()} {platform.python_version()}, default asyncio loop; "
          f"aio-pika {pkg('aio-pika')}, aiormq {pkg('aiormq')}, nats-py {pkg('nats-py')}, pydantic {pkg('pydantic')}")
    print(f"  load    : {setup.messages:,} events of {setup.size} B per run, {setup.runs} runs of each, alternating "
          f"{kinds}, median reported; publisher and consumer in this process on two connections; "
          f"publish window {setup.window}, prefetch / pull batch {setup.prefetch}")
    print(f"  codec   : encode {encode:.1f} us, decode + validate {decode:.1f} us per envelope (tight loop; "
          "encoding is not timed: publish_raw takes encoded envelopes, as the outbox relay does)")
    print(f"  brokers : {', '.join(brokers)}", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000, help="events per run (default 100000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind, alternating (default 3)")
    parser.add_argument("--broker", choices=("rabbitmq", "nats", "both"), default="both")
    parser.add_argument("--size", type=int, default=512, help="encoded envelope size in bytes (default 512)")
    parser.add_argument("--window", type=int, default=RabbitSettings().confirm_window,
                        help="publishes awaiting their confirm / PubAck at once (default: the transports' 256)")
    parser.add_argument("--prefetch", type=int, default=ConsumerOptions().prefetch,
                        help="unacked deliveries / pull batch of the consumer (default: ConsumerOptions' 100)")
    parser.add_argument("--warmup", type=int, default=2000, help="events of an uncounted first run of each (0: none)")
    parser.add_argument("--with-transport", action="store_true",
                        help="also run roost's transport without the Bus, to split the overhead between the two")
    args = parser.parse_args(argv)
    if min(args.messages, args.runs, args.window, args.prefetch, args.size) < 1 or args.warmup < 0:
        parser.error("--messages, --runs, --window, --prefetch and --size must be positive")
    return args


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("console", "WARNING")      # as a service logs, minus the info line of every connect
    setup = Setup(args.messages, args.size, args.window, args.prefetch, args.warmup, args.runs)
    brokers = ["rabbitmq", "nats"] if args.broker == "both" else [args.broker]
    header(setup, brokers, args.with_transport)
    gc.freeze()                                   # the interpreter's own objects: not the runs' business
    reports = []

    def kinds(transport: Callable[[], Transport], raw: RunFn) -> list[tuple[str, RunFn]]:
        def through(kind: str) -> RunFn:
            return lambda s, count, index: roost_run(kind, s, count, index, transport)

        chosen = [("roost", through("roost")), ("raw", raw)]
        if args.with_transport:
            chosen.insert(1, ("transport", through("transport")))
        return chosen

    if "rabbitmq" in brokers:
        description = (f"{await rabbit_version()} at {RABBIT_URL.split('@')[-1]}; durable topic exchange -> quorum "
                       f"queue, persistent mandatory publishes with confirms (window {setup.window}), "
                       f"prefetch {setup.prefetch}, basic.ack per message")
        reports.append(await bench_broker("rabbitmq", description, setup,
                                          kinds(lambda: rabbit_transport(setup), rabbit_raw)))
    if "nats" in brokers:
        with tempfile.TemporaryDirectory(prefix="roost-bench-nats-") as store:
            server = NatsServer(Path(store) / "nats", ready_timeout=20.0)
            await server.start()
            try:
                nc = await nats.connect(server.url, connect_timeout=5, allow_reconnect=False)
                v = nc.connected_server_version
                await nc.close()
                description = (f"nats-server {v.major}.{v.minor}.{v.patch} started by the bench (-js, store in a "
                               f"temporary directory); file stream R1, publish window {setup.window} PubAcks, "
                               f"durable pull consumer, pull batch {setup.prefetch}, ack confirmed by the server "
                               "(ack_sync) per message")
                url = server.url

                async def raw(s: Setup, count: int, index: int) -> RunResult:
                    return await nats_raw(s, count, index, url)

                reports.append(await bench_broker("nats", description, setup, kinds(
                    lambda: NatsTransport(url, client_name="roost-bench", publish_window=setup.window), raw)))
            finally:
                await server.stop()
    print(f"\n== summary (load average now {load_average()})")
    for report in reports:
        summarise(report)
    return 0


def run() -> int:
    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:                    # one line, not a traceback: a broker down, a run stuck
        print(f"\nbench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run())
