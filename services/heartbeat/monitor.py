"""The controller side of the heartbeat: request, listen, judge.

:class:`HeartbeatMonitor` binds one :class:`~services.heartbeat.transport.PathEndpoint` per path on the
controller's own address there and, every ``period`` (100 ms), sends a request to every monitored host on
every path they share (the request carries our ``HEARD`` entry for that host and our key report).  Answers
(authenticated, fresh, from a monitored host in role HOST) feed the (host, path) :class:`PathHealth`:

* credited only when they come from the host's configured address on that path and echo a request we
  sent within ``fresh_echo`` (3 periods): an answer to an older request proves little, and a burst of them
  (requests the kernel queued while a link was down, delivered together when it comes back) would bring a
  path straight UP past the flap damping; ``ignored`` counts them;
* ``hears_me`` from the answer's ``HEARD`` digest; ``KEYS`` into the keyring; the digest's entries for
  other monitored hosts (a worker that hears the other controller) into ``Verdict.witness_report``.

Timers: one ``loop.call_later`` handle, always at the earliest of the paths' ``next_deadline()``, the
verdict's, the drop counter's, the keyring's, and the times a host's silence crosses the multi-node
failure thresholds; when it fires, due paths ``advance`` and ``Verdict.evaluate`` runs.  A path transition
on an answer also evaluates (at once, coalesced).  No busy loop; the clock is ``loop.time`` unless given.
A dead host's paths go down a few ms apart: while one of them just went DOWN and another is due within a
period, the verdict waits for it (at most a period), so the host goes straight to failed without a
degraded blip and a 950.003 raised and cleared.

Stalls: if the event loop itself was stalled (a timer or the send loop ran more than ``stall_after`` late),
silence measured across the stall says nothing about the hosts: evaluation holds off for ``stall_hold``
after the loop runs again, so fresh answers are read before anyone can be declared down.  The same when
the answers of several hosts arrive echoing requests older than ``down_after`` (``_late_answer``): the
hosts answered in time and we read them late, a monitor starved of CPU whose loop is never late enough
to look stalled (measured: without this, a starved monitor failed healthy hosts).

The peer controller (``set_peer``): its monitor is sent a heartbeat on every path each round (role and
epoch in the header: its "claim"), and its heartbeats to us feed one ``PathHealth`` per path; whether any
of them is heard goes to ``on_peer(reachable)``.  Its datagrams (heartbeats and lease messages) and the
lease grants and refusals of monitored hosts go to ``on_pair(datagram, source, now)``, for the pair
(``services.heartbeat.pairnode``); ``send_lease`` sends the pair's lease messages.

Out: ``on_health(HealthChange)`` for each host verdict that changed (with a version that grows per host,
from ``version_base``), ``on_alarm(AlarmIntent)`` for 950.003 / 950.009 from the verdict and 950.006 from
the drop counter.  Callbacks are called from the loop; one that raises is logged and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import TypeVar

import structlog

from schemas.heartbeat import HostHealth
from services.heartbeat.drops import BurstPolicy, DropReason
from services.heartbeat.keys import Keyring, MasterKey
from services.heartbeat.model import AlarmIntent, NodeId, Path, Seconds
from services.heartbeat.paths import EPSILON, PathHealth, PathPolicy, PathState, PathTransition, heard_paths
from services.heartbeat.transport import DEFAULT_PORT, Addr, Clock, PathNode, PathSpec
from services.heartbeat.verdict import HostVerdict, PathView, Verdict, VerdictPolicy
from services.heartbeat.wire import Datagram, KeyReport, LeaseFields, MsgType, Payload, Role, encode_payload

__all__ = ["HealthChange", "HeartbeatMonitor", "MonitoredHost", "PathStatus", "PeerMonitor"]

log = structlog.get_logger("roost.heartbeat.monitor")

MONITOR_BOOT_COUNTER_FILE = "heartbeat-monitor-boot-counter"
"""Not the agent's file: a controller runs both, and they may share a state directory."""

