"""What this machine is made of, read from ``/proc`` and ``/sys``.

Every reader takes ``root`` (default ``/``): the directory under which ``proc/`` and ``sys/`` are found, so
that a test (or a simulated host of the demo) can point it at a fake tree.  Parsing is pure (``parse_*``
take text); reading is at the edge (``read_*`` and ``discover``).  Nothing here raises for a file that is
missing or unreadable: that fact is reported as unknown (``None``, ``""``, an empty list) instead, because
a host agent that stops reporting over one odd sysfs attribute is worse than one that reports less.

What counts (decisions, also in the README of the agent issue):

* **CPUs**: the online logical CPUs, from ``/sys/devices/system/cpu/cpuN/topology`` (socket =
  ``physical_package_id``, core = ``core_id``, thread = the CPU's index in its ``thread_siblings_list``);
  an offline CPU has no ``topology`` directory and is left out.  Without sysfs topology (some containers,
  old kernels) ``/proc/cpuinfo``'s ``physical id`` / ``core id`` are used, the thread being the order of
  appearance within the core.  The model is ``model name`` (x86), else ``Processor`` / ``cpu model`` /
  ``cpu`` (ARM, MIPS, POWER).  A package id of -1 (no package information) is reported as socket 0.
* **Memory**: ``MemTotal`` and ``MemAvailable`` of ``/proc/meminfo`` in MiB (rounded down).
* **Disks**: the whole disks of ``/sys/block`` that are backed by a device (they have a ``device`` link).
  Left out: ``loop*``, ``ram*``, ``zram*`` (memory and file backed), ``dm-*`` (LVM, dm-crypt, multipath:
  built on top of disks that are themselves reported), ``md*`` (software RAID, same reason), ``nbd*``
  (network block devices), ``sr*`` (optical drives) and ``fd*`` (floppies).  Partitions are never in
  ``/sys/block``.  Size = ``size`` x 512 bytes (the kernel's unit, whatever the logical block size);
  ``nvme*`` is NVME, else ``queue/rotational`` 1 is HDD, 0 SSD, missing unknown; model from
  ``device/model``, serial from ``device/serial`` (NVMe, some SCSI) or the disk's own ``serial``
  (virtio).
* **Ports**: the network interfaces of ``/sys/class/net`` backed by a device (a ``device`` link: PCI,
  virtio, USB NICs).  Virtual interfaces (no ``device`` link: ``lo``, bridges, bonds, VLANs, veth, tun/tap,
  ifb, docker0, ...) are left out by default: they are not hardware, their MACs are random or copied from
  a physical port (a bond or bridge has a slave's MAC), and they would make the host's MAC list ambiguous.
  ``include_virtual=True`` adds them (``lo`` never), for an agent in a container whose only NIC is a veth.
  MAC from ``address`` (none when it is not a 6-byte Ethernet address or all zero); speed from ``speed``
  in Mb/s (reading it fails with EINVAL while the link is down, and -1 means unknown: both ``None``);
  link from ``operstate`` (``up``; ``down``, ``lowerlayerdown``, ``notpresent`` are down; else, and for
  ``unknown``, from ``carrier`` when it can be read); ``mtu``; driver = the name the ``device/driver`` link
  points to; PCI address = the device's name when it is a PCI device, or its parent's when it is a virtio
  device on a PCI transport (what ``ethtool -i`` reports as bus-info).
* **Identity**: ``/proc/sys/kernel/random/boot_id`` (changes at every boot), ``/proc/uptime`` (whole
  seconds), the host name from ``/proc/sys/kernel/hostname``.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from schemas.inventory import Cpu, Disk, Hardware, Memory, Port

__all__ = [
    "SKIPPED_DISK_PREFIXES",
    "Machine",
    "discover",
    "parse_cpu_list",
    "parse_cpuinfo",
    "parse_meminfo",
    "parse_uptime",
    "read_boot_id",
    "read_cpus",
    "read_disks",
    "read_hardware",
    "read_memory",
    "read_os_hostname",
    "read_ports",
    "read_uptime",
]

SKIPPED_DISK_PREFIXES: tuple[str, ...] = ("loop", "ram", "zram", "dm-", "md", "nbd", "sr", "fd")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_ZERO_MAC = "00:00:00:00:00:00"
_SECTOR = 512
_MIB = 1024 * 1024
_TEXT_MAX = 255

DiskType = Literal["HDD", "SSD", "NVME", "unknown"]
LinkState = Literal["up", "down", "unknown"]


# -- small readers ----------------------------------------------------------------------------------


def _under(root: Path | str, *parts: str) -> Path:
    return Path(root).joinpath(*parts)


def _read(path: Path) -> str | None:
    """The file's text, or None when it is missing or cannot be read (EINVAL from a sysfs attribute
    that has no value right now, EACCES, a directory, ...)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _read_line(path: Path) -> str | None:
    text = _read(path)
    return text.strip() if text is not None else None


