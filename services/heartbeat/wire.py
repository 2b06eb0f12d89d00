"""The heartbeat datagram: encode, and verify-then-parse.  Pure (bytes in, bytes or a verdict out).

Layout, network byte order, 80-byte fixed header, then a TLV payload, then the MAC::

    off size field
      0   4  magic          b"RHBT"
      4   1  version        1 (anything else is dropped: no downgrade, no guessing)
      5   1  msg_type       MsgType
      6   2  flags          0 (reserved; a set bit is malformed)
      8  16  cluster_id     the cluster's random id: another cluster's datagrams are dropped
     24   4  key_id         fingerprint of the master key that signed it (0: unsigned)
     28   4  sender         the sender's node id (never 0)
     32   4  dest           the receiver's node id, 0 for every receiver on the path
     36   1  path           Path: must be the path it arrived on
     37   1  role           Role of the sender
     38   2  payload_len    bytes of TLV payload that follow the header
     40   8  boot_counter   the sender's boot counter (replay.BootCounter), persisted before its first send
     48   8  boot_id        random per process start (a reused boot counter shows as a clash)
     56   8  seq            per (sender, path, boot), from 1, strictly increasing
     64   8  echo_seq       the last seq the sender received from ``dest`` on this path (0: none)
     72   8  epoch          the controller pair's epoch as the sender knows it
     80   n  payload        TLVs: type u8, length u16, value; unknown types skipped
   80+n  64  mac            HMAC-SHA512(path key, bytes [0, 80+n))

TLVs: ``KEYS`` (the key id the sender signs with, then the ids it verifies with: rotation reports),
``HEARD`` (per monitored node, a bit per path it hears that node on: the "what I hear" digest for
asymmetric paths and failure confirmation), ``LEASE`` (the controller pair's lease messages).

:func:`verify_then_parse` checks only the size, magic and version before the MAC (none of which
changes any state), finds the key by its id for the path it arrived on (the path comes from the
socket, never from the packet), compares the MAC with ``hmac.compare_digest`` over the raw bytes, and
only then unpacks anything.  Whether the path requires a MAC is the caller's configuration: with
``require_auth`` a datagram with key id 0 is dropped as ``UNKNOWN_KEY``; without it, it is accepted
unsigned, but a datagram that names a key must still verify.  It never raises: every malformed input
is a :class:`~services.heartbeat.drops.DropReason`.  Replay is checked after it (``replay.ReplayGuard``).
"""

from __future__ import annotations

import enum
import hmac
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.heartbeat.drops import DropReason
from services.heartbeat.keys import CLUSTER_ID_BYTES, MAC_BYTES, Keyring, PathKey
from services.heartbeat.model import BROADCAST, MAX_NODE_ID, NodeId, Path

MAGIC = b"RHBT"
VERSION = 1
MAX_DATAGRAM = 1200          # below the IPv6 minimum MTU: never fragmented
_HEADER = struct.Struct(">4sBBH16sIIIBBHQ8sQQQ")
HEADER_BYTES = _HEADER.size  # 80
MAX_PAYLOAD = MAX_DATAGRAM - HEADER_BYTES - MAC_BYTES
_KEY_ID = struct.Struct(">I")
_KEY_ID_OFFSET = 24
_TLV = struct.Struct(">BH")
_U32 = struct.Struct(">I")
_HEARD = struct.Struct(">IB")
_LEASE = struct.Struct(">IQQIB")
_U64 = 0xFFFF_FFFF_FFFF_FFFF
ZERO_MAC = bytes(MAC_BYTES)


class MsgType(enum.IntEnum):
    HEARTBEAT = 1
    LEASE_REQUEST = 2
    LEASE_GRANT = 3
    LEASE_REFUSE = 4
    LEASE_RELEASE = 5
    FENCE_NOTICE = 6


class Role(enum.IntEnum):
    HOST = 0                 # a host agent (worker, storage, or a controller's own agent)
    STANDBY = 1              # a controller's monitor, standby
    ACTIVE = 2               # a controller's monitor, active


