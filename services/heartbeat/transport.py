"""The UDP edge of the heartbeat: one asyncio datagram endpoint per path, and the boot counter on disk.

A :class:`PathEndpoint` is a socket bound to this node's own address on one heartbeat network (as inventory
records it in ``Host.addresses``).  Every datagram that arrives goes, in the order the package docstring
gives, through

1. ``wire.verify_then_parse`` with the path's configured ``require_auth`` (the MAC first, in constant time);
2. the owner's ``accept`` check (is the sender a node we talk to, in the right role?), before any per-sender
   state exists for it, so a forger on a path without authentication cannot grow the replay table;
3. ``ReplayGuard.admit``;

and every drop is counted with ``DropCounter.record`` (attributed to the known host whose address sent it,
else to this node), whose 950.006 intents go to ``on_alarm``.  Only then does the owner's ``handler`` see
a :class:`~services.heartbeat.wire.Datagram`.  Nothing raises out of the protocol: a handler that fails is
logged (type only) and counted as ``handler_errors``.

Sending: :meth:`PathEndpoint.send` numbers the datagram from the path's :class:`SendSequence` (which refuses
until the boot counter is persisted) and signs it with the keyring's primary key for the path (unsigned
only without a keyring).  :func:`load_boot_counter` reads, increments and persists (``write_private``:
fsync, rename, directory fsync) the counter before anything is sent.

:class:`SocketFilter` is the drop filter in the socket layer that tests and benchmarks cut paths with
(inbound, outbound, random loss), and a tap on what is sent (a capture for replay tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any, Self

import structlog

from services.core.files import write_private
from services.core.logging import register_secret
from services.heartbeat.drops import BurstPolicy, DropCounter, DropReason
from services.heartbeat.keys import Keyring, MasterKey
from services.heartbeat.model import AlarmIntent, NodeId, Path, Seconds
from services.heartbeat.replay import BootCounter, ReplayGuard, SendSequence
from services.heartbeat.wire import (
    Datagram,
    Header,
    KeyReport,
    MsgType,
    Payload,
    Role,
    encode,
    verify_then_parse,
)

__all__ = [
    "DEFAULT_PORT",
    "Addr",
    "BootCounterError",
    "Clock",
    "NodeContext",
    "PathEndpoint",
    "PathNode",
    "PathSpec",
    "SocketFilter",
    "load_boot_counter",
]

log = structlog.get_logger("roost.heartbeat.transport")

DRAIN_BATCH = 256          # datagrams read per wake-up at most, so other callbacks are not starved
RECV_BYTES = 2048          # more than wire.MAX_DATAGRAM: a longer one is read whole and dropped as OVERSIZE

DEFAULT_PORT = 2223
"""The agents' heartbeat port on every path (a cluster-wide constant; monitors may bind any port)."""

Addr = tuple[str, int]
Clock = Callable[[], Seconds]
BOOT_COUNTER_FILE = "heartbeat-boot-counter"


# -- the boot counter -----------------------------------------------------------------------------------


class BootCounterError(RuntimeError):
    """The persisted boot counter cannot be read: refuse to send rather than reuse a counter."""


def _load_boot_counter(path: FsPath) -> BootCounter:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        stored: int | None = None
    except OSError as e:
        raise BootCounterError(f"cannot read the boot counter {path}: {e.strerror}") from None
    else:
        if not text.isdigit():
            raise BootCounterError(f"the boot counter {path} is not a number: repair or remove it "
                                   "(removing it restarts at 1: peers then see a boot clash)")
        stored = int(text)
    counter = BootCounter(stored)
    write_private(path, f"{counter.to_store}\n")
    counter.persisted(counter.to_store)
    return counter


async def load_boot_counter(directory: FsPath | str, name: str = BOOT_COUNTER_FILE) -> BootCounter:
    """The boot counter for this process start: the stored one plus one, persisted (fsync) before it is
    returned, so ``may_send`` is true.  The file I/O runs in a thread."""
    return await asyncio.to_thread(_load_boot_counter, FsPath(directory) / name)


# -- what a node shares across its paths -----------------------------------------------------------------


@dataclass(slots=True)
class NodeContext:
    """This node's heartbeat identity and the per-node state every path endpoint shares."""

    node_id: NodeId
    cluster_id: bytes
    keyring: Keyring | None
    boot: BootCounter
    hostname: str = ""                      # whom drops are attributed to when no known host sent them
    boot_id: bytes = field(default_factory=lambda: os.urandom(8))
    replay: ReplayGuard = field(default_factory=ReplayGuard)
    drops: DropCounter = field(default_factory=DropCounter)
    clock: Clock = field(default_factory=lambda: asyncio.get_running_loop().time)
    on_alarm: Callable[[AlarmIntent], None] | None = None

    def __repr__(self) -> str:
        return f"NodeContext(node_id={self.node_id}, boot={self.boot.value}, keyring={self.keyring!r})"


