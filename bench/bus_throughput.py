"""End-to-end throughput of roost's bus next to the raw client libraries, in the same run.

    .venv/bin/python bench/bus_throughput.py [--messages 100000] [--runs 3] [--broker both]

For each broker, ``--runs`` times and alternating (roost, raw, roost, raw, ...): subscribe a consumer,
publish ``--messages`` events of ``--size`` bytes with confirmations (at most ``--window`` awaiting one
at once), and stop the clock when the consumer has acknowledged the last one.  Publisher and consumer
run in this one process on two connections, at the same time, as a relay and a service would.

* roost: ``Bus.publish_raw`` of pre-encoded envelopes (what the outbox relay does), ``Bus.subscribe``
  with a handler that does nothing.  The consumer decodes and validates every envelope, binds its
  correlation id for the logs, acks and reports to the bus observer: that is the overhead measured.
* raw: aio-pika / nats-py doing what the transport does on the wire (same exchange or stream type,
  queue arguments, persistence, confirm window, prefetch or fetch batch, settle call), with the same
  bodies and headers; the consumer only settles each message.

Each run uses a fresh queue / stream of its own and deletes it afterwards.  See bench/README.md.
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

from schemas.envelope import Envelope
from schemas.registry import Registry
from services.core.bus import codec
from services.core.bus.abc import ConsumerOptions, OutgoingMessage
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


# -- the payload -----------------------------------------------------------------------------------


class BenchSample(BaseModel):
    """The benchmark's event data: a sequence number and padding up to the wanted body size."""

    model_config = ConfigDict(extra="forbid")

    seq: int = Field(ge=0)
    blob: str = Field(max_length=1_048_576)


def bench_registry() -> Registry:
    """A registry of its own (the shared one is not touched) with the one benchmark event."""
    registry = Registry()
    registry.event(EVENT_TYPE, "core", BenchSample, "benchmark payload (bench/bus_throughput.py)")
    return registry


def build_messages(count: int, size: int, subject: str) -> list[OutgoingMessage]:
    """``count`` encoded envelopes on ``subject`` whose bodies are exactly ``size`` bytes each."""
    messages = []
    for seq in range(count):
        envelope = Envelope(type=EVENT_TYPE, source=SOURCE, subject=f"bench/{seq}",
                            data={"seq": seq, "blob": ""})
        bare = len(codec.encode(envelope, subject=subject).body)
        if bare > size:
            raise SystemExit(f"--size {size} is too small: an envelope with no padding takes {bare} bytes")
        envelope = envelope.model_copy(update={"data": {"seq": seq, "blob": "x" * (size - bare)}})
        message = codec.encode(envelope, subject=subject)
        assert len(message.body) == size, (len(message.body), size)
        messages.append(message)
    return messages


def encode_cost(count: int, size: int) -> float:
    """Microseconds per ``codec.encode`` of a ready envelope (what ``Bus.publish_many`` adds; not timed)."""
    envelopes = [Envelope(type=EVENT_TYPE, source=SOURCE, data={"seq": i, "blob": "x" * (size - 240)})
                 for i in range(count)]
    started = time.perf_counter()
    for envelope in envelopes:
        codec.encode(envelope)
    return (time.perf_counter() - started) / count * 1e6


def decode_cost(messages: Sequence[OutgoingMessage], registry: Registry) -> float:
    """Microseconds per ``codec.decode`` + ``registry.validate`` (the consumer's parse), in isolation."""
    started = time.perf_counter()
    for message in messages:
        registry.validate(codec.decode(message.body))
    return (time.perf_counter() - started) / len(messages) * 1e6


# -- one run ---------------------------------------------------------------------------------------


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


@dataclass
class RunResult:
    kind: str                   # "roost" or "raw"
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


