"""Heartbeats between network namespaces joined by veth pairs, one per path; a path is cut by taking its link down.

The host is a network namespace of its own (``ip netns add``) with one veth pair per path (mgmt /
cluster-host / oam) to the root namespace, each pair a /30 of its own in a 10.x.y.0/24 that no interface
of the machine uses (an ``unreachable`` route for that /24 keeps a downed link's traffic off the default
route).  The monitor runs in this test's process in the root namespace, bound to the root
ends; the host agent's responder runs in the namespace, a real process (``ip netns exec <ns> python -m
tests.support.heartbeat_peer``, the master key on its stdin).  Nothing in the heartbeat code knows about
namespaces: a cut is the kernel's doing (``ip link set <veth> down``), not a drop filter.

* one path cut at the monitor's end: that path goes DOWN, the host is degraded naming that network (950.003
  raised), never failed; the link up again: healthy (after the flap damping's good heartbeats);
* every path cut at the host's end (its NICs dead; the agent process keeps running): failed within the
  bound, straight from healthy; the links up again: healthy.

Needs root (CAP_NET_ADMIN) and iproute2.  Where the kernel or the container refuses, the tests skip saying
what was refused, except in CI (``CI=true``), where a missing capability fails them.  Namespaces and links
have names unique to the run and are removed after each test, whatever happened.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path as FsPath

import pytest

from services.heartbeat.keys import MasterKey
from services.heartbeat.model import ALARM_NETWORK_LOST, AlarmIntent, Path
from services.heartbeat.monitor import HealthChange, HeartbeatMonitor
from services.heartbeat.paths import PathState
from services.heartbeat.transport import DEFAULT_PORT, PathSpec
from tests.support.logs import logs
from tests.support.waiting import wait_until

__all__ = ["logs"]      # the fixture

REPO = FsPath(__file__).resolve().parents[2]
MONITOR_ID = 1
HOST_ID = 30
HOST = "worker-ns"
DETECTION_BOUND = 2.0          # seconds from the last answer to "failed", on a loaded 2-core machine
IP_TIMEOUT = 20.0


def missing(reason: str) -> None:
    """Skip, saying what the machine refused; in CI a missing capability is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"network namespaces are required in CI: {reason}")
    pytest.skip(reason)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def free_prefix() -> str:
    """A 10.x.y. prefix no address or route of the root namespace is in."""
    used = ip("-4", "addr", "show").stdout + ip("-4", "route", "show", "table", "all").stdout
    for _ in range(100):
        prefix = f"10.{secrets.randbelow(150) + 100}.{secrets.randbelow(256)}."
        if not re.search(rf"\b{re.escape(prefix)}", used):
            return prefix
    raise RuntimeError("no free 10.x.y.0/24 found")


@dataclass
class Veths:
    """A namespace for the host and a veth pair per path: ``outer[path]`` in the root namespace (the monitor's
    end), ``inner[path]`` in the host's namespace."""

    ns: str
    prefix: str = ""
    outer: dict[Path, str] = field(default_factory=dict)
    inner: dict[Path, str] = field(default_factory=dict)
    monitor_ip: dict[Path, str] = field(default_factory=dict)
    host_ip: dict[Path, str] = field(default_factory=dict)

    def set_outer(self, path: Path, state: str) -> None:
        ip("link", "set", self.outer[path], state)

    def set_inner(self, path: Path, state: str) -> None:
        ip("-n", self.ns, "link", "set", self.inner[path], state)

    def remove(self) -> list[str]:
        """Delete the links and the namespace; what could not be deleted (nothing, normally)."""
        problems = []
        if self.prefix and ip("route", "show", "type", "unreachable", f"{self.prefix}0/24", check=False).stdout.strip():
            done = ip("route", "del", "unreachable", f"{self.prefix}0/24", check=False)
            if done.returncode != 0:
                problems.append(f"route {self.prefix}0/24: {done.stderr.strip()}")
        for link in self.outer.values():
            if ip("link", "show", link, check=False).returncode == 0:
                done = ip("link", "del", link, check=False)
                if done.returncode != 0:
                    problems.append(f"link {link}: {done.stderr.strip()}")
        if self.ns in ip("netns", "list", check=False).stdout.split():
            done = ip("netns", "del", self.ns, check=False)
            if done.returncode != 0:
                problems.append(f"netns {self.ns}: {done.stderr.strip()}")
        return problems