@dataclass(frozen=True, slots=True)
class PathSpec:
    """One path of this node: the address (and port: 0 picks one) to bind, and whether a MAC is required."""

    path: Path
    address: str
    port: int = DEFAULT_PORT
    require_auth: bool = True


@dataclass(slots=True)
class SocketFilter:
    """A drop filter in the socket layer (tests, chaos runs, benchmarks) and a tap on what is sent."""

    drop_in: bool = False
    drop_out: bool = False
    loss: float = 0.0                        # the probability of losing each datagram, either way
    rng: random.Random = field(default_factory=random.Random)
    tap: Callable[[bytes, Addr], None] | None = None

    def cut(self) -> None:
        self.drop_in = self.drop_out = True

    def heal(self) -> None:
        self.drop_in = self.drop_out = False

    def passes_in(self) -> bool:
        return not self.drop_in and not (self.loss and self.rng.random() < self.loss)

    def passes_out(self) -> bool:
        return not self.drop_out and not (self.loss and self.rng.random() < self.loss)


Accept = Callable[[Datagram, Addr], DropReason | None]
Handler = Callable[[Datagram, Addr, Seconds], None]
Attribute = Callable[[Addr], str | None]


class PathEndpoint:
    """The UDP socket of one path.  ``accept`` may refuse an authentic datagram before the replay guard
    (``UNKNOWN_SENDER`` …); ``handler`` gets what passed everything; ``attribute`` names the known host
    behind a source address (for drop accounting)."""

    def __init__(self, node: NodeContext, spec: PathSpec, handler: Handler, *, accept: Accept | None = None,
                 attribute: Attribute | None = None, rcvbuf: int | None = 1 << 20) -> None:
        self.node = node
        self.spec = spec
        self.path = spec.path
        self.handler = handler
        self.accept = accept
        self.attribute = attribute
        self.rcvbuf = rcvbuf
        self.filter = SocketFilter()
        self.sequence = SendSequence(node.boot)
        self.sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.sent = 0
        self.received = 0                      # datagrams that passed every check
        self.send_errors = 0
        self.handler_errors = 0
        self.errors: Counter[str] = Counter()  # socket errors reported by the kernel (ICMP unreachable …)

    def __repr__(self) -> str:
        return f"PathEndpoint({self.path.network}, {self.local_address})"

    # -- life cycle ------------------------------------------------------------------------------------

    async def open(self) -> PathEndpoint:
        """Bind the socket and start reading it: every datagram queued is read at each wake-up (not one per
        trip through the event loop, as asyncio's datagram transport does), up to ``DRAIN_BATCH``."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in self.spec.address else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self.rcvbuf:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.bind((self.spec.address, self.spec.port))
            loop.add_reader(sock.fileno(), self._drain)
        except BaseException:
            sock.close()
            raise
        self.sock, self._loop = sock, loop
        return self

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.fileno())
        sock.close()

    @property
    def local_address(self) -> Addr | None:
        if self.sock is None:
            return None
        name = self.sock.getsockname()
        return (str(name[0]), int(name[1])) if name else None

    @property
    def is_open(self) -> bool:
        return self.sock is not None

    # -- reading -----------------------------------------------------------------------------------------

    def _drain(self) -> None:
        sock = self.sock
        for _ in range(DRAIN_BATCH):
            if sock is None or self.sock is not sock:
                return
            try:
                data, addr = sock.recvfrom(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:            # an ICMP error reported on the socket: count it, read on
                self.errors[type(exc).__name__] += 1
                continue
            self.datagram_received(data, addr)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            source: Addr = (str(addr[0]), int(addr[1]))
            if not self.filter.passes_in():
                return
            now = self.node.clock()
            result = self._check(data, source)
            if isinstance(result, DropReason):
                self._drop(now, source, result)
                return
            self.received += 1
            self.handler(result, source, now)
        except Exception as e:          # never out of the protocol: the loop would only log it, noisily
            self.handler_errors += 1
            log.warning("heartbeat datagram handling failed", path=self.path.network, error=type(e).__name__)

    def _check(self, data: bytes, source: Addr) -> Datagram | DropReason:
        node = self.node
        result = verify_then_parse(data, node.keyring, path=self.path, require_auth=self.spec.require_auth,
                                   cluster_id=node.cluster_id, local_id=node.node_id)
        if isinstance(result, DropReason):
            return result
        if self.accept is not None:
            refused = self.accept(result, source)
            if refused is not None:
                return refused
        h = result.header
        replayed = node.replay.admit(h.sender, self.path, h.boot_counter, h.boot_id, h.seq)
        return replayed if replayed is not None else result

    def _drop(self, now: Seconds, source: Addr, reason: DropReason) -> None:
        node = self.node
        host = (self.attribute(source) if self.attribute is not None else None) or node.hostname or str(node.node_id)
        for intent in node.drops.record(now, host, self.path, reason):
            log.warning("heartbeat authentication failures", path=self.path.network, host=host,
                        alarm=intent.alarm_id, reason=reason.value)
            if node.on_alarm is not None:
                node.on_alarm(intent)

    # -- sending ---------------------------------------------------------------------------------------

    def send(self, addr: Addr, payload: Payload | bytes, *, dest: NodeId, role: Role, echo_seq: int = 0,
             epoch: int = 0, msg_type: MsgType = MsgType.HEARTBEAT) -> int | None:
        """Number, sign and send one datagram to ``addr`` (``payload`` may be its TLVs already encoded); its
        seq, or None when the socket is closed or the kernel refused it."""
        sock = self.sock
        if sock is None:
            return None
        node = self.node
        seq = self.sequence.next()
        header = Header(node.cluster_id, node.node_id, self.path, node.boot.value, node.boot_id, seq, msg_type,
                        dest, role, echo_seq, epoch)
        key = node.keyring.send_key(self.path) if node.keyring is not None else None
        data = encode(header, payload, key)
        if self.filter.tap is not None:
            self.filter.tap(data, addr)
        if not self.filter.passes_out():
            return seq
        try:
            # straight to the socket: a datagram the kernel does not take now is dropped (a late heartbeat
            # is worthless), with no buffering to manage
            sock.sendto(data, addr)
        except BlockingIOError:
            self.send_errors += 1
            self.errors["backlog"] += 1
            return None
        except OSError as e:
            self.send_errors += 1
            self.errors[type(e).__name__] += 1
            return None
        self.sent += 1
        return seq


# -- what the monitor and the responder share ------------------------------------------------------------


class PathNode:
    """A node with one :class:`PathEndpoint` per configured path: the keyring, the endpoints' life cycle
    (boot counter first, then the sockets; closed again on failure) and what both the controller's monitor
    and the agent's responder answer about them.  Subclasses define ``start``, ``stop`` and ``_alarm``."""

    _log: Any = log

    def __init__(self, *, node_id: NodeId, cluster_id: bytes, master_key: MasterKey | Keyring,
                 specs: dict[Path, PathSpec], state_dir: FsPath | str, hostname: str,
                 burst_policy: BurstPolicy | None, clock: Clock | None) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.keyring = master_key if isinstance(master_key, Keyring) else Keyring(cluster_id, master_key)
        register_secret(self.keyring.primary.secret)      # defence in depth: masked should it ever be logged
        self.specs = specs
        self.state_dir = FsPath(state_dir)
        self.hostname = hostname
        self.burst_policy = burst_policy
        self._clock = clock
        self.node: NodeContext | None = None
        self.endpoints: dict[Path, PathEndpoint] = {}

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def _alarm(self, intent: AlarmIntent) -> None:
        raise NotImplementedError

    async def _open(self, boot_file: str, hostname: str, handler: Handler, accept: Accept,
                    attribute: Attribute | None = None) -> NodeContext:
        """Persist the boot counter, then bind every path; on failure ``stop`` closes what was opened."""
        boot = await load_boot_counter(self.state_dir, boot_file)
        node = self.node = NodeContext(self.node_id, self.cluster_id, self.keyring, boot, hostname=hostname,
                                       drops=DropCounter(self.burst_policy),
                                       clock=self._clock or asyncio.get_running_loop().time, on_alarm=self._alarm)
        try:
            for spec in self.specs.values():
                endpoint = PathEndpoint(node, spec, handler, accept=accept, attribute=attribute)
                self.endpoints[spec.path] = await endpoint.open()
        except BaseException:
            await self.stop()
            raise
        return node

    def _close(self) -> bool:
        """Close every endpoint and forget the node context; whether any endpoint was open."""
        for endpoint in self.endpoints.values():
            endpoint.close()
        opened = bool(self.endpoints)
        self.endpoints = {}
        self.node = None
        return opened

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def address(self, path: Path) -> Addr:
        """Where the path's socket is bound (after ``start``)."""
        addr = self.endpoints[path].local_address
        if addr is None:
            raise RuntimeError(f"path {path.network} is not open")
        return addr

    def drop_counts(self) -> dict[tuple[Path, DropReason], int]:
        return dict(self.node.drops.counts) if self.node is not None else {}

    def _hears_me(self, datagram: Datagram) -> bool | None:
        """Whether the sender's ``HEARD`` digest has us on the datagram's path (None: it sent no digest)."""
        heard = datagram.payload.heard
        return datagram.header.path in heard.get(self.node_id, frozenset()) if heard is not None else None

    def _keys_reported(self, now: Seconds, sender: NodeId, keys: KeyReport | None) -> None:
        """A peer's authenticated ``KEYS`` report; rotation advances at once while one is under way."""
        if keys is None or self.keyring.knows(sender, keys.primary, keys.held):
            return                      # the same report as last time (every answer carries one)
        self.keyring.report(now, sender, keys.primary, keys.held)
        if len(self.keyring.held()[1]) > 1:
            self._advance_keys(now)

    def _advance_keys(self, now: Seconds) -> None:
        for change in self.keyring.advance(now):
            self._log.info("heartbeat key rotation", node_id=self.node_id, fingerprint=f"{change.key_id:#010x}",
                           generation=change.generation, before=change.before, after=change.after.value,
                           reason=change.reason)
