"""The agent side of the heartbeat: answer every monitor's request on every configured path.

:class:`HeartbeatResponder` is an ``AgentComponent`` (``services.inventory.agent.agent``): ``start`` persists
the boot counter (a small file in ``state_dir``, written atomically) *before* any socket is opened, binds one
:class:`~services.heartbeat.transport.PathEndpoint` per path on the host's own address there, and from then
on answers each authenticated, fresh request from a monitor (a datagram with role STANDBY or ACTIVE) on the
path it arrived on, to the address it came from, with

* ``echo_seq``: the request's seq (the monitor credits only answers to what it sent recently);
* ``KEYS``: the key it signs with and the keys it verifies with (rotation reports);
* ``HEARD``: for every monitor it knows, the paths it heard that monitor on within ``suspect_after``
  periods (``paths.heard_paths``): the "what I hear" digest the monitors use for asymmetric paths and as
  witness reports.

It sends nothing unasked.  The keyring comes from the master key handed to the constructor (the agent's
enrolment, ``services.heartbeat.agent``).

It is also a voter of the controller pair (``pair.LeaseVoter``): a ``LEASE_REQUEST`` from a monitor is
answered with ``LEASE_GRANT`` or ``LEASE_REFUSE`` on the path it came on (a refusal carries the voter's
epoch in ``ttl_ms``), ``hears_holder`` being whether this host hears the current holder's monitor on any
path; a ``LEASE_RELEASE`` ends the holder's grant.  ``monitors``: the node ids it answers (None: any node whose
authenticated datagram says it is a controller's monitor; others are ``UNKNOWN_SENDER``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path as FsPath
from typing import TYPE_CHECKING

import structlog

from services.heartbeat.drops import BurstPolicy, DropReason
from services.heartbeat.keys import Keyring, MasterKey
from services.heartbeat.model import AlarmIntent, NodeId, Path, Seconds
from services.heartbeat.pair import LeaseRelease, LeaseVoter, PairPolicy, vote
from services.heartbeat.paths import PathHealth, PathPolicy, heard_paths
from services.heartbeat.transport import BOOT_COUNTER_FILE, Addr, Clock, PathNode, PathSpec
from services.heartbeat.wire import Datagram, KeyReport, MsgType, Payload, Role

if TYPE_CHECKING:
    from services.inventory.agent.agent import HostAgent

__all__ = ["HeartbeatResponder"]

log = structlog.get_logger("roost.heartbeat.responder")

MONITOR_ROLES = frozenset({Role.STANDBY, Role.ACTIVE})
MONITOR_MESSAGES = frozenset({MsgType.HEARTBEAT, MsgType.LEASE_REQUEST, MsgType.LEASE_RELEASE})


class HeartbeatResponder(PathNode):
    """Answers heartbeat requests on each path in ``paths``.  ``forget_after``: a monitor not heard for that
    long leaves the digest (unless listed in ``monitors``)."""

    name = "heartbeat"
    _log = log

    def __init__(self, *, node_id: NodeId, cluster_id: bytes, master_key: MasterKey | Keyring,
                 paths: Iterable[PathSpec], state_dir: FsPath | str, hostname: str = "",
                 monitors: Iterable[NodeId] | None = None, policy: PathPolicy | None = None,
                 burst_policy: BurstPolicy | None = None, clock: Clock | None = None,
                 on_alarm: Callable[[AlarmIntent], None] | None = None, forget_after: Seconds = 60.0,
                 pair_policy: PairPolicy | None = None) -> None:
        specs: dict[Path, PathSpec] = {}
        for spec in paths:
            if spec.path in specs:
                raise ValueError(f"path {spec.path.network} configured twice")
            specs[spec.path] = spec
        super().__init__(node_id=node_id, cluster_id=cluster_id, master_key=master_key, specs=specs,
                         state_dir=state_dir, hostname=hostname, burst_policy=burst_policy, clock=clock)
        self.monitors: frozenset[NodeId] | None = frozenset(monitors) if monitors is not None else None
        self.policy = policy or PathPolicy()
        self.on_alarm = on_alarm
        self.forget_after = forget_after
        self.heard: dict[NodeId, dict[Path, PathHealth]] = {}   # per monitor, per path
        self.epoch = 0                                           # the highest epoch an active monitor sent
        self.answered = 0
        self.pair_policy = pair_policy or PairPolicy()
        self.voter: LeaseVoter | None = None                      # made at start: its quiet period starts then
        self._housekeeping: asyncio.Task[None] | None = None
        if self.monitors is not None:
            self.keyring.set_peers(self.monitors)

    def __repr__(self) -> str:
        return f"HeartbeatResponder(node_id={self.node_id}, paths={[p.network for p in self.specs]})"

    # -- AgentComponent ----------------------------------------------------------------------------------

    async def start(self, agent: HostAgent | None = None) -> None:
        """Persist the boot counter, then bind every path.  Raises (and closes what it opened) when a path
        cannot be bound."""
        if self.node is not None:
            raise RuntimeError("the responder is already started")
        node = await self._open(BOOT_COUNTER_FILE, self.hostname or (agent.name if agent is not None else ""),
                                self._on_request, self._accept)
        self.voter = LeaseVoter(self.node_id, node.clock(), self.pair_policy)
        self._housekeeping = asyncio.create_task(self._housekeep(), name=f"heartbeat-responder-{self.node_id}")
        log.info("heartbeat responder started", node_id=self.node_id, boot_counter=node.boot.value,
                 paths={p.network: f"{e.local_address}" for p, e in self.endpoints.items()},
                 fingerprint=f"{self.keyring.primary.key_id:#010x}")

    async def stop(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
            self._housekeeping = None
        if self._close():
            log.info("heartbeat responder stopped", node_id=self.node_id, answered=self.answered)

    @property
    def boot_counter(self) -> int | None:
        return self.node.boot.value if self.node is not None else None

    # -- answering ---------------------------------------------------------------------------------------

    def _accept(self, datagram: Datagram, source: Addr) -> DropReason | None:
        h = datagram.header
        if h.msg_type not in MONITOR_MESSAGES or h.role not in MONITOR_ROLES:
            return DropReason.UNKNOWN_SENDER
        if h.msg_type is not MsgType.HEARTBEAT and datagram.payload.lease is None:
            return DropReason.MALFORMED
        if self.monitors is not None and h.sender not in self.monitors:
            return DropReason.UNKNOWN_SENDER
        return None

    def _on_request(self, datagram: Datagram, source: Addr, now: Seconds) -> None:
        h, payload = datagram.header, datagram.payload
        paths = self.heard.get(h.sender)
        if paths is None:
            paths = self.heard[h.sender] = {}
            if self.monitors is None:
                self.keyring.set_peers(self.heard)
        health = paths.get(h.path)
        if health is None:
            health = paths[h.path] = PathHealth(now, self.policy)
        health.heard(now, self._hears_me(datagram))
        if h.role is Role.ACTIVE and h.epoch > self.epoch:
            self.epoch = h.epoch
        if h.msg_type is not MsgType.HEARTBEAT:
            self._lease(datagram, source, now)
            return
        self._keys_reported(now, h.sender, payload.keys)
        primary, held = self.keyring.held()
        digest = self._digest(now)
        endpoint = self.endpoints.get(h.path)
        if endpoint is None:
            return
        payload = Payload(KeyReport(primary, held), digest)
        if endpoint.send(source, payload, dest=h.sender, role=Role.HOST, echo_seq=h.seq, epoch=self.epoch) is not None:
            self.answered += 1

    def hears(self, monitor: NodeId | None, now: Seconds) -> bool:
        """Whether this host heard ``monitor`` on any path within the down time (by the clock: nothing
        advances these paths when the monitor falls silent)."""
        paths = self.heard.get(monitor) if monitor is not None else None
        return paths is not None and any(p.last_heard is not None and p.silence(now) < p.policy.down_time
                                         for p in paths.values())

    def _lease(self, datagram: Datagram, source: Addr, now: Seconds) -> None:
        h, lease, voter = datagram.header, datagram.payload.lease, self.voter
        endpoint = self.endpoints.get(h.path)
        if lease is None or voter is None or endpoint is None:
            return
        if h.msg_type is MsgType.LEASE_RELEASE:
            voter.release(LeaseRelease(lease.candidate, lease.epoch))
            return
        if lease.candidate != h.sender:
            return                                   # a controller asks for itself only
        msg, fields = vote(voter, now, lease, hears_holder=self.hears(voter.holder, now))
        endpoint.send(source, Payload(lease=fields), dest=h.sender, role=Role.HOST, echo_seq=h.seq,
                      epoch=self.epoch, msg_type=msg)

    def _digest(self, now: Seconds) -> dict[NodeId, frozenset[Path]]:
        digest = {monitor: heard_paths(paths, now) for monitor, paths in self.heard.items()}
        for monitor in self.monitors or ():
            digest.setdefault(monitor, frozenset())
        return digest

    def _alarm(self, intent: AlarmIntent) -> None:
        if self.on_alarm is not None:
            self.on_alarm(intent)

    async def _housekeep(self) -> None:
        """Once a second: the 950.006 clears, key retirement, and forgetting monitors long silent."""
        while True:
            await asyncio.sleep(1.0)
            node = self.node
            if node is None:
                return
            now = node.clock()
            try:
                for intent in node.drops.tick(now):
                    self._alarm(intent)
                self._advance_keys(now)
                stale = [m for m, paths in self.heard.items()
                         if (self.monitors is None or m not in self.monitors)
                         and min(h.silence(now) for h in paths.values()) > self.forget_after]
                for monitor in stale:
                    del self.heard[monitor]
                    node.replay.forget(monitor)
                if stale and self.monitors is None:
                    self.keyring.set_peers(self.heard)
            except Exception as e:
                log.warning("heartbeat responder housekeeping failed", error=type(e).__name__)



if TYPE_CHECKING:
    from services.inventory.agent.agent import AgentComponent

    def _is_an_agent_component(responder: HeartbeatResponder) -> AgentComponent:
        return responder
