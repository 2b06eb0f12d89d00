"""The heartbeat service's speed targets (issue 5): detection latency, false failures under loss, monitor CPU.

    .venv/bin/python bench/heartbeat_bench.py                       # all three, the default run (~15 min)
    .venv/bin/python bench/heartbeat_bench.py --only latency --trials 100
    .venv/bin/python bench/heartbeat_bench.py --only loss --duration 60
    .venv/bin/python bench/heartbeat_bench.py --only cpu --counts 100,250,500 --runs 2 --profile

Real UDP on loopback, one range of addresses per path (127.30.x.x mgmt, 127.31.x.x cluster-host, 127.32.x.x
oam), the monitor at 10 Hz (period 100 ms) with the defaults of ``PathPolicy`` and ``VerdictPolicy``.

1. **latency**: a real host agent (``python -m tests.support.heartbeat_peer``, a process of its own answering
   on 3 paths) is killed with SIGKILL; the time from the kill to the monitor's ``failed`` verdict (its
   ``on_health`` callback, on the monitor's clock, the same monotonic clock as the kill's), over
   ``--trials`` kills, one at a time (a few agents are kept started and healthy ahead, so a kill never waits
   for a start).  Target p99 <= 1.1 s.  The bus latency of the failed event is not in this figure (the
   bench drives the monitor directly, not the heartbeat service with its outbox and bus).
2. **loss**: ``--hosts`` real agents (one process) watched for ``--duration`` seconds while every path drops
   ``--loss`` (10 %) of the datagrams each way (the drop filter in the monitor's sockets, so a request and its
   answer are each lost with that probability); counts the hosts declared failed, all of them false
   (target 0), and, for information, degraded verdicts and paths gone down.
3. **cpu**: the monitor in a process of its own pinned to CPU 0, ``N`` simulated hosts answering on 3 paths
   in a load generator pinned to CPU 1 (lean: it does not verify the monitor's requests, and signs its
   answers with ``wire.encode``), for N in ``--counts``; hosts are added ``--ramp`` (10) at a time, each batch
   once the ones before are healthy (500 at once did not come up before 74b297a: see bench/README.md);
   once every host is healthy and after a warm-up, the
   monitor's CPU time is read from ``/proc/<pid>/stat`` over ``--window`` seconds.  Prints the CPU per host, a
   least-squares line through the points, its extrapolation to 1,000 hosts against the target (1,000 hosts
   within one core), and the largest count measured.  ``--profile`` samples the monitor with py-spy (not a
   dependency of roost: ``.venv/bin/pip install py-spy``) at the largest count and prints where the time goes.

The machine is shared: the load average is printed with every figure.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path as FsPath
from typing import Any

from bench.machine import load_average
from services.core.logging import configure_logging
from services.heartbeat.keys import MasterKey, derive
from services.heartbeat.model import Path
from services.heartbeat.monitor import HealthChange, HeartbeatMonitor
from services.heartbeat.paths import PathPolicy, PathState
from services.heartbeat.transport import PathSpec
from services.heartbeat.verdict import VerdictPolicy
from services.heartbeat.wire import Header, KeyReport, MsgType, Payload, Role, encode

REPO = FsPath(__file__).resolve().parents[1]
MONITOR_ID = 1
PERIOD = 0.1
LATENCY_TARGET = 1.1
CPU_TARGET_HOSTS = 1000
_REQUEST = struct.Struct(">28xIIB19xQ8xQ")       # sender, dest, path, seq, epoch out of a request's header


def monitor_address(path: Path) -> str:
    return f"127.{30 + path}.0.1"


def host_address(path: Path, i: int) -> str:
    return f"127.{30 + path}.{1 + i // 200}.{10 + i % 200}"


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class Keys:
    cluster_id: bytes = field(default_factory=lambda: os.urandom(16))
    master: MasterKey = field(default_factory=lambda: MasterKey(1, os.urandom(64)))

    def config(self) -> dict[str, Any]:
        return {"key": self.master.secret.hex(), "generation": self.master.generation,
                "cluster": self.cluster_id.hex()}

    @classmethod
    def of(cls, config: dict[str, Any]) -> Keys:
        return cls(bytes.fromhex(config["cluster"]), MasterKey(int(config["generation"]), bytes.fromhex(config["key"])))


# -- real agents: tests/support/heartbeat_peer.py ---------------------------------------------------------


@dataclass
class Agent:
    proc: asyncio.subprocess.Process
    hosts: dict[str, dict[Path, tuple[str, int]]]


async def start_agent(keys: Keys, state: FsPath, hosts: list[tuple[str, int, int]]) -> Agent:
    """A ``heartbeat_peer`` process answering for ``hosts`` (hostname, node id, address index)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "tests.support.heartbeat_peer", cwd=REPO,
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    config = {**keys.config(), "state": str(state), "monitors": [MONITOR_ID], "log_level": "WARNING",
              "hosts": [{"node_id": node, "hostname": name, "paths": [[p.value, host_address(p, i), 0] for p in Path]}
                        for name, node, i in hosts]}
    proc.stdin.write(json.dumps(config).encode() + b"\n")
    await proc.stdin.drain()
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    ready: dict[str, Any] = json.loads(line) if line else {"ready": False, "error": "exited"}
    if not ready.get("ready"):
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"the agent did not start: {ready.get('error')}")
    return Agent(proc, {h: {Path(int(p)): (a, port) for p, (a, port) in paths.items()}
                        for h, paths in ready["hosts"].items()})


