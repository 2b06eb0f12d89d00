"""An attacker in a separate OS process sends bad heartbeat datagrams to a running monitor, and to an agent.

Real UDP on loopback, one range of addresses per path (127.0.1.x mgmt, 127.0.2.x cluster-host, 127.0.3.x
oam): a monitor and two host agents' responders run in this test's process; the attacker is
``python -m tests.support.heartbeat_attacker``, a process of its own that binds the address of the peer
it impersonates (so the receiver attributes the drops to that peer, as it would a spoofed source) and
sends forged (another key, no MAC, a tampered or random MAC), truncated, replayed (real datagrams captured
from the traffic, re-sent), moved (captured on another path), wrong-cluster and wrong-path datagrams (the
last two signed with the real key: only a key holder gets past the MAC, a misconfigured or compromised
node).  For each target:

* every datagram is dropped and counted under its ``DropReason``, exactly: the counts by (path, reason)
  grow by what the attacker sent and by nothing else;
* the burst raises 950.006 for the impersonated peer on that network;
* the legitimate hosts stay healthy throughout (no verdict changes, every path up), and keep being
  answered;
* no key material reaches the logs (structlog's JSON output, at DEBUG).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.heartbeat.drops import BurstPolicy, DropReason
from services.heartbeat.keys import MasterKey, derive
from services.heartbeat.model import ALARM_AUTH_FAILURES, AlarmIntent, Path
from services.heartbeat.monitor import HealthChange, HeartbeatMonitor
from services.heartbeat.responder import HeartbeatResponder
from services.heartbeat.transport import Addr, PathSpec
from services.heartbeat.wire import Role
from tests.support.logs import logs
from tests.support.waiting import wait_until

__all__ = ["logs"]      # the fixture

REPO = FsPath(__file__).resolve().parents[2]
MONITOR_ID = 1
VICTIM = "worker-0"                 # the peer the attacker impersonates (its address, its node id)
BYSTANDER = "worker-1"

# what each kind of the attacker's datagrams must be dropped as
EXPECTED = {
    "other_key": DropReason.UNKNOWN_KEY,
    "unsigned": DropReason.UNKNOWN_KEY,
    "tampered": DropReason.BAD_MAC,
    "random_mac": DropReason.BAD_MAC,
    "truncated": DropReason.TRUNCATED,
    "replayed": DropReason.REPLAYED,
    "moved": DropReason.BAD_MAC,
    "wrong_cluster": DropReason.WRONG_CLUSTER,
    "wrong_path": DropReason.WRONG_PATH,
}
ATTACKS: list[dict[str, Any]] = [
    {"kind": "other_key", "path": Path.MGMT, "count": 3},
    {"kind": "unsigned", "path": Path.MGMT, "count": 2},
    {"kind": "tampered", "path": Path.MGMT, "count": 3},
    {"kind": "random_mac", "path": Path.MGMT, "count": 2},
    {"kind": "truncated", "path": Path.MGMT, "count": 6},
    {"kind": "replayed", "path": Path.MGMT, "count": 5},
    {"kind": "wrong_cluster", "path": Path.MGMT, "count": 2},
    {"kind": "wrong_path", "path": Path.MGMT, "count": 2},
    {"kind": "moved", "path": Path.OAM, "count": 4},          # mgmt's datagrams sent to the oam socket
    {"kind": "wrong_path", "path": Path.CLUSTER_HOST, "count": 1},
    {"kind": "replayed", "path": Path.CLUSTER_HOST, "count": 2},
]


def monitor_address(path: Path) -> str:
    return f"127.0.{path + 1}.1"


def host_address(path: Path, i: int) -> str:
    return f"127.0.{path + 1}.{40 + i}"


@dataclass
class Site:
    cluster_id: bytes
    master: MasterKey
    monitor: HeartbeatMonitor
    responders: dict[str, HeartbeatResponder] = field(default_factory=dict)
    changes: list[HealthChange] = field(default_factory=list)
    monitor_alarms: list[AlarmIntent] = field(default_factory=list)
    agent_alarms: list[AlarmIntent] = field(default_factory=list)


def key_forms(master: MasterKey, cluster_id: bytes) -> list[str]:
    """The master key and the per-path keys derived from it, in the forms a log could show them."""
    secrets = [master.secret]
    for path in Path:
        # keys.derive's HKDF, spelled out (PathKey keeps only the HMAC state); checked against it below
        info = b"roost/heartbeat/v1/" + cluster_id + b"/" + path.network.encode() + b"/" + \
            master.generation.to_bytes(4, "big")
        secret = HKDF(algorithm=hashes.SHA512(), length=64, salt=cluster_id, info=info).derive(master.secret)
        assert hmac.new(secret, b"probe", hashlib.sha512).digest() == derive(master, cluster_id, path).mac(b"probe")
        secrets.append(secret)
    forms = []
    for secret in secrets:
        forms += [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(),
                  base64.urlsafe_b64encode(secret).decode(), repr(secret)[2:40], secret.hex()[:32]]
    return forms


@pytest.fixture
async def site(tmp_path: FsPath, logs: io.StringIO, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Site]:
    cluster_id, master = os.urandom(16), MasterKey(1, os.urandom(64))
    burst = BurstPolicy(burst_count=10, burst_window=5.0, clear_after=60.0)
    monitor = HeartbeatMonitor(node_id=MONITOR_ID, cluster_id=cluster_id, master_key=master,
                               paths=[PathSpec(p, monitor_address(p), 0) for p in Path],
                               state_dir=tmp_path / "monitor", hostname="controller-0", system="site",
                               burst_policy=burst)
    s = Site(cluster_id, master, monitor)
    monitor.on_health = s.changes.append
    monitor.on_alarm = s.monitor_alarms.append
    await monitor.start()
    try:
        for i, name in enumerate((VICTIM, BYSTANDER)):
            responder = HeartbeatResponder(node_id=10 + i, cluster_id=cluster_id, master_key=master,
                                           paths=[PathSpec(p, host_address(p, i), 0) for p in Path],
                                           state_dir=tmp_path / name, hostname=name, monitors=[MONITOR_ID],
                                           burst_policy=burst, on_alarm=s.agent_alarms.append)
            await responder.start()
            s.responders[name] = responder
            monitor.add_host(name, 10 + i, {p: responder.address(p) for p in Path})
        def healthy(host: str) -> bool:
            verdict = monitor.current(host)
            return verdict is not None and verdict.state == "healthy"
        await wait_until(lambda: all(healthy(h) for h in s.responders), timeout=10.0, what="both hosts healthy")
        yield s
    finally:
        for responder in s.responders.values():
            await responder.stop()
        await monitor.stop()
    text = logs.getvalue() + caplog.text
    assert "heartbeat authentication failures" in text       # the logs were captured, the burst is in them
    for form in key_forms(master, cluster_id):
        assert form not in text


async def capture(taps: dict[Path, Any], what: str, want: int = 6) -> dict[Path, list[bytes]]:
    """Real datagrams off the given endpoints' send taps, ``want`` per path."""
    captured: dict[Path, list[bytes]] = {p: [] for p in taps}
    for path, (endpoint, to) in taps.items():
        endpoint.filter.tap = lambda data, addr, _p=path, _to=to: (
            captured[_p].append(data) if addr == _to and len(captured[_p]) < want else None)
    try:
        await wait_until(lambda: all(len(c) >= want for c in captured.values()), timeout=5.0, what=what)
    finally:
        for endpoint, _ in taps.values():
            endpoint.filter.tap = None
    return captured


