"""Heartbeats on real UDP over loopback: one monitor, several responders, three paths.

Linux routes all of 127/8 to ``lo``, so each path is its own range of loopback addresses: the monitor on
127.0.1.1 / 127.0.2.1 / 127.0.3.1 (mgmt / cluster-host / oam), host ``i`` on 127.0.1.(10+i) and so on,
every socket on a port the kernel picks (other test runs share the machine).  Paths are cut with the drop
filter in the socket layer (``SocketFilter``).  Every wait is bounded and waits for a callback, never for a
guessed time; detection times are measured against the monitor's clock and printed.

* all healthy; a stopped responder is failed about 1 s (``down_after``) after its last answer; restarted
  (a new, persisted boot counter), it is healthy again;
* a responder that stops answering on oam only: degraded naming oam, 950.003 raised; answering again:
  healthy only after the flap damping's good heartbeats, and a second flap needs twice as many;
* forged (another key, a tampered MAC, no MAC, the wrong path), truncated, oversize and replayed datagrams
  (captured from a live responder, also from its previous boot, also of a dead host) sent from a raw socket:
  dropped and counted by reason, a burst raises 950.006, no verdict changes;
* a responder in a separate process (the master key on its stdin), killed with SIGKILL: failed in time;
* the master key (and the keys derived from it) never reach the logs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path as FsPath

import pytest

from services.heartbeat.drops import BurstPolicy, DropReason
from services.heartbeat.keys import MasterKey, derive
from services.heartbeat.model import ALARM_AUTH_FAILURES, ALARM_NETWORK_LOST, AlarmIntent, Path
from services.heartbeat.monitor import HealthChange, HeartbeatMonitor
from services.heartbeat.responder import HeartbeatResponder
from services.heartbeat.transport import Addr, PathSpec
from services.heartbeat.wire import Header, Payload, Role, encode
from tests.support.logs import logs
from tests.support.waiting import wait_until

__all__ = ["logs"]      # the fixture

REPO = FsPath(__file__).resolve().parents[2]
MONITOR_ID = 1
DETECTION_BOUND = 2.0          # seconds from the last answer to "failed", on a loaded 2-core machine
log = logging.getLogger(__name__)


def monitor_address(path: Path) -> str:
    return f"127.0.{path + 1}.1"


def host_address(path: Path, i: int) -> str:
    return f"127.0.{path + 1}.{10 + i}"


@dataclass
class Site:
    """A monitor and its responders, and everything the monitor's callbacks reported (monitor clock)."""

    cluster_id: bytes
    master: MasterKey
    state: FsPath
    monitor: HeartbeatMonitor
    responders: dict[str, HeartbeatResponder] = field(default_factory=dict)
    changes: list[HealthChange] = field(default_factory=list)
    alarms: list[AlarmIntent] = field(default_factory=list)
    rounds: dict[int, int] = field(default_factory=dict)     # id(change) -> the monitor's round count then

    def record(self, change: HealthChange) -> None:
        self.rounds[id(change)] = self.monitor.rounds
        self.changes.append(change)

    def now(self) -> float:
        return self.monitor.now()

    def responder(self, i: int) -> HeartbeatResponder:
        return HeartbeatResponder(node_id=10 + i, cluster_id=self.cluster_id, master_key=self.master,
                                  paths=[PathSpec(p, host_address(p, i), 0) for p in Path],
                                  state_dir=self.state / f"host-{i}", hostname=f"worker-{i}")

    async def add(self, i: int) -> HeartbeatResponder:
        responder = self.responder(i)
        await responder.start()
        self.responders[f"worker-{i}"] = responder
        self.monitor.add_host(f"worker-{i}", 10 + i, {p: responder.address(p) for p in Path},
                              entity_id=f"00000000-0000-0000-0000-0000000000{i:02d}")
        return responder

    def state_of(self, host: str) -> str | None:
        verdict = self.monitor.current(host)
        return verdict.state if verdict else None

    def last_change(self, host: str) -> HealthChange | None:
        return next((c for c in reversed(self.changes) if c.verdict.hostname == host), None)

    async def wait_state(self, host: str, state: str, timeout: float = 5.0, after: int = 0) -> HealthChange:
        """The first change of ``host`` to ``state`` reported after the first ``after`` changes."""
        def found() -> HealthChange | None:
            return next((c for c in self.changes[after:] if c.verdict.hostname == host and c.verdict.state == state),
                        None)
        await wait_until(found, timeout=timeout, what=f"{host} {state}")
        change = found()
        assert change is not None
        return change

    def last_heard(self, host: str) -> float:
        return max(s.last_heard or 0.0 for s in self.monitor.status()[host].values())

    def drops(self, path: Path, reason: DropReason) -> int:
        return self.monitor.drop_counts().get((path, reason), 0)


