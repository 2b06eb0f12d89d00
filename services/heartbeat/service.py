"""The heartbeat service on a controller: the monitor, fed with inventory's hosts, announcing on the bus.

Start (``HeartbeatService.start``):

1. the cluster keys from the secret store (created on the first start, ``keystore``);
2. a ``roost.fault.reassert`` of nothing: alarms an earlier instance raised (a path down, an auth burst)
   are cleared, and raised again by this one if they still stand;
3. the monitor binds this controller's address on each configured network (``settings.heartbeat``); with
   none configured the service runs, monitors nothing, and says so in its log and its status;
4. the hosts: ``roost.host.*`` events (group ``heartbeat``) and a ``roost.cmd.host.list`` to inventory
   (asked again until it answers), merged by version in a ``HostBook``; every change adds, moves or
   removes a host in the monitor;
5. the agents: each monitored host's agent is told, with ``roost.cmd.agent.heartbeat`` on its own subject,
   its node id, addresses, port and period and the fingerprint of the key; again whenever that changes, and
   while the monitor hears nothing from the host, every ``config_resend``;
6. key rotation (``roost keys rotate``, ``rotate_keys``): the next key (``keystore.begin_rotation``) is
   accepted by the monitor and sent to every agent sealed with the current one; the monitor's keyring makes
   it primary once every monitored host reports holding it, and then it replaces the stored master key
   (``finish_rotation``); the agents' keyrings do the same on their side, and the old key retires once
   nobody signs with it.  A restart in the middle resumes from the stored ``-next`` key.

Out, through the outbox, in the order the monitor decided: ``roost.heartbeat.host_health`` (inventory
turns it into availability and raises 950.002 for a failed host) and ``roost.fault.set|clear`` for the
alarms the monitor raises (950.003 network lost, 950.006 authentication failures, 950.009 multi-node
failure).  The monitor's callbacks are synchronous: they queue, and one writer commits each batch.

The controller pair (``heartbeat.peer`` set): the monitor also heartbeats the other controller's monitor,
and ``pairnode.PairNode`` runs ``pair.PairController`` over the same sockets, the workers' agents voting
(``responder``).  Only the active controller's monitor publishes host health and the network alarms; on
becoming active it reasserts the alarms standing here and republishes every host's verdict.  The pair
announces ``roost.heartbeat.active_controller``, fences the peer through its BMC (``fencing``, from
inventory's sealed ``roost.host.bmc_access``) before a takeover, and carries out ``roost.cmd.heartbeat.swact``
(the standby passes it on by asking for a redelivery, so the active takes it).  Each controller reads the
host events in a consumer group of its own.  An optional witness (``roost heartbeat witness``, configured
with ``heartbeat.witness_node_id`` and ``witness_addresses``) is one more voter: it is heartbeated like a
host, so it knows whom it hears, and never reported to inventory.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any

import asyncpg
import structlog
from fastapi import APIRouter

from schemas import inventory as inv
from schemas.heartbeat import AgentHeartbeatAlarm, AgentHeartbeatConfig, Swact, SwactResult
from services.core.bus.abc import RequestTimeout
from services.core.bus.bus import Message, Reject, RetryLater, is_unhandled
from services.core.host import ServiceContext
from services.core.secrets import SecretStore
from services.core.settings import HeartbeatSettings
from services.heartbeat import metrics
from services.heartbeat.fencing import Fencer
from services.heartbeat.hostbook import Change, HostBook, Target
from services.heartbeat.keystore import ClusterKeys, begin_rotation, ensure_cluster_keys, finish_rotation, seal_next
from services.heartbeat.model import (
    ALARM_AUTH_FAILURES,
    ALARM_FENCE_FAILED,
    ALARM_SPLIT_BRAIN,
    AlarmIntent,
    NodeId,
    Path,
    network_entity,
)
from services.heartbeat.monitor import HealthChange, HeartbeatMonitor
from services.heartbeat.pair import Announce, PairPolicy
from services.heartbeat.pairnode import PairNode
from services.heartbeat.paths import PathPolicy, PathState
from services.heartbeat.transport import PathSpec
from services.heartbeat.verdict import VerdictPolicy
from services.heartbeat.wire import Role
from services.inventory.bmc.vault import FencingSealer

__all__ = ["HeartbeatService", "monitor_node_id"]

log = structlog.get_logger("roost.heartbeat")

NAME = "heartbeat"
GROUP = "heartbeat"
HOST_EVENTS = "roost.host.>"
AGENT_ALARMS = "roost.agent.*.heartbeat_alarm"
COMMANDS = "roost.cmd.heartbeat.>"
WITNESS = "pair-witness"
AGENT_CONFIG = "roost.cmd.agent.heartbeat"


def monitor_node_id(controller: str) -> NodeId:
    """The monitor's node id on ``controller``: above every host's (inventory numbers hosts from 1), and
    distinct from the host's own, since the controller's agent answers as the host.  ``controller-N`` gets
    ``0xF0000000 + N``, so controller-0 has the lower id: the pair prefers it at start-up."""
    match = re.fullmatch(r"controller-(\d{1,6})", controller)
    if match is not None:
        return 0xF000_0000 + int(match.group(1))
    return 0xF100_0000 | (zlib.crc32(f"monitor/{controller}".encode()) & 0x00FF_FFFF)


@dataclass(frozen=True, slots=True)
class _Reassert:
    """Became active: the whole set of heartbeat alarms standing here (``roost.fault.reassert``)."""

    alarms: tuple[AlarmIntent, ...]


_Out = HealthChange | AlarmIntent | Announce | _Reassert
PAIR_ALARMS = frozenset({ALARM_SPLIT_BRAIN, ALARM_FENCE_FAILED})


@dataclass(slots=True)
class _AgentState:
    """What the agent of one monitored host was told, and when."""

    config: AgentHeartbeatConfig | None = None
    acked: AgentHeartbeatConfig | None = None
    sent_at: float = 0.0
    refused: str = ""


class HeartbeatService:
    """The ``heartbeat`` component."""

    name = NAME
    migrations: FsPath | None = None

    def __init__(self, *, config: HeartbeatSettings | None = None, secrets: SecretStore | None = None,
                 path_policy: PathPolicy | None = None, verdict_policy: VerdictPolicy | None = None,
                 list_retry: float = 2.0, config_resend: float = 30.0, config_retry: float = 2.0,
                 request_timeout: float = 5.0, pair_policy: PairPolicy | None = None) -> None:
        self.config = config
        self.pair_policy = pair_policy
        self.secrets = secrets
        self.path_policy = path_policy
        self.verdict_policy = verdict_policy
        self.list_retry = list_retry
        self.config_resend = config_resend
        self.config_retry = config_retry
        self.request_timeout = request_timeout
        self.monitor: HeartbeatMonitor | None = None
        self.book: HostBook | None = None
        self.keys: ClusterKeys | None = None
        self.listed = asyncio.Event()        # inventory's list has been merged
        self._ctx: ServiceContext | None = None
        self._settings = HeartbeatSettings()
        self._out: asyncio.Queue[_Out] = asyncio.Queue()
        self.pair: PairNode | None = None
        self.fencer: Fencer | None = None
        self._standing: dict[tuple[str, str], AlarmIntent] = {}     # the alarms the monitor and pair hold now
        self._workers: frozenset[NodeId] = frozenset()
        self._agents: dict[str, _AgentState] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._unregister_metrics: Any = None
        self._store: SecretStore | None = None
        self._sealed: dict[tuple[str, int], str] = {}
        self._router: APIRouter | None = None

    @property
    def ctx(self) -> ServiceContext:
        if self._ctx is None:
            raise RuntimeError("the heartbeat service has not started")
        return self._ctx

    # -- life cycle -------------------------------------------------------------------------------------

    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        cfg = self._settings = self.config or ctx.settings.heartbeat
        store = self._store = self.secrets or SecretStore.in_data_dir(ctx.settings.data_dir)
        keys, created = await asyncio.to_thread(ensure_cluster_keys, store)
        self.keys = keys
        if created:
            log.info("heartbeat keys created", fingerprint=keys.fingerprint)
        networks = {Path.of(net): addr for net, addr in cfg.addresses.items()}
        self.book = HostBook(own_hostname=cfg.controller, networks=networks)
        state_dir = ctx.settings.data_dir / "heartbeat" / cfg.controller
        await asyncio.to_thread(state_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
        if cfg.peer is not None and (cfg.port == 0 or not cfg.peer_addresses or not networks):
            raise ValueError("heartbeat.peer needs heartbeat.addresses, heartbeat.peer_addresses and a fixed "
                             "heartbeat.port (the peer's monitor listens at the same port)")
        self.monitor = HeartbeatMonitor(
            node_id=monitor_node_id(cfg.controller), cluster_id=keys.cluster_id, master_key=keys.master,
            paths=[PathSpec(p, a, cfg.port, cfg.require_auth.get(p.network, True)) for p, a in networks.items()],
            state_dir=state_dir, hostname=cfg.controller, period=cfg.period, path_policy=self.path_policy,
            verdict_policy=self.verdict_policy, on_health=self._health, on_alarm=self._alarm,
            role=Role.STANDBY if cfg.peer is not None else Role.ACTIVE)
        if keys.next is not None:
            self.monitor.keyring.install(keys.next)
            log.info("heartbeat key rotation resumed", fingerprint=f"{keys.next.key_id:08x}")
        if cfg.witness_node_id is not None:
            if cfg.peer is None or not cfg.witness_addresses:
                raise ValueError("heartbeat.witness_node_id needs heartbeat.peer and heartbeat.witness_addresses")
            # heartbeated like a host, so that it knows whom it hears; never reported to inventory
            self.monitor.add_host(WITNESS, cfg.witness_node_id,
                                  {Path.of(n): a for n, a in cfg.witness_addresses.items()}, port=cfg.agent_port)
        if cfg.peer is not None:
            peer_id = monitor_node_id(cfg.peer)
            self.monitor.set_peer(peer_id, {Path.of(n): a for n, a in cfg.peer_addresses.items()}, port=cfg.port)
            self.fencer = Fencer(FencingSealer.from_store(store), timeout=cfg.fence_timeout)
            self.pair = PairNode(self.monitor, me_name=cfg.controller, peer_name=cfg.peer, peer_id=peer_id,
                                 fencer=self.fencer, state_dir=state_dir, system="roost", emit=self._pair_out,
                                 on_role=self._on_role, policy=self.pair_policy)
        else:
            await self._reassert()      # a controller pair reasserts when it becomes active
        if networks:
            await self.monitor.start()
            if self.pair is not None:
                self.pair.start(self._voters())
        else:
            log.warning("heartbeat: no heartbeat network is configured for this controller "
                        "(heartbeat.addresses): monitoring nothing", controller=cfg.controller)
        self._unregister_metrics = metrics.register(self)
        self._tasks = [asyncio.create_task(self._write_loop(), name="heartbeat-writer"),
                       asyncio.create_task(self._list_hosts(), name="heartbeat-host-list"),
                       asyncio.create_task(self._agent_loop(), name="heartbeat-agent-configs")]
        # with a pair, each controller reads every host event and agent alarm: a group of its own
        group = GROUP if cfg.peer is None else f"{GROUP}-{cfg.controller}"
        await ctx.bus.subscribe(HOST_EVENTS, group, self.on_host_event)
        await ctx.bus.subscribe(AGENT_ALARMS, group, self.on_agent_alarm)
        await ctx.bus.serve(COMMANDS, GROUP, self.command)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.pair is not None:
            await self.pair.stop()
        if self.monitor is not None:
            await self.monitor.stop()
        with contextlib.suppress(Exception):
            await self._flush()
        if self._unregister_metrics is not None:
            self._unregister_metrics()
            self._unregister_metrics = None

    def routers(self) -> Sequence[APIRouter]:
        if self._router is None:
            from services.heartbeat.api import build_router
            self._router = build_router(self)
        return [self._router]

    # -- commands ---------------------------------------------------------------------------------------

    async def command(self, message: Message) -> dict[str, Any]:
        if message.envelope.type == "roost.cmd.heartbeat.status":
            return self.status()
        if message.envelope.type == "roost.cmd.heartbeat.keys_rotate":
            return await self.rotate_keys()
        if message.envelope.type == "roost.cmd.heartbeat.swact":
            return self._swact(message).model_dump(mode="json")
        raise Reject(f"the heartbeat service does not handle {message.envelope.type}")

    def _swact(self, message: Message) -> SwactResult:
        data, pair = message.data, self.pair
        assert isinstance(data, Swact)
        if pair is None:
            raise Reject("no controller pair is configured (heartbeat.peer): there is nothing to swact to")
        if not pair.active:
            if message.attempt >= 5:
                raise Reject(f"{self._settings.controller} is not active, and the active controller did not take "
                             "the swact")
            raise RetryLater(0.2, f"{self._settings.controller} is not the active controller")   # the other takes it
        if data.from_host != self._settings.controller or data.to_host != pair.peer_name:
            raise Reject(f"the active controller is {self._settings.controller} and its peer {pair.peer_name}, "
                         f"not {data.from_host} to {data.to_host}")
        why = pair.swact()
        if why is not None:
            raise Reject(why)
        return SwactResult(active=data.to_host, detail=f"{data.from_host} stepped down and handed over to "
                                                       f"{data.to_host}")

    # -- key rotation -----------------------------------------------------------------------------------

    async def rotate_keys(self) -> dict[str, Any]:
        """Start a rotation (or report the one under way): the next key is accepted here and sent, sealed,
        to every agent; it becomes primary once every monitored host holds it (``_rotation_done``)."""
        store, monitor = self._store, self.monitor
        if store is None or monitor is None:
            raise Reject("the heartbeat service has not started")
        keys = await asyncio.to_thread(begin_rotation, store)
        assert keys.next is not None
        with contextlib.suppress(ValueError):              # installed already: a rotation under way
            for change in monitor.keyring.install(keys.next):
                log.info("heartbeat key rotation started", fingerprint=f"{change.key_id:08x}",
                         generation=change.generation)
        self.keys = keys
        self._refresh_configs()
        return {"fingerprint": f"{keys.next.key_id:08x}", "generation": keys.next.generation,
                "current": keys.fingerprint, "keys": self._key_status()}

    async def _rotation_done(self) -> None:
        keys, monitor, store = self.keys, self.monitor, self._store
        if keys is None or keys.next is None or monitor is None or store is None:
            return
        if monitor.keyring.primary.key_id != keys.next.key_id:
            return
        self.keys = await asyncio.to_thread(finish_rotation, store, keys.next)
        self._sealed.clear()
        log.info("heartbeat key rotation done: every monitored host holds the new key",
                 fingerprint=self.keys.fingerprint, generation=self.keys.master.generation)
        self._refresh_configs()

    def _refresh_configs(self) -> None:
        for uuid, target in self._book.targets.items():
            self._agents.setdefault(uuid, _AgentState()).config = self._agent_config(target)
        self._wake.set()

    # -- the hosts ----------------------------------------------------------------------------------------

    async def on_host_event(self, message: Message) -> None:
        data = message.data
        if isinstance(data, inv.HostEvent):
            self._changed(self._book.apply(data.host))
        elif isinstance(data, inv.HostDeleted):
            self._changed(self._book.delete(data.entity_id, data.version))
        elif isinstance(data, inv.BmcAccess) and self.fencer is not None:
            self.fencer.learn(data)

    @property
    def _book(self) -> HostBook:
        if self.book is None:
            raise RuntimeError("the heartbeat service has not started")
        return self.book

    async def on_agent_alarm(self, message: Message) -> None:
        """An agent's 950.006 (a burst of forged datagrams at the agent), raised or cleared on its own host: the
        agent is the one the subject names (the broker lets it publish only there), its host the one inventory
        says runs that agent; a message cannot name another entity."""
        data = message.data
        if not isinstance(data, AgentHeartbeatAlarm):
            return
        agent = message.subject.split(".")[2]
        target = next((t for t in self._book.targets.values() if t.agent == agent), None)
        if target is None:
            log.warning("heartbeat: an alarm from an agent of no monitored host; dropped", agent=agent)
            return
        self._alarm(AlarmIntent(ALARM_AUTH_FAILURES, network_entity(target.hostname, Path.of(data.network)),
                                data.severity, f"{data.reason} (seen by the agent on {target.hostname})"[:255]))

    async def _list_hosts(self) -> None:
        """Inventory's hosts, asked until it answers (it may start after us)."""
        while True:
            try:
                bus = self.ctx.bus
                reply = await bus.request(bus.envelope("roost.cmd.host.list", inv.HostList(limit=10_000)),
                                          timeout=self.request_timeout)
            except (RequestTimeout, TimeoutError) as exc:
                log.info("heartbeat: inventory did not answer the host list; asking again", error=str(exc))
            else:
                if reply.ok:
                    for host in inv.HostListResult.model_validate(reply.result).items:
                        self._changed(self._book.apply(host))
                    self.listed.set()
                    log.info("heartbeat: hosts listed", hosts=len(self._book.targets))
                    return
                log.info("heartbeat: the host list was refused; asking again", reason=reply.reason)
            await asyncio.sleep(self.list_retry)

    def _changed(self, change: Change | None) -> None:
        if change is None or self.monitor is None:
            return
        before, after = change.before, change.after
        if before is not None and (after is None or before.hostname != after.hostname):
            self.monitor.remove_host(before.hostname)
            self._agents.pop(change.uuid, None)
        if after is not None:
            try:
                self.monitor.add_host(after.hostname, after.node_id, after.addresses, entity_id=after.uuid,
                                      port=self._settings.agent_port)
            except ValueError as exc:
                log.error("heartbeat: cannot monitor host", host=after.hostname, error=str(exc))
                return
            self._agents.setdefault(change.uuid, _AgentState()).config = self._agent_config(after)
            self._wake.set()
        workers = frozenset(t.node_id for t in self._book.targets.values() if t.personality == "worker")
        if workers != self._workers:
            self._workers = workers
            if self.pair is not None:
                self.pair.set_voters(self._voters())

    def _voters(self) -> frozenset[NodeId]:
        """The pair's voters besides the two controllers: the unlocked workers, and the witness if any."""
        witness = self._settings.witness_node_id
        return self._workers | ({witness} if witness is not None else set())

    # -- the agents ---------------------------------------------------------------------------------------

    def _agent_config(self, target: Target) -> AgentHeartbeatConfig | None:
        keys = self.keys
        if target.agent is None or keys is None:
            return None
        cfg = self._settings
        next_key = None
        if keys.next is not None:
            sealed = self._sealed.get((target.hostname, keys.next.key_id))
            if sealed is None:     # sealed once per host and key: a config that changes every time is never acked
                sealed = seal_next(keys.master, keys.next, keys.cluster_id, target.hostname)
                self._sealed[(target.hostname, keys.next.key_id)] = sealed
            next_key = {"generation": keys.next.generation, "fingerprint": f"{keys.next.key_id:08x}", "sealed": sealed}
        return AgentHeartbeatConfig.model_validate({
            "hostname": target.hostname, "node_id": target.node_id, "cluster_id": keys.cluster_id.hex(),
            "key_fingerprint": keys.fingerprint, "addresses": {p.network: a for p, a in target.addresses.items()},
            "port": cfg.agent_port, "period_seconds": cfg.period,
            "require_auth": {p.network: cfg.require_auth.get(p.network, True) for p in target.addresses},
            "next_key": next_key})

    def _heard(self, hostname: str) -> bool:
        monitor = self.monitor
        host = monitor.hosts.get(hostname) if monitor is not None else None
        return host is not None and any(h.state is PathState.UP for h in host.health.values())

    def _due(self, uuid: str, state: _AgentState, now: float) -> bool:
        if state.config is None:
            return False
        if state.acked != state.config:
            return now - state.sent_at >= (self.config_resend if state.refused else self.config_retry)
        target = self._book.targets.get(uuid)
        return target is not None and not self._heard(target.hostname) and now - state.sent_at >= self.config_resend

    async def _agent_loop(self) -> None:
        while True:
            try:
                await self._rotation_done()
            except Exception as exc:         # the store: tried again next round; the monitor keeps both keys
                log.error("heartbeat: cannot finish the key rotation", error=f"{type(exc).__name__}: {exc}")
            now = time.monotonic()
            due = [(uuid, s) for uuid, s in list(self._agents.items()) if self._due(uuid, s, now)]
            if due:
                await asyncio.gather(*(self._send_config(uuid, s) for uuid, s in due))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(self.config_retry, 1.0))

    async def _send_config(self, uuid: str, state: _AgentState) -> None:
        config, target = state.config, self._book.targets.get(uuid)
        if config is None or target is None or target.agent is None:
            return
        state.sent_at = time.monotonic()
        bus = self.ctx.bus
        try:
            reply = await bus.request(bus.envelope(AGENT_CONFIG, config, subject=f"host/{target.hostname}"),
                                      subject=f"roost.cmd.agent.{target.agent}.heartbeat", timeout=self.request_timeout)
        except (RequestTimeout, TimeoutError):
            log.info("heartbeat: the agent did not answer its config", host=target.hostname, agent=target.agent)
            return
        if reply.ok:
            state.acked, state.refused = config, ""
            log.info("heartbeat: agent configured", host=target.hostname, agent=target.agent)
        elif is_unhandled(reply):
            log.debug("heartbeat: the agent is not listening", host=target.hostname, agent=target.agent)
        else:
            if reply.reason != state.refused:
                log.warning("heartbeat: the agent refused its config", host=target.hostname, agent=target.agent,
                            reason=reply.reason)
            state.refused = reply.reason or "refused"

    # -- out ------------------------------------------------------------------------------------------------

    @property
    def publishing(self) -> bool:
        """Whether this monitor's verdicts go out: always alone, only while active in a pair."""
        return self.pair is None or self.pair.active

    def _health(self, change: HealthChange) -> None:
        if self.publishing:
            self._out.put_nowait(change)

    def _alarm(self, intent: AlarmIntent) -> None:
        key = (intent.alarm_id, intent.entity_instance_id)
        if intent.raise_:
            self._standing[key] = intent
        else:
            self._standing.pop(key, None)
        if self.publishing or intent.alarm_id in PAIR_ALARMS:
            self._out.put_nowait(intent)

    def _pair_out(self, item: Announce | AlarmIntent) -> None:
        if isinstance(item, AlarmIntent):
            self._alarm(item)
        else:
            self._out.put_nowait(item)

    def _on_role(self, active: bool) -> None:
        """Became active: take over publishing (every alarm standing here, every host's current verdict)."""
        monitor = self.monitor
        if not active or monitor is None:
            return
        self._out.put_nowait(_Reassert(tuple(self._standing.values())))
        now = monitor.now()
        for host in monitor.hosts.values():
            verdict = monitor.current(host.hostname)
            if verdict is not None:
                host.version += 1
                self._out.put_nowait(HealthChange(verdict, host.entity_id, monitor.version_base + host.version, now))

    async def _reassert(self) -> None:
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            await self.ctx.outbox.add(conn, self.ctx.bus.envelope("roost.fault.reassert", {"alarms": []}))

    async def _write_loop(self) -> None:
        while True:
            first = await self._out.get()
            batch = [first]
            while not self._out.empty() and len(batch) < 256:
                batch.append(self._out.get_nowait())
            while True:
                try:
                    await self._write(batch)
                    break
                except (OSError, asyncpg.PostgresError) as exc:
                    log.warning("heartbeat: cannot write to the outbox; retrying", error=str(exc))
                    await asyncio.sleep(1.0)
                except Exception as exc:       # a bug, not the database: one batch lost, said loudly, not all
                    log.error("heartbeat: a batch of verdicts and alarms could not be written; dropped",
                              error=f"{type(exc).__name__}: {exc}", items=len(batch))
                    break

    async def _flush(self) -> None:
        batch: list[_Out] = []
        while not self._out.empty():
            batch.append(self._out.get_nowait())
        if batch:
            await self._write(batch)

    async def _write(self, batch: list[_Out]) -> None:
        bus, outbox = self.ctx.bus, self.ctx.outbox
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            for item in batch:
                if isinstance(item, Announce):
                    names = self.pair.names if self.pair is not None else {}
                    await outbox.add(conn, bus.envelope("roost.heartbeat.active_controller", item.event(names),
                                                        subject="controller-pair"))
                elif isinstance(item, _Reassert):
                    await outbox.add(conn, bus.envelope("roost.fault.reassert", {"alarms": [
                        {"alarm_id": a.alarm_id, "entity_instance_id": a.entity_instance_id,
                         "severity": a.severity, "reason_text": a.reason[:255]} for a in item.alarms]}))
                elif isinstance(item, HealthChange):
                    if item.entity_id is None:
                        continue
                    if item.verdict.state == "failed":
                        metrics.DETECTION.observe(item.silent_for)
                    await outbox.add(conn, bus.envelope("roost.heartbeat.host_health", item.event(),
                                                        subject=f"host/{item.verdict.hostname}"))
                elif item.raise_:
                    await outbox.add(conn, bus.envelope("roost.fault.set", {
                        "alarm_id": item.alarm_id, "entity_instance_id": item.entity_instance_id,
                        "severity": item.severity, "reason_text": item.reason[:255]}))
                else:
                    await outbox.add(conn, bus.envelope("roost.fault.clear", {
                        "alarm_id": item.alarm_id, "entity_instance_id": item.entity_instance_id}))

    # -- status -----------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``GET /v1/heartbeat/status`` and ``roost heartbeat status`` show."""
        monitor, cfg = self.monitor, self._settings
        hosts: list[dict[str, Any]] = []
        if monitor is not None:
            now = monitor.now() if monitor.node is not None else 0.0
            for hostname, paths in sorted(monitor.status().items()):
                verdict = monitor.current(hostname)
                host = monitor.hosts[hostname]
                agent = self._agents.get(host.entity_id or "")
                hosts.append({
                    "hostname": hostname, "uuid": host.entity_id, "node_id": host.node_id,
                    "state": verdict.state if verdict is not None else "unknown",
                    "agent_configured": bool(agent and agent.acked is not None and agent.acked == agent.config),
                    "agent_refused": agent.refused if agent else "",
                    "paths": {p.network: {"state": s.state.value, "address": host.addresses[p][0],
                                          "for_seconds": round(max(0.0, now - s.since), 3),
                                          "last_heard_seconds_ago": None if s.last_heard is None
                                          else round(max(0.0, now - s.last_heard), 3),
                                          "rtt_ms": None if s.rtt is None else round(s.rtt * 1000, 3)}
                              for p, s in sorted(paths.items())}})
        drops = monitor.drop_counts() if monitor is not None else {}
        return {
            "controller": cfg.controller,
            "node_id": monitor.node_id if monitor is not None else None,
            "networks": {net: f"{addr}:{cfg.port}" for net, addr in sorted(cfg.addresses.items())},
            "period_seconds": cfg.period,
            "key_fingerprint": self.keys.fingerprint if self.keys is not None else None,
            "hosts_listed": self.listed.is_set(),
            "hosts": hosts,
            "rejected": {f"{p.network}/{r.value}": n for (p, r), n in sorted(drops.items(), key=lambda x: str(x))},
            "keys": self._key_status(),
            "pair": self.pair.status() if self.pair is not None else None,
            "bmcs_known": self.fencer.known() if self.fencer is not None else [],
        }

    def _key_status(self) -> list[dict[str, Any]]:
        monitor = self.monitor
        if monitor is None:
            return []
        names = {h.node_id: h.hostname for h in monitor.hosts.values()}

        def hosts(ids: frozenset[NodeId]) -> list[str]:
            return sorted(names.get(i, f"node-{i}") for i in ids)

        return [{"fingerprint": f"{k.key_id:08x}", "generation": k.generation, "state": k.state.value,
                 "held_by": hosts(k.holders), "missing_at": hosts(k.missing)} for k in monitor.keyring.status().keys]
