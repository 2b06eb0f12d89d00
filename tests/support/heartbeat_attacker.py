"""An attacker on a heartbeat network, in a process of its own: sends bad datagrams to a monitor or an agent.

    python -m tests.support.heartbeat_attacker          # run from the repository root

The plan comes as one JSON line on stdin (a key, when given, never in argv or the environment)::

    {"cluster": "<hex>",                  # the cluster id (on the wire in every datagram: not a secret)
     "key": "<hex>" | null, "generation": 1,   # the master key, for the cases only a key holder can make
     "sender": 10, "dest": 1, "role": 0,  # the node ids and role the forged headers claim
     "targets": {"0": ["127.0.1.1", 4000], ...},    # where to send, per path
     "sources": {"0": "127.0.1.10", ...},           # the address to send from, per path (spoofing a peer)
     "captured": {"0": ["<hex>", ...], ...},        # real datagrams seen on each path (for replays)
     "attacks": [{"kind": "replayed", "path": 0, "count": 5}, ...]}

and it prints one JSON line, what it sent: ``{"sent": [{"kind": ..., "path": 0, "count": 5}, ...]}``, then
exits.  The kinds (what a receiver must drop them as, with ``require_auth``):

=================  ==========================================================================  ===============
``other_key``      a well-formed datagram signed with a key of the attacker's own               unknown_key
``unsigned``       a well-formed datagram with no MAC (key id 0): a downgrade attempt          unknown_key
``tampered``       a captured datagram with its seq raised, the MAC left as it was             bad_mac
``random_mac``     a captured datagram with random bytes for a MAC                             bad_mac
``truncated``      a captured datagram cut short of a header and a MAC                         truncated
``replayed``       a captured datagram, verbatim                                               replayed
``moved``          a datagram captured on another path, sent to this one                       bad_mac
``wrong_cluster``  signed with this path's real key, but another cluster id (needs the key)   wrong_cluster
``wrong_path``     signed with this path's real key, but naming another path (needs the key)   wrong_path
=================  ==========================================================================  ===============

Each datagram of a kind differs (seq, length, MAC bytes, which captured one), cycling over the captures.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

from services.heartbeat.keys import MAC_BYTES, MasterKey, PathKey, derive
from services.heartbeat.model import Path
from services.heartbeat.wire import HEADER_BYTES, Header, KeyReport, Payload, Role, encode

KINDS = ("other_key", "unsigned", "tampered", "random_mac", "truncated", "replayed", "moved", "wrong_cluster",
         "wrong_path")
_SEQ_OFFSET = 56


class Attacker:
    def __init__(self, plan: dict[str, Any]) -> None:
        self.cluster = bytes.fromhex(plan["cluster"])
        self.master = MasterKey(int(plan.get("generation", 1)), bytes.fromhex(plan["key"])) if plan.get("key") else None
        self.sender, self.dest, self.role = int(plan["sender"]), int(plan["dest"]), Role(int(plan.get("role", 0)))
        self.captured = {Path(int(p)): [bytes.fromhex(d) for d in data] for p, data in plan.get("captured", {}).items()}
        self.boot_id = os.urandom(8)
        self.seq = 1 << 40                     # far ahead of any real sender: only the MAC stands in the way

    def header(self, path: Path, *, cluster: bytes | None = None) -> Header:
        self.seq += 1
        return Header(cluster or self.cluster, self.sender, path, 1 << 20, self.boot_id, self.seq, dest=self.dest,
                      role=self.role)

    def capture(self, path: Path, i: int) -> bytes:
        data = self.captured.get(path)
        if not data:
            raise ValueError(f"nothing captured on path {path.network}")
        return data[i % len(data)]

    def key(self, path: Path) -> PathKey:
        if self.master is None:
            raise ValueError("this kind needs the key")
        return derive(self.master, self.cluster, path)

    def datagram(self, kind: str, path: Path, i: int) -> bytes:
        payload = Payload(KeyReport(1, frozenset({1})), None)
        if kind == "other_key":
            return encode(self.header(path), payload, derive(MasterKey(1, os.urandom(64)), self.cluster, path))
        if kind == "unsigned":
            return encode(self.header(path), payload, None)
        if kind == "tampered":
            tampered = bytearray(self.capture(path, i))
            tampered[_SEQ_OFFSET + 3] |= 0x80      # seq + 2**39: far ahead, still in this boot
            return bytes(tampered)
        if kind == "random_mac":
            data = self.capture(path, i)
            return data[:-MAC_BYTES] + os.urandom(MAC_BYTES)
        if kind == "truncated":
            data = self.capture(path, i)
            cuts = (0, 4, 5, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + MAC_BYTES - 1)
            return data[:min(cuts[i % len(cuts)], len(data) - 1)]
        if kind == "replayed":
            return self.capture(path, i)
        if kind == "moved":
            others = [p for p in self.captured if p is not path and self.captured[p]]
            if not others:
                raise ValueError("nothing captured on another path")
            return self.capture(others[i % len(others)], i // len(others))
        if kind == "wrong_cluster":
            return encode(self.header(path, cluster=os.urandom(16)), payload, self.key(path))
        if kind == "wrong_path":
            other = Path((path + 1) % len(Path))
            return encode(self.header(other), payload, self.key(path))
        raise ValueError(f"unknown attack {kind!r}")


def run(plan: dict[str, Any]) -> list[dict[str, Any]]:
    attacker = Attacker(plan)
    sockets: dict[Path, socket.socket] = {}
    sent: list[dict[str, Any]] = []
    try:
        for p, address in plan["sources"].items():
            sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((address, 0))
            sockets[Path(int(p))] = sock
        for attack in plan["attacks"]:
            path, count = Path(int(attack["path"])), int(attack["count"])
            host, port = plan["targets"][str(path.value)]
            for i in range(count):
                sockets[path].sendto(attacker.datagram(attack["kind"], path, i), (host, int(port)))
            sent.append({"kind": attack["kind"], "path": path.value, "count": count})
    finally:
        for sock in sockets.values():
            sock.close()
    return sent


def main() -> int:
    plan = json.loads(sys.stdin.readline())
    sys.stdout.write(json.dumps({"sent": run(plan)}) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
