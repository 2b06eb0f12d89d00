"""What the benchmarks say about the machine and its processes: the load, package versions, the CPU model, a
process's CPU time.  Shared by the bench scripts (each prints them next to its figures)."""

from __future__ import annotations

import contextlib
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "?"


def pkg(name: str) -> str:
    """The installed version of distribution ``name``, or ``?``."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) process ``pid`` used so far; 0 when unknown or gone."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_times() -> list[int]:
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def machine_busy() -> float:
    """CPU seconds the whole machine spent not idle (all processes, everyone's)."""
    values = _cpu_times()
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def machine_iowait() -> float:
    """CPU seconds the machine sat idle waiting for the disk."""
    return _cpu_times()[4] / os.sysconf("SC_CLK_TCK")


def disk_read_mb() -> float:
    """MB the machine read from its block devices (``pgpgin``, in KB)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == "pgpgin":
            return int(value) / 1024
    return 0.0