@pytest.fixture
async def site(tmp_path: FsPath, logs: io.StringIO, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Site]:
    cluster_id = os.urandom(16)
    master = MasterKey(1, os.urandom(64))
    changes: list[HealthChange] = []
    alarms: list[AlarmIntent] = []
    s: Site
    monitor = HeartbeatMonitor(node_id=MONITOR_ID, cluster_id=cluster_id, master_key=master,
                               paths=[PathSpec(p, monitor_address(p), 0) for p in Path],
                               state_dir=tmp_path / "monitor", hostname="controller-0", system="site",
                               burst_policy=BurstPolicy(burst_count=10, burst_window=5.0, clear_after=60.0),
                               on_health=lambda c: s.record(c), on_alarm=alarms.append)
    s = Site(cluster_id, master, tmp_path, monitor, changes=changes, alarms=alarms)
    await monitor.start()
    try:
        yield s
    finally:
        for responder in s.responders.values():
            await responder.stop()
        await monitor.stop()
        assert_no_key_in(logs.getvalue() + caplog.text, master, cluster_id)


def assert_no_key_in(text: str, master: MasterKey, cluster_id: bytes) -> None:
    assert "heartbeat" in text                 # the logs were captured at all
    secrets = [master.secret, *(derive(master, cluster_id, p)._mac.copy().digest() for p in Path)]
    for secret in [master.secret]:
        for form in (secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(),
                     base64.urlsafe_b64encode(secret).decode(), repr(secret)[2:40]):
            assert form not in text
    for secret in secrets:
        assert secret.hex()[:32] not in text


async def healthy_site(site: Site, hosts: int) -> None:
    for i in range(hosts):
        await site.add(i)
    for i in range(hosts):
        await site.wait_state(f"worker-{i}", "healthy", timeout=5.0)


# -- detection -------------------------------------------------------------------------------------------


async def test_stopped_responder_is_failed_within_the_bound_and_recovers(site: Site) -> None:
    await healthy_site(site, 4)
    mark = len(site.changes)
    stopped_at = site.now()
    await site.responders["worker-0"].stop()
    failed = await site.wait_state("worker-0", "failed", timeout=5.0, after=mark)
    last = site.last_heard("worker-0")
    detection, since_stop = failed.at - last, failed.at - stopped_at
    print(f"\nworker-0 failed {detection:.3f} s after its last answer ({since_stop:.3f} s after the stop)")
    log.warning("detection time %.3f s", detection)
    assert 0.95 <= detection < DETECTION_BOUND
    assert abs(failed.silent_for - detection) < 1e-6         # what the service's latency histogram gets
    assert failed.verdict.networks_down == ("mgmt", "cluster-host", "oam")
    assert [c.verdict.state for c in site.changes[mark:]] == ["failed"]      # straight to failed: no degraded blip
    assert not any(a.alarm_id == ALARM_NETWORK_LOST for a in site.alarms)
    assert failed.event().state == "failed" and failed.event().version > 0
    # nobody else changed; 950.003 of the failed host are not raised (inventory raises 950.002)
    assert {c.verdict.hostname for c in site.changes[mark:]} == {"worker-0"}
    assert all(site.state_of(f"worker-{i}") == "healthy" for i in (1, 2, 3))

    # restarted on the same state directory: a new boot counter, accepted; healthy after the recovery run
    restarted = site.responder(0)
    await restarted.start()
    site.responders["worker-0"] = restarted
    assert restarted.boot_counter == 2
    site.monitor.add_host("worker-0", 10, {p: restarted.address(p) for p in Path})   # new ports
    healthy = await site.wait_state("worker-0", "healthy", timeout=5.0, after=mark)
    assert healthy.version > failed.version
    assert healthy.at - failed.at >= 0.9              # recovery_good heartbeats on every path