_T = TypeVar("_T")
_MNFA_WATCHED = frozenset({PathState.SUSPECT, PathState.ASYMMETRIC})
_HEARING = frozenset({PathState.UP, PathState.SUSPECT, PathState.ASYMMETRIC})
_MONITOR_ROLES = frozenset({Role.STANDBY, Role.ACTIVE})
_PEER_MESSAGES = frozenset({MsgType.HEARTBEAT, MsgType.LEASE_REQUEST, MsgType.LEASE_GRANT, MsgType.LEASE_REFUSE,
                            MsgType.LEASE_RELEASE})
_VOTES = frozenset({MsgType.LEASE_GRANT, MsgType.LEASE_REFUSE})


@dataclass(frozen=True, slots=True)
class HealthChange:
    """A host's verdict changed.  ``version`` grows per host; ``at`` is the monitor's clock; ``silent_for``:
    how long the host had been silent on every path then (the detection latency of a failure)."""

    verdict: HostVerdict
    entity_id: str | None
    version: int
    at: Seconds
    silent_for: Seconds = 0.0

    def event(self) -> HostHealth:
        if self.entity_id is None:
            raise ValueError(f"host {self.verdict.hostname} was added without its uuid")
        return self.verdict.event(self.entity_id, self.version)


@dataclass(frozen=True, slots=True)
class PathStatus:
    state: PathState
    since: Seconds
    last_heard: Seconds | None
    rtt: Seconds | None
    penalty: int


@dataclass(slots=True)
class MonitoredHost:
    hostname: str
    node_id: NodeId
    addresses: dict[Path, Addr]
    entity_id: str | None
    health: dict[Path, PathHealth] = field(default_factory=dict)
    rtt: dict[Path, Seconds] = field(default_factory=dict)
    version: int = 0


@dataclass(slots=True)
class PeerMonitor:
    """The other controller's monitor: where it listens, and what we hear of it per path."""

    node_id: NodeId
    addresses: dict[Path, Addr]
    health: dict[Path, PathHealth] = field(default_factory=dict)
    reachable: bool = False


@dataclass(slots=True)
class _Round:
    """The seqs sent on one path in one round: for the freshness of echoes and the RTT."""

    at: Seconds
    first: int
    last: int


def _advance_if_due(health: PathHealth, now: Seconds) -> PathTransition | None:
    deadline = health.next_deadline()
    return health.advance(now) if deadline is not None and deadline <= now + EPSILON else None


def _addr(value: str | Addr, port: int) -> Addr:
    return (value, port) if isinstance(value, str) else (value[0], int(value[1]))