async def attack(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the attacker process with ``plan`` (on its stdin); what it says it sent."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "tests.support.heartbeat_attacker", cwd=REPO,
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(json.dumps(plan).encode() + b"\n"), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    sent: list[dict[str, Any]] = json.loads(out)["sent"]
    return sent


def expected_drops(sent: list[dict[str, Any]]) -> Counter[tuple[Path, DropReason]]:
    expected: Counter[tuple[Path, DropReason]] = Counter()
    for s in sent:
        expected[Path(s["path"]), EXPECTED[s["kind"]]] += s["count"]
    return expected


def plan_for(site: Site, *, sender: int, dest: int, role: Role, targets: dict[Path, Addr],
             sources: dict[Path, str], captured: dict[Path, list[bytes]]) -> dict[str, Any]:
    return {"cluster": site.cluster_id.hex(), "key": site.master.secret.hex(), "generation": site.master.generation,
            "sender": sender, "dest": dest, "role": int(role),
            "targets": {str(p.value): list(a) for p, a in targets.items()},
            "sources": {str(p.value): a for p, a in sources.items()},
            "captured": {str(p.value): [d.hex() for d in data] for p, data in captured.items()},
            "attacks": [{**a, "path": int(a["path"])} for a in ATTACKS]}


async def assert_hosts_stay_healthy(site: Site, mark: int) -> None:
    """Nothing changes for a while after the attack (a down interval's worth of rounds), every path up."""
    rounds = site.monitor.rounds
    await wait_until(lambda: site.monitor.rounds >= rounds + 2 * site.monitor.policy.down_after, timeout=10.0,
                     what="two down intervals of rounds")
    assert site.changes[mark:] == []
    for host in site.responders:
        verdict = site.monitor.current(host)
        assert verdict is not None and verdict.state == "healthy", verdict
        # every path working: up (suspect only if this loaded machine held an answer back 3 periods)
        assert all(s.state.working for s in site.monitor.status()[host].values()), site.monitor.status()[host]


async def test_attacker_process_against_the_monitor(site: Site) -> None:
    victim = site.responders[VICTIM]
    # the victim's real answers to the monitor, as an eavesdropper on each path sees them
    captured = await capture({p: (victim.endpoints[p], site.monitor.address(p)) for p in Path},
                             "the victim's answers")
    mark = len(site.changes)
    before = Counter(site.monitor.drop_counts())
    answered = {h: r.answered for h, r in site.responders.items()}
    sent = await attack(plan_for(site, sender=victim.node_id, dest=MONITOR_ID, role=Role.HOST,
                                 targets={p: site.monitor.address(p) for p in Path},
                                 sources={p: host_address(p, 0) for p in Path}, captured=captured))
    expected = expected_drops(sent)
    assert sum(expected.values()) == sum(a["count"] for a in ATTACKS)

    def grown() -> Counter[tuple[Path, DropReason]]:
        return Counter(site.monitor.drop_counts()) - before
    await wait_until(lambda: grown() == expected, timeout=5.0, what=f"the monitor's drops {dict(expected)}")
    raised = [a for a in site.monitor_alarms if a.alarm_id == ALARM_AUTH_FAILURES]
    assert [(a.entity_instance_id, a.raise_) for a in raised] == [(f"host={VICTIM}.network=mgmt", True)], raised
    await assert_hosts_stay_healthy(site, mark)
    assert grown() == expected                            # and nothing else was dropped meanwhile
    assert site.monitor.ignored["stale_echo"] == 0        # no forgery got as far as the freshness check
    assert all(r.answered > answered[h] for h, r in site.responders.items())


async def test_attacker_process_against_an_agent(site: Site) -> None:
    """The attacker impersonates the monitor (its address, its node id, the active role) towards an agent."""
    victim = site.responders[VICTIM]
    captured = await capture({p: (site.monitor.endpoints[p], victim.address(p)) for p in Path},
                             "the monitor's requests to the agent")
    mark = len(site.changes)
    before = Counter(victim.drop_counts())
    answered = victim.answered
    sent = await attack(plan_for(site, sender=MONITOR_ID, dest=victim.node_id, role=Role.ACTIVE,
                                 targets={p: victim.address(p) for p in Path},
                                 sources={p: monitor_address(p) for p in Path}, captured=captured))
    expected = expected_drops(sent)

    def grown() -> Counter[tuple[Path, DropReason]]:
        return Counter(victim.drop_counts()) - before
    await wait_until(lambda: grown() == expected, timeout=5.0, what=f"the agent's drops {dict(expected)}")
    # the agent attributes what it drops to itself: 950.006 names it and the network
    raised = [a for a in site.agent_alarms if a.alarm_id == ALARM_AUTH_FAILURES]
    assert [(a.entity_instance_id, a.raise_) for a in raised] == [(f"host={VICTIM}.network=mgmt", True)], raised
    assert not [a for a in site.monitor_alarms if a.alarm_id == ALARM_AUTH_FAILURES]
    assert Counter(site.responders[BYSTANDER].drop_counts()) == Counter()
    await assert_hosts_stay_healthy(site, mark)
    assert grown() == expected
    assert victim.answered > answered                     # it kept answering the real monitor