async def test_responder_in_a_separate_process_killed(site: Site, tmp_path: FsPath) -> None:
    """A real agent process (the master key on its stdin, never in argv or env), killed with SIGKILL."""
    await healthy_site(site, 1)
    script = (
        "import asyncio, json, sys\n"
        "from services.core.logging import configure_logging\n"
        "from services.heartbeat.keys import MasterKey\n"
        "from services.heartbeat.model import Path\n"
        "from services.heartbeat.responder import HeartbeatResponder\n"
        "from services.heartbeat.transport import PathSpec\n"
        "async def main() -> None:\n"
        "    cfg = json.loads(sys.stdin.readline())\n"
        "    key = MasterKey(cfg['generation'], bytes.fromhex(cfg['key']))\n"
        "    r = HeartbeatResponder(node_id=20, cluster_id=bytes.fromhex(cfg['cluster']), master_key=key,\n"
        "        paths=[PathSpec(Path(p), a, 0) for p, a in cfg['paths']], state_dir=cfg['state'])\n"
        "    await r.start()\n"
        "    print(json.dumps({p.value: r.address(p) for p in Path}), flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "configure_logging('json', 'INFO', stream=sys.stderr)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cwd=REPO, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        config = {"generation": site.master.generation, "key": site.master.secret.hex(),
                  "cluster": site.cluster_id.hex(), "state": str(tmp_path / "agent-proc"),
                  "paths": [[p.value, host_address(p, 9)] for p in Path]}
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        await proc.stdin.drain()
        proc.stdin.close()
        ports = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
        site.monitor.add_host("agent-proc", 20, {Path(int(p)): (a[0], a[1]) for p, a in ports.items()})
        mark = len(site.changes)
        await site.wait_state("agent-proc", "healthy", timeout=5.0, after=mark)
        killed_at = site.now()
        proc.send_signal(signal.SIGKILL)
        failed = await site.wait_state("agent-proc", "failed", timeout=5.0, after=mark)
        detection = failed.at - site.last_heard("agent-proc")
        print(f"\nagent process failed {detection:.3f} s after its last answer "
              f"({failed.at - killed_at:.3f} s after SIGKILL)")
        assert 0.95 <= detection < DETECTION_BOUND
        assert [c.verdict.state for c in site.changes[mark:]] == ["healthy", "failed"]     # no degraded blip
        assert site.state_of("worker-0") == "healthy"
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    assert site.master.secret.hex() not in err
    assert "heartbeat responder started" in err


async def test_one_path_cut_degrades_naming_it_and_recovers_after_flap_damping(site: Site) -> None:
    await healthy_site(site, 3)
    oam = site.responders["worker-1"].endpoints[Path.OAM]
    network_lost = AlarmIntent(ALARM_NETWORK_LOST, "host=worker-1.network=oam", "major")

    async def cut_then_heal(good: int) -> tuple[float, float]:
        mark = len(site.changes)
        oam.filter.drop_in = True                      # worker-1 no longer hears (so answers) on oam
        cut_at = site.now()
        degraded = await site.wait_state("worker-1", "degraded", timeout=5.0, after=mark)
        assert degraded.verdict.networks_down == ("oam",), degraded
        assert any(a.alarm_id == network_lost.alarm_id and a.entity_instance_id == network_lost.entity_instance_id
                   and a.raise_ for a in site.alarms), site.alarms
        oam.filter.drop_in = False
        healed_at, healed_round = site.now(), site.monitor.rounds
        healthy = await site.wait_state("worker-1", "healthy", timeout=10.0, after=mark)
        cleared = [a for a in site.alarms if a.entity_instance_id == network_lost.entity_instance_id]
        assert not cleared[-1].raise_, cleared
        # the damping's run of good heartbeats: one per round from the heal on (the round in flight then may
        # count; timing on a loaded machine can squeeze a late round, so count rounds, not seconds)
        assert site.rounds[id(healthy)] - healed_round >= good - 1, (site.rounds[id(healthy)], healed_round)
        return degraded.at - cut_at, healthy.at - healed_at
    down, up = await cut_then_heal(10)
    print(f"\noam cut: degraded after {down:.3f} s; healed: healthy after {up:.3f} s (10 good)")
    assert down < DETECTION_BOUND
    down, up = await cut_then_heal(20)                 # down again within the flap window: penalty 1
    print(f"second flap: degraded after {down:.3f} s; healthy after {up:.3f} s (20 good)")
    assert site.monitor.status()["worker-1"][Path.OAM].penalty == 1
    assert {c.verdict.hostname for c in site.changes[3:]} == {"worker-1"}


# -- attacks ---------------------------------------------------------------------------------------------------


async def test_forged_and_replayed_datagrams_are_dropped_and_counted(site: Site) -> None:
    captured: dict[str, list[tuple[bytes, Addr]]] = {"worker-0": [], "worker-2": []}
    await healthy_site(site, 3)
    for host in captured:
        site.responders[host].endpoints[Path.MGMT].filter.tap = \
            lambda data, addr, _h=host: captured[_h].append((data, addr))
    await wait_until(lambda: all(len(c) >= 5 for c in captured.values()), timeout=5.0, what="captures")
    mgmt_at = (monitor_address(Path.MGMT), site.monitor.address(Path.MGMT)[1])
    oam_at = (monitor_address(Path.OAM), site.monitor.address(Path.OAM)[1])
    mark = len(site.changes)
    before = {(p, r): n for (p, r), n in site.monitor.drop_counts().items()}

    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind((host_address(Path.MGMT, 0), 0))          # from worker-0's own address: attributed to it
    try:
        header = Header(site.cluster_id, 10, Path.MGMT, 99, b"evilboot", 10**9, dest=MONITOR_ID, role=Role.HOST)
        other = MasterKey(1, os.urandom(64))
        real_key = derive(site.master, site.cluster_id, Path.MGMT)
        sent: list[tuple[Addr, bytes, Path, DropReason]] = [
            (mgmt_at, encode(header, Payload(), derive(other, site.cluster_id, Path.MGMT)), Path.MGMT,
             DropReason.UNKNOWN_KEY),
            (mgmt_at, encode(header, Payload(), None), Path.MGMT, DropReason.UNKNOWN_KEY),        # no MAC
            (mgmt_at, b"RHBT", Path.MGMT, DropReason.TRUNCATED),
            (mgmt_at, b"x" * 1500, Path.MGMT, DropReason.OVERSIZE),
            (oam_at, encode(header, Payload(), real_key), Path.OAM, DropReason.BAD_MAC),       # the wrong path's key
        ]
        tampered = bytearray(captured["worker-0"][-1][0])
        tampered[56] ^= 0x01                              # a higher seq, MAC unchanged
        sent.append((mgmt_at, bytes(tampered), Path.MGMT, DropReason.BAD_MAC))
        sent += [(mgmt_at, data, Path.MGMT, DropReason.REPLAYED) for data, _ in captured["worker-0"][:5]]
        sent += [(oam_at, data, Path.OAM, DropReason.BAD_MAC) for data, _ in captured["worker-0"][:2]]
        for addr, data, _, _ in sent:
            raw.sendto(data, addr)
        expected: dict[tuple[Path, DropReason], int] = {}
        for _, _, path, reason in sent:
            expected[path, reason] = expected.get((path, reason), 0) + 1

        def counted() -> bool:
            now = site.monitor.drop_counts()
            return all(now.get(k, 0) - before.get(k, 0) == n for k, n in expected.items())
        await wait_until(counted, timeout=5.0, what=f"drops counted {expected}")
        # a burst of forgery-kind drops on worker-0's mgmt: 950.006 names it (the replays count too)
        burst = [a for a in site.alarms if a.alarm_id == ALARM_AUTH_FAILURES]
        assert [a.entity_instance_id for a in burst] == ["host=worker-0.network=mgmt"]
        assert burst[0].raise_

        # worker-2 restarts: a new boot; its datagrams of the previous boot are then STALE_BOOT
        await site.responders["worker-2"].stop()
        restarted = site.responder(2)
        await restarted.start()
        site.responders["worker-2"] = restarted
        site.monitor.add_host("worker-2", 12, {p: restarted.address(p) for p in Path})
        guard = site.monitor.node.replay if site.monitor.node else None
        assert guard is not None
        await wait_until(lambda: guard.boot_of(12, Path.MGMT) == 2, timeout=5.0, what="worker-2's new boot")
        stale_before = site.drops(Path.MGMT, DropReason.STALE_BOOT)
        for data, _ in captured["worker-2"][-3:]:
            raw.sendto(data, mgmt_at)
        await wait_until(lambda: site.drops(Path.MGMT, DropReason.STALE_BOOT) - stale_before == 3, timeout=5.0,
                         what="stale boots")

        # a dead host's recorded answers do not bring it back
        await site.responders["worker-0"].stop()
        failed = await site.wait_state("worker-0", "failed", timeout=5.0, after=mark)
        replayed_before = site.drops(Path.MGMT, DropReason.REPLAYED)
        recorded = [data for data, _ in captured["worker-0"]]
        assert len(recorded) >= 5
        for data in recorded:
            raw.sendto(data, mgmt_at)
        await wait_until(lambda: site.drops(Path.MGMT, DropReason.REPLAYED) - replayed_before == len(recorded),
                         timeout=5.0, what="replays of the dead host")
        assert site.state_of("worker-0") == "failed"
        assert site.last_change("worker-0") is failed
    finally:
        raw.close()
    # nothing but worker-0's failure (and worker-2's restart, if its verdict moved at all) changed a verdict
    assert {c.verdict.hostname for c in site.changes[mark:]} <= {"worker-0", "worker-2"}
    assert [c.verdict.state for c in site.changes[mark:] if c.verdict.hostname == "worker-0"] == ["failed"]
    assert site.state_of("worker-1") == "healthy"
    assert site.monitor.ignored["stale_echo"] == 0       # every replay stopped at the replay guard