async def stop_agent(agent: Agent) -> None:
    if agent.proc.returncode is None:
        agent.proc.kill()
    await agent.proc.wait()


@dataclass
class Watch:
    """A monitor in this process and what it reported."""

    monitor: HeartbeatMonitor
    changes: list[HealthChange] = field(default_factory=list)
    alarms: Counter[str] = field(default_factory=Counter)
    waiters: dict[tuple[str, str], asyncio.Future[HealthChange]] = field(default_factory=dict)

    def on_health(self, change: HealthChange) -> None:
        self.changes.append(change)
        waiter = self.waiters.pop((change.verdict.hostname, change.verdict.state), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(change)

    def expect(self, host: str, state: str) -> asyncio.Future[HealthChange]:
        future: asyncio.Future[HealthChange] = asyncio.get_running_loop().create_future()
        self.waiters[host, state] = future
        return future


def new_watch(keys: Keys, state: FsPath) -> Watch:
    monitor = HeartbeatMonitor(node_id=MONITOR_ID, cluster_id=keys.cluster_id, master_key=keys.master,
                               paths=[PathSpec(p, monitor_address(p), 0) for p in Path], state_dir=state,
                               hostname="controller-0", system="bench", period=PERIOD)
    watch = Watch(monitor)
    monitor.on_health = watch.on_health
    monitor.on_alarm = lambda a: watch.alarms.update([f"{a.alarm_id} {'raise' if a.raise_ else 'clear'}"])
    return watch


# -- 1. detection latency ---------------------------------------------------------------------------------------


async def bench_latency(trials: int, ahead: int, state: FsPath) -> None:
    print(f"\n1. detection latency: SIGKILL of a host agent -> the monitor's failed verdict, {trials} trials, "
          f"{ahead} agents kept ready", flush=True)
    keys = Keys()
    watch = new_watch(keys, state / "monitor")
    await watch.monitor.start()
    ready: asyncio.Queue[tuple[str, Agent]] = asyncio.Queue()
    counter = iter(range(10**6))
    agents: list[Agent] = []

    async def one_more() -> None:
        i = next(counter)
        name = f"agent-{i}"
        agent = await start_agent(keys, state / "agents", [(name, 100 + i, i % 1000)])
        agents.append(agent)
        healthy = watch.expect(name, "healthy")
        watch.monitor.add_host(name, 100 + i, agent.hosts[name])
        await asyncio.wait_for(healthy, 30)
        await ready.put((name, agent))

    rng = random.Random(1)
    latencies: list[float] = []
    silences: list[float] = []
    starting: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    try:
        for _ in range(ahead):
            starting.add(asyncio.create_task(one_more()))
        for n in range(trials):
            name, agent = await asyncio.wait_for(ready.get(), 120)
            for task in [t for t in starting if t.done()]:
                starting.discard(task)
                if (error := task.exception()) is not None:
                    raise error
            if n + ahead < trials:
                starting.add(asyncio.create_task(one_more()))
            failed = watch.expect(name, "failed")
            mark = len(watch.changes)
            await asyncio.sleep(rng.uniform(0, PERIOD))      # the kill at a random phase of the period
            killed_at = watch.monitor.now()
            os.kill(agent.proc.pid, signal.SIGKILL)
            change = await asyncio.wait_for(failed, 30)
            latencies.append(change.at - killed_at)
            silences.append(change.silent_for)
            others = [c for c in watch.changes[mark:] if c.verdict.hostname != name and c.verdict.state != "healthy"]
            if others:
                print(f"   !! other hosts changed meanwhile: {[(c.verdict.hostname, c.verdict.state) for c in others]}")
            watch.monitor.remove_host(name)
            await stop_agent(agent)
            if (n + 1) % 50 == 0:
                print(f"   {n + 1} trials, p50 {percentile(latencies, 50):.3f} s, max {max(latencies):.3f} s, "
                      f"load {load_average()}", flush=True)
    finally:
        for task in starting:
            task.cancel()
        await asyncio.gather(*starting, return_exceptions=True)
        await watch.monitor.stop()
        for agent in agents:
            await stop_agent(agent)
    p50, p90, p99 = (percentile(latencies, q) for q in (50, 90, 99))
    print(f"   kill -> failed: p50 {p50:.3f} s, p90 {p90:.3f} s, p99 {p99:.3f} s, min {min(latencies):.3f} s, "
          f"max {max(latencies):.3f} s  (target p99 <= {LATENCY_TARGET} s: "
          f"{'met' if p99 <= LATENCY_TARGET else 'NOT met'})")
    print(f"   last answer -> failed (the silence the monitor saw): p50 {percentile(silences, 50):.3f} s, "
          f"p99 {percentile(silences, 99):.3f} s; verdicts: {Counter(c.verdict.state for c in watch.changes)}; "
          f"monitor stalls {watch.monitor.stalls}; {time.monotonic() - started:.0f} s; load {load_average()}",
          flush=True)


# -- 2. false failures under loss -------------------------------------------------------------------------------


async def bench_loss(duration: float, hosts: int, loss: float, state: FsPath) -> None:
    print(f"\n2. false failures: {hosts} agents (real responders, one process), {loss:.0%} of datagrams lost each way "
          f"on every path, {duration:g} s", flush=True)
    keys = Keys()
    watch = new_watch(keys, state / "monitor")
    await watch.monitor.start()
    rng = random.Random(5)
    for endpoint in watch.monitor.endpoints.values():
        endpoint.filter.loss = loss
        endpoint.filter.rng = rng
    agent = await start_agent(keys, state / "loss-agents", [(f"host-{i}", 100 + i, i) for i in range(hosts)])
    downs: Counter[str] = Counter()
    try:
        healthy = [watch.expect(f"host-{i}", "healthy") for i in range(hosts)]
        for i in range(hosts):
            watch.monitor.add_host(f"host-{i}", 100 + i, agent.hosts[f"host-{i}"])
        await asyncio.wait_for(asyncio.gather(*healthy), 60)
        mark = len(watch.changes)
        sent0 = sum(e.sent for e in watch.monitor.endpoints.values())
        received0 = sum(e.received for e in watch.monitor.endpoints.values())
        started = time.monotonic()
        last_print = started
        while (elapsed := time.monotonic() - started) < duration:
            await asyncio.sleep(min(1.0, duration - elapsed))
            for host, paths in watch.monitor.status().items():
                for path, status in paths.items():
                    if status.state is PathState.DOWN:
                        downs[f"{host}/{path.network}"] += 1
            if time.monotonic() - last_print >= 60:
                last_print = time.monotonic()
                states = Counter(c.verdict.state for c in watch.changes[mark:])
                print(f"   {elapsed:4.0f} s: verdict changes {dict(states)}, load {load_average()}", flush=True)
        changes = watch.changes[mark:]
        sent = sum(e.sent for e in watch.monitor.endpoints.values()) - sent0
        received = sum(e.received for e in watch.monitor.endpoints.values()) - received0
    finally:
        await watch.monitor.stop()
        await stop_agent(agent)
    states = Counter(c.verdict.state for c in changes)
    failed = sorted({c.verdict.hostname for c in changes if c.verdict.state == "failed"})
    print(f"   false failures: {states['failed']} ({', '.join(failed) or 'none'})  (target 0: "
          f"{'met' if not failed else 'NOT met'})")
    print(f"   for information: degraded verdicts {states['degraded']}, paths seen DOWN in the 1 s samples "
          f"{sum(downs.values())}, alarms {dict(watch.alarms)}; requests sent {sent:,} (after the filter's loss), "
          f"answers credited {received:,} ({received / max(1, sent):.1%} of the requests that left: expected "
          f"about {1 - loss:.0%}); stalls {watch.monitor.stalls}; load {load_average()}", flush=True)


# -- 3. monitor CPU per host ------------------------------------------------------------------------------------


def pin(cpu: int) -> None:
    with contextlib.suppress(OSError, AttributeError, ValueError):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (every thread), from /proc/<pid>/stat."""
    fields = FsPath(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def waited_seconds(pid: int) -> float:
    """Time the process's threads spent runnable but waiting for a CPU (/proc/<pid>/schedstat; 0 if absent)."""
    total = 0
    with contextlib.suppress(OSError):
        for task in FsPath(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def run_loadgen(config: dict[str, Any]) -> None:
    """The load generator's process: ``hosts`` simulated hosts, one socket per host and path, answering every
    request at once (no verification of the request: the monitor is what is measured)."""
    pin(int(config["cpu"]))
    keys = Keys.of(config)
    path_keys = {p: derive(keys.master, keys.cluster_id, p) for p in Path}
    report = KeyReport(keys.master.key_id, frozenset({keys.master.key_id}))
    boot_id = os.urandom(8)
    selector = selectors.DefaultSelector()
    ports: dict[str, dict[str, list[Any]]] = {}
    seqs: dict[tuple[int, Path], int] = {}
    sockets: dict[int, socket.socket] = {}
    for i in range(int(config["hosts"])):
        node = 100 + i
        ports[f"host-{i}"] = {}
        for path in Path:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            sock.bind((host_address(path, i), 0))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, (node, path))
            sockets[sock.fileno()] = sock
            ports[f"host-{i}"][str(path.value)] = list(sock.getsockname())
            seqs[node, path] = 0
    sys.stdout.write(json.dumps({"ready": True, "hosts": ports}) + "\n")
    sys.stdout.flush()
    heard = {MONITOR_ID: frozenset(Path)}
    payload = Payload(report, heard)
    while True:
        for key, _ in selector.select():
            sock = sockets[key.fd]
            node, path = key.data
            while True:
                try:
                    data, addr = sock.recvfrom(2048)
                except BlockingIOError:
                    break
                if len(data) < 80:
                    continue
                sender, _dest, _path, seq, epoch = _REQUEST.unpack_from(data)
                seqs[node, path] = n = seqs[node, path] + 1
                header = Header(keys.cluster_id, node, path, 1, boot_id, n, MsgType.HEARTBEAT, sender, Role.HOST,
                                seq, epoch)
                with contextlib.suppress(OSError):
                    sock.sendto(encode(header, payload, path_keys[path]), addr)


async def run_monitor(config: dict[str, Any]) -> None:
    """The monitor's process: a ``HeartbeatMonitor`` over the given hosts; answers ``status`` lines on stdin."""
    pin(int(config["cpu"]))
    configure_logging("json", "WARNING", stream=sys.stderr)
    keys = Keys.of(config)
    monitor = HeartbeatMonitor(node_id=MONITOR_ID, cluster_id=keys.cluster_id, master_key=keys.master,
                               paths=[PathSpec(p, monitor_address(p), 0) for p in Path],
                               state_dir=config["state"], hostname="controller-0", system="bench",
                               period=PERIOD, path_policy=PathPolicy(period=PERIOD), verdict_policy=VerdictPolicy())
    waiting = list(config["hosts"].items())
    await monitor.start()
    for endpoint in monitor.endpoints.values():
        endpoint.filter.loss = float(config.get("loss", 0.0))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    while line := await reader.readline():
        command, _, arg = line.decode().strip().partition(" ")
        if command == "add":                   # the next ``arg`` hosts
            for name, paths in waiting[:int(arg)]:
                addresses = {Path(int(p)): (a, port) for p, (a, port) in paths.items()}
                monitor.add_host(name, 100 + int(name.split("-")[1]), addresses)
            del waiting[:int(arg)]
        elif command != "status":
            continue
        verdicts = [monitor.current(h) for h in monitor.hosts]
        states = Counter(v.state if v is not None else "none" for v in verdicts)
        ends = monitor.endpoints.values()
        status = {"states": dict(states), "rounds": monitor.rounds, "sent": sum(e.sent for e in ends),
                  "received": sum(e.received for e in ends), "send_errors": sum(e.send_errors for e in ends),
                  "ignored": dict(monitor.ignored),
                  "drops": sum(monitor.node.drops.counts.values()) if monitor.node else 0,
                  "stalls": monitor.stalls, "evaluations": monitor.evaluations}
        sys.stdout.write(json.dumps(status) + "\n")
        sys.stdout.flush()
    await monitor.stop()


def child(role: str, config: dict[str, Any], stderr: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, str(FsPath(__file__).resolve()), "--role", role], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(config).encode() + b"\n")
    proc.stdin.flush()
    return proc