@pytest.fixture
def veths() -> Iterator[Veths]:
    if sys.platform != "linux" or shutil.which("ip") is None:
        missing("iproute2's `ip` command is not installed")
    if os.geteuid() != 0:
        missing("network namespaces need root (CAP_NET_ADMIN)")
    token = secrets.token_hex(3)
    net = Veths(ns=f"roost-hb-{token}")
    try:
        made = ip("netns", "add", net.ns, check=False)
        if made.returncode != 0:
            missing(f"`ip netns add` was refused: {made.stderr.strip()}")
        prefix = free_prefix()
        # while a link is down its /30 is unreachable, not sent out of the default route
        ip("route", "add", "unreachable", f"{prefix}0/24", "metric", "1000")
        net.prefix = prefix
        ip("-n", net.ns, "link", "set", "lo", "up")
        for path in Path:
            outer, inner = f"rh{token}{path.value}o", f"rh{token}{path.value}i"
            made = ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", net.ns, check=False)
            if made.returncode != 0:
                missing(f"`ip link add ... type veth` was refused: {made.stderr.strip()}")
            net.outer[path], net.inner[path] = outer, inner
            net.monitor_ip[path], net.host_ip[path] = f"{prefix}{4 * path + 1}", f"{prefix}{4 * path + 2}"
            ip("addr", "add", f"{net.monitor_ip[path]}/30", "dev", outer)
            ip("-n", net.ns, "addr", "add", f"{net.host_ip[path]}/30", "dev", inner)
            net.set_outer(path, "up")
            net.set_inner(path, "up")
        yield net
    finally:
        problems = net.remove()
        assert not problems, problems


@dataclass
class Site:
    monitor: HeartbeatMonitor
    changes: list[HealthChange] = field(default_factory=list)
    alarms: list[AlarmIntent] = field(default_factory=list)
    agent: asyncio.subprocess.Process | None = None

    def now(self) -> float:
        return self.monitor.now()

    async def wait_state(self, state: str, *, after: int, timeout: float) -> HealthChange:
        def found() -> HealthChange | None:
            return next((c for c in self.changes[after:] if c.verdict.state == state), None)
        await wait_until(found, timeout=timeout, what=f"{HOST} {state}")
        change = found()
        assert change is not None
        return change

    def path_state(self, path: Path) -> PathState:
        return self.monitor.status()[HOST][path].state

    def last_heard(self) -> float:
        return max(s.last_heard or 0.0 for s in self.monitor.status()[HOST].values())


@pytest.fixture
async def site(veths: Veths, tmp_path: FsPath, logs: io.StringIO) -> AsyncIterator[Site]:
    """The monitor in the root namespace, the host agent in the host's namespace, healthy."""
    cluster_id, master = os.urandom(16), MasterKey(1, os.urandom(64))
    s: Site
    monitor = HeartbeatMonitor(node_id=MONITOR_ID, cluster_id=cluster_id, master_key=master,
                               paths=[PathSpec(p, veths.monitor_ip[p], 0) for p in Path],
                               state_dir=tmp_path / "monitor", hostname="controller-0", system="site",
                               on_health=lambda c: s.changes.append(c), on_alarm=lambda a: s.alarms.append(a))
    s = Site(monitor)
    await monitor.start()
    agent = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", veths.ns, sys.executable, "-m", "tests.support.heartbeat_peer", cwd=REPO,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    s.agent = agent
    stderr = b""
    try:
        assert agent.stdin is not None and agent.stdout is not None and agent.stderr is not None
        config = {"key": master.secret.hex(), "generation": master.generation, "cluster": cluster_id.hex(),
                  "state": str(tmp_path / "agent"), "monitors": [MONITOR_ID],
                  "hosts": [{"node_id": HOST_ID, "hostname": HOST,
                             "paths": [[p.value, veths.host_ip[p], DEFAULT_PORT] for p in Path]}]}
        agent.stdin.write(json.dumps(config).encode() + b"\n")
        await agent.stdin.drain()
        line = await asyncio.wait_for(agent.stdout.readline(), 30)
        if not line:
            stderr = await agent.stderr.read()
            raise AssertionError(f"the agent in {veths.ns} exited: {stderr.decode()[-2000:]}")
        ready = json.loads(line)
        assert ready["ready"], ready
        bound = {Path(int(p)): (a, port) for p, (a, port) in ready["hosts"][HOST].items()}
        assert bound == {p: (veths.host_ip[p], DEFAULT_PORT) for p in Path}
        monitor.add_host(HOST, HOST_ID, bound, entity_id="00000000-0000-0000-0000-000000000030")
        await s.wait_state("healthy", after=0, timeout=10.0)
        # healthy comes with the first path up (the others may still be establishing): wait for all three
        await wait_until(lambda: all(s.path_state(p) is PathState.UP for p in Path), timeout=5.0, what="paths up")
        yield s
    finally:
        await monitor.stop()
        if agent.returncode is None:
            if agent.stdin is not None:
                agent.stdin.close()             # the agent stops on end of file
            try:
                await asyncio.wait_for(agent.wait(), 10)
            except TimeoutError:
                agent.kill()
                await agent.wait()
        if agent.stderr is not None:
            stderr += await agent.stderr.read()
    text = stderr.decode() + logs.getvalue()
    assert "heartbeat responder started" in text
    assert master.secret.hex() not in text