class _Tlv(enum.IntEnum):
    KEYS = 1
    HEARD = 2
    LEASE = 3


@dataclass(frozen=True, slots=True)
class KeyReport:
    primary: int
    held: frozenset[int]


class LeaseKind(enum.IntEnum):
    RENEW = 0                # the holder renews its epoch
    TAKEOVER = 1             # the standby asks for a new epoch because it no longer hears the active
    HANDOVER = 2             # a planned swact: the holder released its lease
    STARTUP = 3              # nobody is active yet


@dataclass(frozen=True, slots=True)
class LeaseFields:
    candidate: NodeId
    epoch: int
    request_id: int
    ttl_ms: int
    kind: LeaseKind


@dataclass(frozen=True, slots=True)
class Payload:
    keys: KeyReport | None = None
    heard: Mapping[NodeId, frozenset[Path]] | None = None
    lease: LeaseFields | None = None


@dataclass(frozen=True, slots=True)
class Header:
    cluster_id: bytes
    sender: NodeId
    path: Path
    boot_counter: int
    boot_id: bytes
    seq: int
    msg_type: MsgType = MsgType.HEARTBEAT
    dest: NodeId = BROADCAST
    role: Role = Role.HOST
    echo_seq: int = 0
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class Datagram:
    """A verified, parsed datagram (``key_id`` 0: it was unsigned, on a path that allows that)."""

    header: Header
    payload: Payload = field(default_factory=Payload)
    key_id: int = 0


class EncodeError(ValueError):
    pass


def encode_payload(payload: Payload) -> bytes:
    """The TLVs of ``payload``: what :func:`encode` signs after the header (for a sender that caches them)."""
    out = bytearray()

    def tlv(kind: _Tlv, value: bytes) -> None:
        out.extend(_TLV.pack(kind, len(value)))
        out.extend(value)

    if payload.keys is not None:
        others = sorted(payload.keys.held - {payload.keys.primary})
        tlv(_Tlv.KEYS, b"".join(_U32.pack(k) for k in (payload.keys.primary, *others)))
    if payload.heard is not None:
        tlv(_Tlv.HEARD, b"".join(_HEARD.pack(node, sum(1 << p for p in paths))
                                 for node, paths in sorted(payload.heard.items())))
    if payload.lease is not None:
        lease = payload.lease
        tlv(_Tlv.LEASE, _LEASE.pack(lease.candidate, lease.epoch, lease.request_id, lease.ttl_ms, lease.kind))
    return bytes(out)


def encode(header: Header, payload: Payload | bytes, key: PathKey | None) -> bytes:
    """The datagram for ``header`` and ``payload`` (or its TLVs already encoded, :func:`encode_payload`),
    signed with ``key`` (None: unsigned, key id 0)."""
    if len(header.cluster_id) != CLUSTER_ID_BYTES or len(header.boot_id) != 8:
        raise EncodeError("cluster_id has 16 bytes and boot_id 8")
    if not (0 < header.sender <= MAX_NODE_ID and 0 < header.seq <= _U64):
        raise EncodeError("sender and seq are positive")
    body = payload if isinstance(payload, bytes) else encode_payload(payload)
    if len(body) > MAX_PAYLOAD:
        raise EncodeError(f"payload of {len(body)} bytes is over {MAX_PAYLOAD}")
    try:
        head = _HEADER.pack(MAGIC, VERSION, header.msg_type, 0, header.cluster_id,
                            key.key_id if key is not None else 0, header.sender, header.dest, header.path,
                            header.role, len(body), header.boot_counter, header.boot_id, header.seq,
                            header.echo_seq, header.epoch)
    except struct.error as e:
        raise EncodeError(str(e)) from None
    signed = head + body
    return signed + (key.mac(signed) if key is not None else ZERO_MAC)