def _read_int(path: Path) -> int | None:
    text = _read_line(path)
    if text is None:
        return None
    try:
        return int(text, 0) if text.startswith("0x") else int(text)
    except ValueError:
        return None


def _link_name(path: Path) -> str | None:
    """The last component of where the symlink ``path`` points, or None when it is not a symlink."""
    try:
        return os.path.basename(os.readlink(path).rstrip("/")) or None
    except OSError:
        return None


def _clip(text: str, limit: int = _TEXT_MAX) -> str:
    return text[:limit]


# -- CPUs -------------------------------------------------------------------------------------------


def parse_cpu_list(text: str) -> list[int]:
    """The kernel's CPU list format: ``0-3,8,10-11`` -> ``[0, 1, 2, 3, 8, 10, 11]`` (sorted, unique);
    anything unreadable in it is skipped."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        first, sep, last = part.partition("-")
        try:
            if sep:
                lo, hi = int(first), int(last)
                if 0 <= lo <= hi:
                    cpus.update(range(lo, hi + 1))
            else:
                cpus.add(int(first))
        except ValueError:
            continue
    return sorted(cpus)


_MODEL_KEYS = ("model name", "Processor", "cpu model", "cpu")


@dataclass(frozen=True, slots=True)
class CpuInfo:
    """One ``processor`` stanza of ``/proc/cpuinfo`` (what is needed of it)."""

    processor: int
    model: str = ""
    physical_id: int | None = None
    core_id: int | None = None


def parse_cpuinfo(text: str) -> list[CpuInfo]:
    """The logical CPUs ``/proc/cpuinfo`` lists, in order.  A model given once for all CPUs (ARM's
    ``Processor`` line before or after the stanzas) is applied to every CPU that has none."""
    stanzas: list[dict[str, str]] = []
    common: dict[str, str] = {}
    current: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if "processor" in current:
                stanzas.append(current)
            elif current:
                common.update(current)
            current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            key = key.strip()
            if key == "Processor" and not value.strip().isdigit():   # ARM: the model, once for every CPU
                common.setdefault(key, value.strip())
                continue
            if key == "processor" and "processor" in current:   # stanzas without blank lines in between
                stanzas.append(current)
                current = {}
            current.setdefault(key, value.strip())

    def model_of(stanza: Mapping[str, str]) -> str:
        for key in _MODEL_KEYS:
            value = stanza.get(key) or common.get(key)
            if value and not (key == "Processor" and value.isdigit()):
                return _clip(value)
        return ""

    def number(value: str | None) -> int | None:
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    out: list[CpuInfo] = []
    for stanza in stanzas:
        cpu = number(stanza.get("processor"))
        if cpu is None or cpu < 0:
            continue
        out.append(CpuInfo(cpu, model_of(stanza), number(stanza.get("physical id")), number(stanza.get("core id"))))
    return out


def _cpu_dirs(root: Path | str) -> dict[int, Path]:
    base = _under(root, "sys", "devices", "system", "cpu")
    found: dict[int, Path] = {}
    try:
        entries = list(base.iterdir())
    except OSError:
        return found
    for entry in entries:
        m = re.fullmatch(r"cpu(\d+)", entry.name)
        if m:
            found[int(m.group(1))] = entry
    return found


def _bounded(value: int | None, upper: int) -> int:
    if value is None or value < 0:
        return 0
    return min(value, upper)


def read_cpus(root: Path | str = "/") -> list[Cpu]:
    """The online logical CPUs, by number."""
    info = {c.processor: c for c in parse_cpuinfo(_read(_under(root, "proc", "cpuinfo")) or "")}
    models = [c.model for c in info.values() if c.model]
    fallback_model = models[0] if models else ""
    cpus: list[Cpu] = []
    dirs = _cpu_dirs(root)
    with_topology = {n: d for n, d in dirs.items() if (d / "topology").is_dir()}
    if with_topology:
        for n in sorted(with_topology):
            topology = with_topology[n] / "topology"
            socket_id = _read_int(topology / "physical_package_id")
            core_id = _read_int(topology / "core_id")
            siblings = parse_cpu_list(_read_line(topology / "thread_siblings_list") or "")
            if not siblings:
                siblings = parse_cpu_list(_read_line(topology / "core_cpus_list") or "")
            thread = siblings.index(n) if n in siblings else 0
            entry = info.get(n)
            model = entry.model if entry is not None and entry.model else fallback_model
            cpus.append(Cpu(cpu=n, socket=_bounded(socket_id, 1023), core=_bounded(core_id, 65535),
                            thread=min(thread, 255), model=model))
        return cpus
    # No sysfs topology: /proc/cpuinfo only (thread = order of appearance within the socket's core)
    seen: dict[tuple[int, int], int] = {}
    for entry in sorted(info.values(), key=lambda c: c.processor):
        socket_id = _bounded(entry.physical_id, 1023)
        core_id = _bounded(entry.core_id if entry.core_id is not None else entry.processor, 65535)
        thread = seen.get((socket_id, core_id), 0)
        seen[(socket_id, core_id)] = thread + 1
        cpus.append(Cpu(cpu=min(entry.processor, 65535), socket=socket_id, core=core_id, thread=min(thread, 255),
                        model=entry.model or fallback_model))
    return cpus


# -- memory -----------------------------------------------------------------------------------------


def parse_meminfo(text: str) -> Memory | None:
    """``MemTotal`` and ``MemAvailable`` (kB) in MiB; None without a ``MemTotal``."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        fields = rest.split()
        if not fields:
            continue
        try:
            amount = int(fields[0])
        except ValueError:
            continue
        unit = fields[1].lower() if len(fields) > 1 else "kb"
        values[key.strip()] = amount * 1024 if unit == "kb" else amount
    total = values.get("MemTotal")
    if total is None or total < 0:
        return None
    available = values.get("MemAvailable")
    return Memory(total_mib=total // _MIB,
                  available_mib=available // _MIB if available is not None and available >= 0 else None)


def read_memory(root: Path | str = "/") -> Memory | None:
    text = _read(_under(root, "proc", "meminfo"))
    return parse_meminfo(text) if text is not None else None


# -- disks ------------------------------------------------------------------------------------------


def _disk_type(name: str, block: Path) -> DiskType:
    if name.startswith("nvme"):
        return "NVME"
    rotational = _read_line(block / "queue" / "rotational")
    if rotational == "1":
        return "HDD"
    if rotational == "0":
        return "SSD"
    return "unknown"


def read_disks(root: Path | str = "/") -> list[Disk]:
    """The whole disks backed by a device, by name (see the module docstring for what is left out)."""
    base = _under(root, "sys", "block")
    try:
        entries = sorted(base.iterdir(), key=lambda p: p.name)
    except OSError:
        return []
    disks: list[Disk] = []
    for block in entries:
        name = block.name
        if name.startswith(SKIPPED_DISK_PREFIXES):
            continue
        if not os.path.lexists(block / "device"):
            continue                                 # a virtual block device (/sys/devices/virtual/block)
        sectors = _read_int(block / "size")
        size_mib = sectors * _SECTOR // _MIB if sectors is not None and sectors > 0 else 0
        model = _read_line(block / "device" / "model") or ""
        serial = _read_line(block / "device" / "serial") or _read_line(block / "serial") or ""
        disks.append(Disk(device_node=_clip("/dev/" + name.replace("!", "/")), size_mib=size_mib,
                          type=_disk_type(name, block),
                          model=_clip(model), serial=_clip(serial)))
    return disks


# -- network ports ----------------------------------------------------------------------------------


def _mac(text: str | None) -> str | None:
    if text is None:
        return None
    mac = text.strip().lower()
    if not _MAC.match(mac) or mac == _ZERO_MAC:
        return None
    return mac


def _speed(netdev: Path) -> int | None:
    """Mb/s, or None: the attribute fails with EINVAL while the link is down, and -1 (or the unsigned
    SPEED_UNKNOWN of old kernels) means the driver does not know."""
    try:
        text = (netdev / "speed").read_text().strip()      # EINVAL while the link is down
    except OSError:
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    if value < 0 or value in (0xFFFF, 0xFFFFFFFF):           # SPEED_UNKNOWN, as some kernels print it
        return None
    return value


def _link(netdev: Path) -> LinkState:
    state = (_read_line(netdev / "operstate") or "unknown").lower()
    if state == "up":
        return "up"
    if state in ("down", "lowerlayerdown", "notpresent"):
        return "down"
    carrier = _read_line(netdev / "carrier")
    if carrier == "1":
        return "up"
    if carrier == "0":
        return "down"
    return "unknown"


def _subsystem(device: Path) -> str | None:
    return _link_name(device / "subsystem")


def _pci_address(netdev: Path) -> str | None:
    device = netdev / "device"
    try:
        resolved = device.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    subsystem = _subsystem(resolved)
    candidate: Path | None = None
    if subsystem == "pci":
        candidate = resolved
    elif subsystem == "virtio" and _subsystem(resolved.parent) == "pci":
        candidate = resolved.parent
    if candidate is not None and _PCI_ADDRESS.match(candidate.name):
        return candidate.name
    return None


def read_ports(root: Path | str = "/", *, include_virtual: bool = False) -> list[Port]:
    """The network ports backed by a device (and the virtual interfaces with ``include_virtual``), by name;
    ``lo`` never."""
    base = _under(root, "sys", "class", "net")
    try:
        entries = sorted(base.iterdir(), key=lambda p: p.name)
    except OSError:
        return []
    ports: list[Port] = []
    for netdev in entries:
        name = netdev.name
        if name == "lo" or not name or len(name) > 64:
            continue
        physical = os.path.lexists(netdev / "device")
        if not physical and not include_virtual:
            continue
        mtu = _read_int(netdev / "mtu")
        driver = _link_name(netdev / "device" / "driver") if physical else None
        ports.append(Port(name=name, mac=_mac(_read_line(netdev / "address")), speed_mbps=_speed(netdev),
                          link=_link(netdev),
                          mtu=mtu if mtu is not None and mtu >= 0 else None,
                          driver=driver[:64] if driver else None,
                          pci_address=_pci_address(netdev) if physical else None))
    return ports


# -- identity ---------------------------------------------------------------------------------------


def parse_uptime(text: str) -> int | None:
    """Whole seconds since boot from ``/proc/uptime`` (``"433.06 713.86"`` -> 433)."""
    fields = text.split()
    try:
        return max(0, int(float(fields[0]))) if fields else None
    except ValueError:
        return None


def read_uptime(root: Path | str = "/") -> int:
    text = _read(_under(root, "proc", "uptime"))
    value = parse_uptime(text) if text is not None else None
    return value if value is not None else 0


def read_boot_id(root: Path | str = "/") -> str:
    value = _read_line(_under(root, "proc", "sys", "kernel", "random", "boot_id")) or ""
    return value[:64]


def read_os_hostname(root: Path | str = "/") -> str:
    value = _read_line(_under(root, "proc", "sys", "kernel", "hostname"))
    if value is None and Path(root) == Path("/"):
        value = socket.gethostname()
    return _clip(value or "")


# -- everything -------------------------------------------------------------------------------------


def read_hardware(root: Path | str = "/", *, now: datetime | None = None,
                  include_virtual_ports: bool = False) -> Hardware:
    """The machine's CPUs, memory, disks and ports as the agent reports them."""
    return Hardware(cpus=read_cpus(root), memory=read_memory(root), disks=read_disks(root),
                    ports=read_ports(root, include_virtual=include_virtual_ports), source="agent",
                    reported_at=now or datetime.now(UTC))


def _unique(values: Iterable[str | None]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


@dataclass(frozen=True, slots=True)
class Machine:
    """One look at the machine: its hardware and its identity."""

    hardware: Hardware
    os_hostname: str = ""
    boot_id: str = ""
    uptime_seconds: int = 0
    macs: list[str] = field(default_factory=list)


def discover(root: Path | str = "/", *, now: datetime | None = None, include_virtual_ports: bool = False) -> Machine:
    """Read the machine under ``root``.  ``macs`` are the reported ports' MACs, each once."""
    hardware = read_hardware(root, now=now, include_virtual_ports=include_virtual_ports)
    return Machine(hardware=hardware, os_hostname=read_os_hostname(root), boot_id=read_boot_id(root),
                   uptime_seconds=read_uptime(root), macs=_unique(p.mac for p in hardware.ports)[:256])
