"""The real sushy-tools Redfish emulator (``sushy-emulator --fake``) as a subprocess, for BMC tests.

``running_sushy(directory, systems, credentials=...)`` writes ``emulator.conf`` (the fake driver's
systems, a state directory of its own: the fake driver keeps its systems in a SQLite file there that
would otherwise survive into the next run, and optionally an htpasswd file with a bcrypt entry so that
wrong credentials are refused), starts ``sushy-emulator --config … --fake -i 127.0.0.1 -p <free port>``,
waits until ``GET /redfish/v1/`` answers (polling against a deadline; the emulator's log is shown if it
dies or never answers) and stops it at the end.  sushy-tools is a test dependency: when it is missing
the test fails saying so, it never skips.

What the fake driver does (sushy-tools 2.2.0): power changes land 1 to 11 seconds after the reset is
accepted (``*Restart`` shows ``Off`` at once, ``On`` later); ``PowerCycle`` and ``Nmi`` answer 501; the
systems collection lists UUIDs and ``/Systems/<name>`` redirects (307) to the UUID; NIC ids are MACs;
no CPU count, no memory size, no processors; ``Storage`` only for systems named in ``storage``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import pytest


@dataclass(frozen=True)
class FakeSystem:
    """One system of the fake driver."""

    uuid: str
    name: str
    power_state: str = "On"                    # "On" or "Off"
    macs: tuple[str, ...] = ()
    drives: tuple[tuple[str, int], ...] = ()   # (drive id, capacity in bytes), in one storage "1"

    def config(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "name": self.name, "power_state": self.power_state, "external_notifier": False,
                "nics": [{"mac": mac, "ip": f"10.0.0.{i + 10}"} for i, mac in enumerate(self.macs)]}


@dataclass
class SushyEmulator:
    url: str
    process: subprocess.Popen[bytes]
    directory: Path
    systems: tuple[FakeSystem, ...]
    username: str = "admin"
    password: str = ""
    log_path: Path = field(default_factory=Path)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def get(self, path: str) -> dict[str, Any]:
        """GET a Redfish resource directly (not through the code under test), following redirects."""
        request = urllib.request.Request(self.url + path)
        if self.password:
            token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=5) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result


def emulator_command() -> str:
    """The ``sushy-emulator`` next to this Python (the virtualenv's), or on PATH; fail loudly otherwise."""
    beside = Path(sys.executable).parent / "sushy-emulator"
    if beside.exists():
        return str(beside)
    found = shutil.which("sushy-emulator")
    if found is None:
        pytest.fail("sushy-emulator is not installed: it is a test dependency (pip install -e '.[test]', which "
                    "brings sushy-tools==2.2.0)", pytrace=False)
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    return free_port()


def _config(directory: Path, systems: Sequence[FakeSystem], auth_file: Path | None) -> str:
    storage: dict[str, list[dict[str, Any]]] = {}
    drives: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for system in systems:
        if system.drives:
            storage[system.uuid] = [{"Id": "1", "Name": "Local Storage Controller",
                                     "StorageControllers": [{"MemberId": "0", "Name": "Contoso Integrated RAID",
                                                             "SpeedGbps": 12}],
                                     "Drives": [d for d, _ in system.drives]}]
            drives[(system.uuid, "1")] = [{"Id": d, "Name": d, "CapacityBytes": size, "Protocol": "SAS"}
                                          for d, size in system.drives]
    lines = [
        "SUSHY_EMULATOR_FAKE_DRIVER = True",
        f"SUSHY_EMULATOR_STATE_DIR = {str(directory / 'state')!r}",
        f"SUSHY_EMULATOR_FAKE_SYSTEMS = {[s.config() for s in systems]!r}",
        f"SUSHY_EMULATOR_STORAGE = {storage!r}",
        f"SUSHY_EMULATOR_DRIVES = {drives!r}",
    ]
    if auth_file is not None:
        lines.append(f"SUSHY_EMULATOR_AUTH_FILE = {str(auth_file)!r}")
    return "\n".join(lines) + "\n"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/redfish/v1/", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextlib.contextmanager
def running_sushy(directory: Path, systems: Sequence[FakeSystem], *,
                  credentials: tuple[str, str] | None = None, ready_timeout: float = 30.0,
                  extra_env: Mapping[str, str] | None = None) -> Iterator[SushyEmulator]:
    """Run the emulator with ``systems`` (and basic auth for ``credentials``) until the block ends."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state").mkdir(exist_ok=True)
    auth_file = None
    if credentials is not None:
        user, password = credentials
        auth_file = directory / "htpasswd"
        # rounds=4: the emulator checks the hash on every request
        digest = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        auth_file.write_text(f"{user}:{digest}\n")
    config = directory / "emulator.conf"
    config.write_text(_config(directory, systems, auth_file))
    env = {**os.environ, **(extra_env or {})}
    env.pop("SUSHY_EMULATOR_CONFIG", None)
    command = emulator_command()
    last_log = ""
    for attempt in range(3):                 # the free port may be taken between choosing and binding
        port = free_port()
        log_path = directory / f"emulator-{attempt}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen([command, "--config", str(config), "--fake", "-i", "127.0.0.1", "-p", str(port)],
                                       stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=directory)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ready_timeout
        while process.poll() is None and not _answers(url) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.poll() is None and _answers(url):
            emulator = SushyEmulator(url=url, process=process, directory=directory, systems=tuple(systems),
                                     username=credentials[0] if credentials else "admin",
                                     password=credentials[1] if credentials else "", log_path=log_path)
            try:
                yield emulator
            finally:
                _stop(process)
            return
        _stop(process)
        last_log = log_path.read_text(errors="replace")
        if "Address already in use" not in last_log:
            break
    pytest.fail(f"sushy-emulator did not answer GET /redfish/v1/ within {ready_timeout}s; its log:\n{last_log[-3000:]}",
                pytrace=False)
