"""The heartbeat datagram: round trip, an example for every drop reason, the burst alarm, and properties
(verify-then-parse never raises and returns a reason on arbitrary bytes; any single bit flip is dropped).

``ROOST_HEARTBEAT_EXAMPLES`` sets the hypothesis example count (the ``heartbeat`` profile)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.heartbeat.drops import BurstPolicy, DropCounter, DropReason
from services.heartbeat.keys import Keyring, MasterKey, derive
from services.heartbeat.model import ALARM_AUTH_FAILURES, Path
from services.heartbeat.replay import ReplayGuard
from services.heartbeat.wire import (
    HEADER_BYTES,
    MAX_DATAGRAM,
    Datagram,
    EncodeError,
    Header,
    KeyReport,
    LeaseFields,
    LeaseKind,
    MsgType,
    Payload,
    Role,
    encode,
    verify_then_parse,
)

EXAMPLES = int(os.environ.get("ROOST_HEARTBEAT_EXAMPLES", "200"))
settings.register_profile("heartbeat", max_examples=EXAMPLES, deadline=None)
PROFILE = settings.get_profile("heartbeat")

CLUSTER = bytes(range(16))
OTHER_CLUSTER = bytes(range(1, 17))
MASTER = MasterKey(1, b"k" * 64)
ME, PEER = 1, 7
BOOT_ID = b"bootid01"


def keyring() -> Keyring:
    return Keyring(CLUSTER, MASTER)


def header(**changes: object) -> Header:
    fields: dict[str, object] = dict(cluster_id=CLUSTER, sender=PEER, path=Path.MGMT, boot_counter=3,
                                     boot_id=BOOT_ID, seq=1)
    fields.update(changes)
    return Header(**fields)  # type: ignore[arg-type]


FULL = Payload(KeyReport(MASTER.key_id, frozenset({MASTER.key_id, 42})),
               {ME: frozenset({Path.MGMT, Path.OAM}), 9: frozenset()},
               LeaseFields(PEER, 5, 77, 3000, LeaseKind.TAKEOVER))


def sign(h: Header | None = None, payload: Payload = FULL, path: Path | None = None) -> bytes:
    h = h or header()
    return encode(h, payload, keyring().send_key(path if path is not None else h.path))


def receive(data: bytes, path: Path = Path.MGMT, require_auth: bool = True) -> Datagram | DropReason:
    return verify_then_parse(data, keyring(), path=path, require_auth=require_auth, cluster_id=CLUSTER,
                             local_id=ME)


def test_round_trip() -> None:
    h = header(msg_type=MsgType.LEASE_REQUEST, dest=ME, role=Role.ACTIVE, echo_seq=99, epoch=4, seq=2**64 - 1)
    got = receive(sign(h))
    assert got == Datagram(h, FULL, MASTER.key_id)


def test_header_is_80_bytes_and_the_mac_64() -> None:
    assert HEADER_BYTES == 80
    assert len(sign(payload=Payload())) == 80 + 64


def test_empty_heard_digest_and_no_payload_parse() -> None:
    got = receive(sign(payload=Payload(heard={})))
    assert isinstance(got, Datagram) and got.payload.heard == {}
    got = receive(sign(payload=Payload()))
    assert isinstance(got, Datagram) and got.payload == Payload()


def test_encode_refuses_what_it_cannot_carry() -> None:
    key = keyring().send_key(Path.MGMT)
    with pytest.raises(EncodeError):
        encode(header(seq=0), Payload(), key)
    with pytest.raises(EncodeError):
        encode(header(boot_id=b"short"), Payload(), key)
    with pytest.raises(EncodeError):
        encode(header(), Payload(heard={n: frozenset(Path) for n in range(1, 300)}), key)
    with pytest.raises(EncodeError):
        encode(header(epoch=2**64), Payload(), key)


# -- one example per drop reason ------------------------------------------------------------------


def test_oversize() -> None:
    assert receive(b"RHBT" + bytes(MAX_DATAGRAM)) is DropReason.OVERSIZE


def test_truncated() -> None:
    data = sign()
    assert receive(data[:HEADER_BYTES + 63]) is DropReason.TRUNCATED
    assert receive(b"") is DropReason.TRUNCATED
    # a datagram whose (signed) payload length claims more than it carries
    h = bytearray(sign(payload=Payload()))[:-64]
    struct.pack_into(">H", h, 38, 10)
    assert receive(bytes(h) + keyring().send_key(Path.MGMT).mac(bytes(h))) is DropReason.TRUNCATED


def test_bad_magic_and_version() -> None:
    data = bytearray(sign())
    assert receive(b"XXXX" + bytes(data[4:])) is DropReason.BAD_MAGIC
    data[4] = 2
    assert receive(bytes(data)) is DropReason.BAD_VERSION


def test_forged_mac() -> None:
    data = bytearray(sign())
    data[-1] ^= 1
    assert receive(bytes(data)) is DropReason.BAD_MAC
    forged = encode(header(), FULL, derive(MasterKey(1, b"attacker" * 8), CLUSTER, Path.MGMT))
    assert receive(forged) is DropReason.UNKNOWN_KEY
    # the attacker guesses our key id but not the key
    spoofed = bytearray(forged)
    spoofed[24:28] = MASTER.key_id.to_bytes(4, "big")
    assert receive(bytes(spoofed)) is DropReason.BAD_MAC


def test_unknown_key_and_downgrade_to_unsigned() -> None:
    unsigned = encode(header(), FULL, None)
    assert receive(unsigned) is DropReason.UNKNOWN_KEY                   # the path requires a MAC
    assert isinstance(receive(unsigned, require_auth=False), Datagram)  # configured not to
    other = encode(header(), FULL, derive(MasterKey(2, b"n" * 64), CLUSTER, Path.MGMT))
    assert receive(other) is DropReason.UNKNOWN_KEY
    assert receive(other, require_auth=False) is DropReason.UNKNOWN_KEY  # a named key must verify anyway
    assert verify_then_parse(sign(), None, path=Path.MGMT, require_auth=True, cluster_id=CLUSTER,
                             local_id=ME) is DropReason.UNKNOWN_KEY


def test_wrong_cluster() -> None:
    assert receive(sign(header(cluster_id=OTHER_CLUSTER))) is DropReason.WRONG_CLUSTER


def test_wrong_path() -> None:
    # replayed onto another path: the path's own key does not verify it
    assert receive(sign(), path=Path.OAM) is DropReason.BAD_MAC
    # signed with the OAM key but saying mgmt (an insider, or a bug): the path field is checked too
    assert receive(sign(header(path=Path.MGMT), path=Path.OAM), path=Path.OAM) is DropReason.WRONG_PATH
    assert receive(encode(header(), FULL, None), path=Path.OAM, require_auth=False) is DropReason.WRONG_PATH


def test_not_for_us_and_reflected() -> None:
    assert receive(sign(header(dest=5))) is DropReason.NOT_FOR_US
    assert receive(sign(header(sender=ME))) is DropReason.REFLECTED


def test_malformed_fields_and_payloads() -> None:
    key = keyring().send_key(Path.MGMT)

    def resign(data: bytes) -> bytes:
        return data + key.mac(data)

    base = bytearray(sign(payload=Payload()))[:-64]
    for offset, value in ((5, 99), (37, 9)):          # message type, role
        bad = bytearray(base)
        bad[offset] = value
        assert receive(resign(bytes(bad))) is DropReason.MALFORMED
    bad = bytearray(base)
    struct.pack_into(">H", bad, 6, 1)                 # a reserved flag
    assert receive(resign(bytes(bad))) is DropReason.MALFORMED
    for tlvs in (b"\x01\x00\x03abc",                  # KEYS not in u32s
                 b"\x02\x00\x05\x00\x00\x00\x02\x08",  # HEARD with a path bit that does not exist
                 b"\x03\x00\x01x",                    # LEASE of the wrong size
                 b"\x01\x00",                         # a cut TLV header
                 b"\x01\x00\x08\x00\x00"):            # a TLV longer than what is left
        bad = bytearray(base)
        struct.pack_into(">H", bad, 38, len(tlvs))
        assert receive(resign(bytes(bad) + tlvs)) is DropReason.MALFORMED, tlvs
    bad = bytearray(base)
    struct.pack_into(">H", bad, 38, 4)
    assert isinstance(receive(resign(bytes(bad) + b"\x09\x00\x01z")), Datagram)  # unknown TLV: skipped


def test_replayed_and_stale_boot_come_from_the_guard() -> None:
    guard = ReplayGuard()
    first = receive(sign(header(seq=10)))
    assert isinstance(first, Datagram)
    h = first.header
    assert guard.admit(h.sender, h.path, h.boot_counter, h.boot_id, h.seq) is None
    assert guard.admit(h.sender, h.path, h.boot_counter, h.boot_id, h.seq) is DropReason.REPLAYED
    assert guard.admit(h.sender, h.path, h.boot_counter - 1, h.boot_id, 11) is DropReason.STALE_BOOT


# -- counting and the burst alarm ----------------------------------------------------------------------


def test_drops_are_counted_and_a_burst_raises_then_clears_950_006() -> None:
    counter = DropCounter(BurstPolicy(burst_count=5, burst_window=2.0, clear_after=30.0))
    assert counter.record(0.0, "worker-1", Path.MGMT, DropReason.BAD_MAGIC) == []   # stray: not forgery
    intents = []
    for i in range(5):
        intents += counter.record(1.0 + 0.6 * i, "worker-1", Path.MGMT, DropReason.BAD_MAC)
    assert intents == []                                                    # 5 drops, but over 2.4 s
    intents = [*counter.record(3.5, "worker-1", Path.MGMT, DropReason.REPLAYED),
               *counter.record(3.6, "worker-1", Path.MGMT, DropReason.WRONG_CLUSTER)]
    assert [(a.alarm_id, a.entity_instance_id, a.severity) for a in intents] == [
        (ALARM_AUTH_FAILURES, "host=worker-1.network=mgmt", "major")]
    assert counter.record(3.7, "worker-1", Path.MGMT, DropReason.BAD_MAC) == []   # raised once
    assert counter.counts[Path.MGMT, DropReason.BAD_MAC] == 6
    assert counter.counts[Path.MGMT, DropReason.BAD_MAGIC] == 1
    assert counter.next_deadline() == pytest.approx(33.7)
    assert counter.tick(33.0) == []
    cleared = counter.tick(33.7)
    assert [(a.alarm_id, a.entity_instance_id, a.severity) for a in cleared] == [
        (ALARM_AUTH_FAILURES, "host=worker-1.network=mgmt", None)]
    assert counter.raised() == frozenset() and counter.next_deadline() is None


# -- properties ----------------------------------------------------------------------------------------


@PROFILE
@given(st.binary(max_size=MAX_DATAGRAM + 8), st.sampled_from(list(Path)), st.booleans())
def test_arbitrary_bytes_never_raise(data: bytes, path: Path, require_auth: bool) -> None:
    got = receive(data, path, require_auth)
    assert isinstance(got, DropReason)


@PROFILE
@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_behind_a_valid_header_never_raise(tail: bytes, signed: bool) -> None:
    """Junk after a well-formed header, signed so it reaches the parser: a drop reason or a datagram."""
    head = bytearray(sign(payload=Payload()))[:HEADER_BYTES]
    struct.pack_into(">H", head, 38, len(tail))
    if not signed:
        head[24:28] = bytes(4)
    body = bytes(head) + tail
    data = body + (keyring().send_key(Path.MGMT).mac(body) if signed else bytes(64))
    got = receive(data, require_auth=signed)
    assert isinstance(got, DropReason | Datagram)


@st.composite
def headers(draw: st.DrawFn) -> Header:
    return header(msg_type=draw(st.sampled_from(list(MsgType))), role=draw(st.sampled_from(list(Role))),
                  dest=draw(st.sampled_from((0, ME))), seq=draw(st.integers(1, 2**64 - 1)),
                  echo_seq=draw(st.integers(0, 2**64 - 1)), epoch=draw(st.integers(0, 2**64 - 1)),
                  boot_counter=draw(st.integers(0, 2**64 - 1)), path=draw(st.sampled_from(list(Path))))


@st.composite
def payloads(draw: st.DrawFn) -> Payload:
    keys = draw(st.none() | st.builds(lambda p, h: KeyReport(p, frozenset(h) | {p}),
                                      st.integers(1, 2**32 - 1), st.sets(st.integers(1, 2**32 - 1), max_size=3)))
    heard = draw(st.none() | st.dictionaries(st.integers(1, 2**32 - 1),
                                             st.frozensets(st.sampled_from(list(Path))), max_size=20))
    lease = draw(st.none() | st.builds(LeaseFields, st.integers(1, 2**32 - 1), st.integers(0, 2**64 - 1),
                                       st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                                       st.sampled_from(list(LeaseKind))))
    return Payload(keys, heard, lease)


@PROFILE
@given(headers(), payloads())
def test_what_is_encoded_parses_back(h: Header, payload: Payload) -> None:
    assert receive(sign(h, payload), h.path) == Datagram(h, payload, MASTER.key_id)


@PROFILE
@given(headers(), payloads(), st.data())
def test_any_single_bit_flip_is_dropped(h: Header, payload: Payload, data: st.DataObject) -> None:
    datagram = bytearray(sign(h, payload))
    bit = data.draw(st.integers(0, len(datagram) * 8 - 1))
    datagram[bit // 8] ^= 1 << (bit % 8)
    got = receive(bytes(datagram), h.path)
    assert isinstance(got, DropReason)
