"""The heartbeat on a host's agent: told by the heartbeat service what to answer as, it runs a responder.

:class:`HeartbeatAgentComponent` is an ``AgentComponent``.  At start it registers the handler of
``roost.cmd.agent.heartbeat`` (:class:`~schemas.heartbeat.AgentHeartbeatConfig`: the host's node id,
its address per network, the port, the period, the cluster id and the fingerprint of the key the monitors
sign with), and, when an earlier run left a config in ``state_dir``, answers at once with it, before the
heartbeat service has said anything: an agent that restarts is heard again within a period or two.

A config is checked before anything changes (the cluster id and the key fingerprint must be those of the
keys this agent was enrolled with; an agent enrolled into another cluster, or before a key rotation it
missed, refuses with the reason, and the operator re-enrols it).  Then it is written to disk (atomically,
``0600``) and the responder restarted with it if it differs from the running one.  A repeated config
changes nothing.  The keys come from the agent's credentials (``keystore.ClusterKeys``); no key travels
on the bus.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path as FsPath
from typing import TYPE_CHECKING

import structlog
from pydantic import ValidationError

from schemas.heartbeat import AgentHeartbeatApplied, AgentHeartbeatConfig
from services.core.bus.bus import Message, Reject
from services.core.files import write_private
from services.heartbeat.keystore import ClusterKeys
from services.heartbeat.model import Path
from services.heartbeat.responder import HeartbeatResponder
from services.heartbeat.transport import PathSpec, SocketFilter

if TYPE_CHECKING:
    from services.inventory.agent.agent import HostAgent

__all__ = ["CONFIG_COMMAND", "HeartbeatAgentComponent"]

log = structlog.get_logger("roost.heartbeat.agent")

CONFIG_COMMAND = "roost.cmd.agent.heartbeat"
CONFIG_FILE = "heartbeat-config.json"


class HeartbeatAgentComponent:
    name = "heartbeat"

    def __init__(self, keys: ClusterKeys, state_dir: FsPath | str,
                 socket_filters: dict[Path, SocketFilter] | None = None) -> None:
        self.keys = keys
        self.state_dir = FsPath(state_dir)
        self.socket_filters = socket_filters or {}
        self.config: AgentHeartbeatConfig | None = None
        self.responder: HeartbeatResponder | None = None
        self.applied = asyncio.Event()
        self._lock = asyncio.Lock()
        self._hostname = ""

    @property
    def config_path(self) -> FsPath:
        return self.state_dir / CONFIG_FILE

    async def start(self, agent: HostAgent) -> None:
        self._hostname = agent.name
        agent.handle(CONFIG_COMMAND, self._on_config)
        saved = self._load_saved()
        if saved is not None:
            try:
                await self._apply(saved)
            except Exception as exc:      # a saved config that no longer binds: wait for a fresh one
                log.warning("heartbeat: the saved config cannot be used; waiting for the heartbeat service",
                            error=f"{type(exc).__name__}: {exc}")

    async def stop(self) -> None:
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

    def check(self, config: AgentHeartbeatConfig) -> str | None:
        """Why this agent cannot answer as ``config`` says, or None."""
        if config.cluster_id != self.keys.cluster_id.hex():
            return ("the heartbeat service belongs to another cluster than the keys this agent was enrolled "
                    "with: re-enrol the agent (`roost agent enroll --rotate`)")
        if config.key_fingerprint != self.keys.fingerprint:
            return (f"the monitors sign with key {config.key_fingerprint}, this agent holds {self.keys.fingerprint}: "
                    "re-enrol the agent to give it the current key")
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
        return AgentHeartbeatApplied(paths=sorted(config.addresses), key_fingerprint=self.keys.fingerprint)

    async def _apply(self, config: AgentHeartbeatConfig) -> None:
        if self.check(config) is not None:
            raise ValueError(self.check(config))
        async with self._lock:
            if config == self.config and self.responder is not None:
                return
            await asyncio.to_thread(write_private, self.config_path, config.model_dump_json(indent=2) + "\n")
            if self.responder is not None:
                await self.responder.stop()
                self.responder = None
            specs = [PathSpec(Path.of(net), str(ip), config.port, config.require_auth.get(net, True))
                     for net, ip in sorted(config.addresses.items())]
            responder = HeartbeatResponder(node_id=config.node_id, cluster_id=self.keys.cluster_id,
                                           master_key=self.keys.master, paths=specs, state_dir=self.state_dir,
                                           hostname=config.hostname)
            await responder.start()
            for path, endpoint in responder.endpoints.items():
                endpoint.filter = self.socket_filters.get(path, endpoint.filter)
            self.responder = responder
            self.config = config
            self.applied.set()
            log.info("heartbeat answering", host=config.hostname, node_id=config.node_id,
                     paths={n: str(a) for n, a in config.addresses.items()}, port=config.port)


def saved_config(state_dir: FsPath | str) -> dict[str, object] | None:
    """The config a previous run saved (for ``roost agent`` diagnostics)."""
    try:
        value = json.loads((FsPath(state_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