class HeartbeatMonitor(PathNode):
    """Watches hosts over every path in ``paths``.  Hosts come and go with :meth:`add_host` /
    :meth:`remove_host` (at any time, started or not)."""

    _log = log

    def __init__(self, *, node_id: NodeId, cluster_id: bytes, master_key: MasterKey | Keyring,
                 paths: Iterable[PathSpec], state_dir: FsPath | str, system: str = "roost", hostname: str = "",
                 role: Role = Role.ACTIVE, epoch: int = 0, period: Seconds | None = None,
                 path_policy: PathPolicy | None = None, verdict_policy: VerdictPolicy | None = None,
                 burst_policy: BurstPolicy | None = None, clock: Clock | None = None,
                 on_health: Callable[[HealthChange], None] | None = None,
                 on_alarm: Callable[[AlarmIntent], None] | None = None,
                 version_base: int | None = None, stall_after: Seconds | None = None,
                 stall_hold: Seconds | None = None,
                 on_pair: Callable[[Datagram, Addr, Seconds], None] | None = None,
                 on_peer: Callable[[bool], None] | None = None, fresh_echo: Seconds | None = None) -> None:
        policy = path_policy or PathPolicy()
        if period is not None and period != policy.period:
            policy = dataclasses.replace(policy, period=period)
        super().__init__(node_id=node_id, cluster_id=cluster_id, master_key=master_key,
                         specs={spec.path: spec for spec in paths}, state_dir=state_dir, hostname=hostname,
                         burst_policy=burst_policy, clock=clock)
        self.policy = policy
        self.period = policy.period
        self.role = role
        self.epoch = epoch
        self.verdict = Verdict(system, verdict_policy)
        self.on_health = on_health
        self.on_alarm = on_alarm
        self.version_base = version_base if version_base is not None else time.time_ns() // 1_000_000
        self.stall_after = stall_after if stall_after is not None else max(0.5, 5 * self.period)
        self.stall_hold = stall_hold if stall_hold is not None else 3 * self.period
        self.fresh_echo = fresh_echo if fresh_echo is not None else 3 * self.period
        self.hosts: dict[str, MonitoredHost] = {}
        self._by_id: dict[NodeId, MonitoredHost] = {}
        self._by_ip: dict[str, str] = {}
        self.ignored: Counter[str] = Counter()        # authentic answers that were not credited, by why
        self.rounds = 0
        self.evaluations = 0
        self.stalls = 0
        self._rounds: dict[Path, deque[_Round]] = {p: deque() for p in self.specs}
        self._sender: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: Seconds | None = None
        self._soon: asyncio.Handle | None = None
        self._hold_until: Seconds = 0.0
        self._late: dict[str, Seconds] = {}            # hosts whose answers came in late, and when
        self._bodies: dict[tuple[NodeId, frozenset[Path]], bytes] = {}   # encoded request TLVs per host
        self._body_keys: KeyReport | None = None
        self.peer: PeerMonitor | None = None
        self.on_pair = on_pair
        self.on_peer = on_peer

    def __repr__(self) -> str:
        return f"HeartbeatMonitor(node_id={self.node_id}, hosts={len(self.hosts)})"

    # -- life cycle ----------------------------------------------------------------------------------

    def now(self) -> Seconds:
        if self.node is not None:
            return self.node.clock()
        return (self._clock or asyncio.get_running_loop().time)()

    async def start(self) -> None:
        """Persist the boot counter, bind every path, start sending.  Raises (closing what it opened) when
        a path cannot be bound."""
        if self.node is not None:
            raise RuntimeError("the monitor is already started")
        node = await self._open(MONITOR_BOOT_COUNTER_FILE, self.hostname or f"node-{self.node_id}",
                                self._on_answer, self._accept, self._attribute)
        now = node.clock()
        for host in self.hosts.values():       # a host added before start gets its full time to come up
            for path in host.health:
                host.health[path] = PathHealth(now, self.policy)
        if self.peer is not None:
            self.peer.health = {p: PathHealth(now, self.policy) for p in self.peer.addresses}
        self._sender = asyncio.create_task(self._send_loop(), name=f"heartbeat-monitor-{self.node_id}")
        self._schedule()
        log.info("heartbeat monitor started", node_id=self.node_id, boot_counter=node.boot.value,
                 paths={p.network: f"{e.local_address}" for p, e in self.endpoints.items()},
                 hosts=len(self.hosts), period=self.period, fingerprint=f"{self.keyring.primary.key_id:#010x}")

    async def stop(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None
        for handle in (self._timer, self._soon):
            if handle is not None:
                handle.cancel()
        self._timer = self._soon = None
        self._timer_at = None
        if self._close():
            log.info("heartbeat monitor stopped", node_id=self.node_id, rounds=self.rounds)

    # -- the hosts ---------------------------------------------------------------------------------------

    def add_host(self, hostname: str, node_id: NodeId, addresses: Mapping[Path, str | Addr], *,
                 entity_id: str | None = None, port: int = DEFAULT_PORT) -> None:
        """Monitor ``hostname`` (its heartbeat ``node_id``, its address per path: an IP, with ``port``, or
        (IP, port)).  Again for a known host: its addresses change; a path it no longer has is forgotten, a
        new one starts UNKNOWN.  Paths this monitor has no socket on are ignored."""
        if node_id == self.node_id:
            raise ValueError("a monitor does not monitor its own node")
        other = self._by_id.get(node_id)
        if other is not None and other.hostname != hostname:
            raise ValueError(f"node id {node_id} is {other.hostname}'s")
        wanted = {p: _addr(a, port) for p, a in addresses.items() if p in self.specs}
        now = self.now() if self.node is not None else 0.0
        host = self.hosts.get(hostname)
        if host is not None and host.node_id != node_id:
            self.remove_host(hostname)
            host = None
        if host is None:
            host = MonitoredHost(hostname, node_id, wanted, entity_id)
            self.hosts[hostname] = host
            self._by_id[node_id] = host
        else:
            host.addresses = wanted
            host.entity_id = entity_id if entity_id is not None else host.entity_id
        host.health = {p: host.health.get(p) or PathHealth(now, self.policy) for p in wanted}
        host.rtt = {p: r for p, r in host.rtt.items() if p in wanted}
        self._reindex()
        log.info("heartbeat monitoring host", host=hostname, node_id=node_id,
                 paths={p.network: f"{a[0]}:{a[1]}" for p, a in wanted.items()})
        self._changed()

    def remove_host(self, hostname: str) -> None:
        """Stop monitoring ``hostname``; its verdict is forgotten and its alarms are cleared."""
        host = self.hosts.pop(hostname, None)
        if host is None:
            return
        self._by_id.pop(host.node_id, None)
        self.verdict.forget_witness(hostname)
        if self.node is not None:
            self.node.replay.forget(host.node_id)
        self._reindex()
        log.info("heartbeat no longer monitoring host", host=hostname)
        self._changed()

    def set_peer(self, node_id: NodeId, addresses: Mapping[Path, str | Addr], *, port: int) -> None:
        """The other controller's monitor: its node id and its address per path (an IP with ``port``)."""
        if node_id == self.node_id or node_id in self._by_id:
            raise ValueError(f"node id {node_id} is this monitor's or a monitored host's")
        wanted = {p: _addr(a, port) for p, a in addresses.items() if p in self.specs}
        now = self.now() if self.node is not None else 0.0
        self.peer = PeerMonitor(node_id, wanted, {p: PathHealth(now, self.policy) for p in wanted})
        self._reindex()
        log.info("heartbeat peer monitor", node_id=node_id,
                 paths={p.network: f"{a[0]}:{a[1]}" for p, a in wanted.items()})

    def send_lease(self, node_id: NodeId, addresses: Mapping[Path, Addr], msg_type: MsgType, lease: LeaseFields) -> int:
        """A lease message to ``node_id`` on every path we share; how many were sent."""
        sent = 0
        for path, addr in addresses.items():
            endpoint = self.endpoints.get(path)
            if endpoint is not None and endpoint.send(addr, Payload(lease=lease), dest=node_id, role=self.role,
                                                      epoch=self.epoch, msg_type=msg_type) is not None:
                sent += 1
        return sent

    def voter_addresses(self, node_id: NodeId) -> dict[Path, Addr]:
        """Where a voter (the peer monitor or a monitored host's agent) listens, per path."""
        if self.peer is not None and node_id == self.peer.node_id:
            return dict(self.peer.addresses)
        host = self._by_id.get(node_id)
        return dict(host.addresses) if host is not None else {}

    def _reindex(self) -> None:
        self._by_ip = {addr[0]: h.hostname for h in self.hosts.values() for addr in h.addresses.values()}
        peers: set[NodeId] = set(self._by_id)
        if self.peer is not None:
            peers.add(self.peer.node_id)
        self.keyring.set_peers(peers)

    def status(self) -> dict[str, dict[Path, PathStatus]]:
        """Every host's paths, as seen now."""
        return {h.hostname: {p: PathStatus(x.state, x.since, x.last_heard, h.rtt.get(p), x.penalty)
                             for p, x in h.health.items()} for h in self.hosts.values()}

    def current(self, hostname: str) -> HostVerdict | None:
        return self.verdict.current(hostname)

    # -- sending -------------------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        node = self.node
        assert node is not None
        due = node.clock()
        while True:
            now = node.clock()
            late = now - due
            if late > self.stall_after:
                self._stalled(now, late, "send loop")
            if late > self.period:
                due = now                  # skip the rounds missed: no burst after a stall
            try:
                self._send_round(now)
            except Exception as e:
                log.warning("heartbeat send round failed", error=type(e).__name__)
            due += self.period
            await asyncio.sleep(max(0.0, due - node.clock()))

    def _send_round(self, now: Seconds) -> None:
        self.rounds += 1
        primary, held = self.keyring.held()
        keys = KeyReport(primary, held)
        if keys != self._body_keys:
            self._bodies.clear()
            self._body_keys = keys
        payloads: dict[NodeId, bytes] = {}
        bodies = self._bodies
        for h in self.hosts.values():
            heard = heard_paths(h.health, now)
            body = bodies.get((h.node_id, heard))       # the same TLVs round after round, while nothing changes
            if body is None:
                if len(bodies) > 4 * len(self.hosts) + 64:
                    bodies.clear()
                body = bodies[(h.node_id, heard)] = encode_payload(Payload(keys, {h.node_id: heard}))
            payloads[h.node_id] = body
        for path, endpoint in self.endpoints.items():
            first = last = None
            for host in self.hosts.values():
                addr = host.addresses.get(path)
                if addr is None:
                    continue
                seq = endpoint.send(addr, payloads[host.node_id], dest=host.node_id, role=self.role, epoch=self.epoch)
                if seq is not None:
                    first = seq if first is None else first
                    last = seq
            peer = self.peer
            if peer is not None and path in peer.addresses:
                digest = Payload(keys, {peer.node_id: heard_paths(peer.health, now)})
                endpoint.send(peer.addresses[path], digest, dest=peer.node_id, role=self.role, epoch=self.epoch)
            rounds = self._rounds[path]
            if first is not None and last is not None:
                rounds.append(_Round(now, first, last))
            horizon = now - self.policy.down_time - self.period
            while rounds and rounds[0].at < horizon:
                rounds.popleft()

    def _sent_at(self, path: Path, seq: int) -> Seconds | None:
        """When we sent ``seq`` on ``path``, if that was recent enough to count."""
        for r in reversed(self._rounds[path]):          # nearly always the newest round
            if seq > r.last:
                return None
            if seq >= r.first:
                return r.at
        return None

    # -- receiving ----------------------------------------------------------------------------------------

    def _attribute(self, source: Addr) -> str | None:
        return self._by_ip.get(source[0])

    def _accept(self, datagram: Datagram, source: Addr) -> DropReason | None:
        h = datagram.header
        peer = self.peer
        if peer is not None and h.sender == peer.node_id:
            if h.path not in peer.addresses or h.role not in _MONITOR_ROLES or h.msg_type not in _PEER_MESSAGES:
                return DropReason.UNKNOWN_SENDER
            if h.msg_type is not MsgType.HEARTBEAT and datagram.payload.lease is None:
                return DropReason.MALFORMED
            return None
        host = self._by_id.get(h.sender)
        if host is None or h.path not in host.addresses or h.role is not Role.HOST:
            return DropReason.UNKNOWN_SENDER
        if h.msg_type in _VOTES:
            return None if datagram.payload.lease is not None else DropReason.MALFORMED
        if h.msg_type is not MsgType.HEARTBEAT:
            return DropReason.UNKNOWN_SENDER
        return None

    def _on_answer(self, datagram: Datagram, source: Addr, now: Seconds) -> None:
        h, payload = datagram.header, datagram.payload
        peer = self.peer
        if peer is not None and h.sender == peer.node_id:
            self._from_peer(peer, datagram, source, now)
            return
        if h.msg_type is not MsgType.HEARTBEAT:
            if self.on_pair is not None and self._by_id.get(h.sender) is not None:
                self.on_pair(datagram, source, now)
            return
        host = self._by_id.get(h.sender)
        if host is None:
            return
        addr = host.addresses.get(h.path)
        health = host.health.get(h.path)
        if addr is None or health is None:
            return
        if source[0] != addr[0]:
            self.ignored["wrong_source"] += 1
            return
        sent = self._sent_at(h.path, h.echo_seq)
        if sent is None or now - sent > self.policy.down_time:
            self.ignored["stale_echo"] += 1
            self._late_answer(now, host.hostname)
            return
        if now - sent > self.fresh_echo:
            # an answer to an old request (the kernel held our requests while the link was down, or we read
            # late): it would count as a good heartbeat now, and a burst of them would bring a DOWN path
            # straight UP, skipping the flap damping; only answers to recent requests count
            self.ignored["late_echo"] += 1
            self._late_answer(now, host.hostname)
            return
        host.rtt[h.path] = now - sent
        transition = health.heard(now, self._hears_me(datagram))
        self._keys_reported(now, h.sender, payload.keys)
        if payload.heard:
            witnessed = {other.hostname: paths for node, paths in payload.heard.items()
                         if (other := self._by_id.get(node)) is not None and other is not host}
            if witnessed:
                self.verdict.witness_report(now, host.hostname, witnessed)
        if transition is not None:
            self._log_transition(host, h.path, transition.before, transition.after, transition.reason)
            self._changed()

    def _from_peer(self, peer: PeerMonitor, datagram: Datagram, source: Addr, now: Seconds) -> None:
        h = datagram.header
        addr = peer.addresses.get(h.path)
        if addr is None or source[0] != addr[0]:
            self.ignored["wrong_source"] += 1
            return
        if h.msg_type is MsgType.HEARTBEAT:
            health = peer.health.get(h.path)
            if health is not None:
                health.heard(now, self._hears_me(datagram))
            self._keys_reported(now, h.sender, datagram.payload.keys)
            self._peer_check()
        if self.on_pair is not None:
            self.on_pair(datagram, source, now)

    def _peer_check(self) -> None:
        peer = self.peer
        if peer is None:
            return
        reachable = any(x.state in _HEARING for x in peer.health.values())
        if reachable != peer.reachable:
            peer.reachable = reachable
            log.info("heartbeat peer monitor", reachable=reachable, node_id=peer.node_id,
                     paths={p.network: x.state.value for p, x in peer.health.items()})
            self._call(self.on_peer, reachable)

    # -- judging ---------------------------------------------------------------------------------------------

    def _changed(self) -> None:
        """Evaluate soon (once, however many changes come in this loop iteration)."""
        if self.node is None or self._soon is not None:
            return
        self._soon = asyncio.get_running_loop().call_soon(self._fire, None)

    def _fire(self, scheduled: Seconds | None) -> None:
        if scheduled is None:
            self._soon = None
        else:
            self._timer = None
            self._timer_at = None
        node = self.node
        if node is None:
            return
        now = node.clock()
        try:
            if scheduled is not None and now - scheduled > self.stall_after:
                self._stalled(now, now - scheduled, "timer")
            if now >= self._hold_until:
                self._evaluate(now)
        except Exception as e:
            log.warning("heartbeat evaluation failed", error=type(e).__name__)
        self._schedule()

    def _late_answer(self, now: Seconds, hostname: str) -> None:
        """An answer that echoes a request older than ``down_after``: the host answered, we read it late.
        When several hosts' answers come in late within two periods, the monitor itself is slow (starved
        of CPU, its socket queue long): hold the verdicts, as for a stalled loop, instead of failing hosts
        whose answers are waiting to be read.  One host with a slow network cannot hold everyone's."""
        late = self._late
        late[hostname] = now
        horizon = now - 2 * self.period
        for name in [n for n, t in late.items() if t < horizon]:
            del late[name]
        if len(late) >= max(2, len(self.hosts) // 20):
            self._stalled(now, 0.0, f"answers of {len(late)} hosts read late")

    def _stalled(self, now: Seconds, late: Seconds, where: str) -> None:
        if now >= self._hold_until:           # a new hold (one already running is only extended: no log flood)
            self.stalls += 1
            log.warning("heartbeat monitor too slow to judge: holding verdicts", late=round(late, 3),
                        where=where, hold=self.stall_hold)
        self._hold_until = max(self._hold_until, now + self.stall_hold)

    def _evaluate(self, now: Seconds) -> None:
        self.evaluations += 1
        node = self.node
        assert node is not None
        for host in self.hosts.values():
            for path, health in host.health.items():
                t = _advance_if_due(health, now)
                if t is not None:
                    self._log_transition(host, path, t.before, t.after, t.reason)
        if self.peer is not None:
            for health in self.peer.health.values():
                _advance_if_due(health, now)
            self._peer_check()
        if self._going_down(now):
            return                      # judged once the host's other paths went down too: no degraded blip
        views = {h.hostname: {p: PathView.of(x, now) for p, x in h.health.items()} for h in self.hosts.values()}
        out = self.verdict.evaluate(now, views)
        for verdict in out.health:
            host = self.hosts[verdict.hostname]
            host.version += 1
            silent = min((x.silence(now) for x in host.health.values()), default=0.0)
            change = HealthChange(verdict, host.entity_id, self.version_base + host.version, now, silent)
            log.info("heartbeat host health", host=verdict.hostname, state=verdict.state,
                     networks_down=list(verdict.networks_down), reason=verdict.reason, silent_for=round(silent, 3))
            self._call(self.on_health, change)
        for intent in out.alarms:
            self._alarm(intent)
        for intent in node.drops.tick(now):
            self._alarm(intent)
        self._advance_keys(now)

    def _going_down(self, now: Seconds) -> bool:
        """Whether a host's path went DOWN within the last period while another of its paths is SUSPECT and
        due to go DOWN within a period: a host that died takes its paths down a few ms apart, and judging
        in between would announce it degraded (and raise 950.003) just before failing it.  Waits at most
        one period after the first path went down."""
        p = self.policy
        for host in self.hosts.values():
            if not any(x.state is PathState.DOWN and now - x.since < p.period for x in host.health.values()):
                continue
            for x in host.health.values():
                deadline = x.next_deadline()
                if x.state is PathState.SUSPECT and deadline is not None and deadline - now <= p.period:
                    return True
        return False

    def _next_deadline(self, now: Seconds) -> Seconds | None:
        times: list[Seconds] = []
        vp = self.verdict.policy
        for host in self.hosts.values():
            for health in host.health.values():
                deadline = health.next_deadline()
                if deadline is not None:
                    times.append(deadline)
                if health.state in _MNFA_WATCHED and health.last_heard is not None:
                    # the multi-node failure mode counts hosts silent for mnfa_minor (an UP path becomes
                    # SUSPECT first, at its own deadline; leaving the mnfa_window can only lower the count)
                    t = health.last_heard + vp.mnfa_minor
                    if t > now:
                        times.append(t)
            verdict = self.verdict.current(host.hostname)
            if verdict is not None and verdict.state == "degraded" and all(
                    x.state is PathState.DOWN for x in host.health.values()):
                times.append(now + self.period)     # waiting for confirmation by witnesses: once a period
        if self.peer is not None:
            times += [d for x in self.peer.health.values() if (d := x.next_deadline()) is not None]
        node = self.node
        for other in (self.verdict.next_deadline(), self.keyring.next_deadline(),
                      node.drops.next_deadline() if node is not None else None):
            if other is not None:
                times.append(other)
        if self._hold_until > now:
            times = [max(t, self._hold_until) for t in times]
        return min(times, default=None)

    def _schedule(self) -> None:
        node = self.node
        if node is None:
            return
        now = node.clock()
        deadline = self._next_deadline(now)
        if deadline is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._timer_at = None
            return
        if self._timer is not None and self._timer_at is not None and self._timer_at <= deadline + EPSILON:
            return                                  # the earlier timer fires first and reschedules
        if self._timer is not None:
            self._timer.cancel()
        # a hair after the deadline, so the state's own comparisons see it as reached
        self._timer_at = deadline
        self._timer = asyncio.get_running_loop().call_later(max(0.0, deadline - now) + 1e-4, self._fire, deadline)

    # -- out ---------------------------------------------------------------------------------------------------

    def _alarm(self, intent: AlarmIntent) -> None:
        log.info("heartbeat alarm", alarm=intent.alarm_id, entity=intent.entity_instance_id,
                 raise_=intent.raise_, severity=intent.severity)
        self._call(self.on_alarm, intent)

    def _call(self, callback: Callable[[_T], None] | None, value: _T) -> None:
        if callback is None:
            return
        try:
            callback(value)
        except Exception as e:
            log.warning("heartbeat monitor callback failed", error=type(e).__name__)

    def _log_transition(self, host: MonitoredHost, path: Path, before: PathState, after: PathState,
                        reason: str) -> None:
        # UP <-> SUSPECT is the everyday jitter of a lossy network: debug; the rest changes a verdict
        level = log.debug if {before, after} <= {PathState.UP, PathState.SUSPECT} else log.info
        level("heartbeat path", host=host.hostname, network=path.network, before=before.value, after=after.value,
              reason=reason)
