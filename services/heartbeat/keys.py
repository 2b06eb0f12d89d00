"""Heartbeat keys: master keys, the per-path keys derived from them, and rotation without loss.  Pure.

* A :class:`MasterKey` is 64 random bytes (``secrets.token_bytes(64)``, made by ``roost keys``) with a
  *generation* that grows with every rotation.  Its ``key_id`` (u32, never 0) is a fingerprint, not the
  key: the first 4 bytes of HMAC-SHA512(secret, "roost/heartbeat/v1/key-id").
* The key that signs a path's datagrams is HKDF-SHA512(master, salt = cluster id,
  info = "roost/heartbeat/v1/" ‖ cluster id ‖ "/" ‖ network ‖ "/" ‖ generation), 64 bytes: a key taken
  from one path (or one cluster) forges nothing on another, and a datagram moved to another path fails
  its MAC.  Datagrams carry the master's key id; the receiver derives the path's key from it.
* No secret appears in any ``repr``/``str``: only key ids and generations.

Rotation (:class:`Keyring`, one per node; ``advance(now)`` applies the rules, returns what changed)::

    install(new)    new key ACCEPTED: verifies, never signs; the node reports holding it
    every peer reports holding it          -> PRIMARY: signs; the old primary goes back to ACCEPTED
    no peer reports the old one as its primary for ``retire_grace`` s -> RETIRED: forgotten

Each node promotes on its own once everyone it sends to can verify the new key, and retires the old
only when nobody sends with it any more, so no valid datagram is ever dropped on the way.  A peer that
missed the install holds the rotation at ACCEPTED (``status()`` names it) until it gets the key or leaves
the peer set.  Reports must come from authenticated datagrams (the ``keys`` field of ``wire.Payload``).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.heartbeat.drops import DropReason
from services.heartbeat.model import NodeId, Path, Seconds

KEY_BYTES = 64
MIN_KEY_BYTES = 32
MAC_BYTES = 64
CLUSTER_ID_BYTES = 16
_LABEL = b"roost/heartbeat/v1/"


def _fingerprint(secret: bytes) -> int:
    key_id = int.from_bytes(hmac.new(secret, _LABEL + b"key-id", hashlib.sha512).digest()[:4], "big")
    return key_id or 1


@dataclass(frozen=True, slots=True, repr=False)
class MasterKey:
    """A cluster-wide heartbeat master key.  ``repr`` shows its id and generation, never the bytes."""

    generation: int
    secret: bytes = field(compare=False)
    key_id: int = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < MIN_KEY_BYTES:
            raise ValueError(f"a heartbeat master key has at least {MIN_KEY_BYTES} bytes")
        if not 0 <= self.generation <= 0xFFFF_FFFF:
            raise ValueError("a key generation is a u32")
        object.__setattr__(self, "key_id", _fingerprint(self.secret))

    def __repr__(self) -> str:
        return f"MasterKey(generation={self.generation}, key_id={self.key_id:#010x})"

    __str__ = __repr__


@dataclass(frozen=True, slots=True, repr=False)
class PathKey:
    """The key that signs and verifies one path's datagrams, for one master key."""

    key_id: int
    path: Path
    _mac: hmac.HMAC = field(compare=False)

    def mac(self, data: bytes | memoryview) -> bytes:
        h = self._mac.copy()
        h.update(data)
        return h.digest()

    def __repr__(self) -> str:
        return f"PathKey(key_id={self.key_id:#010x}, path={self.path.network})"

    __str__ = __repr__


def derive(master: MasterKey, cluster_id: bytes, path: Path) -> PathKey:
    if len(cluster_id) != CLUSTER_ID_BYTES:
        raise ValueError(f"a cluster id has {CLUSTER_ID_BYTES} bytes")
    info = (_LABEL + cluster_id + b"/" + path.network.encode() + b"/" + master.generation.to_bytes(4, "big"))
    secret = HKDF(algorithm=hashes.SHA512(), length=KEY_BYTES, salt=cluster_id, info=info).derive(master.secret)
    return PathKey(master.key_id, path, hmac.new(secret, digestmod=hashlib.sha512))


