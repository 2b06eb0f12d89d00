"""A simulated host's ``/proc`` and ``/sys`` tree, for ``roost agent run --root`` where there is no spare
machine: the demo's workers and the tests' agent processes.  One CPU, some memory, one disk, one physical
NIC on PCI with the given MAC; a boot id of its own.  What ``discovery`` reads, nothing more."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["make_simulated_host"]

_MEMINFO = "MemTotal:       16384000 kB\nMemFree:         8000000 kB\nMemAvailable:    9000000 kB\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _link(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(path):
        os.symlink(target, path)


def make_simulated_host(root: Path, hostname: str, mac: str, *, boot_id: str | None = None) -> Path:
    """Write the tree under ``root`` (created; existing files are replaced) and return ``root``."""
    _write(root / "proc" / "cpuinfo", "processor\t: 0\nmodel name\t: roost simulated CPU\nphysical id\t: 0\n"
                                      "core id\t\t: 0\n\n")
    _write(root / "proc" / "meminfo", _MEMINFO)
    _write(root / "proc" / "uptime", "100.00 100.00\n")
    _write(root / "proc" / "sys" / "kernel" / "random" / "boot_id", f"{boot_id or uuid.uuid4()}\n")
    _write(root / "proc" / "sys" / "kernel" / "hostname", f"{hostname}\n")
    pci = root / "sys" / "devices" / "pci0000:00" / "0000:00:03.0"
    pci.mkdir(parents=True, exist_ok=True)
    _link(pci / "subsystem", root / "sys" / "bus" / "pci")
    _link(pci / "driver", root / "sys" / "bus" / "pci" / "drivers" / "e1000")
    netdev = root / "sys" / "devices" / "net" / "eth0"
    _write(netdev / "address", f"{mac.lower()}\n")
    _write(netdev / "operstate", "up\n")
    _write(netdev / "mtu", "1500\n")
    _write(netdev / "speed", "10000\n")
    _link(netdev / "device", pci)
    _link(root / "sys" / "class" / "net" / "eth0", netdev)
    return root
