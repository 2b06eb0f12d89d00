"""Heartbeat keys: derivation, key ids, no secret in any repr, and rotation without loss (a simulation of
peers through accept -> primary -> retired in which no valid datagram is ever dropped)."""

from __future__ import annotations

import pytest

from services.heartbeat.drops import DropReason
from services.heartbeat.keys import Keyring, KeyState, MasterKey, PathKey, derive
from services.heartbeat.model import Path
from services.heartbeat.wire import Datagram, Header, KeyReport, Payload, encode, verify_then_parse

CLUSTER = bytes(16)
OLD = MasterKey(1, b"o" * 64)
NEW = MasterKey(2, b"n" * 64)


def test_keys_differ_per_path_cluster_and_generation() -> None:
    macs = {derive(m, c, p).mac(b"x") for m in (OLD, NEW, MasterKey(3, b"o" * 64))
            for c in (CLUSTER, b"\x01" * 16) for p in Path}
    assert len(macs) == 3 * 2 * 3


def test_key_id_is_a_fingerprint_not_the_key() -> None:
    assert OLD.key_id != NEW.key_id and 0 < OLD.key_id < 2**32
    assert MasterKey(7, b"o" * 64).key_id == OLD.key_id          # of the key bytes only
    with pytest.raises(ValueError):
        MasterKey(1, b"short")


def test_no_secret_in_repr_or_str() -> None:
    secret = b"S3CR3T-" * 10
    master = MasterKey(1, secret)
    ring = Keyring(CLUSTER, master)
    path_key = ring.send_key(Path.OAM)
    for text in (repr(master), str(master), repr(path_key), str(path_key), repr(ring), repr(ring.status()),
                 repr(ring.status().keys)):
        assert "S3CR3T" not in text and secret.hex() not in text
        assert "\\x" not in text
    assert isinstance(path_key, PathKey) and f"{master.key_id:#010x}" in repr(master)


def test_install_rules() -> None:
    ring = Keyring(CLUSTER, NEW)
    with pytest.raises(ValueError):
        ring.install(OLD)                                     # older generation
    assert ring.install(MasterKey(3, b"z" * 64))[0].after is KeyState.ACCEPTED
    assert ring.install(MasterKey(3, b"z" * 64)) == []        # again: nothing
    with pytest.raises(ValueError):
        ring.install(MasterKey(4, b"z" * 64))                 # the same key id under another generation


def test_promotion_waits_for_every_peer_and_status_names_who_lacks_it() -> None:
    ring = Keyring(CLUSTER, OLD, peers=[2, 3], retire_grace=5.0)
    ring.install(NEW)
    assert ring.send_key(Path.MGMT).key_id == OLD.key_id
    assert isinstance(ring.verify_key(NEW.key_id, Path.MGMT), PathKey)   # accepted: verifies already
    ring.report(0.0, 2, OLD.key_id, {OLD.key_id, NEW.key_id})
    ring.report(0.0, 3, OLD.key_id, {OLD.key_id})
    ring.report(0.0, 99, OLD.key_id, {NEW.key_id})                        # not a peer: ignored
    assert ring.advance(0.0) == []
    info = {k.key_id: k for k in ring.status().keys}
    assert info[NEW.key_id].holders == {2} and info[NEW.key_id].missing == {3}
    ring.report(1.0, 3, OLD.key_id, {OLD.key_id, NEW.key_id})
    changes = ring.advance(1.0)
    assert [(c.key_id, c.after) for c in changes] == [(NEW.key_id, KeyState.PRIMARY)]
    assert ring.send_key(Path.MGMT).key_id == NEW.key_id and ring.status().primary == NEW.key_id
    # the old key stays accepted while a peer still signs with it
    ring.report(2.0, 2, NEW.key_id, {OLD.key_id, NEW.key_id})
    assert ring.advance(20.0) == []
    ring.report(21.0, 3, NEW.key_id, {OLD.key_id, NEW.key_id})
    assert ring.advance(21.0) == [] and ring.next_deadline() == 26.0
    changes = ring.advance(26.0)
    assert [(c.key_id, c.after) for c in changes] == [(OLD.key_id, KeyState.RETIRED)]
    assert ring.verify_key(OLD.key_id, Path.MGMT) is DropReason.RETIRED_KEY
    assert ring.verify_key(12345, Path.MGMT) is DropReason.UNKNOWN_KEY
    assert ring.held() == (NEW.key_id, frozenset({NEW.key_id}))