class KeyState(enum.StrEnum):
    ACCEPTED = "accepted"   # verifies, does not sign
    PRIMARY = "primary"     # signs and verifies
    RETIRED = "retired"     # forgotten: a datagram under it is dropped (DropReason.RETIRED_KEY)


@dataclass(frozen=True, slots=True)
class KeyChange:
    """One rotation step, for the log (ids only)."""

    key_id: int
    generation: int
    before: KeyState | None
    after: KeyState
    reason: str


@dataclass(frozen=True, slots=True)
class PeerKeys:
    """What a peer last reported: the key ids it holds and the one it signs with."""

    held: frozenset[int]
    primary: int
    at: Seconds


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: int
    generation: int
    state: KeyState
    holders: frozenset[NodeId]      # peers that report holding it
    missing: frozenset[NodeId]      # peers that do not (yet)


@dataclass(frozen=True, slots=True)
class KeyringStatus:
    """``roost keys status``: every key this node knows (retired ones too) and who holds it."""

    keys: tuple[KeyInfo, ...]
    peers: Mapping[NodeId, PeerKeys]

    @property
    def primary(self) -> int:
        return next(k.key_id for k in self.keys if k.state is KeyState.PRIMARY)


@dataclass(slots=True)
class _Entry:
    master: MasterKey | None          # None once retired
    generation: int
    state: KeyState
    unused_since: Seconds | None = None