async def test_one_link_down_degrades_the_host_naming_that_network(site: Site, veths: Veths) -> None:
    cut = Path.CLUSTER_HOST
    errors = sum(site.monitor.endpoints[cut].errors.values())
    mark = len(site.changes)
    veths.set_outer(cut, "down")                       # the monitor's end of the cluster-host link
    cut_at = site.now()
    degraded = await site.wait_state("degraded", after=mark, timeout=5.0)
    print(f"\ncluster-host link down: degraded after {degraded.at - cut_at:.3f} s")
    assert degraded.verdict.networks_down == ("cluster-host",), degraded
    assert site.path_state(cut) is PathState.DOWN
    assert all(site.path_state(p).working for p in Path if p is not cut)       # up (or suspect, on a loaded machine)
    assert any(a.alarm_id == ALARM_NETWORK_LOST and a.entity_instance_id == f"host={HOST}.network=cluster-host"
               and a.raise_ for a in site.alarms), site.alarms
    # the kernel refused the monitor's requests on that path: no route while the link is down
    print(f"socket errors on cluster-host: {dict(site.monitor.endpoints[cut].errors)}")
    assert sum(site.monitor.endpoints[cut].errors.values()) > errors
    # a path's loss is no failure, however long it lasts: still degraded two more down intervals later
    held_from = site.now()
    await wait_until(lambda: site.now() - held_from >= 2 * site.monitor.policy.down_time, timeout=10.0,
                     what="two down intervals")
    assert [c.verdict.state for c in site.changes[mark:]] == ["degraded"]
    assert site.agent is not None and site.agent.returncode is None

    veths.set_outer(cut, "up")
    healthy = await site.wait_state("healthy", after=mark, timeout=10.0)
    print(f"link up: healthy after {healthy.at - degraded.at:.3f} s of degraded")
    assert all(site.path_state(p).working for p in Path)
    assert [c.verdict.state for c in site.changes[mark:]] == ["degraded", "healthy"]
    cleared = [a for a in site.alarms if a.entity_instance_id == f"host={HOST}.network=cluster-host"]
    assert not cleared[-1].raise_, cleared


async def test_every_link_down_fails_the_host_within_the_bound_and_it_recovers(site: Site, veths: Veths) -> None:
    mark = len(site.changes)
    cut_at = site.now()
    for path in Path:
        veths.set_inner(path, "down")                  # the host's NICs, inside its namespace
    failed = await site.wait_state("failed", after=mark, timeout=5.0)
    detection = failed.at - site.last_heard()
    print(f"\nevery link down: failed {detection:.3f} s after the last answer ({failed.at - cut_at:.3f} s after "
          "the first link went down)")
    assert 0.95 <= detection < DETECTION_BOUND
    assert failed.verdict.networks_down == ("mgmt", "cluster-host", "oam")
    assert [c.verdict.state for c in site.changes[mark:]] == ["failed"]       # no degraded blip
    assert all(site.path_state(p) is PathState.DOWN for p in Path)
    assert site.agent is not None and site.agent.returncode is None         # the agent itself kept running

    for path in Path:
        veths.set_inner(path, "up")
    up_at = site.now()
    healthy = await site.wait_state("healthy", after=mark, timeout=10.0)
    # While the host's links were down, the kernel queued the monitor's requests waiting for ARP; when they
    # come back it delivers them at once, and the answers to the last second's requests arrive together.
    # Only answers to requests of the last 3 periods count as good heartbeats, so the flap damping's 10 good
    # ones still take most of a second (before that rule: about 0.11 s, the burst alone brought the paths UP).
    print(f"links up: healthy {healthy.at - up_at:.3f} s later")
    assert healthy.at - up_at >= 0.6
    states = [c.verdict.state for c in site.changes[mark:]]
    # the paths come back a few ms apart: the first one back may show the host degraded for that long
    assert states[0] == "failed" and states[-1] == "healthy" and states.count("failed") == 1, states
    assert healthy.version > failed.version
    assert all(site.path_state(p).working for p in Path)