def test_a_peer_leaving_unblocks_the_rotation() -> None:
    ring = Keyring(CLUSTER, OLD, peers=[2, 3])
    ring.install(NEW)
    ring.report(0.0, 2, OLD.key_id, {NEW.key_id})
    assert ring.advance(0.0) == []
    ring.set_peers([2])
    assert ring.advance(0.0)[0].after is KeyState.PRIMARY


class Node:
    """A node in the rotation simulation: its keyring, its sequence numbers, what it received."""

    def __init__(self, node_id: int, peers: list[int]) -> None:
        self.id = node_id
        self.ring = Keyring(CLUSTER, OLD, peers=peers, retire_grace=1.0)
        self.seq = 0
        self.received = 0
        self.dropped: list[DropReason] = []

    def send(self) -> bytes:
        self.seq += 1
        primary, held = self.ring.held()
        return encode(Header(CLUSTER, self.id, Path.MGMT, 1, b"bootid00", self.seq),
                      Payload(keys=KeyReport(primary, held)), self.ring.send_key(Path.MGMT))

    def receive(self, now: float, data: bytes) -> None:
        got = verify_then_parse(data, self.ring, path=Path.MGMT, require_auth=True, cluster_id=CLUSTER,
                                local_id=self.id)
        if isinstance(got, DropReason):
            self.dropped.append(got)
            return
        self.received += 1
        assert got.payload.keys is not None
        self.ring.report(now, got.header.sender, got.payload.keys.primary, got.payload.keys.held)


def test_rotation_in_a_simulation_drops_no_valid_datagram() -> None:
    """Three nodes at 10 Hz; the new key reaches them at different times; datagrams in flight are delivered
    up to 3 periods late.  Every datagram is received, and the rotation completes on every node."""
    ids = [1, 2, 3]
    nodes = {i: Node(i, [p for p in ids if p != i]) for i in ids}
    install_at = {1: 1.0, 2: 2.5, 3: 4.0}
    in_flight: list[tuple[float, int, bytes]] = []
    sent = 0
    for step in range(200):
        now = step * 0.1
        for node in nodes.values():
            if abs(now - install_at[node.id]) < 1e-9:
                node.ring.install(NEW)
            node.ring.advance(now)
        for node in nodes.values():
            data = node.send()
            for dest in ids:
                if dest != node.id:
                    in_flight.append((now + 0.1 * ((step + dest) % 4), dest, data))
                    sent += 1
        due = [m for m in in_flight if m[0] <= now + 1e-9]
        in_flight = [m for m in in_flight if m[0] > now + 1e-9]
        for _, dest, data in due:
            nodes[dest].receive(now, data)
    for _, dest, data in in_flight:
        nodes[dest].receive(20.0, data)
    for node in nodes.values():
        assert node.dropped == []
        status = {k.key_id: k.state for k in node.ring.status().keys}
        assert status == {OLD.key_id: KeyState.RETIRED, NEW.key_id: KeyState.PRIMARY}
    assert sum(n.received for n in nodes.values()) == sent


def test_a_peer_that_missed_the_install_holds_the_rotation() -> None:
    ring = Keyring(CLUSTER, OLD, peers=[2])
    ring.install(NEW)
    for t in range(100):
        ring.report(float(t), 2, OLD.key_id, {OLD.key_id})
        assert ring.advance(float(t)) == []
    assert ring.send_key(Path.OAM).key_id == OLD.key_id


def test_retired_key_datagram_is_dropped() -> None:
    ring = Keyring(CLUSTER, OLD, retire_grace=0.0)
    ring.install(NEW)
    ring.advance(0.0)
    ring.advance(0.0)
    data = encode(Header(CLUSTER, 2, Path.MGMT, 1, b"bootid00", 1), Payload(), derive(OLD, CLUSTER, Path.MGMT))
    got = verify_then_parse(data, ring, path=Path.MGMT, require_auth=True, cluster_id=CLUSTER, local_id=1)
    assert got is DropReason.RETIRED_KEY
    data = encode(Header(CLUSTER, 2, Path.MGMT, 1, b"bootid00", 1), Payload(), ring.send_key(Path.MGMT))
    assert isinstance(verify_then_parse(data, ring, path=Path.MGMT, require_auth=True, cluster_id=CLUSTER,
                                        local_id=1), Datagram)