class Keyring:
    """This node's keys by id, the peers' reports, and the rotation rules.  Start with one primary key."""

    def __init__(self, cluster_id: bytes, primary: MasterKey, *, peers: Iterable[NodeId] = (),
                 retire_grace: Seconds = 10.0) -> None:
        if len(cluster_id) != CLUSTER_ID_BYTES:
            raise ValueError(f"a cluster id has {CLUSTER_ID_BYTES} bytes")
        self.cluster_id = cluster_id
        self.retire_grace = retire_grace
        self._entries: dict[int, _Entry] = {primary.key_id: _Entry(primary, primary.generation, KeyState.PRIMARY)}
        self._derived: dict[tuple[int, Path], PathKey] = {}
        self._peers: frozenset[NodeId] = frozenset(peers)
        self._reports: dict[NodeId, PeerKeys] = {}

    def __repr__(self) -> str:
        states = ", ".join(f"{k:#010x}:{e.state.value}" for k, e in self._entries.items())
        return f"Keyring({states})"

    # -- keys -------------------------------------------------------------------------------------

    def install(self, master: MasterKey) -> list[KeyChange]:
        """Add a newer key as ACCEPTED (again: nothing; an id collision or an older generation: ValueError)."""
        entry = self._entries.get(master.key_id)
        if entry is not None:
            if entry.generation != master.generation:
                raise ValueError(f"key id {master.key_id:#010x} is taken by generation {entry.generation}")
            return []
        if any(e.generation >= master.generation for e in self._entries.values()):
            raise ValueError(f"generation {master.generation} is not newer than the keys held")
        self._entries[master.key_id] = _Entry(master, master.generation, KeyState.ACCEPTED)
        return [KeyChange(master.key_id, master.generation, None, KeyState.ACCEPTED, "installed")]

    @property
    def primary(self) -> MasterKey:
        entry = next(e for e in self._entries.values() if e.state is KeyState.PRIMARY)
        assert entry.master is not None
        return entry.master

    def held(self) -> tuple[int, frozenset[int]]:
        """(the key id we sign with, every key id we verify with): what we report to peers."""
        live = frozenset(k for k, e in self._entries.items() if e.state is not KeyState.RETIRED)
        return self.primary.key_id, live

    def send_key(self, path: Path) -> PathKey:
        return self._path_key(self.primary, path)

    def verify_key(self, key_id: int, path: Path) -> PathKey | DropReason:
        entry = self._entries.get(key_id)
        if entry is None:
            return DropReason.UNKNOWN_KEY
        if entry.master is None:
            return DropReason.RETIRED_KEY
        return self._path_key(entry.master, path)

    def _path_key(self, master: MasterKey, path: Path) -> PathKey:
        key = self._derived.get((master.key_id, path))
        if key is None:
            key = self._derived[master.key_id, path] = derive(master, self.cluster_id, path)
        return key

    # -- peers ------------------------------------------------------------------------------------

    def set_peers(self, peers: Iterable[NodeId]) -> None:
        """The nodes that receive from us and send to us (from inventory); reports of others are dropped."""
        self._peers = frozenset(peers)
        self._reports = {p: r for p, r in self._reports.items() if p in self._peers}

    def knows(self, peer: NodeId, primary: int, held: frozenset[int]) -> bool:
        """Whether ``peer``'s last report said exactly this (a repeat changes nothing)."""
        last = self._reports.get(peer)
        return last is not None and last.primary == primary and last.held == held and primary in held

    def report(self, now: Seconds, peer: NodeId, primary: int, held: Iterable[int]) -> None:
        """A peer's key report, from an authenticated datagram."""
        if peer in self._peers:
            self._reports[peer] = PeerKeys(frozenset(held) | {primary}, primary, now)

    def _holders(self, key_id: int) -> frozenset[NodeId]:
        return frozenset(p for p, r in self._reports.items() if key_id in r.held)

    # -- rotation ---------------------------------------------------------------------------------

    def advance(self, now: Seconds) -> list[KeyChange]:
        """Apply the rotation rules at ``now``: promote, then retire."""
        changes: list[KeyChange] = []
        current = self._entries[self.primary.key_id]
        newer = [(k, e) for k, e in self._entries.items()
                 if e.state is KeyState.ACCEPTED and e.generation > current.generation]
        if newer:
            key_id, entry = max(newer, key=lambda ke: ke[1].generation)
            if self._holders(key_id) >= self._peers:
                current.state = KeyState.ACCEPTED
                current.unused_since = None
                entry.state = KeyState.PRIMARY
                changes.append(KeyChange(key_id, entry.generation, KeyState.ACCEPTED, KeyState.PRIMARY,
                                         "every peer holds it"))
                current = entry
        for key_id, entry in self._entries.items():
            if entry.state is not KeyState.ACCEPTED or entry.generation >= current.generation:
                continue
            in_use = any(r.primary == key_id for r in self._reports.values())
            unreported = self._peers - self._reports.keys()
            if in_use or unreported:
                entry.unused_since = None
                continue
            if entry.unused_since is None:
                entry.unused_since = now
            if now - entry.unused_since >= self.retire_grace:
                entry.state, entry.master = KeyState.RETIRED, None
                self._derived = {k: v for k, v in self._derived.items() if k[0] != key_id}
                changes.append(KeyChange(key_id, entry.generation, KeyState.ACCEPTED, KeyState.RETIRED,
                                         f"no peer has signed with it for {self.retire_grace:g} s"))
        return changes

    def next_deadline(self) -> Seconds | None:
        """When :meth:`advance` may retire a key with no new report (None: not waiting for that)."""
        waits = [e.unused_since + self.retire_grace for e in self._entries.values()
                 if e.state is KeyState.ACCEPTED and e.unused_since is not None]
        return min(waits, default=None)

    def status(self) -> KeyringStatus:
        keys = tuple(KeyInfo(k, e.generation, e.state, self._holders(k), self._peers - self._holders(k))
                     for k, e in sorted(self._entries.items(), key=lambda ke: ke[1].generation))
        return KeyringStatus(keys, dict(self._reports))
