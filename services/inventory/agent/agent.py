"""``HostAgent``: the process on every host that tells roost what the host is.

It logs in to the bus as its own broker user ``agent-<name>`` (``services.core.brokerauth.agent``: it may
publish only ``roost.agent.<name>.>`` and read only ``roost.cmd.agent.<name>.>``) and publishes, on its own
subjects:

* ``roost.agent.hello`` on ``roost.agent.<name>.hello``: at start and every ``interval`` seconds (the MACs
  of its NICs, its boot id and uptime, the interval, so a listener knows when to expect the next one);
* ``roost.agent.inventory`` on ``roost.agent.<name>.inventory``: at start, whenever the hardware changed
  since the last report that was stored (volatile values such as the memory available do not count as a
  change), after a report that failed, and at least every ``inventory_every`` hellos (so an inventory
  service that lost its state, or started after the agent, learns the hardware without asking).

A broker that is away is not fatal: the first connection is retried with a growing pause, and once
connected the transport reconnects by itself; a publish that fails is logged and tried again on the next
tick.  ``stop()`` (or SIGTERM / SIGINT with ``run_until_signalled``) ends the loop (a tick under way gets
``stop_grace`` seconds to finish, then is abandoned); the components stop, then the connection closes.

Extension points for the heartbeat and orchestrator issues: ``components`` (``AgentComponent``: started
once connected, stopped before the connection closes; they get the agent, so its ``bus``, ``name``,
``subject()`` and last ``machine``), and ``tick()`` is one step of the loop.

Commands to the agent: a component registers a handler for a command type with :meth:`HostAgent.handle`
during its ``start``; once the components are started the agent serves ``roost.cmd.agent.<name>.>`` (one
consumer, its group is its broker user) and hands each command to the handler of its type.  The agent has
no access to the API tokens, so it does not check the sender's token (:class:`BrokerPolicyAuthenticator`):
the broker policy is what lets only roost's services and its operators publish on those subjects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import structlog
from pydantic import SecretStr

from schemas.envelope import Principal, Role
from schemas.inventory import AgentHello, AgentInventory, Hardware
from services.core.brokerauth import agent_user
from services.core.bus.abc import BusError, NotConnected, Transport
from services.core.bus.bus import Bus, CommandHandler, Message, Reject
from services.core.bus.bus import CommandResult as _CommandResult
from services.core.bus.factory import transport_from_url
from services.core.logging import register_secret
from services.core.runner import roost_version
from services.core.settings import mask_url, url_with_credentials
from services.inventory.agent.discovery import Machine, discover

__all__ = ["AgentComponent", "BrokerPolicyAuthenticator", "HostAgent", "TickReport", "hardware_fingerprint"]

log = structlog.get_logger("roost.agent")

HELLO = "roost.agent.hello"
INVENTORY = "roost.agent.inventory"


class AgentComponent(Protocol):
    """Something the agent runs while it is connected (the heartbeat sender, the update applier)."""

    name: str

    async def start(self, agent: HostAgent) -> None:
        """Start; return once running.  An exception stops the agent."""

    async def stop(self) -> None:
        """Stop; called once, also when ``start`` failed half-way."""


class BrokerPolicyAuthenticator:
    """The agent's side of command authentication: whoever the broker let publish on the agent's command
    subjects (``services.core.brokerauth``: roost's services and its operators) is trusted as a service."""

    PRINCIPAL = Principal(name="roost-bus", role=Role.ADMIN, kind="service")

    async def authenticate(self, token: str) -> Principal | None:
        return self.PRINCIPAL if token else None


def hardware_fingerprint(hardware: Hardware) -> str:
    """What must differ for the hardware to count as changed: everything but the time of the report and
    the memory available right now."""
    data = hardware.model_dump(mode="json", exclude={"reported_at"})
    if isinstance(data.get("memory"), dict):
        data["memory"].pop("available_mib", None)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class TickReport:
    """What one tick published (True: the broker stored it)."""

    hello: bool
    inventory: bool
    inventory_due: bool


class HostAgent:
    """One host's agent.  ``bus_url`` without credentials plus ``password`` (the agent logs in as
    ``agent-<name>``), or a URL that already holds that user and its password, or neither (a broker
    without authentication, in tests).  ``transport`` replaces the one made from the URL (unit tests)."""

    def __init__(self, name: str, bus_url: str, *, password: str | SecretStr | None = None,
                 interval: float = 30.0, root: Path | str = "/", inventory_every: int = 10,
                 include_virtual_ports: bool = False, ssl_context: ssl.SSLContext | None = None,
                 components: Sequence[AgentComponent] = (), publish_timeout: float = 10.0,
                 connect_backoff: tuple[float, float] = (1.0, 30.0), stop_grace: float = 2.0,
                 transport: Transport | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.user = agent_user(name)                    # PolicyError (a ValueError) for a bad name
        self.name = name
        if not 0 < interval <= 3600:
            raise ValueError("interval must be more than 0 and at most 3600 seconds")
        if inventory_every < 1:
            raise ValueError("inventory_every must be at least 1")
        self.interval = float(interval)
        self.root = Path(root)
        self.inventory_every = inventory_every
        self.include_virtual_ports = include_virtual_ports
        self.components: list[AgentComponent] = list(components)
        self.connect_backoff = connect_backoff
        self.stop_grace = stop_grace
        self._clock = clock
        self._url = self._login_url(bus_url, password)
        if transport is None:
            transport = transport_from_url(self._url, ssl_context=ssl_context)
        self.bus = Bus(transport, source=f"roost/agent/{name}", publish_timeout=publish_timeout,
                       authenticator=BrokerPolicyAuthenticator())
        self._handlers: dict[str, CommandHandler] = {}
        self.machine: Machine | None = None             # the last look at the machine
        self.hellos_sent = 0
        self.inventories_sent = 0
        self.connected = asyncio.Event()                # set once the first connection is up
        self._stop = asyncio.Event()
        self._reported: str | None = None                # fingerprint of the last inventory stored
        self._hellos_since_inventory = 0
        self._started: list[AgentComponent] = []

    def _login_url(self, bus_url: str, password: str | SecretStr | None) -> str:
        parts = urlsplit(bus_url)
        given = unquote(parts.username) if parts.username else None
        if given is not None and given != self.user:
            raise ValueError(f"the bus URL logs in as {given}, but agent {self.name} is {self.user}")
        if password is None:
            if parts.password:
                register_secret(unquote(parts.password))
            return bus_url
        secret = password.get_secret_value() if isinstance(password, SecretStr) else password
        register_secret(secret)
        return url_with_credentials(bus_url, self.user, secret)

    @property
    def where(self) -> str:
        """The bus URL, safe to show (password masked)."""
        return mask_url(self._url)

    def subject(self, kind: str) -> str:
        """The agent's own subject for ``kind``: ``roost.agent.<name>.<kind>``."""
        return f"roost.agent.{self.name}.{kind}"

    # -- life cycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the agent to stop (after the tick under way).  Safe from a signal handler of its loop."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        """Connect (retrying until it works or ``stop()``), start the components, then hello and
        inventory every ``interval`` until ``stop()``.  Returns once everything is stopped and closed."""
        log.info("agent starting", agent=self.name, bus=self.where, interval=self.interval)
        try:
            if not await self._connect():
                return
            self.connected.set()
            for component in self.components:
                self._started.append(component)
                await component.start(self)
            if self._handlers:
                await self.bus.serve(f"roost.cmd.agent.{self.name}.>", self.user, self._command)
            while not self._stop.is_set():
                started = time.monotonic()
                await self._tick_or_stop()
                await self._sleep(self.interval - (time.monotonic() - started))
        finally:
            await self._shutdown()
            log.info("agent stopped", agent=self.name, hellos=self.hellos_sent, inventories=self.inventories_sent)

    async def run_until_signalled(self) -> None:
        """``run()``, stopping cleanly on SIGTERM or SIGINT (from the main thread)."""
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
                installed.append(signum)
        try:
            await self.run()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    def _on_signal(self, signum: signal.Signals) -> None:
        log.info("agent stopping", agent=self.name, signal=signum.name)
        self.stop()

    async def _tick_or_stop(self) -> None:
        """One tick; a stop asked meanwhile waits ``stop_grace`` seconds for it, then cancels it (a report
        the broker is slow to take, e.g. while its stream is missing, must not hold up a SIGTERM)."""
        tick = asyncio.create_task(self.tick(), name=f"agent-{self.name}-tick")
        stopped = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({tick, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not tick.done():
                await asyncio.wait({tick}, timeout=self.stop_grace)
        finally:
            stopped.cancel()
            if not tick.done():
                tick.cancel()
                log.info("agent report abandoned: stopping", agent=self.name)
            await asyncio.gather(tick, stopped, return_exceptions=True)

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _connect(self) -> bool:
        pause, cap = self.connect_backoff
        while not self._stop.is_set():
            try:
                await self.bus.connect()
                log.info("agent connected", agent=self.name, bus=self.where)
                return True
            except NotConnected as exc:
                log.warning("agent cannot reach the bus; trying again", agent=self.name, error=str(exc),
                            retry_in=pause)
            await self._sleep(pause)
            pause = min(cap, pause * 2)
        return False

    async def _shutdown(self) -> None:
        for component in reversed(self._started):
            try:
                await component.stop()
            except Exception as exc:
                log.error("agent component did not stop cleanly", agent=self.name, component=component.name,
                          error=f"{type(exc).__name__}: {exc}")
        self._started.clear()
        with contextlib.suppress(Exception):
            await self.bus.close()

    # -- commands -------------------------------------------------------------------------------

    def handle(self, command_type: str, handler: CommandHandler) -> None:
        """Hand commands of ``command_type`` sent to this agent to ``handler`` (call it from ``start``)."""
        if command_type in self._handlers:
            raise ValueError(f"{command_type} already has a handler on agent {self.name}")
        self._handlers[command_type] = handler

    async def _command(self, message: Message) -> _CommandResult:
        handler = self._handlers.get(message.envelope.type)
        if handler is None:
            raise Reject(f"agent {self.name} does not handle {message.envelope.type}")
        return await handler(message)

    # -- one step -----------------------------------------------------------------------------

    async def look(self) -> Machine:
        """Read the machine (off the event loop: sysfs reads can block on a sick device)."""
        machine = await asyncio.to_thread(discover, self.root, now=self._clock(),
                                          include_virtual_ports=self.include_virtual_ports)
        self.machine = machine
        return machine

    def hello(self, machine: Machine) -> AgentHello:
        return AgentHello(agent=self.name, os_hostname=machine.os_hostname, macs=machine.macs,
                          boot_id=machine.boot_id, uptime_seconds=machine.uptime_seconds,
                          agent_version=roost_version()[:64], interval_seconds=self.interval)

    def inventory_due(self, machine: Machine) -> bool:
        """At start, after a change or a failed report, and every ``inventory_every`` hellos."""
        return (self._reported is None or hardware_fingerprint(machine.hardware) != self._reported
                or self._hellos_since_inventory >= self.inventory_every)

    async def tick(self) -> TickReport:
        """Look at the machine, say hello, and report the hardware when it is due."""
        try:
            machine = await self.look()
        except Exception as exc:             # discovery never raises for a missing file; a bug must not kill us
            log.error("agent cannot read the machine", agent=self.name, error=f"{type(exc).__name__}: {exc}")
            return TickReport(hello=False, inventory=False, inventory_due=False)
        hello = await self._publish(HELLO, self.hello(machine), "hello")
        if hello:
            self.hellos_sent += 1
            self._hellos_since_inventory += 1
        due = self.inventory_due(machine)
        stored = False
        if due:
            stored = await self._publish(INVENTORY, AgentInventory(agent=self.name, hardware=machine.hardware),
                                         "inventory")
            if stored:
                self.inventories_sent += 1
                self._reported = hardware_fingerprint(machine.hardware)
                self._hellos_since_inventory = 0
        return TickReport(hello=hello, inventory=stored, inventory_due=due)

    async def _publish(self, type_: str, data: AgentHello | AgentInventory, kind: str) -> bool:
        envelope = self.bus.envelope(type_, data, subject=f"agent/{self.name}")
        try:
            await self.bus.publish(envelope, subject=self.subject(kind))
        except (BusError, TimeoutError, OSError) as exc:
            log.warning("agent report not stored; trying again next time", agent=self.name, type=type_,
                        error=str(exc) or type(exc).__name__)
            return False
        log.debug("agent report stored", agent=self.name, type=type_)
        return True