def read_json(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the child exited ({proc.wait()})")
    result: dict[str, Any] = json.loads(line)
    return result


def ask(proc: subprocess.Popen[bytes], command: str = "status") -> dict[str, Any]:
    assert proc.stdin is not None
    proc.stdin.write(command.encode() + b"\n")
    proc.stdin.flush()
    return read_json(proc)


@dataclass
class CpuPoint:
    hosts: int
    monitor: float          # fraction of a core
    loadgen: float
    datagrams: float        # sent + received by the monitor per second
    all_healthy: bool
    note: str


def frame_name(frame: str) -> str:
    """``function (path/to/file.py:123)`` -> ``function (file.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else name


def profile(pid: int, seconds: float) -> None:
    spy = shutil.which("py-spy") or str(FsPath(sys.executable).with_name("py-spy"))
    if not FsPath(spy).exists():
        print("   (no py-spy: `.venv/bin/pip install py-spy` to see where the monitor's time goes)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = FsPath(tmp) / "stacks.txt"
        done = subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250",
                               "--format", "raw", "--output", str(out), "--nonblocking"],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            print(f"   py-spy failed: {done.stderr.strip()[-500:]}")
            return
        self_time: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        total = 0
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [frame_name(f) for f in stack.split(";")]
            self_time[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    print(f"   py-spy, {total} samples of the monitor's busy time over {seconds:g} s (idle not sampled):")
    print("     self time:")
    for frame, n in self_time.most_common(18):
        print(f"       {n / total:6.1%}  {frame}")
    print("     inclusive (functions of the per-datagram path):")
    for frame, n in inclusive.most_common(40):
        if any(k in frame for k in ("datagram_received", "_check", "verify_then_parse", "_on_answer", "_send_round",
                                    "send (transport", "encode", "mac (keys", "admit", "heard (paths", "_evaluate",
                                    "_schedule", "_next_deadline", "_fire", "_parse_payload", "sendto",
                                    "_keys_reported", "heard_paths", "_sent_at", "_hears_me", "_going_down")):
            print(f"       {n / total:6.1%}  {frame}")


def measure_cpu(count: int, window: float, warmup: float, ramp: int, loss: float, state: FsPath, keys: Keys,
                profile_it: bool) -> CpuPoint:
    loadgen = child("loadgen", {**keys.config(), "hosts": count, "cpu": 1})
    monitor: subprocess.Popen[bytes] | None = None
    try:
        ports = read_json(loadgen)["hosts"]
        monitor = child("monitor", {**keys.config(), "hosts": ports, "cpu": 0, "loss": loss,
                                    "state": str(state / f"cpu-{count}-{time.monotonic_ns()}")})
        pid = int(read_json(monitor)["pid"])
        added = 0
        status = ask(monitor)
        while added < count:                   # ramp: ``ramp`` more hosts once the ones before are healthy
            step = min(ramp, count - added)
            ask(monitor, f"add {step}")
            added += step
            deadline = time.monotonic() + 30
            while (status := ask(monitor))["states"].get("healthy", 0) < added and time.monotonic() < deadline:
                time.sleep(0.2)
            if status["states"].get("healthy", 0) < added:
                print(f"   !! {count} hosts: of the first {added}, {status['states']} after 30 s; adding no more, "
                      "measuring these", flush=True)
                break
        time.sleep(warmup)
        before, cpu0, gen0, t0 = ask(monitor), cpu_seconds(pid), cpu_seconds(loadgen.pid), time.monotonic()
        wait0 = waited_seconds(pid)
        if profile_it:
            profile(pid, window)
        else:
            time.sleep(window)
        after, cpu1, gen1, t1 = ask(monitor), cpu_seconds(pid), cpu_seconds(loadgen.pid), time.monotonic()
        wait1 = waited_seconds(pid)
    finally:
        for proc in (monitor, loadgen):
            if proc is not None:
                proc.kill()
                proc.wait()
    elapsed = t1 - t0
    datagrams = (after["sent"] - before["sent"] + after["received"] - before["received"]) / elapsed
    healthy = after["states"] == before["states"] == {"healthy": added}
    ignored = Counter(after["ignored"]) - Counter(before["ignored"])
    note = (f"rounds {(after['rounds'] - before['rounds']) / elapsed:.1f}/s, answers credited "
            f"{(after['received'] - before['received']) / elapsed / count / len(Path):.2f} per host-path per second"
            f"{', ignored ' + str(dict(ignored)) if ignored else ''}, stalls {after['stalls'] - before['stalls']}, "
            f"verdicts {after['states']}; the monitor waited for its CPU {(wait1 - wait0) / elapsed:.1%} of the time "
            "(others' load)")
    if not healthy:
        note += f" (at the start of the window {before['states']})"
    return CpuPoint(added, (cpu1 - cpu0) / elapsed, (gen1 - gen0) / elapsed, datagrams, healthy, note)


def bench_cpu(counts: Sequence[int], runs: int, window: float, warmup: float, ramp: int, loss: float,
              state: FsPath, profile_at: int | None) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    print(f"\n3. monitor CPU per monitored host, 10 Hz on 3 paths: the monitor pinned to CPU {cpus[0]}, the load "
          f"generator to CPU {cpus[1 % len(cpus)]}; counts {', '.join(map(str, counts))}, {runs} run(s), "
          f"{window:g} s windows after {warmup:g} s of warm-up; hosts added {ramp} at a time"
          f"{f'; {loss:.0%} of datagrams lost each way in the monitor sockets' if loss else ''}", flush=True)
    keys = Keys()
    points: list[CpuPoint] = []
    for run in range(runs):
        for count in counts:
            here = profile_at is not None and run == runs - 1 and count == profile_at
            point = measure_cpu(count, window, warmup, ramp, loss, state, keys, here)
            points.append(point)
            print(f"   run {run + 1}, {point.hosts:4d} hosts: monitor {point.monitor:6.1%} of a core, "
                  f"{point.monitor / count * 100:.3f} % per host, {point.monitor / point.datagrams * 1e6:5.1f} us per "
                  f"datagram ({point.datagrams:,.0f}/s sent + received); load generator {point.loadgen:5.1%}; "
                  f"{'all healthy' if point.all_healthy else 'NOT ALL HEALTHY'}; {point.note}; load {load_average()}",
                  flush=True)
    good = [p for p in points if p.all_healthy]
    if not good:
        print("   no point with every host healthy throughout: no figure")
        return
    if len(good) < len(points):
        print(f"   {len(points) - len(good)} point(s) not all healthy throughout: left out of the figures below")
    points = good
    xs = [float(p.hosts) for p in points]
    ys = [p.monitor for p in points]
    if len(set(xs)) >= 2:
        slope, intercept = statistics.linear_regression(xs, ys)
    else:
        slope, intercept = ys[0] / xs[0], 0.0
    at_target = intercept + slope * CPU_TARGET_HOSTS
    biggest = max(points, key=lambda p: p.hosts)
    per_host = [p.monitor / p.hosts for p in points]
    print(f"   per host: {statistics.median(per_host) * 100:.3f} % of a core (median of the points; "
          f"{min(per_host) * 100:.3f} to {max(per_host) * 100:.3f}); fit: {intercept:.1%} + {slope * 100:.3f} % "
          "per host")
    print(f"   extrapolated to {CPU_TARGET_HOSTS:,} hosts: {at_target:.2f} cores (target: within one core: "
          f"{'met' if at_target <= 1.0 else 'NOT met'}); one core would hold about {(1 - intercept) / slope:,.0f} "
          f"hosts; largest count measured {biggest.hosts} ({biggest.monitor:.1%} of a core)", flush=True)


# -- the header and the command line ------------------------------------------------------------------------------


def header(args: argparse.Namespace) -> None:
    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in FsPath("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    policy, verdict = PathPolicy(period=PERIOD), VerdictPolicy()
    print("roost heartbeat: detection latency, false failures under loss, monitor CPU per host")
    print(f"  machine : {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, "
          f"load average {load_average()}; shared with other people's work")
    print(f"  python  : {platform.python_implementation()} {platform.python_version()}, default asyncio loop; "
          f"cryptography {pkg('cryptography')}, structlog {pkg('structlog')}")
    print(f"  policy  : period {policy.period * 1000:.0f} ms, suspect after {policy.suspect_after}, down after "
          f"{policy.down_after} periods, recovery {policy.recovery_good} good; confirmations {verdict.confirmations}, "
          f"multi-node threshold max({verdict.mnfa_min_hosts}, {verdict.mnfa_fraction:.0%}); HMAC-SHA512, 3 paths "
          "on loopback")
    print(f"  run     : {' '.join(sys.argv[1:]) or '(defaults)'}", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["latency", "loss", "cpu"], action="append",
                        help="run only this figure (repeatable)")
    parser.add_argument("--trials", type=int, default=200, help="kills for the latency figure")
    parser.add_argument("--ahead", type=int, default=3, help="agents kept started and healthy for the next kills")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of the loss run")
    parser.add_argument("--hosts", type=int, default=20, help="agents in the loss run")
    parser.add_argument("--loss", type=float, default=0.1, help="the share of datagrams lost each way on every path")
    parser.add_argument("--counts", default="100,250,500", help="host counts of the CPU figure")
    parser.add_argument("--runs", type=int, default=2, help="runs of the CPU series")
    parser.add_argument("--window", type=float, default=20.0, help="seconds over which the monitor's CPU is read")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds after every host is healthy")
    parser.add_argument("--cpu-loss", type=float, default=0.0,
                        help="the CPU figure with this share of datagrams lost each way (a diagnostic: the cost of "
                             "path transitions)")
    parser.add_argument("--ramp", type=int, default=10,
                        help="hosts added to the monitor at a time, each batch once the ones before are healthy")
    parser.add_argument("--profile", action="store_true", help="py-spy the monitor at the largest count (last run)")
    parser.add_argument("--profile-at", type=int, help="... or at this count (one of --counts)")
    parser.add_argument("--role", choices=["monitor", "loadgen"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace, state: FsPath) -> None:
    only = set(args.only or ["latency", "loss", "cpu"])
    if "latency" in only:
        await bench_latency(args.trials, args.ahead, state / "latency")
    if "loss" in only:
        await bench_loss(args.duration, args.hosts, args.loss, state / "loss")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role is not None:
        config = json.loads(sys.stdin.readline())
        if args.role == "loadgen":
            run_loadgen(config)
        else:
            asyncio.run(run_monitor(config))
        return 0
    header(args)
    configure_logging("json", "WARNING", stream=sys.stderr)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="roost-hb-bench-") as tmp:
        asyncio.run(main_async(args, FsPath(tmp)))
        if "cpu" in set(args.only or ["latency", "loss", "cpu"]):
            counts = [int(c) for c in args.counts.split(",") if c]
            profile_at = (args.profile_at or max(counts)) if args.profile else None
            bench_cpu(counts, args.runs, args.window, args.warmup, args.ramp, args.cpu_loss, FsPath(tmp), profile_at)
    print(f"\ndone in {time.monotonic() - started:.0f} s; load average {load_average()}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        sys.exit(main())
