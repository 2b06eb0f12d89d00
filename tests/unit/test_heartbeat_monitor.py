"""The heartbeat's I/O edge in the small: the boot counter on disk, a path endpoint that never raises, the
monitor's echo freshness, hosts added and removed at run time, a stalled event loop that fails nobody,
callbacks that raise, key rotation over live sockets without a lost heartbeat, and the responder as a host
agent component.  Sockets on loopback, ports picked by the kernel; every wait bounded."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path as FsPath

import pytest

from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from services.heartbeat.drops import DropReason
from services.heartbeat.keys import Keyring, KeyState, MasterKey
from services.heartbeat.model import ALARM_MULTI_NODE, ALARM_NETWORK_LOST, AlarmIntent, Path
from services.heartbeat.monitor import HealthChange, HeartbeatMonitor, _Round
from services.heartbeat.replay import BootCounter
from services.heartbeat.responder import HeartbeatResponder
from services.heartbeat.transport import (
    BootCounterError,
    NodeContext,
    PathEndpoint,
    PathSpec,
    load_boot_counter,
)
from services.heartbeat.wire import Datagram, Header, Payload, Role, encode
from services.inventory.agent.agent import HostAgent
from tests.support.waiting import wait_until

CLUSTER = bytes(range(16))


def addr(path: Path, i: int) -> str:
    return f"127.0.{path + 1}.{100 + i}"


# -- the boot counter -------------------------------------------------------------------------------------


async def test_boot_counter_grows_and_is_persisted_private_before_use(tmp_path: FsPath) -> None:
    first = await load_boot_counter(tmp_path)
    assert (first.value, first.may_send) == (1, True)
    second = await load_boot_counter(tmp_path)
    assert second.value == 2
    file = tmp_path / "heartbeat-boot-counter"
    assert file.read_text() == "2\n"
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    file.write_text("garbage")
    with pytest.raises(BootCounterError, match="not a number"):
        await load_boot_counter(tmp_path)
    assert file.read_text() == "garbage"                 # left for the operator, never silently reset


# -- the endpoint ------------------------------------------------------------------------------------------


async def test_endpoint_never_raises_and_checks_in_order(tmp_path: FsPath) -> None:
    master = MasterKey(1, os.urandom(64))
    boot = BootCounter(None)
    boot.persisted(1)
    node = NodeContext(7, CLUSTER, Keyring(CLUSTER, master), boot, hostname="me")
    seen: list[Datagram] = []
    refused: set[int] = {66}

    def handler(d: Datagram, source: tuple[str, int], now: float) -> None:
        seen.append(d)
        if d.header.seq == 3:
            raise RuntimeError("a handler bug")

    endpoint = PathEndpoint(node, PathSpec(Path.MGMT, "127.0.0.1", 0), handler,
                            accept=lambda d, s: DropReason.UNKNOWN_SENDER if d.header.sender in refused else None)
    key = Keyring(CLUSTER, master).send_key(Path.MGMT)

    def datagram(sender: int, seq: int, signed: bool = True) -> bytes:
        return encode(Header(CLUSTER, sender, Path.MGMT, 1, b"bootid00", seq), Payload(), key if signed else None)

    source = ("127.0.0.9", 4000)
    for data in (b"", b"\xff" * 5000, b"RHBT" + bytes(200), datagram(9, 1), datagram(9, 1), datagram(9, 3),
                 datagram(66, 1), datagram(9, 2, signed=False), datagram(7, 4)):
        endpoint.datagram_received(data, source)
    assert [d.header.seq for d in seen] == [1, 3]
    assert endpoint.handler_errors == 1 and endpoint.received == 2
    assert dict(node.drops.counts) == {
        (Path.MGMT, DropReason.TRUNCATED): 1, (Path.MGMT, DropReason.OVERSIZE): 1,
        (Path.MGMT, DropReason.BAD_VERSION): 1,
        (Path.MGMT, DropReason.REPLAYED): 1, (Path.MGMT, DropReason.UNKNOWN_SENDER): 1,
        (Path.MGMT, DropReason.UNKNOWN_KEY): 1, (Path.MGMT, DropReason.REFLECTED): 1}
    # the refused sender left no replay state behind; a path without required auth takes unsigned ones
    assert node.replay.boot_of(66, Path.MGMT) is None
    open_path = PathEndpoint(node, PathSpec(Path.OAM, "127.0.0.1", 0, require_auth=False), handler)
    unsigned = encode(Header(CLUSTER, 9, Path.OAM, 1, b"bootid00", 1), Payload(), None)
    open_path.datagram_received(unsigned, source)
    assert seen[-1].key_id == 0 and seen[-1].header.path is Path.OAM
    # sending before open: nothing, no error
    assert endpoint.send(source, Payload(), dest=9, role=Role.HOST) is None


# -- a small site --------------------------------------------------------------------------------------------


@dataclass
class Site:
    master: MasterKey
    state: FsPath
    monitor: HeartbeatMonitor
    responders: dict[str, HeartbeatResponder] = field(default_factory=dict)
    changes: list[HealthChange] = field(default_factory=list)
    alarms: list[AlarmIntent] = field(default_factory=list)

    async def add(self, i: int, key: MasterKey | Keyring | None = None) -> HeartbeatResponder:
        r = HeartbeatResponder(node_id=100 + i, cluster_id=CLUSTER, master_key=key or self.master,
                               paths=[PathSpec(p, addr(p, i), 0) for p in Path], state_dir=self.state / f"h{i}")
        await r.start()
        self.responders[f"h{i}"] = r
        self.monitor.add_host(f"h{i}", 100 + i, {p: r.address(p) for p in Path})
        return r

    async def monitor_settled(self) -> None:
        """Two more evaluations (what is due now has been judged)."""
        done = self.monitor.evaluations
        await wait_until(lambda: self.monitor.evaluations >= done + 2, 5.0, "two evaluations")

    async def healthy(self, *hosts: str) -> None:
        await wait_until(lambda: all((v := self.monitor.current(h)) is not None and v.state == "healthy"
                                     for h in hosts), timeout=5.0, what=f"{hosts} healthy")


async def make_site(tmp_path: FsPath, keyring: Keyring | None = None, **kwargs: object) -> Site:
    master = keyring.primary if keyring is not None else MasterKey(1, os.urandom(64))
    changes: list[HealthChange] = []
    alarms: list[AlarmIntent] = []
    monitor = HeartbeatMonitor(node_id=1, cluster_id=CLUSTER, master_key=keyring or master,
                               paths=[PathSpec(p, addr(p, 0), 0) for p in Path], state_dir=tmp_path / "mon",
                               **{"on_health": changes.append, "on_alarm": alarms.append, **kwargs})  # type: ignore[arg-type]
    await monitor.start()
    return Site(master, tmp_path, monitor, changes=changes, alarms=alarms)


@pytest.fixture
async def site(tmp_path: FsPath) -> AsyncIterator[Site]:
    s = await make_site(tmp_path)
    try:
        yield s
    finally:
        await close(s)


async def close(s: Site) -> None:
    for r in s.responders.values():
        await r.stop()
    await s.monitor.stop()


def test_echo_freshness() -> None:
    monitor = HeartbeatMonitor(node_id=1, cluster_id=CLUSTER, master_key=MasterKey(1, os.urandom(64)),
                               paths=[PathSpec(Path.MGMT, "127.0.0.1", 0)], state_dir="/nonexistent")
    monitor._rounds[Path.MGMT].extend([_Round(1.0, 1, 5), _Round(1.1, 6, 10), _Round(1.2, 12, 14)])
    assert [monitor._sent_at(Path.MGMT, s) for s in (0, 1, 5, 6, 10, 11, 14, 15)] == [
        None, 1.0, 1.0, 1.1, 1.1, None, 1.2, None]


async def test_hosts_come_and_go_at_run_time(site: Site) -> None:
    await site.add(1)
    await site.add(2)
    await site.healthy("h1", "h2")
    site.responders["h2"].endpoints[Path.OAM].filter.drop_out = True      # its oam answers are lost
    await wait_until(lambda: any(a.alarm_id == ALARM_NETWORK_LOST and a.raise_ for a in site.alarms), 5.0,
                     "950.003 raised")
    assert site.monitor.current("h2") is not None and site.monitor.current("h2").networks_down == ("oam",)  # type: ignore[union-attr]
    site.monitor.remove_host("h2")
    await wait_until(lambda: any(a.entity_instance_id == "host=h2.network=oam" and not a.raise_
                                 for a in site.alarms), 5.0, "950.003 cleared on removal")
    assert site.monitor.current("h2") is None and "h2" not in site.monitor.status()
    # nothing is sent to h2 any more
    rounds = site.monitor.rounds
    await wait_until(lambda: site.monitor.rounds >= rounds + 2, 5.0, "2 rounds")
    answered = site.responders["h2"].answered
    await wait_until(lambda: site.monitor.rounds >= rounds + 5, 5.0, "3 more rounds")
    assert site.responders["h2"].answered == answered
    await site.add(3)
    await site.healthy("h1", "h3")
    with pytest.raises(ValueError, match="h1's"):
        site.monitor.add_host("other", 101, {Path.MGMT: "127.0.1.200"})
    with pytest.raises(ValueError, match="own node"):
        site.monitor.add_host("self", 1, {Path.MGMT: "127.0.1.200"})


async def test_hosts_lost_together_on_a_network_are_multi_node_failure_not_alarms(site: Site) -> None:
    for i in (1, 2, 3, 4):
        await site.add(i)
    await site.healthy("h1", "h2", "h3", "h4")
    mark = len(site.changes)
    for host in ("h1", "h2", "h3"):                      # the oam switch of three hosts dies
        site.responders[host].endpoints[Path.OAM].filter.drop_in = True
    await wait_until(lambda: any(a.alarm_id == ALARM_MULTI_NODE and a.raise_ for a in site.alarms), 5.0, "950.009")
    mnfa = next(a for a in site.alarms if a.alarm_id == ALARM_MULTI_NODE)
    assert mnfa.entity_instance_id == "system=roost.network=oam" and mnfa.severity == "critical"
    # entered before any path went down (mnfa_minor = 0.5 s of silence), so no 950.003 for oam at all
    await wait_until(lambda: all((v := site.monitor.current(h)) is not None and v.state == "degraded"
                                 for h in ("h1", "h2", "h3")), 5.0, "degraded")
    assert not any(a.alarm_id == ALARM_NETWORK_LOST for a in site.alarms)
    # and while it lasts, hosts that go silent on every path are not failed
    for host in ("h1", "h2"):
        await site.responders[host].stop()
    await wait_until(lambda: all(x.state.value == "down" for h in ("h1", "h2")
                                 for x in site.monitor.status()[h].values()), 5.0, "every path down")
    await site.monitor_settled()
    assert not any(c.verdict.state == "failed" for c in site.changes[mark:])
    assert site.monitor.current("h4").state == "healthy"  # type: ignore[union-attr]


async def test_a_stalled_event_loop_fails_nobody(site: Site) -> None:
    for i in (1, 2, 3):
        await site.add(i)
    await site.healthy("h1", "h2", "h3")
    mark = len(site.changes)
    time.sleep(1.6)                    # the loop (monitor and responders alike) stalls past down_after
    rounds = site.monitor.rounds
    await wait_until(lambda: site.monitor.rounds >= rounds + 15, 5.0, "15 more rounds")
    assert site.monitor.stalls >= 1
    assert site.changes[mark:] == []
    assert all(site.monitor.current(h).state == "healthy" for h in ("h1", "h2", "h3"))  # type: ignore[union-attr]


async def test_callbacks_that_raise_do_not_stop_the_monitor(tmp_path: FsPath) -> None:
    def boom(_: object) -> None:
        raise RuntimeError("the service's publisher failed")

    s = await make_site(tmp_path, on_health=boom, on_alarm=boom)
    try:
        await s.add(1)
        await s.healthy("h1")
        await s.responders["h1"].stop()
        await wait_until(lambda: (v := s.monitor.current("h1")) is not None and v.state == "failed", 5.0, "failed")
    finally:
        await close(s)


async def test_key_rotation_over_udp_loses_no_heartbeat(tmp_path: FsPath) -> None:
    old, new = MasterKey(1, os.urandom(64)), MasterKey(2, os.urandom(64))
    monitor_ring = Keyring(CLUSTER, old, retire_grace=0.5)
    s = await make_site(tmp_path, keyring=monitor_ring)
    try:
        rings = {i: Keyring(CLUSTER, old, retire_grace=0.5) for i in (1, 2)}
        for i, ring in rings.items():
            await s.add(i, ring)
        await s.healthy("h1", "h2")
        mark = len(s.changes)
        for ring in (monitor_ring, *rings.values()):
            ring.install(new)
        await wait_until(lambda: all(r.primary.key_id == new.key_id for r in (monitor_ring, *rings.values())),
                         5.0, "the new key primary everywhere")
        await wait_until(lambda: all(next(k for k in r.status().keys if k.key_id == old.key_id).state
                                     is KeyState.RETIRED for r in (monitor_ring, *rings.values())),
                         5.0, "the old key retired everywhere")
        rounds = s.monitor.rounds
        await wait_until(lambda: s.monitor.rounds >= rounds + 5, 5.0, "5 rounds on the new key")
        assert s.changes[mark:] == []                   # nobody even suspect: no datagram was refused
        assert not any(reason in (DropReason.UNKNOWN_KEY, DropReason.BAD_MAC, DropReason.RETIRED_KEY)
                       for _, reason in s.monitor.drop_counts())
        assert all(s.monitor.current(h).state == "healthy" for h in ("h1", "h2"))  # type: ignore[union-attr]
    finally:
        await close(s)


async def test_responder_runs_as_a_host_agent_component(tmp_path: FsPath, site: Site) -> None:
    responder = HeartbeatResponder(node_id=150, cluster_id=CLUSTER, master_key=site.master,
                                   paths=[PathSpec(p, addr(p, 50), 0) for p in Path], state_dir=tmp_path / "agent")
    agent = HostAgent("worker-50", "nats://unused:4222", root=tmp_path, interval=3600,
                      transport=InMemoryTransport(InMemoryBroker()), components=[responder])
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: len(responder.endpoints) == 3, 5.0, "the responder started by the agent")
        assert responder.node is not None and responder.node.hostname == "worker-50"
        assert (tmp_path / "agent" / "heartbeat-boot-counter").read_text() == "1\n"
        site.monitor.add_host("worker-50", 150, {p: responder.address(p) for p in Path})
        await site.healthy("worker-50")
    finally:
        agent.stop()
        await asyncio.wait_for(task, 5)
    assert responder.endpoints == {} and responder.node is None