def _parse_payload(data: bytes) -> Payload | None:
    keys: KeyReport | None = None
    heard: dict[NodeId, frozenset[Path]] | None = None
    lease: LeaseFields | None = None
    offset = 0
    while offset < len(data):
        if offset + _TLV.size > len(data):
            return None
        kind, length = _TLV.unpack_from(data, offset)
        offset += _TLV.size
        value = data[offset:offset + length]
        offset += length
        if len(value) != length:
            return None
        if kind == _Tlv.KEYS:
            if keys is not None or length == 0 or length % _U32.size:
                return None
            ids = [k for (k,) in _U32.iter_unpack(value)]
            keys = KeyReport(ids[0], frozenset(ids))
        elif kind == _Tlv.HEARD:
            if heard is not None or length % _HEARD.size:
                return None
            heard = {}
            for node, mask in _HEARD.iter_unpack(value):
                if node == BROADCAST or node in heard or mask >> len(Path):
                    return None
                heard[node] = frozenset(p for p in Path if mask >> p & 1)
        elif kind == _Tlv.LEASE:
            if lease is not None or length != _LEASE.size:
                return None
            candidate, epoch, request_id, ttl_ms, lease_kind = _LEASE.unpack(value)
            if lease_kind not in LeaseKind._value2member_map_ or candidate == BROADCAST:
                return None
            lease = LeaseFields(candidate, epoch, request_id, ttl_ms, LeaseKind(lease_kind))
        # unknown TLV types are skipped: they are authenticated, and a newer sender may add some
    return Payload(keys, heard, lease)


def verify_then_parse(datagram: bytes, keyring: Keyring | None, *, path: Path, require_auth: bool,
                      cluster_id: bytes, local_id: NodeId) -> Datagram | DropReason:
    """The verified datagram that arrived on ``path``, or why it is dropped.  Never raises."""
    size = len(datagram)
    if size > MAX_DATAGRAM:
        return DropReason.OVERSIZE
    if size < HEADER_BYTES + MAC_BYTES:
        return DropReason.TRUNCATED
    if datagram[:4] != MAGIC:
        return DropReason.BAD_MAGIC
    if datagram[4] != VERSION:
        return DropReason.BAD_VERSION
    signed, mac = memoryview(datagram)[:-MAC_BYTES], datagram[-MAC_BYTES:]
    (key_id,) = _KEY_ID.unpack_from(datagram, _KEY_ID_OFFSET)
    if key_id == 0:
        if require_auth:
            return DropReason.UNKNOWN_KEY
    else:
        key = keyring.verify_key(key_id, path) if keyring is not None else DropReason.UNKNOWN_KEY
        if isinstance(key, DropReason):
            return key
        if not hmac.compare_digest(key.mac(signed), mac):
            return DropReason.BAD_MAC
    # -- authentic (or unsigned where allowed) from here on --
    (_, _, msg_type, flags, cluster, _, sender, dest, wire_path, role, payload_len, boot_counter, boot_id,
     seq, echo_seq, epoch) = _HEADER.unpack_from(datagram)
    if cluster != cluster_id:
        return DropReason.WRONG_CLUSTER
    if wire_path != path:
        return DropReason.WRONG_PATH
    if sender == local_id:
        return DropReason.REFLECTED
    if dest not in (BROADCAST, local_id):
        return DropReason.NOT_FOR_US
    if payload_len > size - HEADER_BYTES - MAC_BYTES:
        return DropReason.TRUNCATED
    if (payload_len != size - HEADER_BYTES - MAC_BYTES or flags or sender == BROADCAST or seq == 0
            or msg_type not in MsgType._value2member_map_ or role not in Role._value2member_map_):
        return DropReason.MALFORMED
    payload = _parse_payload(datagram[HEADER_BYTES:HEADER_BYTES + payload_len])
    if payload is None:
        return DropReason.MALFORMED
    header = Header(cluster, sender, path, boot_counter, boot_id, seq, MsgType(msg_type), dest, Role(role),
                    echo_seq, epoch)
    return Datagram(header, payload, key_id)