async def timed_run(kind: str, messages: int, publish: Callable[[], Awaitable[None]], countdown: Countdown,
                    timeout: float) -> RunResult:
    """Start the publisher, wait for the consumer's last ack (the consumer is already subscribed)."""
    gc.collect()
    cpu0 = time.process_time()
    started = time.perf_counter()
    publish_done = 0.0

    async def publisher() -> None:
        nonlocal publish_done
        await publish()
        publish_done = time.perf_counter()

    task = asyncio.create_task(publisher())
    try:
        async with asyncio.timeout(timeout):
            await countdown.done.wait()
            await task
    except TimeoutError:
        task.cancel()
        raise RuntimeError(f"{kind}: only {countdown.count} of {messages} acknowledged within {timeout:g}s "
                           "(bench stopped)") from None
    cpu = time.process_time() - cpu0
    return RunResult(kind, messages, countdown.finished_at - started, publish_done - started, cpu)


def run_timeout(messages: int) -> float:
    return max(60.0, messages / 250)         # generous: 100k take ~20 s; a stuck broker ends the bench


class Stop:
    """Async clean-ups to run in reverse order, each bounded, none allowed to hide the run's error."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = []

    def add(self, what: str, step: Callable[[], Awaitable[Any]]) -> None:
        self._steps.append((what, step))

    async def __aenter__(self) -> Stop:
        return self

    async def __aexit__(self, *_: object) -> None:
        for what, step in reversed(self._steps):
            try:
                await asyncio.wait_for(step(), 30)
            except Exception as exc:          # report it and go on cleaning up
                print(f"  (clean-up: {what} failed: {type(exc).__name__}: {exc})", file=sys.stderr)


# -- RabbitMQ --------------------------------------------------------------------------------------


@dataclass
class Setup:
    messages: int
    size: int
    window: int
    prefetch: int
    warmup: int
    runs: int
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])


def run_names(setup: Setup, broker: str, kind: str, index: int) -> tuple[str, str]:
    """``(subject, group)`` for one run: a domain of its own, so nothing of another run is seen."""
    domain = f"bench{setup.tag}{kind[:2]}{index}"
    return f"roost.{domain}.sample", f"bench-{setup.tag}-{kind}-{index}"


async def rabbit_roost(setup: Setup, count: int, index: int) -> RunResult:
    subject, group = run_names(setup, "rabbitmq", "roost", index)
    messages = build_messages(count, setup.size, subject)
    settings = RabbitSettings(confirm_window=setup.window)
    countdown = Countdown(count)

    class Observer:
        def published(self, type: str, outcome: str, seconds: float) -> None:
            pass

        def consumed(self, type: str, group: str, outcome: str, seconds: float) -> None:
            if outcome == "ack":
                countdown.hit()

    async def nothing(message: Message) -> None:
        pass

    registry = bench_registry()
    async with Stop() as stop:
        producer = Bus(RabbitTransport(RABBIT_URL, settings), source=SOURCE, registry=registry)
        consumer = Bus(RabbitTransport(RABBIT_URL, settings), source=SOURCE, registry=registry,
                       observer=Observer())
        await producer.connect()
        stop.add("close the roost publisher", producer.close)
        await consumer.connect()
        stop.add("close the roost consumer", consumer.close)
        stop.add(f"delete queue of {group}", lambda: consumer.transport.delete_group(subject, group))
        await consumer.subscribe(subject, group, nothing, options=ConsumerOptions(prefetch=setup.prefetch))

        async def publish() -> None:
            await producer.publish_raw(messages)

        return await timed_run("roost", count, publish, countdown, run_timeout(count))


async def rabbit_raw(setup: Setup, count: int, index: int) -> RunResult:
    """What RabbitTransport does, in aio-pika directly: see the module docstring of rabbitmq.py."""
    subject, group = run_names(setup, "rabbitmq", "raw", index)
    bodies = [m.body for m in build_messages(count, setup.size, subject)]
    ids = [str(uuid.uuid4()) for _ in range(count)]
    publisher_id = uuid.uuid4().hex
    exchange_name = f"roost.bench.raw.{setup.tag}"
    queue_name = f"{group}.raw"
    countdown = Countdown(count)

    async with Stop() as stop:
        pub_conn = await aio_pika.connect_robust(RABBIT_URL)
        stop.add("close the raw publisher", pub_conn.close)
        sub_conn = await aio_pika.connect_robust(RABBIT_URL)
        stop.add("close the raw consumer", sub_conn.close)

        pub = await pub_conn.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await pub.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
        stop.add(f"delete exchange {exchange_name}", exchange.delete)

        sub = await sub_conn.channel(publisher_confirms=False)
        await sub.set_qos(prefetch_count=setup.prefetch)
        queue = await sub.declare_queue(queue_name, durable=True,
                                        arguments=group_queue_arguments(group, ConsumerOptions().max_attempts))
        stop.add(f"delete queue {queue_name}", lambda: queue.delete(if_unused=False, if_empty=False))
        await queue.bind(exchange, subject)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            countdown.hit()

        tag = await queue.consume(on_message, no_ack=False)
        stop.add("cancel the raw consumer", lambda: queue.cancel(tag))

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

        return await timed_run("raw", count, publish, countdown, run_timeout(count))


async def rabbit_version() -> str:
    connection = await aio_pika.connect(RABBIT_URL)
    try:
        props = connection.transport.connection.server_properties   # type: ignore[union-attr]
        product, ver = props.get("product", b"RabbitMQ"), props.get("version", b"?")
        return f"{_text(product)} {_text(ver)}"
    finally:
        await connection.close()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


# -- NATS JetStream --------------------------------------------------------------------------------


def counting_observer(countdown: Countdown) -> Any:
    """A bus observer that counts acknowledged deliveries (the bus reports after the ack)."""

    class Observer:
        def published(self, type: str, outcome: str, seconds: float) -> None:
            pass

        def consumed(self, type: str, group: str, outcome: str, seconds: float) -> None:
            if outcome == "ack":
                countdown.hit()

    return Observer()


async def nats_roost(setup: Setup, count: int, index: int, url: str) -> RunResult:
    subject, group = run_names(setup, "nats", "roost", index)
    messages = build_messages(count, setup.size, subject)
    countdown = Countdown(count)

    async def nothing(message: Message) -> None:
        pass

    registry = bench_registry()
    async with Stop() as stop:
        producer = Bus(NatsTransport(url, client_name="roost-bench-pub", publish_window=setup.window),
                       source=SOURCE, registry=registry)
        consumer = Bus(NatsTransport(url, client_name="roost-bench-sub", publish_window=setup.window),
                       source=SOURCE, registry=registry, observer=counting_observer(countdown))
        await producer.connect()
        stop.add("close the roost publisher", producer.close)
        await consumer.connect()
        stop.add("close the roost consumer", consumer.close)
        transport = consumer.transport
        assert isinstance(transport, NatsTransport)
        stream = stream_name(domain_of(subject))
        stop.add(f"delete stream {stream}", lambda: transport.client().jetstream().delete_stream(stream))
        stop.add(f"delete consumer of {group}", lambda: transport.delete_group(subject, group))
        await consumer.subscribe(subject, group, nothing, options=ConsumerOptions(prefetch=setup.prefetch))

        async def publish() -> None:
            await producer.publish_raw(messages)

        return await timed_run("roost", count, publish, countdown, run_timeout(count))


async def nats_raw(setup: Setup, count: int, index: int, url: str) -> RunResult:
    """What NatsTransport does, in nats-py directly: see the docstrings of nats.py and nats_consumer.py."""
    subject, group = run_names(setup, "nats", "raw", index)
    bodies = [m.body for m in build_messages(count, setup.size, subject)]
    ids = [str(uuid.uuid4()) for _ in range(count)]
    domain = domain_of(subject)
    stream = stream_name(domain)
    consumer_name = durable_name(group, subject)
    policy = StreamPolicy()
    options = ConsumerOptions(prefetch=setup.prefetch)
    settle_timeout = 5.0                       # NatsTransport's default settle_timeout
    countdown = Countdown(count)

    async with Stop() as stop:
        pub_nc = await nats.connect(url, name="raw-bench-pub")
        stop.add("close the raw publisher", pub_nc.close)
        sub_nc = await nats.connect(url, name="raw-bench-sub")
        stop.add("close the raw consumer", sub_nc.close)
        js_pub = pub_nc.jetstream(timeout=5.0, publish_async_max_pending=setup.window)
        js = sub_nc.jetstream(timeout=5.0)
        await js.add_stream(js_api.StreamConfig(
            name=stream, subjects=[f"roost.{domain}.>"], retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE, discard=js_api.DiscardPolicy.OLD, max_age=policy.max_age,
            max_bytes=policy.max_bytes, duplicate_window=policy.duplicate_window,
            num_replicas=policy.replicas))
        stop.add(f"delete stream {stream}", lambda: js.delete_stream(stream))
        await js.add_consumer(stream, js_api.ConsumerConfig(
            name=consumer_name, durable_name=consumer_name, filter_subject=subject,
            deliver_policy=js_api.DeliverPolicy.NEW, ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=options.ack_wait, max_deliver=-1, max_ack_pending=max(1000, 10 * options.prefetch),
            replay_policy=js_api.ReplayPolicy.INSTANT))
        pull = await js.pull_subscribe_bind(durable=consumer_name, stream=stream)
        stop.add("unsubscribe the raw consumer", pull.unsubscribe)

        async def consume() -> None:
            while not countdown.done.is_set():
                try:
                    batch = await pull.fetch(setup.prefetch, timeout=1.0)
                except TimeoutError:
                    continue
                for msg in batch:
                    await msg.ack_sync(timeout=settle_timeout)
                    countdown.hit()

        consuming = asyncio.create_task(consume())
        stop.add("stop the raw consumer", lambda: _cancel(consuming))

        async def publish() -> None:
            futures = []
            for i in range(count):
                futures.append(await js_pub.publish_async(
                    subject, bodies[i],
                    headers={"x-roost-id": ids[i], "x-roost-type": EVENT_TYPE, "Nats-Msg-Id": ids[i]}))
            for future in futures:
                await future                   # every PubAck, raising the first error

        return await timed_run("raw", count, publish, countdown, run_timeout(count))


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def bench_nats(setup: Setup, store: Path) -> BrokerReport:
    server = NatsServer(store / "nats", ready_timeout=20.0)
    await server.start()
    try:
        nc = await nats.connect(server.url)
        v = nc.connected_server_version
        server_version = f"{v.major}.{v.minor}.{v.patch}"
        await nc.close()
        description = (f"nats-server {server_version} (-js, store in a temp dir, started by this bench); "
                       f"file stream R1 limits retention, publish window {setup.window} PubAcks, durable "
                       f"pull consumer, fetch/pull batch {setup.prefetch}, explicit ack confirmed by the "
                       "server (ack_sync) per message")

        async def roost(s: Setup, count: int, index: int) -> RunResult:
            return await nats_roost(s, count, index, server.url)

        async def raw(s: Setup, count: int, index: int) -> RunResult:
            return await nats_raw(s, count, index, server.url)

        return await bench_broker("nats", description, setup, roost, raw)
    finally:
        await server.stop()


# -- driving ---------------------------------------------------------------------------------------


@dataclass
class BrokerReport:
    broker: str
    description: str
    roost: list[RunResult] = field(default_factory=list)
    raw: list[RunResult] = field(default_factory=list)


def median_of(results: Sequence[RunResult], attribute: str) -> float:
    return statistics.median(getattr(r, attribute) for r in results)


async def bench_broker(broker: str, description: str, setup: Setup,
                       roost_run: Callable[[Setup, int, int], Awaitable[RunResult]],
                       raw_run: Callable[[Setup, int, int], Awaitable[RunResult]]) -> BrokerReport:
    report = BrokerReport(broker, description)
    print(f"\n== {broker}: {description}", flush=True)
    if setup.warmup:
        await roost_run(setup, setup.warmup, 0)
        await raw_run(setup, setup.warmup, 0)
        print(f"   warm-up: {setup.warmup} messages each, not counted", flush=True)
    for index in range(1, setup.runs + 1):
        for kind, run in (("roost", roost_run), ("raw", raw_run)):
            result = await run(setup, setup.messages, index)
            getattr(report, kind).append(result)
            print(f"   run {index} {kind:5}  {result.rate:9,.0f} msg/s   end-to-end {result.seconds:6.2f} s   "
                  f"publish {result.publish_seconds:6.2f} s   client CPU {result.cpu_us:5.1f} us/msg", flush=True)
    return report


def summarise(report: BrokerReport) -> None:
    roost = median_of(report.roost, "rate")
    raw = median_of(report.raw, "rate")
    ratio = roost / raw
    overhead = (1 / roost - 1 / raw) * 1e6
    target = TARGETS[report.broker]
    verdict = "met" if ratio >= target else "NOT met"
    cpu_roost, cpu_raw = median_of(report.roost, "cpu_us"), median_of(report.raw, "cpu_us")
    print(f"\n{report.broker}: {report.description}")
    print(f"  roost  {roost:9,.0f} msg/s   (median of {len(report.roost)}; client CPU {cpu_roost:5.1f} us/msg)")
    print(f"  raw    {raw:9,.0f} msg/s   (median of {len(report.raw)}; client CPU {cpu_raw:5.1f} us/msg)")
    print(f"  ratio roost/raw = {ratio:.3f}   target >= {target:.1f}: {verdict}")
    print(f"  roost overhead  = {overhead:+.1f} us/message wall-clock ((1/roost - 1/raw) * 1e6); "
          f"{cpu_roost - cpu_raw:+.1f} us/message of client CPU")


def header(setup: Setup, brokers: Sequence[str]) -> None:
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
    print("roost bus throughput: publish with confirmations -> consume -> ack, end to end")
    print(f"  machine : {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), {platform.system()} "
          f"{platform.release()}; broker(s), publisher and consumer share them")
    print(f"  python  : {platform.python_implementation()} {platform.python_version()}, asyncio default loop; "
          f"aio-pika {pkg('aio-pika')}, aiormq {pkg('aiormq')}, nats-py {pkg('nats-py')}, "
          f"pydantic {pkg('pydantic')}")
    print(f"  load    : {setup.messages:,} messages of {setup.size} B per run, {setup.runs} runs each, "
          f"alternating roost/raw, median reported; confirm window {setup.window}, prefetch/fetch "
          f"{setup.prefetch}; publisher and consumer on separate connections in one process")
    print(f"  brokers : {', '.join(brokers)}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = ConsumerOptions()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000, help="events per run (default 100000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each, alternating (default 3)")
    parser.add_argument("--broker", choices=("rabbitmq", "nats", "both"), default="both")
    parser.add_argument("--size", type=int, default=512, help="encoded envelope size in bytes (default 512)")
    parser.add_argument("--window", type=int, default=RabbitSettings().confirm_window,
                        help="publishes awaiting confirmation at once (default: the transports' default)")
    parser.add_argument("--prefetch", type=int, default=defaults.prefetch,
                        help="unacked deliveries / fetch batch per consumer (default: ConsumerOptions)")
    parser.add_argument("--warmup", type=int, default=2000, help="messages of an uncounted first run (0: none)")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.runs < 1 or args.window < 1 or args.prefetch < 1:
        parser.error("--messages, --runs, --window and --prefetch must be positive")
    return args


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("console", "WARNING")      # as a service runs, minus the info lines of every connect
    setup = Setup(args.messages, args.size, args.window, args.prefetch, args.warmup, args.runs)
    brokers = ["rabbitmq", "nats"] if args.broker == "both" else [args.broker]
    registry = bench_registry()
    sample = build_messages(2000, setup.size, "roost.bench.sample")
    header(setup, brokers)
    print(f"  parse   : codec.decode + registry.validate {decode_cost(sample, registry):.1f} us/msg, "
          f"codec.encode {encode_cost(2000, setup.size):.1f} us/msg (alone, for reference; encode is not "
          "timed: publish_raw takes encoded envelopes, as the relay does)")
    gc.freeze()
    reports = []
    if "rabbitmq" in brokers:
        description = (f"{await rabbit_version()} at {RABBIT_URL.split('@')[-1]}; topic exchange -> quorum "
                       f"queue, persistent mandatory publishes, confirm window {setup.window}, "
                       f"prefetch {setup.prefetch}, basic.ack per message")
        reports.append(await bench_broker("rabbitmq", description, setup, rabbit_roost, rabbit_raw))
    if "nats" in brokers:
        with tempfile.TemporaryDirectory(prefix="roost-bench-nats-") as store:
            reports.append(await bench_nats(setup, Path(store)))
    print("\n== summary")
    for report in reports:
        summarise(report)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
