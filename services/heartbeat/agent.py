"""The heartbeat on a host's agent: told by the heartbeat service what to answer as, it runs a responder.

:class:`HeartbeatAgentComponent` is an ``AgentComponent``.  At start it registers the handler of
``roost.cmd.agent.heartbeat`` (:class:`~schemas.heartbeat.AgentHeartbeatConfig`: the host's node id,
its address per network, the port, the period, the cluster id and the fingerprint of the key the monitors
sign with), and, when an earlier run left a config in ``state_dir``, answers at once with it, before the
heartbeat service has said anything: an agent that restarts is heard again within a period or two.

A config is checked before anything changes (the cluster id must be the one this agent was enrolled
with, and the key the monitors sign with one it holds; an agent enrolled into another cluster, or that
missed a whole key rotation, refuses with the reason, and the operator re-enrols it).  Then it is written
to disk (atomically, ``0600``) and the responder restarted with it if it differs from the running one.  A
repeated config changes nothing.

Keys: the agent's credentials hold the master key of its enrolment (``keystore.ClusterKeys``).  During a
rotation the config carries the next key sealed with the current one (``NextKey``): the agent opens it,
keeps it in ``state_dir`` (``heartbeat-keys.json``, ``0600``, so a restart still has it) and installs it in
the running responder's keyring as accepted; the keyring makes it primary once the monitors report holding
it, and they do the same (``keys.Keyring``).  No key travels in clear.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from pathlib import Path as FsPath
from typing import TYPE_CHECKING

import structlog
from pydantic import ValidationError

from schemas.heartbeat import AgentHeartbeatAlarm, AgentHeartbeatApplied, AgentHeartbeatConfig
from services.core.bus.bus import Message, Reject
from services.core.files import write_private
from services.heartbeat.keys import Keyring, MasterKey
from services.heartbeat.keystore import ClusterKeys, KeyStoreError, unseal_next
from services.heartbeat.model import AlarmIntent, Path
from services.heartbeat.responder import HeartbeatResponder
from services.heartbeat.transport import PathSpec, SocketFilter

if TYPE_CHECKING:
    from services.inventory.agent.agent import HostAgent

__all__ = ["CONFIG_COMMAND", "HeartbeatAgentComponent"]

log = structlog.get_logger("roost.heartbeat.agent")

CONFIG_COMMAND = "roost.cmd.agent.heartbeat"
CONFIG_FILE = "heartbeat-config.json"
KEYS_FILE = "heartbeat-keys.json"
KEEP_GENERATIONS = 2


class HeartbeatAgentComponent:
    name = "heartbeat"

    def __init__(self, keys: ClusterKeys, state_dir: FsPath | str,
                 socket_filters: dict[Path, SocketFilter] | None = None) -> None:
        self.keys = keys
        self.masters: dict[int, MasterKey] = {keys.master.key_id: keys.master}
        self.state_dir = FsPath(state_dir)
        self.socket_filters = socket_filters or {}
        self.config: AgentHeartbeatConfig | None = None
        self.responder: HeartbeatResponder | None = None
        self.applied = asyncio.Event()
        self._lock = asyncio.Lock()
        self._hostname = ""
        self._agent: HostAgent | None = None
        self._pending: set[asyncio.Future[None]] = set()

    @property
    def config_path(self) -> FsPath:
        return self.state_dir / CONFIG_FILE

    async def start(self, agent: HostAgent) -> None:
        self._hostname = agent.name
        self._agent = agent
        agent.handle(CONFIG_COMMAND, self._on_config)
        self._load_keys()
        saved = self._load_saved()
        if saved is not None:
            try:
                await self._apply(saved)
            except Exception as exc:      # a saved config that no longer binds: wait for a fresh one
                log.warning("heartbeat: the saved config cannot be used; waiting for the heartbeat service",
                            error=f"{type(exc).__name__}: {exc}")

    def _alarm(self, intent: AlarmIntent) -> None:
        """950.006 on one of our networks (raised or cleared): to the heartbeat service, which owns the alarm."""
        agent = self._agent
        network = intent.entity_instance_id.rpartition(".network=")[2]
        if agent is None or network not in ("mgmt", "cluster-host", "oam"):
            return
        data = AgentHeartbeatAlarm.model_validate({"network": network, "severity": intent.severity,
                                                   "reason": intent.reason[:255]})
        task = asyncio.ensure_future(self._publish_alarm(agent, data))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish_alarm(self, agent: HostAgent, data: AgentHeartbeatAlarm) -> None:
        envelope = agent.bus.envelope("roost.agent.heartbeat_alarm", data, subject=f"agent/{agent.name}")
        try:
            await agent.bus.publish(envelope, subject=agent.subject("heartbeat_alarm"))
        except Exception as exc:         # the bus away: the responder raises it again while the burst lasts
            log.warning("heartbeat: cannot report an authentication-failure burst", error=type(exc).__name__)

    async def stop(self) -> None:
        for task in list(self._pending):
            task.cancel()
        async with self._lock:
            if self.responder is not None:
                await self.responder.stop()
                self.responder = None

    def _load_saved(self) -> AgentHeartbeatConfig | None:
        try:
            raw = self.config_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("heartbeat: cannot read the saved config", path=str(self.config_path), error=exc.strerror)
            return None
        try:
            return AgentHeartbeatConfig.model_validate_json(raw)
        except ValidationError as exc:
            log.warning("heartbeat: the saved config is invalid; ignored", path=str(self.config_path),
                        errors=exc.error_count())
            return None

    @property
    def fingerprints(self) -> list[str]:
        return [f"{m.key_id:08x}" for m in sorted(self.masters.values(), key=lambda m: m.generation)]

    def _load_keys(self) -> None:
        """The keys an earlier run received in rotations (newer than the credentials')."""
        try:
            raw = json.loads((self.state_dir / KEYS_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("heartbeat: cannot read the saved keys; using the enrolment's", error=type(exc).__name__)
            return
        if not isinstance(raw, dict) or raw.get("cluster_id") != self.keys.cluster_id.hex():
            return
        for item in raw.get("keys", []):
            try:
                keys = ClusterKeys.from_credentials({"cluster_id": raw["cluster_id"], "master_key": item["key"],
                                                     "generation": item["generation"]}, where=str(KEYS_FILE))
            except (KeyStoreError, KeyError, TypeError):
                log.warning("heartbeat: a saved key is malformed; ignored")
                continue
            self.masters[keys.master.key_id] = keys.master

    def _save_keys(self) -> None:
        newest = sorted(self.masters.values(), key=lambda m: m.generation)[-KEEP_GENERATIONS:]
        body = {"cluster_id": self.keys.cluster_id.hex(),
                "keys": [{"generation": m.generation, "key": base64.b64encode(m.secret).decode()} for m in newest]}
        write_private(self.state_dir / KEYS_FILE, json.dumps(body) + "\n")

    def check(self, config: AgentHeartbeatConfig) -> str | None:
        """Why this agent cannot answer as ``config`` says, or None."""
        if config.cluster_id != self.keys.cluster_id.hex():
            return ("the heartbeat service belongs to another cluster than the keys this agent was enrolled "
                    "with: re-enrol the agent (`roost agent enroll --rotate`)")
        if config.key_fingerprint not in self.fingerprints:
            return (f"the monitors sign with key {config.key_fingerprint}, this agent holds "
                    f"{', '.join(self.fingerprints)}: re-enrol the agent to give it the current key")
        return None

    async def _on_config(self, message: Message) -> AgentHeartbeatApplied:
        config = message.data
        assert isinstance(config, AgentHeartbeatConfig)
        why = self.check(config)
        if why is not None:
            log.warning("heartbeat config refused", reason=why)
            raise Reject(why)
        try:
            await self._apply(config)
        except OSError as exc:
            raise Reject(f"cannot bind the heartbeat addresses: {exc.strerror or exc}") from None
        signing = self.responder.keyring.primary.key_id if self.responder is not None else self.keys.master.key_id
        return AgentHeartbeatApplied(paths=sorted(config.addresses), key_fingerprint=f"{signing:08x}")

    def _receive_next(self, config: AgentHeartbeatConfig) -> MasterKey | None:
        nxt = config.next_key
        if nxt is None:
            return None
        known = self.masters.get(int(nxt.fingerprint, 16))
        if known is not None:
            return known
        current = self.masters[int(config.key_fingerprint, 16)]
        try:
            master = unseal_next(current, nxt.sealed, nxt.generation, self.keys.cluster_id, config.hostname)
        except KeyStoreError as exc:
            raise Reject(str(exc)) from None
        if f"{master.key_id:08x}" != nxt.fingerprint:
            raise Reject("the next key opened, but its fingerprint is not the one announced")
        self.masters[master.key_id] = master
        self._save_keys()
        log.info("heartbeat: next key received", fingerprint=nxt.fingerprint, generation=nxt.generation)
        return master

    def _keyring(self, config: AgentHeartbeatConfig) -> Keyring:
        primary = self.masters[int(config.key_fingerprint, 16)]
        keyring = Keyring(self.keys.cluster_id, primary)
        for master in sorted(self.masters.values(), key=lambda m: m.generation):
            if master.generation > primary.generation:
                keyring.install(master)
        return keyring

    @staticmethod
    def _sockets(config: AgentHeartbeatConfig) -> AgentHeartbeatConfig:
        """What needs a new responder when it changes: everything but the keys."""
        return config.model_copy(update={"next_key": None, "key_fingerprint": "00000000"})

    async def _apply(self, config: AgentHeartbeatConfig) -> None:
        if self.check(config) is not None:
            raise ValueError(self.check(config))
        async with self._lock:
            if config == self.config and self.responder is not None:
                return
            upcoming = await asyncio.to_thread(self._receive_next, config)
            await asyncio.to_thread(write_private, self.config_path, config.model_dump_json(indent=2) + "\n")
            running = self.responder
            if running is not None and self.config is not None and self._sockets(config) == self._sockets(self.config):
                if upcoming is not None:
                    with contextlib.suppress(ValueError):   # an older generation than one it holds: nothing to do
                        running.keyring.install(upcoming)
                self.config = config
                return
            if running is not None:
                await running.stop()
                self.responder = None
            specs = [PathSpec(Path.of(net), str(ip), config.port, config.require_auth.get(net, True))
                     for net, ip in sorted(config.addresses.items())]
            responder = HeartbeatResponder(node_id=config.node_id, cluster_id=self.keys.cluster_id,
                                           master_key=self._keyring(config), paths=specs, state_dir=self.state_dir,
                                           hostname=config.hostname, on_alarm=self._alarm)
            await responder.start()
            for path, endpoint in responder.endpoints.items():
                endpoint.filter = self.socket_filters.get(path, endpoint.filter)
            self.responder = responder
            self.config = config
            self.applied.set()
            log.info("heartbeat answering", host=config.hostname, node_id=config.node_id,
                     paths={n: str(a) for n, a in config.addresses.items()}, port=config.port)
