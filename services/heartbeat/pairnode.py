"""The controller pair on the network: one controller's ``PairController`` driven over the monitor's sockets.

:class:`PairNode` is the I/O edge of ``pair`` (pure): it feeds the controller what the monitor hears and
carries out its effects *in order*, as the simulation in the tests does:

* **in**: the peer monitor's heartbeats (role and epoch in the header: its claim, ``peer_claim``); whether
  any path to the peer is heard (``peer_paths``, from the monitor's per-path health of the peer); lease
  grants and refusals from the voters (workers' agents, ``responder``, and the peer's own voter); lease
  requests and releases from the peer (answered by this controller's voter); a handover from the peer (a
  ``LEASE_RELEASE`` of kind ``HANDOVER``); fence outcomes; the timer at ``next_deadline``.
* **out**: ``SendLeaseRequest`` / ``SendRelease`` to every voter on every path it has; ``SendHandover`` to
  the peer (twice per path: a lost handover only delays the swact); ``FencePeer`` runs ``Fencer.fence`` in a
  task and its outcome comes back as ``fence_result``; ``PersistEpoch`` writes the epoch file (fsync, before
  the next effect); ``BecomeActive`` / ``BecomeStandby`` set the role and epoch every heartbeat carries;
  ``Announce`` and ``RaiseAlarm`` go to ``emit`` (the service writes them to the outbox).

A refusal carries the voter's epoch in ``ttl_ms`` (the wire has no other field for it).  The epoch file is
read at start: a controller never reuses an epoch it may have held before a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path as FsPath
from typing import Any

import structlog

from services.core.files import write_private
from services.heartbeat.fencing import Fencer
from services.heartbeat.model import AlarmIntent, NodeId, Seconds
from services.heartbeat.monitor import HeartbeatMonitor
from services.heartbeat.pair import (
    Announce,
    BecomeActive,
    BecomeStandby,
    Effect,
    FencePeer,
    LeaseGrant,
    LeaseRefusal,
    LeaseRelease,
    PairConfig,
    PairController,
    PairPolicy,
    PersistEpoch,
    RaiseAlarm,
    SendHandover,
    SendLeaseRequest,
    SendRelease,
    vote,
)
from services.heartbeat.transport import Addr
from services.heartbeat.wire import Datagram, LeaseFields, LeaseKind, MsgType, Role

__all__ = ["EPOCH_FILE", "PairNode"]

log = structlog.get_logger("roost.heartbeat.pair")

EPOCH_FILE = "pair-epoch"


def _load_epoch(state_dir: FsPath) -> int:
    try:
        text = (state_dir / EPOCH_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return 0
    if not text.isdigit():
        raise ValueError(f"the pair epoch file {state_dir / EPOCH_FILE} is not a number: repair it (never lower it)")
    return int(text)


class PairNode:
    def __init__(self, monitor: HeartbeatMonitor, *, me_name: str, peer_name: str, peer_id: NodeId,
                 fencer: Fencer, state_dir: FsPath, system: str,
                 emit: Callable[[Announce | AlarmIntent], None], on_role: Callable[[bool], None] | None = None,
                 policy: PairPolicy | None = None) -> None:
        self.monitor = monitor
        self.me_name = me_name
        self.peer_name = peer_name
        self.peer_id = peer_id
        self.fencer = fencer
        self.state_dir = state_dir
        self.system = system
        self.emit = emit
        self.on_role = on_role
        self.policy = policy or PairPolicy()
        self.ctrl: PairController | None = None
        self.names = {monitor.node_id: me_name, peer_id: peer_name}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._voters: frozenset[NodeId] = frozenset()

    # -- life cycle ---------------------------------------------------------------------------------------

    def start(self, voters: Iterable[NodeId] = ()) -> None:
        """After the monitor started (it owns the sockets and the clock)."""
        now = self.monitor.now()
        me = self.monitor.node_id
        self._voters = frozenset(voters) | {me, self.peer_id}
        config = PairConfig(me, self.peer_id, self._voters, self.me_name, self.peer_name, self.system, self.policy)
        self.ctrl = PairController(config, now, epoch=_load_epoch(self.state_dir))
        self.monitor.role, self.monitor.epoch = Role.STANDBY, self.ctrl.epoch
        self.monitor.on_pair = self.on_datagram
        self.monitor.on_peer = self.on_peer
        log.info("controller pair starting", me=self.me_name, peer=self.peer_name, epoch=self.ctrl.epoch,
                 voters=len(self._voters), two_node=config.two_node)
        self._apply(self.ctrl.tick(now))

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.monitor.on_pair = self.monitor.on_peer = None

    @property
    def active(self) -> bool:
        return self.ctrl is not None and self.ctrl.active

    def status(self) -> dict[str, object]:
        ctrl = self.ctrl
        if ctrl is None:
            return {}
        return {"me": self.me_name, "peer": self.peer_name, "phase": ctrl.phase.value, "epoch": ctrl.epoch,
                "peer_reachable": ctrl.peer_reachable, "voters": len(ctrl.config.voters),
                "quorum": ctrl.quorum(self.monitor.now()), "two_node": ctrl.config.two_node}

    # -- inputs -------------------------------------------------------------------------------------------

    def set_voters(self, workers: Iterable[NodeId]) -> None:
        self._voters = frozenset(workers) | {self.monitor.node_id, self.peer_id}
        if self.ctrl is not None:
            self._apply(self.ctrl.set_voters(self.monitor.now(), self._voters))

    def on_peer(self, reachable: bool) -> None:
        if self.ctrl is not None:
            self._apply(self.ctrl.peer_paths(self.monitor.now(), reachable))

    def swact(self) -> str | None:
        """Hand the active role to the peer: None when it started, else why not."""
        if self.ctrl is None:
            return "the controller pair has not started"
        why, effects = self.ctrl.swact(self.monitor.now())
        self._apply(effects)
        return why

    def on_datagram(self, datagram: Datagram, source: Addr, now: Seconds) -> None:
        ctrl = self.ctrl
        if ctrl is None:
            return
        h, lease = datagram.header, datagram.payload.lease
        effects: list[Effect] = []
        if h.msg_type is MsgType.HEARTBEAT:
            if h.sender == self.peer_id:
                effects = ctrl.peer_claim(now, active=h.role is Role.ACTIVE, epoch=h.epoch)
        elif lease is None:
            return
        elif h.msg_type is MsgType.LEASE_GRANT:
            effects = ctrl.granted(now, LeaseGrant(h.sender, lease.candidate, lease.epoch, lease.request_id,
                                                   lease.ttl_ms / 1000))
        elif h.msg_type is MsgType.LEASE_REFUSE:
            effects = ctrl.refused(now, LeaseRefusal(h.sender, lease.candidate, lease.epoch, lease.request_id,
                                                     lease.ttl_ms, "refused"))
        elif h.sender != self.peer_id:
            return
        elif h.msg_type is MsgType.LEASE_REQUEST:
            self._vote(datagram, lease, source, now)
        elif h.msg_type is MsgType.LEASE_RELEASE:
            if lease.kind is LeaseKind.HANDOVER:
                effects = ctrl.handover(now, lease.epoch)
            else:
                ctrl.voter.release(LeaseRelease(lease.candidate, lease.epoch))
        self._apply(effects)

    def _vote(self, datagram: Datagram, lease: LeaseFields, source: Addr, now: Seconds) -> None:
        """The peer asks our voter for an epoch."""
        ctrl = self.ctrl
        assert ctrl is not None
        if lease.candidate != datagram.header.sender:
            return
        holder = ctrl.voter.holder
        hears = holder == self.monitor.node_id or (holder == self.peer_id and ctrl.peer_reachable)
        msg, fields = vote(ctrl.voter, now, lease, hears_holder=hears)
        self.monitor.send_lease(self.peer_id, {datagram.header.path: source}, msg, fields)

    # -- effects ------------------------------------------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        ctrl = self.ctrl
        if ctrl is None:
            return
        me = self.monitor.node_id
        for effect in effects:
            if isinstance(effect, SendLeaseRequest):
                req = effect.request
                fields = LeaseFields(req.candidate, req.epoch, req.request_id, 0, req.kind)
                for voter in ctrl.config.voters - {me}:
                    self.monitor.send_lease(voter, self.monitor.voter_addresses(voter), MsgType.LEASE_REQUEST, fields)
            elif isinstance(effect, SendRelease):
                rel = effect.release
                fields = LeaseFields(rel.holder, rel.epoch, 0, 0, LeaseKind.RENEW)
                for voter in ctrl.config.voters - {me}:
                    self.monitor.send_lease(voter, self.monitor.voter_addresses(voter), MsgType.LEASE_RELEASE, fields)
            elif isinstance(effect, SendHandover):
                fields = LeaseFields(me, effect.epoch, 0, 0, LeaseKind.HANDOVER)
                for _ in range(2):
                    self.monitor.send_lease(effect.to, self.monitor.voter_addresses(effect.to),
                                            MsgType.LEASE_RELEASE, fields)
            elif isinstance(effect, FencePeer):
                self._spawn(self._fence(effect))
            elif isinstance(effect, PersistEpoch):
                write_private(self.state_dir / EPOCH_FILE, f"{effect.epoch}\n")
                log.info("controller pair: asking the voters for an epoch", me=self.me_name, epoch=effect.epoch,
                         kind=ctrl.kind.name.lower(), voters=len(ctrl.config.voters))
            elif isinstance(effect, BecomeActive):
                self.monitor.role, self.monitor.epoch = Role.ACTIVE, effect.epoch
                log.warning("controller pair: active", me=self.me_name, epoch=effect.epoch)
                if self.on_role is not None:
                    self.on_role(True)
            elif isinstance(effect, BecomeStandby):
                was_active = self.monitor.role is Role.ACTIVE
                self.monitor.role, self.monitor.epoch = Role.STANDBY, effect.epoch
                log.warning("controller pair: standby", me=self.me_name, epoch=effect.epoch, reason=effect.reason)
                if was_active and self.on_role is not None:
                    self.on_role(False)
            elif isinstance(effect, Announce):
                self.emit(effect)
            elif isinstance(effect, RaiseAlarm):
                self.emit(effect.alarm)
        # what our heartbeats claim: the epoch we hold while active, else the newest we know of (an
        # election's too, so the peer learns it before our grants arrive)
        self.monitor.epoch = ctrl.target if ctrl.active else ctrl.epoch
        self._schedule()

    async def _fence(self, effect: FencePeer) -> None:
        log.warning("controller pair: fencing the peer", peer=self.peer_name, epoch=effect.epoch,
                    attempt=effect.attempt)
        result = await self.fencer.fence(self.peer_name)
        if self.ctrl is not None:
            self._apply(self.ctrl.fence_result(self.monitor.now(), effect.epoch, result.ok))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _schedule(self) -> None:
        ctrl = self.ctrl
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if ctrl is None:
            return
        deadline = ctrl.next_deadline()
        if deadline is None:
            return
        delay = max(0.0, deadline - self.monitor.now()) + 1e-4
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self.ctrl is not None:
            self._apply(self.ctrl.tick(self.monitor.now()))
